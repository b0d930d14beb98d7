"""The three views of the shared structs must agree byte for byte.

bcc compiles bpf/fw_xdp.c with clang and hands back ctypes Key/Leaf classes;
Python reads and writes the pinned maps through cffi types built from
bpf/session_map.h and NumPy dtypes derived from them. Every map's key and
value is flattened to {field path: (offset, size[, count])} in each view and
the three flattenings are compared, so a field that moves, grows, changes
array length or disappears anywhere is reported by path.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import re

import cffi
import numpy as np
import pytest

from sami_xdp.base.layout import STRUCTS, load_layout
from sami_xdp.base.paths import program_path
from sami_xdp.loader import bpfsys
from sami_xdp.loader.compile import MAP_NAMES, Limits, bcc_layouts, compile_program, map_fds
from sami_xdp.loader.pinned import MAP_TYPES, PERCPU_TYPES, possible_cpus

Flat = dict[str, tuple[int, ...]]
SMALL = Limits(max_sessions=1024, max_unassured=64, max_syn_counters=64, max_blacklist=64)

# ---- flatteners ----------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def flat_ctypes(ct: type, base: int = 0, prefix: str = "") -> Flat:
    """ctypes type -> {path: (offset, size)}; arrays add their length and recurse
    into element 0 as `path[]`. bcc's own alignment fillers (`__pad*`) are skipped."""
    size = ctypes.sizeof(ct)
    if issubclass(ct, ctypes.Array):
        out: Flat = {prefix: (base, size, ct._length_)}
        out.update(flat_ctypes(ct._type_, base, prefix + "[]"))
        return out
    out = {prefix: (base, size)}
    if issubclass(ct, (ctypes.Structure, ctypes.Union)):
        for fdesc in ct._fields_:
            name, ftype = fdesc[0], fdesc[1]
            if name.startswith("__pad"):
                continue
            if len(fdesc) > 2:  # bitfields have no byte offset of their own
                out[_join(prefix, name)] = (-1, -1)
                continue
            out.update(flat_ctypes(ftype, base + getattr(ct, name).offset, _join(prefix, name)))
    return out


def flat_cffi(ffi: cffi.FFI, ctype: object, base: int = 0, prefix: str = "") -> Flat:
    size = ffi.sizeof(ctype)
    kind = ctype.kind  # type: ignore[attr-defined]
    if kind == "array":
        out: Flat = {prefix: (base, size, ctype.length)}  # type: ignore[attr-defined]
        out.update(flat_cffi(ffi, ctype.item, base, prefix + "[]"))  # type: ignore[attr-defined]
        return out
    out = {prefix: (base, size)}
    if kind in ("struct", "union"):
        for name, field in ctype.fields:  # type: ignore[attr-defined]
            if field.bitshift != -1:
                out[_join(prefix, name)] = (-1, -1)
                continue
            out.update(flat_cffi(ffi, field.type, base + field.offset, _join(prefix, name)))
    return out


def flat_dtype(dt: np.dtype, base: int = 0, prefix: str = "") -> Flat:
    if dt.subdtype is not None:
        item, shape = dt.subdtype
        count = math.prod(shape)
        out: Flat = {prefix: (base, dt.itemsize, count)}
        out.update(flat_dtype(item, base, prefix + "[]"))
        return out
    out = {prefix: (base, dt.itemsize)}
    for name in dt.names or ():
        fdt, off = dt.fields[name][:2]
        out.update(flat_dtype(fdt, base + off, _join(prefix, name)))
    return out


def layout_diff(a: Flat, b: Flat) -> dict[str, tuple[object, object]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def assert_same_layout(what: str, a: Flat, b: Flat, names: tuple[str, str]) -> None:
    diff = layout_diff(a, b)
    if diff:
        lines = [f"  {path or '<whole>'}: {names[0]}={x} {names[1]}={y}"
                 for path, (x, y) in diff.items()]
        raise AssertionError(f"{what}: layouts differ ((offset, size[, count])):\n"
                             + "\n".join(lines))


def cffi_struct(struct: str) -> Flat:
    ffi = load_layout().ffi
    return flat_cffi(ffi, ffi.typeof(f"struct {struct}"))


# ---- unit tests of the checker itself (no root) ---------------------------------

_CHECK_CDEF = """
struct demo { uint32_t a; uint16_t b; uint8_t c; uint8_t pad[1]; uint64_t d[2]; };
struct holey { uint8_t a; uint64_t b; };
struct outer { uint32_t n; uint32_t pad; struct demo items[3]; };
struct addr { uint32_t w[4]; };
struct pair { struct addr lo; struct addr hi; uint16_t port; uint8_t proto; uint8_t pad; };
"""


@pytest.fixture(scope="module")
def demo_ffi() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(_CHECK_CDEF)
    return ffi


class Demo(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16), ("c", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 1), ("d", ctypes.c_uint64 * 2)]


class Outer(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("items", Demo * 3)]


class Addr(ctypes.Structure):  # struct ip_addr's shape: a struct holding an array
    _fields_ = [("w", ctypes.c_uint32 * 4)]


class Pair(ctypes.Structure):
    _fields_ = [("lo", Addr), ("hi", Addr), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


def _pair_dtype(words: int) -> np.dtype:
    addr = np.dtype([("w", np.uint32, (words,))])
    return np.dtype([("lo", addr), ("hi", addr), ("port", np.uint16), ("proto", np.uint8),
                     ("pad", np.uint8)])


def _demo_flat(ffi: cffi.FFI, name: str) -> Flat:
    return flat_cffi(ffi, ffi.typeof(f"struct {name}"))


def test_checker_accepts_identical_layouts(demo_ffi):
    assert_same_layout("demo", flat_ctypes(Demo), _demo_flat(demo_ffi, "demo"), ("ct", "cffi"))
    assert_same_layout("outer", flat_ctypes(Outer), _demo_flat(demo_ffi, "outer"), ("ct", "cffi"))
    dt = np.dtype({"names": ["a", "b", "c", "pad", "d"],
                   "formats": [np.uint32, np.uint16, np.uint8, (np.uint8, 1), (np.uint64, 2)],
                   "offsets": [0, 4, 6, 7, 8], "itemsize": 24})
    assert_same_layout("dtype", flat_dtype(dt), _demo_flat(demo_ffi, "demo"), ("np", "cffi"))
    pair = _demo_flat(demo_ffi, "pair")
    assert_same_layout("pair", flat_ctypes(Pair), pair, ("ct", "cffi"))
    assert_same_layout("pair", flat_dtype(_pair_dtype(4)), pair, ("np", "cffi"))
    assert {"lo", "lo.w", "lo.w[]", "hi.w", "port"} <= set(pair), "nested fields by path"


class DemoSwapped(ctypes.Structure):  # b and c swapped: same size, other offsets
    _fields_ = [("a", ctypes.c_uint32), ("c", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 1),
                ("b", ctypes.c_uint16), ("d", ctypes.c_uint64 * 2)]


class DemoWide(ctypes.Structure):  # b widened: everything after it moves
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint32), ("c", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 1), ("d", ctypes.c_uint64 * 2)]


class DemoShortArray(ctypes.Structure):  # d has one element less
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16), ("c", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 1), ("d", ctypes.c_uint64 * 1)]


class DemoMissing(ctypes.Structure):  # c folded into the padding
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16), ("pad", ctypes.c_uint8 * 2),
                ("d", ctypes.c_uint64 * 2)]


class HoleyPacked(ctypes.Structure):  # implicit padding lost (attribute packed)
    _pack_ = 1
    _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint64)]


class OuterShort(ctypes.Structure):  # nested struct array of another length
    _fields_ = [("n", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("items", Demo * 2)]


class AddrV4(ctypes.Structure):  # a 4-byte address where struct ip_addr has 16
    _fields_ = [("w", ctypes.c_uint32 * 1)]


class PairV4(ctypes.Structure):  # the nested address shrank: its array and all after move
    _fields_ = [("lo", AddrV4), ("hi", AddrV4), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


@pytest.mark.parametrize("ct, struct, bad_path", [
    (DemoSwapped, "demo", "b"),
    (DemoWide, "demo", "c"),
    (DemoShortArray, "demo", "d"),
    (DemoMissing, "demo", "c"),
    (HoleyPacked, "holey", "b"),
    (OuterShort, "outer", "items"),
    (PairV4, "pair", "lo.w"),
], ids=["swapped", "widened", "short-array", "missing", "packed", "nested-array",
        "nested-struct"])
def test_checker_rejects_different_layouts(demo_ffi, ct, struct, bad_path):
    with pytest.raises(AssertionError, match="layouts differ") as err:
        assert_same_layout(struct, flat_ctypes(ct), _demo_flat(demo_ffi, struct), ("ct", "cffi"))
    assert f"  {bad_path}:" in str(err.value)


def test_checker_rejects_a_dtype_with_a_moved_field(demo_ffi):
    good = _demo_flat(demo_ffi, "demo")
    bad = np.dtype({"names": ["a", "b", "c", "pad", "d"],
                    "formats": [np.uint32, np.uint16, np.uint8, (np.uint8, 1), (np.uint64, 2)],
                    "offsets": [0, 4, 6, 7, 12], "itemsize": 28})
    with pytest.raises(AssertionError, match="d: np="):
        assert_same_layout("dtype", flat_dtype(bad), good, ("np", "cffi"))


def test_checker_rejects_a_dtype_with_a_short_nested_address(demo_ffi):
    diff = layout_diff(flat_dtype(_pair_dtype(2)), _demo_flat(demo_ffi, "pair"))
    assert {"lo", "lo.w", "hi", "hi.w", "port", "proto", "pad"} <= set(diff)


def test_checker_sees_a_real_struct_drift():
    """A session_value whose `state` became a u16 and lost its pad byte (an edit that
    keeps sizeof() unchanged) is caught against the real header."""
    ffi = load_layout().ffi
    real = flat_cffi(ffi, ffi.typeof("struct session_value"))
    drifted = cffi.FFI()
    drifted.cdef("""struct tcp_dir { uint32_t end; uint32_t maxend; uint32_t maxwin;
        uint32_t maxack; uint8_t scale; uint8_t flags; uint16_t pad; };
        struct session_value { uint64_t last_seen_ns; uint32_t ifindex[2]; uint16_t state;
        uint8_t initiator; uint8_t flags; uint32_t dirty_round; struct tcp_dir tcp[2];
        uint64_t packets[2]; uint64_t bytes[2]; uint64_t created_ns; };""")
    diff = layout_diff(real, flat_cffi(drifted, drifted.typeof("struct session_value")))
    # same total size (the pad byte went), yet every moved or vanished field is reported
    assert set(diff) == {"state", "initiator", "flags", "pad"}


def test_checker_sees_the_old_ipv4_key_in_the_real_session_key():
    """A session_key of the previous layout (u32 addresses) against the real one: the
    nested struct ip_addr fields are reported by path, and everything after them."""
    ffi = load_layout().ffi
    real = flat_cffi(ffi, ffi.typeof("struct session_key"))
    old = cffi.FFI()
    old.cdef("""struct session_key { uint32_t addr_lo; uint32_t addr_hi; uint16_t port_lo;
        uint16_t port_hi; uint8_t proto; uint8_t pad[3]; };""")
    diff = layout_diff(real, flat_cffi(old, old.typeof("struct session_key")))
    assert {"", "addr_lo", "addr_lo.w", "addr_lo.w[]", "addr_hi", "port_lo", "proto"} <= set(diff)


# ---- the real program -------------------------------------------------------------


def test_every_shared_struct_dtype_matches_cffi():
    layout = load_layout()
    for struct in STRUCTS:
        assert_same_layout(struct, flat_dtype(layout.dtype(struct)), cffi_struct(struct),
                           ("numpy", "cffi"))


def _declared_maps() -> set[str]:
    """Map names declared in bpf/fw_xdp.c by bcc's BPF_* macros."""
    src = re.sub(r"/\*.*?\*/|//[^\n]*", "", program_path().read_text(), flags=re.S)
    names = set()
    for macro, args in re.findall(r"^\s*(BPF_[A-Z_]+)\s*\((.*?)\)\s*;", src, flags=re.M | re.S):
        parts = [a.strip() for a in args.split(",")]
        if macro == "BPF_TABLE":
            names.add(parts[3])
        elif macro in ("BPF_ARRAY", "BPF_PERCPU_ARRAY", "BPF_HASH", "BPF_PERCPU_HASH",
                       "BPF_LPM_TRIE", "BPF_PROG_ARRAY", "BPF_DEVMAP", "BPF_CPUMAP",
                       "BPF_XSKMAP", "BPF_QUEUE", "BPF_STACK", "BPF_RINGBUF_OUTPUT"):
            names.add(parts[0])
    return names


def test_every_declared_map_is_pinned_and_typed():
    declared = _declared_maps()
    assert declared, "no BPF map declarations found in fw_xdp.c"
    assert declared == set(MAP_NAMES), "maps declared in fw_xdp.c vs pinned (MAP_NAMES)"
    assert set(MAP_TYPES) == set(MAP_NAMES), "MAP_TYPES must describe every pinned map"
    structs = {s for pair in MAP_TYPES.values() for s in pair if s}
    assert structs <= set(STRUCTS), "every map struct must be in layout.STRUCTS"


@pytest.fixture(scope="module")
def compiled():
    bpf, _progs = compile_program(SMALL)
    try:
        fds = map_fds(bpf)
        infos = {name: bpfsys.map_info(fd) for name, fd in fds.items()}
        yield bcc_layouts(bpf), infos
    finally:
        bpf.cleanup()


@pytest.mark.needs_root
@pytest.mark.parametrize("name", MAP_NAMES)
def test_bcc_key_leaf_match_cffi_and_numpy(compiled, name):
    layouts, infos = compiled
    key_ct, leaf_ct = layouts[name]
    info = infos[name]
    if info.type_name == "ringbuf":
        # no keys or values (bcc's Key/Leaf are its macro's placeholders): records of
        # struct fw_event, 8-aligned as the ring aligns them, in a ring of the header's size
        assert (info.key_size, info.value_size) == (0, 0), name
        assert MAP_TYPES[name] == (None, None), name
        assert info.max_entries == load_layout().const("SAMIXDP_EVENT_PAGES") * mmap.PAGESIZE
        assert load_layout().sizeof("fw_event") % 8 == 0
        return
    if info.type in PERCPU_TYPES:
        # bcc hands back one Leaf per possible CPU; the kernel strides per-CPU values
        # at 8 bytes, which PinnedMap's contiguous n x value_dtype buffer relies on
        assert issubclass(leaf_ct, ctypes.Array), f"{name}: per-CPU Leaf is not an array"
        assert leaf_ct._length_ == possible_cpus()
        leaf_ct = leaf_ct._type_
        assert info.value_size % 8 == 0, f"{name}: per-CPU value size must be 8-aligned"
    layout = load_layout()
    for role, ct, struct, kernel_size in (
        ("key", key_ct, MAP_TYPES[name][0], info.key_size),
        ("value", leaf_ct, MAP_TYPES[name][1], info.value_size),
    ):
        assert ctypes.sizeof(ct) == kernel_size, f"{name} {role}: bcc vs kernel map size"
        if struct is None:
            assert not issubclass(ct, (ctypes.Structure, ctypes.Array)), (
                f"{name} {role}: bcc sees a compound type, MAP_TYPES says scalar")
            continue
        want = cffi_struct(struct)
        assert_same_layout(f"{name} {role} (struct {struct})", flat_ctypes(ct), want,
                           ("bcc", "cffi"))
        assert_same_layout(f"{name} {role} (struct {struct})", flat_dtype(layout.dtype(struct)),
                           want, ("numpy", "cffi"))


@pytest.mark.needs_root
def test_pinned_maps_match_this_build(fw):
    """The fixture's pinned maps (as the CLI reopens them) have this header's sizes."""
    layout = load_layout()
    assert int(fw.meta()["layout_version"]) == layout.consts["SAMIXDP_LAYOUT_VERSION"]
    for name, m in fw.maps.items():
        kstruct, vstruct = MAP_TYPES[name]
        if kstruct:
            assert m.info.key_size == layout.sizeof(kstruct), name
        if vstruct:
            assert m.info.value_size == layout.sizeof(vstruct), name
        assert m.key_dtype.itemsize == m.info.key_size, name
        assert m.value_dtype.itemsize == m.info.value_size, name


# ---- the layout version moves with the layout -------------------------------------

# SAMIXDP_LAYOUT_VERSION -> digest of every struct and constant of that version
# (`load_layout().digest()`). Changing the header without bumping the version fails
# here; after a bump, add the new version's line.
LAYOUT_DIGESTS = {
    5: "2f833fd91da79a44b7e29045624c5c590937d8f86a8d5108010c9152e665e5dd",
    6: "1a3d5ed0ff90111d2924d43590e36a727f120bce543c9a111dfd85bb0640eda9",
    7: "ef36b0f5f780b16e5e8728b9e3ad90408046c4ae407d1fbd6ab8dc8640f5e992",
    8: "940d072b678cfd8dea986a38202d44ca04b2e4a4a16d4578788d38e35975550f",
    9: "7a476eced6e3cc19dd975865d7df31fb179d0a41627034a6c149b54cfa97cc8f",
    10: "5f07a877162a06b483cfa7372349d931329338af7c91a619050316d643f4e6c7",
}


def test_layout_changes_bump_the_layout_version():
    layout = load_layout()
    version = layout.const("SAMIXDP_LAYOUT_VERSION")
    assert version in LAYOUT_DIGESTS, (
        f"layout version {version} has no recorded digest: add {version}: "
        f"{layout.digest()!r} to LAYOUT_DIGESTS"
    )
    assert layout.digest() == LAYOUT_DIGESTS[version], (
        "bpf/session_map.h changed but SAMIXDP_LAYOUT_VERSION did not: pinned maps of "
        "the old layout would be reinterpreted. Bump the version and record its digest."
    )


def test_digest_sees_a_moved_field_and_a_changed_constant(monkeypatch):
    from sami_xdp.base import layout as layout_mod

    text = layout_mod.header_path().read_text()
    base = load_layout().digest()
    for old, new in (
        ("    __u8 state;           /* ST_* */\n    __u8 initiator;",
         "    __u8 initiator;\n    __u8 state;           /* ST_* */"),
        ("#define ST_ICMP 10", "#define ST_ICMP 11"),
    ):
        assert old in text
        fake = _Fake(text.replace(old, new))
        monkeypatch.setattr(layout_mod, "header_path", lambda f=fake: f)
        layout_mod.load_layout.cache_clear()
        try:
            assert layout_mod.load_layout().digest() != base
        finally:
            layout_mod.load_layout.cache_clear()


class _Fake:
    """Stands in for the header's path with another text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def read_text(self) -> str:
        return self.text
