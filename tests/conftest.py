"""Shared fixtures: one compiled firewall per test session, emptied per test.

Tests that need root and a BPF-capable kernel are marked `needs_root`; when
CI is set they fail instead of skipping, so a broken runner cannot pass.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sami_xdp.loader import bpfsys  # noqa: E402
from sami_xdp.loader.compile import Limits  # noqa: E402
from sami_xdp.loader.pinned import Firewall, unpin_all  # noqa: E402
from sami_xdp.policy.config import create_firewall, default_config_slots  # noqa: E402
from sami_xdp.policy.roles import set_role  # noqa: E402

IN_CI = os.environ.get("CI", "") not in ("", "0", "false")
TEST_LIMITS = Limits(max_sessions=262144, max_unassured=4096, max_syn_counters=4096,
                     max_blacklist=4096)
# maps emptied between tests (arrays are reset by value instead)
RESETTABLE = (
    "sessions", "unassured", "syn_counters", "blacklist", "pickup", "arrivals", "fragments",
    "acl_rules",
    "iface_roles",
)
LO_IFINDEX = socket.if_nametoindex("lo")  # PROG_TEST_RUN without an interface: lo


def unavailable(reason: str) -> NoReturn:
    """A prerequisite is missing: skip locally, fail in CI (never a silent pass)."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: a missing prerequisite fails)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The path of an external tool the test needs (`make setup` installs them)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (run `make setup`)")
    return path


def _root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/lib/modules", os.uname().release, "build").exists():
        return "no kernel headers for bcc (run `make setup`)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_root: needs root, bcc and a BPF kernel")
    config.addinivalue_line("markers", "netns: builds network namespaces")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problem = _root_problem()
    if problem is None or IN_CI:
        return  # in CI a missing prerequisite must fail loudly, never skip
    skip = pytest.mark.skip(reason=problem)
    for item in items:
        if "needs_root" in item.keywords or "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def test_bpffs(run_id: str) -> Iterator[Path]:
    """A private bpffs under /run (visible inside `ip netns exec`)."""
    path = Path(f"/run/samixdp-test-{run_id}")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def firewall(test_bpffs: Path) -> Iterator[Firewall]:
    problem = _root_problem()
    if problem:
        unavailable(problem)
    fw = create_firewall(test_bpffs / "fw", TEST_LIMITS)
    yield fw
    fw.close()
    unpin_all(test_bpffs / "fw")


@pytest.fixture(scope="session")
def firewall_b(test_bpffs: Path, firewall: Firewall) -> Iterator[Firewall]:
    """A second host's firewall (migration destination) in the same test bpffs."""
    fw = create_firewall(test_bpffs / "fw-b", TEST_LIMITS)
    yield fw
    fw.close()
    unpin_all(test_bpffs / "fw-b")


def reset_firewall(fw: Firewall) -> None:
    """Empties every map and restores the default config."""
    for name in RESETTABLE:
        m = fw.maps[name]
        keys, _ = m.dump()
        if len(keys):
            m.delete_many(keys)
    for name in ("protected", "acl_sets", "tracking"):
        m = fw.maps[name]
        for key in m.keys():
            m.delete(key)
    # no migration tracked: a killed `migrate` of an earlier test (its slot is
    # reclaimed only when the next migration starts) must not log this test's sessions
    track = fw.maps["track"]
    track.update(np.zeros(1, np.uint32), np.zeros(1, track.value_dtype))
    for name in ("verdicts", "acl_hits"):
        m = fw.maps[name]
        zero = np.zeros(bpfsys_possible(), dtype=m.value_dtype)
        if name == "verdicts":
            for idx in range(m.info.max_entries):
                m.update(np.array([idx], np.uint32), zero)
    fw.write_config(default_config_slots(fw.layout))
    # crafted frames enter on lo: the test harness's stand-in for a VM-facing link
    set_role(fw, LO_IFINDEX, "vm")


def bpfsys_possible() -> int:
    from sami_xdp.loader.pinned import possible_cpus

    return possible_cpus()


@pytest.fixture
def fw(firewall: Firewall) -> Firewall:
    """The session's firewall, emptied and with default config."""
    reset_firewall(firewall)
    return firewall


# The datapath's two program kinds: test modules that judge packets take their
# `fw` from fresh_firewall(firewall, kind) with these as params, so every verdict
# is asserted for the XDP program and for the TC one (the same maps behind both).
PROGRAM_KINDS = ("xdp", "tc")
VERDICT_NAMES = {"xdp": {1: "DROP", 2: "PASS"}, "tc": {0: "PASS", 2: "DROP"}}


def fresh_firewall(firewall: Firewall, kind: str) -> Firewall:
    """The emptied session firewall whose `prog_fd` is the program of `kind`."""
    reset_firewall(firewall)
    if kind == "tc":
        return dataclasses.replace(firewall, prog_fd=firewall.tc_prog_fd)
    return firewall


def program_kind(fw: Firewall) -> str:
    return "tc" if fw.prog_fd == fw.tc_prog_fd else "xdp"


def run_program(fw: Firewall, frame: bytes, ifindex: int = 0) -> tuple[str, bpfsys.TestRunResult]:
    """One PROG_TEST_RUN of `fw`'s program: ("PASS" | "DROP", the raw result)."""
    kind = program_kind(fw)
    res = bpfsys.prog_test_run(fw.prog_fd, frame, ingress_ifindex=ifindex, skb=kind == "tc")
    return VERDICT_NAMES[kind].get(res.retval, f"retval={res.retval}"), res


def run_frame(fw: Firewall, frame: bytes, ifindex: int = 0) -> str:
    """Feeds one frame to the real program; returns "PASS" or "DROP"."""
    return run_program(fw, frame, ifindex)[0]
