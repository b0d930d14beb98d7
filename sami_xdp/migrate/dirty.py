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

Slots are claimed under an flock on the bpffs directory; each tracking entry
names its owner's pid, so a crashed migration's slot is taken back.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..base.rows import KeyIndex, unique_rows
from ..loader.pinned import Firewall
from .errors import MigrateError
from .vmset import VmAddrs

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


@dataclass
class DirtyLog:
    """One VM's tracking: its slot, current round and read cursor."""

    fw: Firewall
    vms: VmAddrs
    slot: int
    round: int
    cursor: int  # log entries consumed: the slot's write count at the last cut
    overflows: int = 0

    @classmethod
    def start(cls, fw: Firewall, vms: VmAddrs) -> DirtyLog:
        """Starts logging the VM's changes (before the full copy is read)."""
        tracking = fw.maps["tracking"]
        with _locked(fw):
            keys, values = tracking.dump()
            stale = np.array([not _alive(int(o)) for o in values["owner"]], bool)
            if stale.any():
                tracking.delete_many(keys[stale])
                keys, values = keys[~stale], values[~stale]
            busy = KeyIndex(keys).contains(vms.addrs) if len(keys) else np.zeros(len(vms), bool)
            if busy.any():
                ip = vms.ips[int(busy.argmax())]
                raise MigrateError(f"{ip} is already being migrated from this host")
            used = set(values["slot"].tolist())
            free = [s for s in range(fw.const("SAMIXDP_TRACK_SLOTS")) if s not in used]
            if not free:
                raise MigrateError(
                    f"{len(used)} migrations are running from this host (the most tracked "
                    "at once): wait for one to finish"
                )
            slot = free[0]
            head = fw.maps["dirty_head"].lookup(np.array([slot], np.uint32))
            log = cls(fw, vms, slot, secrets.randbelow(1 << 31) + 1, int(head or 0))
            log._write_round()
            _publish(fw)
        return log

    def _write_round(self) -> None:
        tracking = self.fw.maps["tracking"]
        vals = np.zeros(len(self.vms), dtype=tracking.value_dtype)
        vals["round"] = self.round
        vals["slot"] = self.slot
        vals["owner"] = os.getpid()
        for i in range(len(self.vms)):
            tracking.update(self.vms.addrs[i : i + 1], vals[i : i + 1])

    def cut(self) -> np.ndarray | None:
        """The session keys logged since the previous cut (each once), or None when
        the ring wrapped and the round needs a scan instead."""
        self.round = self.round % 0xFFFFFFFF + 1
        self._write_round()
        time.sleep(SETTLE_S)
        head = int(self.fw.maps["dirty_head"].lookup(np.array([self.slot], np.uint32)) or 0)
        n = head - self.cursor
        size = self.fw.const("SAMIXDP_DIRTY_LOG")
        if n > size:
            self.cursor = head
            self.overflows += 1
            return None
        entries = self._read(self.cursor, n)
        if entries is None:
            self.cursor = head
            self.overflows += 1
            return None
        newer = np.flatnonzero(entries["round"] == self.round)
        self.cursor += int(newer[0]) if len(newer) else n
        return unique_rows(entries["key"])

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
        m = self.fw.maps["dirty_log"]
        size = self.fw.const("SAMIXDP_DIRTY_LOG")
        base, first = self.slot * size, start % size
        head_part = min(n, size - first)
        parts = [m.read_range(base + first, head_part)]
        if n > head_part:
            parts.append(m.read_range(base, n - head_part))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def stop(self) -> None:
        """Stops logging (the VM's entries and, when it was the last, the filter)."""
        tracking = self.fw.maps["tracking"]
        with _locked(self.fw):
            for i in range(len(self.vms)):
                cur = tracking.lookup(self.vms.addrs[i : i + 1])
                if cur is not None and int(cur["owner"]) == os.getpid():
                    tracking.delete(self.vms.addrs[i : i + 1])
            _publish(self.fw)
