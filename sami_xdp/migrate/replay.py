"""Replay cache: every (migration id, sequence) is accepted at most once.

Stored in SQLite (state dir, `replay.sqlite`, synchronous=FULL: a consumed
sequence is on disk before the import writes anything), so it survives
restarts of the agent or the host. Within one migration sequence numbers
must grow: a bundle older than the newest accepted one is refused as stale,
so a held-back delta cannot roll the state back. An aborted migration
accepts nothing more. Rows are pruned once every bundle of a migration is
past its expiry (an expired bundle is refused anyway).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from .errors import ReplayError

REPLAY_FILE = "replay.sqlite"
PRUNE_AFTER_MS = 3600_000  # keep rows an hour past their bundle's expiry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accepted (
    mid BLOB NOT NULL,
    seq INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    PRIMARY KEY (mid, seq)
);
CREATE TABLE IF NOT EXISTS closed (
    mid BLOB PRIMARY KEY,
    closed_at_ms INTEGER NOT NULL
);
"""


class ReplayCache:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.path = state_dir / REPLAY_FILE
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReplayCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refusal(self, mid: bytes, seq: int) -> str | None:
        cur = self._db.execute("SELECT 1 FROM closed WHERE mid = ?", (mid,))
        if cur.fetchone():
            return f"migration {mid.hex()} was aborted here: it accepts no more bundles"
        cur = self._db.execute(
            "SELECT MAX(seq), SUM(seq = ?) FROM accepted WHERE mid = ?", (seq, mid)
        )
        top, same = cur.fetchone()
        if same:
            return f"replay: bundle {mid.hex()}#{seq} was already accepted"
        if top is not None and seq < top:
            return f"stale: bundle {mid.hex()}#{seq} is older than accepted #{top}"
        return None

    def check(self, mid: bytes, seq: int) -> None:
        """Raises ReplayError if the bundle would be refused; records nothing."""
        reason = self._refusal(mid, seq)
        if reason:
            raise ReplayError(reason)

    def seen(self, mid: bytes, seq: int) -> bool:
        return self._refusal(mid, seq) is not None

    def consume(self, mid: bytes, seq: int, expires_at_ms: int) -> None:
        """Atomically checks and records (mid, seq); durable when it returns."""
        now = int(time.time() * 1000)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            reason = self._refusal(mid, seq)
            if reason:
                raise ReplayError(reason)
            self._db.execute(
                "INSERT INTO accepted (mid, seq, expires_at_ms, accepted_at_ms) VALUES (?,?,?,?)",
                (mid, seq, int(expires_at_ms), now),
            )
            self._db.execute(
                "DELETE FROM accepted WHERE mid IN (SELECT mid FROM accepted GROUP BY mid "
                "HAVING MAX(expires_at_ms) < ?)",
                (now - PRUNE_AFTER_MS,),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close_migration(self, mid: bytes) -> None:
        """After an abort: refuse every further bundle of this migration."""
        now = int(time.time() * 1000)
        self._db.execute(
            "INSERT OR IGNORE INTO closed (mid, closed_at_ms) VALUES (?, ?)", (mid, now)
        )

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM accepted").fetchone()[0])
