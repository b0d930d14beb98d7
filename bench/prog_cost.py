"""Per-packet cost of the firewall's established-hit path (BPF_PROG_TEST_RUN).

Compares, in one run on one machine:
  bare          a trivial XDP program returning XDP_PASS (the harness floor);
  transit       the firewall on a packet between two unprotected hosts;
  est-hit/256   the firewall hitting one of 256 established sessions, table
                otherwise empty;
  est-hit/100k  the same 256 flows with 100,000 sessions loaded in total.

The 256 flows are opened through the program itself (real handshakes), the
rest of the 100k are loaded with one batch update. Each PROG_TEST_RUN call
carries one frame, so a run cycles over the 256 flows' frames (half of them
VM->client, half client->VM) with repeat = REPEAT / 256 each; a run's
ns/packet is the mean over the frames, and the figure is the median of RUNS
runs (after one warm-up run). Every frame is checked to be a pass-session hit
before timing. Creates its own firewall in a temporary bpffs under /run and
removes it. Run as root:  .venv/bin/python bench/prog_cost.py [--repeat N] [--runs N]

Wall time is about two minutes: every PROG_TEST_RUN with repeat > 1 costs
~17 ms outside the timed loop (the kernel swaps the XDP dispatcher in and out
around it and waits for RCU), whatever the repeat count. The kernel's own
per-packet timing excludes that.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import packets as P  # noqa: E402

from sami_xdp import protect, stats  # noqa: E402
from sami_xdp.config import STATE_BY_NAME  # noqa: E402
from sami_xdp.loader import bpfsys  # noqa: E402
from sami_xdp.loader.compile import Limits  # noqa: E402
from sami_xdp.loader.pinned import Firewall, unpin_all  # noqa: E402
from sami_xdp.netutil import ip_to_be32  # noqa: E402

N_FLOWS = 256
N_SESSIONS = 100_000
VM_NET = "10.1.0.0/16"
CLIENT_BASE = int(ipaddress.IPv4Address("192.0.2.0"))
FILL_BASE = int(ipaddress.IPv4Address("172.16.0.0"))
XDP_PASS = 2

BARE_SRC = b"int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"


def vm(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.1")) + (i % 200)))


def client(i: int) -> str:
    return str(ipaddress.IPv4Address(CLIENT_BASE + 1 + i))


def flow_frames() -> list[bytes]:
    """One data frame per flow; even flows VM->client, odd flows client->VM."""
    frames = []
    for i in range(N_FLOWS):
        vport, cport = 30000 + i, 443
        if i % 2 == 0:
            frames.append(P.tcp(vm(i), vport, client(i), cport, P.PSH | P.ACK, b"x" * 64))
        else:
            frames.append(P.tcp(client(i), cport, vm(i), vport, P.PSH | P.ACK, b"y" * 64))
    return frames


def open_flows(fw: Firewall) -> None:
    """Real handshakes through the program: the flows' sessions end ESTABLISHED."""
    for i in range(N_FLOWS):
        v, c, vport = vm(i), client(i), 30000 + i
        for frame in (P.tcp(v, vport, c, 443, P.SYN), P.tcp(c, 443, v, vport, P.SYN | P.ACK),
                      P.tcp(v, vport, c, 443, P.ACK)):
            if bpfsys.prog_test_run(fw.prog_fd, frame).retval != XDP_PASS:
                raise SystemExit(f"handshake of flow {i} was dropped")


def fill_sessions(fw: Firewall, n: int) -> None:
    """Loads n distinct ESTABLISHED TCP sessions (VM <-> 172.16/12) in one batch."""
    m = fw.maps["sessions"]
    i = np.arange(n, dtype=np.uint32)
    keys = np.zeros(n, dtype=m.key_dtype)
    keys["addr_lo"] = ip_to_be32("10.1.255.1")
    keys["addr_hi"] = (np.uint32(FILL_BASE) + (i >> 10)).byteswap()
    keys["port_lo"] = (np.uint16(20000) + (i & 1023).astype(np.uint16)).byteswap()
    keys["port_hi"] = np.uint16(443).byteswap()
    keys["proto"] = 6
    vals = np.zeros(n, dtype=m.value_dtype)
    now = time.monotonic_ns()
    vals["created_ns"] = now
    vals["last_seen_ns"] = now
    vals["state"] = STATE_BY_NAME["ESTABLISHED"]
    m.update_many(keys, vals)


def one_run(prog_fd: int, frames: list[bytes], repeat: int) -> float:
    per_frame = [bpfsys.prog_test_run(prog_fd, f, repeat=repeat).duration_ns for f in frames]
    return float(statistics.fmean(per_frame))


def measure(prog_fd: int, frames: list[bytes], total_repeat: int, runs: int) -> dict:
    repeat = max(1, total_repeat // len(frames))
    one_run(prog_fd, frames, max(1, repeat // 10))  # warm-up
    results = [one_run(prog_fd, frames, repeat) for _ in range(runs)]
    return {
        "ns_per_packet": round(statistics.median(results), 2),
        "runs_ns": [round(r, 2) for r in results],
        "frames": len(frames),
        "repeat_per_frame": repeat,
    }


def check_hits(fw: Firewall, frames: list[bytes], reason: str) -> None:
    before = stats.verdict_packets(fw)[reason]
    for f in frames:
        if bpfsys.prog_test_run(fw.prog_fd, f).retval != XDP_PASS:
            raise SystemExit(f"a benchmark frame was dropped: {f.hex()}")
    if stats.verdict_packets(fw)[reason] - before != len(frames):
        raise SystemExit(f"benchmark frames did not all take the {reason} path")


def bare_program() -> tuple[object, int]:
    from bcc import BPF  # noqa: PLC0415

    bpf = BPF(text=BARE_SRC)
    return bpf, int(bpf.load_func(b"xdp_pass", BPF.XDP).fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000, help="packets per run (all frames)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-sessions", type=int, default=Limits().max_sessions)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prog_cost.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (BPF_PROG_TEST_RUN, bpffs mount)")

    frames = flow_frames()
    transit = [P.tcp(f"198.51.100.{1 + i % 200}", 1000 + i, "203.0.113.9", 443, P.PSH | P.ACK,
                     b"t" * 64) for i in range(N_FLOWS)]
    results: dict[str, dict] = {}
    bpf, bare_fd = bare_program()
    try:
        results["bare XDP_PASS"] = measure(bare_fd, frames, args.repeat, args.runs)
    finally:
        bpf.cleanup()

    root = Path(tempfile.mkdtemp(prefix="samixdp-bench-", dir="/run"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    fw = None
    try:
        fw = Firewall.create(root / "fw", Limits(max_sessions=args.max_sessions))
        protect.add_protected(fw, VM_NET)
        check_hits(fw, transit, "pass-transit")
        results["transit (no session)"] = measure(fw.prog_fd, transit, args.repeat, args.runs)
        open_flows(fw)
        check_hits(fw, frames, "pass-session")
        n = len(fw.maps["sessions"].dump()[0])
        results[f"est-hit, {n} sessions"] = measure(fw.prog_fd, frames, args.repeat, args.runs)
        results[f"est-hit, {n} sessions"]["sessions"] = n
        fill_sessions(fw, N_SESSIONS - n)
        n = len(fw.maps["sessions"].dump()[0])
        check_hits(fw, frames, "pass-session")
        results[f"est-hit, {n} sessions"] = measure(fw.prog_fd, frames, args.repeat, args.runs)
        results[f"est-hit, {n} sessions"]["sessions"] = n
    finally:
        if fw is not None:
            fw.close()
        unpin_all(root / "fw")
        subprocess.run(["umount", "-l", str(root)], check=False)
        root.rmdir()

    base = results["bare XDP_PASS"]["ns_per_packet"]
    for r in results.values():
        r["ratio_to_bare"] = round(r["ns_per_packet"] / base, 2) if base else None
    print(f"PROG_TEST_RUN, {args.repeat} packets per run over {N_FLOWS} frames, "
          f"median of {args.runs} runs (session table size {args.max_sessions})")
    print(f"{'case':28} {'ns/pkt':>8} {'x bare':>7}  runs (ns/pkt)")
    for name, r in results.items():
        runs = " ".join(f"{x:.1f}" for x in r["runs_ns"])
        print(f"{name:28} {r['ns_per_packet']:8.1f} {r['ratio_to_bare']:7.2f}  {runs}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "repeat_per_run": args.repeat,
        "runs": args.runs,
        "max_sessions": args.max_sessions,
        "datapath": _datapath_version(),
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


def _datapath_version() -> dict:
    """The commit the measured bpf/ sources come from, and whether they were edited."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    return {"head": git("rev-parse", "--short", "HEAD"),
            "bpf_last_commit": git("log", "-1", "--format=%h", "--", "bpf"),
            "bpf_dirty": bool(git("status", "--porcelain", "--", "bpf"))}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
