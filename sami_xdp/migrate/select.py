"""Selecting one VM's state from the pinned maps, and deltas between rounds.

A VM is all its addresses (vmset.py). Everything is read with batch dumps into
NumPy and filtered with vectorised masks: the sessions with one of the VM's
addresses at either end (both the `sessions` and `unassured` maps, each read
once whatever the number of addresses), the SYN counters towards them, the
blacklist entries they triggered, and each address's ACL rules. Expired entries
are left behind (same rule as the datapath).

Several VMs at once (a host drain): `export_vm_states` reads the maps once for
all of them and splits the rows per VM (a session between two of them goes to
both); `export_vm_state` is that pass for one VM.

Deltas (pre-copy rounds): `ExportState` remembers what the previous round
sent. A session is re-sent when its key is new or its `last_seen_ns` is at or
after the previous round's watermark (taken *before* that round's dump, minus
a safety margin, so a packet racing the dump is sent again rather than lost);
every state change of a session comes with a packet, so last-seen covers
them all. SYN counters and blacklist entries carry no last-seen time; they
are few, so the previous round's values are kept and compared. Keys sent
before and now gone (deleted, expired or evicted) go into the delete lists.
The ACL section is re-sent only when its digest changed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..base.layout import load_layout
from ..base.netutil import addr_dtype
from ..base.rows import KeyIndex, concat_rows, copy_rows, take_rows
from ..loader.batch import KeepFn
from ..loader.pinned import Firewall
from ..policy.acl import export_vm_rules
from ..policy.sessions import SESSION_MAPS, expired_mask
from . import wire
from .vmset import VmAddrs, addr_isin, addr_rows

WATERMARK_MARGIN_NS = 50_000_000  # 50 ms: packets in flight during the dump
FEW_ADDRS = 4  # up to this many addresses, a scan's filter compares them one by one


@dataclass
class VmState:
    """One VM's live state, as raw map entries plus the instant they were read.

    `now_ns` (CLOCK_MONOTONIC, taken after the dumps) is the export instant
    that wire ages are relative to; `watermark_ns` was taken before them."""

    vms: VmAddrs
    now_ns: int
    watermark_ns: int
    sess_keys: np.ndarray
    sess_values: np.ndarray
    syn_keys: np.ndarray
    syn_values: np.ndarray
    bl_keys: np.ndarray
    bl_values: np.ndarray
    acl: np.ndarray | None = None  # ACL wire records; None = not sent
    acl_digest: bytes = b"\0" * 16
    # delta rounds only
    del_sess_keys: np.ndarray | None = None
    del_syn_keys: np.ndarray | None = None
    del_bl: np.ndarray | None = None  # DEL_BLACKLIST_WIRE
    is_delta: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    # ---- wire sections ----------------------------------------------------------

    def sections(self) -> dict[str, np.ndarray | bytes]:
        secs: dict[str, np.ndarray | bytes] = {
            "sessions": wire.sessions_to_wire(
                self.sess_keys, self.sess_values, self.now_ns, wire.tcp_wire_flags(load_layout())
            ),
            "syn": wire.syn_to_wire(self.syn_keys, self.syn_values, self.now_ns),
            "blacklist": wire.blacklist_to_wire(self.bl_keys, self.bl_values, self.now_ns),
        }
        if self.acl is not None:
            secs["acl"] = self.acl
        if self.del_sess_keys is not None:
            secs["del_sessions"] = wire.session_keys_to_del(self.del_sess_keys)
        if self.del_syn_keys is not None:
            d = np.empty(len(self.del_syn_keys), dtype=wire.DEL_SYN_WIRE)
            d["src"] = self.del_syn_keys["src"]
            d["dst"] = self.del_syn_keys["dst"]
            secs["del_syn"] = d
        if self.del_bl is not None:
            secs["del_blacklist"] = self.del_bl
        return secs

    def counts(self) -> dict[str, int]:
        return {
            "sessions": len(self.sess_keys),
            "syn": len(self.syn_keys),
            "blacklist": len(self.bl_keys),
            "acl": (len(self.acl) if isinstance(self.acl, np.ndarray) else 0),
            "del_sessions": 0 if self.del_sess_keys is None else len(self.del_sess_keys),
            "del_syn": 0 if self.del_syn_keys is None else len(self.del_syn_keys),
            "del_blacklist": 0 if self.del_bl is None else len(self.del_bl),
        }


def involves_any(vms: np.ndarray) -> KeepFn:
    """Row filter: session keys with one of `vms` (`struct ip_addr` values) at
    either end."""

    def keep(keys: np.ndarray, _values: np.ndarray) -> np.ndarray:
        return addr_isin(keys["addr_lo"], vms) | addr_isin(keys["addr_hi"], vms)

    return keep


class VmOwners:
    """The addresses of several VMs, for one pass over the maps on behalf of all:
    which listed address a map row's address is (vectorised) and whose rows are
    whose. A VM may hold several addresses, and an address may be listed by more
    than one VM (the same VM asked for twice): its rows go to each of them."""

    def __init__(self, vms_list: Sequence[VmAddrs]) -> None:
        self.vms_list = list(vms_list)
        seen: dict[bytes, int] = {}
        self.vm_addr_idx: list[list[int]] = []  # per VM: indexes into self.addrs
        for vms in self.vms_list:
            self.vm_addr_idx.append([seen.setdefault(row.tobytes(), len(seen))
                                     for row in addr_rows(vms.addrs)])
        self.addrs = np.frombuffer(b"".join(seen), dtype=addr_dtype()).copy()
        self._index = KeyIndex(self.addrs)
        # a cheap first test on the low 64 bits (the whole IPv4 address, an IPv6
        # interface id) before the exact one, which only the few candidates reach
        self._low = np.unique(_low_words(self.addrs))

    def find(self, values: np.ndarray) -> np.ndarray:
        """For each `struct ip_addr` value, the index of that address in
        `self.addrs`, or -1."""
        v = np.ascontiguousarray(values)
        out = np.full(len(v), -1, dtype=np.int64)
        if not len(v) or not len(self._low):
            return out
        low = _low_words(v)
        pos = np.minimum(np.searchsorted(self._low, low), len(self._low) - 1)
        cand = np.flatnonzero(self._low[pos] == low)
        if len(cand):
            found, at = self._index.find(take_rows(v, cand))
            out[cand[found]] = at[found]
        return out

    def keep(self, keys: np.ndarray, _values: np.ndarray) -> np.ndarray:
        """Row filter (`KeepFn`): session keys with a listed address at either end
        (a few addresses: compared one by one, cheaper than the index)."""
        if len(self.addrs) <= FEW_ADDRS:
            return addr_isin(keys["addr_lo"], self.addrs) | addr_isin(keys["addr_hi"], self.addrs)
        return (self.find(keys["addr_lo"]) >= 0) | (self.find(keys["addr_hi"]) >= 0)

    def split(self, ends: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per VM, the indexes of the rows with one of its addresses in any of `ends`
        (address indexes from `find`, one array per address column of the same
        rows), ascending: each row once per VM, in the order it was read."""
        groups = []
        for u in ends:
            order = np.argsort(u, kind="stable")
            bounds = np.searchsorted(u[order], np.arange(len(self.addrs) + 1))
            groups.append((order, bounds))
        out: list[np.ndarray] = []
        for mine in self.vm_addr_idx:
            parts = [order[bounds[a]:bounds[a + 1]] for order, bounds in groups for a in mine]
            rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            out.append(np.unique(rows) if len(parts) > 1 else rows)
        return out


def _low_words(addrs: np.ndarray) -> np.ndarray:
    """The last 8 bytes of each `struct ip_addr` as a number (any byte order: only
    compared for equality)."""
    return np.ascontiguousarray(addrs).view("<u8").reshape(-1, 2)[:, 1]


def _scan_sessions(
    fw: Firewall, owners: VmOwners
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, values, source map index) of every session with a listed address at
    either end, expired or not, from both session maps, each read once."""
    parts = [fw.maps[name].scan(owners.keep) for name in SESSION_MAPS]
    return (
        concat_rows([p.keys for p in parts]),
        concat_rows([p.values for p in parts]),
        np.concatenate([np.full(len(p.keys), i, dtype=np.uint8) for i, p in enumerate(parts)]),
    )


def _session_rows(owners: VmOwners, keys: np.ndarray) -> list[np.ndarray]:
    """Per VM, the indexes of its sessions among `keys` (a session between two of
    the listed VMs goes to both)."""
    return owners.split([owners.find(keys["addr_lo"]), owners.find(keys["addr_hi"])])


def vm_sessions(fw: Firewall, vms: VmAddrs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, values, source map index) of every session with one of the VM's
    addresses at either end, expired or not, from both session maps (each read once,
    a session between two of its addresses once)."""
    return _scan_sessions(fw, VmOwners([vms]))


def vms_last_seen_ns(fw: Firewall, vms_list: Sequence[VmAddrs]) -> list[int]:
    """Per VM, the newest `last_seen_ns` of its sessions (expired or not; 0 if it has
    none), from one pass over the session maps for all of them."""
    if not vms_list:
        return []
    owners = VmOwners(vms_list)
    keys, values, _ = _scan_sessions(fw, owners)
    seen = values["last_seen_ns"]
    return [int(seen[rows].max()) if len(rows) else 0 for rows in _session_rows(owners, keys)]


def _live_sessions(
    fw: Firewall, keys: np.ndarray, values: np.ndarray, source: np.ndarray, now: int
) -> tuple[np.ndarray, np.ndarray]:
    """The live rows of a scan of both maps, each key once."""
    live = ~expired_mask(fw, values, now)
    if not live.all():
        keys, values = take_rows(keys, live), take_rows(values, live)
        source = source[live]
    # a key live in both maps (a promotion caught mid-way): the datapath reads
    # `sessions` first, so the unassured copy is left out
    half = source == 1
    if half.any() and (~half).any():
        dup = KeyIndex(keys[half]).contains(keys[~half])
        if dup.any():
            drop = half.copy()
            drop[half] = KeyIndex(keys[~half][dup]).contains(keys[half])
            keys, values = keys[~drop], values[~drop]
    return keys, values


def _acl_section(fw: Firewall, vms: VmAddrs) -> tuple[np.ndarray, bytes]:
    """Each address's own rules, address by address (in the VM's order)."""
    parts = [wire.rules_to_wire(export_vm_rules(fw, ip), fw.layout, addr)
             for ip, addr in zip(vms.ips, vms.addrs, strict=True)]
    recs = np.concatenate(parts) if parts else np.zeros(0, wire.ACL_WIRE)
    return recs, wire.ruleset_digest(recs.tobytes())


def export_vm_states(
    fw: Firewall,
    vms_list: Sequence[VmAddrs],
    now_ns: int | None = None,
    include_acl: bool = True,
) -> list[VmState]:
    """Every live entry of each VM listed, from ONE pass over the maps for all of
    them (a host drain migrates many VMs at once): one filtered scan of each session
    map, one dump each of the SYN counters and the blacklist, split per VM. A session
    between two of the VMs is in both states. The states share the instants (one
    watermark, one `now_ns`) and the pass's timings."""
    if not vms_list:
        return []
    owners = VmOwners(vms_list)
    t0 = time.perf_counter()
    watermark = time.monotonic_ns() - WATERMARK_MARGIN_NS
    # only the VMs' rows are kept, chunk by chunk, while the maps are read
    keys, values, source = _scan_sessions(fw, owners)
    t1 = time.perf_counter()
    now = now_ns if now_ns is not None else time.monotonic_ns()
    keys, values = _live_sessions(fw, keys, values, source, now)
    sess_rows = _session_rows(owners, keys)
    policy = _read_policy(fw, owners, now)
    shared_s = time.perf_counter() - t1
    states: list[VmState] = []
    for i, rows in enumerate(sess_rows):
        ts = time.perf_counter()
        state = _vm_state(fw, owners, i, now, watermark, take_rows(keys, rows),
                          take_rows(values, rows), policy, include_acl)
        state.timings = {"dump_s": t1 - t0, "select_s": shared_s + time.perf_counter() - ts}
        states.append(state)
    return states


def export_vm_state(
    fw: Firewall,
    vms: VmAddrs | str | Sequence[str],
    now_ns: int | None = None,
    include_acl: bool = True,
) -> VmState:
    """Every live entry of one VM (all its addresses, or the one given as text), read
    with batch dumps (no per-entry objects)."""
    if not isinstance(vms, VmAddrs):
        vms = VmAddrs.parse(vms)
    return export_vm_states(fw, [vms], now_ns=now_ns, include_acl=include_acl)[0]


@dataclass
class _Policy:
    """The SYN counters and blacklist (small maps, read whole once) and, per VM, the
    indexes of its rows: the counters towards it, the live bans it triggered."""

    syn_keys: np.ndarray
    syn_values: np.ndarray
    bl_keys: np.ndarray
    bl_values: np.ndarray
    syn_rows: list[np.ndarray]
    bl_rows: list[np.ndarray]


def _read_policy(fw: Firewall, owners: VmOwners, now: int) -> _Policy:
    syn_k, syn_v = fw.maps["syn_counters"].dump()
    bl_k, bl_v = fw.maps["blacklist"].dump()
    bl_u = owners.find(bl_v["vm"])
    bl_u[bl_v["expires_ns"] <= np.uint64(now)] = -1
    return _Policy(syn_k, syn_v, bl_k, bl_v,
                   owners.split([owners.find(syn_k["dst"])]), owners.split([bl_u]))


def _vm_state(
    fw: Firewall,
    owners: VmOwners,
    i: int,
    now: int,
    watermark: int,
    keys: np.ndarray,
    values: np.ndarray,
    policy: _Policy,
    include_acl: bool,
) -> VmState:
    """VM i's state: these sessions with its SYN counters, bans and ACL."""
    vms = owners.vms_list[i]
    syn, bl = policy.syn_rows[i], policy.bl_rows[i]
    acl_recs: np.ndarray | None = None
    digest = b"\0" * 16
    if include_acl:
        acl_recs, digest = _acl_section(fw, vms)
    return VmState(
        vms=vms,
        now_ns=now,
        watermark_ns=watermark,
        sess_keys=keys,
        sess_values=values,
        syn_keys=take_rows(policy.syn_keys, syn),
        syn_values=take_rows(policy.syn_values, syn),
        bl_keys=take_rows(policy.bl_keys, bl),
        bl_values=take_rows(policy.bl_values, bl),
        acl=acl_recs,
        acl_digest=digest,
    )


def dirty_state(
    fw: Firewall, vms: VmAddrs, keys: np.ndarray, include_acl: bool = True
) -> tuple[VmState, np.ndarray]:
    """The current entries of the sessions the dirty log named (`keys`), read one by
    one from both maps, and the keys among them that are gone (deleted or expired);
    with the VM's SYN counters, bans and ACL. O(changes), not O(table)."""
    t0 = time.perf_counter()
    watermark = time.monotonic_ns() - WATERMARK_MARGIN_NS
    found_s, vals_s = fw.maps["sessions"].lookup_keys(keys)
    rest = take_rows(keys, ~found_s)
    found_u, vals_u = fw.maps["unassured"].lookup_keys(rest)
    now = time.monotonic_ns()
    sk = concat_rows([take_rows(keys, found_s), take_rows(rest, found_u)], keys.dtype)
    sv = concat_rows([vals_s[found_s], vals_u[found_u]], vals_s.dtype)
    live = ~expired_mask(fw, sv, now)
    gone = concat_rows([take_rows(rest, ~found_u), take_rows(sk, ~live)], keys.dtype)
    t1 = time.perf_counter()
    owners = VmOwners([vms])
    state = _vm_state(fw, owners, 0, now, watermark, take_rows(sk, live), take_rows(sv, live),
                      _read_policy(fw, owners, now), include_acl)
    state.timings = {"dump_s": t1 - t0, "select_s": time.perf_counter() - t1}
    return state, gone


@dataclass
class ExportState:
    """What the previous round of one migration sent (the source's side of deltas).

    Pass the same object to `build_bundle` for every round: it is advanced
    in place to the round just built."""

    rounds: int = 0
    vms: tuple[str, ...] = ()  # the VM's addresses (a migration moves one VM)
    watermark_ns: int = 0
    sess_keys: np.ndarray | None = None
    syn_keys: np.ndarray | None = None
    syn_values: np.ndarray | None = None
    bl_keys: np.ndarray | None = None
    bl_values: np.ndarray | None = None
    acl_digest: bytes | None = None

    def advance(
        self, state: VmState, full: VmState | None = None, sessions_whole: bool = True
    ) -> None:
        """Remember `full` (the complete current state the delta was cut from).
        `sessions_whole` False (a round from the dirty log, whose sessions are only
        the changed ones): the session keys of the last whole round are kept."""
        cur = full or state
        self.rounds += 1
        self.vms = cur.vms.ips
        self.watermark_ns = cur.watermark_ns
        if sessions_whole or self.sess_keys is None:
            self.sess_keys = copy_rows(cur.sess_keys)
        self.syn_keys, self.syn_values = cur.syn_keys.copy(), cur.syn_values.copy()
        self.bl_keys, self.bl_values = cur.bl_keys.copy(), cur.bl_values.copy()
        self.acl_digest = cur.acl_digest


def _changed_rows(
    prev_k: np.ndarray, prev_v: np.ndarray, cur_k: np.ndarray, cur_v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(mask of current rows new or changed, mask of previous rows now gone)."""
    if len(prev_k) == 0:
        return np.ones(len(cur_k), bool), np.zeros(0, bool)
    idx = KeyIndex(prev_k)
    found, pos = idx.find(cur_k)
    vsize = cur_v.dtype.itemsize
    cb = np.ascontiguousarray(cur_v).view(np.uint8).reshape(len(cur_v), vsize)
    pb = np.ascontiguousarray(prev_v).view(np.uint8).reshape(len(prev_v), vsize)
    same = found.copy()
    if found.any():
        same[found] = (cb[found] == pb[pos[found]]).all(axis=1)
    gone = ~KeyIndex(cur_k).contains(prev_k) if len(cur_k) else np.ones(len(prev_k), bool)
    return ~same, gone


def delta_since(prev: ExportState, cur: VmState, dirty_gone: np.ndarray | None = None) -> VmState:
    """The part of `cur` that changed since `prev`, plus the delete lists.
    `dirty_gone` given: `cur` holds only the sessions the dirty log named (all
    of them re-sent) and these are the ones to delete."""
    if prev.sess_keys is None:
        raise ValueError("no previous round to cut a delta from: send a full bundle first")
    if prev.vms != cur.vms.ips:
        raise ValueError(
            f"the previous rounds were of another VM ({','.join(prev.vms)}), not {cur.vms.label}"
        )
    # sessions: new keys, or heard from since the previous watermark
    if dirty_gone is not None:
        known = np.zeros(len(cur.sess_keys), bool)
    elif len(prev.sess_keys):
        prev_idx = KeyIndex(prev.sess_keys)
        known = prev_idx.contains(cur.sess_keys)
    else:
        known = np.zeros(len(cur.sess_keys), bool)
    changed = ~known | (cur.sess_values["last_seen_ns"] >= np.uint64(prev.watermark_ns))
    if dirty_gone is not None:
        del_sess = dirty_gone
    elif len(cur.sess_keys):
        del_sess = prev.sess_keys[~KeyIndex(cur.sess_keys).contains(prev.sess_keys)]
    else:
        del_sess = prev.sess_keys

    assert prev.syn_keys is not None and prev.syn_values is not None
    assert prev.bl_keys is not None and prev.bl_values is not None
    syn_chg, syn_gone = _changed_rows(prev.syn_keys, prev.syn_values, cur.syn_keys, cur.syn_values)
    bl_chg, bl_gone = _changed_rows(prev.bl_keys, prev.bl_values, cur.bl_keys, cur.bl_values)
    del_bl = np.empty(int(bl_gone.sum()), dtype=wire.DEL_BLACKLIST_WIRE)
    del_bl["src"] = prev.bl_keys[bl_gone]
    del_bl["vm"] = prev.bl_values["vm"][bl_gone]

    acl_same = prev.acl_digest is not None and prev.acl_digest == cur.acl_digest
    return VmState(
        vms=cur.vms,
        now_ns=cur.now_ns,
        watermark_ns=cur.watermark_ns,
        sess_keys=cur.sess_keys[changed],
        sess_values=cur.sess_values[changed],
        syn_keys=cur.syn_keys[syn_chg],
        syn_values=cur.syn_values[syn_chg],
        bl_keys=cur.bl_keys[bl_chg],
        bl_values=cur.bl_values[bl_chg],
        acl=None if acl_same else cur.acl,
        acl_digest=cur.acl_digest,
        del_sess_keys=del_sess,
        del_syn_keys=prev.syn_keys[syn_gone],
        del_bl=del_bl,
        is_delta=True,
        timings=dict(cur.timings),
    )
