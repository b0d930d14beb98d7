"""Loading a verified bundle into the maps: all or nothing, and undoable later.

Steps (under an exclusive lock in the state dir, so concurrent imports do not
race each other's capacity checks):

1. Plan, reading only: rebase ages on the local CLOCK_MONOTONIC, split
   sessions into `halfopen` (TCP SYN_SENT/SYN_RECV) and `sessions`, dump each
   touched map once (its fill level and the current values of every key we
   will overwrite or delete), and refuse if a map lacks room. The session
   maps are read while the records are converted, keeping only the VM's
   rows (every key of a verified bundle has the VM at one end).
2. Consume (migration id, seq) in the replay cache (durable).
3. Write the undo record to the state dir (write-ahead, fsync'd): keys this
   round creates, and the old values of keys it overwrites or deletes.
4. Write with batch updates, map by map. Any failure rolls back every step
   from the undo record (delete created keys, put old values back) and
   raises ImportFailed; the undo record is then removed.

`abort_import(migration_id)` replays the undo records of every round of a
migration in reverse order, so exactly what that migration wrote goes away
and what it overwrote comes back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..loader.bpfsys import KeepFn, ScanResult
from ..loader.pinned import Firewall, PinnedMap, possible_cpus
from ..netutil import be32_to_ip
from ..parallel import run_parallel
from ..protect import is_protected
from . import wire
from .acl_bridge import AclHooks, AclToken, default_acl_hooks, wire_to_rules
from .errors import (
    BundleRefused,
    CapacityError,
    ImportFailed,
    RollbackIncomplete,
    UnknownMigrationError,
)
from .keys import TrustStore
from .replay import ReplayCache
from .select import involves, scan_map
from .verify import VerifiedBundle, verify_bundle

DEFAULT_PICKUP_S = 10.0
LRU_HEADROOM_PER_CPU = 128  # LRU maps may evict before they are full (per-CPU free lists)
MAP_ORDER = ("sessions", "halfopen", "syn_counters", "blacklist")
PARALLEL_WRITE_MIN = 1 << 17  # batch writes at least this large use several threads
WRITE_SUB_BATCH = 1 << 16  # each thread writes in sub-batches, so a failure stops it soon
MIGRATIONS_DIR = "migrations"
LOCK_FILE = "import.lock"


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


# ---- per-map plan -------------------------------------------------------------------


@dataclass
class MapPlan:
    name: str
    write_keys: np.ndarray
    write_values: np.ndarray
    delete_keys: np.ndarray  # present now, to remove
    created_keys: np.ndarray  # written, absent before
    old_keys: np.ndarray  # present before and overwritten or deleted
    old_values: np.ndarray

    @property
    def empty(self) -> bool:
        return not len(self.write_keys) and not len(self.delete_keys)


def _empty(dtype: np.dtype) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


def plan_map(
    m: PinnedMap,
    write_keys: np.ndarray,
    write_values: np.ndarray,
    delete_keys: np.ndarray,
    keep_delete: object | None = None,
    scan: ScanResult | None = None,
) -> tuple[MapPlan, int]:
    """Snapshot what the writes/deletes touch; returns (plan, fill level afterwards).

    `scan`, when given, is the map already read with a row filter that every
    write and delete key passes (`_Snapshot`): its kept rows stand for the
    map's content and its `scanned` count for the fill level."""
    if not len(write_keys) and not len(delete_keys):
        e = _empty(m.key_dtype)
        return MapPlan(m.name, e, _empty(m.value_dtype), e, e, e, _empty(m.value_dtype)), 0
    if scan is None:
        dk, dv = m.dump()
        fill = len(dk)
    else:
        dk, dv, fill = scan.keys, scan.values, scan.scanned
    if len(dk):
        idx = wire.KeyIndex(dk)
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
    del_keys, del_old = dk[del_pos], dv[del_pos]
    if keep_delete is not None and len(del_keys):
        ok = keep_delete(del_old)  # type: ignore[operator]
        del_keys, del_old = del_keys[ok], del_old[ok]
    # duplicate keys in a bundle only make the fill estimate pessimistic
    created = wire.take_rows(write_keys, ~wf) if wf.any() else write_keys
    plan = MapPlan(
        name=m.name,
        write_keys=write_keys,
        write_values=write_values,
        delete_keys=del_keys,
        created_keys=created,
        old_keys=np.concatenate([write_keys[wf], del_keys]),
        old_values=np.concatenate([dv[wpos[wf]], del_old]),
    )
    return plan, fill - len(del_keys) + len(created)


def _vm_filter(vm: int, *records: np.ndarray) -> KeepFn | None:
    """`involves(vm)` if every record given (session keys or wire records) has
    the VM at one end, as verified bundles guarantee: then a session map's other
    rows cannot matter to the plan. Else None (read everything)."""
    v = np.uint32(vm)
    for r in records:
        if len(r) and not ((r["addr_lo"] == v) | (r["addr_hi"] == v)).all():
            return None
    return involves(vm)


class _Snapshot:
    """Both session maps read (rows passing `only`, and the fill levels) by a
    background thread, so the reads overlap the conversion of the records."""

    def __init__(self, fw: Firewall, only: KeepFn) -> None:
        self._out: dict[str, ScanResult] = {}
        self._error: BaseException | None = None

        def run() -> None:
            try:
                for name in ("sessions", "halfopen"):
                    self._out[name] = scan_map(fw.maps[name], only)
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


def update_many(m: PinnedMap, keys: np.ndarray, values: np.ndarray) -> int:
    """`m.update_many`, by several threads for large batches (the kernel's
    bucket locks keep them apart). Every thread is waited for, whatever
    happens (Ctrl-C too), before the first failure is re-raised: a rollback
    never races a writer."""
    workers = min(4, os.cpu_count() or 1, len(keys) // (PARALLEL_WRITE_MIN // 2))
    if workers <= 1 or len(keys) < PARALLEL_WRITE_MIN:
        return m.update_many(keys, values)
    stop = threading.Event()
    done = [0] * workers
    bounds = [len(keys) * i // workers for i in range(workers + 1)]

    def run(i: int) -> None:
        for lo in range(bounds[i], bounds[i + 1], WRITE_SUB_BATCH):
            if stop.is_set():
                return
            hi = min(lo + WRITE_SUB_BATCH, bounds[i + 1])
            done[i] += m.update_many(keys[lo:hi], values[lo:hi])

    run_parallel(workers, run, on_error=stop.set)
    return sum(done)


def _capacity(m: PinnedMap) -> int:
    cap = m.info.max_entries
    if m.info.type_name == "lru_hash":
        cap -= min(cap // 4, LRU_HEADROOM_PER_CPU * possible_cpus())
    return cap


# ---- records of what each migration imported ----------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_json(path: Path, doc: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".meta.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ImportRecords:
    """Per migration id: meta.json plus one undo file per round (state dir)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / MIGRATIONS_DIR

    def dir(self, mid: bytes) -> Path:
        return self.root / mid.hex()

    def meta(self, mid: bytes) -> dict | None:
        p = self.dir(mid) / "meta.json"
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def _save_meta(self, mid: bytes, meta: dict) -> None:
        _atomic_json(self.dir(mid) / "meta.json", meta)

    def begin_round(self, mid: bytes, seq: int, info: dict, undo: dict[str, np.ndarray]) -> Path:
        d = self.dir(mid)
        d.mkdir(parents=True, exist_ok=True)
        meta = self.meta(mid) or {
            "migration_id": mid.hex(),
            "vm": info["vm"],
            "source": info["source"],
            "status": "active",
            "rounds": [],
        }
        path = d / f"undo-{seq:010d}.npz"
        fd, tmp = tempfile.mkstemp(prefix=".undo.", suffix=".npz", dir=d)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **undo)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        meta["rounds"].append({**info, "seq": seq, "status": "pending", "at": time.time()})
        self._save_meta(mid, meta)
        return path

    def end_round(self, mid: bytes, seq: int, ok: bool, counts: dict | None = None) -> None:
        meta = self.meta(mid)
        if meta is None:
            return
        if ok:
            for r in meta["rounds"]:
                if r["seq"] == seq:
                    r["status"] = "committed"
                    r["counts"] = counts or {}
        else:
            meta["rounds"] = [r for r in meta["rounds"] if r["seq"] != seq]
            (self.dir(mid) / f"undo-{seq:010d}.npz").unlink(missing_ok=True)
        self._save_meta(mid, meta)

    def undo_files(self, mid: bytes) -> list[Path]:
        return sorted(self.dir(mid).glob("undo-*.npz"), reverse=True)

    def mark_aborted(self, mid: bytes, counts: dict) -> None:
        meta = self.meta(mid) or {"migration_id": mid.hex(), "rounds": []}
        meta["status"] = "aborted"
        meta["abort"] = {"at": time.time(), "counts": counts}
        self._save_meta(mid, meta)
        for p in self.undo_files(mid):
            p.unlink()

    def list(self) -> list[dict]:
        if not self.root.exists():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            p = d / "meta.json"
            if p.exists():
                out.append(json.loads(p.read_text()))
        return out


@contextlib.contextmanager
def import_lock(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---- undo (rollback and abort share it) ------------------------------------------------------


def _pack_token(token: AclToken) -> dict[str, np.ndarray]:
    if token is None:
        return {"acl_kind": np.array([0], np.uint8)}
    if isinstance(token, bytes):
        return {"acl_kind": np.array([1], np.uint8), "acl_token": np.frombuffer(token, np.uint8)}
    return {"acl_kind": np.array([2], np.uint8), "acl_token": token}


def _unpack_token(undo: dict[str, np.ndarray]) -> AclToken:
    kind = int(undo["acl_kind"][0])
    if kind == 0:
        return None
    if kind == 1:
        return undo["acl_token"].tobytes()
    return undo["acl_token"]


def _undo_record(
    plans: list[MapPlan],
    pickup_touched: bool,
    pickup_old: np.ndarray | None,
    acl_token: AclToken | None,
    acl_touched: bool,
) -> dict[str, np.ndarray]:
    rec: dict[str, np.ndarray] = {}
    for p in plans:
        rec[f"{p.name}.created"] = p.created_keys
        rec[f"{p.name}.old_keys"] = p.old_keys
        rec[f"{p.name}.old_values"] = p.old_values
    rec["pickup_touched"] = np.array([1 if pickup_touched else 0], np.uint8)
    rec["pickup_old"] = pickup_old if pickup_old is not None else np.zeros(0, np.uint64)
    rec["acl_touched"] = np.array([1 if acl_touched else 0], np.uint8)
    if acl_touched:
        rec.update(_pack_token(acl_token))
    return rec


def apply_undo(
    fw: Firewall,
    vm: int,
    undo: dict[str, np.ndarray],
    acl: AclHooks | None,
    steps: int | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Deletes created keys and restores old values; returns (counts, errors).

    `steps` limits the undo to the first N write steps (rollback of a
    partial import); None undoes everything (abort)."""
    counts: dict[str, int] = {}
    errors: list[str] = []
    order = [*MAP_ORDER, "pickup", "acl"]
    todo = order if steps is None else order[:steps]
    for step in reversed(todo):
        try:
            if step == "acl":
                if int(undo.get("acl_touched", np.zeros(1))[0]):
                    assert acl is not None
                    acl.put_back(fw, be32_to_ip(vm), _unpack_token(undo))
                    counts["acl"] = 1
            elif step == "pickup":
                if int(undo.get("pickup_touched", np.zeros(1))[0]):
                    key = np.array([vm], dtype=np.uint32)
                    old = undo["pickup_old"]
                    if len(old):
                        fw.maps["pickup"].update(key, old[:1])
                    else:
                        fw.maps["pickup"].delete(key)
            else:
                m = fw.maps[step]
                created = undo.get(f"{step}.created")
                if created is not None and len(created):
                    counts[f"{step}.removed"] = m.delete_many(created.astype(m.key_dtype))
                old_k = undo.get(f"{step}.old_keys")
                if old_k is not None and len(old_k):
                    old_v = undo[f"{step}.old_values"]
                    m.update_many(old_k.astype(m.key_dtype), old_v.astype(m.value_dtype))
                    counts[f"{step}.restored"] = len(old_k)
        except Exception as exc:  # keep undoing the other steps
            errors.append(f"{step}: {exc}")
    return counts, errors


# ---- the import itself ----------------------------------------------------------------------


def _elapsed_ns(vb: VerifiedBundle, now_ms: int) -> int:
    """Time since export by the wall clocks (transit + queueing), within the validity."""
    b = vb.bundle
    ms = min(max(now_ms - b.issued_at_ms, 0), b.expires_at_ms - b.issued_at_ms)
    return ms * wire.NS_PER_MS


def import_vm_state(
    fw: Firewall,
    vb: VerifiedBundle,
    state_dir: Path,
    *,
    replay: ReplayCache | None = None,
    pickup_s: float = DEFAULT_PICKUP_S,
    acl: AclHooks | None = None,
    now_ns: int | None = None,
    now_ms: int | None = None,
) -> ImportResult:
    """Loads a verified bundle: all entries or none. See the module docstring."""
    b = vb.bundle
    vm = b.vm
    vm_ip = b.vm_ip
    mid = b.migration_id
    sec = vb.sections
    records = ImportRecords(state_dir)
    t0 = time.perf_counter()
    warnings: list[str] = []
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
        c = fw.layout.consts
        mig_flag = c["SESS_F_MIGRATED"]
        sm, hm = fw.maps["sessions"], fw.maps["halfopen"]
        srec = sec["sessions"]
        dsess = sec["del_sessions"]
        assert isinstance(srec, np.ndarray) and isinstance(dsess, np.ndarray)
        # the session maps' snapshot is read while the records are converted
        only = _vm_filter(vm, srec, dsess)
        snap = _Snapshot(fw, only) if only is not None and (len(srec) or len(dsess)) else None
        try:
            half = (srec["proto"] == 6) & (
                (srec["state"] == c["ST_SYN_SENT"]) | (srec["state"] == c["ST_SYN_RECV"])
            )
            skeys = wire.wire_to_session_keys(srec, sm.key_dtype)
            svals = wire.wire_to_session_values(srec, sm.value_dtype, base, mig_flag)
            dkeys = wire.wire_to_session_keys(dsess, sm.key_dtype)
            if half.any():
                est_k, est_v = wire.take_rows(skeys, ~half), wire.take_rows(svals, ~half)
                half_k, half_v = wire.take_rows(skeys, half), wire.take_rows(svals, half)
            else:  # the usual case: nothing half-open, no copies
                est_k, est_v, half_k, half_v = skeys, svals, skeys[:0], svals[:0]
            scans = snap.result() if snap is not None else {}
        finally:
            if snap is not None:
                snap.join()
        plans: list[MapPlan] = []
        fills: dict[str, int] = {}
        p, fills["sessions"] = plan_map(
            sm, est_k, est_v, wire.concat_rows([dkeys, half_k]), scan=scans.get("sessions")
        )
        plans.append(p)
        p, fills["halfopen"] = plan_map(
            hm, half_k, half_v, wire.concat_rows([dkeys, est_k]), scan=scans.get("halfopen")
        )
        plans.append(p)

        syn_m = fw.maps["syn_counters"]
        syn = sec["syn"]
        assert isinstance(syn, np.ndarray)
        syn_k, syn_v = wire.wire_to_syn(syn, syn_m.key_dtype, syn_m.value_dtype, base)
        dsyn = sec["del_syn"]
        assert isinstance(dsyn, np.ndarray)
        dsyn_k = np.zeros(len(dsyn), dtype=syn_m.key_dtype)
        dsyn_k["src"], dsyn_k["dst"] = dsyn["src"], dsyn["dst"]
        p, fills["syn_counters"] = plan_map(syn_m, syn_k, syn_v, dsyn_k)
        plans.append(p)

        bl_m = fw.maps["blacklist"]
        bl = sec["blacklist"]
        assert isinstance(bl, np.ndarray)
        bl_k, bl_v = wire.wire_to_blacklist(bl, bl_m.key_dtype, bl_m.value_dtype, base)
        live = bl_v["expires_ns"] > np.uint64(now)
        skipped = {"expired_bans": int((~live).sum()), "foreign_bans": 0}
        bl_k, bl_v = bl_k[live], bl_v[live]
        if len(bl_k):  # a live ban of the same source for another VM stays as it is
            cur_k, cur_v = bl_m.dump()
            if len(cur_k):
                f, pos = wire.KeyIndex(cur_k).find(bl_k)
                foreign = f & (cur_v["vm"][pos] != vm) & (cur_v["expires_ns"][pos] > now)
                skipped["foreign_bans"] = int(foreign.sum())
                bl_k, bl_v = bl_k[~foreign], bl_v[~foreign]
        dbl = sec["del_blacklist"]
        assert isinstance(dbl, np.ndarray)
        p, fills["blacklist"] = plan_map(
            bl_m,
            bl_k,
            bl_v,
            np.asarray(dbl["src"], dtype=bl_m.key_dtype),
            keep_delete=lambda old: old["vm"] == vm,
        )
        plans.append(p)

        for plan in plans:
            m = fw.maps[plan.name]
            cap = _capacity(m)
            if not plan.empty and fills[plan.name] > cap:
                raise CapacityError(
                    f"not enough room in map {plan.name}: {fills[plan.name]} entries needed "
                    f"after import, capacity {cap} (of {m.info.max_entries})"
                )
        pm = fw.maps["pickup"]
        pkey = np.array([vm], dtype=np.uint32)
        pickup_old = pm.lookup(pkey)
        pickup_until = now + int(pickup_s * 1e9) if pickup_s > 0 else 0
        if pickup_s > 0 and pickup_old is None and pm.count() >= pm.info.max_entries:
            raise CapacityError("no room in map pickup for the VM's pickup window")

        hooks = None
        acl_token: AclToken = None
        acl_rules: np.ndarray | bytes = b""
        if b.has_acl:
            hooks = acl or default_acl_hooks()
            rules = sec["acl"]
            acl_rules = rules if isinstance(rules, bytes) else wire_to_rules(rules)
            if hooks.check is not None:
                try:
                    hooks.check(fw, vm_ip, acl_rules)
                except Exception as exc:
                    raise CapacityError(f"the VM's ACL rules cannot be installed: {exc}") from exc
            acl_token = hooks.take_snapshot(fw, vm_ip)
        t_plan = time.perf_counter()

        # ---- commit point ---------------------------------------------------------
        if replay is not None:
            replay.consume(mid, b.seq, b.expires_at_ms)
        old_pickup = np.array([pickup_old], np.uint64) if pickup_old is not None else None
        undo = _undo_record(plans, pickup_s > 0, old_pickup, acl_token, b.has_acl)
        info = {"vm": vm_ip, "source": b.source, "kind": b.kind}
        records.begin_round(mid, b.seq, info, undo)
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
                    update_many(m, plan.write_keys, plan.write_values)
                    if plan.name == "blacklist":
                        fw.set_bans_hint(True)  # the datapath checks bans only when set
            step += 1
            if pickup_s > 0:
                pm.update(pkey, np.array([pickup_until], np.uint64))
            step += 1
            if b.has_acl:
                assert hooks is not None
                hooks.replace(fw, vm_ip, acl_rules)
        except BaseException as exc:  # Ctrl-C mid-load too: leave nothing half-written
            undone, errors = apply_undo(fw, vm, undo, hooks, steps=step)
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
            "halfopen": len(plans[1].write_keys),
            "syn_counters": len(plans[2].write_keys),
            "blacklist": len(plans[3].write_keys),
            "acl_rules": (
                len(sec["acl"]) if b.has_acl and isinstance(sec["acl"], np.ndarray) else 0
            ),
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
    acl: AclHooks | None = None,
) -> ImportResult:
    """Verify then import one bundle (the receiving side of a migration round).

    The state dir (undo records, import lock) defaults to the replay cache's."""
    t0 = time.perf_counter()
    vb = verify_bundle(data, trust, host_id, replay_cache)
    t1 = time.perf_counter()
    res = import_vm_state(
        fw,
        vb,
        state_dir or replay_cache.state_dir,
        replay=replay_cache,
        pickup_s=pickup_s,
        acl=acl,
    )
    res.timings = {"verify_s": t1 - t0, **res.timings, "receive_total_s": time.perf_counter() - t0}
    return res


def abort_import(
    fw: Firewall,
    migration_id: bytes | str,
    state_dir: Path,
    *,
    acl: AclHooks | None = None,
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
    from ..netutil import ip_to_be32

    vm = ip_to_be32(meta["vm"])
    totals: dict[str, int] = {}
    errors: list[str] = []
    with import_lock(state_dir):
        hooks = None
        for path in records.undo_files(mid):
            with np.load(path, allow_pickle=False) as z:
                undo = {k: z[k] for k in z.files}
            if int(undo.get("acl_touched", np.zeros(1))[0]) and hooks is None:
                hooks = acl or default_acl_hooks()
            counts, errs = apply_undo(fw, vm, undo, hooks)
            errors.extend(errs)
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
        if errors:
            raise RollbackIncomplete(f"abort of {mid.hex()} incomplete: {'; '.join(errors)}")
        records.mark_aborted(mid, totals)
    return totals
