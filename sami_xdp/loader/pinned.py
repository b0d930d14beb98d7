"""The firewall's pinned program and maps, reopened by every command.

`Firewall.open` never compiles: it reopens the pins and refuses them if their
layout version differs from this build's header. `Firewall.create` compiles
once, fills the config and meta maps, and pins everything.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from ..base.errors import BpffsError, LayoutMismatchError, SamiError
from ..base.layout import Layout, load_layout
from . import batch, bpfsys
from . import bpffs as bpffs_mod
from .attach import Programs
from .compile import (
    LOOKUP_PROGS,
    MAP_NAMES,
    PROG_PIN,
    TC_PROG_PIN,
    Limits,
    compile_program,
    map_fds,
)
from .elemcount import count_program, run_count

# key / value struct of each map (None: a plain integer type)
MAP_TYPES: dict[str, tuple[str | None, str | None]] = {
    "sessions": ("session_key", "session_value"),
    "unassured": ("session_key", "session_value"),
    "protected": ("lpm_key", None),
    "syn_counters": ("syn_key", "syn_value"),
    "blacklist": ("ip_addr", "blacklist_value"),
    "acl_sets": ("acl_key", "acl_set"),
    "acl_hits": (None, None),
    "acl_rules": (None, "acl_entry"),
    "pickup": ("ip_addr", None),
    "arrivals": ("ip_addr", "arrival_value"),
    "fragments": ("frag_key", "frag_value"),
    "iface_roles": (None, None),
    "stages": (None, None),
    "tc_stages": (None, None),
    "scratch": (None, "pkt"),
    "config": (None, "fw_config"),
    "meta": (None, "samixdp_meta"),
    "verdicts": (None, "verdict_counter"),
    "clock_cache": (None, None),
    "tracking": ("ip_addr", "track_value"),
    "track": (None, "track_state"),
    "dirty_head": (None, None),
    "dirty_log": (None, "dirty_entry"),
    "events": (None, None),  # a ring buffer: no keys or values, records of struct fw_event
    "event_budget": (None, "event_budget"),
}

PERCPU_TYPES = {5, 6}
# the directory the event stream's single reader locks (ringbuf.exclusive), next to the pins
EVENTS_LOCK = "events_reader"  # bpffs refuses names with a dot


@cache
def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) - int(lo) + 1) if hi else 1
    return count


def _contiguous(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`a` as a C-contiguous array of `dtype`, without NumPy's (slow, for nested
    structs) dtype promotion when it already is one."""
    if isinstance(a, np.ndarray) and a.dtype is dtype and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=dtype)


def _scalar_dtype(size: int) -> np.dtype:
    """A key or value of `size` bytes; 0 (a ring buffer's) is an empty void."""
    if size == 0:
        return np.dtype((np.void, 0))
    return np.dtype({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size])


@dataclass
class PinnedMap:
    """One pinned map: raw fd plus the dtypes of its keys and values."""

    name: str
    fd: int
    info: bpfsys.MapInfo
    key_dtype: np.dtype
    value_dtype: np.dtype
    lookup_prog_fd: int = -1  # the session maps' bulk lookup program (compile.LOOKUP_PROGS)
    slot_dtype: np.dtype | None = None  # its frame's slots (struct lookup_slot)
    slots_per_frame: int = 0  # LOOKUP_SLOTS
    count_prog_fd: int = -1  # hash maps: the element count program, once loaded (-2: none)

    @property
    def percpu(self) -> bool:
        return self.info.type in PERCPU_TYPES

    def _value_buf(self) -> np.ndarray:
        n = possible_cpus() if self.percpu else 1
        return np.zeros(n, dtype=self.value_dtype)

    def lookup(self, key: np.ndarray) -> np.ndarray | None:
        """Value(s) for one key (an array of per-CPU values for per-CPU maps)."""
        key = _contiguous(key, self.key_dtype)
        out = self._value_buf()
        f = bpfsys.ffi()
        ok = bpfsys.lookup(
            self.fd, f.cast("void *", key.ctypes.data), f.cast("void *", out.ctypes.data)
        )
        if not ok:
            return None
        return out if self.percpu else out[0]

    def update(self, key: np.ndarray, value: np.ndarray, flags: int = bpfsys.BPF_ANY) -> None:
        key = _contiguous(key, self.key_dtype)
        value = _contiguous(value, self.value_dtype)
        f = bpfsys.ffi()
        bpfsys.update(
            self.fd,
            f.cast("void *", key.ctypes.data),
            f.cast("void *", value.ctypes.data),
            flags,
        )

    def delete(self, key: np.ndarray) -> bool:
        key = _contiguous(key, self.key_dtype)
        f = bpfsys.ffi()
        return bpfsys.delete(self.fd, f.cast("void *", key.ctypes.data))

    def keys(self) -> np.ndarray:
        """All keys by GET_NEXT_KEY (for maps without batch support: LPM)."""
        f = bpfsys.ffi()
        out = []
        cur = np.zeros(1, dtype=self.key_dtype)
        nxt = np.zeros(1, dtype=self.key_dtype)
        prev = None
        while bpfsys.next_key(
            self.fd,
            None if prev is None else f.cast("void *", cur.ctypes.data),
            f.cast("void *", nxt.ctypes.data),
        ):
            out.append(nxt.copy())
            cur[:] = nxt
            prev = True
        if not out:
            return np.zeros(0, dtype=self.key_dtype)
        return np.concatenate(out)

    def dump(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (key, value) with batch lookups; hash and LRU maps only. An empty
        map is known by its kernel count, without walking its buckets."""
        if self._kernel_count() == 0:
            return np.zeros(0, self.key_dtype), np.zeros(0, self.value_dtype)
        return batch.lookup_all(self.fd, self.key_dtype, self.value_dtype, self.info.max_entries)

    def scan(self, keep: batch.KeepFn | None = None) -> batch.ScanResult:
        """The rows `keep` selects, filtered chunk by chunk (by threads on big maps),
        and the map's fill level."""
        return batch.scan_batch(
            self.fd,
            self.info.type,
            self.info.max_entries,
            self.key_dtype,
            self.value_dtype,
            keep=keep,
        )

    def lookup_keys(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, values) of a few thousand keys: a frame of them per syscall
        through the map's lookup program, else one syscall each."""
        keys = _contiguous(keys, self.key_dtype)
        if self.lookup_prog_fd >= 0 and self.slot_dtype is not None:
            return batch.lookup_by_program(
                self.lookup_prog_fd, keys, self.slot_dtype, self.slots_per_frame
            )
        return batch.lookup_keys(self.fd, keys, self.value_dtype)

    def read_range(self, start: int, n: int) -> np.ndarray:
        """Array maps: the values at indexes start..start+n-1, in one call."""
        return batch.read_array_range(self.fd, self.value_dtype, start, n)

    def update_many(self, keys: np.ndarray, values: np.ndarray, flags: int = 0) -> int:
        """Batch writes; several threads for large batches."""
        return batch.update_parallel(self.fd, keys, values, flags)

    def delete_many(self, keys: np.ndarray) -> int:
        return batch.delete_all(self.fd, keys)

    def count(self) -> int:
        """Entries held: hash maps from the kernel's own counter (O(1)), else counted."""
        if self.info.type_name in ("array", "percpu_array"):
            return self.info.max_entries
        if self.info.type_name == "lpm_trie":
            return len(self.keys())
        kept = self._kernel_count()
        return kept if kept is not None else len(self.dump()[0])

    def _kernel_count(self) -> int | None:
        """Hash maps: the kernel's element count (its program loaded once), if any."""
        if self.info.type_name not in ("hash", "lru_hash"):
            return None
        if self.count_prog_fd == -1:
            fd = count_program(self.fd)
            self.count_prog_fd = -2 if fd is None else fd
        return run_count(self.count_prog_fd) if self.count_prog_fd >= 0 else None


def _dtypes(layout: Layout, name: str, info: bpfsys.MapInfo) -> tuple[np.dtype, np.dtype]:
    kstruct, vstruct = MAP_TYPES[name]
    kd = layout.dtype(kstruct) if kstruct else _scalar_dtype(info.key_size)
    if vstruct:
        vd = layout.dtype(vstruct)
    else:
        vd = _scalar_dtype(info.value_size)
    if kd.itemsize != info.key_size or vd.itemsize != info.value_size:
        raise LayoutMismatchError(
            f"pinned map {name} has key/value {info.key_size}/{info.value_size} bytes, this "
            f"build expects {kd.itemsize}/{vd.itemsize}: the pins come from another version"
        )
    return kd, vd


@dataclass
class Firewall:
    """Handles on one host's pinned firewall (program + maps)."""

    path: Path
    prog_fd: int  # the XDP entry program
    maps: dict[str, PinnedMap]
    layout: Layout = field(default_factory=load_layout)
    tc_prog_fd: int = -1  # the same datapath as a TC ingress program

    # ---- construction ----------------------------------------------------

    @classmethod
    def exists(cls, path: Path) -> bool:
        return (path / PROG_PIN).exists()

    @classmethod
    def open(cls, path: Path) -> Firewall:
        bpffs_mod.check_existing(path)
        if not cls.exists(path):
            raise BpffsError(
                f"nothing is loaded at {path}: run `samixdp attach IFACE` first "
                "(or pass the right --bpffs)"
            )
        layout = load_layout()
        meta_fd = bpfsys.obj_get(str(path / "meta"))
        meta_info = bpfsys.map_info(meta_fd)
        if meta_info.value_size != layout.sizeof("samixdp_meta"):
            raise LayoutMismatchError(
                f"pinned state at {path} has an unknown layout: "
                "run `samixdp reset` and attach again"
            )
        fw = cls(path=path, prog_fd=bpfsys.obj_get(str(path / PROG_PIN)), maps={}, layout=layout)
        if not (path / TC_PROG_PIN).exists():
            fw.close()
            raise LayoutMismatchError(
                f"pinned state at {path} has no TC program (an older release): "
                "detach, run `samixdp reset`, and attach again (state will be lost)"
            )
        fw.tc_prog_fd = bpfsys.obj_get(str(path / TC_PROG_PIN))
        fw.maps["meta"] = PinnedMap("meta", meta_fd, meta_info, *_dtypes(layout, "meta", meta_info))
        want = layout.consts["SAMIXDP_LAYOUT_VERSION"]
        got = int(fw.meta()["layout_version"])
        if got != want:
            fw.close()
            raise LayoutMismatchError(
                f"pinned state at {path} has layout version {got}, this samixdp uses {want}: "
                "detach, run `samixdp reset`, and attach again (state will be lost)"
            )
        for name in MAP_NAMES:
            if name == "meta":
                continue
            pin = path / name
            if not pin.exists():
                fw.close()
                raise LayoutMismatchError(f"pinned state at {path} lacks map {name}")
            fd = bpfsys.obj_get(str(pin))
            info = bpfsys.map_info(fd)
            fw.maps[name] = PinnedMap(name, fd, info, *_dtypes(layout, name, info))
        for name, prog in LOOKUP_PROGS.items():
            if not (path / prog).exists():
                fw.close()
                raise LayoutMismatchError(f"pinned state at {path} lacks program {prog}")
            fw._set_lookup(name, bpfsys.obj_get(str(path / prog)))
        return fw

    def _set_lookup(self, name: str, prog_fd: int) -> None:
        m = self.maps[name]
        m.lookup_prog_fd, m.slot_dtype = prog_fd, self.layout.dtype("lookup_slot")
        m.slots_per_frame = self.const("LOOKUP_SLOTS")

    @classmethod
    def create(cls, path: Path, limits: Limits, config_slots: list[int]) -> Firewall:
        """Compiles, initialises (meta, the settings in `config_slots`) and pins a new
        firewall at `path`; reopens the one already there."""
        bpffs_mod.ensure(path)
        if cls.exists(path):
            return cls.open(path)
        bpf, progs = compile_program(limits)
        layout = load_layout()
        fds = map_fds(bpf)
        pinned: list[Path] = []
        try:
            maps = {}
            for name, fd in fds.items():
                info = bpfsys.map_info(fd)
                maps[name] = PinnedMap(name, os.dup(fd), info, *_dtypes(layout, name, info))
            fw = cls(
                path=path,
                prog_fd=os.dup(progs[PROG_PIN]),
                maps=maps,
                layout=layout,
                tc_prog_fd=os.dup(progs[TC_PROG_PIN]),
            )
            for name, prog in LOOKUP_PROGS.items():
                fw._set_lookup(name, os.dup(progs[prog]))
            fw._init_maps(limits, config_slots)
            for name, fd in fds.items():
                bpfsys.obj_pin(fd, str(path / name))
                pinned.append(path / name)
            for prog in LOOKUP_PROGS.values():
                bpfsys.obj_pin(progs[prog], str(path / prog))
                pinned.append(path / prog)
            bpfsys.obj_pin(progs[TC_PROG_PIN], str(path / TC_PROG_PIN))
            pinned.append(path / TC_PROG_PIN)
            bpfsys.obj_pin(progs[PROG_PIN], str(path / PROG_PIN))  # last: marks the set complete
            pinned.append(path / PROG_PIN)
        except Exception:
            for pin in pinned:
                pin.unlink(missing_ok=True)
            raise
        finally:
            if hasattr(bpf, "cleanup"):
                bpf.cleanup()
        return fw

    def _init_maps(self, limits: Limits, config_slots: list[int]) -> None:
        meta = np.zeros(1, dtype=self.maps["meta"].value_dtype)
        meta["layout_version"] = self.layout.consts["SAMIXDP_LAYOUT_VERSION"]
        meta["max_sessions"] = limits.max_sessions
        meta["max_unassured"] = limits.max_unassured
        meta["max_blacklist"] = limits.max_blacklist
        meta["max_syn_counters"] = limits.max_syn_counters
        meta["created_ns"] = time.monotonic_ns()
        self.maps["meta"].update(np.zeros(1, np.uint32), meta)
        self.write_config(config_slots)

    def close(self) -> None:
        for m in self.maps.values():
            os.close(m.fd)
            for fd in (m.lookup_prog_fd, m.count_prog_fd):
                if fd >= 0:
                    os.close(fd)
        self.maps.clear()
        for fd in (self.prog_fd, self.tc_prog_fd):
            if fd >= 0:
                os.close(fd)
        self.prog_fd = self.tc_prog_fd = -1

    def __enter__(self) -> Firewall:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- small typed accessors -------------------------------------------

    def const(self, name: str) -> int:
        return self.layout.consts[name]

    def meta(self) -> np.ndarray:
        value = self.maps["meta"].lookup(np.zeros(1, np.uint32))
        if value is None:
            raise SamiError("meta map is empty")
        return value

    def read_config(self) -> list[int]:
        value = self.maps["config"].lookup(np.zeros(1, np.uint32))
        assert value is not None
        return [int(x) for x in value["slot"]]

    def write_config(self, slots: list[int]) -> None:
        cfg = np.zeros(1, dtype=self.maps["config"].value_dtype)
        cfg["slot"][0, : len(slots)] = slots
        self.maps["config"].update(np.zeros(1, np.uint32), cfg)

    def set_config(self, index: int, value: int) -> None:
        slots = self.read_config()
        slots[index] = value
        self.write_config(slots)

    def set_bans_hint(self, on: bool) -> None:
        """The datapath skips blacklist lookups while this runtime hint is 0:
        set it after inserting a ban from userspace."""
        idx = np.array([self.const("CFG_ENTRY_RUNTIME")], np.uint32)
        m = self.maps["config"]
        value = m.lookup(idx)
        assert value is not None
        value["slot"][self.const("RT_BANS_HINT")] = 1 if on else 0
        m.update(idx, value)

    def prog_id(self) -> int:
        return bpfsys.prog_info(self.prog_fd).id

    def tc_prog_id(self) -> int:
        return bpfsys.prog_info(self.tc_prog_fd).id

    def programs(self) -> Programs:
        return Programs(self.prog_fd, self.prog_id(), self.tc_prog_fd, self.tc_prog_id())


def unpin_all(path: Path) -> int:
    """Removes every pin of a firewall (its state goes with it)."""
    removed = 0
    for name in (*MAP_NAMES, *LOOKUP_PROGS.values(), TC_PROG_PIN, PROG_PIN):
        pin = path / name
        if pin.exists():
            pin.unlink()
            removed += 1
    with contextlib.suppress(OSError):
        (path / EVENTS_LOCK).rmdir()
    return removed
