"""Replay cache: every (migration id, sequence) is accepted at most once, and every
signed control message (sender, nonce) too.

Stored in SQLite (state dir, `replay.sqlite`, synchronous=FULL), so it survives
restarts of the agent or the host. Within one migration sequence numbers
must grow: a bundle older than the newest accepted one is refused as stale,
so a held-back delta cannot roll the state back. An aborted migration
accepts nothing more. Rows are pruned once every bundle of a migration is
past its expiry (an expired bundle is refused anyway), control nonces once
their message is too old to be believed.

The importer records a bundle here after its round committed in the import
journal (journal.py), which is the durable truth: recovery re-records a
committed round whose entry a crash kept from landing, and the importer also
refuses what the journal lists.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ReplayError, StateDirError
from .keys import one_line

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
CREATE TABLE IF NOT EXISTS control_seen (
    sender TEXT NOT NULL,
    nonce TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, nonce)
);
"""


class ReplayCache:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / REPLAY_FILE
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateDirError(
                f"cannot open the replay cache {self.path}: {one_line(exc)}"
            ) from exc
        try:
            with self._sql():
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._db.execute("SELECT mid, seq, expires_at_ms FROM accepted LIMIT 1")
        except StateDirError:
            self._db.close()
            raise

    @contextlib.contextmanager
    def _sql(self, transaction: bool = False) -> Iterator[None]:
        """Runs statements (in one IMMEDIATE transaction if asked); every SQLite
        failure (corrupt file, full disk) becomes one StateDirError."""
        try:
            if transaction:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                if transaction:
                    self._db.execute("COMMIT")
            except BaseException:
                if transaction and self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateDirError(f"replay cache {self.path}: {one_line(exc)}") from exc

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
        with self._sql():
            reason = self._refusal(mid, seq)
        if reason:
            raise ReplayError(reason)

    def seen(self, mid: bytes, seq: int) -> bool:
        with self._sql():
            return self._refusal(mid, seq) is not None

    def _prune(self, now: int) -> None:
        self._db.execute(
            "DELETE FROM accepted WHERE mid IN (SELECT mid FROM accepted GROUP BY mid "
            "HAVING MAX(expires_at_ms) < ?)",
            (now - PRUNE_AFTER_MS,),
        )

    def consume(self, mid: bytes, seq: int, expires_at_ms: int) -> None:
        """Atomically checks and records (mid, seq); durable when it returns."""
        now = int(time.time() * 1000)
        with self._sql(transaction=True):
            reason = self._refusal(mid, seq)
            if reason:
                raise ReplayError(reason)
            self._db.execute(
                "INSERT INTO accepted (mid, seq, expires_at_ms, accepted_at_ms) VALUES (?,?,?,?)",
                (mid, seq, int(expires_at_ms), now),
            )
            self._prune(now)

    def record(self, mid: bytes, seq: int, expires_at_ms: int) -> None:
        """Records an accepted (mid, seq) whatever is there already (idempotent):
        the import journal decided, this only mirrors it."""
        now = int(time.time() * 1000)
        with self._sql(transaction=True):
            self._db.execute(
                "INSERT OR IGNORE INTO accepted (mid, seq, expires_at_ms, accepted_at_ms) "
                "VALUES (?,?,?,?)",
                (mid, seq, int(expires_at_ms), now),
            )
            self._prune(now)

    def control_once(self, sender: str, nonce: str, ts_ms: int, window_ms: int) -> None:
        """Accepts a control message's (sender, nonce) once; raises ReplayError the
        second time. Rows older than `window_ms` go (their messages are stale anyway)."""
        now = int(time.time() * 1000)
        with self._sql(transaction=True):
            self._db.execute("DELETE FROM control_seen WHERE ts_ms < ?", (now - window_ms,))
            try:
                self._db.execute(
                    "INSERT INTO control_seen (sender, nonce, ts_ms) VALUES (?,?,?)",
                    (sender, nonce, int(ts_ms)),
                )
            except sqlite3.IntegrityError:
                raise ReplayError(
                    f"replay: control message {nonce} from {sender} was already received"
                ) from None

    def close_migration(self, mid: bytes) -> None:
        """After an abort: refuse every further bundle of this migration."""
        now = int(time.time() * 1000)
        with self._sql():
            self._db.execute(
                "INSERT OR IGNORE INTO closed (mid, closed_at_ms) VALUES (?, ?)", (mid, now)
            )

    def count(self) -> int:
        with self._sql():
            return int(self._db.execute("SELECT COUNT(*) FROM accepted").fetchone()[0])
