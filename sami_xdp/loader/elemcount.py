"""How many entries a hash map holds, from the kernel's own per-CPU counters.

Since Linux 6.6 every hash map (preallocated and LRU too) keeps an element count
that inserts, deletes and LRU evictions all update; the kfunc
bpf_map_sum_elem_count() sums it. It is read here by a four-instruction XDP
program (r1 = the map; call the kfunc; exit) run once with PROG_TEST_RUN: O(1)
whatever the table size, exact, and nothing to keep in step from userspace. The
capacity check of a migration's preflight uses it instead of scanning the tables.
Older kernels (no such kfunc in the kernel's BTF) get None, and callers count by
scanning.
"""

from __future__ import annotations

import os
import struct
from functools import cache
from pathlib import Path

from . import bpfsys

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
KFUNC = b"bpf_map_sum_elem_count"
BTF_KIND_FUNC = 12
# bytes after the 12-byte common header, per BTF kind (vlen: the info's low 16 bits)
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # STRUCT UNION ENUM PROTO DATASEC ENUM64
PSEUDO_MAP_FD = 1
PSEUDO_KFUNC_CALL = 2


@cache
def kfunc_btf_id(btf: Path = VMLINUX_BTF) -> int | None:
    """The BTF type id of bpf_map_sum_elem_count in the running kernel, if any."""
    try:
        data = btf.read_bytes()
    except OSError:
        return None
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", data
    )
    if magic != 0xEB9F:
        return None
    strings = hdr_len + str_off
    name_off = data.find(b"\0" + KFUNC + b"\0", strings) + 1 - strings
    if name_off <= 0:
        return None
    pos, end, type_id = hdr_len + type_off, hdr_len + type_off + type_len, 1
    while pos < end:
        name, info = struct.unpack_from("<II", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind == BTF_KIND_FUNC and name == name_off:
            return type_id
        pos += 12 + _FIXED.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
        type_id += 1
    return None


def _insn(code: int, dst: int, src: int, off: int, imm: int) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def count_program(map_fd: int) -> int | None:
    """A program that returns the entry count of the hash map `map_fd` (its fd), or
    None when the kernel cannot say."""
    btf_id = kfunc_btf_id()
    if btf_id is None:
        return None
    prog = (
        _insn(0x18, 1, PSEUDO_MAP_FD, 0, map_fd) + _insn(0, 0, 0, 0, 0)  # r1 = map
        + _insn(0x85, 0, PSEUDO_KFUNC_CALL, 0, btf_id)  # r0 = bpf_map_sum_elem_count(r1)
        + _insn(0x95, 0, 0, 0, 0)  # exit: the count is the run's return value
    )
    try:
        return bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, prog, "element count program")
    except bpfsys.BpfError:
        return None


def run_count(prog_fd: int) -> int:
    return bpfsys.prog_test_run(prog_fd, b"\0" * 64).retval


def elem_count(map_fd: int) -> int | None:
    """Entries in the hash map `map_fd` now, or None when the kernel cannot say
    (loads the program each time: PinnedMap.count() keeps it)."""
    fd = count_program(map_fd)
    if fd is None:
        return None
    try:
        return run_count(fd)
    finally:
        os.close(fd)
