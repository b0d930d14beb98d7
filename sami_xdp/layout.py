"""C structs of bpf/session_map.h seen from Python.

The header is handed to cffi verbatim (after dropping comments), so the
Python side can never drift from the datapath. NumPy dtypes for bulk work
are derived from the cffi offsets, not written by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import cffi
import numpy as np

from .paths import header_path

_TYPEDEFS = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
"""

STRUCTS = (
    "samixdp_meta",
    "session_key",
    "session_value",
    "lpm_v4_key",
    "acl_key",
    "syn_key",
    "syn_value",
    "blacklist_value",
    "acl_rule",
    "acl_set",
    "acl_entry",
    "frag_key",
    "fw_config",
    "verdict_counter",
)


@dataclass(frozen=True, eq=False)
class Layout:
    """The shared header compiled by cffi, plus its integer constants."""

    ffi: cffi.FFI
    consts: dict[str, int]

    def sizeof(self, struct: str) -> int:
        return int(self.ffi.sizeof(f"struct {struct}"))

    def new(self, struct: str, count: int | None = None) -> object:
        if count is None:
            return self.ffi.new(f"struct {struct} *")
        return self.ffi.new(f"struct {struct}[]", count)

    def dtype(self, struct: str) -> np.dtype:
        return _dtype_for(self, struct)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_constants(text: str) -> dict[str, int]:
    consts: dict[str, int] = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", text, flags=re.M):
        consts[m.group(1)] = int(m.group(2), 0)
    return consts


@cache
def load_layout() -> Layout:
    text = _strip_comments(header_path().read_text())
    ffi = cffi.FFI()
    ffi.cdef(_TYPEDEFS + text)
    return Layout(ffi=ffi, consts=parse_constants(text))


_NP_SCALARS = {
    "uint8_t": np.uint8,
    "uint16_t": np.uint16,
    "uint32_t": np.uint32,
    "uint64_t": np.uint64,
}


def _np_type(ffi: cffi.FFI, ctype: object) -> object:
    kind = ctype.kind  # type: ignore[attr-defined]
    if kind == "primitive":
        return _NP_SCALARS[ctype.cname]  # type: ignore[attr-defined]
    if kind == "array":
        return (_np_type(ffi, ctype.item), ctype.length)  # type: ignore[attr-defined]
    if kind == "struct":
        return _struct_dtype(ffi, ctype)
    raise TypeError(f"unsupported C type {ctype}")


def _struct_dtype(ffi: cffi.FFI, ctype: object) -> np.dtype:
    names, formats, offsets = [], [], []
    for name, field in ctype.fields:  # type: ignore[attr-defined]
        names.append(name)
        formats.append(_np_type(ffi, field.type))
        offsets.append(field.offset)
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": ffi.sizeof(ctype)}
    )


@cache
def _dtype_for(layout: Layout, struct: str) -> np.dtype:
    return _struct_dtype(layout.ffi, layout.ffi.typeof(f"struct {struct}"))
