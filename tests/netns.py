"""The pytest side of the namespace labs (testbed.netns): fixtures, the core
topology of the integration tests (client <-> firewall <-> VM), CLI helpers."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import unavailable

from testbed.netns import SAMIXDP, Lab, Netns, sh

# addresses of the core topology (client <-> firewall <-> VM)
CLIENT_IP = "192.0.2.10"
FW_CLIENT_IP = "192.0.2.1"
VM_IP = "10.1.1.1"
VM_NET = "10.1.1.0/24"
VM_GW_IP = "10.1.1.254"


def require_root() -> None:
    """Fails in CI, skips elsewhere, when the test cannot build namespaces."""
    if os.geteuid() != 0:
        unavailable("needs root to build network namespaces")


# ---- the issue-2 topology: client <-> firewall (router) <-> VM ------------------


@dataclass
class CoreTopology:
    lab: Lab
    client: Netns
    fw: Netns
    vm: Netns
    bpffs: Path
    fw_links: tuple[str, str] = ("sxf-cl", "sxf-vm")

    def samixdp(self, *args: str, check: bool = False,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The real CLI inside the firewall namespace, on this topology's bpffs."""
        return self.fw.run(
            SAMIXDP, *args, check=check, timeout=timeout,
            env={
                "SAMIXDP_BPFFS": str(self.bpffs),
                "SAMIXDP_CONFIG_DIR": str(self.lab.run_dir / "config"),
                "SAMIXDP_STATE_DIR": str(self.lab.run_dir / "state"),
            },
        )

    def samixdp_json(self, *args: str) -> object:
        res = self.samixdp(*args, "--json", check=True)
        return json.loads(res.stdout)


def build_core(lab: Lab) -> CoreTopology:
    """client 192.0.2.10 -- 192.0.2.1 [firewall, router] 10.1.1.254 -- 10.1.1.1 VM."""
    client, fw, vm = lab.netns("c"), lab.netns("f"), lab.netns("v")
    lab.veth(client, "sxc-fw", fw, "sxf-cl")
    lab.veth(fw, "sxf-vm", vm, "sxv-fw")
    fw.sysctl("net.ipv4.ip_forward", 1)
    client.ip("addr", "add", f"{CLIENT_IP}/24", "dev", "sxc-fw")
    fw.ip("addr", "add", f"{FW_CLIENT_IP}/24", "dev", "sxf-cl")
    fw.ip("addr", "add", f"{VM_GW_IP}/24", "dev", "sxf-vm")
    vm.ip("addr", "add", f"{VM_IP}/24", "dev", "sxv-fw")
    for ns, link in ((client, "sxc-fw"), (fw, "sxf-cl"), (fw, "sxf-vm"), (vm, "sxv-fw")):
        ns.ip("link", "set", link, "up")
    client.ip("route", "add", "default", "via", FW_CLIENT_IP)
    vm.ip("route", "add", "default", "via", VM_GW_IP)
    return CoreTopology(lab, client, fw, vm, lab.bpffs())


@pytest.fixture(scope="module")
def core_topology() -> Iterator[CoreTopology]:
    """The issue-2 topology, built once per test module and always removed."""
    require_root()
    with Lab(tag="t") as lab:
        yield build_core(lab)


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
