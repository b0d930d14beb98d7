"""The dirty-state log of a migrating VM, like a hypervisor's dirty page log.

While a migration runs, the datapath logs the key of each of the VM's sessions
once per round, at the first packet that touches it (creation, state, window,
counters alike) or deletes it (bpf/session_map.h, "dirty-state tracking"), so a
delta round reads what changed instead of both session tables: the final delta
costs O(changes), not O(table). Counters travel with the state they come with:
a session a packet touched is re-sent whole (its last-seen time keeps the copy at
the destination from expiring early), one no packet touched is not re-sent.

Rounds: `cut()` moves the VM's round on (from then on the first change of a
session logs it again), waits for programs that read the old round to finish
(they run for microseconds), and returns the keys logged since the previous cut.
Entries of the new round are kept for the next cut as well, since a session
logged in it will not be logged again this round. A ring that wrapped (more
changes than SAMIXDP_DIRTY_LOG in one round) makes `cut()` return None: the
caller falls back to a scan for that round.

Groups: migrations run by one process (the agent's, a drain's) share one slot
and one round (`TrackGroup`): a cut moves the round of every VM of the group
and hands each member the keys that involve its addresses, so a session
between two VMs that leave together is logged for both (the datapath logs a
session under one end's entry), and 50 concurrent migrations need one slot,
not 50. A lone migration is a group of one (`DirtyLog.start`).

Slots are claimed under an flock on the bpffs directory; each tracking entry
names its owner's pid, so a crashed migration's slot is taken back (at the next
claim, or by `reap_stale`, which the agent runs now and then).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..base.rows import KeyIndex, concat_rows, unique_rows
from ..loader.pinned import Firewall
from .errors import MigrateError, TrackSlotsFull
from .vmset import VmAddrs, addr_isin

SETTLE_S = 0.001  # a program that read the old round is done by then (they run for us)
GOLDEN = np.uint32(2654435761)  # the datapath's track_hash() multiplier


def bloom_bits(addrs: np.ndarray, words: int) -> tuple[np.ndarray, np.ndarray]:
    """(word, bit) of each address (`struct ip_addr` rows) in the datapath's filter."""
    w = addrs["w"].astype(np.uint32)
    with np.errstate(over="ignore"):
        h = (w[:, 0] ^ w[:, 1] ^ w[:, 2] ^ w[:, 3]) * GOLDEN
    return (h >> np.uint32(28)) & np.uint32(words - 1), (h >> np.uint32(22)) & np.uint32(63)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(fw: Firewall) -> Iterator[None]:
    fd = os.open(fw.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _publish(fw: Firewall) -> None:
    """Rewrites the datapath's filter and count from the tracking entries (locked)."""
    keys, _ = fw.maps["tracking"].dump()
    m = fw.maps["track"]
    state = np.zeros(1, dtype=m.value_dtype)
    state["active"] = len(keys)
    if len(keys):
        words, bits = bloom_bits(keys, fw.const("TRACK_BLOOM_WORDS"))
        bloom = state["bloom"][0]
        for wd, bt in zip(words.tolist(), bits.tolist(), strict=True):
            bloom[wd] |= np.uint64(1) << np.uint64(bt)
    m.update(np.zeros(1, np.uint32), state)


def _reap(fw: Firewall) -> tuple[np.ndarray, np.ndarray]:
    """Deletes the tracking entries of owners that are gone (locked); the rest."""
    tracking = fw.maps["tracking"]
    keys, values = tracking.dump()
    stale = np.array([not _alive(int(o)) for o in values["owner"]], bool)
    if stale.any():
        tracking.delete_many(keys[stale])
        keys, values = keys[~stale], values[~stale]
    return keys, values


def reap_stale(fw: Firewall) -> int:
    """Takes back the slots of migrations whose process died (kill -9): until
    then the datapath goes on logging their VMs. Returns the entries removed."""
    with _locked(fw):
        before = len(fw.maps["tracking"].keys())
        keys, _ = _reap(fw)
        if len(keys) != before:
            _publish(fw)
    return before - len(keys)


@dataclass(eq=False)
class DirtyLog:
    """One VM's membership of a tracking group: what the group's cuts handed it."""

    group: TrackGroup
    vms: VmAddrs
    pending: list[np.ndarray] = field(default_factory=list)
    overflowed: bool = False
    overflows: int = 0

    @classmethod
    def start(cls, fw: Firewall, vms: VmAddrs) -> DirtyLog:
        """Starts logging the VM's changes (before the full copy is read), in a
        group of its own."""
        return TrackGroup(fw).join(vms)

    @property
    def fw(self) -> Firewall:
        return self.group.fw

    @property
    def slot(self) -> int:
        assert self.group.slot is not None
        return self.group.slot

    @property
    def cursor(self) -> int:
        return self.group.cursor

    def cut(self) -> np.ndarray | None:
        """The session keys of this VM logged since its previous cut (each once), or
        None when the ring wrapped and the round needs a scan instead."""
        return self.group.cut(self)

    def stop(self) -> None:
        """Stops logging the VM (and, when it was the last, the filter)."""
        self.group.leave(self)


class TrackGroup:
    """One slot of the dirty log, one round, shared by the migrations of this
    process that joined it."""

    def __init__(self, fw: Firewall) -> None:
        self.fw = fw
        self.slot: int | None = None
        self.round = 0
        self.cursor = 0  # log entries consumed: the slot's write count at the last cut
        self.members: list[DirtyLog] = []
        self._lock = threading.Lock()

    def join(self, vms: VmAddrs) -> DirtyLog:
        """Starts logging the VM's changes in this group (claiming a slot for its
        first member)."""
        with self._lock, _locked(self.fw):
            keys, values = _reap(self.fw)
            busy = KeyIndex(keys).contains(vms.addrs) if len(keys) else np.zeros(len(vms), bool)
            if busy.any():
                ip = vms.ips[int(busy.argmax())]
                raise MigrateError(f"{ip} is already being migrated from this host")
            if self.slot is None:
                used = set(values["slot"].tolist())
                free = [s for s in range(self.fw.const("SAMIXDP_TRACK_SLOTS")) if s not in used]
                if not free:
                    raise TrackSlotsFull(
                        f"{len(used)} migrating processes track VMs on this host (the most "
                        "at once)"
                    )
                self.slot = free[0]
                self.round = secrets.randbelow(1 << 31) + 1
                head = self.fw.maps["dirty_head"].lookup(np.array([self.slot], np.uint32))
                self.cursor = int(head or 0)
            log = DirtyLog(self, vms)
            self.members.append(log)
            self._write_round([log])
            _publish(self.fw)
        return log

    def leave(self, log: DirtyLog) -> None:
        tracking = self.fw.maps["tracking"]
        with self._lock, _locked(self.fw):
            if log in self.members:
                self.members.remove(log)
            for i in range(len(log.vms)):
                cur = tracking.lookup(log.vms.addrs[i : i + 1])
                if cur is not None and int(cur["owner"]) == os.getpid():
                    tracking.delete(log.vms.addrs[i : i + 1])
            if not self.members:
                self.slot = None  # free for any process once its entries are gone
            _publish(self.fw)

    def _write_round(self, members: list[DirtyLog]) -> None:
        tracking = self.fw.maps["tracking"]
        for m in members:
            vals = np.zeros(len(m.vms), dtype=tracking.value_dtype)
            vals["round"] = self.round
            vals["slot"] = self.slot
            vals["owner"] = os.getpid()
            for i in range(len(m.vms)):
                tracking.update(m.vms.addrs[i : i + 1], vals[i : i + 1])

    def cut(self, log: DirtyLog) -> np.ndarray | None:
        """Moves the group's round on, hands every member the keys logged since the
        previous cut that involve it, and returns (and clears) `log`'s share."""
        with self._lock:
            if self.slot is None or log not in self.members:
                raise MigrateError(f"{log.vms.label} is not tracked any more")
            self._cut_all()
            if log.overflowed:
                log.overflowed = False
                log.pending.clear()
                return None
            keys = unique_rows(concat_rows(log.pending, self.fw.maps["sessions"].key_dtype))
            log.pending.clear()
            return keys

    def _cut_all(self) -> None:
        self.round = self.round % 0xFFFFFFFF + 1
        self._write_round(self.members)
        time.sleep(SETTLE_S)
        assert self.slot is not None
        head = int(self.fw.maps["dirty_head"].lookup(np.array([self.slot], np.uint32)) or 0)
        n = head - self.cursor
        size = self.fw.const("SAMIXDP_DIRTY_LOG")
        entries = self._read(self.cursor, n) if n <= size else None
        if entries is None:
            self.cursor = head
            for m in self.members:
                m.overflowed = True
                m.overflows += 1
            return
        newer = np.flatnonzero(entries["round"] == self.round)
        self.cursor += int(newer[0]) if len(newer) else n
        keys = entries["key"]
        for m in self.members:
            mine = addr_isin(keys["addr_lo"], m.vms.addrs) | addr_isin(keys["addr_hi"], m.vms.addrs)
            if mine.any():
                m.pending.append(keys[mine])

    def _read(self, start: int, n: int) -> np.ndarray | None:
        """Entries start..start+n-1 of the slot's ring, each checked whole (None: a
        lap overwrote some, or a writer never finished)."""
        want = np.arange(start + 1, start + n + 1, dtype=np.uint64)
        for attempt in range(3):
            out = self._ring(start, n)
            if (out["seq"] == want).all():
                return out
            if attempt < 2:
                time.sleep(SETTLE_S)  # a writer between its count and its entry
        return None

    def _ring(self, start: int, n: int) -> np.ndarray:
        assert self.slot is not None
        m = self.fw.maps["dirty_log"]
        size = self.fw.const("SAMIXDP_DIRTY_LOG")
        base, first = self.slot * size, start % size
        head_part = min(n, size - first)
        parts = [m.read_range(base + first, head_part)]
        if n > head_part:
            parts.append(m.read_range(base, n - head_part))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
