"""Session table: listing, selection by VM and garbage collection.

Both session maps (assured `sessions` and the `unassured` LRU) are read with batch lookups
into NumPy structured arrays; filtering is vectorised, so a million entries
never become a million Python objects unless someone asks to print them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..base.layout import Layout
from ..base.netutil import IPAddress, addrs_to_ips, be16_array_to_host, ip_to_addr
from ..base.rows import concat_rows
from ..loader.batch import KeepFn, scan_batch
from ..loader.pinned import Firewall
from .config import state_names

SESSION_MAPS = ("sessions", "unassured")


# states of flows that have not proved themselves yet (the datapath's is_assured()):
# they live in the evictable `unassured` LRU
UNASSURED_STATES = ("SYN_SENT", "SYN_SENT2", "SYN_RECV", "UDP_NEW", "UDP_REPLIED", "ICMP")


def unassured_states(layout: Layout) -> np.ndarray:
    return np.array([layout.const(f"ST_{n}") for n in UNASSURED_STATES], dtype=np.uint8)


def proto_names(layout: Layout) -> dict[int, str]:
    """PROTO_* value -> lower-case name, e.g. 6 -> "tcp"."""
    return {v: n.lower() for v, n in layout.names("PROTO_").items()}


@dataclass(frozen=True)
class SessionTable:
    """Keys and values of every session, with the map each came from."""

    keys: np.ndarray
    values: np.ndarray
    source: np.ndarray  # index into SESSION_MAPS

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, mask: np.ndarray | slice) -> SessionTable:
        return SessionTable(self.keys[mask], self.values[mask], self.source[mask])


def read_sessions(fw: Firewall) -> SessionTable:
    parts_k, parts_v, parts_s = [], [], []
    for idx, name in enumerate(SESSION_MAPS):
        k, v = fw.maps[name].dump()
        parts_k.append(k)
        parts_v.append(v)
        parts_s.append(np.full(len(k), idx, dtype=np.uint8))
    return SessionTable(np.concatenate(parts_k), np.concatenate(parts_v), np.concatenate(parts_s))


def count_states(fw: Firewall) -> dict[str, np.ndarray]:
    """Entries of each session map by state (index: the ST_* value, up to 255),
    expired or not. One sequential batch walk per map that counts chunk by chunk:
    a table is never held whole (only its keys are, by the walk), and no key is
    counted twice (a single walk has no range boundaries to de-duplicate)."""
    out = {}
    for name in SESSION_MAPS:
        m = fw.maps[name]
        counts = np.zeros(256, dtype=np.int64)

        def tally(_keys: np.ndarray, values: np.ndarray, counts: np.ndarray = counts) -> np.ndarray:
            counts += np.bincount(values["state"], minlength=256)
            return np.zeros(len(values), dtype=bool)

        scan_batch(m.fd, m.info.type, m.info.max_entries, m.key_dtype, m.value_dtype,
                   keep=tally, workers=1)
        out[name] = counts
    return out


VmAddr = str | IPAddress | np.void


def vm_addr(vm: VmAddr) -> np.void:
    """A VM given as text, an address object or a `struct ip_addr` scalar, as the latter
    (InvalidArgument, one line, for text that is no address)."""
    return vm if isinstance(vm, np.void) else ip_to_addr(vm)


def vm_mask(keys: np.ndarray, vm_ip: VmAddr) -> np.ndarray:
    vm = vm_addr(vm_ip)
    return (keys["addr_lo"] == vm) | (keys["addr_hi"] == vm)


def involves(vm: VmAddr) -> KeepFn:
    """Row filter: session keys with `vm` (a `struct ip_addr` scalar, or its text) at
    either end."""
    v = vm_addr(vm)

    def keep(keys: np.ndarray, _values: np.ndarray) -> np.ndarray:
        return (keys["addr_lo"] == v) | (keys["addr_hi"] == v)

    return keep


def vm_sessions(fw: Firewall, vm: VmAddr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, values, source map index) of every session with `vm` at either end,
    expired or not, from both session maps: what `read_sessions` + `vm_mask`
    select, without holding the whole table."""
    parts = [fw.maps[name].scan(involves(vm)) for name in SESSION_MAPS]
    return (
        concat_rows([p.keys for p in parts]),
        concat_rows([p.values for p in parts]),
        np.concatenate([np.full(len(p.keys), i, dtype=np.uint8) for i, p in enumerate(parts)]),
    )


def timeouts_ns(fw: Firewall) -> np.ndarray:
    slots = fw.read_config()
    n_states = fw.const("SAMIXDP_N_STATES")
    return np.array(slots[:n_states], dtype=np.uint64) * np.uint64(1_000_000_000)


def expired_mask(fw: Firewall, values: np.ndarray, now_ns: int | None = None) -> np.ndarray:
    """Same rule as the datapath's is_live(): idle longer than the state's timeout."""
    now = np.uint64(now_ns if now_ns is not None else time.monotonic_ns())
    tmo = timeouts_ns(fw)
    state = np.minimum(values["state"], len(tmo) - 1)
    idle = now - np.minimum(values["last_seen_ns"], now)
    return idle > tmo[state]


def gc(fw: Firewall, now_ns: int | None = None) -> dict[str, int]:
    """Deletes expired sessions (both maps) in batches; returns counts per map."""
    removed = {}
    for name in SESSION_MAPS:
        keys, values = fw.maps[name].dump()
        dead = keys[expired_mask(fw, values, now_ns)]
        removed[name] = fw.maps[name].delete_many(dead) if len(dead) else 0
    return removed


def session_records(
    fw: Firewall, table: SessionTable, now_ns: int | None = None
) -> list[dict[str, object]]:
    """Operator view: src is the initiator. Only for printing."""
    now = now_ns if now_ns is not None else time.monotonic_ns()
    states = state_names(fw.layout)
    protos = proto_names(fw.layout)
    icmp = (fw.const("PROTO_ICMP"), fw.const("PROTO_ICMPV6"))
    f_migrated, f_picked = fw.const("SESS_F_MIGRATED"), fw.const("SESS_F_PICKED_UP")
    side_hi = fw.const("SIDE_HI")
    k, v = table.keys, table.values
    lo_ip = addrs_to_ips(k["addr_lo"])
    hi_ip = addrs_to_ips(k["addr_hi"])
    lo_port = be16_array_to_host(k["port_lo"])
    hi_port = be16_array_to_host(k["port_hi"])
    out: list[dict[str, object]] = []
    for i in range(len(k)):
        init_hi = int(v["initiator"][i]) == side_hi
        src, dst = (hi_ip[i], lo_ip[i]) if init_hi else (lo_ip[i], hi_ip[i])
        sport, dport = (hi_port[i], lo_port[i]) if init_hi else (lo_port[i], hi_port[i])
        proto = int(k["proto"][i])
        if proto in icmp:  # ICMP/ICMPv6 echo: the identifier, no ports
            sport, dport = lo_port[i], 0
        pk = v["packets"][i]
        by = v["bytes"][i]
        flags = int(v["flags"][i])
        state = int(v["state"][i])
        out.append(
            {
                "proto": protos.get(proto, str(proto)),
                "src": src,
                "sport": int(sport),
                "dst": dst,
                "dport": int(dport),
                "state": states.get(state, str(state)),
                "age_s": round(max(0, now - int(v["created_ns"][i])) / 1e9, 3),
                "idle_s": round(max(0, now - int(v["last_seen_ns"][i])) / 1e9, 3),
                "packets": int(pk[0] + pk[1]),
                "bytes": int(by[0] + by[1]),
                "packets_orig": int(pk[0]),
                "packets_reply": int(pk[1]),
                "bytes_orig": int(by[0]),
                "bytes_reply": int(by[1]),
                "ifindex": int(v["ifindex"][i][0]),
                "ifindex_reply": int(v["ifindex"][i][1]),
                "migrated": bool(flags & f_migrated),
                "picked_up": bool(flags & f_picked),
                "table": SESSION_MAPS[int(table.source[i])],
            }
        )
    return out
