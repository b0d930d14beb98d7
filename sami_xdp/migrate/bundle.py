"""The signed migration bundle: a versioned, compact binary format.

    +--------------------+  192 bytes, HEADER dtype (little-endian)
    | header             |  magic "SXMB", format/layout version, flags,
    |                    |  compression, number of VM addresses, migration id,
    |                    |  seq, times, source/audience host ids, key id, ACL
    |                    |  digest, record counts, body lengths
    +--------------------+
    | VM addresses       |  n_vms x 16 bytes (network order, IPv4 as
    |                    |  ::ffff:a.b.c.d): every address of the VM, never
    |                    |  compressed, so a receiver reads them before the body
    +--------------------+
    | body               |  sections in fixed order, each a packed array of
    |  (maybe zlib)      |  fixed-size little-endian records (wire.py):
    |                    |  sessions 60 B, syn 48 B, blacklist 48 B,
    |                    |  acl 54 B (or an opaque blob), del_sessions 37 B,
    |                    |  del_syn 32 B, del_blacklist 32 B
    +--------------------+
    | signature          |  64 bytes: Ed25519 over header + addresses + stored body
    +--------------------+

A bundle holds the state of one VM, which is all its addresses (1 to
MAX_VM_ADDRS, each once, of either family): every record must involve one of
them, and a receiver takes all of them or none.

The signature covers the body as stored (compressed), so a bundle is
authenticated before anything is decompressed. The raw body length is in
the signed header and must equal the sum of the section sizes given by the
counts, which bounds decompression.

`zlib+shuffle` compression stores each section byte-plane by byte-plane
(all first bytes of the records, then all second bytes, ...) before zlib:
columns of ages, states, counter exponents and the constant bytes of IPv4
addresses compress far better that way.

Format 3 (this one) replaced format 2's single IPv4 VM (a 4-byte header field)
with the address table and made every address field 16 bytes. A bundle of
another format is refused with a message naming both versions (a format 2
bundle also carries map layout 7 records, which this build could not load).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..base.netutil import addr_array, addrs_to_ips
from .errors import BundleFormatError, CountMismatchError
from .keys import KEY_ID_LEN, HostIdentity, validate_host_id
from .vmset import ADDR_BYTES, MAX_VM_ADDRS, VmAddrs, first_duplicate
from .wire import ADDR, SECTIONS

MAGIC = b"SXMB"
FORMAT_VERSION = 3  # 3: a VM is a table of addresses of either family, 16-byte addresses
SIG_ALG_ED25519 = 1
SIG_LEN = 64

FLAG_DELTA = 1  # records are changes since the previous round (+ delete lists)
FLAG_FINAL = 2  # the last round before cutover
FLAG_ACL = 4  # the ACL section is present: each address's rules become exactly these
FLAG_ACL_BLOB = 8  # ... as an opaque blob (acl_blob_len bytes) instead of records
KNOWN_FLAGS = FLAG_DELTA | FLAG_FINAL | FLAG_ACL | FLAG_ACL_BLOB

COMP_NONE = 0
COMP_ZLIB = 1
COMP_ZLIB_SHUFFLE = 2
COMPRESSIONS = {"none": COMP_NONE, "zlib": COMP_ZLIB, "zlib+shuffle": COMP_ZLIB_SHUFFLE}
COMPRESSION_NAMES = {v: k for k, v in COMPRESSIONS.items()}

DEFAULT_VALIDITY_S = 60
MAX_VALIDITY_S = 86400
MAX_RAW_BODY = 1 << 31  # 2 GiB: 35M sessions; anything larger is refused unread

HEADER = np.dtype(
    [
        ("magic", "S4"),
        ("format_version", "<u2"),  # at offset 4 in every format: read first
        ("layout_version", "<u2"),
        ("header_size", "<u2"),
        ("flags", "<u2"),
        ("compression", "u1"),
        ("sig_alg", "u1"),
        ("n_vms", "<u2"),  # addresses in the table after the header
        ("migration_id", "V16"),
        ("seq", "<u4"),
        ("reserved", "<u4"),
        ("issued_at_ms", "<u8"),  # unix time, ms
        ("expires_at_ms", "<u8"),
        ("source_host", "V32"),  # UTF-8, NUL padded
        ("dest_host", "V32"),
        ("key_id", "V8"),
        ("ruleset_digest", "V16"),
        ("n_sessions", "<u4"),
        ("n_syn", "<u4"),
        ("n_blacklist", "<u4"),
        ("n_acl", "<u4"),
        ("acl_blob_len", "<u4"),
        ("n_del_sessions", "<u4"),
        ("n_del_syn", "<u4"),
        ("n_del_blacklist", "<u4"),
        ("raw_body_len", "<u8"),
        ("body_len", "<u8"),
    ]
)
HEADER_SIZE = HEADER.itemsize
assert HEADER_SIZE == 192


def _name_field(name: str) -> bytes:
    raw = validate_host_id(name).encode()
    return raw + b"\0" * (32 - len(raw))


def _parse_name(raw: bytes, what: str) -> str:
    text = raw.rstrip(b"\0")
    if b"\0" in text:
        raise BundleFormatError(f"bundle {what} host id has embedded NUL bytes")
    try:
        return validate_host_id(text.decode())
    except (UnicodeDecodeError, Exception) as exc:
        raise BundleFormatError(f"bundle {what} host id is invalid") from exc


# ---- body (de)compression ---------------------------------------------------------------


def _shuffle(buf: bytes | memoryview, itemsize: int) -> bytes | memoryview:
    if itemsize <= 1 or not buf:
        return buf
    return np.frombuffer(buf, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(buf: bytes | bytearray | memoryview, itemsize: int) -> bytes | memoryview:
    if itemsize <= 1 or not len(buf):
        return memoryview(buf)
    return np.frombuffer(buf, np.uint8).reshape(itemsize, -1).T.tobytes()


INFLATE_IN = 64 << 10  # compressed input fed at a time
INFLATE_OUT = 256 << 10  # output produced at a time


def _inflate(body: bytes | memoryview, raw_len: int, sink: Callable[[bytes], None]) -> None:
    """Feeds the inflated body to `sink` chunk by chunk; refuses as soon as it would go
    past `raw_len`, and a stream that ends short, has trailing data or is corrupt.
    Memory: one input slice and one output chunk, whatever the body holds."""
    d = zlib.decompressobj()
    total = 0
    view = memoryview(body).cast("B")
    try:
        for start in range(0, max(len(view), 1), INFLATE_IN):
            data: bytes | memoryview = view[start : start + INFLATE_IN]
            while True:
                out = d.decompress(data, INFLATE_OUT)
                total += len(out)
                if total > raw_len:
                    raise CountMismatchError(
                        f"bundle body inflates past the {raw_len} bytes its header announces"
                    )
                if out:
                    sink(out)
                data = d.unconsumed_tail
                if not out and not data:
                    break
    except zlib.error as exc:
        raise BundleFormatError(f"bundle body does not decompress: {exc}") from exc
    if not d.eof or d.unused_data:
        raise BundleFormatError("bundle body has trailing or missing compressed data")
    if total != raw_len:
        raise CountMismatchError(f"bundle body inflates to {total} bytes, header says {raw_len}")


def inflate_exact(body: bytes | memoryview, raw_len: int) -> bytearray:
    """zlib-inflates `body` into exactly `raw_len` bytes. A first pass only counts, so
    a body that would inflate past the length the signed header announces (a bomb) is
    refused before a buffer of that length exists; then a second pass fills it."""
    _inflate(body, raw_len, lambda _chunk: None)
    out = bytearray(raw_len)
    pos = 0

    def fill(chunk: bytes) -> None:
        nonlocal pos
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)

    _inflate(body, raw_len, fill)
    return out


def section_sizes(h: np.void) -> list[tuple[str, int, int]]:
    """(name, byte length, record size) of each body section, from header counts."""
    out = []
    for name, dtype, count_field in SECTIONS:
        if name == "acl" and int(h["flags"]) & FLAG_ACL_BLOB:
            out.append((name, int(h["acl_blob_len"]), 1))
        else:
            out.append((name, int(h[count_field]) * dtype.itemsize, dtype.itemsize))
    return out


def expected_raw_len(h: np.void) -> int:
    return sum(size for _, size, _ in section_sizes(h))


# ---- the parsed (not yet verified) bundle --------------------------------------------------


@dataclass
class Bundle:
    """A parsed bundle. Parsing checks structure only; trust comes from verify."""

    header: np.void
    data: memoryview  # the whole bundle
    vms: VmAddrs  # the VM's addresses (from the table after the header)
    body: memoryview  # as stored
    signature: bytes
    _sections: dict[str, np.ndarray | bytes] | None = field(default=None, repr=False)

    @property
    def signed_part(self) -> memoryview:
        return self.data[: len(self.data) - SIG_LEN]

    @property
    def migration_id(self) -> bytes:
        return bytes(self.header["migration_id"])

    @property
    def seq(self) -> int:
        return int(self.header["seq"])

    @property
    def vm_ips(self) -> list[str]:
        """The VM's addresses, canonical text, in the bundle's order."""
        return list(self.vms.ips)

    @property
    def vm_label(self) -> str:
        return self.vms.label

    @property
    def source(self) -> str:
        return _parse_name(bytes(self.header["source_host"]), "source")

    @property
    def audience(self) -> str:
        return _parse_name(bytes(self.header["dest_host"]), "destination")

    @property
    def key_id(self) -> bytes:
        return bytes(self.header["key_id"])

    @property
    def flags(self) -> int:
        return int(self.header["flags"])

    @property
    def kind(self) -> str:
        k = "delta" if self.flags & FLAG_DELTA else "full"
        return k + ("+final" if self.flags & FLAG_FINAL else "")

    @property
    def is_delta(self) -> bool:
        return bool(self.flags & FLAG_DELTA)

    @property
    def has_acl(self) -> bool:
        return bool(self.flags & FLAG_ACL)

    @property
    def issued_at_ms(self) -> int:
        return int(self.header["issued_at_ms"])

    @property
    def expires_at_ms(self) -> int:
        return int(self.header["expires_at_ms"])

    @property
    def ruleset_digest(self) -> bytes:
        return bytes(self.header["ruleset_digest"])

    @property
    def compression(self) -> str:
        return COMPRESSION_NAMES[int(self.header["compression"])]

    def counts(self) -> dict[str, int]:
        h = self.header
        return {name: int(h[cf]) for name, _, cf in SECTIONS}

    def sections(self) -> dict[str, np.ndarray | bytes]:
        """Decompressed body split into record arrays (zero-copy when uncompressed).

        Call only after the signature was verified."""
        if self._sections is not None:
            return self._sections
        h = self.header
        comp = int(h["compression"])
        raw_len = int(h["raw_body_len"])
        if comp == COMP_NONE:
            raw: bytes | bytearray | memoryview = self.body
        else:
            raw = inflate_exact(self.body, raw_len)
        if len(raw) != raw_len:
            raise CountMismatchError(f"bundle body is {len(raw)} bytes, header says {raw_len}")
        out: dict[str, np.ndarray | bytes] = {}
        off = 0
        dtypes = {name: dt for name, dt, _ in SECTIONS}
        view = memoryview(raw)  # slices of it share the buffer (a bytearray slice copies)
        for name, size, itemsize in section_sizes(h):
            chunk: bytes | memoryview = view[off : off + size]
            off += size
            if comp == COMP_ZLIB_SHUFFLE:
                chunk = _unshuffle(chunk, itemsize)
            if name == "acl" and self.flags & FLAG_ACL_BLOB:
                out[name] = bytes(chunk)
            else:
                out[name] = np.frombuffer(chunk, dtype=dtypes[name])
        self._sections = out
        return out


def parse_header(head: bytes | bytearray | memoryview) -> np.void:
    """The header of a bundle, structurally checked (magic, versions, known flags, the
    size of the address table); nothing in it is authenticated yet."""
    if len(head) < HEADER_SIZE:
        raise BundleFormatError(f"not a bundle: {len(head)} bytes is shorter than any bundle")
    if bytes(head[:4]) != MAGIC:
        raise BundleFormatError("not a sami-xdp bundle (bad magic)")
    version = int.from_bytes(bytes(head[4:6]), "little")  # where every format keeps it
    if version != FORMAT_VERSION:
        raise BundleFormatError(
            f"bundle format {version} is not supported (this build reads {FORMAT_VERSION})"
        )
    h = np.frombuffer(head[:HEADER_SIZE], dtype=HEADER)[0]
    if int(h["header_size"]) != HEADER_SIZE:
        raise BundleFormatError(f"bundle header size {int(h['header_size'])} != {HEADER_SIZE}")
    if int(h["sig_alg"]) != SIG_ALG_ED25519:
        raise BundleFormatError(f"unknown signature algorithm {int(h['sig_alg'])}")
    if int(h["flags"]) & ~KNOWN_FLAGS:
        raise BundleFormatError(f"unknown bundle flags {int(h['flags']):#x}")
    if int(h["compression"]) not in COMPRESSION_NAMES:
        raise BundleFormatError(f"unknown compression {int(h['compression'])}")
    if int(h["reserved"]) != 0:
        raise BundleFormatError("reserved header bytes are not zero")
    n = int(h["n_vms"])
    if n == 0:
        raise BundleFormatError("bundle names no VM address")
    if n > MAX_VM_ADDRS:
        raise BundleFormatError(
            f"bundle lists {n} VM addresses, a VM has at most {MAX_VM_ADDRS}"
        )
    return h


def vms_size(h: np.void) -> int:
    """Bytes of the address table after the header."""
    return int(h["n_vms"]) * ADDR_BYTES


def parse_vms(h: np.void, table: bytes | bytearray | memoryview) -> VmAddrs:
    """The VM's addresses from the table after the header: each at most once."""
    if len(table) != vms_size(h):
        raise BundleFormatError(f"bundle address table is {len(table)} bytes, "
                                f"its header announces {vms_size(h)}")
    addrs = np.frombuffer(bytes(table), dtype=ADDR)
    dup = first_duplicate(addrs)
    if dup is not None:
        raise BundleFormatError(
            f"bundle lists VM address {addrs_to_ips(addrs[dup : dup + 1])[0]} twice"
        )
    return VmAddrs.of_addrs(addrs)


def bundle_size(h: np.void) -> int:
    """The whole bundle's length in bytes as its header announces it."""
    return HEADER_SIZE + vms_size(h) + int(h["body_len"]) + SIG_LEN


def parse_bundle(data: bytes | bytearray | memoryview) -> Bundle:
    """Structural checks only: sizes, magic, versions, known flags, the address table."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER_SIZE + SIG_LEN:
        raise BundleFormatError(f"not a bundle: {len(mv)} bytes is shorter than any bundle")
    h = parse_header(mv)
    if bundle_size(h) != len(mv):
        raise BundleFormatError(f"bundle is {len(mv)} bytes, header announces {bundle_size(h)}")
    body_at = HEADER_SIZE + vms_size(h)
    body_end = body_at + int(h["body_len"])
    return Bundle(
        header=h,
        data=mv,
        vms=parse_vms(h, mv[HEADER_SIZE:body_at]),
        body=mv[body_at:body_end],
        signature=bytes(mv[body_end:]),
    )


# ---- building ------------------------------------------------------------------------------


def encode_bundle(
    sections: dict[str, np.ndarray | bytes],
    *,
    identity: HostIdentity,
    vms: Iterable[str] | np.ndarray,
    audience: str,
    seq: int,
    migration_id: bytes,
    layout_version: int,
    flags: int = 0,
    acl_digest: bytes = b"\0" * 16,
    validity_s: float = DEFAULT_VALIDITY_S,
    compression: str = "none",
    issued_at_ms: int | None = None,
    timings: dict[str, float] | None = None,
) -> bytes:
    """Serialises and signs already-selected wire sections (low level: `vms`, the VM's
    addresses as text or `struct ip_addr` values, is written as given)."""
    t0 = time.perf_counter()
    table = addr_array(vms) if not isinstance(vms, np.ndarray) else np.ascontiguousarray(vms)
    if table.dtype.itemsize != ADDR_BYTES or not 0 < len(table) < 2**16:
        raise ValueError("a bundle names 1 to 65535 VM addresses of 16 bytes")
    if len(migration_id) != 16:
        raise ValueError("migration id must be 16 bytes")
    if not 0 <= seq < 2**32:
        raise ValueError("sequence number must fit in 32 bits")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
    comp = COMPRESSIONS[compression]
    h = np.zeros(1, dtype=HEADER)[0]
    h["magic"] = MAGIC
    h["format_version"] = FORMAT_VERSION
    h["layout_version"] = layout_version
    h["header_size"] = HEADER_SIZE
    h["compression"] = comp
    h["sig_alg"] = SIG_ALG_ED25519
    h["migration_id"] = np.void(migration_id)
    h["seq"] = seq
    h["n_vms"] = len(table)
    issued = issued_at_ms if issued_at_ms is not None else int(time.time() * 1000)
    h["issued_at_ms"] = issued
    h["expires_at_ms"] = issued + int(validity_s * 1000)
    h["source_host"] = np.void(_name_field(identity.host_id))
    h["dest_host"] = np.void(_name_field(audience))
    h["key_id"] = np.void(identity.key_id[:KEY_ID_LEN])
    h["ruleset_digest"] = np.void(acl_digest)

    acl = sections.get("acl")
    if acl is not None:
        flags |= FLAG_ACL
        if isinstance(acl, bytes):
            flags |= FLAG_ACL_BLOB
            h["acl_blob_len"] = len(acl)
    h["flags"] = flags

    parts: list[bytes | memoryview] = []
    for name, dtype, count_field in SECTIONS:
        sec = sections.get(name)
        if sec is None:
            continue
        buf: bytes | memoryview
        if isinstance(sec, bytes):
            buf = sec
            itemsize = 1
        else:
            arr = np.ascontiguousarray(sec, dtype=dtype)
            h[count_field] = len(arr)
            buf = arr.view(np.uint8).data  # the records' bytes, not a copy of them
            itemsize = dtype.itemsize
        parts.append(_shuffle(buf, itemsize) if comp == COMP_ZLIB_SHUFFLE else buf)
    raw_len = sum(len(p) for p in parts)
    h["raw_body_len"] = raw_len
    t1 = time.perf_counter()
    if comp == COMP_NONE:
        h["body_len"] = raw_len
        signed = b"".join([h.tobytes(), table.tobytes(), *parts])  # the only copy of the records
    else:
        body = zlib.compress(b"".join(parts), 1)
        h["body_len"] = len(body)
        signed = b"".join((h.tobytes(), table.tobytes(), body))
    t2 = time.perf_counter()
    sig = identity.sign(signed)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(serialise_s=t1 - t0, compress_s=t2 - t1, sign_s=t3 - t2)
    return b"".join((signed, sig))


def new_migration_id() -> bytes:
    return os.urandom(16)
