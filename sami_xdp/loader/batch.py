"""Whole-map I/O with the BPF batch commands: read, filtered scans by several
threads, writes (threaded for large batches) and deletes, into and out of NumPy.

A million entries move as a few dozen syscalls and never become Python objects
(DESIGN section 2). Everything here is built on `bpfsys.batch_call`.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..base.parallel import run_parallel
from ..base.rows import as_void, concat_rows, copy_rows, take_rows
from . import bpfsys
from .bpfsys import (
    BPF_ANY,
    BPF_MAP_DELETE_BATCH,
    BPF_MAP_LOOKUP_BATCH,
    BPF_MAP_UPDATE_BATCH,
    BpfError,
    np_addr,
)

PARALLEL_WRITE_MIN = 1 << 17  # batch writes at least this large use several threads
WRITE_SUB_BATCH = 1 << 16  # each thread writes in sub-batches, so a failure stops it soon


def lookup_all(
    fd: int, key_dtype: np.dtype, value_dtype: np.dtype, max_entries: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole hash map into NumPy arrays, in one walk.

    The in/out batch tokens are separate buffers (bcc 0.26 aliases them)."""
    f = bpfsys.ffi()
    cap = max(max_entries, 1)
    keys = np.zeros(cap, dtype=key_dtype)
    values = np.zeros(cap, dtype=value_dtype)
    token_in = f.new("uint8_t[]", max(key_dtype.itemsize, 8))
    token_out = f.new("uint8_t[]", max(key_dtype.itemsize, 8))
    got = 0
    first = True
    while got < cap:
        n, rc = bpfsys.batch_call(
            BPF_MAP_LOOKUP_BATCH,
            fd,
            count=min(chunk, cap - got),
            keys=np_addr(keys) + got * key_dtype.itemsize,
            values=np_addr(values) + got * value_dtype.itemsize,
            in_batch=0 if first else bpfsys.addr_of(token_in),
            out_batch=bpfsys.addr_of(token_out),
            ok_errnos=(errno.ENOENT,),
            what="map batch lookup",
        )
        got += n
        if rc < 0:  # ENOENT: the walk reached the end
            break
        f.memmove(token_in, token_out, len(token_in))
        first = False
    return keys[:got], values[:got]


def update_all(fd: int, keys: np.ndarray, values: np.ndarray, flags: int = BPF_ANY) -> int:
    """Writes all pairs, in as many calls as the kernel needs; returns how many
    landed (an error is raised, saying how many landed before it)."""
    keys = np.ascontiguousarray(keys)
    values = np.ascontiguousarray(values)
    done = 0
    total = len(keys)
    while done < total:
        try:
            n, _ = bpfsys.batch_call(
                BPF_MAP_UPDATE_BATCH,
                fd,
                count=total - done,
                keys=np_addr(keys) + done * keys.dtype.itemsize,
                values=np_addr(values) + done * values.dtype.itemsize,
                elem_flags=flags,
                what="map batch update",
            )
        except BpfError as exc:
            raise BpfError(exc.errno, f"{exc.strerror} after {done + exc.done} entries") from exc
        done += n
    return done


def update_parallel(fd: int, keys: np.ndarray, values: np.ndarray, flags: int = BPF_ANY) -> int:
    """`update_all`, by several threads for large batches (the kernel's bucket locks
    keep them apart). Every thread is waited for, whatever happens (Ctrl-C too),
    before the first failure is re-raised: a rollback never races a writer."""
    workers = min(4, os.cpu_count() or 1, len(keys) // (PARALLEL_WRITE_MIN // 2))
    if workers <= 1 or len(keys) < PARALLEL_WRITE_MIN:
        return update_all(fd, keys, values, flags)
    stop = threading.Event()
    done = [0] * workers
    bounds = [len(keys) * i // workers for i in range(workers + 1)]

    def run(i: int) -> None:
        for lo in range(bounds[i], bounds[i + 1], WRITE_SUB_BATCH):
            if stop.is_set():
                return
            hi = min(lo + WRITE_SUB_BATCH, bounds[i + 1])
            done[i] += update_all(fd, keys[lo:hi], values[lo:hi], flags)

    run_parallel(workers, run, on_error=stop.set)
    return sum(done)


def delete_all(fd: int, keys: np.ndarray) -> int:
    """Deletes keys; missing keys are skipped. Returns how many were deleted."""
    keys = np.ascontiguousarray(keys)
    done = 0
    deleted = 0
    total = len(keys)
    while done < total:
        n, rc = bpfsys.batch_call(
            BPF_MAP_DELETE_BATCH,
            fd,
            count=total - done,
            keys=np_addr(keys) + done * keys.dtype.itemsize,
            ok_errnos=(errno.ENOENT,),
            what="map batch delete",
        )
        deleted += n
        # ENOENT: the key at done + n is missing: step over it
        done += n + (1 if rc < 0 else 0)
    return deleted


# ---- filtered scans by several threads -------------------------------------------


@dataclass
class ScanResult:
    """What `scan_batch` kept, and how many entries it read in all."""

    keys: np.ndarray
    values: np.ndarray
    scanned: int  # entries read before the filter: the map's fill level


KeepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Maps whose BPF_MAP_LOOKUP_BATCH token is the u32 index of the next hash bucket to
# read and whose bucket count is max_entries rounded up to a power of two
# (kernel/bpf/hashtab.c, unchanged since batch ops appeared in 5.6).
_BUCKET_TOKEN_TYPES = (1, 9)  # hash, lru_hash
SCAN_CHUNK = 32768
SCAN_PROBE = 4096  # first call of a bounded range: measures the density
SCAN_MIN_COUNT = 64
SCAN_MIN_BUCKETS_PER_WORKER = 1 << 16
SCAN_MIN_ROWS_PER_WORKER = 1 << 16  # fewer expected entries: one thread (threads cost ~1 ms)
_TOKEN_END = 1 << 40  # "past the last bucket" (the walk hit ENOENT)


def scan_workers(map_type: int, max_entries: int, workers: int | None = None) -> int:
    """How many threads `scan_batch` uses for a map (1 = one sequential walk).

    SAMIXDP_SCAN_WORKERS overrides the default (the CPU count, at most 4)."""
    if map_type not in _BUCKET_TOKEN_TYPES:
        return 1
    if workers is None:
        env = os.environ.get("SAMIXDP_SCAN_WORKERS", "")
        workers = int(env) if env.isdigit() else min(4, os.cpu_count() or 1)
    n_buckets = 1 << max(max_entries - 1, 0).bit_length()
    return max(1, min(workers, n_buckets // SCAN_MIN_BUCKETS_PER_WORKER))


@dataclass
class _Call:
    token_in: int
    token_out: int  # _TOKEN_END once the walk reached the end of the map
    raw_keys: np.ndarray  # every key read by this call (for boundary de-duplication)
    keys: np.ndarray  # the rows kept (all of them when there is no filter)
    values: np.ndarray
    mask: np.ndarray | None  # keep mask over raw_keys (None: all kept)


def _scan_range(
    fd: int,
    key_dtype: np.dtype,
    value_dtype: np.dtype,
    start: int,
    stop: int | None,
    keep: KeepFn | None,
    chunk: int,
    one_call: bool = False,
) -> list[_Call]:
    """Batch lookups from bucket `start` until the walk reaches bucket `stop`
    (None: the end of the map), or just one. A call returns whole buckets
    until it has `count` entries, so in a bounded range the counts follow the
    density seen so far and shrink towards `stop`; the last call may still
    read past it."""
    f = bpfsys.ffi()
    keys = np.empty(chunk, dtype=key_dtype)
    values = np.empty(chunk, dtype=value_dtype)
    tok = f.new("uint8_t[]", max(key_dtype.itemsize, 8))
    tok_out = f.new("uint8_t[]", max(key_dtype.itemsize, 8))
    tok_u32 = f.cast("uint32_t *", tok)
    out_u32 = f.cast("uint32_t *", tok_out)
    calls: list[_Call] = []
    t = start
    rows = 0
    count = chunk if stop is None else min(chunk, SCAN_PROBE)
    while True:
        tok_u32[0] = t
        if not 0 < count <= len(keys) == len(values):  # the kernel writes `count` rows
            raise ValueError(f"batch of {count} rows for buffers of {len(keys)}")
        n, rc = bpfsys.batch_call(
            BPF_MAP_LOOKUP_BATCH,
            fd,
            count=count,
            keys=np_addr(keys),
            values=np_addr(values),
            in_batch=bpfsys.addr_of(tok),
            out_batch=bpfsys.addr_of(tok_out),
            ok_errnos=(errno.ENOENT, errno.ENOSPC),
            what="map batch lookup",
        )
        if rc == -errno.ENOSPC and n == 0:  # the next bucket holds more than `count`
            count *= 2
            if count > len(keys):
                keys = np.empty(count, dtype=key_dtype)
                values = np.empty(count, dtype=value_dtype)
            continue
        nt = _TOKEN_END if rc < 0 else int(out_u32[0])
        k, v = keys[:n], values[:n]
        kc = copy_rows(k)
        if keep is None:
            calls.append(_Call(t, nt, kc, kc, copy_rows(v), None))
        else:
            m = np.asarray(keep(k, v), dtype=bool)
            idx = np.flatnonzero(m)
            calls.append(_Call(t, nt, kc, take_rows(k, idx), take_rows(v, idx), m))
        if one_call or nt == _TOKEN_END or (stop is not None and nt >= stop):
            return calls
        t = nt
        rows += n
        if stop is not None:  # aim just short of `stop`: ~90% of the entries expected there
            expect = rows * (stop - t) // max(t - start, 1)
            count = min(len(keys), max(SCAN_MIN_COUNT, expect - expect // 10))


def _drop_rows(call: _Call, dup: np.ndarray) -> None:
    """Removes the rows of `call` marked in `dup` (a mask over its raw keys)."""
    kept = ~dup if call.mask is None else ~dup[call.mask]
    call.keys = take_rows(call.keys, np.flatnonzero(kept))
    call.values = take_rows(call.values, np.flatnonzero(kept))
    call.raw_keys = take_rows(call.raw_keys, np.flatnonzero(~dup))


def scan_batch(
    fd: int,
    map_type: int,
    max_entries: int,
    key_dtype: np.dtype,
    value_dtype: np.dtype,
    keep: KeepFn | None = None,
    workers: int | None = None,
    chunk: int = SCAN_CHUNK,
) -> ScanResult:
    """Reads a hash map with batch lookups, keeping only the rows `keep` selects.

    `keep(keys, values)` returns a bool mask for one chunk of rows (views into a
    reused buffer), so a large map is filtered without ever holding all of it.
    A first call from bucket 0 reads a small map whole; if the density it saw
    promises enough entries, the rest of a big hash/LRU map is read by several
    threads, each walking its own range of hash buckets (the batch token of
    these maps is a bucket index); the GIL is released in the syscall and in
    NumPy. A thread's last call may read past its range into the next one: keys
    read twice there are dropped from the earlier range, so every key is
    returned once, as by one sequential walk (and, as with one walk, entries
    changed during the scan may or may not be seen)."""
    first = _scan_range(fd, key_dtype, value_dtype, 0, None, keep, chunk, one_call=True)
    t1 = first[-1].token_out
    if t1 == _TOKEN_END:
        return _result([first], key_dtype, value_dtype)
    n_buckets = 1 << max(max_entries - 1, 0).bit_length()
    w = scan_workers(map_type, max_entries, workers)
    expect = len(first[-1].raw_keys) * max(n_buckets - t1, 0) // max(t1, 1)
    w = min(w, max(1, expect // SCAN_MIN_ROWS_PER_WORKER))
    if w <= 1 or t1 >= n_buckets:
        rest = _scan_range(fd, key_dtype, value_dtype, t1, None, keep, chunk)
        return _result([first + rest], key_dtype, value_dtype)
    starts = [t1 + i * (n_buckets - t1) // w for i in range(w)]
    stops: list[int | None] = [*starts[1:], None]
    parts = run_parallel(
        w,
        lambda i: _scan_range(fd, key_dtype, value_dtype, starts[i], stops[i], keep, chunk),
    )
    # the last call of range i may have read buckets of range i + 1
    for i in range(w - 1):
        last = parts[i][-1]
        if last.token_out <= starts[i + 1] or not len(last.raw_keys):
            continue
        later = [c.raw_keys for c in parts[i + 1] if c.token_in < last.token_out]
        if not later:
            continue
        dup = np.isin(as_void(last.raw_keys), as_void(concat_rows(later)))
        if dup.any():
            _drop_rows(last, dup)
    return _result([first, *parts], key_dtype, value_dtype)


def _result(parts: list[list[_Call]], key_dtype: np.dtype, value_dtype: np.dtype) -> ScanResult:
    calls = [c for p in parts for c in p]
    return ScanResult(
        concat_rows([c.keys for c in calls], key_dtype),
        concat_rows([c.values for c in calls], value_dtype),
        sum(len(c.raw_keys) for c in calls),
    )


def read_array_range(fd: int, value_dtype: np.dtype, start: int, n: int) -> np.ndarray:
    """Entries start..start+n-1 of an array map, in one batch call (the batch
    token of an array is the index before the first one read)."""
    values = np.zeros(n, dtype=value_dtype)
    if n == 0:
        return values
    f = bpfsys.ffi()
    keys = np.zeros(n, dtype=np.uint32)
    token_in = f.new("uint32_t *", max(start - 1, 0))
    token_out = f.new("uint32_t *")
    got, _ = bpfsys.batch_call(
        BPF_MAP_LOOKUP_BATCH,
        fd,
        count=n,
        keys=np_addr(keys),
        values=np_addr(values),
        in_batch=bpfsys.addr_of(token_in) if start else 0,
        out_batch=bpfsys.addr_of(token_out),
        ok_errnos=(errno.ENOENT,),
        what="array batch lookup",
    )
    if got != n or (n and int(keys[0]) != start):
        raise BpfError(errno.EIO, f"array batch lookup: read {got} of {n} entries from {start}")
    return values


def lookup_keys(fd: int, keys: np.ndarray, value_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, values) of `keys` in a hash map, one prepared syscall per key
    (~3 us from Python; the session maps use their lookup programs instead, and
    threads do not help: the loop, not the syscall, holds the time)."""
    n = len(keys)
    values = np.zeros(n, dtype=value_dtype)
    found = np.zeros(n, bool)
    keys = np.ascontiguousarray(keys)
    call = bpfsys.lookup_loop(fd)
    base_k, base_v = np_addr(keys), np_addr(values)
    ks, vs = keys.dtype.itemsize, value_dtype.itemsize
    for i in range(n):
        found[i] = call(base_k + i * ks, base_v + i * vs)
    return found, values


def lookup_by_program(
    prog_fd: int, keys: np.ndarray, slot_dtype: np.dtype, per: int
) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, values) of `keys` through a lookup program: frames of `per`
    slots (key in; found flag and value out) run with PROG_TEST_RUN, a frame's
    worth of keys per syscall."""
    n = len(keys)
    slots = np.zeros(n, dtype=slot_dtype)
    slots["key"] = keys
    size = slot_dtype.itemsize
    run = bpfsys.test_run_in_place(prog_fd)
    base = np_addr(slots)
    for start in range(0, n, per):
        run(base + start * size, min(per, n - start) * size)
    return slots["found"] != 0, slots["value"].copy()
