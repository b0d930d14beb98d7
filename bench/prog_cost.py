"""P1: per-packet cost of the firewall (BPF_PROG_TEST_RUN), side by side.

Compares, in one run on one machine:
  bare XDP_PASS     a trivial program (the harness floor);
  reference         parse Ethernet/IPv4/ports with bounds checks, build a
                    normalised 5-tuple and make one hash lookup in a table
                    holding the same keys as our sessions map: the least a
                    stateful XDP filter does (the target is ours <= 1.3x it);
  transit           ours, a packet between two unprotected hosts;
  est-hit           ours, established sessions, with 100k and 1M in the table
                    (many distinct flows: 256 different flows' frames);
  inbound miss      ours, unsolicited inbound UDP: no session, default drop;
  blacklisted       ours, packets from banned sources;
  ACL 1/64 rules    ours, a packet that walks all of its VM's rules and is
                    denied by the last (denied packets make no session, so
                    every repetition walks the ACL again).

The 256 flows are opened through the program itself (real handshakes), the
rest of the table is loaded with batch updates. Each PROG_TEST_RUN call
carries one frame, so a run cycles over 256 frames (half of them VM->client,
half client->VM) with repeat = REPEAT / 256 each; a run's ns/packet is the
mean over the frames, the figure the median of RUNS runs (after a warm-up).
Every frame is checked to take the intended path before timing. Creates its
own firewall in a temporary bpffs under /run and removes it. Run as root:
    .venv/bin/python bench/prog_cost.py [--repeat N] [--runs N] [--quick]

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
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import ip_to_be32
from sami_xdp.loader import batch, bpfsys
from sami_xdp.loader.compile import Limits
from sami_xdp.loader.pinned import Firewall, unpin_all
from sami_xdp.policy import acl, blacklist, protect, stats
from sami_xdp.policy.config import create_firewall
from sami_xdp.policy.roles import set_role
from testbed import packets as P

ROOT = Path(__file__).resolve().parent.parent

N_FLOWS = 256
N_SESSIONS = 100_000
VM_NET = "10.1.0.0/16"
CLIENT_BASE = int(ipaddress.IPv4Address("192.0.2.0"))
FILL_BASE = int(ipaddress.IPv4Address("172.16.0.0"))
XDP_PASS = 2

BARE_SRC = b"int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"

# The reference for P1: the least a stateful XDP filter must do, i.e. parse
# Ethernet/IPv4/TCP-UDP with bounds checks, build a normalised 5-tuple key and
# make one hash lookup (same key layout and table size as ours).
REF_SRC = b"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
struct rkey { u32 lo; u32 hi; u16 plo; u16 phi; u8 proto; u8 pad[3]; };
BPF_TABLE("hash", struct rkey, u64, flows, MAX_FLOWS);
int xdp_ref(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP)) return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl < 5) return XDP_DROP;
    __u16 *ports = (void *)ip + ip->ihl * 4;
    if ((void *)(ports + 2) > end) return XDP_DROP;
    struct rkey k = {};
    k.proto = ip->protocol;
    if (bpf_ntohl(ip->saddr) < bpf_ntohl(ip->daddr)) {
        k.lo = ip->saddr; k.hi = ip->daddr; k.plo = ports[0]; k.phi = ports[1];
    } else {
        k.lo = ip->daddr; k.hi = ip->saddr; k.plo = ports[1]; k.phi = ports[0];
    }
    u64 *v = flows.lookup(&k);
    if (!v) return XDP_DROP;
    *v += 1;
    return XDP_PASS;
}
"""


def vm(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.1")) + (i % 200)))


def client(i: int) -> str:
    return str(ipaddress.IPv4Address(CLIENT_BASE + 1 + i))


def flows() -> list[P.TcpFlow]:
    """The measured connections, each opened by its VM."""
    return [P.TcpFlow(vm(i), 30000 + i, client(i), 443) for i in range(N_FLOWS)]


def flow_frames(conns: list[P.TcpFlow]) -> list[bytes]:
    """One data frame per flow, in window (each repetition is a retransmission);
    even flows VM->client, odd flows client->VM."""
    return [c.data("a" if i % 2 == 0 else "b", (b"x" if i % 2 == 0 else b"y") * 64,
                   advance=False) for i, c in enumerate(conns)]


def open_flows(fw: Firewall, conns: list[P.TcpFlow]) -> None:
    """Real handshakes through the program: the flows' sessions end ESTABLISHED.
    PROG_TEST_RUN packets arrive on lo, which stands for the VM-facing interface
    here (anti-spoofing role `vm`); a session's later packets skip that check as
    long as they keep arriving where they came in."""
    set_role(fw, socket.if_nametoindex("lo"), "vm")
    for i, c in enumerate(conns):
        for frame in (c.syn(), c.synack(), c.ack()):
            if bpfsys.prog_test_run(fw.prog_fd, frame).retval != XDP_PASS:
                raise SystemExit(f"handshake of flow {i} was dropped")


def fill_sessions(fw: Firewall, n: int, start: int = 0) -> None:
    """Loads n distinct ESTABLISHED TCP sessions (VM <-> 172.16/12) in one batch."""
    m = fw.maps["sessions"]
    i = np.arange(start, start + n, dtype=np.uint32)
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
    vals["state"] = load_layout().const("ST_ESTABLISHED")
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


def check_reason(fw: Firewall, frames: list[bytes], reason: str) -> None:
    """Every frame takes exactly the `reason` path (whatever its verdict)."""
    before = stats.verdict_packets(fw)[reason]
    for f in frames:
        bpfsys.prog_test_run(fw.prog_fd, f)
    if stats.verdict_packets(fw)[reason] - before != len(frames):
        raise SystemExit(f"benchmark frames did not all take the {reason} path")


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


def reference_program(fw: Firewall, max_flows: int) -> tuple[object, int]:
    """The reference program, its table holding the same keys as our sessions map."""
    from bcc import BPF  # noqa: PLC0415

    bpf = BPF(text=REF_SRC, cflags=[f"-DMAX_FLOWS={max_flows}"])
    fd = int(bpf.load_func(b"xdp_ref", BPF.XDP).fd)
    keys, _ = fw.maps["sessions"].dump()
    map_fd = int(bpf[b"flows"].map_fd)
    batch.update_all(map_fd, keys, np.zeros(len(keys), dtype=np.uint64))
    return bpf, fd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000, help="packets per run (all frames)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="skip the 1M-session case")
    ap.add_argument("--max-sessions", type=int, default=Limits().max_sessions)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prog_cost.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (BPF_PROG_TEST_RUN, bpffs mount)")

    conns = flows()
    frames = flow_frames(conns)
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
        fw = create_firewall(root / "fw", Limits(max_sessions=args.max_sessions))
        protect.add_protected(fw, VM_NET)
        check_hits(fw, transit, "pass-transit")
        results["transit (no session)"] = measure(fw.prog_fd, transit, args.repeat, args.runs)
        open_flows(fw, conns)
        for total in (N_SESSIONS, *([] if args.quick else [1_000_000])):
            n = len(fw.maps["sessions"].dump()[0])
            fill_sessions(fw, total - n, start=n)
            n = len(fw.maps["sessions"].dump()[0])
            ref, ref_fd = reference_program(fw, args.max_sessions)
            try:
                name = f"reference, {n} flows"
                results[name] = measure(ref_fd, frames, args.repeat, args.runs)
                results[name]["sessions"] = n
            finally:
                ref.cleanup()  # type: ignore[attr-defined]
            check_hits(fw, frames, "pass-session")
            name = f"est-hit, {n} sessions"
            results[name] = measure(fw.prog_fd, frames, args.repeat, args.runs)
            results[name]["sessions"] = n
            results[name]["reference"] = f"reference, {n} flows"
        # inbound packets with no session and no rule: the default drop
        miss = [P.udp(client(i), 5000 + i, vm(i), 53) for i in range(N_FLOWS)]
        check_reason(fw, miss, "drop-acl-default")
        results["inbound miss -> drop"] = measure(fw.prog_fd, miss, args.repeat, args.runs)
        # a banned source (the ban is checked before anything else)
        for i in range(N_FLOWS):
            blacklist.ban(fw, client(i), vm(i), 3600)
        banned = [P.udp(client(i), 6000 + i, vm(i), 53) for i in range(N_FLOWS)]
        check_reason(fw, banned, "drop-blacklist")
        results["blacklisted source"] = measure(fw.prog_fd, banned, args.repeat, args.runs)
        for i in range(N_FLOWS):
            blacklist.unban(fw, client(i))
        blacklist.gc(fw)
        # ACL: a packet scanning all of its VM's rules, denied by the last one
        target = vm(1)
        for n_rules in (1, 64):
            rules = [acl.make_rule(fw, vm=target, proto="udp", dport=str(2000 + j))
                     for j in range(n_rules - 1)]
            rules.append(acl.make_rule(fw, vm=target, proto="udp", dport="9999", action="deny"))
            acl.load_rules(fw, rules)
            denied = [P.udp(client(i), 7000 + i, target, 9999) for i in range(N_FLOWS)]
            check_reason(fw, denied, "drop-acl-deny")
            results[f"ACL, {n_rules} rules"] = measure(fw.prog_fd, denied, args.repeat, args.runs)
    finally:
        if fw is not None:
            fw.close()
        unpin_all(root / "fw")
        subprocess.run(["umount", "-l", str(root)], check=False)
        root.rmdir()

    base = results["bare XDP_PASS"]["ns_per_packet"]
    ref_names = [k for k in results if k.startswith("reference")]
    default_ref = results[ref_names[0]]["ns_per_packet"] if ref_names else 0.0
    for r in results.values():
        r["ratio_to_bare"] = round(r["ns_per_packet"] / base, 2) if base else None
        ref_ns = results[r["reference"]]["ns_per_packet"] if "reference" in r else default_ref
        r["ratio_to_reference"] = round(r["ns_per_packet"] / ref_ns, 2) if ref_ns else None
    print(f"PROG_TEST_RUN, {args.repeat} packets per run over {N_FLOWS} frames, "
          f"median of {args.runs} runs (session table size {args.max_sessions})")
    print(f"{'case':30} {'ns/pkt':>8} {'x bare':>7} {'x ref':>6}  runs (ns/pkt)")
    for name, r in results.items():
        runs = " ".join(f"{x:.1f}" for x in r["runs_ns"])
        print(f"{name:30} {r['ns_per_packet']:8.1f} {r['ratio_to_bare']:7.2f} "
              f"{r['ratio_to_reference']:6.2f}  {runs}")
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
