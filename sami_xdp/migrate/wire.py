"""Fixed-size wire records of a bundle and their conversion to/from map entries.

All wire dtypes are explicit little-endian. Every address is 16 bytes in network
order, as the maps' `struct ip_addr` holds it (IPv4 as the IPv4-mapped
::ffff:a.b.c.d), so one record type carries both families and a record copies
to and from a map entry without conversion. Ports keep the map's convention (the
u16 field holds the network-order bytes). ACL ports are host order as in
`struct acl_rule`; an ACL rule's source travels as address + prefix length (of
the mapped space, 0 = any source), the mask the rule table holds is rebuilt.

Times never travel as clock values: the datapath's times are per-host
CLOCK_MONOTONIC, so export turns them into ages (ms before the export
instant) or remaining durations, and import rebases them on the local clock.

What the session record drops compared to `struct session_value` (104 B + 40 B
key -> 60 B):
  * ifindex (local to the source host, never migrated) and padding;
  * TCP window edges: only each end's window scale and option flags travel; the
    destination anchors each direction on its first packet after the move (a
    migrated connection's edges would be stale by the cutover, and without the
    scale it could only track liberally, as conntrack does for picked-up
    connections);
  * counter precision: the four packet/byte counters are 16-bit
    floating-point codes (exact below 2048, otherwise truncated with a
    relative error below 1/1024, i.e. never overstated);
  * created/idle ages are whole milliseconds, saturating at 2^32-1 ms
    (~49.7 days; a longer-lived session arrives younger than it is).
An IPv4 session's addresses carry 24 constant bytes (the mapped prefixes):
`zlib+shuffle` stores each byte position of the records together, so they cost
next to nothing once compressed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np

from ..base.layout import Layout, load_layout
from ..base.parallel import run_parallel

# ---- record dtypes ----------------------------------------------------------------

ADDR = np.dtype([("w", "<u4", (4,))])  # struct ip_addr: 16 bytes, network order

SESSION_WIRE = np.dtype(
    [
        ("addr_lo", ADDR),
        ("addr_hi", ADDR),
        ("port_lo", "<u2"),
        ("port_hi", "<u2"),
        ("proto", "u1"),
        ("state", "u1"),
        ("flags", "u1"),  # SESS_F_* of the source
        ("initiator", "u1"),  # SIDE_LO / SIDE_HI
        ("created_age_ms", "<u4"),
        ("idle_age_ms", "<u4"),
        ("packets", "<u2", (2,)),  # f16 codes, [0] initiator->responder
        ("bytes", "<u2", (2,)),
        ("tcp_scale", "u1", (2,)),  # window scale of each end, [0] the initiator
        ("tcp_flags", "u1", (2,)),  # TCPD_F_* of each end that travel (TCP_WIRE_FLAGS)
    ]
)

SYN_WIRE = np.dtype(
    [
        ("src", ADDR),  # an IPv6 source: its /64 (the rest zero), as the map keys it
        ("dst", ADDR),  # must be one of the VM's addresses
        ("window_age_ms", "<u4"),
        ("count", "<u4"),
        ("total", "<u8"),
    ]
)

BLACKLIST_WIRE = np.dtype(
    [
        ("src", ADDR),  # the banned source (map key; an IPv6 one is its /64)
        ("vm", ADDR),  # must be one of the VM's addresses
        ("banned_age_ms", "<u4"),
        ("remaining_ms", "<u4"),
        ("dropped", "<u8"),
    ]
)

# One ACL rule of one of the VM's addresses (`vm`): the records of an address are
# its effective rule list, in evaluation order.
ACL_WIRE = np.dtype(
    [
        ("vm", ADDR),  # must be one of the VM's addresses
        ("src_addr", ADDR),
        ("priority", "<u4"),
        ("dport_lo", "<u2"),
        ("dport_hi", "<u2"),
        ("vlan", "<u2"),
        ("src_plen", "u1"),  # of the mapped space (IPv4 /24 = 120); 0 = any source
        ("proto", "u1"),
        ("action", "u1"),
        ("flags", "u1"),  # ACL_WF_*
        ("hits", "<u8"),
    ]
)
ACL_WF_WAS_IFACE_BOUND = 1  # the source rule was bound to an ingress interface
ACL_WIRE_FLAGS = ACL_WF_WAS_IFACE_BOUND

DEL_SESSION_WIRE = np.dtype(
    [
        ("addr_lo", ADDR),
        ("addr_hi", ADDR),
        ("port_lo", "<u2"),
        ("port_hi", "<u2"),
        ("proto", "u1"),
    ]
)  # 37 bytes, packed
DEL_SYN_WIRE = np.dtype([("src", ADDR), ("dst", ADDR)])
DEL_BLACKLIST_WIRE = np.dtype([("src", ADDR), ("vm", ADDR)])

assert ADDR.itemsize == load_layout().sizeof("ip_addr") == 16  # the maps' address, as is
assert SESSION_WIRE.itemsize == 60
assert SYN_WIRE.itemsize == 48 and BLACKLIST_WIRE.itemsize == 48
assert ACL_WIRE.itemsize == 54 and DEL_SESSION_WIRE.itemsize == 37

# Sections of the body, in wire order: (name, dtype, header count field).
SECTIONS: tuple[tuple[str, np.dtype, str], ...] = (
    ("sessions", SESSION_WIRE, "n_sessions"),
    ("syn", SYN_WIRE, "n_syn"),
    ("blacklist", BLACKLIST_WIRE, "n_blacklist"),
    ("acl", ACL_WIRE, "n_acl"),
    ("del_sessions", DEL_SESSION_WIRE, "n_del_sessions"),
    ("del_syn", DEL_SYN_WIRE, "n_del_syn"),
    ("del_blacklist", DEL_BLACKLIST_WIRE, "n_del_blacklist"),
)

# per-end TCP flags that describe the connection rather than this host's view of it
TCP_WIRE_FLAGS = ("WSCALE", "SACK_PERM", "CLOSE_INIT", "LIBERAL")


def tcp_wire_flags(layout: Layout) -> int:
    return sum(layout.const(f"TCPD_F_{n}") for n in TCP_WIRE_FLAGS)


U32_MAX = np.uint64(0xFFFFFFFF)
NS_PER_MS = 1_000_000

# ---- 16-bit counter codes -----------------------------------------------------------


_F64_BIAS = np.uint64(1032 << 10)  # (1023 exponent bias + 9) in code units
_EXACT_F64 = np.uint64(1 << 53)
CODE16_MAX = 54 << 10 | 1023  # e = 54, m = 1023: the largest valid code


def encode_counter16(values: np.ndarray) -> np.ndarray:
    """u64 -> u16 code: exact below 2048; else 10 mantissa bits and a shift.

    code = e << 10 | m; e == 0: value m; e >= 1: value (1024 | m) << (e - 1).
    Truncates (never overstates); relative error < 2^-10; covers all of u64.
    For v < 2^53 the code is read straight off the float64 bits (exponent and
    top 10 mantissa bits), which is exact; larger values take a slow path."""
    v = np.ascontiguousarray(values, dtype=np.uint64)  # map fields are strided: copy once
    code = v.astype(np.float64).view(np.uint64)  # one temporary, worked on in place
    code >>= np.uint64(42)
    code -= _F64_BIAS  # wraps for v < 1024, replaced below
    np.copyto(code, v, where=v < 1024)
    out = code.astype(np.uint16)
    if v.size and v.max() >= _EXACT_F64:
        huge = v >= _EXACT_F64
        out[huge] = _encode_slow(v[huge])
    return out


def _encode_slow(v: np.ndarray) -> np.ndarray:
    bl = np.zeros(v.shape, dtype=np.uint64)
    x = v.copy()
    for s in (32, 16, 8, 4, 2, 1):
        big = (x >> np.uint64(s)) != 0
        bl[big] += np.uint64(s)
        x[big] >>= np.uint64(s)
    bl += (x != 0).astype(np.uint64)  # bit length
    shift = bl - np.uint64(11)
    top = v >> shift
    return (((shift + np.uint64(1)) << np.uint64(10)) | (top & np.uint64(1023))).astype(np.uint16)


def _decode_table() -> np.ndarray:
    c = np.minimum(np.arange(1 << 16, dtype=np.uint64), np.uint64(CODE16_MAX))
    big = ((c + _F64_BIAS) << np.uint64(42)).view(np.float64).astype(np.uint64)
    return np.where(c < 1024, c, big)


_DECODE16 = _decode_table()  # every u16 code's value (512 KiB): decoding is one lookup


def decode_counter16(codes: np.ndarray) -> np.ndarray:
    return _DECODE16[np.asarray(codes, dtype=np.uint16)]


# ---- times ----------------------------------------------------------------------------


def age_ms(now_ns: int, then_ns: np.ndarray) -> np.ndarray:
    """Milliseconds between a map timestamp and `now` (0 if in the future), as u32."""
    then = np.asarray(then_ns, dtype=np.uint64)
    now = np.uint64(now_ns)
    diff = np.minimum(then, now)
    np.subtract(now, diff, out=diff)  # 0 where `then` is in the future
    diff //= np.uint64(NS_PER_MS)
    np.minimum(diff, U32_MAX, out=diff)
    return diff.astype(np.uint32)


def remaining_ms(now_ns: int, until_ns: np.ndarray) -> np.ndarray:
    until = np.asarray(until_ns, dtype=np.uint64)
    now = np.uint64(now_ns)
    diff = np.where(until > now, until - np.minimum(until, now), np.uint64(0))
    # round up: a ban with 0.4 ms left is still a ban
    ms = (diff + np.uint64(NS_PER_MS - 1)) // np.uint64(NS_PER_MS)
    return np.minimum(ms, U32_MAX).astype(np.uint32)


def rebase(base_ns: int, age_ms_: np.ndarray) -> np.ndarray:
    """Local monotonic ns of an instant `age_ms_` before `base_ns` (clamped at 0)."""
    t = np.int64(base_ns) - np.asarray(age_ms_, dtype=np.int64) * np.int64(NS_PER_MS)
    return np.maximum(t, 0).astype(np.uint64)


# ---- map entries -> wire records ---------------------------------------------------------


PARALLEL_ROWS = 1 << 17  # conversions of at least this many rows use several threads


def _by_rows(n: int, fn: Callable[[int, int], None]) -> None:
    """fn(lo, hi) over consecutive row ranges covering [0, n): by several threads
    for large arrays (NumPy releases the GIL in these copies and ufuncs)."""
    workers = min(4, os.cpu_count() or 1, n // (PARALLEL_ROWS // 2))
    if workers <= 1 or n < PARALLEL_ROWS:
        fn(0, n)
        return
    bounds = [n * i // workers for i in range(workers + 1)]
    run_parallel(workers, lambda i: fn(bounds[i], bounds[i + 1]))


def sessions_to_wire(
    keys: np.ndarray, values: np.ndarray, now_ns: int, tcp_wire_flags: int
) -> np.ndarray:
    """`tcp_wire_flags`: the TCPD_F_* bits that travel (the rest are local)."""
    out = np.empty(len(keys), dtype=SESSION_WIRE)

    def part(lo: int, hi: int) -> None:
        o, k, v = out[lo:hi], keys[lo:hi], values[lo:hi]
        for f in ("addr_lo", "addr_hi", "port_lo", "port_hi", "proto"):
            o[f] = k[f]
        o["state"] = v["state"]
        o["flags"] = v["flags"]
        o["initiator"] = v["initiator"]
        o["created_age_ms"] = age_ms(now_ns, v["created_ns"])
        o["idle_age_ms"] = age_ms(now_ns, v["last_seen_ns"])
        o["packets"] = encode_counter16(v["packets"])
        o["bytes"] = encode_counter16(v["bytes"])
        o["tcp_scale"] = v["tcp"]["scale"]
        o["tcp_flags"] = v["tcp"]["flags"] & np.uint8(tcp_wire_flags)

    _by_rows(len(keys), part)
    return out


def syn_to_wire(keys: np.ndarray, values: np.ndarray, now_ns: int) -> np.ndarray:
    out = np.empty(len(keys), dtype=SYN_WIRE)
    out["src"] = keys["src"]
    out["dst"] = keys["dst"]
    out["window_age_ms"] = age_ms(now_ns, values["window_start_ns"])
    out["count"] = values["count"]
    out["total"] = values["total"]
    return out


def blacklist_to_wire(keys: np.ndarray, values: np.ndarray, now_ns: int) -> np.ndarray:
    out = np.empty(len(keys), dtype=BLACKLIST_WIRE)
    out["src"] = keys
    out["vm"] = values["vm"]
    out["banned_age_ms"] = age_ms(now_ns, values["banned_ns"])
    out["remaining_ms"] = remaining_ms(now_ns, values["expires_ns"])
    out["dropped"] = values["dropped"]
    return out


def session_keys_to_del(keys: np.ndarray) -> np.ndarray:
    out = np.empty(len(keys), dtype=DEL_SESSION_WIRE)
    for f in ("addr_lo", "addr_hi", "port_lo", "port_hi", "proto"):
        out[f] = keys[f]
    return out


# ---- wire records -> map entries -----------------------------------------------------------


def wire_to_session_keys(rec: np.ndarray, key_dtype: np.dtype) -> np.ndarray:
    keys = np.zeros(len(rec), dtype=key_dtype)

    def part(lo: int, hi: int) -> None:
        k, r = keys[lo:hi], rec[lo:hi]
        for f in ("addr_lo", "addr_hi", "port_lo", "port_hi", "proto"):
            k[f] = r[f]

    _by_rows(len(rec), part)
    return keys


def wire_to_session_values(
    rec: np.ndarray, value_dtype: np.dtype, base_ns: int, extra_flags: int
) -> np.ndarray:
    vals = np.zeros(len(rec), dtype=value_dtype)

    def part(lo: int, hi: int) -> None:
        v, r = vals[lo:hi], rec[lo:hi]
        v["created_ns"] = rebase(base_ns, r["created_age_ms"])
        v["last_seen_ns"] = rebase(base_ns, r["idle_age_ms"])
        v["packets"] = decode_counter16(r["packets"])
        v["bytes"] = decode_counter16(r["bytes"])
        v["state"] = r["state"]
        v["initiator"] = r["initiator"]
        v["flags"] = r["flags"] | np.uint8(extra_flags)
        v["tcp"]["scale"] = r["tcp_scale"]  # edges stay 0: anchored by the first packets
        v["tcp"]["flags"] = r["tcp_flags"]

    _by_rows(len(rec), part)
    return vals  # ifindex stays 0: set by the datapath on the next packet


def wire_to_syn(
    rec: np.ndarray, key_dtype: np.dtype, value_dtype: np.dtype, base_ns: int
) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(rec), dtype=key_dtype)
    keys["src"] = rec["src"]
    keys["dst"] = rec["dst"]
    vals = np.zeros(len(rec), dtype=value_dtype)
    vals["window_start_ns"] = rebase(base_ns, rec["window_age_ms"])
    vals["count"] = rec["count"]
    vals["total"] = rec["total"]
    return keys, vals


def wire_to_blacklist(
    rec: np.ndarray, key_dtype: np.dtype, value_dtype: np.dtype, base_ns: int
) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(rec), dtype=key_dtype)
    keys[:] = rec["src"]
    vals = np.zeros(len(rec), dtype=value_dtype)
    vals["banned_ns"] = rebase(base_ns, rec["banned_age_ms"])
    vals["expires_ns"] = np.uint64(base_ns) + rec["remaining_ms"].astype(np.uint64) * np.uint64(
        NS_PER_MS
    )
    vals["dropped"] = rec["dropped"]
    vals["vm"] = rec["vm"]
    return keys, vals


# ---- a VM's ACL rules <-> wire records ------------------------------------------------

_ACL_COPIED = ("priority", "src_addr", "dport_lo", "dport_hi", "vlan", "proto", "action", "hits")


def mask_prefixlen(masks: np.ndarray) -> np.ndarray:
    """Prefix length of each 16-byte network-order mask (its one bits: the rule table
    only holds prefix masks)."""
    raw = np.ascontiguousarray(masks).view(np.uint8).reshape(-1, 16)
    return np.unpackbits(raw, axis=1).sum(axis=1).astype(np.uint8)


def prefix_masks(plens: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """16-byte network-order masks of the given prefix lengths (0..128), as `dtype`."""
    p = np.asarray(plens, dtype=np.int64).reshape(-1, 1)
    bits = (np.arange(128) < p).astype(np.uint8)
    return np.packbits(bits, axis=1).view(dtype).reshape(-1)


def rules_to_wire(rules: np.ndarray, layout: Layout, vm: np.void) -> np.ndarray:
    """Ordered wire records of the rules of one of the VM's addresses, `vm` (records of
    `acl.vm_rules_dtype`).

    Interface-bound rules cannot be mapped to the destination's interfaces.
    Migration never widens what reaches the VM: an interface-bound allow rule
    is dropped (it would never match there), an interface-bound deny rule is
    kept for every interface (flag ACL_WF_WAS_IFACE_BOUND)."""
    order = np.argsort(rules["priority"], kind="stable")
    r = rules[order]
    bound = r["ifindex"] != 0
    keep = ~(bound & (r["action"] != layout.const("ACL_ACT_DENY")))
    r, bound = r[keep], bound[keep]
    out = np.zeros(len(r), dtype=ACL_WIRE)
    out["vm"] = vm
    for f in _ACL_COPIED:
        out[f] = r[f]
    out["src_plen"] = mask_prefixlen(r["src_mask"])
    out["flags"] = np.where(bound, ACL_WF_WAS_IFACE_BOUND, 0)
    return out


def wire_to_rules(wire: np.ndarray, rules_dtype: np.dtype) -> np.ndarray:
    """Records of `rules_dtype` (`acl.vm_rules_dtype`); id and ifindex 0 (the
    destination assigns ids)."""
    out = np.zeros(len(wire), dtype=rules_dtype)
    for f in _ACL_COPIED:
        out[f] = wire[f]
    out["src_mask"] = prefix_masks(wire["src_plen"], out.dtype["src_mask"])
    return out


def ruleset_digest(section: bytes) -> bytes:
    """16-byte digest of the ACL section as it travels (records or blob)."""
    return hashlib.sha256(b"samixdp-acl\0" + section).digest()[:16]
