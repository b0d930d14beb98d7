"""A packet generator on BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES.

The kernel (>= 5.18) runs an XDP program `repeat` times over copies of one
frame held in a page pool and, in live mode, really transmits what the program
returns as XDP_TX: it turns XDP_TX into a redirect out of the ctx's
`ingress_ifindex`. On a veth that means ndo_xdp_xmit into the peer's ring,
whose NAPI then processes the frames in softirq on the sending CPU (at every
local_bh_enable between batches). The peer only takes frames when it has NAPI:
a native XDP program attached to it, or GRO switched on (`ethtool -K IF gro on`).

Frames are not re-copied between runs of a page-pool page: the generator
program rewrites the source address and port of every frame from a per-CPU
counter (fixing the IPv4 and TCP checksums incrementally), so one run cycles
over `nflows` distinct flows: flow i has source address addr_base + i // port_span
and source port port_base + i % port_span.

Own raw bpf(2) wrapper (ctypes), independent of sami_xdp.loader.bpfsys; the
attr layout is the kernel's `test` member of union bpf_attr.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import platform
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from testbed.packets import inet_checksum

BPF_PROG_TEST_RUN = 10
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
CLONE_NEWNET = 0x40000000
_NR_BPF = {"x86_64": 321, "aarch64": 280}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _AttrTestRun(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _XdpMd(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class LiveRun:
    wall_s: float  # wall time of the bpf(2) call
    kernel_ns_per_pkt: int  # the kernel's mean per repeat (excludes time rescheduled)
    interrupted: bool  # the seconds bound hit (EINTR) before `repeat` frames


def _alarm(_signum: int, _frame: object) -> None:
    pass  # only there to interrupt the syscall (EINTR)


def live_run(
    prog_fd: int,
    frame: bytes,
    repeat: int,
    ingress_ifindex: int,
    max_seconds: float,
    batch_size: int = 64,
) -> LiveRun:
    """Sends `repeat` frames through `prog_fd` (which returns XDP_TX) out of
    `ingress_ifindex`, which is looked up in the caller's current netns.

    Bounded in seconds by an interval timer: the kernel's test loop checks for
    pending signals between batches and returns EINTR."""
    nr = _NR_BPF[platform.machine()]
    buf = ctypes.create_string_buffer(frame, len(frame))
    ctx = _XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
    attr = _AttrTestRun(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_in=ctypes.addressof(buf),
        repeat=repeat,
        ctx_size_in=ctypes.sizeof(ctx),
        ctx_in=ctypes.addressof(ctx),
        flags=BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size=batch_size,
    )
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max_seconds)
    try:
        t0 = time.perf_counter()
        rc = _libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_int(BPF_PROG_TEST_RUN),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
        wall = time.perf_counter() - t0
        err = ctypes.get_errno()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if rc < 0 and err != errno.EINTR:
        raise OSError(err, f"BPF_PROG_TEST_RUN (live frames): {os.strerror(err)}")
    return LiveRun(wall, attr.duration, rc < 0)


# ---- network namespaces -------------------------------------------------------


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Runs the block inside /run/netns/NAME (this thread), then returns."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {name}: {os.strerror(e)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns back: {os.strerror(e)}")
    finally:
        os.close(target)
        os.close(own)


# ---- the generator program ---------------------------------------------------

GEN_SRC = r"""
#include <uapi/linux/bpf.h>

#define HDR_LEN 56   /* bytes restored from the template on every frame */

struct gen_cfg {
    u32 nflows;      /* flows cycled over; <= 1: the template as it is */
    u32 addr_base;   /* host order */
    u32 port_span;   /* ports per source address */
    u16 port_base;
    u8 l4;           /* 6 tcp, 17 udp */
    u8 ready;
    u8 hdr[HDR_LEN]; /* the frame's first bytes, as crafted */
};
BPF_ARRAY(gen_cfg, struct gen_cfg, 1);
BPF_PERCPU_ARRAY(gen_ctr, u64, 1);

static __always_inline u16 fold(u32 s)
{
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (u16)s;
}

/* RFC 1624 incremental update of a one's complement checksum for the
 * replacement of 16-bit words (byte order does not matter if consistent). */
static __always_inline u16 csum_replace(u16 csum, u16 o1, u16 n1, u16 o2, u16 n2,
                                        u16 o3, u16 n3)
{
    u32 s = (u16)~csum;
    s += (u16)~o1; s += n1;
    s += (u16)~o2; s += n2;
    s += (u16)~o3; s += n3;
    return ~fold(s);
}

int xdp_gen(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    u32 k = 0;
    struct gen_cfg *cfg = gen_cfg.lookup(&k);
    u64 *ctr = gen_ctr.lookup(&k);
    if (!cfg || !ctr || !cfg->ready || data + HDR_LEN > end)
        return XDP_TX;
    /* The page-pool page of a frame is reused as it came back: a receiver that
     * routed the packet rewrote its Ethernet header, TTL and IP checksum in place.
     * So the headers are restored from the template on every frame. */
    __builtin_memcpy(data, cfg->hdr, HDR_LEN);
    if (cfg->nflows <= 1 || cfg->port_span == 0)
        return XDP_TX;
    u32 i = (u32)(*ctr % cfg->nflows);
    *ctr += 1;
    u32 saddr = bpf_htonl(cfg->addr_base + i / cfg->port_span);
    u16 sport = bpf_htons(cfg->port_base + (u16)(i % cfg->port_span));

    u16 *ip_csum = data + 14 + 10;
    u16 *src = data + 14 + 12;          /* two 16-bit words */
    u16 *l4_sport = data + 14 + 20;
    u16 new_a = (u16)(saddr & 0xffff), new_b = (u16)(saddr >> 16);
    u16 old_a = src[0], old_b = src[1], old_p = *l4_sport;
    /* IPv4 header checksum: the address only */
    *ip_csum = csum_replace(*ip_csum, old_a, new_a, old_b, new_b, 0, 0);
    if (cfg->l4 == 6) {
        u16 *tcp_csum = data + 14 + 20 + 16;
        *tcp_csum = csum_replace(*tcp_csum, old_a, new_a, old_b, new_b, old_p, sport);
    } else if (cfg->l4 == 17) {
        u16 *udp_csum = data + 14 + 20 + 6;
        if (*udp_csum)
            *udp_csum = csum_replace(*udp_csum, old_a, new_a, old_b, new_b, old_p, sport);
    }
    src[0] = new_a;
    src[1] = new_b;
    *l4_sport = sport;
    return XDP_TX;
}
"""

COUNT_SRC = r"""
#include <uapi/linux/bpf.h>
BPF_PERCPU_ARRAY(count, u64, 1);
int xdp_count(struct xdp_md *ctx)
{
    u32 k = 0;
    u64 *v = count.lookup(&k);
    if (v)
        *v += 1;
    return ACTION;
}
"""


class Generator:
    """The bcc-compiled XDP_TX generator and its flow configuration."""

    def __init__(self) -> None:
        from bcc import BPF  # noqa: PLC0415

        self.bpf = BPF(text=GEN_SRC)
        self.fd = int(self.bpf.load_func(b"xdp_gen", BPF.XDP).fd)

    HDR_LEN = 56

    def configure(
        self, frame: bytes, nflows: int, addr_base: str, port_base: int, port_span: int, l4: int
    ) -> None:
        """`frame` (at least HDR_LEN bytes) is also the one given to live_run."""
        if len(frame) < self.HDR_LEN:
            raise ValueError(f"frames must have at least {self.HDR_LEN} bytes")
        t = self.bpf["gen_cfg"]
        v = t.Leaf()
        v.ready = 1
        ctypes.memmove(v.hdr, frame, self.HDR_LEN)
        v.nflows = nflows
        v.addr_base = int(ipaddress.IPv4Address(addr_base))
        v.port_span = port_span
        v.port_base = port_base
        v.l4 = l4
        t[t.Key(0)] = v

    def close(self) -> None:
        self.bpf.cleanup()


class CountingXdp:
    """A per-CPU counting XDP program returning XDP_DROP or XDP_PASS."""

    def __init__(self, action: str) -> None:
        from bcc import BPF  # noqa: PLC0415

        self.BPF = BPF
        self.bpf = BPF(text=COUNT_SRC, cflags=[f"-DACTION={action}"])
        self.fn = self.bpf.load_func(b"xdp_count", BPF.XDP)
        self.attached: list[tuple[str, str, int]] = []

    def packets(self) -> int:
        t = self.bpf["count"]
        return int(sum(t[t.Key(0)]))

    def attach(self, netns: str, ifname: str, mode: str) -> None:
        flags = self.BPF.XDP_FLAGS_DRV_MODE if mode == "native" else self.BPF.XDP_FLAGS_SKB_MODE
        with in_netns(netns):
            self.BPF.attach_xdp(ifname, self.fn, flags)
        self.attached.append((netns, ifname, flags))

    def close(self) -> None:
        for netns, ifname, flags in self.attached:
            with contextlib.suppress(Exception), in_netns(netns):
                self.BPF.remove_xdp(ifname, flags)
        self.attached.clear()
        self.bpf.cleanup()


# ---- frames -------------------------------------------------------------------


def with_l4_checksum(frame: bytes) -> bytes:
    """The frame (Ethernet + IPv4 without options + TCP) with a valid TCP checksum."""
    ip = frame[14:34]
    l4 = bytearray(frame[34:])
    assert ip[9] == 6, "TCP frames only (UDP keeps checksum 0 = none)"
    l4[16:18] = b"\0\0"
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(l4))
    l4[16:18] = struct.pack("!H", inet_checksum(pseudo + bytes(l4)))
    return frame[:34] + bytes(l4)


def with_macs(frame: bytes, dst: bytes, src: bytes) -> bytes:
    return dst + src + frame[12:]


def link_info(netns: str, ifname: str) -> dict:
    """`ip -j -s link show` of one link (sysfs would show the root netns's links)."""
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "-s", "link", "show", "dev", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)[0]


def mac_of(netns: str, ifname: str) -> bytes:
    return bytes.fromhex(link_info(netns, ifname)["address"].replace(":", ""))


def ifindex_of(netns: str, ifname: str) -> int:
    return int(link_info(netns, ifname)["ifindex"])


# ---- rate inside the run ---------------------------------------------------------


class RxSampler(threading.Thread):
    """Samples a link's rx_packets every `period` s from another CPU while the
    generator runs, so the rate can be taken over an interval that lies inside
    the packet flow: every live-frames call also spends 20-60 ms outside it
    (page pool set-up, XDP dispatcher swaps with RCU waits), which would bias
    short runs of fast cases if the whole call were the denominator."""

    def __init__(self, netns: str, ifindex: int, cpu: int | None, period: float = 0.005):
        super().__init__(daemon=True)
        self.netns, self.ifindex, self.cpu, self.period = netns, ifindex, cpu, period
        self.samples: list[tuple[float, int]] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            from pyroute2 import IPRoute  # noqa: PLC0415

            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})  # this thread only
            with in_netns(self.netns), IPRoute() as ipr:
                while True:
                    t0 = time.perf_counter()
                    msg = ipr.get_links(self.ifindex)[0]
                    t1 = time.perf_counter()
                    self.samples.append(
                        ((t0 + t1) / 2, int(msg.get_attr("IFLA_STATS64")["rx_packets"]))
                    )
                    self.ready.set()
                    if self.stop.wait(self.period):
                        return
        except BaseException as exc:  # reported by the caller
            self.error = exc
            self.ready.set()


def window_rate(
    samples: list[tuple[float, int]], before: int, after: int, min_fraction: float = 0.3
) -> tuple[float, float, int] | None:
    """(packets/s, window seconds, packets in window) between the first sample
    taken after the counter left `before` and the last one taken before it
    reached `after`: both ends lie strictly inside the flow of packets. None
    when that window holds less than `min_fraction` of the run's packets."""
    moving = [(t, c) for t, c in samples if before < c < after]
    if len(moving) < 2:
        return None
    (ta, ca), (tb, cb) = moving[0], moving[-1]
    if tb <= ta or cb - ca < min_fraction * (after - before):
        return None
    return (cb - ca) / (tb - ta), tb - ta, cb - ca
