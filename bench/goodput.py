"""TCP goodput through the firewall host: no filter vs nftables vs sami-xdp in each
attach mode (native, generic, tc, auto), 1 and 8 streams, both directions, in one run.

Topology: the demo topology (scripts/veth_topology.sh, its own SX_SUFFIX): client --
gateway -- host A (routes between sxa-gw, the uplink, and sxa-vm, the VM side) -- VM
10.1.1.1 (2001:db8:1::/64 too). Every link is a veth pair; everything shares the
machine's CPUs (iperf3 sender, receiver and the three forwarding hops).

Configurations of host A (the list in CONFIGS; --configs picks some):
  none      nothing attached, no nftables (the reference of every ratio)
  nftables  one `inet` table: a fib reverse-path check in prerouting (a packet whose
            source would not be routed back out of the link it came in on is dropped:
            sami-xdp's anti-spoofing), forward policy drop, `ct state
            established,related accept`, invalid dropped, new connections accepted
            only from the VM's prefixes on sxa-vm
  native, generic, tc, auto
            `samixdp attach LINK --protect 10.1.1.0/24 --protect 2001:db8:1::/64
            --mode M` on both of host A's links (no ACL: both connections are opened by
            the VM), then `detach` of both and `reset --yes` (fresh state per
            configuration). A mode whose attach fails (e.g. a mode this tree does not
            have yet) is recorded as {"error": ...} and shown as n/a. For auto, the
            mode it attached (per link, from attach's output) is recorded.
The CLI runs as `python -m sami_xdp` with PYTHONPATH = this tree, inside host A's
namespace on host A's bpffs: the bench measures the code beside it.

Measurement: an iperf3 server (`-s -1`) in the client namespace, the client in the VM
namespace: `iperf3 -c CLIENT -t SECONDS -P 1|8 -J`, "VM->client" (the VM sends) and
"client->VM" (`-R`: the same connection, opened by the VM, the client sends; the
firewall sees an outbound connection and inbound data). Goodput =
end.sum_received.bits_per_second; retransmits (end.sum_sent) are kept. Each iperf3
runs under `timeout`. Per configuration and round: one unsolicited TCP connect from the
client to the VM (a closed port): refused = the packet reached the VM (expected only
with no filter), timed out = dropped (`inbound_blocked`), so a filter that let
everything through would show. `ethtool -k` (TSO, GSO) of the VM's veth (sxv-a) and
of the gateway's veth towards A (sxg-a) is recorded per configuration: native XDP on
veth turns segmentation offload off on the peer (each 1500-byte segment then crosses
the hop separately), which is why native mode on veth is slow; generic XDP copies every
non-linear GSO skb.

Noise: the machine is shared. Each round runs every configuration once (the order
reversed every other round; within a configuration the four cases, reversed too);
the figure per case is the median over rounds, the ratio the median of the per-round
ratios to the same round's "none" (same case). Target: in the mode `--mode auto`
picks, the worst case's ratio >= 0.9.

Run as root (about 8 minutes with the defaults, 2 with --quick):
    .venv/bin/python bench/goodput.py [--quick] [--rounds N] [--seconds S]
Writes bench/results/goodput.json and prints a table; the topology (namespaces, bpffs
mounts, nft table, iperf3 processes) is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lib_env

ROOT = Path(__file__).resolve().parent.parent
TOPO = ROOT / "scripts" / "veth_topology.sh"
CONFIGS = ("none", "nftables", "native", "generic", "tc", "auto")
XDP_MODES = ("native", "generic", "tc", "auto")
STREAMS = (1, 8)
DIRECTIONS = ("VM->client", "client->VM")
PORT = 5201
CLOSED_PORT = 5999  # nothing listens there in the VM: the inbound probe
TARGET = 0.9
NFT_TABLE = "sxgoodput"


def nft_ruleset(env: dict[str, str]) -> str:
    return f"""
table inet {NFT_TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority -150; policy accept;
        fib saddr . iif oif missing counter drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid counter drop
        iifname "sxa-vm" ip saddr {env["SX_VM_NET"]} ct state new accept
        iifname "sxa-vm" ip6 saddr {env["SX_VM_NET6"]} ct state new accept
        counter
    }}
}}
"""


def case_key(direction: str, streams: int) -> str:
    return f"{direction}, {streams} stream{'s' if streams > 1 else ''}"


CASES = [(d, s) for d in DIRECTIONS for s in STREAMS]


def nsx(ns: str, *cmd: str) -> list[str]:
    """cmd inside network namespace ns."""
    return ["ip", "netns", "exec", ns, *cmd]


class BenchError(Exception):
    pass


def run(
    cmd: list[str], timeout: float = 60, check: bool = True, what: str = ""
) -> subprocess.CompletedProcess:
    """cmd, bounded; with check, a failure raises BenchError naming `what` (or cmd)."""
    what = what or shlex.join(cmd)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: timed out after {timeout:.0f} s") from exc
    if check and r.returncode != 0:
        raise BenchError(f"{what}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
    return r


class Topology:
    """scripts/veth_topology.sh with our own suffix; host A's CLI."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.env: dict[str, str] = {}
        self.up = False

    def script(self, verb: str, timeout: float = 60) -> str:
        env = {**os.environ, "SX_SUFFIX": self.suffix}
        r = subprocess.run(
            ["bash", str(TOPO), verb], capture_output=True, text=True, env=env, timeout=timeout
        )
        if r.returncode != 0:
            raise BenchError(f"veth_topology.sh {verb}: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def start(self) -> None:
        self.script("up")  # removes what it built if it fails
        self.up = True
        for line in self.script("env").splitlines():
            k, _, v = line.partition("=")
            self.env[k] = v.strip("'")

    def stop(self) -> None:
        if self.up:
            self.script("down")
            self.up = False

    def ns(self, which: str) -> str:
        return self.env[f"SX_NS_{which}"]

    def links(self) -> list[str]:
        return self.env["SX_A_IFACES"].split()

    def samixdp(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Host A's CLI, this tree's code (PYTHONPATH first), in A's namespace."""
        e = self.env
        path = ":".join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        prefix = nsx(e["SX_NS_A"], "env", f"PYTHONPATH={path}")
        cli = [sys.executable, "-m", "sami_xdp", "--bpffs", e["SX_A_BPFFS"]]
        cli += ["--config-dir", e["SX_A_CONFIG_DIR"], "--state-dir", e["SX_A_STATE_DIR"]]
        return run([*prefix, *cli, *args], timeout, check, what=f"samixdp {' '.join(args)}")


# ---- host A's configurations -------------------------------------------------------


class Config:
    def __init__(self, name: str) -> None:
        self.name = name
        self.attached: dict[str, str] = {}  # link -> mode, for ours

    def setup(self, t: Topology) -> None: ...

    def teardown(self, t: Topology) -> None: ...

    def counters(self, t: Topology) -> dict[str, int]:
        return {}


class NoFilter(Config):
    pass


class Nftables(Config):
    def setup(self, t: Topology) -> None:
        path = Path(t.env["SX_RUN_DIR"]) / "goodput.nft"
        path.write_text(nft_ruleset(t.env))
        run(nsx(t.ns("A"), "nft", "-f", str(path)))

    def teardown(self, t: Topology) -> None:
        run(
            nsx(t.ns("A"), "nft", "delete", "table", "inet", NFT_TABLE),
            check=False,
        )
        run(nsx(t.ns("A"), "conntrack", "-F"), check=False)

    def counters(self, t: Topology) -> dict[str, int]:
        r = run(
            nsx(t.ns("A"), "nft", "-j", "list", "table", "inet", NFT_TABLE),
            check=False,
        )
        out: dict[str, int] = {}
        if r.returncode != 0:
            return out
        for item in json.loads(r.stdout)["nftables"]:
            rule = item.get("rule")
            for expr in (rule or {}).get("expr", []):
                if "counter" in expr:
                    out[f"{rule['chain']}#{rule['handle']}"] = int(expr["counter"]["packets"])
        return out


class SamiXdp(Config):
    def setup(self, t: Topology) -> None:
        self.attached = {}
        try:
            for link in t.links():
                nets = ["--protect", t.env["SX_VM_NET"], "--protect", t.env["SX_VM_NET6"]]
                r = t.samixdp("attach", link, *nets, "--mode", self.name, timeout=120, check=False)
                if r.returncode != 0:
                    why = (r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"]
                    raise BenchError(f"attach {link} --mode {self.name}: {why[-1]}")
                m = re.search(r" in (\S+) mode", r.stdout)
                self.attached[link] = m.group(1) if m else r.stdout.strip()
        except BenchError:
            self.teardown(t)
            raise

    def teardown(self, t: Topology) -> None:
        for link in self.attached:
            t.samixdp("detach", link, check=False)
        t.samixdp("reset", "--yes", check=False)

    def counters(self, t: Topology) -> dict[str, int]:
        r = t.samixdp("stats", "--json", check=False)
        if r.returncode != 0:
            return {}
        return {k: int(v) for k, v in json.loads(r.stdout).items() if v}


def make_config(name: str) -> Config:
    if name == "none":
        return NoFilter(name)
    if name == "nftables":
        return Nftables(name)
    return SamiXdp(name)


def leftovers(t: Topology) -> list[str]:
    """Anything still hooked into host A's links (XDP program, tc filter, nft table)."""
    found = []
    ns = t.ns("A")
    for link in t.links():
        info = json.loads(run(["ip", "-n", ns, "-j", "link", "show", link]).stdout)[0]
        if info.get("xdp"):
            found.append(f"XDP on {link}")
        for hook in ("ingress", "egress"):
            r = run(["tc", "-n", ns, "filter", "show", "dev", link, hook], check=False)
            if r.stdout.strip():
                found.append(f"tc {hook} filter on {link}")
    r = run(nsx(ns, "nft", "list", "tables"), check=False)
    if r.stdout.strip():
        found.append(f"nft tables: {' '.join(r.stdout.split())}")
    return found


def offloads(t: Topology) -> dict[str, dict[str, str]]:
    """TSO/GSO of the veths that send into host A (the VM's and the gateway's)."""
    out = {}
    for ns, link in ((t.ns("VM"), "sxv-a"), (t.ns("GW"), "sxg-a")):
        r = run(nsx(ns, "ethtool", "-k", link), check=False)
        feats = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
        out[link] = {
            k: feats.get(k, "?").split()[0] if feats.get(k) else "?"
            for k in ("tcp-segmentation-offload", "generic-segmentation-offload")
        }
    return out


def inbound_blocked(t: Topology) -> bool:
    """An unsolicited connect from the client to a closed port of the VM: True when it
    timed out (dropped on the way), False when refused (the SYN reached the VM)."""
    connect = f"exec 3<>/dev/tcp/{t.env['SX_VM_IP']}/{CLOSED_PORT}"
    r = run(nsx(t.ns("CLIENT"), "timeout", "1", "bash", "-c", connect), timeout=10, check=False)
    return r.returncode == 124


# ---- one iperf3 measurement ---------------------------------------------------------


def wait_listening(ns: str, port: int) -> None:
    for _ in range(100):
        r = run(nsx(ns, "ss", "-ltnH"), check=False)
        if f":{port} " in r.stdout:
            return
        time.sleep(0.05)
    raise BenchError(f"iperf3 server not listening on port {port} in {ns}")


def iperf(t: Topology, direction: str, streams: int, seconds: int) -> dict[str, Any]:
    bound = seconds + 20
    kill = ["timeout", "-s", "KILL", str(bound)]  # bounded even if this process dies
    serve = ["iperf3", "-s", "-1", "-B", t.env["SX_CLIENT_IP"], "-p", str(PORT)]
    server = subprocess.Popen(
        nsx(t.ns("CLIENT"), *kill, *serve), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(t.ns("CLIENT"), PORT)
        cmd = nsx(t.ns("VM"), *kill, "iperf3", "-c", t.env["SX_CLIENT_IP"], "-p", str(PORT))
        cmd += ["-t", str(seconds), "-P", str(streams), "-J", "--connect-timeout", "3000"]
        if direction == "client->VM":
            cmd.append("-R")
        r = run(cmd, timeout=bound + 5, check=False)
        try:
            rep = json.loads(r.stdout)
        except ValueError as exc:
            raise BenchError(f"iperf3 exit {r.returncode}, no JSON: {r.stderr.strip()}") from exc
        if "error" in rep:
            raise BenchError(f"iperf3: {rep['error']}")
        end = rep["end"]
        return {
            "bits_per_s": float(end["sum_received"]["bits_per_second"]),
            "retransmits": int(end["sum_sent"].get("retransmits", 0)),
            "seconds": float(end["sum_received"]["seconds"]),
        }
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ---- rounds and summary -------------------------------------------------------------


def measure_config(
    t: Topology, cfg: Config, seconds: int, reverse: bool, first: bool
) -> dict[str, Any]:
    try:
        cfg.setup(t)
    except BenchError as exc:
        return {"error": str(exc)}
    res: dict[str, Any] = {"cases": {}}
    try:
        if cfg.attached:
            res["attached"] = dict(cfg.attached)
        if first:
            res["offloads"] = offloads(t)
        for direction, streams in CASES[::-1] if reverse else CASES:
            key = case_key(direction, streams)
            try:
                res["cases"][key] = iperf(t, direction, streams, seconds)
            except BenchError as exc:
                res["cases"][key] = {"error": str(exc)}
        res["inbound_blocked"] = inbound_blocked(t)
        res["counters"] = cfg.counters(t)
    finally:
        cfg.teardown(t)
        left = leftovers(t)
        if left:
            raise BenchError(f"{cfg.name} left behind: {', '.join(left)}")
    return res


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict[str, dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        rounds = [r[name] for r in runs if name in r]
        errors = [r["error"] for r in rounds if "error" in r]
        ok = [r for r in rounds if "error" not in r]
        if not ok:
            out[name] = {"error": errors[0] if errors else "not measured"}
            continue
        entry: dict[str, Any] = {"cases": {}}
        if errors:
            entry["errors"] = errors
        modes = sorted({m for r in ok for m in r.get("attached", {}).values()})
        if modes:
            entry["attached_mode"] = "/".join(modes)
        entry["inbound_blocked"] = all(r.get("inbound_blocked") for r in ok)
        for direction, streams in CASES:
            key = case_key(direction, streams)
            gbit, ratios, retr = [], [], []
            for rnd in runs:
                c = rnd.get(name, {}).get("cases", {}).get(key)
                if not c or "error" in c:
                    continue
                gbit.append(c["bits_per_s"] / 1e9)
                retr.append(c["retransmits"])
                base = rnd.get("none", {}).get("cases", {}).get(key)
                if base and "error" not in base and base["bits_per_s"]:
                    ratios.append(c["bits_per_s"] / base["bits_per_s"])
            g, x = median(gbit), median(ratios)
            entry["cases"][key] = {
                "gbit_s": round(g, 2) if g is not None else None,
                "rounds_gbit_s": [round(v, 2) for v in gbit],
                "ratio_to_none": round(x, 3) if x is not None else None,
                "rounds_ratio": [round(v, 3) for v in ratios],
                "retransmits": median([float(v) for v in retr]),
            }
        out[name] = entry
    return out


def target(summary: dict[str, Any]) -> dict[str, Any]:
    auto = summary.get("auto", {})
    res: dict[str, Any] = {"config": "auto", "threshold": TARGET}
    ratios = {
        k: c["ratio_to_none"]
        for k, c in auto.get("cases", {}).items()
        if c["ratio_to_none"] is not None
    }
    if not auto:
        res.update(met=None, why="auto not measured")
        return res
    if "error" in auto or len(ratios) < len(CASES):
        res.update(met=None, why=auto.get("error", "some cases not measured"))
        return res
    worst = min(ratios, key=lambda k: ratios[k])
    res.update(
        attached_mode=auto.get("attached_mode"),
        worst_case=worst,
        worst_ratio=ratios[worst],
        met=ratios[worst] >= TARGET,
    )
    nft = summary.get("nftables", {}).get("cases", {}).get(worst)
    if nft:
        res["nftables_ratio_same_case"] = nft["ratio_to_none"]
    return res


def label(name: str, entry: dict[str, Any]) -> str:
    if name in ("none", "nftables"):
        return "no filter" if name == "none" else name
    mode = entry.get("attached_mode")
    return f"ours {name}" + (f" ({mode})" if name == "auto" and mode else "")


def print_table(summary: dict[str, Any], tg: dict[str, Any], rounds: int) -> None:
    keys = [case_key(d, s) for d, s in CASES]
    heads = [k.replace(" streams", "").replace(" stream", "") for k in keys]
    print(
        f"\nTCP goodput through host A, Gbit/s: median of {rounds} round(s) "
        "(x: median ratio to no filter, same round)"
    )
    print(f"{'':22}" + "".join(f"{h:>18}" for h in heads))
    for name, e in summary.items():
        cells = []
        for k in keys:
            c = e.get("cases", {}).get(k)
            if not c or c["gbit_s"] is None:
                cells.append("n/a")
            elif name == "none":
                cells.append(f"{c['gbit_s']:.2f}")
            else:
                x = c["ratio_to_none"]
                cells.append(
                    f"{c['gbit_s']:.2f} ({x:.2f}x)" if x is not None else f"{c['gbit_s']:.2f}"
                )
        print(f"{label(name, e):22}" + "".join(f"{c:>18}" for c in cells))
    for name, e in summary.items():
        if "error" in e:
            print(f"  {name}: n/a: {e['error']}")
        elif name != "none" and not e.get("inbound_blocked"):
            print(f"  {name}: WARNING: an unsolicited inbound connect reached the VM")
    if tg["met"] is None:
        print(f"target: auto >= {TARGET}x no filter in every case: n/a ({tg['why']})")
    else:
        nft = tg.get("nftables_ratio_same_case")
        print(
            f"target: auto ({tg['attached_mode']}) worst case {tg['worst_case']}: "
            f"{tg['worst_ratio']:.2f}x no filter (>= {TARGET}x: "
            f"{'met' if tg['met'] else 'MISSED'})"
            + (f"; nftables {nft:.2f}x there" if nft is not None else "")
        )


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s runs")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    ap.add_argument(
        "--seconds", type=int, default=None, help="iperf3 -t per measurement (default 4, quick 2)"
    )
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from {','.join(CONFIGS)} (none is always run)",
    )
    ap.add_argument("--suffix", default="gp1", help="SX_SUFFIX of the topology")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "goodput.json")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2 if args.quick else 4)
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, XDP, nftables)")
    if not 1 <= seconds <= 60 or not 1 <= rounds <= 20:
        raise SystemExit("--seconds must be 1..60 and --rounds 1..20")
    names = ["none", *(c for c in args.configs.split(",") if c and c != "none")]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configuration(s) {bad}: pick from {','.join(CONFIGS)}")

    t = Topology(args.suffix)
    runs: list[dict[str, dict[str, Any]]] = []
    offl: dict[str, Any] = {}
    failed: dict[str, str] = {}  # a config whose setup failed is not tried again
    started = time.time()
    with terminated_as_interrupt():
        try:
            t.start()
            for r in range(rounds):
                order = names if r % 2 == 0 else names[::-1]
                rnd: dict[str, dict[str, Any]] = {}
                for name in order:
                    if name in failed:
                        rnd[name] = {"error": failed[name]}
                        continue
                    res = measure_config(
                        t, make_config(name), seconds, reverse=r % 2 == 1, first=name not in offl
                    )
                    rnd[name] = res
                    if "error" in res:
                        failed[name] = res["error"]
                        print(f"round {r + 1} {name:9} n/a: {res['error']}", flush=True)
                        continue
                    if "offloads" in res:
                        offl[name] = res.pop("offloads")
                    cells = ", ".join(
                        f"{k} " + (f"{c['bits_per_s'] / 1e9:.2f}" if "error" not in c else "error")
                        for k, c in res["cases"].items()
                    )
                    att = (
                        f" [{'/'.join(sorted(set(res['attached'].values())))}]"
                        if res.get("attached")
                        else ""
                    )
                    print(f"round {r + 1} {name:9}{att}: {cells} Gbit/s", flush=True)
                    for k, c in res["cases"].items():
                        if "error" in c:
                            print(f"  {k}: {c['error']}", flush=True)
                if "error" in rnd["none"] or any(
                    "error" in c for c in rnd["none"]["cases"].values()
                ):
                    raise BenchError(f"no filter failed: {rnd['none']}")
                runs.append(rnd)
        except BenchError as exc:
            raise SystemExit(f"goodput: {exc}") from exc
        except KeyboardInterrupt:
            print("goodput: interrupted, removing the topology", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            t.stop()

    summary = summarize(runs, names)
    tg = target(summary)
    print_table(summary, tg, rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpu": lib_env.cpu_model(),
        "cpus": os.cpu_count(),
        "command": " ".join([".venv/bin/python", "bench/goodput.py", *sys.argv[1:]]),
        "datapath": {
            "head": lib_env.git("rev-parse", "--short", "HEAD"),
            "bpf_last_commit": lib_env.git("log", "-1", "--format=%h", "--", "bpf"),
            "dirty": bool(lib_env.git("status", "--porcelain", "--", "bpf", "sami_xdp")),
        },
        "settings": {
            "rounds": rounds,
            "seconds": seconds,
            "configs": names,
            "streams": list(STREAMS),
            "directions": {
                "VM->client": "iperf3 -c in the VM, server in the client ns",
                "client->VM": "the same with -R (the VM opens, the client sends)",
            },
            "goodput": "end.sum_received.bits_per_second",
            "topology": "scripts/veth_topology.sh (client - gateway - host A - VM), veth",
            "ours": "samixdp attach sxa-gw and sxa-vm --protect VM_NET --protect VM_NET6 "
            "--mode M; detach both and reset --yes after",
            "nftables": nft_ruleset(t.env).strip(),
        },
        "offloads": offl,
        "summary": summary,
        "target": tg,
        "runs": runs,
        "total_s": round(time.time() - started, 1),
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} ({doc['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
