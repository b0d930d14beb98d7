"""What each migration imported on this host, so it can be undone: per migration
id a meta.json and one undo file per round in the state dir, written ahead of the
map writes (fsync'd), and the undo itself, shared by rollback and abort."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..base.netutil import be32_to_ip
from ..loader.pinned import Firewall
from ..policy.acl import restore_vm_rules

MIGRATIONS_DIR = "migrations"
LOCK_FILE = "import.lock"
# the map writes of one round, in order (then the pickup window, then the ACL)
MAP_ORDER = ("sessions", "unassured", "syn_counters", "blacklist")
UNDO_STEPS = (*MAP_ORDER, "pickup", "acl")


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
    """Serialises imports of all processes using one state dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---- undo records (rollback and abort share them) ----------------------------------------


def undo_record(
    plans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    pickup_old: np.ndarray | None,
    pickup_touched: bool,
    acl_old: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The undo file's arrays. `plans`: map name -> (keys created, keys overwritten
    or deleted, their old values); `acl_old`: the VM's rule entries before the
    round, None when the round leaves the ACL alone."""
    rec: dict[str, np.ndarray] = {}
    for name, (created, old_keys, old_values) in plans.items():
        rec[f"{name}.created"] = created
        rec[f"{name}.old_keys"] = old_keys
        rec[f"{name}.old_values"] = old_values
    rec["pickup_touched"] = np.array([1 if pickup_touched else 0], np.uint8)
    rec["pickup_old"] = pickup_old if pickup_old is not None else np.zeros(0, np.uint64)
    rec["acl_touched"] = np.array([0 if acl_old is None else 1], np.uint8)
    if acl_old is not None:
        rec["acl_old"] = acl_old
    return rec


def read_undo(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def apply_undo(
    fw: Firewall, vm: int, undo: dict[str, np.ndarray], steps: int | None = None
) -> tuple[dict[str, int], list[str]]:
    """Deletes created keys and restores old values; returns (counts, errors).

    `steps` limits the undo to the first N steps of UNDO_STEPS (rollback of a
    partial import); None undoes everything (abort). A step that fails does not
    stop the others."""
    counts: dict[str, int] = {}
    errors: list[str] = []
    todo = UNDO_STEPS if steps is None else UNDO_STEPS[:steps]
    for step in reversed(todo):
        try:
            if step == "acl":
                if int(undo.get("acl_touched", np.zeros(1))[0]):
                    restore_vm_rules(fw, be32_to_ip(vm), undo["acl_old"])
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
