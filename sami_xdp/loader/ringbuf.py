"""A BPF ring buffer (BPF_MAP_TYPE_RINGBUF) read through its map fd, without bcc.

The kernel lets a ring buffer map be mapped: its first page holds the consumer
position (the reader's, writable), the next the producer position, then the data
area, mapped twice in a row so a record that wraps reads as one piece. Records are
8-byte aligned, each behind an 8-byte header whose first word is the length with
two flag bits: BUSY (reserved, not committed yet) and DISCARD (committed empty).
The reader consumes by moving the consumer position on; the kernel reserves
space only behind it, so a reader that stops reading costs the writers nothing
but the records that no longer fit.

One reader at a time: the consumer position is the ring's, not the reader's, so
two readers would each see half the records. `exclusive()` takes a lock that
names its holder.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import select
import struct
from pathlib import Path

from ..base.errors import BusyError

# include/uapi/linux/bpf.h
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8

_POS = struct.Struct("=Q")
_HDR = struct.Struct("=I")


class RingBuffer:
    """The consumer side of one ring buffer map, mapped into this process."""

    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"a ring buffer's size is a power of two, not {data_size}")
        self.size = data_size
        self._page = mmap.PAGESIZE
        self._fd = os.dup(map_fd)
        try:
            self._cons = mmap.mmap(self._fd, self._page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            # the producer page, then the data area twice over (read-only)
            self._data = mmap.mmap(self._fd, self._page + 2 * data_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=self._page)
        except OSError:
            os.close(self._fd)
            raise
        # one aligned 8-byte store per update: the kernel reads it concurrently
        self._cons_pos: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._cons)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    @property
    def consumer(self) -> int:
        assert self._cons_pos is not None
        return int(self._cons_pos.value)

    @property
    def producer(self) -> int:
        return int(_POS.unpack_from(self._data, 0)[0])

    def read(self, limit: int) -> list[bytes]:
        """Up to `limit` committed records, oldest first, each consumed as it is
        read; stops at a record still being written."""
        assert self._cons_pos is not None
        out: list[bytes] = []
        cons, prod = self.consumer, self.producer
        mask = self.size - 1
        while cons < prod and len(out) < limit:
            off = self._page + (cons & mask)
            hdr = int(_HDR.unpack_from(self._data, off)[0])
            if hdr & BPF_RINGBUF_BUSY_BIT:
                break
            length = hdr & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)
            if not hdr & BPF_RINGBUF_DISCARD_BIT:
                start = off + BPF_RINGBUF_HDR_SZ
                out.append(self._data[start:start + length])
            cons += (length + BPF_RINGBUF_HDR_SZ + 7) & ~7
            self._cons_pos.value = cons
        return out

    def skip(self) -> int:
        """Consumes every committed record unread (old news); returns how many."""
        n = 0
        while chunk := self.read(4096):
            n += len(chunk)
        return n

    def pending(self) -> int:
        """Bytes written and not consumed yet."""
        return self.producer - self.consumer

    def wait(self, timeout_s: float) -> bool:
        """Blocks until the ring holds something or `timeout_s` passed (the kernel
        wakes a reader when a record lands in an empty ring)."""
        if self.pending():
            return True
        return bool(self._poll.poll(max(0, int(timeout_s * 1000))))

    def close(self) -> None:
        if self._cons_pos is None:
            return
        self._cons_pos = None  # the exported pointer must go before the mapping
        self._cons.close()
        self._data.close()
        os.close(self._fd)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_holder(path: Path) -> int | None:
    """The pid holding an flock on `path`, from /proc/locks (None if unknown)."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError), open("/proc/locks") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == want:
                return int(parts[4]) or None
    return None


def exclusive(path: Path, what: str) -> int:
    """An fd holding an exclusive flock on the directory `path` (made if missing:
    bpffs takes directories, not files) for as long as it stays open; BusyError,
    naming the holder, when another process has it. The directory is its owner's
    alone (0700): an unprivileged user cannot open it, so cannot hold the lock."""
    path.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o700)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = lock_holder(path)
        os.close(fd)
        who = f"pid {pid}" if pid else "another process"
        raise BusyError(f"{what} already has a reader ({who}); only one at a time") from None
    except BaseException:
        os.close(fd)
        raise
    return fd
