"""Compile bpf/fw_xdp.c with bcc and pin the program and its maps.

Compilation happens once per host (or after `samixdp reset`): every later
command reopens the pins, so the CLI stays fast and bcc is only needed here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bcc import BPF

from ..base.errors import CompileError
from ..base.layout import load_layout
from ..base.paths import bpf_dir, program_path

PROG_PIN = "prog"
TC_PROG_PIN = "prog_tc"


@dataclass(frozen=True)
class ProgramKind:
    """The datapath as one kind of program: its entry point, the program array
    its stages sit in (by STAGE_* slot), and where the entry point is pinned."""

    pin: str
    bcc_type: int
    entry: str
    stages_map: str
    stages: tuple[tuple[str, str], ...]


# userspace's bulk lookup programs (never attached), by the map they read
LOOKUP_PROGS = {"sessions": "lookup_sessions", "unassured": "lookup_unassured"}

PROGRAM_KINDS = (
    ProgramKind(PROG_PIN, BPF.XDP, "xdp_firewall", "stages",
                (("STAGE_SLOW", "xdp_slow"), ("STAGE_ACL", "xdp_acl"))),
    ProgramKind(TC_PROG_PIN, BPF.SCHED_CLS, "tc_firewall", "tc_stages",
                (("STAGE_SLOW", "tc_slow"), ("STAGE_ACL", "tc_acl"))),
)

MAP_NAMES = (
    "sessions",
    "unassured",
    "protected",
    "syn_counters",
    "blacklist",
    "acl_sets",
    "acl_hits",
    "acl_rules",
    "pickup",
    "arrivals",
    "fragments",
    "iface_roles",
    "stages",
    "tc_stages",
    "scratch",
    "config",
    "meta",
    "verdicts",
    "clock_cache",
    "tracking",
    "track",
    "dirty_head",
    "dirty_log",
    "events",
    "event_budget",
)


@dataclass(frozen=True)
class Limits:
    """Map capacities, fixed when the maps are created."""

    max_sessions: int = 1 << 20
    max_unassured: int = 1 << 18
    max_syn_counters: int = 1 << 16
    max_blacklist: int = 1 << 16

    def cflags(self) -> list[str]:
        return [
            f"-DMAX_SESSIONS={self.max_sessions}",
            f"-DMAX_UNASSURED={self.max_unassured}",
            f"-DMAX_SYN_COUNTERS={self.max_syn_counters}",
            f"-DMAX_BLACKLIST={self.max_blacklist}",
        ]


def _headers_dir() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Path]:
    """bcc writes compiler and verifier output straight to fd 2."""
    with tempfile.NamedTemporaryFile(prefix="samixdp-bcc-", suffix=".log", delete=False) as tmp:
        path = Path(tmp.name)
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if "error" in line.lower() or "invalid" in line.lower() or "too large" in line:
            return line.strip()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no details"


def compile_program(
    limits: Limits, extra_cflags: tuple[str, ...] = ()
) -> tuple[object, dict[str, int]]:
    """Returns (bcc.BPF object, program fd by pin name: the XDP and the TC entry
    programs, the lookup programs). The BPF object owns the map and program fds."""
    if not (_headers_dir() / "include").exists() and not (_headers_dir()).exists():
        raise CompileError(
            f"no kernel headers at {_headers_dir()}: run `sudo make setup` (installs "
            "linux-headers-amd64 and links them for this kernel)"
        )
    cflags = [f"-I{bpf_dir()}", "-Wno-compare-distinct-pointer-types", *limits.cflags()]
    cflags.extend(extra_cflags)
    with _captured_stderr() as log_path:
        try:
            bpf = BPF(src_file=str(program_path()).encode(), cflags=cflags)
            consts = load_layout().consts
            entries = {}
            for kind in PROGRAM_KINDS:
                entries[kind.pin] = int(bpf.load_func(kind.entry.encode(), kind.bcc_type).fd)
                stages = bpf[kind.stages_map.encode()]
                for slot, name in kind.stages:
                    stage_fn = bpf.load_func(name.encode(), kind.bcc_type)
                    stages[ctypes.c_int(consts[slot])] = ctypes.c_int(stage_fn.fd)
            for name in LOOKUP_PROGS.values():
                entries[name] = int(bpf.load_func(name.encode(), BPF.XDP).fd)
        except Exception as exc:  # bcc raises bare Exception
            log = log_path.read_text(errors="replace")
            log_path.unlink(missing_ok=True)
            if "kernel headers" in log or "kconfig.h" in log:
                raise CompileError(
                    f"bcc cannot find kernel headers for {platform.release()}: run "
                    "`sudo make setup`"
                ) from exc
            raise CompileError(f"cannot build the XDP program: {_first_error(log)}") from exc
    log_path.unlink(missing_ok=True)
    return bpf, entries


def map_fds(bpf: object) -> dict[str, int]:
    return {name: int(bpf[name.encode()].map_fd) for name in MAP_NAMES}  # type: ignore[index]


def bcc_layouts(bpf: object) -> dict[str, tuple[object, object]]:
    """bcc's generated ctypes Key/Leaf of every map (for the layout check)."""
    out = {}
    for name in MAP_NAMES:
        table = bpf[name.encode()]  # type: ignore[index]
        out[name] = (table.Key, table.Leaf)
    return out
