"""The bpf(2) commands sami-xdp needs, called directly through cffi.

bcc covers compilation, but its batch API (0.26) aliases the in/out batch
tokens and its Table.clear() is pathologically slow, and pinned objects must
be reopened without recompiling. So map and object access goes through this
thin layer over the raw syscall, with NumPy buffers for bulk transfers.
"""

from __future__ import annotations

import errno
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import cffi
import numpy as np

from ..parallel import run_parallel

_CDEF = """
long syscall(long number, ...);

struct attr_elem {            /* MAP_*_ELEM */
    uint32_t map_fd; uint32_t pad;
    uint64_t key; uint64_t value; uint64_t flags;
};
struct attr_batch {           /* MAP_*_BATCH */
    uint64_t in_batch; uint64_t out_batch; uint64_t keys; uint64_t values;
    uint32_t count; uint32_t map_fd; uint64_t elem_flags; uint64_t flags;
};
struct attr_obj {             /* OBJ_PIN / OBJ_GET */
    uint64_t pathname; uint32_t bpf_fd; uint32_t file_flags; int32_t path_fd; uint32_t pad;
};
struct attr_test_run {        /* PROG_TEST_RUN */
    uint32_t prog_fd; uint32_t retval; uint32_t data_size_in; uint32_t data_size_out;
    uint64_t data_in; uint64_t data_out; uint32_t repeat; uint32_t duration;
    uint32_t ctx_size_in; uint32_t ctx_size_out; uint64_t ctx_in; uint64_t ctx_out;
    uint32_t flags; uint32_t cpu; uint32_t batch_size; uint32_t pad;
};
struct attr_info {            /* OBJ_GET_INFO_BY_FD */
    uint32_t bpf_fd; uint32_t info_len; uint64_t info;
};
struct attr_get_id {          /* *_GET_FD_BY_ID */
    uint32_t id; uint32_t next_id; uint32_t open_flags; uint32_t pad;
};
struct map_info {
    uint32_t type; uint32_t id; uint32_t key_size; uint32_t value_size;
    uint32_t max_entries; uint32_t map_flags; char name[16];
    uint32_t ifindex; uint32_t btf_vmlinux_value_type_id;
    uint64_t netns_dev; uint64_t netns_ino;
    uint32_t btf_id; uint32_t btf_key_type_id; uint32_t btf_value_type_id; uint32_t pad;
    uint64_t map_extra;
};
struct prog_info {
    uint32_t type; uint32_t id; uint8_t tag[8];
    uint32_t jited_prog_len; uint32_t xlated_prog_len;
    uint64_t jited_prog_insns; uint64_t xlated_prog_insns;
    uint64_t load_time; uint32_t created_by_uid; uint32_t nr_map_ids;
    uint64_t map_ids; char name[16];
    uint8_t rest[160];
};
struct xdp_md_ctx {
    uint32_t data; uint32_t data_end; uint32_t data_meta;
    uint32_t ingress_ifindex; uint32_t rx_queue_index; uint32_t egress_ifindex;
};
"""

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

MAP_TYPE_NAMES = {
    1: "hash",
    2: "array",
    5: "percpu_hash",
    6: "percpu_array",
    9: "lru_hash",
    11: "lpm_trie",
}

_NR_BPF = {"x86_64": 321, "aarch64": 280}


class BpfError(OSError):
    """A bpf(2) call failed; the message names the command and object."""


@cache
def _ffi() -> tuple[cffi.FFI, Any]:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(None)


def ffi() -> cffi.FFI:
    return _ffi()[0]


def _bpf(cmd: int, attr: object, what: str, ok_errnos: tuple[int, ...] = ()) -> int:
    f, lib = _ffi()
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"unsupported architecture {platform.machine()}")
    size = f.sizeof(f.typeof(attr).item)
    f.errno = 0
    rc = int(
        lib.syscall(f.cast("long", nr), f.cast("int", cmd), attr, f.cast("unsigned int", size))
    )
    if rc < 0:
        err = f.errno
        if err in ok_errnos:
            return -err
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def _addr(buf: object) -> int:
    f = ffi()
    return int(f.cast("uint64_t", f.cast("void *", buf)))


def _np_addr(arr: np.ndarray) -> int:
    return int(arr.ctypes.data)


# ---- objects ---------------------------------------------------------------


def obj_get(path: str) -> int:
    f = ffi()
    cpath = f.new("char[]", path.encode())
    attr = f.new("struct attr_obj *")
    attr.pathname = _addr(cpath)
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    f = ffi()
    cpath = f.new("char[]", path.encode())
    attr = f.new("struct attr_obj *")
    attr.pathname = _addr(cpath)
    attr.bpf_fd = fd
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    tag: str


def map_info(fd: int) -> MapInfo:
    f = ffi()
    info = f.new("struct map_info *")
    attr = f.new("struct attr_info *")
    attr.bpf_fd = fd
    attr.info_len = f.sizeof("struct map_info")
    attr.info = _addr(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return MapInfo(
        type=info.type,
        id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        name=f.string(info.name).decode(),
    )


def prog_info(fd: int) -> ProgInfo:
    f = ffi()
    info = f.new("struct prog_info *")
    attr = f.new("struct attr_info *")
    attr.bpf_fd = fd
    attr.info_len = f.sizeof("struct prog_info")
    attr.info = _addr(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    return ProgInfo(
        type=info.type,
        id=info.id,
        name=f.string(info.name).decode(),
        tag=bytes(f.buffer(info.tag)).hex(),
    )


def prog_fd_by_id(prog_id: int) -> int:
    f = ffi()
    attr = f.new("struct attr_get_id *")
    attr.id = prog_id
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"open program id {prog_id}")


# ---- single elements -------------------------------------------------------


def _elem_attr(fd: int, key: object, value: object | None, flags: int = 0) -> object:
    f = ffi()
    attr = f.new("struct attr_elem *")
    attr.map_fd = fd
    attr.key = _addr(key)
    attr.value = _addr(value) if value is not None else 0
    attr.flags = flags
    return attr


def lookup(fd: int, key: object, value: object) -> bool:
    """Fills `value` (a cffi buffer); False when the key is absent."""
    rc = _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, key, value), "map lookup", (errno.ENOENT,))
    return rc >= 0


def update(fd: int, key: object, value: object, flags: int = BPF_ANY) -> None:
    _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, key, value, flags), "map update")


def delete(fd: int, key: object) -> bool:
    rc = _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, key, None), "map delete", (errno.ENOENT,))
    return rc >= 0


def next_key(fd: int, key: object | None, next_out: object) -> bool:
    f = ffi()
    attr = f.new("struct attr_elem *")
    attr.map_fd = fd
    attr.key = _addr(key) if key is not None else 0
    attr.value = _addr(next_out)
    rc = _bpf(BPF_MAP_GET_NEXT_KEY, attr, "map next key", (errno.ENOENT,))
    return rc >= 0


# ---- batches ---------------------------------------------------------------


def lookup_batch(
    fd: int, key_dtype: np.dtype, value_dtype: np.dtype, max_entries: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole hash map with BPF_MAP_LOOKUP_BATCH into NumPy arrays.

    The in/out batch tokens are separate buffers (bcc 0.26 aliases them)."""
    f = ffi()
    cap = max(max_entries, 1)
    keys = np.zeros(cap, dtype=key_dtype)
    values = np.zeros(cap, dtype=value_dtype)
    token_in = f.new("uint8_t[]", max(key_dtype.itemsize, 8))
    token_out = f.new("uint8_t[]", max(key_dtype.itemsize, 8))
    got = 0
    first = True
    while got < cap:
        n = min(chunk, cap - got)
        attr = f.new("struct attr_batch *")
        attr.in_batch = 0 if first else _addr(token_in)
        attr.out_batch = _addr(token_out)
        attr.keys = _np_addr(keys) + got * key_dtype.itemsize
        attr.values = _np_addr(values) + got * value_dtype.itemsize
        attr.count = n
        attr.map_fd = fd
        rc = _bpf(BPF_MAP_LOOKUP_BATCH, attr, "map batch lookup", (errno.ENOENT,))
        got += attr.count
        if rc < 0:  # ENOENT: the walk reached the end
            break
        f.memmove(token_in, token_out, len(token_in))
        first = False
    return keys[:got], values[:got]


def _void(a: np.ndarray) -> np.ndarray:
    """Contiguous rows as opaque records: NumPy copies, takes and concatenates
    these several times faster than the same structured rows (field by field)."""
    return np.ascontiguousarray(a).view(np.dtype((np.void, a.dtype.itemsize)))


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return _void(a).take(idx).view(a.dtype)


def _concat(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype)
    return np.concatenate([_void(p) for p in parts]).view(dtype)


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
    f = ffi()
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
        attr = f.new("struct attr_batch *")
        tok_u32[0] = t
        attr.in_batch = _addr(tok)
        attr.out_batch = _addr(tok_out)
        attr.keys = _np_addr(keys)
        attr.values = _np_addr(values)
        if not 0 < count <= len(keys) == len(values):  # the kernel writes `count` rows
            raise ValueError(f"batch of {count} rows for buffers of {len(keys)}")
        attr.count = count
        attr.map_fd = fd
        rc = _bpf(BPF_MAP_LOOKUP_BATCH, attr, "map batch lookup", (errno.ENOENT, errno.ENOSPC))
        if rc == -errno.ENOSPC and attr.count == 0:  # the next bucket holds more than `count`
            count *= 2
            if count > len(keys):
                keys = np.empty(count, dtype=key_dtype)
                values = np.empty(count, dtype=value_dtype)
            continue
        n = int(attr.count)
        nt = _TOKEN_END if rc < 0 else int(out_u32[0])
        k, v = keys[:n], values[:n]
        kc = _void(k).copy().view(key_dtype)
        if keep is None:
            calls.append(_Call(t, nt, kc, kc, _void(v).copy().view(value_dtype), None))
        else:
            m = np.asarray(keep(k, v), dtype=bool)
            idx = np.flatnonzero(m)
            calls.append(_Call(t, nt, kc, _take(k, idx), _take(v, idx), m))
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
    call.keys = _take(call.keys, np.flatnonzero(kept))
    call.values = _take(call.values, np.flatnonzero(kept))
    call.raw_keys = _take(call.raw_keys, np.flatnonzero(~dup))


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
    # a first call from bucket 0 reads small maps whole and tells the density
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
        dup = np.isin(_void(last.raw_keys), _void(_concat(later, key_dtype)))
        if dup.any():
            _drop_rows(last, dup)
    return _result([first, *parts], key_dtype, value_dtype)


def _result(parts: list[list[_Call]], key_dtype: np.dtype, value_dtype: np.dtype) -> ScanResult:
    calls = [c for p in parts for c in p]
    return ScanResult(
        _concat([c.keys for c in calls], key_dtype),
        _concat([c.values for c in calls], value_dtype),
        sum(len(c.raw_keys) for c in calls),
    )


def update_batch(fd: int, keys: np.ndarray, values: np.ndarray, flags: int = BPF_ANY) -> int:
    """Writes all pairs with BPF_MAP_UPDATE_BATCH; returns how many landed
    before an error (which is raised)."""
    f = ffi()
    keys = np.ascontiguousarray(keys)
    values = np.ascontiguousarray(values)
    done = 0
    total = len(keys)
    while done < total:
        attr = f.new("struct attr_batch *")
        attr.keys = _np_addr(keys) + done * keys.dtype.itemsize
        attr.values = _np_addr(values) + done * values.dtype.itemsize
        attr.count = total - done
        attr.map_fd = fd
        attr.elem_flags = flags
        try:
            _bpf(BPF_MAP_UPDATE_BATCH, attr, "map batch update")
        except BpfError as exc:
            raise BpfError(exc.errno, f"{exc.strerror} after {done + attr.count} entries") from exc
        done += attr.count
    return done


def delete_batch(fd: int, keys: np.ndarray) -> int:
    """Deletes keys with BPF_MAP_DELETE_BATCH; missing keys are skipped."""
    f = ffi()
    keys = np.ascontiguousarray(keys)
    done = 0
    deleted = 0
    total = len(keys)
    while done < total:
        attr = f.new("struct attr_batch *")
        attr.keys = _np_addr(keys) + done * keys.dtype.itemsize
        attr.count = total - done
        attr.map_fd = fd
        rc = _bpf(BPF_MAP_DELETE_BATCH, attr, "map batch delete", (errno.ENOENT,))
        if rc < 0:
            # the key at done + count is missing: step over it one by one
            deleted += attr.count
            done += attr.count + 1
            continue
        deleted += attr.count
        done += attr.count
    return deleted


# ---- test runs -------------------------------------------------------------


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes


def prog_test_run(
    prog_fd: int, data: bytes, repeat: int = 1, ingress_ifindex: int = 0
) -> TestRunResult:
    """Runs an XDP program on one frame with BPF_PROG_TEST_RUN.

    `duration_ns` is the kernel's mean time per run over `repeat` runs."""
    f = ffi()
    data_in = f.new("uint8_t[]", data)
    out = f.new("uint8_t[]", len(data) + 512)
    attr = f.new("struct attr_test_run *")
    attr.prog_fd = prog_fd
    attr.data_size_in = len(data)
    attr.data_in = _addr(data_in)
    attr.data_size_out = len(out)
    attr.data_out = _addr(out)
    attr.repeat = repeat
    ctx = None
    if ingress_ifindex:
        ctx = f.new("struct xdp_md_ctx *")
        ctx.data_end = len(data)
        ctx.ingress_ifindex = ingress_ifindex
        attr.ctx_in = _addr(ctx)
        attr.ctx_size_in = f.sizeof("struct xdp_md_ctx")
    _bpf(BPF_PROG_TEST_RUN, attr, "program test run")
    return TestRunResult(
        retval=attr.retval,
        duration_ns=attr.duration,
        data_out=bytes(f.buffer(out, attr.data_size_out)),
    )
