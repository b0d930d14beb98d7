"""The bpf(2) commands sami-xdp needs, called directly through cffi: one Python
function per command, nothing more (loops over whole maps are in batch.py).

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
struct attr_prog_load {      /* PROG_LOAD */
    uint32_t prog_type; uint32_t insn_cnt; uint64_t insns; uint64_t license;
    uint32_t log_level; uint32_t log_size; uint64_t log_buf; uint32_t kern_version;
    uint32_t prog_flags; uint8_t rest[80];
};
struct attr_info {            /* OBJ_GET_INFO_BY_FD */
    uint32_t bpf_fd; uint32_t info_len; uint64_t info;
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
struct skb_ctx_head {
    uint32_t len; uint32_t pkt_type; uint32_t mark; uint32_t queue_mapping;
    uint32_t protocol; uint32_t vlan_present; uint32_t vlan_tci; uint32_t vlan_proto;
    uint32_t priority; uint32_t ingress_ifindex;
};
"""

LOOPBACK_IFINDEX = 1  # every network namespace's `lo`
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_TYPE_XDP = 6
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
    3: "prog_array",
    5: "percpu_hash",
    6: "percpu_array",
    9: "lru_hash",
    11: "lpm_trie",
    27: "ringbuf",
}

_NR_BPF = {"x86_64": 321, "aarch64": 280}


class BpfError(OSError):
    """A bpf(2) call failed; the message names the command and object."""

    done: int = 0  # batch calls: entries processed before the error


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


def addr_of(buf: object) -> int:
    """The address of a cffi buffer, as the u64 a bpf(2) attribute holds."""
    f = ffi()
    return int(f.cast("uint64_t", f.cast("void *", buf)))


def np_addr(arr: np.ndarray) -> int:
    return int(arr.ctypes.data)


# ---- objects ---------------------------------------------------------------


def obj_get(path: str) -> int:
    f = ffi()
    cpath = f.new("char[]", path.encode())
    attr = f.new("struct attr_obj *")
    attr.pathname = addr_of(cpath)
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    f = ffi()
    cpath = f.new("char[]", path.encode())
    attr = f.new("struct attr_obj *")
    attr.pathname = addr_of(cpath)
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
    attr.info = addr_of(info)
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
    attr.info = addr_of(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    return ProgInfo(
        type=info.type,
        id=info.id,
        name=f.string(info.name).decode(),
        tag=bytes(f.buffer(info.tag)).hex(),
    )


# ---- single elements -------------------------------------------------------


def _elem_attr(fd: int, key: object, value: object | None, flags: int = 0) -> object:
    f = ffi()
    attr = f.new("struct attr_elem *")
    attr.map_fd = fd
    attr.key = addr_of(key)
    attr.value = addr_of(value) if value is not None else 0
    attr.flags = flags
    return attr


def lookup(fd: int, key: object, value: object) -> bool:
    """Fills `value` (a cffi buffer); False when the key is absent."""
    rc = _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, key, value), "map lookup", (errno.ENOENT,))
    return rc >= 0


def test_run_in_place(prog_fd: int) -> Callable[[int, int], None]:
    """PROG_TEST_RUN of `prog_fd` on a frame at a raw address, its output written
    back over it, with everything else prepared once: for loops over many frames."""
    f, lib = _ffi()
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"unsupported architecture {platform.machine()}")
    attr = f.new("struct attr_test_run *")
    args = (f.cast("long", nr), f.cast("int", BPF_PROG_TEST_RUN), attr,
            f.cast("unsigned int", f.sizeof("struct attr_test_run")))
    syscall = lib.syscall

    def run(addr: int, size: int) -> None:
        attr.prog_fd = prog_fd
        attr.data_in = attr.data_out = addr
        attr.data_size_in = attr.data_size_out = size
        attr.repeat = 1
        if syscall(*args) < 0:
            err = f.errno
            raise BpfError(err, f"program test run: {os.strerror(err)}")

    return run


def lookup_loop(fd: int) -> Callable[[int, int], bool]:
    """A lookup in map `fd` on raw addresses (NumPy rows), with everything but the
    two addresses prepared once: for loops over thousands of keys."""
    f, lib = _ffi()
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"unsupported architecture {platform.machine()}")
    attr = f.new("struct attr_elem *")
    attr.map_fd = fd
    args = (f.cast("long", nr), f.cast("int", BPF_MAP_LOOKUP_ELEM), attr,
            f.cast("unsigned int", f.sizeof("struct attr_elem")))
    syscall = lib.syscall

    def lookup(key_addr: int, value_addr: int) -> bool:
        attr.key = key_addr
        attr.value = value_addr
        if syscall(*args) >= 0:
            return True
        err = f.errno
        if err != errno.ENOENT:
            raise BpfError(err, f"map lookup: {os.strerror(err)}")
        return False

    return lookup


def update(fd: int, key: object, value: object, flags: int = BPF_ANY) -> None:
    _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, key, value, flags), "map update")


def delete(fd: int, key: object) -> bool:
    rc = _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, key, None), "map delete", (errno.ENOENT,))
    return rc >= 0


def next_key(fd: int, key: object | None, next_out: object) -> bool:
    f = ffi()
    attr = f.new("struct attr_elem *")
    attr.map_fd = fd
    attr.key = addr_of(key) if key is not None else 0
    attr.value = addr_of(next_out)
    rc = _bpf(BPF_MAP_GET_NEXT_KEY, attr, "map next key", (errno.ENOENT,))
    return rc >= 0


def prog_load(prog_type: int, insns: bytes, what: str) -> int:
    """Loads hand-assembled instructions (GPL); returns the program fd. The first
    line of the verifier's log comes with a refusal."""
    f = ffi()
    code = f.new("uint8_t[]", insns)
    lic = f.new("char[]", b"GPL")
    log = f.new("char[]", 4096)
    attr = f.new("struct attr_prog_load *")
    attr.prog_type = prog_type
    attr.insn_cnt = len(insns) // 8
    attr.insns = addr_of(code)
    attr.license = addr_of(lic)
    attr.log_level = 1
    attr.log_size = 4096
    attr.log_buf = addr_of(log)
    try:
        return _bpf(BPF_PROG_LOAD, attr, what)
    except BpfError as exc:
        first = f.string(log).decode(errors="replace").strip().splitlines()[:1]
        raise BpfError(exc.errno, f"{exc.strerror}: {' '.join(first)}") from exc


# ---- batches ---------------------------------------------------------------
# One BPF_MAP_*_BATCH call each; the loops over a whole map live in batch.py.


def batch_call(
    cmd: int,
    fd: int,
    *,
    count: int,
    keys: int = 0,
    values: int = 0,
    in_batch: int = 0,
    out_batch: int = 0,
    elem_flags: int = 0,
    ok_errnos: tuple[int, ...] = (),
    what: str = "map batch operation",
) -> tuple[int, int]:
    """One batch call on buffers at the given addresses: (entries processed, 0 or
    -errno for an errno listed in `ok_errnos`). Other errors raise BpfError, which
    carries the entries processed before it in `.done`."""
    f = ffi()
    attr = f.new("struct attr_batch *")
    attr.in_batch = in_batch
    attr.out_batch = out_batch
    attr.keys = keys
    attr.values = values
    attr.count = count
    attr.map_fd = fd
    attr.elem_flags = elem_flags
    try:
        rc = _bpf(cmd, attr, what, ok_errnos)
    except BpfError as exc:
        exc.done = int(attr.count)
        raise
    return int(attr.count), min(rc, 0)


# ---- test runs -------------------------------------------------------------


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes


def prog_test_run(
    prog_fd: int, data: bytes, repeat: int = 1, ingress_ifindex: int = 0, skb: bool = False
) -> TestRunResult:
    """Runs an XDP program (`skb`: a TC classifier) on one frame with
    BPF_PROG_TEST_RUN.

    `duration_ns` is the kernel's mean time per run over `repeat` runs. A TC
    program gets loopback's ifindex as its ingress unless told otherwise (what
    the kernel reports to an XDP program run without a context)."""
    f = ffi()
    data_in = f.new("uint8_t[]", data)
    out = f.new("uint8_t[]", len(data) + 512)
    attr = f.new("struct attr_test_run *")
    attr.prog_fd = prog_fd
    attr.data_size_in = len(data)
    attr.data_in = addr_of(data_in)
    attr.data_size_out = len(out)
    attr.data_out = addr_of(out)
    attr.repeat = repeat
    ctx = None
    if skb:
        ctx = f.new("struct skb_ctx_head *")
        ctx.ingress_ifindex = ingress_ifindex or LOOPBACK_IFINDEX
        attr.ctx_in = addr_of(ctx)
        attr.ctx_size_in = f.sizeof("struct skb_ctx_head")
    elif ingress_ifindex:
        ctx = f.new("struct xdp_md_ctx *")
        ctx.data_end = len(data)
        ctx.ingress_ifindex = ingress_ifindex
        attr.ctx_in = addr_of(ctx)
        attr.ctx_size_in = f.sizeof("struct xdp_md_ctx")
    _bpf(BPF_PROG_TEST_RUN, attr, "program test run")
    return TestRunResult(
        retval=attr.retval,
        duration_ns=attr.duration,
        data_out=bytes(f.buffer(out, attr.data_size_out)),
    )
