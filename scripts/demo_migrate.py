#!/usr/bin/env python3
"""The project's main job: long-lived TCP connections survive a VM's move.

Builds the DESIGN section 4 topology (scripts/veth_topology.sh) twice, with a
dual-stack VM (10.1.1.1 and 2001:db8:1::10):

  control   the VM moves from host A to host B with no state migration:
            B knows none of its connections and drops them (they stall).
  migrated  `samixdp migrate --vm 10.1.1.1 --vm 2001:db8:1::10 --peer hostb`
            sends the VM's state (both addresses, one bundle) from A to B's
            agent (signed bundles: full copy, delta, final), then the VM moves:
            every connection keeps exchanging data.

N connections (default 200) in four equal groups: IPv4 and IPv6, each half
opened by the VM towards the client and half by the client towards the VM (an
ACL on A allows that port for both addresses; it migrates too), each
exchanging a 64-byte record every --interval ms. Prints a table (alive per
family / broken, max and p99 stall, B's drops by reason, migration time and bytes)
and, for the migrated run, what the metrics endpoints said afterwards (B's agent
with --metrics: verdict counters and import phases; A's `samixdp metrics`: the
migration's phase durations),
writes JSON and a PNG timeline of per-connection throughput to --out, and
exits 0 only if the control run broke connections and the migrated run broke
none. Everything it builds is removed on exit, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOPOLOGY = REPO / "scripts" / "veth_topology.sh"
LOAD = REPO / "scripts" / "conn_load.py"
PY = REPO / ".venv" / "bin" / "python"
SAMIXDP = REPO / ".venv" / "bin" / "samixdp"
VM_IP, CLIENT_IP = "10.1.1.1", "192.0.2.10"
VM_IP6, CLIENT_IP6 = "2001:db8:1::10", "2001:db8:c::10"
VM_PREFIX, VM_PREFIX6 = "10.1.1.0/24", "2001:db8:1::/64"
TO_CLIENT_PORT, TO_VM_PORT = 9000, 9001
AGENT_PORT = 7800


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str | Path, env: dict[str, str] | None = None, check: bool = True,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {res.stderr.strip() or res.stdout}")
    return res


@dataclass
class Host:
    """One firewall host of the topology: its namespace and its own dirs."""

    name: str
    ns: str
    bpffs: str
    config_dir: str
    state_dir: str
    uplink_ip: str
    ifaces: list[str]

    def cli(self, *args: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, SAMIXDP, "--bpffs", self.bpffs,
                  "--config-dir", self.config_dir, "--state-dir", self.state_dir, *args,
                  check=check, timeout=timeout)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)


@dataclass
class Topology:
    suffix: str
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    up: bool = False

    def _topo(self, *args: str) -> str:
        return sh("bash", TOPOLOGY, *args, env={"SX_SUFFIX": self.suffix}).stdout

    def build(self) -> None:
        self.up = True  # set first: `down` is safe on a half-built topology
        self._topo("up")
        for line in self._topo("env").splitlines():
            k, _, v = line.partition("=")
            self.env[k] = v.strip("'")

    def host(self, which: str) -> Host:
        e = self.env
        return Host(
            name=f"host{which.lower()}",
            ns=e[f"SX_NS_{which}"],
            bpffs=e[f"SX_{which}_BPFFS"],
            config_dir=e[f"SX_{which}_CONFIG_DIR"],
            state_dir=e[f"SX_{which}_STATE_DIR"],
            uplink_ip=e[f"SX_{which}_UPLINK_IP"],
            ifaces=e[f"SX_{which}_IFACES"].split(),
        )

    def spawn(self, ns: str, *cmd: str | Path, lifetime: float) -> subprocess.Popen[bytes]:
        args = ["ip", "netns", "exec", ns, "timeout", "-s", "KILL", str(int(lifetime) + 10),
                *map(str, cmd)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def move_to_b(self) -> None:
        self._topo("move-to-b")

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
            if p.stdout:
                p.stdout.close()
        if self.up:
            sh("bash", TOPOLOGY, "down", env={"SX_SUFFIX": self.suffix}, check=False)
            self.up = False


def wait_line(proc: subprocess.Popen[bytes], prefix: str, timeout: float) -> str:
    """Reads the process's output until a line starts with `prefix`."""
    import select

    assert proc.stdout is not None
    end = time.monotonic() + timeout
    seen = []
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if not r:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            break
        seen.append(line.rstrip())
        if prefix in line:
            return line
    raise RuntimeError(f"waited for {prefix!r}; got: {' | '.join(seen[-5:]) or 'nothing'}")


# ---- the metrics endpoints ----


def scrape(ns: str, address: str) -> str:
    """GET /metrics of an endpoint on a namespace's loopback."""
    get = ("import sys, urllib.request; "
           "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", get,
              f"http://{address}/metrics").stdout


def summarise_metrics(b_text: str, a_text: str) -> dict[str, Any]:
    """B's verdict packets (non-zero) and import phases, A's migration phases:
    {phase: [count, seconds]} from the histograms' _count and _sum."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text)
                for s in f.samples]

    def phases(text: str, name: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for n, labels, v in samples(text):
            if n in (f"{name}_count", f"{name}_sum"):
                out.setdefault(labels["phase"], [0, 0.0])[n.endswith("_sum")] = v
        return out

    verdicts = {labels["reason"]: int(v) for n, labels, v in samples(b_text)
                if n == "samixdp_verdict_packets_total" and v}
    return {"b_verdict_packets": verdicts,
            "b_import_phases": phases(b_text, "samixdp_import_phase_seconds"),
            "a_migration_phases": phases(a_text, "samixdp_migration_phase_seconds")}


# ---- one run -------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    conns: int
    alive: int
    broken: int
    max_stall_ms: float
    p99_stall_ms: float
    b_drops: dict[str, int]
    migration: dict[str, Any] | None
    move_at_s: float
    timelines: list[list[float]]
    duration_s: float
    ends: dict[str, int]
    alive_by_family: dict[str, list[int]]  # "IPv4"/"IPv6" -> [alive, conns]
    metrics: dict[str, Any] | None = None  # the migrated run's scrapes, summarised


def judge(load: dict[str, Any], duration: float, move_at: float, alive_within: float
          ) -> tuple[list[bool], list[float], list[list[float]], dict[str, int]]:
    """Per connection: alive at the end?, worst gap between echoes, echo times."""
    alive, stalls, timelines = [], [], []
    ends: dict[str, int] = {}
    stopped = load["stopped"] - load["start"]
    for c in load["conns"]:
        echoes = c["echoes"]
        ends[c["end"]] = ends.get(c["end"], 0) + 1
        timelines.append(echoes)
        if not echoes or c["end"] != "open":
            alive.append(False)
            stalls.append(stopped * 1000)
            continue
        points = [*echoes, stopped]
        gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
        stalls.append(max(gaps) * 1000)
        # alive: still echoing at the end, well after the move
        alive.append(echoes[-1] >= stopped - alive_within and echoes[-1] > move_at + 1.0)
    return alive, stalls, timelines, ends


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def one_run(name: str, migrate: bool, args: argparse.Namespace, out: Path) -> RunResult:
    topo = Topology(suffix=f"{args.suffix}{'m' if migrate else 'c'}")
    try:
        log(f"{name}: building the topology (VM {VM_IP} {VM_IP6} behind host A)")
        topo.build()
        a, b = topo.host("A"), topo.host("B")
        for h in (a, b):
            h.cli("keys", "init", "--host-id", h.name)
        keys = {h.name: h.cli("keys", "show").stdout.strip() for h in (a, b)}
        # each trusts the other for the VM prefix only (--vms: its scope)
        scope = f"{VM_PREFIX},{VM_PREFIX6}"
        a.cli("peers", "add", b.name, "--address", f"{b.uplink_ip}:{AGENT_PORT}",
              "--key", keys[b.name], "--vms", scope)
        b.cli("peers", "add", a.name, "--address", f"{a.uplink_ip}:{AGENT_PORT}",
              "--key", keys[a.name], "--vms", scope)
        for h in (a, b):
            for iface in h.ifaces:
                # the client opens all its connections within a second: above the
                # default SYN rate limit (200/s per source and VM), which would ban it
                h.cli("attach", iface, "--protect", VM_PREFIX, "--protect", VM_PREFIX6,
                      "--max-sessions", "65536", "--syn-rate", str(max(200, 4 * args.conns)))
        for vm in (VM_IP, VM_IP6):
            a.cli("acl", "add", "--vm", vm, "--proto", "tcp", "--dport", str(TO_VM_PORT))
        if migrate:
            agent = topo.spawn(b.ns, SAMIXDP, "--bpffs", b.bpffs, "--config-dir", b.config_dir,
                               "--state-dir", b.state_dir, "agent", "--listen",
                               f"{b.uplink_ip}:{AGENT_PORT}", "--pickup", "10",
                               "--metrics", "127.0.0.1:0", lifetime=args.duration + 60)
            wait_line(agent, '"listening"', 20)
            b_metrics = json.loads(wait_line(agent, '"metrics"', 20))["address"]
            exporter = topo.spawn(a.ns, SAMIXDP, "--bpffs", a.bpffs, "--config-dir",
                                  a.config_dir, "--state-dir", a.state_dir, "metrics",
                                  "--listen", "127.0.0.1:0", lifetime=args.duration + 60)
            line = wait_line(exporter, "serving http://", 20)
            a_metrics = line.split("http://", 1)[1].split("/metrics", 1)[0]
        lifetime = args.duration + 30
        for ns, ip, port in ((topo.env["SX_NS_CLIENT"], CLIENT_IP, TO_CLIENT_PORT),
                             (topo.env["SX_NS_VM"], VM_IP, TO_VM_PORT),
                             (topo.env["SX_NS_CLIENT"], CLIENT_IP6, TO_CLIENT_PORT),
                             (topo.env["SX_NS_VM"], VM_IP6, TO_VM_PORT)):
            srv = topo.spawn(ns, sys.executable, LOAD, "serve", ip, str(port),
                             "--lifetime", str(lifetime), lifetime=lifetime)
            wait_line(srv, "listening", 10)
        quarter = args.conns // 4
        runs = {}
        for label, ns, ip, port, n in (
            ("vm->client", topo.env["SX_NS_VM"], CLIENT_IP, TO_CLIENT_PORT,
             args.conns - 3 * quarter),
            ("client->vm", topo.env["SX_NS_CLIENT"], VM_IP, TO_VM_PORT, quarter),
            ("vm->client6", topo.env["SX_NS_VM"], CLIENT_IP6, TO_CLIENT_PORT, quarter),
            ("client->vm6", topo.env["SX_NS_CLIENT"], VM_IP6, TO_VM_PORT, quarter),
        ):
            f = out / f"{name}-{label.replace('->', '-to-')}.json"
            proc = topo.spawn(ns, sys.executable, LOAD, "run", ip, str(port), "--conns", str(n),
                              "--duration", str(args.duration), "--interval",
                              str(args.interval), "--out", f, lifetime=args.duration + 20)
            runs[label] = (proc, f)
        for label, (proc, _) in runs.items():
            line = wait_line(proc, "connected", 30)
            log(f"{name}: {label}: {line.strip()}")
        t_load = time.monotonic()
        time.sleep(args.settle)
        migration = None
        if migrate:
            log(f"{name}: samixdp migrate --vm {VM_IP} --vm {VM_IP6} --peer {b.name} "
                "(on host A)")
            t0 = time.monotonic()
            res = a.cli("migrate", "--vm", VM_IP, "--vm", VM_IP6, "--peer", b.name,
                        "--source-grace", "5", "--json", timeout=120)
            report = json.loads(res.stdout)
            report["wall_s"] = round(time.monotonic() - t0, 3)
            migration = report
            log(f"{name}: migration {report['outcome']}: {report['total_bytes']} bytes, "
                f"{report['total_seconds'] * 1000:.1f} ms in phases, "
                f"{report['wall_s'] * 1000:.0f} ms wall")
        log(f"{name}: moving the VM behind host B")
        t_move = time.monotonic()
        topo.move_to_b()
        for _, (proc, _) in runs.items():
            proc.wait(timeout=args.duration + 30)
        stats = b.cli_json("stats")
        b_drops = {k: v for k, v in stats.items() if k.startswith("drop-") and v}
        metrics = None
        if migrate:
            metrics = summarise_metrics(scrape(b.ns, b_metrics), scrape(a.ns, a_metrics))
        alive, stalls, timelines, ends = [], [], [], {}
        by_family: dict[str, list[int]] = {"IPv4": [0, 0], "IPv6": [0, 0]}
        duration = 0.0
        for label, (_, f) in runs.items():
            load = json.loads(f.read_text())
            move_at = t_move - load["start"]
            al, st, tl, en = judge(load, args.duration, move_at, alive_within=1.0)
            fam = by_family["IPv6" if label.endswith("6") else "IPv4"]
            fam[0] += sum(al)
            fam[1] += len(al)
            alive += al
            stalls += st
            timelines += tl
            for k, v in en.items():
                ends[k] = ends.get(k, 0) + v
            duration = max(duration, load["stopped"] - load["start"])
        return RunResult(
            name=name, conns=len(alive), alive=sum(alive), broken=len(alive) - sum(alive),
            max_stall_ms=round(max(stalls), 1) if stalls else 0.0,
            p99_stall_ms=round(percentile(stalls, 99), 1), b_drops=b_drops,
            migration=migration, move_at_s=round(t_move - t_load + 0.0, 3),
            timelines=timelines, duration_s=duration, ends=ends, alive_by_family=by_family,
            metrics=metrics,
        )
    finally:
        topo.teardown()


# ---- output --------------------------------------------------------------------------


def print_table(results: list[RunResult]) -> None:
    head = ["run", "conns", "alive", "IPv4 alive", "IPv6 alive", "broken", "max stall ms",
            "p99 stall ms",
            "dropped at B (reason: packets)", "migration ms", "bytes"]
    rows = []
    for r in results:
        drops = ", ".join(f"{k}: {v}" for k, v in r.b_drops.items()) or "none"
        mig_ms = f"{r.migration['total_seconds'] * 1000:.0f}" if r.migration else "-"
        mig_b = str(r.migration["total_bytes"]) if r.migration else "-"
        fam = {k: f"{v[0]}/{v[1]}" for k, v in r.alive_by_family.items()}
        rows.append([r.name, r.conns, r.alive, fam["IPv4"], fam["IPv6"], r.broken,
                     r.max_stall_ms, r.p99_stall_ms, drops, mig_ms, mig_b])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(fmt.format(*head))
    for row in rows:
        print(fmt.format(*map(str, row)))
    for r in results:
        if r.migration:
            print(f"\nmigration phases ({r.name}):")
            for p in r.migration["phases"]:
                print(f"  {p['name']:<12} {p['seconds'] * 1000:8.1f} ms {p['bytes']:>8} B  "
                      f"exported {sum(p['exported'].values()):>5}  "
                      f"imported {sum(p['imported'].values()):>5}")
        if r.metrics:
            m = r.metrics
            print(f"\nmetrics endpoints ({r.name}, scraped after the move):")
            print("  B samixdp_verdict_packets_total: " + ", ".join(
                f"{k} {v}" for k, v in sorted(m["b_verdict_packets"].items())))
            for label, key in (("A samixdp_migration_phase_seconds", "a_migration_phases"),
                               ("B samixdp_import_phase_seconds", "b_import_phases")):
                print(f"  {label}: " + ", ".join(
                    f"{ph} {int(c)}x {t * 1000:.1f} ms" for ph, (c, t) in m[key].items()))


def plot(results: list[RunResult], path: Path, bin_s: float = 0.2) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        log("matplotlib missing: no PNG (make setup installs it)")
        return False
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.6 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        nbins = max(1, int(np.ceil(r.duration_s / bin_s)))
        grid = np.zeros((len(r.timelines), nbins))
        for i, echoes in enumerate(r.timelines):
            idx = np.minimum((np.asarray(echoes) / bin_s).astype(int), nbins - 1)
            np.add.at(grid[i], idx, 1)
        grid = grid / bin_s  # records/s per connection
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(0, nbins * bin_s, len(r.timelines), 0))
        move = r.move_at_s
        ax.axvline(move, color="red", linestyle="--", linewidth=1)
        ax.text(move, len(r.timelines) * 0.03, " VM moves to B", color="red", va="top",
                fontsize=9)
        ax.set_ylabel("connection")
        ax.set_title(f"{r.name}: {r.alive}/{r.conns} alive, max stall {r.max_stall_ms:.0f} ms")
        fig.colorbar(im, ax=ax, label="records/s")
    axes[-1, 0].set_xlabel("seconds since the connections opened")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--duration", type=float, default=14.0, help="seconds of traffic per run")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds before migrate/move")
    ap.add_argument("--interval", type=float, default=50.0, help="ms between records")
    ap.add_argument("--out", type=Path, default=REPO / "demo-out")
    ap.add_argument("--suffix", default=f"d{os.getpid() % 10000}")
    ap.add_argument("--only", choices=("control", "migrated"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: needs root: run `sudo make demo`", file=sys.stderr)
        return 2
    if args.conns < 4 or args.duration < args.settle + 4:
        print("demo: need --conns >= 4 and --duration >= --settle + 4", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for name, migrate in (("control", False), ("migrated", True)):
        if args.only and args.only != name:
            continue
        results.append(one_run(name, migrate, args, args.out))
    print_table(results)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernel": os.uname().release,
        "conns": args.conns,
        "interval_ms": args.interval,
        "runs": [{k: v for k, v in r.__dict__.items() if k != "timelines"} for r in results],
    }
    (args.out / "demo.json").write_text(json.dumps(doc, indent=2))
    png = args.out / "timeline.png"
    if plot(results, png):
        print(f"\ntimeline: {png}")
    print(f"results: {args.out / 'demo.json'}")
    by = {r.name: r for r in results}
    ok = True
    if "control" in by and by["control"].broken == 0:
        print("DEMO FAILED: the control run broke no connection (the test could not fail)")
        ok = False
    elif "control" in by and any(v[0] for v in by["control"].alive_by_family.values()):
        print("DEMO FAILED: without migration some connections survived the move: "
              f"{by['control'].alive_by_family}")
        ok = False
    if "migrated" in by and by["migrated"].broken != 0:
        print(f"DEMO FAILED: {by['migrated'].broken} connections broke despite migration")
        ok = False
    if ok:
        print("\nDEMO OK: without migration B dropped the VM's connections; with migration "
              "every connection survived the move.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
