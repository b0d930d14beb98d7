"""Planning one import round, reading only: for each map, what it writes, deletes,
creates and overwrites (with the old values, for the undo record), and whether the
map has room for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..base.rows import KeyIndex, take_rows, unique_rows
from ..loader.batch import KeepFn, ScanResult
from ..loader.pinned import Firewall, PinnedMap, possible_cpus
from ..policy.sessions import SESSION_MAPS
from .errors import CapacityError
from .select import involves_any
from .verify import RecordLimits
from .vmset import VmAddrs

LRU_HEADROOM_PER_CPU = 128  # LRU maps may evict before they are full (per-CPU free lists)
# a round touching at most this many keys of a map looks each one up instead of
# reading the map whole: a delta costs O(its records), not O(the table)
LOOKUP_MAX = 1 << 15


@dataclass
class MapPlan:
    name: str
    write_keys: np.ndarray
    write_values: np.ndarray
    delete_keys: np.ndarray  # present now, to remove
    created_keys: np.ndarray  # written, absent before
    old_keys: np.ndarray  # present before and overwritten or deleted
    old_values: np.ndarray
    fill_after: int  # entries in the map once the round is written

    @property
    def empty(self) -> bool:
        return not len(self.write_keys) and not len(self.delete_keys)

    def undo(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.created_keys, self.old_keys, self.old_values


def _empty(dtype: np.dtype) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


def plan_map(
    m: PinnedMap,
    write_keys: np.ndarray,
    write_values: np.ndarray,
    delete_keys: np.ndarray,
    keep_delete: Callable[[np.ndarray], np.ndarray] | None = None,
    scan: ScanResult | None = None,
) -> MapPlan:
    """Snapshots what the writes and deletes touch.

    `scan`, when given, is the map already read with a row filter that every
    write and delete key passes (`SessionSnapshot`): its kept rows stand for the
    map's content and its `scanned` count for the fill level."""
    if not len(write_keys) and not len(delete_keys):
        e = _empty(m.key_dtype)
        v = _empty(m.value_dtype)
        return MapPlan(m.name, e, v, e, e, e, v, 0)
    if scan is None and small_round(write_keys, delete_keys):
        return _plan_by_lookups(m, write_keys, write_values, delete_keys, keep_delete)
    if scan is None:
        dk, dv = m.dump()
        fill = len(dk)
    else:
        dk, dv, fill = scan.keys, scan.values, scan.scanned
    if len(dk):
        idx = KeyIndex(dk)
        wf, wpos = idx.find(write_keys)
        df, dpos = idx.find(delete_keys)
    else:
        wf = np.zeros(len(write_keys), bool)
        wpos = np.zeros(len(write_keys), np.int64)
        df = np.zeros(len(delete_keys), bool)
        dpos = np.zeros(len(delete_keys), np.int64)
    # deletes: present keys, each once (by position in the dump), not also written
    del_pos = np.unique(dpos[df])
    if wf.any() and len(del_pos):
        del_pos = del_pos[~np.isin(del_pos, wpos[wf])]
    return _plan(m, write_keys, write_values, wf, dv[wpos[wf]], dk[del_pos], dv[del_pos],
                 keep_delete, fill)


def _plan(
    m: PinnedMap,
    write_keys: np.ndarray,
    write_values: np.ndarray,
    found: np.ndarray,
    found_old: np.ndarray,
    del_keys: np.ndarray,
    del_old: np.ndarray,
    keep_delete: Callable[[np.ndarray], np.ndarray] | None,
    fill: int,
) -> MapPlan:
    """The plan from what the map holds: `found` (mask of write keys present, with
    their values `found_old`) and the present keys to delete with theirs."""
    if keep_delete is not None and len(del_keys):
        ok = keep_delete(del_old)
        del_keys, del_old = take_rows(del_keys, ok), del_old[ok]
    # duplicate keys in a bundle only make the fill estimate pessimistic
    created = take_rows(write_keys, ~found) if found.any() else write_keys
    return MapPlan(
        name=m.name,
        write_keys=write_keys,
        write_values=write_values,
        delete_keys=del_keys,
        created_keys=created,
        old_keys=np.concatenate([take_rows(write_keys, found), del_keys]),
        old_values=np.concatenate([found_old, del_old]),
        fill_after=fill - len(del_keys) + len(created),
    )


def small_round(write_keys: np.ndarray, delete_keys: np.ndarray) -> bool:
    return len(write_keys) + len(delete_keys) <= LOOKUP_MAX


def _plan_by_lookups(
    m: PinnedMap,
    write_keys: np.ndarray,
    write_values: np.ndarray,
    delete_keys: np.ndarray,
    keep_delete: Callable[[np.ndarray], np.ndarray] | None,
) -> MapPlan:
    """plan_map for a small round: each key looked up, the fill level from the
    kernel's count."""
    wf, wold = m.lookup_keys(write_keys)
    dkeys = unique_rows(delete_keys)
    if len(dkeys) and len(write_keys):
        dkeys = take_rows(dkeys, ~KeyIndex(write_keys).contains(dkeys))
    df, dold = m.lookup_keys(dkeys)
    return _plan(m, write_keys, write_values, wf, wold[wf], take_rows(dkeys, df), dold[df],
                 keep_delete, m.count())


def capacity(m: PinnedMap) -> int:
    """Entries a map can hold for an import (LRU maps evict before they are full)."""
    cap = m.info.max_entries
    if m.info.type_name == "lru_hash":
        cap -= min(cap // 4, LRU_HEADROOM_PER_CPU * possible_cpus())
    return cap


def check_capacity(fw: Firewall, plans: list[MapPlan]) -> None:
    for plan in plans:
        m = fw.maps[plan.name]
        cap = capacity(m)
        if not plan.empty and plan.fill_after > cap:
            raise CapacityError(
                f"not enough room in map {plan.name}: {plan.fill_after} entries needed "
                f"after import, capacity {cap} (of {m.info.max_entries})"
            )


def vm_filter(vms: VmAddrs, *records: np.ndarray) -> KeepFn | None:
    """`involves_any(vms)` if every record given (session keys or wire records) has
    one of the VM's addresses at one end, as verified bundles guarantee: then a
    session map's other rows cannot matter to the plan. Else None (read everything)."""
    keep = involves_any(vms.addrs)
    for r in records:
        if len(r) and not keep(r, r).all():
            return None
    return keep


class SessionSnapshot:
    """Both session maps read (rows passing `only`, and the fill levels) by a
    background thread, so the reads overlap the conversion of the records."""

    def __init__(self, fw: Firewall, only: KeepFn) -> None:
        self._out: dict[str, ScanResult] = {}
        self._error: BaseException | None = None

        def run() -> None:
            try:
                for name in SESSION_MAPS:
                    self._out[name] = fw.maps[name].scan(only)
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> dict[str, ScanResult]:
        self.join()
        if self._error is not None:
            raise self._error
        return self._out


def record_limits(fw: Firewall) -> RecordLimits:
    """The most records a bundle may announce here: what the maps could ever hold."""
    return RecordLimits(
        sessions=sum(fw.maps[n].info.max_entries for n in SESSION_MAPS),
        syn=fw.maps["syn_counters"].info.max_entries,
        blacklist=fw.maps["blacklist"].info.max_entries,
        acl=fw.const("SAMIXDP_ACL_MAX_RULES_PER_SET"),  # per VM address
    )
