"""P1: per-packet cost of the firewall (BPF_PROG_TEST_RUN), IPv4 and IPv6 side by side.

Compares, in one run on one machine, each case for both address families:
  bare XDP_PASS     a trivial program (the harness floor);
  reference         the least a stateful XDP filter does (the target is ours
                    <= 1.3x it): parse Ethernet and the IP header with bounds
                    checks (IPv4: the header length; IPv6: the extension
                    headers, walked with the same bound as ours, 6), build the
                    normalised 5-tuple key ours uses (struct session_key: two
                    16-byte addresses, IPv4 as ::ffff:a.b.c.d, 40 bytes) and
                    make one hash lookup in a table holding the same keys as
                    our sessions map. Per family it does what that family needs
                    and no more: an IPv4 address order is one 32-bit compare,
                    an IPv6 one up to four;
  est-hit / reference with 2 extension headers (IPv6, 100k only): the same
                    frames with hop-by-hop and destination options (8 bytes
                    each) in front of TCP: what the walk costs;
  reference, IPv4-only 16-byte key (IPv4, 100k only): the reference as it was
                    before IPv6 (two 4-byte addresses in the key): what the
                    shared 40-byte key costs IPv4;
  transit           ours, a packet between two unprotected hosts (IPv6: outside
                    every protected prefix, pass-ipv6-unprotected);
  est-hit           ours, established sessions, with 100k and 1M in the table
                    (half of them IPv4, half IPv6; 256 different flows' frames
                    per family);
  inbound miss      ours, unsolicited inbound UDP: no session, default drop;
  blacklisted       ours, packets from banned sources (IPv6: banned /64s);
  ACL 1/64 rules    ours, a packet that walks all of its VM's rules and is
                    denied by the last (denied packets make no session, so
                    every repetition walks the ACL again).
  dirty log         (IPv4, 100k) est-hit with nothing tracked, with another VM
                    migrating (a filter test), with the packet's own VM migrating
                    and its session logged already this round (a compare); and
                    the log append: a session's first packet in a round against
                    its second (single-packet runs right after a cut).
  event stream      (IPv4) a flood of drops, the inbound miss and invalid flags
                    on an established session (a drop stage 0 decides, handed
                    to the slow stage to be reported), with events off, at the
                    default rate (a flood is far past its budget), with every
                    drop sent (the ring read out between calls) and with the
                    ring full (nobody reading).

The 256 flows per family are opened through the program itself (real
handshakes), the rest of the table is loaded with batch updates. Each
PROG_TEST_RUN call carries one frame, so a run cycles over 256 frames (half of
them VM->client, half client->VM) with repeat = REPEAT / 256 each; a run's
ns/packet is the mean over the frames, the figure the median of RUNS runs
(after a warm-up; 11 runs by default). The cases compared with each other (the two families, the
reference and ours at one table size) are measured together, their runs
interleaved, so a noisy neighbour hits them alike. Every frame is checked to
take the intended path before timing. Creates its own firewall in a temporary
bpffs under /run and removes it. Run as root:
    .venv/bin/python bench/prog_cost.py [--repeat N] [--runs N] [--quick]

Every measured program is also attached (native XDP) to a veth that is down, in
a namespace of its own (sxp<suffix>): that keeps it in the kernel's XDP
dispatcher, so a PROG_TEST_RUN with repeat > 1 no longer swaps the dispatcher in
and out around the timed loop (two RCU waits, ~30 ms a call here, outside the
kernel's per-packet timing but 30x the wall time). The timed loop is the same.
Wall time: well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lib_env
import lib_live as L
import numpy as np

from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import addr_dtype, ip_to_addr, ipv4_addr_array, is_ipv4_addr
from sami_xdp.loader import batch, bpfsys
from sami_xdp.loader.compile import Limits
from sami_xdp.loader.pinned import Firewall, unpin_all
from sami_xdp.loader.ringbuf import RingBuffer
from sami_xdp.migrate.dirty import DirtyLog
from sami_xdp.migrate.vmset import VmAddrs
from sami_xdp.policy import acl, blacklist, protect, stats
from sami_xdp.policy.config import DEFAULT_EVENT_RATE, create_firewall
from sami_xdp.policy.roles import set_role
from testbed import packets as P
from testbed.netns import Lab

ROOT = Path(__file__).resolve().parent.parent

FAMILIES = ("ipv4", "ipv6")
N_FLOWS = 256
N_SESSIONS = 100_000
VM_NET = "10.1.0.0/16"
VM_NET6 = "2001:db8:1::/64"
CLIENT_BASE = int(ipaddress.IPv4Address("192.0.2.0"))
FILL_BASE = int(ipaddress.IPv4Address("172.16.0.0"))
FILL_VM6, FILL_NET6 = "2001:db8:1::ff:1", "2001:db8:ac10::"  # IPv6 filler sessions
XDP_PASS = 2
DISPATCHER_SLOTS = 2  # veth pairs holding measured programs in the XDP dispatcher

BARE_SRC = b"int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"

# The reference for P1: the least a stateful XDP filter must do, i.e. parse
# Ethernet/IP/TCP-UDP with bounds checks, build a normalised 5-tuple key and
# make one hash lookup (same key layout and table size as ours). IPv6 walks the
# extension headers as ours does (bounded, 6), which costs one compare when
# there are none.
REF_SRC = b"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
struct raddr { u32 w[4]; };
struct rkey { struct raddr lo; struct raddr hi; u16 plo; u16 phi; u8 proto; u8 pad[3]; };
BPF_TABLE("hash", struct rkey, u64, flows, MAX_FLOWS);
int xdp_ref(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end) return XDP_DROP;
    struct rkey k = {};
    __u16 *ports;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > end || ip->ihl < 5) return XDP_DROP;
        ports = (void *)ip + ip->ihl * 4;
        if ((void *)(ports + 2) > end) return XDP_DROP;
        k.proto = ip->protocol;
        k.lo.w[2] = k.hi.w[2] = bpf_htonl(0xffff);  /* ::ffff:a.b.c.d */
        if (bpf_ntohl(ip->saddr) < bpf_ntohl(ip->daddr)) {
            k.lo.w[3] = ip->saddr; k.hi.w[3] = ip->daddr; k.plo = ports[0]; k.phi = ports[1];
        } else {
            k.lo.w[3] = ip->daddr; k.hi.w[3] = ip->saddr; k.plo = ports[1]; k.phi = ports[0];
        }
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > end) return XDP_DROP;
        __u8 nh = ip6->nexthdr;
        __u8 *hdr = (void *)(ip6 + 1);
#pragma unroll
        for (int i = 0; i < 6; i++) {
            if (nh != 0 && nh != 43 && nh != 44 && nh != 51 && nh != 60) break;
            if ((void *)(hdr + 8) > end) return XDP_DROP;
            __u32 len = nh == 44 ? 8 : nh == 51 ? ((__u32)hdr[1] + 2) * 4
                                                : ((__u32)hdr[1] + 1) * 8;
            nh = hdr[0];
            hdr += len;
        }
        ports = (void *)hdr;
        if ((void *)(ports + 2) > end) return XDP_DROP;
        k.proto = nh;
        struct raddr *s = (void *)&ip6->saddr, *d = (void *)&ip6->daddr;
        int lt = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __u32 x = bpf_ntohl(s->w[i]), y = bpf_ntohl(d->w[i]);
            if (x != y) { lt = x < y; break; }
        }
        if (lt) {
            k.lo = *s; k.hi = *d; k.plo = ports[0]; k.phi = ports[1];
        } else {
            k.lo = *d; k.hi = *s; k.plo = ports[1]; k.phi = ports[0];
        }
    } else {
        return XDP_PASS;
    }
    u64 *v = flows.lookup(&k);
    if (!v) return XDP_DROP;
    *v += 1;
    return XDP_PASS;
}
"""

# The reference before IPv6: IPv4 only, two 4-byte addresses in a 16-byte key.
REF4_SRC = b"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
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
REF4_KEY = np.dtype([("lo", "V4"), ("hi", "V4"), ("plo", "V2"), ("phi", "V2"), ("proto", "u1"),
                     ("pad", "V3")])


# ---- addresses and frames, per family ------------------------------------------------


def vm(i: int, fam: str = "ipv4") -> str:
    if fam == "ipv6":
        return str(ipaddress.IPv6Address("2001:db8:1::1") + (i % 200))
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.1")) + (i % 200)))


def client(i: int, fam: str = "ipv4") -> str:
    """Client i; an IPv6 client has a /64 of its own (bans cover a /64)."""
    if fam == "ipv6":
        return f"2001:db8:100:{i:x}::10"
    return str(ipaddress.IPv4Address(CLIENT_BASE + 1 + i))


def udp(fam: str, src: str, sport: int, dst: str, dport: int, payload: bytes = b"x") -> bytes:
    return (P.udp6 if fam == "ipv6" else P.udp)(src, sport, dst, dport, payload)


def flows(fam: str) -> list[P.TcpFlow]:
    """The measured connections, each opened by its VM."""
    cls = P.Tcp6Flow if fam == "ipv6" else P.TcpFlow
    return [cls(vm(i, fam), 30000 + i, client(i, fam), 443) for i in range(N_FLOWS)]


def flow_frames(conns: list[P.TcpFlow]) -> list[bytes]:
    """One data frame per flow, in window (each repetition is a retransmission);
    even flows VM->client, odd flows client->VM."""
    return [c.data("a" if i % 2 == 0 else "b", (b"x" if i % 2 == 0 else b"y") * 64,
                   advance=False) for i, c in enumerate(conns)]


def transit_frames(fam: str) -> list[bytes]:
    if fam == "ipv6":
        return [P.tcp6(f"2001:db8:99::{1 + i % 200:x}", 1000 + i, "2001:db8:77::9", 443,
                       P.PSH | P.ACK, b"t" * 64) for i in range(N_FLOWS)]
    return [P.tcp(f"198.51.100.{1 + i % 200}", 1000 + i, "203.0.113.9", 443, P.PSH | P.ACK,
                  b"t" * 64) for i in range(N_FLOWS)]


EXT_TAG = "2 extension headers"


def with_ext_headers(frame: bytes) -> bytes:
    """An Ethernet + IPv6 frame with hop-by-hop and destination options headers (8
    bytes each) put in front of its transport header; the transport checksum does
    not cover them, so it stays valid."""
    ip6 = frame[14:54]
    src, dst = ipaddress.IPv6Address(ip6[8:24]), ipaddress.IPv6Address(ip6[24:40])
    ext = P.ext_hdr(P.NH_DSTOPTS) + P.ext_hdr(ip6[6])
    return frame[:14] + P.ipv6(str(src), str(dst), P.NH_HOPOPTS, frame[54:], ext=ext)


def ipv6_addr_array(prefix: str, hosts: np.ndarray) -> np.ndarray:
    """The IPv6 addresses prefix (its first 96 bits) + host-order integers in the last
    32 bits, as an array of `struct ip_addr`."""
    hosts = np.asarray(hosts, dtype=np.uint32)
    raw = np.zeros((len(hosts), 16), dtype=np.uint8)
    raw[:, :12] = np.frombuffer(ipaddress.IPv6Address(prefix).packed[:12], np.uint8)
    raw[:, 12:] = hosts.astype(">u4").view(np.uint8).reshape(-1, 4)
    return raw.view(addr_dtype()).reshape(-1)


# ---- the firewall's state ------------------------------------------------------------


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


def fill_sessions(fw: Firewall, n: int, start: int, fam: str) -> None:
    """Loads n distinct ESTABLISHED TCP sessions of one family in one batch:
    VM 10.1.255.1 <-> 172.16/12, or VM 2001:db8:1::ff:1 <-> 2001:db8:ac10::/96."""
    if n <= 0:
        return
    m = fw.maps["sessions"]
    i = np.arange(start, start + n, dtype=np.uint32)
    keys = np.zeros(n, dtype=m.key_dtype)
    if fam == "ipv6":
        keys["addr_lo"] = ip_to_addr(FILL_VM6)
        keys["addr_hi"] = ipv6_addr_array(FILL_NET6, i >> 10)
    else:
        keys["addr_lo"] = ip_to_addr("10.1.255.1")
        keys["addr_hi"] = ipv4_addr_array(np.uint32(FILL_BASE) + (i >> 10))
    keys["port_lo"] = (np.uint16(20000) + (i & 1023).astype(np.uint16)).byteswap()
    keys["port_hi"] = np.uint16(443).byteswap()
    keys["proto"] = 6
    vals = np.zeros(n, dtype=m.value_dtype)
    now = time.monotonic_ns()
    vals["created_ns"] = now
    vals["last_seen_ns"] = now
    vals["state"] = load_layout().const("ST_ESTABLISHED")
    m.update_many(keys, vals)


# ---- measuring -------------------------------------------------------------------------


class Dispatcher:
    """Keeps measured programs in the kernel's XDP dispatcher (see the docstring):
    native XDP on down veths in a namespace of this run."""

    def __init__(self, lab: Lab) -> None:
        from bcc import BPF  # noqa: PLC0415

        self.BPF = BPF
        self.ns = lab.netns("p")
        self.free: list[str] = []
        for j in range(DISPATCHER_SLOTS):
            a, b = f"sxpc{j}a", f"sxpc{j}b"
            self.ns.ip("link", "add", a, "type", "veth", "peer", "name", b)
            self.free += [a, b]
        self.held: dict[int, str] = {}

    @contextlib.contextmanager
    def hold(self, *fds: int) -> Iterator[None]:
        got = []
        try:
            for fd in fds:
                dev = self.free.pop()
                with L.in_netns(self.ns.name):
                    self.BPF.attach_xdp(dev, self.BPF.Function(None, b"prog", fd),
                                        self.BPF.XDP_FLAGS_DRV_MODE)
                got.append(dev)
            yield
        finally:
            for dev in got:
                with contextlib.suppress(Exception), L.in_netns(self.ns.name):
                    self.BPF.remove_xdp(dev, self.BPF.XDP_FLAGS_DRV_MODE)
                self.free.append(dev)


def one_run(prog_fd: int, frames: list[bytes], repeat: int) -> float:
    per_frame = [bpfsys.prog_test_run(prog_fd, f, repeat=repeat).duration_ns for f in frames]
    return float(statistics.fmean(per_frame))


Item = tuple[int, list[bytes]]  # (program fd, frames)


def measure(items: dict[tuple[str, str], Item], total_repeat: int, runs: int
            ) -> dict[tuple[str, str], dict]:
    """Each item's median ns/packet over `runs` runs, the items' runs interleaved
    (rotated order per round) after one warm-up run each."""
    keys = list(items)
    reps = {k: max(1, total_repeat // len(items[k][1])) for k in keys}
    for k in keys:
        fd, frames = items[k]
        one_run(fd, frames, max(1, reps[k] // 10))  # warm-up
    got: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for rnd in range(runs):
        j = rnd % len(keys)
        for k in keys[j:] + keys[:j]:
            fd, frames = items[k]
            got[k].append(one_run(fd, frames, reps[k]))
    return {k: {"ns_per_packet": round(statistics.median(got[k]), 2),
                "runs_ns": [round(r, 2) for r in got[k]],
                "frames": len(items[k][1]),
                "repeat_per_frame": reps[k]} for k in keys}


def check_reason(fw: Firewall, frames: list[bytes], reason: str, passed: bool | None = None
                 ) -> None:
    """Every frame takes exactly the `reason` path (and passes, if `passed`)."""
    before = stats.verdict_packets(fw)[reason]
    for f in frames:
        rv = bpfsys.prog_test_run(fw.prog_fd, f).retval
        if passed and rv != XDP_PASS:
            raise SystemExit(f"a benchmark frame was dropped: {f.hex()}")
    if stats.verdict_packets(fw)[reason] - before != len(frames):
        raise SystemExit(f"benchmark frames did not all take the {reason} path")


def bare_program() -> tuple[object, int]:
    from bcc import BPF  # noqa: PLC0415

    bpf = BPF(text=BARE_SRC)
    return bpf, int(bpf.load_func(b"xdp_pass", BPF.XDP).fd)


def reference_program(keys: np.ndarray, max_flows: int, src: bytes = REF_SRC
                      ) -> tuple[object, int]:
    """A reference program, its table holding `keys` (our sessions map's keys)."""
    from bcc import BPF  # noqa: PLC0415

    bpf = BPF(text=src, cflags=[f"-DMAX_FLOWS={max_flows}"])
    fd = int(bpf.load_func(b"xdp_ref", BPF.XDP).fd)
    map_fd = int(bpf[b"flows"].map_fd)
    batch.update_all(map_fd, keys, np.zeros(len(keys), dtype=np.uint64))
    return bpf, fd


def ipv4_only_keys(keys: np.ndarray) -> np.ndarray:
    """Our IPv4 session keys in the pre-IPv6 reference's 16-byte layout."""
    v4 = keys[is_ipv4_addr(keys["addr_lo"])]
    out = np.zeros(len(v4), dtype=REF4_KEY)
    lo = np.ascontiguousarray(v4["addr_lo"]).view(np.uint8).reshape(-1, 16)[:, 12:]
    hi = np.ascontiguousarray(v4["addr_hi"]).view(np.uint8).reshape(-1, 16)[:, 12:]
    out["lo"] = np.ascontiguousarray(lo).view("V4").reshape(-1)
    out["hi"] = np.ascontiguousarray(hi).view("V4").reshape(-1)
    out["plo"] = np.ascontiguousarray(v4["port_lo"]).view("V2")
    out["phi"] = np.ascontiguousarray(v4["port_hi"]).view("V2")
    out["proto"] = v4["proto"]
    return out


# ---- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace, lab: Lab) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {f: {} for f in FAMILIES}
    disp = Dispatcher(lab)

    def record(got: dict[tuple[str, str], dict], **extra: object) -> None:
        for (fam, name), r in got.items():
            if not name.startswith("reference, IPv4-only"):
                r.update(extra)
            else:
                r["sessions"] = extra.get("sessions")
            results[fam][name] = r

    conns = {f: flows(f) for f in FAMILIES}
    frames = {f: flow_frames(conns[f]) for f in FAMILIES}
    bpf, bare_fd = bare_program()
    try:
        with disp.hold(bare_fd):
            record(measure({(f, "bare XDP_PASS"): (bare_fd, frames[f]) for f in FAMILIES},
                           args.repeat, args.runs))
    finally:
        bpf.cleanup()  # type: ignore[attr-defined]

    root = Path(tempfile.mkdtemp(prefix="samixdp-bench-", dir="/run"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    fw = None
    try:
        fw = create_firewall(root / "fw", Limits(max_sessions=args.max_sessions))
        protect.add_protected(fw, VM_NET)
        protect.add_protected(fw, VM_NET6)
        with disp.hold(fw.prog_fd):
            run_ours(args, fw, conns, frames, disp, record, results)
    finally:
        if fw is not None:
            fw.close()
        unpin_all(root / "fw")
        subprocess.run(["umount", "-l", str(root)], check=False)
        root.rmdir()
    return results


def run_ours(args: argparse.Namespace, fw: Firewall, conns: dict[str, list[P.TcpFlow]],
             frames: dict[str, list[bytes]], disp: Dispatcher, record: Callable[..., None],
             results: dict[str, dict[str, dict]]) -> None:
    fd = fw.prog_fd
    transit = {f: transit_frames(f) for f in FAMILIES}
    check_reason(fw, transit["ipv4"], "pass-transit", passed=True)
    check_reason(fw, transit["ipv6"], "pass-ipv6-unprotected", passed=True)
    record(measure({(f, "transit (no session)"): (fd, transit[f]) for f in FAMILIES},
                   args.repeat, args.runs))
    for f in FAMILIES:
        open_flows(fw, conns[f])
    filled = {f: 0 for f in FAMILIES}
    for total in (N_SESSIONS, *([] if args.quick else [1_000_000])):
        # the table: the 2 x 256 measured flows, the rest half IPv4, half IPv6
        need = total - len(fw.maps["sessions"].dump()[0])
        for f, n in zip(FAMILIES, (need // 2, need - need // 2), strict=True):
            fill_sessions(fw, n, filled[f], f)
            filled[f] += n
        keys, _ = fw.maps["sessions"].dump()
        n = len(keys)
        ref_name, est_name = f"reference, {n} flows", f"est-hit, {n} sessions"
        for f in FAMILIES:
            check_reason(fw, frames[f], "pass-session", passed=True)
        ref, ref_fd = reference_program(keys, args.max_sessions)
        try:
            items = {}
            for f in FAMILIES:
                items[(f, ref_name)] = (ref_fd, frames[f])
                items[(f, est_name)] = (fd, frames[f])
            if n == N_SESSIONS:
                # what the shared 40-byte key costs IPv4 (reference only)
                ref4, ref4_fd = reference_program(ipv4_only_keys(keys), args.max_sessions,
                                                  REF4_SRC)
                items[("ipv4", f"reference, IPv4-only 16-byte key, {n} flows")] = (
                    ref4_fd, frames["ipv4"])
                # what walking extension headers costs: the IPv6 frames with hop-by-hop
                # and destination options in front of TCP, ours and the reference
                ext = [with_ext_headers(x) for x in frames["ipv6"]]
                check_reason(fw, ext, "pass-session", passed=True)
                items[("ipv6", f"{ref_name}, {EXT_TAG}")] = (ref_fd, ext)
                items[("ipv6", f"{est_name}, {EXT_TAG}")] = (fd, ext)
            else:
                ref4, ref4_fd = None, None
            try:
                with disp.hold(*(x for x in (ref_fd, ref4_fd) if x is not None)):
                    got = measure(items, args.repeat, args.runs)
            finally:
                if ref4 is not None:
                    ref4.cleanup()  # type: ignore[attr-defined]
        finally:
            ref.cleanup()  # type: ignore[attr-defined]
        record(got, sessions=n)
        if n == N_SESSIONS:
            results["tracking"] = tracking_cost(fw, frames["ipv4"], args)
        for f in FAMILIES:
            results[f][est_name]["reference"] = ref_name
        if f"{est_name}, {EXT_TAG}" in results["ipv6"]:
            results["ipv6"][f"{est_name}, {EXT_TAG}"]["reference"] = f"{ref_name}, {EXT_TAG}"

    # inbound packets with no session and no rule: the default drop
    miss = {f: [udp(f, client(i, f), 5000 + i, vm(i, f), 53) for i in range(N_FLOWS)]
            for f in FAMILIES}
    for f in FAMILIES:
        check_reason(fw, miss[f], "drop-acl-default")
    record(measure({(f, "inbound miss -> drop"): (fd, miss[f]) for f in FAMILIES},
                   args.repeat, args.runs))
    # the event stream under a flood of drops: one decided by the ACL stage, one by
    # stage 0 (invalid flags on an established session, handed on to be reported)
    invalid = [c.frame("b", P.SYN | P.FIN, advance=False) for c in conns["ipv4"]]
    check_reason(fw, invalid, "drop-invalid")
    results["events"] = events_cost(
        fw, {"inbound miss -> drop (ACL stage)": miss["ipv4"],
             "invalid flags on a session -> drop (stage 0)": invalid}, args)
    # a banned source (IPv6: its /64)
    for f in FAMILIES:
        for i in range(N_FLOWS):
            blacklist.ban(fw, client(i, f), vm(i, f), 3600)
    banned = {f: [udp(f, client(i, f), 6000 + i, vm(i, f), 53) for i in range(N_FLOWS)]
              for f in FAMILIES}
    for f in FAMILIES:
        check_reason(fw, banned[f], "drop-blacklist")
    record(measure({(f, "blacklisted source"): (fd, banned[f]) for f in FAMILIES},
                   args.repeat, args.runs))
    for f in FAMILIES:
        for i in range(N_FLOWS):
            blacklist.unban(fw, client(i, f))
    blacklist.gc(fw)
    # ACL: a packet scanning all of its VM's rules, denied by the last one (each
    # family's VM holds its own n rules, both sets loaded together)
    for n_rules in (1, 64):
        rules = []
        for f in FAMILIES:
            target = vm(1, f)
            rules += [acl.make_rule(fw, vm=target, proto="udp", dport=str(2000 + j))
                      for j in range(n_rules - 1)]
            rules.append(acl.make_rule(fw, vm=target, proto="udp", dport="9999",
                                       action="deny"))
        acl.load_rules(fw, rules)
        denied = {f: [udp(f, client(i, f), 7000 + i, vm(1, f), 9999) for i in range(N_FLOWS)]
                  for f in FAMILIES}
        for f in FAMILIES:
            check_reason(fw, denied[f], "drop-acl-deny")
        record(measure({(f, f"ACL, {n_rules} rules"): (fd, denied[f]) for f in FAMILIES},
                       args.repeat, args.runs))


EVENT_MODES = {
    # name: (events-rate, ring read out before each call)
    "events off (events-rate 0)": (0, False),
    "events on, past the budget (events-rate 1000)": (1000, False),
    "events on, every drop sent (ring read out)": (2**32, True),
    "events on, ring full (nobody reads)": (2**32, False),
}
EVENT_REPEAT = 1000  # runs per call: what the ring holds (4095 records) with room to spare


def events_cost(fw: Firewall, kinds: dict[str, list[bytes]], args: argparse.Namespace) -> dict:
    """What the event stream costs a flood of drops (IPv4), per kind of drop, in each
    EVENT_MODES mode, rotated per round: events off; the default rate, a flood being far
    past it (almost every drop only counted as rate-limited); every drop sent (no rate,
    the ring read out between calls, outside the timed loop); no rate and a full ring
    (the reservation fails). A call runs one frame EVENT_REPEAT times."""
    slot = fw.const("CFG_EVENT_RATE")
    m = fw.maps["events"]
    out: dict = {}
    with RingBuffer(m.fd, m.info.max_entries) as ring:
        for kind, frames in kinds.items():
            runs: dict[str, list[float]] = {k: [] for k in EVENT_MODES}
            keys = list(EVENT_MODES)
            for rnd in range(args.runs):
                j = rnd % len(keys)
                for name in keys[j:] + keys[:j]:
                    rate, read_out = EVENT_MODES[name]
                    fw.set_config(slot, rate)
                    if not read_out:
                        one_run(fw.prog_fd, frames[:8], EVENT_REPEAT)  # budget spent, ring full
                    per_frame = []
                    for f in frames:
                        if read_out:
                            ring.skip()
                        per_frame.append(bpfsys.prog_test_run(
                            fw.prog_fd, f, repeat=EVENT_REPEAT).duration_ns)
                    runs[name].append(float(statistics.fmean(per_frame)))
            res = {name: {"ns_per_packet": round(statistics.median(r), 2),
                          "runs_ns": [round(x, 2) for x in r]} for name, r in runs.items()}
            off = res["events off (events-rate 0)"]
            for r in res.values():
                r["over_off_ns"] = round(r["ns_per_packet"] - off["ns_per_packet"], 2)
                r["over_off_paired_ns"] = round(statistics.median(
                    a - b for a, b in zip(r["runs_ns"], off["runs_ns"], strict=True)), 2)
            out[kind] = res
        ring.skip()
    fw.set_config(slot, DEFAULT_EVENT_RATE)
    return out


def tracking_cost(fw: Firewall, frames: list[bytes], args: argparse.Namespace) -> dict:
    """What the dirty-state log costs an established hit (IPv4, 100k sessions, the
    flows of 32 VMs): with
    nothing tracked, with another VM tracked (a filter test), with the packet's own VM
    tracked and its session logged already this round (a compare), in rotated order per
    round; and the first packet of a session in a round (the log append) against a
    second one, each frame once right after a cut."""
    # the flows of 32 VMs (a VM has at most 32 addresses: one tracked VM holds them)
    mine = [i for i in range(N_FLOWS) if i % 200 < 32]
    own = VmAddrs.parse(sorted({vm(i) for i in mine}))
    frames = [frames[i] for i in mine]
    states = {"nothing tracked": None, "another VM migrating": VmAddrs.parse(["10.1.255.254"]),
              "its VM migrating, logged already this round": own}
    reps = max(1, args.repeat // len(frames))
    runs: dict[str, list[float]] = {k: [] for k in states}
    keys = list(states)
    for rnd in range(args.runs):
        j = rnd % len(keys)
        for name in keys[j:] + keys[:j]:
            log = DirtyLog.start(fw, states[name]) if states[name] is not None else None
            try:
                one_run(fw.prog_fd, frames, 1)  # logs each session once (its VM tracked)
                runs[name].append(one_run(fw.prog_fd, frames, reps))
            finally:
                if log is not None:
                    log.stop()
    first, again = [], []
    log = DirtyLog.start(fw, own)
    try:
        for _ in range(args.runs):
            log.cut()
            first.append(one_run(fw.prog_fd, frames, 1))
            again.append(one_run(fw.prog_fd, frames, 1))
        last = log.cut()
        logged = -1 if last is None else len(last)
    finally:
        log.stop()
    out: dict = {name: {"ns_per_packet": round(statistics.median(r), 2),
                        "runs_ns": [round(x, 2) for x in r]} for name, r in runs.items()}
    base = out["nothing tracked"]["ns_per_packet"]
    for r in out.values():
        r["over_untracked_ns"] = round(r["ns_per_packet"] - base, 2)
    out["log append"] = {
        "first_packet_ns": round(statistics.median(first), 2),
        "second_packet_ns": round(statistics.median(again), 2),
        "append_ns": round(statistics.median(a - b for a, b in zip(first, again, strict=True)), 2),
        "sessions_logged_last_round": logged,
        "note": "single-packet test runs (repeat 1): absolute figures carry the harness "
                "overhead, the difference is the append",
    }
    return out


def add_ratios(results: dict[str, dict[str, dict]]) -> dict[str, float | None]:
    """ratio_to_bare / ratio_to_reference within each family; returns v6/v4 per case."""
    for res in results.values():
        base = res["bare XDP_PASS"]["ns_per_packet"]
        refs = [k for k in res if k.startswith("reference, ") and "IPv4-only" not in k
                and EXT_TAG not in k]
        default_ref = res[refs[0]]["ns_per_packet"] if refs else 0.0
        for r in res.values():
            r["ratio_to_bare"] = round(r["ns_per_packet"] / base, 2) if base else None
            ref_ns = res[r["reference"]]["ns_per_packet"] if "reference" in r else default_ref
            r["ratio_to_reference"] = round(r["ns_per_packet"] / ref_ns, 2) if ref_ns else None
    v4, v6 = results["ipv4"], results["ipv6"]
    return {k: round(v6[k]["ns_per_packet"] / v4[k]["ns_per_packet"], 2)
            for k in v4 if k in v6 and v4[k]["ns_per_packet"]}


def paired_v6_over_v4(results: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Median over rounds of IPv6 run / IPv4 run (the two ran in the same round)."""
    v4, v6 = results["ipv4"], results["ipv6"]
    out = {}
    for k in v4:
        if k in v6:
            pairs = [b / a for a, b in zip(v4[k]["runs_ns"], v6[k]["runs_ns"], strict=True) if a]
            out[k] = round(statistics.median(pairs), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000, help="packets per run (all frames)")
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="skip the 1M-session case")
    ap.add_argument("--max-sessions", type=int, default=Limits().max_sessions)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prog_cost.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (BPF_PROG_TEST_RUN, bpffs mount)")

    t0 = time.monotonic()
    with Lab(tag="b") as lab:
        results = run(args, lab)
    tracking = results.pop("tracking", None)  # not a family: the dirty log's cost
    events = results.pop("events", None)  # nor this: what the event stream costs drops
    v6_over_v4 = add_ratios(results)
    paired = paired_v6_over_v4(results)
    print(f"PROG_TEST_RUN, {args.repeat} packets per run over {N_FLOWS} frames per family, "
          f"median of {args.runs} runs (session table size {args.max_sessions})")
    print(f"{'case':48} {'IPv4':>7} {'x ref':>6} {'IPv6':>7} {'x ref':>6} {'v6/v4':>6} "
          f"{'paired':>6}")
    names = list(results["ipv4"]) + [k for k in results["ipv6"] if k not in results["ipv4"]]

    def cell(fam: str, name: str) -> str:
        r = results[fam].get(name)
        return f"{r['ns_per_packet']:7.1f} {r['ratio_to_reference']:6.2f}" if r else f"{'-':>14}"

    for name in names:
        ratio, pr = v6_over_v4.get(name), paired.get(name)
        print(f"{name:48} {cell('ipv4', name)} {cell('ipv6', name)} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>6} "
              f"{'-' if pr is None else f'{pr:.2f}':>6}")
    print("  ns/pkt; x ref = / the reference at that table size; v6/v4 = ratio of medians, "
          "paired = median of the per-round ratios")
    for fam in FAMILIES:
        for name, r in results[fam].items():
            print(f"  {fam} {name}: runs " + " ".join(f"{x:.1f}" for x in r["runs_ns"]))
    if tracking:
        print("dirty-state log, IPv4 est-hit at 100k sessions (ns/pkt, + over nothing tracked):")
        for name, r in tracking.items():
            if "ns_per_packet" in r:
                print(f"  {name:48} {r['ns_per_packet']:7.1f} {r['over_untracked_ns']:+6.1f}")
        la = tracking["log append"]
        print(f"  log append (first packet of a session in a round): {la['append_ns']:+.1f} ns "
              f"({la['sessions_logged_last_round']} sessions logged in the last round)")
    if events:
        print(f"event stream, IPv4 drop floods (ns/pkt, + over events off, paired per round; "
              f"{EVENT_REPEAT} runs per call):")
        for kind, res in events.items():
            print(f"  {kind}")
            for name, r in res.items():
                print(f"    {name:46} {r['ns_per_packet']:7.1f} {r['over_off_paired_ns']:+6.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "format": 2,  # results per family (format 1: one flat dict of IPv4 cases)
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kernel": platform.release(),
        "cpu": lib_env.cpu_model(),
        "cpus": os.cpu_count(),
        "repeat_per_run": args.repeat,
        "runs": args.runs,
        "max_sessions": args.max_sessions,
        "datapath": _datapath_version(),
        "wall_s": round(time.monotonic() - t0, 1),
        "families": {
            "ipv4": "Ethernet + IPv4 (20 B) frames; VMs in 10.1.0.0/16",
            "ipv6": "Ethernet + IPv6 (40 B, no extension header) frames; VMs in 2001:db8:1::/64",
        },
        "table": "est-hit/reference: the 2 x 256 measured flows plus filler sessions, half "
                 "IPv4 and half IPv6",
        "results": results,
        "tracking": tracking,
        "events": events,
        "v6_over_v4": v6_over_v4,
        "v6_over_v4_paired": paired,
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



if __name__ == "__main__":
    main()
