"""Loading a verified bundle into the maps: all or nothing, undoable later, and
crash-consistent (journal.py, recovery.py).

Everything a bundle does is confined to its VM, all of whose addresses must
lie in a protected prefix here (and in the signer's scope, checked by
verify.py); the round loads the state of every address or of none:

* rounds: only of a migration of the same VM (the same addresses) and source,
  not aborted and not past its final round;
* sessions: every record involves one of the VM's addresses (verify.py); one
  whose other end is another VM protected here, outside the signer's scope, is
  skipped; the flags naming the protected ends are recomputed from this host's
  prefixes;
* SYN counters: towards the VM; bans: triggered by the VM, their remaining
  time capped by this host's ban setting, never replacing a live ban of
  another VM;
* ACL: each address's own rules; deletions: only the VM's entries;
* pickup window: for each address, only on the final round of a migration
  whose state was loaded here (a full bundle, or earlier rounds), for one
  `pickup_s` period.

Steps, under the import lock (one import, abort or recovery at a time, across
processes):

1. Recover a round a crashed process left behind (recovery.py).
2. Check the migration and the replay cache (and the journal, which rules).
3. Plan, reading only (plan.py): rebase ages on the local CLOCK_MONOTONIC,
   split sessions into `unassured` (TCP handshakes, UDP not yet assured, ICMP)
   and `sessions` by their state,
   read each touched map once (its fill level and the current values of every
   key we will overwrite or delete), refuse if a map lacks room.
4. `begin_round`: the undo record (keys this round creates, old values of keys
   it overwrites or deletes) becomes durable before any map write.
5. Write with batch updates, map by map. A failure undoes what was written
   and raises ImportFailed.
6. `commit_round`: meta.json lists the round, the commit point. Only then is
   the bundle recorded in the replay cache: a refused or failed import can be
   retried with the same bundle.

`abort_import(migration_id)` replays the undo records of every round of a
migration in reverse order, so exactly what that migration wrote goes away
and what it overwrote comes back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from ..base.netutil import in_networks
from ..base.rows import KeyIndex, concat_rows, copy_rows, take_rows
from ..loader.pinned import Firewall
from ..policy.acl import (
    AclError,
    check_vm_rules,
    replace_vm_rules,
    snapshot_vm_rules,
    vm_rules_dtype,
)
from ..policy.protect import list_protected
from ..policy.sessions import unassured_states
from . import wire
from .bundle import FLAG_FINAL
from .errors import (
    CapacityError,
    ControlError,
    ImportFailed,
    InvalidRecordError,
    MigrationConflict,
    NotProtectedError,
    ReplayError,
    RollbackIncomplete,
    StateDirError,
    UnknownMigrationError,
)
from .journal import ImportRecords, import_lock
from .peers import TrustStore
from .plan import (
    MapPlan,
    SessionSnapshot,
    check_capacity,
    plan_map,
    record_limits,
    small_round,
    vm_filter,
)
from .recovery import recover_locked, undo_migration
from .replay import ReplayCache
from .undo import apply_undo, undo_record
from .verify import VerifiedBundle, verify_bundle
from .vmset import VmAddrs, addr_isin

DEFAULT_PICKUP_S = 10.0
MAX_PICKUP_S = 3600.0


@dataclass
class ImportResult:
    migration_id: str
    seq: int
    vms: list[str]  # the VM's addresses, canonical
    source: str
    kind: str
    counts: dict[str, int]  # entries written per kind
    deleted: dict[str, int]  # entries removed per map (delta delete lists, table moves)
    skipped: dict[str, int]  # records not loaded, by reason
    pickup_until_ns: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def vm(self) -> str:
        """The VM's addresses on one line."""
        return ",".join(self.vms)

    def as_dict(self) -> dict[str, object]:
        return {"vm": self.vm, **asdict(self)}


@dataclass
class Confinement:
    """What this host knows that a bundle may not change: its protected prefixes,
    the signer's scope, its ban time."""

    protected: list
    scope: tuple
    ban_ms: int

    def foreign_sessions(self, rec: np.ndarray, vms: VmAddrs) -> np.ndarray:
        """Records whose other end is another VM protected here that the signer
        has no say over: loading them would act on that VM. (A session between two
        of the VM's own addresses is its own.)"""
        if not len(rec):
            return np.zeros(0, bool)
        lo_mine, hi_mine = vms.contains(rec["addr_lo"]), vms.contains(rec["addr_hi"])
        other = copy_rows(rec["addr_lo"])
        other[lo_mine] = rec["addr_hi"][lo_mine]
        return (
            ~(lo_mine & hi_mine)
            & in_networks(other, self.protected)
            & ~in_networks(other, self.scope)
        )

    def vm_flags(self, keys: np.ndarray, flags: np.ndarray, lo_flag: int, hi_flag: int) -> None:
        """Recomputes in place which ends of each session are protected here."""
        flags &= np.uint8(~(lo_flag | hi_flag) & 0xFF)
        flags |= np.where(in_networks(keys["addr_lo"], self.protected), lo_flag, 0).astype(np.uint8)
        flags |= np.where(in_networks(keys["addr_hi"], self.protected), hi_flag, 0).astype(np.uint8)


def _elapsed_ns(vb: VerifiedBundle, now_ms: int) -> int:
    """Time since export by the wall clocks (transit + queueing), within the validity."""
    b = vb.bundle
    ms = min(max(now_ms - b.issued_at_ms, 0), b.expires_at_ms - b.issued_at_ms)
    return ms * wire.NS_PER_MS


def _session_plans(
    fw: Firewall, vb: VerifiedBundle, base: int, conf: Confinement, skipped: dict[str, int]
) -> list[MapPlan]:
    """The plans of both session maps: a record in an unassured state goes to
    `unassured`, the rest to `sessions`, and a key moving from one table to the
    other leaves it."""
    c = fw.layout.consts
    sec = vb.sections
    sm, um = fw.maps["sessions"], fw.maps["unassured"]
    srec, dsess = sec["sessions"], sec["del_sessions"]
    assert isinstance(srec, np.ndarray) and isinstance(dsess, np.ndarray)
    foreign, dforeign = conf.foreign_sessions(srec, vb.vms), conf.foreign_sessions(dsess, vb.vms)
    skipped["foreign_sessions"] = int(foreign.sum()) + int(dforeign.sum())
    if foreign.any():
        srec = take_rows(srec, ~foreign)
    if dforeign.any():
        dsess = take_rows(dsess, ~dforeign)
    # the session maps' snapshot is read while the records are converted
    only = vm_filter(vb.vms, srec, dsess)
    big = not small_round(srec, dsess)  # a small round looks its keys up instead
    snap = SessionSnapshot(fw, only) if only is not None and big else None
    try:
        half = np.isin(srec["state"], unassured_states(fw.layout))
        skeys = wire.wire_to_session_keys(srec, sm.key_dtype)
        svals = wire.wire_to_session_values(srec, sm.value_dtype, base, c["SESS_F_MIGRATED"])
        conf.vm_flags(skeys, svals["flags"], c["SESS_F_VM_LO"], c["SESS_F_VM_HI"])
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
    sp = plan_map(sm, est_k, est_v, concat_rows([dkeys, half_k]), scan=scans.get("sessions"))
    # a key already in `sessions` is in no other table (each round leaves it in one):
    # only the keys new there may have to leave `unassured`
    moved = est_k if big else sp.created_keys
    return [sp, plan_map(um, half_k, half_v, concat_rows([dkeys, moved]),
                         scan=scans.get("unassured"))]


def _syn_plan(fw: Firewall, vb: VerifiedBundle, base: int) -> MapPlan:
    m = fw.maps["syn_counters"]
    syn, dsyn = vb.sections["syn"], vb.sections["del_syn"]
    assert isinstance(syn, np.ndarray) and isinstance(dsyn, np.ndarray)
    keys, values = wire.wire_to_syn(syn, m.key_dtype, m.value_dtype, base)
    dkeys = np.zeros(len(dsyn), dtype=m.key_dtype)
    dkeys["src"] = dsyn["src"]
    dkeys["dst"] = dsyn["dst"]
    return plan_map(m, keys, values, dkeys)


def _ban_plan(
    fw: Firewall,
    vb: VerifiedBundle,
    base: int,
    now: int,
    conf: Confinement,
    skipped: dict[str, int],
) -> MapPlan:
    """Bans that ended in transit are skipped, the rest last at most this host's ban
    time and drop traffic towards the VM only (BL_F_VM_ONLY). A live ban of the same
    source made here (for any VM) or imported for another VM stays as it is, and a
    delete list removes only the VM's imported bans: a bundle acts on its own VM
    only, and never narrows this host's own bans."""
    m = fw.maps["blacklist"]
    vms = vb.vms
    bl, dbl = vb.sections["blacklist"], vb.sections["del_blacklist"]
    assert isinstance(bl, np.ndarray) and isinstance(dbl, np.ndarray)
    capped = bl["remaining_ms"] > np.uint32(min(conf.ban_ms, 0xFFFFFFFF))
    skipped["capped_bans"] = int(capped.sum())
    if capped.any():
        bl = bl.copy()
        bl["remaining_ms"] = np.minimum(bl["remaining_ms"], np.uint32(min(conf.ban_ms, 0xFFFFFFFF)))
    vm_only = np.uint32(fw.const("BL_F_VM_ONLY"))
    keys, values = wire.wire_to_blacklist(bl, m.key_dtype, m.value_dtype, base)
    values["flags"] = vm_only
    live = values["expires_ns"] > np.uint64(now)
    skipped["expired_bans"] = int((~live).sum())
    skipped["foreign_bans"] = skipped["local_bans"] = 0
    keys, values = keys[live], values[live]
    if len(keys):
        cur_k, cur_v = m.dump()
        if len(cur_k):
            f, pos = KeyIndex(cur_k).find(keys)
            cur_live = f & (cur_v["expires_ns"][pos] > now)
            local = cur_live & ((cur_v["flags"][pos] & vm_only) == 0)
            foreign = cur_live & ~local & ~vms.contains(cur_v["vm"][pos])
            skipped["foreign_bans"] = int(foreign.sum())
            skipped["local_bans"] = int(local.sum())
            keep = ~(foreign | local)
            keys, values = keys[keep], values[keep]
    dkeys = np.zeros(len(dbl), dtype=m.key_dtype)
    dkeys[:] = dbl["src"]
    return plan_map(
        m,
        keys,
        values,
        dkeys,
        keep_delete=lambda old: vms.contains(old["vm"]) & ((old["flags"] & vm_only) != 0),
    )


def _acl_rules(fw: Firewall, vb: VerifiedBundle) -> list[np.ndarray] | None:
    """Each address's rules the round installs, in the VM's address order (None: the
    round leaves them alone), each checked to fit before anything is written."""
    if not vb.bundle.has_acl:
        return None
    section = vb.sections["acl"]
    if isinstance(section, bytes):
        raise InvalidRecordError(
            "the bundle's ACL section is an opaque blob: this host installs ACL rule records"
        )
    out = []
    dtype = vm_rules_dtype(fw.layout)
    for i, ip in enumerate(vb.vms.ips):
        mine = addr_isin(section["vm"], vb.vms.addrs[i : i + 1])
        rules = wire.wire_to_rules(section[mine], dtype)
        try:
            check_vm_rules(fw, ip, rules)
        except AclError as exc:
            raise CapacityError(f"the ACL rules of {ip} cannot be installed: {exc}") from exc
        out.append(rules)
    return out


def _check_migration(records: ImportRecords, vb: VerifiedBundle) -> dict | None:
    """The bundle must fit what the journal holds of its migration; returns that."""
    b = vb.bundle
    mid = b.migration_id
    prev = records.meta(mid)
    if prev is None:
        return None
    if prev.get("status") == "aborted":
        raise MigrationConflict(f"migration {mid.hex()} was aborted here")
    if not b.vms.same_set(prev.get("vms") or []):
        raise MigrationConflict(
            f"migration {mid.hex()} was for VM {prev.get('vm')}, not {b.vm_label}"
        )
    if prev.get("source") != b.source:
        raise MigrationConflict(
            f"migration {mid.hex()} was started here by {prev.get('source')}, not {b.source}"
        )
    done = [int(r["seq"]) for r in prev["rounds"]]
    if b.seq in done:
        raise ReplayError(f"replay: bundle {mid.hex()}#{b.seq} was already accepted")
    if done and b.seq < max(done):
        raise ReplayError(f"stale: bundle {mid.hex()}#{b.seq} is older than accepted #{max(done)}")
    if "final_seq" in prev:
        raise MigrationConflict(
            f"migration {mid.hex()} already completed its final round #{prev['final_seq']}"
        )
    return prev


def confinement(fw: Firewall, vb: VerifiedBundle) -> Confinement:
    """Refuses a VM one of whose addresses is outside this host's protected prefixes
    (naming it); else what confines the bundle to its VM."""
    protected = list_protected(fw)
    inside = in_networks(vb.vms.addrs, protected)
    if not inside.all():
        shown = ", ".join(map(str, protected)) or "none"
        ip = vb.vms.ips[int((~inside).argmax())]
        raise NotProtectedError(
            f"VM {ip} is not in a protected prefix of this host (protected: {shown})"
        )
    ban_ms = int(fw.read_config()[fw.const("CFG_BAN_S")]) * 1000
    return Confinement(protected=protected, scope=vb.peer.vms, ban_ms=ban_ms)


@dataclass
class PickupPlan:
    """Each of the VM's addresses' pickup window: the key, what it held before."""

    keys: np.ndarray
    old: np.ndarray  # u64 deadline before the round (0 where there was none)
    had: np.ndarray  # bool: there was one


def _pickup_plan(fw: Firewall, vms: VmAddrs, opening: bool) -> PickupPlan:
    m = fw.maps["pickup"]
    keys = np.zeros(len(vms), dtype=m.key_dtype)
    keys[:] = vms.addrs
    old = np.zeros(len(vms), np.uint64)
    had = np.zeros(len(vms), bool)
    for i in range(len(vms)):
        value = m.lookup(keys[i : i + 1])
        if value is not None:
            old[i], had[i] = int(value), True
    new = int((~had).sum())
    if opening and new and m.count() + new > m.info.max_entries:
        raise CapacityError(f"no room in map pickup for the VM's {new} pickup windows")
    return PickupPlan(keys, old, had)


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
    if not 0 <= pickup_s <= MAX_PICKUP_S:  # also refuses nan
        raise ValueError(f"pickup_s must be within [0, {MAX_PICKUP_S:g}]")
    b = vb.bundle
    vms = b.vms
    mid = b.migration_id
    final = bool(b.flags & FLAG_FINAL)
    records = ImportRecords(state_dir)
    t0 = time.perf_counter()
    warnings: list[str] = []
    skipped: dict[str, int] = {}
    with import_lock(state_dir):
        done = recover_locked(fw, state_dir, replay)
        if done:
            warnings.append(f"recovered first: {done.describe()}")
        prev = _check_migration(records, vb)
        if replay is not None:
            replay.check(mid, b.seq)
        conf = confinement(fw, vb)
        if b.is_delta and prev is None:
            warnings.append("delta bundle without an earlier round of this migration here")
        pickup = pickup_s > 0 and final and (not b.is_delta or prev is not None)
        if pickup_s > 0 and final and not pickup:
            warnings.append("no pickup window: this migration loaded no state here before")

        # ---- plan (reads only) ----------------------------------------------------
        now = now_ns if now_ns is not None else time.monotonic_ns()
        wall = now_ms if now_ms is not None else int(time.time() * 1000)
        base = now - _elapsed_ns(vb, wall)
        plans = [
            *_session_plans(fw, vb, base, conf, skipped),
            _syn_plan(fw, vb, base),
            _ban_plan(fw, vb, base, now, conf, skipped),
        ]
        check_capacity(fw, plans)
        pm = fw.maps["pickup"]
        pick = _pickup_plan(fw, vms, pickup)
        pickup_until = now + int(pickup_s * 1e9) if pickup else 0
        acl_rules = _acl_rules(fw, vb)
        acl_old = (
            concat_rows([snapshot_vm_rules(fw, ip) for ip in vms.ips],
                        fw.maps["acl_rules"].value_dtype)
            if acl_rules is not None
            else None
        )
        t_plan = time.perf_counter()

        # ---- write-ahead: the undo record, durable before any map write -----------
        undo = undo_record(
            {p.name: p.undo() for p in plans}, vms.addrs, pick.old, pick.had, pickup, acl_old
        )
        try:
            records.begin_round(mid, b.seq, undo)
        except OSError as exc:
            records.drop_inflight()
            raise StateDirError(f"cannot write the undo record: {exc.strerror or exc}") from exc
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
            if pickup:
                for i in range(len(vms)):
                    pm.update(pick.keys[i : i + 1], np.array([pickup_until], np.uint64))
            step += 1
            if acl_rules is not None:  # each address's rules: one atomic reload each
                for ip, rules in zip(vms.ips, acl_rules, strict=True):
                    replace_vm_rules(fw, ip, rules)
        except BaseException as exc:  # Ctrl-C mid-load too: leave nothing half-written
            _rollback(fw, records, undo, exc, steps=step)
        t_write = time.perf_counter()

        counts = {
            "sessions": len(plans[0].write_keys),
            "unassured": len(plans[1].write_keys),
            "syn_counters": len(plans[2].write_keys),
            "blacklist": len(plans[3].write_keys),
            "acl_rules": sum(map(len, acl_rules)) if acl_rules is not None else 0,
        }
        # ---- the commit point, then the replay entry --------------------------------
        info = {"vm": vms.label, "vms": list(vms.ips), "source": b.source, "kind": b.kind,
                "expires_at_ms": b.expires_at_ms}
        try:
            records.commit_round(mid, b.seq, info, counts, final)
        except BaseException as exc:  # e.g. a full disk: the round did not happen
            _rollback(fw, records, undo, exc, steps=None)
        warnings.extend(_after_commit(records, replay, mid, b.seq, b.expires_at_ms))
    return ImportResult(
        migration_id=mid.hex(),
        seq=b.seq,
        vms=list(vms.ips),
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


def _rollback(
    fw: Firewall,
    records: ImportRecords,
    undo: dict[str, np.ndarray],
    exc: BaseException,
    steps: int | None,
) -> NoReturn:
    """Undoes a round that failed before its commit point, then re-raises (as
    ImportFailed for errors; interruptions as they are)."""
    _, errors = apply_undo(fw, undo, steps=steps)
    if not errors:
        try:
            records.drop_inflight()
        except OSError:
            pass  # the next recovery applies the (idempotent) undo again and drops it
    if not isinstance(exc, Exception):
        raise exc
    if errors:
        raise RollbackIncomplete(
            f"import failed ({exc}) and rollback failed too: {'; '.join(errors)}"
        ) from exc
    raise ImportFailed(f"import failed and was rolled back: {exc}") from exc


def _after_commit(
    records: ImportRecords, replay: ReplayCache | None, mid: bytes, seq: int, expires: int
) -> list[str]:
    """The replay entry and the undo record's final place. Neither can undo the
    committed round: if one fails, recovery completes it later."""
    try:
        if replay is not None:
            replay.record(mid, seq, expires)
        records.settle_inflight(mid, seq)
    except (OSError, StateDirError) as exc:
        return [f"round committed; bookkeeping left to the next recovery ({exc})"]
    return []


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
    vb = verify_bundle(data, trust, host_id, replay_cache, limits=record_limits(fw))
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
    source: str | None = None,
) -> dict[str, int]:
    """Removes exactly what a migration imported here (every round), restores what
    it overwrote, and refuses any later bundle of that migration. `source`, when
    given, is the peer asking: only the migration's source may abort it."""
    mid = bytes.fromhex(migration_id) if isinstance(migration_id, str) else migration_id
    records = ImportRecords(state_dir)
    with import_lock(state_dir):
        own_replay = replay is None
        rc = replay or ReplayCache(state_dir)
        try:
            recover_locked(fw, state_dir, rc)
            meta = records.meta(mid)
            if meta is None:
                raise UnknownMigrationError(f"no import of migration {mid.hex()} in {state_dir}")
            if source is not None and meta.get("source") != source:
                raise ControlError(
                    f"migration {mid.hex()} was started by {meta.get('source')}: "
                    f"{source} may not abort it"
                )
            rc.close_migration(mid)
        finally:
            if own_replay:
                rc.close()
        if meta.get("status") == "aborted":
            return {}
        records.begin_abort(mid)
        return undo_migration(fw, records, mid)
