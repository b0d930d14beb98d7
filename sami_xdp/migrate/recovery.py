"""Crash recovery of the import journal (journal.py).

After a kill -9 (or power loss) of a process that was importing or aborting, the
next agent start or state-changing command runs `recover`: under the import lock
(so never while a live process is still working), it

* undoes an inflight round that did not commit (the maps return to exactly their
  state before the round), or finishes one that did (its undo record moves next
  to it and its replay entry is recorded);
* finishes an interrupted abort (undo is idempotent, so it simply runs again);
* removes the temp files of interrupted atomic writes.

Nothing is left for an operator to do by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..loader.pinned import Firewall
from .errors import RollbackIncomplete
from .journal import ImportRecords, import_lock, read_npz
from .replay import ReplayCache
from .undo import apply_undo


@dataclass
class Recovery:
    """What one recovery did (empty when there was nothing to do)."""

    undone: list[str] = field(default_factory=list)  # "mid#seq" rolled back
    finished: list[str] = field(default_factory=list)  # "mid#seq" found committed
    aborted: list[str] = field(default_factory=list)  # migrations whose abort finished
    temp_files: int = 0

    def __bool__(self) -> bool:
        return bool(self.undone or self.finished or self.aborted or self.temp_files)

    def describe(self) -> str:
        parts = [f"rolled back the interrupted round {r}" for r in self.undone]
        parts += [f"completed the committed round {r}" for r in self.finished]
        parts += [f"finished the abort of {m}" for m in self.aborted]
        if self.temp_files:
            parts.append(f"removed {self.temp_files} temp files")
        return "; ".join(parts)


def needs_recovery(state_dir: Path) -> bool:
    """Cheap test (a few stat calls) run before taking the lock."""
    r = ImportRecords(state_dir)
    return r.inflight_path.exists() or r.abort_path.exists() or any(r.tmp.glob("*"))


def recover(fw: Firewall, state_dir: Path, *, wait: bool = False) -> Recovery:
    """Recovers the state dir if a crash left work behind. With `wait` False it does
    nothing while another live process holds the import lock (that process is not
    dead: its round will end one way or the other)."""
    if not state_dir.is_dir() or not needs_recovery(state_dir):
        return Recovery()
    with import_lock(state_dir, wait=wait) as held:
        if not held:
            return Recovery()
        return recover_locked(fw, state_dir)


def undo_migration(fw: Firewall, records: ImportRecords, mid: bytes) -> dict[str, int]:
    """Applies the undo records of every committed round of `mid`, newest first, and
    marks it aborted (the caller holds the lock and wrote the abort marker)."""
    meta = records.meta(mid)
    if meta is None or meta.get("status") == "aborted":
        records.abort_path.unlink(missing_ok=True)
        return {}
    totals: dict[str, int] = {}
    errors: list[str] = []
    for path in records.undo_files(mid):
        counts, errs = apply_undo(fw, read_npz(path))
        errors.extend(errs)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    if errors:
        raise RollbackIncomplete(f"abort of {mid.hex()} incomplete: {'; '.join(errors)}")
    records.mark_aborted(mid, totals)
    return totals


def recover_locked(
    fw: Firewall, state_dir: Path, replay: ReplayCache | None = None
) -> Recovery:
    """`recover` for a caller that already holds the import lock."""
    records = ImportRecords(state_dir)
    out = Recovery(temp_files=records.clean_tmp())
    inflight = records.inflight()
    if inflight is not None:
        mid = bytes(inflight["journal.mid"].astype(np.uint8))
        seq = int(inflight["journal.seq"][0])
        name = f"{mid.hex()}#{seq}"
        if seq in records.committed(mid):  # the crash came after the commit point
            meta = records.meta(mid) or {"rounds": []}
            expires = max(
                (int(r.get("expires_at_ms", 0)) for r in meta["rounds"] if r["seq"] == seq),
                default=0,
            )
            own = replay is None
            rc = replay or ReplayCache(state_dir)
            try:
                rc.record(mid, seq, expires)
            finally:
                if own:
                    rc.close()
            records.settle_inflight(mid, seq)
            out.finished.append(name)
        else:
            _, errors = apply_undo(fw, inflight)
            if errors:
                raise RollbackIncomplete(
                    f"recovery of the interrupted round {name} failed: {'; '.join(errors)}"
                )
            records.drop_inflight()
            out.undone.append(name)
    mid_aborting = records.aborting()
    if mid_aborting is not None:
        undo_migration(fw, records, mid_aborting)
        out.aborted.append(mid_aborting.hex())
    return out
