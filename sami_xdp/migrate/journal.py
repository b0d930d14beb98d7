"""The import journal: what each migration imported on this host, written so that a
crash at any instant leaves either the previous state or the whole round.

State dir layout (default /var/lib/samixdp):

    import.lock                 flock: one import, abort or recovery at a time
    inflight.npz                the round being loaded: its (migration, seq) and
                                its undo record, durable before any map write
    abort.inflight              the migration being aborted (its id in hex)
    .tmp/                       temp files of atomic writes (removed by recovery)
    migrations/<mid>/meta.json  vm (its addresses on one line), vms (the list),
                                source, status, committed rounds
    migrations/<mid>/undo-<seq>.npz   the undo record of each committed round

One round: `begin_round` makes inflight.npz durable, the maps are written,
then `commit_round` records the round in meta.json (the commit point: an
atomic rename) and moves the undo record into the migration's directory. A
round is committed if and only if meta.json lists it; recovery (recovery.py)
undoes an inflight round that is not, and finishes one that is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StateDirError
from .keys import one_line

MIGRATIONS_DIR = "migrations"
LOCK_FILE = "import.lock"
INFLIGHT_FILE = "inflight.npz"
ABORT_FILE = "abort.inflight"
TMP_DIR = ".tmp"
MAX_META_FILE = 16 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImportRecords:
    """The journal of one state dir (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / MIGRATIONS_DIR
        self.tmp = state_dir / TMP_DIR
        self.inflight_path = state_dir / INFLIGHT_FILE
        self.abort_path = state_dir / ABORT_FILE

    # ---- durable files ------------------------------------------------------------------

    def _tmpfile(self, suffix: str) -> tuple[int, Path]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=suffix, dir=self.tmp)
        return fd, Path(name)

    def _durable(self, path: Path, write: Any, suffix: str) -> None:
        """write(fh) to a temp file, fsync, rename over `path`, fsync its dir: the
        file is old or new after a crash, never half. Raises before the rename
        leave `path` as it was."""
        fd, tmp = self._tmpfile(suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # the rename is the decision; a failing directory fsync (an I/O error) must not
        # make a caller undo what other processes may already see as done
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)

    def _write_meta(self, mid: bytes, meta: dict[str, Any]) -> None:
        data = (json.dumps(meta, indent=2) + "\n").encode()
        self._durable(self.dir(mid) / "meta.json", lambda fh: fh.write(data), ".json")

    # ---- reading ------------------------------------------------------------------------

    def dir(self, mid: bytes) -> Path:
        return self.root / mid.hex()

    def meta(self, mid: bytes) -> dict[str, Any] | None:
        p = self.dir(mid) / "meta.json"
        if not p.exists():
            return None
        return _read_meta(p)

    def committed(self, mid: bytes) -> list[int]:
        meta = self.meta(mid)
        return [int(r["seq"]) for r in meta["rounds"]] if meta else []

    def undo_path(self, mid: bytes, seq: int) -> Path:
        return self.dir(mid) / f"undo-{seq:010d}.npz"

    def undo_files(self, mid: bytes) -> list[Path]:
        """The undo records of the committed rounds, newest first."""
        paths = [self.undo_path(mid, s) for s in sorted(self.committed(mid), reverse=True)]
        return [p for p in paths if p.exists()]

    def list(self) -> list[dict[str, Any]]:
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise StateDirError(f"the state dir {self.state_dir} is not a directory")
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            p = d / "meta.json"
            if d.is_dir() and p.exists():
                out.append(_read_meta(p))
        return out

    # ---- one round ----------------------------------------------------------------------

    def begin_round(self, mid: bytes, seq: int, undo: dict[str, np.ndarray]) -> None:
        """Makes the round's undo record durable as inflight.npz (before any map write)."""
        rec = {
            **undo,
            "journal.mid": np.frombuffer(mid, np.uint8),
            "journal.seq": np.array([seq], np.uint64),
        }
        self._durable(self.inflight_path, lambda fh: np.savez(fh, **rec), ".npz")  # type: ignore[arg-type]

    def commit_round(
        self, mid: bytes, seq: int, info: dict[str, Any], counts: dict[str, int], final: bool
    ) -> None:
        """The commit point: meta.json lists the round. (`settle_inflight` then moves
        the undo record next to it; recovery does that if a crash comes first.)"""
        meta = self.meta(mid) or {
            "migration_id": mid.hex(),
            "vm": info["vm"],
            "vms": info["vms"],
            "source": info["source"],
            "status": "active",
            "rounds": [],
        }
        meta["rounds"].append(
            {**info, "seq": seq, "status": "committed", "at": time.time(), "counts": counts}
        )
        if final:
            meta["final_seq"] = seq
        self._write_meta(mid, meta)

    def settle_inflight(self, mid: bytes, seq: int) -> None:
        """After the commit (and the replay entry): the inflight undo record becomes
        the round's."""
        if self.inflight_path.exists():
            os.replace(self.inflight_path, self.undo_path(mid, seq))
            fsync_dir(self.dir(mid))
            fsync_dir(self.state_dir)

    def drop_inflight(self) -> None:
        """After a rollback (or a recovery undo): forget the round."""
        self.inflight_path.unlink(missing_ok=True)
        fsync_dir(self.state_dir)

    def inflight(self) -> dict[str, np.ndarray] | None:
        """The undo record of a round that was being loaded, if any."""
        if not self.inflight_path.exists():
            return None
        return read_npz(self.inflight_path)

    # ---- abort ----------------------------------------------------------------------------

    def begin_abort(self, mid: bytes) -> None:
        self._durable(self.abort_path, lambda fh: fh.write(mid.hex().encode()), ".abort")

    def aborting(self) -> bytes | None:
        if not self.abort_path.exists():
            return None
        try:
            mid = bytes.fromhex(self.abort_path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise StateDirError(f"cannot read {self.abort_path}: {one_line(exc)}") from exc
        if len(mid) != 16:
            raise StateDirError(f"{self.abort_path} does not hold a migration id")
        return mid

    def mark_aborted(self, mid: bytes, counts: dict[str, int]) -> None:
        meta = self.meta(mid) or {"migration_id": mid.hex(), "rounds": []}
        meta["status"] = "aborted"
        meta["abort"] = {"at": time.time(), "counts": counts}
        self._write_meta(mid, meta)
        for p in self.dir(mid).glob("undo-*.npz"):
            p.unlink()
        self.abort_path.unlink(missing_ok=True)
        fsync_dir(self.state_dir)

    # ---- housekeeping ---------------------------------------------------------------------

    def clean_tmp(self) -> int:
        """Removes temp files left by a crash (only under the import lock)."""
        if not self.tmp.is_dir():
            return 0
        n = 0
        for entry in self.tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            n += 1
        return n


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise StateDirError(f"cannot read the undo record {path}: {one_line(exc)}") from exc


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_META_FILE:
            raise ValueError(f"larger than {MAX_META_FILE} bytes")
        doc = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise StateDirError(f"cannot read the import record {path}: {one_line(exc)}") from exc
    rounds = doc.get("rounds") if isinstance(doc, dict) else None
    vms = doc.get("vms", []) if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("vm"), str | None)
        or not isinstance(vms, list)
        or not all(isinstance(v, str) for v in vms)
        or not isinstance(rounds, list)
        or not all(isinstance(r, dict) and isinstance(r.get("seq"), int) for r in rounds)
    ):
        raise StateDirError(f"the import record {path} is malformed")
    return doc


@contextlib.contextmanager
def import_lock(state_dir: Path, wait: bool = True) -> Iterator[bool]:
    """Serialises imports, aborts and recovery of all processes using one state dir.
    Yields False (holding nothing) when `wait` is False and another process has it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateDirError(f"cannot use the state dir {state_dir}: {one_line(exc)}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
