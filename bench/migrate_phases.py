"""Migration phases with the dirty-state log: preflight, full copy, delta and final
delta at 10k / 100k / 1M sessions of the VM, with 0% and 1% of them changed between
rounds, through the real agent; and `samixdp migrate` as a user runs it (the real
CLI, a subprocess), wall time included.

Each size: hosts A and B (firewalls in a bpffs of their own), the VM's N sessions
plus N other VMs' on A and N on B (as bench/migrate_speed.py fills them), an agent
for B. A Migration (the CLI's own class) runs preflight and the full copy; then, per
churn level, C% of the VM's sessions get a packet through A's real program
(PROG_TEST_RUN, so the datapath logs them as it would live traffic), a delta round,
C% more, and the final delta. The final delta reads only what the log names, so its
time must not grow with the table: the plot shows it against N. Then, on the same
tables, `samixdp migrate --vm V --peer host-b --json --keep-source` (1 delta round,
0.5 s apart: the defaults) and its wall time as the user sees it.

Writes bench/results/migrate_phases.json and .png. Run as root:
    .venv/bin/python bench/migrate_phases.py [--quick] [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import migrate_speed as M
import numpy as np

from sami_xdp.base.netutil import addrs_to_ips
from sami_xdp.loader import bpfsys
from sami_xdp.loader.compile import Limits
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import phases as phases_mod
from sami_xdp.migrate.dirty import DirtyLog
from sami_xdp.migrate.keys import HostIdentity
from sami_xdp.migrate.peers import TrustStore
from sami_xdp.migrate.select import export_vm_state, vm_sessions
from sami_xdp.policy import protect
from sami_xdp.policy.config import create_firewall
from sami_xdp.policy.roles import set_role
from testbed import packets as P

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHURN = (0.0, 0.01)
TARGET_FINAL_S = 0.050
TARGET_PREFLIGHT_S = 0.050
TARGET_CLI_S = 1.5
LO_IFINDEX = 1


def churn_frames(fw: Firewall, vms: Any, share: float, rng: np.random.Generator) -> list[bytes]:
    """One ACK from the VM for `share` of its sessions (TCP ones)."""
    keys, _values, _src = vm_sessions(fw, vms)
    keys = keys[keys["proto"] == 6]
    pick = rng.choice(len(keys), size=int(len(keys) * share), replace=False)
    vm = vms.ips[0]
    out = []
    for k in keys[pick]:
        lo, hi = addrs_to_ips(k["addr_lo"][None])[0], addrs_to_ips(k["addr_hi"][None])[0]
        plo, phi = int.from_bytes(k["port_lo"].tobytes(), "big"), int.from_bytes(
            k["port_hi"].tobytes(), "big")
        if lo == vm:
            out.append(P.TcpFlow(lo, plo, hi, phi).ack("a"))
        else:
            out.append(P.TcpFlow(hi, phi, lo, plo).ack("a"))
    return out


def send(fw: Firewall, frames: list[bytes]) -> float:
    t = time.perf_counter()
    for f in frames:
        bpfsys.prog_test_run(fw.prog_fd, f, ingress_ifindex=LO_IFINDEX)
    return time.perf_counter() - t


def run_size(n: int, tmp: Path) -> dict[str, Any]:
    vms = M.vm_of(0.0)
    cap = M.capacity_for(n)
    out: dict[str, Any] = {"sessions": n, "max_sessions": cap, "others_on_source": n,
                           "others_on_destination": n, "churn": {}}
    with M.bpffs_mount() as mnt:
        fa = create_firewall(mnt / "a", Limits(max_sessions=cap))
        fb = create_firewall(mnt / "b", Limits(max_sessions=cap))
        try:
            for fw in (fa, fb):
                for prefix in M.PROTECT:
                    protect.add_protected(fw, prefix)
            set_role(fa, LO_IFINDEX, "vm")  # the churn's frames enter on lo
            rng = np.random.default_rng(n)
            M.fill_vm(fa, n, 0.0, rng, 0)
            M.fill_others(fa, M.OTHERS_A, M.OTHERS_A6, n, 0.0, rng, 2)
            M.fill_others(fb, M.OTHERS_B, M.OTHERS_B6, n, 0.0, rng, 2)
            cfg_a, cfg_b, st_b = tmp / f"{n}-cfg-a", tmp / f"{n}-cfg-b", tmp / f"{n}-st-b"
            ida = HostIdentity.init(cfg_a, "host-a")
            idb = HostIdentity.init(cfg_b, "host-b")
            port = M.free_port()
            trust_a = TrustStore.load(cfg_a)
            trust_a.add("host-b", f"127.0.0.1:{port}", idb.public_b64)
            trust_a.save()
            trust_b = TrustStore.load(cfg_b)
            trust_b.add("host-a", "127.0.0.1:1", ida.public_b64, vms=",".join(M.PROTECT))
            trust_b.save()
            agent = M.AgentProc(mnt / "b", cfg_b, st_b, port, tmp / f"{n}-agent.log")
            try:
                for churn in CHURN:
                    out["churn"][f"{churn:.0%}"] = one_migration(
                        fa, ida, trust_a, vms, churn, rng)
                    got = out["churn"][f"{churn:.0%}"]
                    M.log(f"  {n}: churn {churn:.0%}: {got['phases_s']}")
                    M.log(f"  {n}: churn {churn:.0%}: final delta split {got['final_split_s']}")
                out["cli"] = cli_migration(mnt / "a", cfg_a, tmp / f"{n}-st-a", vms)
                M.log(f"  {n}: samixdp migrate wall {out['cli']['wall_s']:.3f} s")
            finally:
                agent.stop()
        finally:
            fa.close()
            fb.close()
    return out


def one_migration(fa: Firewall, ida: HostIdentity, trust: TrustStore, vms: Any, churn: float,
                  rng: np.random.Generator) -> dict[str, Any]:
    peer = trust.get("host-b")
    mig = phases_mod.Migration(fa, ida, trust, peer, vms, phases_mod.MigrateOptions())
    res: dict[str, Any] = {"churn": churn}
    try:
        mig.dirty = DirtyLog.start(fa, vms)
        t0 = time.perf_counter()
        first = export_vm_state(fa, vms)
        sel = time.perf_counter() - t0
        mig.preflight(len(first.sess_keys))
        mig.send_round("full", first, sel)
        frames = churn_frames(fa, vms, churn, rng)
        res["churn_frames"] = len(frames)
        res["churn_send_s"] = send(fa, frames)
        delta = mig.send_round("delta")
        frames = churn_frames(fa, vms, churn, rng)
        send(fa, frames)
        with M.Capture() as cap:
            final = mig.send_round("final")
        res["final_split_s"] = {k: round(v, 4) for k, v in M.phase_split(
            cap.build, cap.ack["timings"], final.seconds).items()}
        res["records"] = {"delta": delta.exported.get("sessions", 0),
                          "final": final.exported.get("sessions", 0)}
        res["dirty_overflows"] = mig.dirty.overflows
    finally:
        if mig.dirty is not None:
            mig.dirty.stop()
        if mig.conn is not None:
            mig.conn.close()
    res["phases_s"] = {p.name: round(p.seconds, 4) for p in mig.report.phases}
    res["bytes"] = {p.name: p.bytes for p in mig.report.phases}
    ack = phases_mod.send_abort(ida, trust, peer, mig.mid.hex())
    if not ack.get("ok"):
        raise RuntimeError(f"abort refused: {ack}")
    return res


def cli_migration(bpffs: Path, cfg: Path, state: Path, vms: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "sami_xdp", "--bpffs", str(bpffs), "--config-dir", str(cfg),
           "--state-dir", str(state), "migrate", *[a for ip in vms.ips for a in ("--vm", ip)],
           "--peer", "host-b", "--keep-source", "--json"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"samixdp migrate failed: {res.stderr.strip()}")
    report = json.loads(res.stdout)
    return {"wall_s": wall, "phases_s": {p["name"]: p["seconds"] for p in report["phases"]},
            "outcome": report["outcome"]}


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    sizes = [r["sessions"] for r in res["runs"]]
    for churn in ("0%", "1%"):
        ys = [r["churn"][churn]["phases_s"]["final delta"] * 1000 for r in res["runs"]]
        ax.plot(sizes, ys, marker="o", label=f"final delta, {churn} changed")
    full = [r["churn"]["0%"]["phases_s"]["full copy"] * 1000 for r in res["runs"]]
    ax.plot(sizes, full, marker="s", linestyle="--", label="full copy (for scale)")
    ax.axhline(TARGET_FINAL_S * 1000, color="grey", linestyle=":", label="target 50 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("the VM's sessions (and as many others on each host)")
    ax.set_ylabel("ms")
    ax.set_title("Final delta against table size (dirty-state log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k only")
    ap.add_argument("--sizes", default="", help="comma-separated session counts")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("migrate_phases: needs root")
    sizes = [int(s) for s in args.sizes.split(",") if s] or (
        [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    runs = []
    with tempfile.TemporaryDirectory(prefix="samixdp-phases-") as td:
        for n in sizes:
            M.log(f"migration phases at {n} sessions")
            runs.append(run_size(n, Path(td)))
    big = runs[-1]
    one = big["churn"]["1%"]["phases_s"]
    res = {
        "environment": M.environment(),
        "runs": runs,
        "targets": {
            "final_delta_1pct_s": one["final delta"],
            "final_delta_ok": one["final delta"] <= TARGET_FINAL_S,
            "preflight_s": one["preflight"],
            "preflight_ok": one["preflight"] <= TARGET_PREFLIGHT_S,
            "cli_wall_s": big["cli"]["wall_s"],
            "cli_wall_ok": big["cli"]["wall_s"] <= TARGET_CLI_S,
            "at_sessions": big["sessions"],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "migrate_phases.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, RESULTS / "migrate_phases.png")
    print(f"{'sessions':>9} {'churn':>5} {'preflight':>10} {'full':>8} {'delta':>8} "
          f"{'final':>8} {'final recs':>10}")
    for r in runs:
        for c, d in r["churn"].items():
            p = d["phases_s"]
            print(f"{r['sessions']:>9} {c:>5} {p['preflight'] * 1e3:>8.1f}ms "
                  f"{p['full copy'] * 1e3:>6.0f}ms {p['delta 1'] * 1e3:>6.1f}ms "
                  f"{p['final delta'] * 1e3:>6.1f}ms {d['records']['final']:>10}")
        print(f"{r['sessions']:>9} samixdp migrate wall {r['cli']['wall_s']:.3f} s "
              f"{r['cli']['phases_s']}")
    print(json.dumps(res["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
