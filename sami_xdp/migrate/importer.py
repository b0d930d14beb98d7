"""Loading a verified bundle into the maps: all or nothing, and undoable later.

Steps (under an exclusive lock in the state dir, so concurrent imports do not
race each other's capacity checks):

1. Plan, reading only (plan.py): rebase ages on the local CLOCK_MONOTONIC, split
   sessions into `unassured` (TCP handshakes, UDP not yet assured, ICMP) and
   `sessions` by their state, read each
   touched map once (its fill level and the current values of every key we
   will overwrite or delete), and refuse if a map lacks room. The session
   maps are read while the records are converted, keeping only the VM's
   rows (every key of a verified bundle has the VM at one end).
2. Consume (migration id, seq) in the replay cache (durable).
3. Write the undo record to the state dir (journal.py; write-ahead, fsync'd):
   keys this round creates, and the old values of keys it overwrites or deletes.
4. Write with batch updates, map by map. Any failure rolls back every step
   from the undo record (delete created keys, put old values back) and
   raises ImportFailed; the undo record is then removed.

`abort_import(migration_id)` replays the undo records of every round of a
migration in reverse order, so exactly what that migration wrote goes away
and what it overwrote comes back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..base.netutil import ip_to_be32
from ..base.rows import KeyIndex, concat_rows, take_rows
from ..loader.pinned import Firewall
from ..policy.acl import (
    AclError,
    check_vm_rules,
    replace_vm_rules,
    snapshot_vm_rules,
    vm_rules_dtype,
)
from ..policy.protect import is_protected
from ..policy.sessions import unassured_states
from . import wire
from .errors import (
    BundleRefused,
    CapacityError,
    ImportFailed,
    InvalidRecordError,
    RollbackIncomplete,
    UnknownMigrationError,
)
from .journal import ImportRecords, apply_undo, import_lock, read_undo, undo_record
from .keys import TrustStore
from .plan import MapPlan, SessionSnapshot, check_capacity, plan_map, vm_filter
from .replay import ReplayCache
from .verify import VerifiedBundle, verify_bundle

DEFAULT_PICKUP_S = 10.0


@dataclass
class ImportResult:
    migration_id: str
    seq: int
    vm: str
    source: str
    kind: str
    counts: dict[str, int]  # entries written per kind
    deleted: dict[str, int]  # entries removed per map (delta delete lists, table moves)
    skipped: dict[str, int]  # records not loaded, by reason
    pickup_until_ns: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _elapsed_ns(vb: VerifiedBundle, now_ms: int) -> int:
    """Time since export by the wall clocks (transit + queueing), within the validity."""
    b = vb.bundle
    ms = min(max(now_ms - b.issued_at_ms, 0), b.expires_at_ms - b.issued_at_ms)
    return ms * wire.NS_PER_MS


def _session_plans(fw: Firewall, vb: VerifiedBundle, base: int) -> list[MapPlan]:
    """The plans of both session maps: a record in an unassured state goes to
    `unassured`, the rest to `sessions`, and a key moving from one table to the
    other leaves it."""
    c = fw.layout.consts
    sec = vb.sections
    sm, um = fw.maps["sessions"], fw.maps["unassured"]
    srec, dsess = sec["sessions"], sec["del_sessions"]
    assert isinstance(srec, np.ndarray) and isinstance(dsess, np.ndarray)
    # the session maps' snapshot is read while the records are converted
    only = vm_filter(vb.vm, srec, dsess)
    snap = SessionSnapshot(fw, only) if only is not None and (len(srec) or len(dsess)) else None
    try:
        half = np.isin(srec["state"], unassured_states(fw.layout))
        skeys = wire.wire_to_session_keys(srec, sm.key_dtype)
        svals = wire.wire_to_session_values(srec, sm.value_dtype, base, c["SESS_F_MIGRATED"])
        dkeys = wire.wire_to_session_keys(dsess, sm.key_dtype)
        if half.any():
            est_k, est_v = take_rows(skeys, ~half), take_rows(svals, ~half)
            half_k, half_v = take_rows(skeys, half), take_rows(svals, half)
        else:  # the usual case: nothing unassured, no copies
            est_k, est_v, half_k, half_v = skeys, svals, skeys[:0], svals[:0]
        scans = snap.result() if snap is not None else {}
    finally:
        if snap is not None:
            snap.join()
    return [
        plan_map(sm, est_k, est_v, concat_rows([dkeys, half_k]), scan=scans.get("sessions")),
        plan_map(um, half_k, half_v, concat_rows([dkeys, est_k]), scan=scans.get("unassured")),
    ]


def _syn_plan(fw: Firewall, vb: VerifiedBundle, base: int) -> MapPlan:
    m = fw.maps["syn_counters"]
    syn, dsyn = vb.sections["syn"], vb.sections["del_syn"]
    assert isinstance(syn, np.ndarray) and isinstance(dsyn, np.ndarray)
    keys, values = wire.wire_to_syn(syn, m.key_dtype, m.value_dtype, base)
    dkeys = np.zeros(len(dsyn), dtype=m.key_dtype)
    dkeys["src"], dkeys["dst"] = dsyn["src"], dsyn["dst"]
    return plan_map(m, keys, values, dkeys)


def _ban_plan(
    fw: Firewall, vb: VerifiedBundle, base: int, now: int, skipped: dict[str, int]
) -> MapPlan:
    """Bans that ended in transit are skipped; a live ban of the same source for
    another VM stays as it is (a bundle acts on its own VM only)."""
    m = fw.maps["blacklist"]
    vm = vb.vm
    bl, dbl = vb.sections["blacklist"], vb.sections["del_blacklist"]
    assert isinstance(bl, np.ndarray) and isinstance(dbl, np.ndarray)
    keys, values = wire.wire_to_blacklist(bl, m.key_dtype, m.value_dtype, base)
    live = values["expires_ns"] > np.uint64(now)
    skipped["expired_bans"] = int((~live).sum())
    skipped["foreign_bans"] = 0
    keys, values = keys[live], values[live]
    if len(keys):
        cur_k, cur_v = m.dump()
        if len(cur_k):
            f, pos = KeyIndex(cur_k).find(keys)
            foreign = f & (cur_v["vm"][pos] != vm) & (cur_v["expires_ns"][pos] > now)
            skipped["foreign_bans"] = int(foreign.sum())
            keys, values = keys[~foreign], values[~foreign]
    return plan_map(
        m,
        keys,
        values,
        np.asarray(dbl["src"], dtype=m.key_dtype),
        keep_delete=lambda old: old["vm"] == vm,
    )


def _acl_rules(fw: Firewall, vb: VerifiedBundle) -> np.ndarray | None:
    """The VM's rules the round installs (None: the round leaves them alone),
    checked to fit before anything is written."""
    if not vb.bundle.has_acl:
        return None
    section = vb.sections["acl"]
    if isinstance(section, bytes):
        raise InvalidRecordError(
            "the bundle's ACL section is an opaque blob: this host installs ACL rule records"
        )
    rules = wire.wire_to_rules(section, vm_rules_dtype(fw.layout))
    try:
        check_vm_rules(fw, vb.vm_ip, rules)
    except AclError as exc:
        raise CapacityError(f"the VM's ACL rules cannot be installed: {exc}") from exc
    return rules


def import_vm_state(
    fw: Firewall,
    vb: VerifiedBundle,
    state_dir: Path,
    *,
    replay: ReplayCache | None = None,
    pickup_s: float = DEFAULT_PICKUP_S,
    now_ns: int | None = None,
    now_ms: int | None = None,
) -> ImportResult:
    """Loads a verified bundle: all entries or none. See the module docstring."""
    b = vb.bundle
    vm = b.vm
    vm_ip = b.vm_ip
    mid = b.migration_id
    records = ImportRecords(state_dir)
    t0 = time.perf_counter()
    warnings: list[str] = []
    skipped: dict[str, int] = {}
    with import_lock(state_dir):
        prev = records.meta(mid)
        if prev is not None and prev.get("vm") != vm_ip:
            raise BundleRefused(f"migration {mid.hex()} was for VM {prev.get('vm')}, not {vm_ip}")
        if prev is not None and prev.get("status") == "aborted":
            raise BundleRefused(f"migration {mid.hex()} was aborted here")
        if replay is not None:
            replay.check(mid, b.seq)
        if b.is_delta and prev is None:
            warnings.append("delta bundle without an earlier round of this migration here")

        # ---- plan (reads only) ----------------------------------------------------
        now = now_ns if now_ns is not None else time.monotonic_ns()
        wall = now_ms if now_ms is not None else int(time.time() * 1000)
        base = now - _elapsed_ns(vb, wall)
        plans = [
            *_session_plans(fw, vb, base),
            _syn_plan(fw, vb, base),
            _ban_plan(fw, vb, base, now, skipped),
        ]
        check_capacity(fw, plans)
        pm = fw.maps["pickup"]
        pkey = np.array([vm], dtype=np.uint32)
        pickup_old = pm.lookup(pkey)
        pickup_until = now + int(pickup_s * 1e9) if pickup_s > 0 else 0
        if pickup_s > 0 and pickup_old is None and pm.count() >= pm.info.max_entries:
            raise CapacityError("no room in map pickup for the VM's pickup window")
        acl_rules = _acl_rules(fw, vb)
        acl_old = snapshot_vm_rules(fw, vm_ip) if acl_rules is not None else None
        t_plan = time.perf_counter()

        # ---- commit point ---------------------------------------------------------
        if replay is not None:
            replay.consume(mid, b.seq, b.expires_at_ms)
        undo = undo_record(
            {p.name: p.undo() for p in plans},
            np.array([pickup_old], np.uint64) if pickup_old is not None else None,
            pickup_s > 0,
            acl_old,
        )
        records.begin_round(mid, b.seq, {"vm": vm_ip, "source": b.source, "kind": b.kind}, undo)
        t_undo = time.perf_counter()

        step = 0
        deleted: dict[str, int] = {}
        try:
            for plan in plans:
                step += 1
                m = fw.maps[plan.name]
                if len(plan.delete_keys):
                    deleted[plan.name] = m.delete_many(plan.delete_keys)
                if len(plan.write_keys):
                    m.update_many(plan.write_keys, plan.write_values)
                    if plan.name == "blacklist":
                        fw.set_bans_hint(True)  # the datapath checks bans only when set
            step += 1
            if pickup_s > 0:
                pm.update(pkey, np.array([pickup_until], np.uint64))
            step += 1
            if acl_rules is not None:
                replace_vm_rules(fw, vm_ip, acl_rules)
        except BaseException as exc:  # Ctrl-C mid-load too: leave nothing half-written
            undone, errors = apply_undo(fw, vm, undo, steps=step)
            records.end_round(mid, b.seq, ok=False)
            if not isinstance(exc, Exception):
                raise
            if errors:
                raise RollbackIncomplete(
                    f"import failed ({exc}) and rollback failed too: {'; '.join(errors)}"
                ) from exc
            raise ImportFailed(f"import failed and was rolled back: {exc}") from exc
        t_write = time.perf_counter()

        counts = {
            "sessions": len(plans[0].write_keys),
            "unassured": len(plans[1].write_keys),
            "syn_counters": len(plans[2].write_keys),
            "blacklist": len(plans[3].write_keys),
            "acl_rules": len(acl_rules) if acl_rules is not None else 0,
        }
        records.end_round(mid, b.seq, ok=True, counts=counts)
    if not is_protected(fw, vm_ip):
        warnings.append(f"{vm_ip} is not in a protected prefix here: its traffic is transit")
    return ImportResult(
        migration_id=mid.hex(),
        seq=b.seq,
        vm=vm_ip,
        source=b.source,
        kind=b.kind,
        counts=counts,
        deleted=deleted,
        skipped=skipped,
        pickup_until_ns=pickup_until,
        timings={
            "plan_s": t_plan - t0,
            "undo_log_s": t_undo - t_plan,
            "write_s": t_write - t_undo,
            "total_s": time.perf_counter() - t0,
        },
        warnings=warnings,
    )


def receive_bundle(
    fw: Firewall,
    data: bytes | bytearray | memoryview,
    trust: TrustStore,
    replay_cache: ReplayCache,
    host_id: str,
    *,
    state_dir: Path | None = None,
    pickup_s: float = DEFAULT_PICKUP_S,
) -> ImportResult:
    """Verify then import one bundle (the receiving side of a migration round).

    The state dir (undo records, import lock) defaults to the replay cache's."""
    t0 = time.perf_counter()
    vb = verify_bundle(data, trust, host_id, replay_cache)
    t1 = time.perf_counter()
    res = import_vm_state(
        fw, vb, state_dir or replay_cache.state_dir, replay=replay_cache, pickup_s=pickup_s
    )
    res.timings = {"verify_s": t1 - t0, **res.timings, "receive_total_s": time.perf_counter() - t0}
    return res


def abort_import(
    fw: Firewall,
    migration_id: bytes | str,
    state_dir: Path,
    *,
    replay: ReplayCache | None = None,
) -> dict[str, int]:
    """Removes exactly what a migration imported here (every round), restores what
    it overwrote, and refuses any later bundle of that migration."""
    mid = bytes.fromhex(migration_id) if isinstance(migration_id, str) else migration_id
    records = ImportRecords(state_dir)
    meta = records.meta(mid)
    if meta is None:
        raise UnknownMigrationError(f"no import of migration {mid.hex()} in {state_dir}")
    own_replay = replay is None
    rc = replay or ReplayCache(state_dir)
    try:
        rc.close_migration(mid)
    finally:
        if own_replay:
            rc.close()
    if meta.get("status") == "aborted":
        return {}
    vm = ip_to_be32(meta["vm"])
    totals: dict[str, int] = {}
    errors: list[str] = []
    with import_lock(state_dir):
        for path in records.undo_files(mid):
            counts, errs = apply_undo(fw, vm, read_undo(path))
            errors.extend(errs)
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
        if errors:
            raise RollbackIncomplete(f"abort of {mid.hex()} incomplete: {'; '.join(errors)}")
        records.mark_aborted(mid, totals)
    return totals
