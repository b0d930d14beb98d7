"""The datapath's event stream: new sessions, session ends and drops, as they happen.

The datapath writes `struct fw_event` records into the pinned `events` ring buffer
(bpf/session_map.h, "the event stream"), at most `events-rate` a second per CPU;
what the rate or a full ring kept out is counted per CPU in `event_budget` and
reported here as lost. Names come from the header: EVT_* for the type ("new",
"end", "drop"), REASON_* as `samixdp stats` prints them ("drop-acl-default"),
ST_* for the state.

One reader at a time (the ring has one consumer position): `EventStream.open`
locks a directory next to the pins and refuses a second reader, naming it.
Opening skips what the ring holds already: stale events are not news.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..base.layout import Layout
from ..base.netutil import addrs_to_ips, be16_array_to_host
from ..loader.pinned import EVENTS_LOCK, Firewall
from ..loader.ringbuf import RingBuffer, exclusive
from .config import state_names
from .sessions import proto_names
from .stats import reason_names

READ_BATCH = 256  # records decoded per read: what one read holds in memory at most
TCP_FLAG_LETTERS = "FSRPAUEC"  # TCP header bits 0..7 (RFC 9293), tcpdump's letters


def event_types(layout: Layout) -> dict[int, str]:
    """EVT_* value -> lower-case name, e.g. 3 -> "drop"."""
    return {v: n.lower() for v, n in layout.names("EVT_").items()}


def tcp_flags_text(flags: int) -> str:
    return "".join(c for i, c in enumerate(TCP_FLAG_LETTERS) if flags & (1 << i))


@dataclass(frozen=True)
class Event:
    """One event. src is the initiator for new and end, the sender for drop; an
    ICMP echo's identifier is its sport (dport 0)."""

    type: str  # "new" | "end" | "drop"
    reason: str  # e.g. "pass-acl", "drop-acl-default"
    state: str | None  # the session's state (new, end); None for a drop
    proto: str  # "tcp", "udp", "icmp", "icmpv6", or the protocol number
    src: str
    sport: int
    dst: str
    dport: int
    tcp_flags: str  # of the packet, e.g. "S", "RA"; "" for other protocols
    ifindex: int  # ingress interface
    ts_ns: int  # the datapath's coarse CLOCK_MONOTONIC
    time: float  # the same instant as Unix time

    def record(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Lost:
    """Events the datapath did not send: over the rate, or into a full ring."""

    rate_limited: int
    ring_full: int

    @property
    def total(self) -> int:
        return self.rate_limited + self.ring_full

    def __sub__(self, other: Lost) -> Lost:
        return Lost(self.rate_limited - other.rate_limited, self.ring_full - other.ring_full)


def read_lost(fw: Firewall) -> Lost:
    """The per-CPU counters of events not sent, summed."""
    per_cpu = fw.maps["event_budget"].lookup(np.zeros(1, np.uint32))
    assert per_cpu is not None  # an array always holds index 0
    return Lost(int(per_cpu["rate_limited"].sum()), int(per_cpu["ring_full"].sum()))


def decode(layout: Layout, records: list[bytes], now_mono_ns: int | None = None,
           now_wall: float | None = None) -> list[Event]:
    """Records of the ring -> events (a record of another size is not ours: skipped)."""
    dt = layout.dtype("fw_event")
    raw = b"".join(r for r in records if len(r) == dt.itemsize)
    if not raw:
        return []
    rows = np.frombuffer(raw, dtype=dt)
    mono = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
    wall = time.time() if now_wall is None else now_wall
    types, reasons = event_types(layout), reason_names(layout)
    states, protos = state_names(layout), proto_names(layout)
    tcp = layout.const("PROTO_TCP")
    srcs, dsts = addrs_to_ips(rows["src"]), addrs_to_ips(rows["dst"])
    sports = be16_array_to_host(rows["sport"]).tolist()
    dports = be16_array_to_host(rows["dport"]).tolist()
    drop = layout.const("EVT_DROP")
    out = []
    for i, row in enumerate(rows):
        kind, reason, proto = int(row["type"]), int(row["reason"]), int(row["proto"])
        ts = int(row["ts_ns"])
        out.append(Event(
            type=types.get(kind, str(kind)),
            reason=reasons[reason] if reason < len(reasons) else str(reason),
            state=None if kind == drop else states.get(int(row["state"]), str(row["state"])),
            proto=protos.get(proto, str(proto)),
            src=srcs[i],
            sport=int(sports[i]),
            dst=dsts[i],
            dport=int(dports[i]),
            tcp_flags=tcp_flags_text(int(row["tcp_flags"])) if proto == tcp else "",
            ifindex=int(row["ifindex"]),
            ts_ns=ts,
            time=round(wall - (mono - ts) / 1e9, 6),
        ))
    return out


class EventStream:
    """The one reader of a firewall's event ring, from the moment it opened."""

    def __init__(self, fw: Firewall) -> None:
        self.fw = fw
        self._lock_fd = exclusive(fw.path / EVENTS_LOCK, f"the event stream of {fw.path}")
        try:
            m = fw.maps["events"]
            self.ring = RingBuffer(m.fd, m.info.max_entries)
            self.ring.skip()
            self._lost_at_start = read_lost(fw)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def read(self, timeout_s: float) -> list[Event]:
        """The events that came in, waiting up to `timeout_s` for the first; at most
        READ_BATCH at a time."""
        records = self.ring.read(READ_BATCH)
        if not records and self.ring.wait(timeout_s):
            records = self.ring.read(READ_BATCH)
        return decode(self.fw.layout, records)

    def lost(self) -> Lost:
        """Events not sent since this reader opened (every CPU)."""
        return read_lost(self.fw) - self._lost_at_start

    def close(self) -> None:
        if hasattr(self, "ring"):
            self.ring.close()
        self._release()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iface_name(ifindex: int) -> str | None:
    """The name of an interface of this network namespace, if it is one."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None
