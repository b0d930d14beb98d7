#!/usr/bin/env python3
"""Host drain through the real agents: 1 VM x 200k, 20 VMs x 10k and 50 VMs x 4k
sessions moved by `samixdp drain`, side by side in one run.

Hosts A and B are two firewalls in a private bpffs under /run (as in
bench/migrate_speed.py), each with a real `samixdp agent` process: A's runs with
A's --state-dir, so `samixdp drain` on A hands every VM's migration to it (threads
sharing one map scan per batch and one dirty-log group); B's receives. B holds
200k sessions of 8 VMs of its own throughout. Each configuration moves 200k
sessions in all: its VMs (one IPv4 address each, in 10.1.128.0/17, inside the
protected 10.1.0.0/16) hold sessions towards distinct outside clients, and
nothing else is on A. Per repeat: fill A, run

    samixdp drain --peer hostb --parallel P --keep-source --interval 0.5 --rounds 1 --json

(P = the number of VMs, at most 64) and time it from the CLI's start to its exit;
then check from the maps that every VM's session keys on B are exactly its keys
on A (any difference fails the bench), and delete the moved VMs' sessions and
pickup windows on both hosts for the next run.

For comparison, the way before drain: 20 `samixdp migrate --vm X --peer hostb
--keep-source --json` processes started at once with no agent on A (another
state dir, so each runs in its own process), 20 x 10k sessions; their wall time
from the first start to the last exit, and how many completed (a process may be
refused: only SAMIXDP_TRACK_SLOTS processes can track VMs at once).

Reported: a table (median wall seconds of --repeat runs, the ratio to 1 x 200k,
the drain's own seconds and the median per-VM phases from its --json report) and
bench/results/drain.json. The target "50 x 4k within 2x of 1 x 200k" is printed,
never asserted; the exit status is non-zero only when some VM's sessions did not
land exactly. Pins, mounts and agents are removed on any exit (SIGTERM too).

    sudo .venv/bin/python bench/drain.py               # 3 repeats
    sudo .venv/bin/python bench/drain.py --quick       # 1 repeat, no comparison
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import migrate_speed as M
import numpy as np

from sami_xdp.base.netutil import addrs_to_ips, in_networks
from sami_xdp.loader.compile import Limits
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, TrustStore, localproto
from sami_xdp.policy import protect
from sami_xdp.policy.config import create_firewall
from sami_xdp.policy.sessions import SESSION_MAPS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROTECT = "10.1.0.0/16"
MOVED = ipaddress.ip_network("10.1.128.0/17")  # the drained VMs live here; B's own elsewhere
TOTAL = 200_000
CONFIGS = ((1, 200_000), (20, 10_000), (50, 4_000))  # (VMs, sessions each)
MAX_PARALLEL = 64
INTERVAL_S, ROUNDS = 0.5, 1  # the drain defaults, passed explicitly
TARGET_RATIO = 2.0  # 50 x 4k within 2x of 1 x 200k
CLI_TIMEOUT_S = 120.0
# B's agent runs with its default caps (--max-conns 32, --max-pending-per-ip 4): a
# drain's migrations share at most 4 connections to it (PeerPool), whatever --parallel.
OLD_WAY = "20 × migrate processes (no agent)"


def vm_ips(n: int) -> list[str]:
    """n VM addresses in MOVED, 250 a /24."""
    return [f"10.1.{128 + i // 250}.{i % 250 + 1}" for i in range(n)]


def label(n_vms: int, per: int) -> str:
    return f"{n_vms} × {per // 1000}k"


@dataclass
class Hosts:
    """Both firewalls, their config and state dirs, and their agents."""

    mnt: Path
    tmp: Path
    fa: Firewall
    fb: Firewall
    cfg_a: Path
    st_a: Path
    agents: list[M.AgentProc] = field(default_factory=list)  # B's, then A's

    def cli(self, *args: str, state: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "sami_xdp", "--bpffs", str(self.mnt / "a"),
                "--config-dir", str(self.cfg_a), "--state-dir", str(state or self.st_a), *args]


@contextlib.contextmanager
def hosts(tmp: Path, b_args: tuple[str, ...]) -> Iterator[Hosts]:
    """A and B, trusting each other, B filled with its own VMs' sessions, both agents up."""
    with M.bpffs_mount() as mnt:
        cap = M.capacity_for(TOTAL)
        fa = create_firewall(mnt / "a", Limits(max_sessions=cap))
        fb = create_firewall(mnt / "b", Limits(max_sessions=cap))
        h = Hosts(mnt, tmp, fa, fb, tmp / "cfg-a", tmp / "st-a")
        try:
            for fw in (fa, fb):
                protect.add_protected(fw, PROTECT)
            M.fill_spread(fb, M.OTHERS_B, TOTAL, np.random.default_rng(1), 2)
            cfg_b, st_b = tmp / "cfg-b", tmp / "st-b"
            ida = HostIdentity.init(h.cfg_a, "hosta")
            idb = HostIdentity.init(cfg_b, "hostb")
            port_a, port_b = M.free_port(), M.free_port()
            trust_a = TrustStore.load(h.cfg_a)
            trust_a.add("hostb", f"127.0.0.1:{port_b}", idb.public_b64)
            trust_a.save()
            trust_b = TrustStore.load(cfg_b)
            trust_b.add("hosta", f"127.0.0.1:{port_a}", ida.public_b64, vms=PROTECT)
            trust_b.save()
            h.agents.append(M.AgentProc(mnt / "b", cfg_b, st_b, port_b, tmp / "agent-b.log",
                                        b_args))
            h.agents.append(M.AgentProc(mnt / "a", h.cfg_a, h.st_a, port_a, tmp / "agent-a.log"))
            yield h
        finally:
            try:
                for agent in h.agents:
                    agent.stop()
            finally:  # interrupted while stopping one: none may outlive the bench
                for agent in h.agents:
                    agent.stop()
                fa.close()
                fb.close()


# ---- state on both hosts -------------------------------------------------------------------


def fill_a(h: Hosts, vms: list[str], per: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i, vm in enumerate(vms):
        M.fill(h.fa, vm, per, rng, 10 + i)


def moved_keys(fw: Firewall) -> tuple[np.ndarray, np.ndarray]:
    """(keys as raw rows, their VM's address) of every session of a VM in MOVED."""
    rows, owners = [], []
    for name in SESSION_MAPS:
        keys, _ = fw.maps[name].dump()
        if not len(keys):
            continue
        lo, hi = in_networks(keys["addr_lo"], [MOVED]), in_networks(keys["addr_hi"], [MOVED])
        mine = keys[lo | hi]
        rows.append(np.ascontiguousarray(mine).view(f"V{keys.dtype.itemsize}"))
        owners.append(np.where(lo[lo | hi], mine["addr_lo"], mine["addr_hi"]))
    if not rows:
        return np.zeros(0, "V1"), np.zeros(0, "V16")
    return np.concatenate(rows), np.concatenate(owners)


def check(h: Hosts, vms: list[str], per: int, done: set[str] | None = None) -> dict[str, Any]:
    """Each VM's session keys on B against A's (A keeps them: --keep-source). `done`:
    only these VMs must have landed (the others must not be on B at all)."""
    ka, oa = moved_keys(h.fa)
    kb, ob = moved_keys(h.fb)
    ia, ib = addrs_to_ips(oa), addrs_to_ips(ob)
    missing = ~np.isin(ka, kb)
    extra = ~np.isin(kb, ka)
    per_vm: dict[str, dict[str, int]] = {
        vm: {"a": 0, "b": 0, "missing": 0, "extra": 0} for vm in vms}
    for ips, key, mask in ((ia, "a", None), (ib, "b", None), (ia, "missing", missing),
                           (ib, "extra", extra)):
        sel = ips if mask is None else [ip for ip, m in zip(ips, mask, strict=True) if m]
        for ip, count in zip(*np.unique(np.array(sel, dtype=object), return_counts=True),
                             strict=True):
            per_vm.setdefault(str(ip), {"a": 0, "b": 0, "missing": 0, "extra": 0})[key] = int(
                count)
    bad = {}
    for vm, c in per_vm.items():
        want_b = c["a"] if done is None or vm in done else 0
        exact = c["a"] == per and c["b"] == want_b and (
            c["missing"] == 0 and c["extra"] == 0 if want_b else True)
        if not exact:
            bad[vm] = c
    others = sum(len(h.fb.maps[m].dump()[0]) for m in SESSION_MAPS) - len(kb)
    return {"vms_checked": len(per_vm), "sessions_on_a": len(ka), "sessions_on_b": len(kb),
            "mismatched_vms": len(bad), "mismatches": dict(list(bad.items())[:5]),
            "b_own_sessions": others, "b_own_intact": others == TOTAL}


def clear(h: Hosts) -> dict[str, int]:
    """Deletes the moved VMs' sessions on both hosts and their pickup windows on B."""
    gone: dict[str, int] = {}
    for host, fw in (("a", h.fa), ("b", h.fb)):
        for name in SESSION_MAPS:
            keys, _ = fw.maps[name].dump()
            if not len(keys):
                continue
            mine = keys[in_networks(keys["addr_lo"], [MOVED])
                        | in_networks(keys["addr_hi"], [MOVED])]
            gone[f"{host}.{name}"] = fw.maps[name].delete_many(mine) if len(mine) else 0
    pickup = h.fb.maps["pickup"]
    keys, _ = pickup.dump()
    if len(keys):
        mine = keys[in_networks(keys, [MOVED])]  # a key is one 16-byte address
        gone["b.pickup"] = pickup.delete_many(mine) if len(mine) else 0
    return gone


# ---- one drain, the old way ------------------------------------------------------------------


def refused(h: Hosts) -> int:
    """Connections B's agent has refused so far (too many at once), from its log."""
    return h.agents[0].logf.read_text(errors="replace").count('"connection-refused"')


def scan_passes(h: Hosts) -> int:
    """Passes over A's maps for full copies so far (A's agent, on its local socket)."""
    with localproto.connect(h.st_a) as sock:
        if sock is None:
            return 0
        return int(localproto.ask(sock, {"op": "list"}).get("scan_passes", 0))


def run_drain(h: Hosts, n_vms: int, per: int, seed: int) -> dict[str, Any]:
    vms = vm_ips(n_vms)
    fill_a(h, vms, per, seed)
    refused_before = refused(h)
    passes_before = scan_passes(h)
    parallel = min(n_vms, MAX_PARALLEL)
    cmd = h.cli("drain", "--peer", "hostb", "--parallel", str(parallel), "--keep-source",
                "--interval", str(INTERVAL_S), "--rounds", str(ROUNDS), "--json")
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                         cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    try:
        report = json.loads(res.stdout)
    except ValueError:
        report = {}
    out: dict[str, Any] = {
        "wall_s": wall, "exit": res.returncode, "parallel": parallel,
        "drain_seconds": report.get("seconds"), "via": report.get("via"),
        "completed": report.get("completed"), "failed": report.get("failed"),
        "sessions_reported": report.get("sessions"), "bytes": report.get("bytes"),
        "phases_ms_median": phase_medians(report.get("vms", [])),
        "vm_seconds_median": med([v["seconds"] for v in report.get("vms", [])]),
        "vm_seconds_max": max((v["seconds"] for v in report.get("vms", [])), default=None),
        "b_refused_connections": refused(h) - refused_before,
        "scan_passes": scan_passes(h) - passes_before,
    }
    if res.returncode != 0:
        out["stderr"] = res.stderr.strip()[-2000:]
        out["failed_outcomes"] = [f"{v['vm']}: {v['outcome']}" for v in report.get("vms", [])
                                  if v["outcome"] != "completed"][:5]
    out["check"] = check(h, vms, per)
    out["cleared"] = clear(h)
    return out


def run_old_way(h: Hosts, n_vms: int, per: int, seed: int) -> dict[str, Any]:
    """n_vms `samixdp migrate` processes at once, A's agent not in reach (another state dir)."""
    vms = vm_ips(n_vms)
    fill_a(h, vms, per, seed)
    state = h.tmp / "st-a-cli"
    procs: list[subprocess.Popen[str]] = []
    t = time.perf_counter()
    try:
        for vm in vms:
            procs.append(subprocess.Popen(
                h.cli("migrate", "--vm", vm, "--peer", "hostb", "--keep-source",
                      "--interval", str(INTERVAL_S), "--rounds", str(ROUNDS), "--json",
                      state=state),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                env={**os.environ, "PYTHONPATH": str(ROOT)}))
        outputs = [p.communicate(timeout=CLI_TIMEOUT_S) for p in procs]
        wall = time.perf_counter() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    done: set[str] = set()
    refused: list[str] = []
    secs: list[float] = []
    for vm, p, (stdout, stderr) in zip(vms, procs, outputs, strict=True):
        try:
            rep = json.loads(stdout)
        except ValueError:
            rep = {}
        if p.returncode == 0 and rep.get("outcome") == "completed":
            done.add(vm)
            secs.append(float(rep.get("total_seconds", 0.0)))
        else:
            refused.append(f"{vm}: {(stderr.strip().splitlines() or ['?'])[-1][:200]}")
    out = {"wall_s": wall, "processes": n_vms, "completed": len(done),
           "failed": n_vms - len(done), "failures": refused[:5],
           "migration_seconds_median": med(secs), "check": check(h, vms, per, done)}
    out["cleared"] = clear(h)
    return out


# ---- figures -----------------------------------------------------------------------------


def med(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def phase_medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    names = dict.fromkeys(p for r in rows for p in r.get("phases", {}))
    return {p: float(statistics.median([r["phases"].get(p, 0.0) for r in rows])) for p in names}


def summarise(res: dict[str, Any]) -> None:
    base = res["configs"][0]["wall_s"]
    for c in res["configs"]:
        c["ratio_to_1x200k"] = c["wall_s"] / base if base else None
    if res.get("old_way"):
        res["old_way"]["ratio_to_1x200k"] = res["old_way"]["wall_s"] / base
    last = res["configs"][-1]
    res["target"] = {"what": "50 × 4k within 2× of 1 × 200k", "ratio": last["ratio_to_1x200k"],
                     "limit": TARGET_RATIO, "met": last["ratio_to_1x200k"] <= TARGET_RATIO}


def print_table(res: dict[str, Any]) -> None:
    env = res["environment"]
    print(f"\nsami-xdp host drain through the agents, {env['date']}, kernel {env['kernel']}, "
          f"{env['cpus']} x {env['cpu']}, commit {env['head']}{' (dirty)' if env['dirty'] else ''}")
    print(f"200k sessions moved per configuration, B holding 200k of its own; --keep-source "
          f"--interval {INTERVAL_S} --rounds {ROUNDS}; median of {res['repeat']} run(s); "
          "wall = CLI start to exit")
    print("B's agent: " + (" ".join(res["b_agent_options"]) or "default connection limits"))
    print(f"{'configuration':<36}{'VMs':>5}{'sessions':>10}{'parallel':>9}{'wall s':>8}"
          f"{'ratio':>7}{'drain s':>9}{'per VM s':>9}{'scans':>6}  phases (median ms per VM)")
    for c in res["configs"]:
        ph = ", ".join(f"{k} {v:.0f}" for k, v in c["phases_ms_median"].items())
        print(f"{c['label']:<36}{c['vms']:>5}{c['sessions']:>10}{c['parallel']:>9}"
              f"{c['wall_s']:>8.2f}{c['ratio_to_1x200k']:>7.2f}{c['drain_seconds']:>9.2f}"
              f"{c['vm_seconds_median']:>9.2f}{c['scan_passes']:>6}  {ph}")
    o = res.get("old_way")
    if o:
        print(f"{OLD_WAY:<36}{o['processes']:>5}{o['sessions']:>10}{o['processes']:>9}"
              f"{o['wall_s']:>8.2f}{o['ratio_to_1x200k']:>7.2f}{'-':>9}"
              f"{o['migration_seconds_median'] or 0:>9.2f}  {o['completed']}/{o['processes']} "
              "completed")
        for f in o["failures"][:3]:
            print(f"    refused: {f}")
    print("scans: passes over A's session maps for the full copies (the agent's shared scan)")
    t = res["target"]
    print(f"\ntarget {t['what']}: {t['ratio']:.2f}x -> {'met' if t['met'] else 'MISSED'}")
    bad = [c for c in res["configs"] if c["mismatched_runs"]]
    print("landing check: " + ("every VM's session keys on B equal A's, every run" if not bad
                               else "MISMATCHES in " + ", ".join(c["label"] for c in bad)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="drains per configuration")
    ap.add_argument("--quick", action="store_true", help="1 run each, no old-way comparison")
    ap.add_argument("--no-old-way", action="store_true",
                    help=f"skip the comparison ({OLD_WAY})")
    ap.add_argument("--b-agent-opts", default="",
                    help="extra options for B's agent (default: none, its default caps)")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="copy both agents' logs here at the end")
    ap.add_argument("--json-out", type=Path, default=RESULTS / "drain.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (bpffs, bcc)", file=sys.stderr)
        return 1
    repeat = 1 if args.quick else max(args.repeat, 1)
    b_args = tuple(shlex.split(args.b_agent_opts))

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwind: agents stopped, pins and the mount removed

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"environment": M.environment(), "repeat": repeat,
                           "interval_s": INTERVAL_S, "rounds": ROUNDS, "keep_source": True,
                           "b_agent_options": list(b_args),
                           "total_sessions": TOTAL, "b_own_sessions": TOTAL, "configs": []}
    failed = False
    with tempfile.TemporaryDirectory(prefix="samixdp-bench-drain-") as td:
        tmp = Path(td)
        try:
            with hosts(tmp, b_args) as h:
                M.log(f"hosts up in {time.perf_counter() - t_start:.1f} s")
                for n_vms, per in CONFIGS:
                    runs = []
                    for i in range(repeat):
                        r = run_drain(h, n_vms, per, seed=1000 * n_vms + i)
                        M.log(f"  drain {label(n_vms, per)} #{i + 1}: wall {r['wall_s']:.2f} s, "
                              f"drain {r['drain_seconds']} s, exit {r['exit']}, mismatched VMs "
                              f"{r['check']['mismatched_vms']}, B refused "
                              f"{r['b_refused_connections']} connections")
                        if r["exit"] != 0:
                            M.log(f"    {r.get('stderr', '')[-300:]} {r.get('failed_outcomes')}")
                        runs.append(r)
                    ok = [r for r in runs if r["exit"] == 0]
                    mism = sum(1 for r in runs
                               if r["exit"] != 0 or r["check"]["mismatched_vms"]
                               or not r["check"]["b_own_intact"])
                    failed |= mism > 0
                    res["configs"].append({
                        "label": label(n_vms, per), "vms": n_vms, "sessions_per_vm": per,
                        "sessions": n_vms * per, "parallel": runs[0]["parallel"],
                        "wall_s": med([r["wall_s"] for r in runs]),
                        "drain_seconds": med([r["drain_seconds"] or 0.0 for r in ok]) or 0.0,
                        "vm_seconds_median": med([r["vm_seconds_median"] or 0.0 for r in ok])
                        or 0.0,
                        "phases_ms_median": runs[len(runs) // 2]["phases_ms_median"],
                        "scan_passes": runs[len(runs) // 2]["scan_passes"],
                        "mismatched_runs": mism, "runs": runs})
                if not (args.quick or args.no_old_way):
                    o = run_old_way(h, 20, 10_000, seed=7)
                    o["label"], o["sessions"] = OLD_WAY, 200_000
                    M.log(f"  old way: wall {o['wall_s']:.2f} s, {o['completed']}/20 completed")
                    failed |= o["check"]["mismatched_vms"] > 0  # a completed one not exact
                    res["old_way"] = o
                for name, a in (("b", h.agents[0]), ("a", h.agents[1])):
                    if args.log_dir is not None:
                        args.log_dir.mkdir(parents=True, exist_ok=True)
                        shutil.copy(a.logf, args.log_dir / f"agent-{name}.log")
                    res[f"agent_{name}_log_tail"] = a.logf.read_text(
                        errors="replace").splitlines()[-5:]
        except KeyboardInterrupt:
            print("interrupted: agents stopped, bpffs unmounted", file=sys.stderr)
            return 130
    res["environment"]["load_avg_end"] = os.getloadavg()
    for k in ("date", "kernel", "cpu", "cpus"):
        res[k] = res["environment"][k]
    res["wall_s"] = time.perf_counter() - t_start
    summarise(res)
    res["all_landed"] = not failed
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print_table(res)
    print(f"\nwrote {args.json_out} in {res['wall_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
