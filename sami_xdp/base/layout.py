"""C structs of bpf/session_map.h seen from Python.

The header is handed to cffi verbatim (after dropping comments), so the
Python side can never drift from the datapath. NumPy dtypes for bulk work
are derived from the cffi offsets, not written by hand.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

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
    "tcp_dir",
    "session_value",
    "ip_addr",
    "lpm_key",
    "acl_key",
    "syn_key",
    "syn_value",
    "blacklist_value",
    "acl_rule",
    "acl_set",
    "acl_entry",
    "frag_key",
    "frag_value",
    "pkt",
    "fw_config",
    "verdict_counter",
    "track_value",
    "track_state",
    "dirty_entry",
    "lookup_slot",
    "arrival_value",
    "fw_event",
    "event_budget",
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

    def const(self, name: str) -> int:
        return self.consts[name]

    def names(self, prefix: str) -> dict[int, str]:
        """Value -> name, without the prefix, of the header's constants named
        PREFIX* (e.g. "ST_" gives the session states)."""
        return {v: k.removeprefix(prefix) for k, v in self.consts.items() if k.startswith(prefix)}

    def digest(self) -> str:
        """SHA-256 over every struct (fields, offsets, types, sizes) and every constant
        but the version itself: what SAMIXDP_LAYOUT_VERSION must change with."""
        parts = [
            f"{k}={v}" for k, v in sorted(self.consts.items()) if k != "SAMIXDP_LAYOUT_VERSION"
        ]
        for struct in STRUCTS:
            parts.append(f"struct {struct} {self.sizeof(struct)}")
            parts.extend(_flat_fields(self.ffi, self.ffi.typeof(f"struct {struct}"), ""))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _flat_fields(ffi: cffi.FFI, ctype: Any, prefix: str) -> list[str]:
    out = []
    for name, field in ctype.fields:
        t = field.type
        out.append(f"{prefix}{name} @{field.offset} {t.cname}")
        if t.kind == "struct":
            out.extend(_flat_fields(ffi, t, f"{prefix}{name}."))
    return out


_CONST_RE = re.compile(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _cdef_text(text: str) -> str:
    """The header as cffi takes it: no comments, and of the preprocessor lines only
    the integer #defines (the include guard and #endif are for C)."""
    lines = _strip_comments(text).splitlines()
    return "\n".join(ln for ln in lines if not ln.startswith("#") or _CONST_RE.match(ln))


def parse_constants(text: str) -> dict[str, int]:
    consts: dict[str, int] = {}
    for line in text.splitlines():
        m = _CONST_RE.match(line)
        if m:
            consts[m.group(1)] = int(m.group(2), 0)
    return consts


@cache
def load_layout() -> Layout:
    text = _cdef_text(header_path().read_text())
    ffi = cffi.FFI()
    ffi.cdef(_TYPEDEFS + text)
    return Layout(ffi=ffi, consts=parse_constants(text))


_NP_SCALARS = {
    "uint8_t": np.uint8,
    "uint16_t": np.uint16,
    "uint32_t": np.uint32,
    "uint64_t": np.uint64,
}


def _np_type(ffi: cffi.FFI, ctype: Any) -> object:
    kind = ctype.kind
    if kind == "primitive":
        return _NP_SCALARS[ctype.cname]
    if kind == "array":
        return (_np_type(ffi, ctype.item), ctype.length)
    if kind == "struct":
        return _struct_dtype(ffi, ctype)
    raise TypeError(f"unsupported C type {ctype}")


def _struct_dtype(ffi: cffi.FFI, ctype: Any) -> np.dtype:
    names, formats, offsets = [], [], []
    for name, field in ctype.fields:
        names.append(name)
        formats.append(_np_type(ffi, field.type))
        offsets.append(field.offset)
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": ffi.sizeof(ctype)}
    )


@cache
def _dtype_for(layout: Layout, struct: str) -> np.dtype:
    return _struct_dtype(layout.ffi, layout.ffi.typeof(f"struct {struct}"))
