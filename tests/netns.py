"""The pytest side of the namespace labs (testbed.netns): fixtures, the core
topology of the integration tests (client <-> firewall <-> VM), CLI helpers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import unavailable

from testbed.netns import SAMIXDP, TOPOLOGY, Lab, Netns, sh
from testbed.topology import (  # noqa: F401 (re-exported for the tests)
    CLIENT_IP,
    CLIENT_IP6,
    FW_CLIENT_IP,
    FW_CLIENT_IP6,
    VM_GW_IP,
    VM_GW_IP6,
    VM_IP,
    VM_IP6,
    VM_NET,
    VM_NET6,
    CoreTopology,
    build_core,
)


def require_root() -> None:
    """Fails in CI, skips elsewhere, when the test cannot build namespaces."""
    if os.geteuid() != 0:
        unavailable("needs root to build network namespaces")


# ---- the core topology (client <-> firewall <-> VM): testbed.topology ----------


@pytest.fixture(scope="module")
def core_topology() -> Iterator[CoreTopology]:
    """The issue-2 topology, built once per test module and always removed."""
    require_root()
    with Lab(tag="t") as lab:
        yield build_core(lab)


def adopt_demo_topology(lab: Lab, suffix: str) -> None:
    """Makes the Lab remove the demo topology built with SX_SUFFIX=suffix (by the
    script or the demo): its namespaces and its run dir."""
    for name in (f"sx{role}{suffix}" for role in ("cl", "gw", "fa", "fb", "vm")):
        if name not in lab.namespaces:
            lab.adopt_netns(name)
    lab.run_dir = Path(f"/run/sx{suffix}")


def demo_topology(lab: Lab, suffix: str, *args: str,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
    """scripts/veth_topology.sh ARGS with SX_SUFFIX=suffix; the Lab removes what it
    builds even if `down` is never reached."""
    adopt_demo_topology(lab, suffix)
    return sh("bash", TOPOLOGY, *args, env={"SX_SUFFIX": suffix}, check=check)


def demo_env(lab: Lab, suffix: str) -> dict[str, str]:
    """The demo topology's names and addresses (`veth_topology.sh env`)."""
    out = demo_topology(lab, suffix, "env").stdout
    return {key: value.strip("'")
            for key, _, value in (line.partition("=") for line in out.splitlines())}


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root()
    with Lab(tag="e") as lab_:
        yield lab_


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    """Asserts a CLI failure: non-zero exit, exactly one `samixdp: error:` line."""
    err = res.stderr.strip()
    assert res.returncode != 0, f"expected failure, got 0: {res.stdout}"
    assert err.startswith("samixdp: error: "), f"stderr: {res.stderr!r}"
    assert "\n" not in err, f"more than one line on stderr: {res.stderr!r}"
    assert "Traceback" not in res.stdout + res.stderr
    return err


def run_cli(args: Sequence[str], ns: Netns | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd: list[str | os.PathLike[str]] = [SAMIXDP, *args]
    if ns is not None:
        return ns.run(*cmd, check=False, env=env)
    return sh(*cmd, check=False, env=env)
