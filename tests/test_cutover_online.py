"""Cutover without a human, end to end: real agents on both hosts, a real
`samixdp migrate --until-cutover` on A, and B's datapath seeing the VM arrive
(a gratuitous ARP fed to B's program on a VM-side interface). Nobody types
`--final`: B's agent asks A's agent, which finishes A's migration.

Also the abuse cases: a spoofed announcement from B's uplink starts nothing, and a
trusted peer that is not the migration's destination cannot end it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import VM, Agent, Pair, count_vm, establish, free_port, make_pair, start_agent, wait_for
from conftest import run_program, unavailable

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, TrustStore
from sami_xdp.migrate.errors import MigrationRefused
from sami_xdp.migrate.phases import send_cutover
from sami_xdp.migrate.vmset import VmAddrs
from sami_xdp.policy.roles import set_role
from testbed import packets as P

pytestmark = pytest.mark.needs_root


@pytest.fixture
def links() -> Iterator[tuple[int, int]]:
    """Two fresh veths of B: (VM side, uplink)."""
    names = [f"sxct{uuid.uuid4().hex[:6]}" for _ in range(2)]
    try:
        for n in names:
            made = subprocess.run(["ip", "link", "add", n, "type", "veth", "peer", "name",
                                   n + "p"], capture_output=True, text=True)
            if made.returncode != 0:
                unavailable(f"cannot add a veth pair: {made.stderr.strip()}")
        yield tuple(int(Path(f"/sys/class/net/{n}/ifindex").read_text()) for n in names)
    finally:
        for n in names:
            subprocess.run(["ip", "link", "del", n], capture_output=True, check=False)


@pytest.fixture
def hosts(fw: Firewall, firewall_b: Firewall, tmp_path: Path,
          links: tuple[int, int]) -> Iterator[tuple[Pair, Agent, tuple[int, int]]]:
    """A and B with agents on both; B knows where A's agent listens."""
    with make_pair(fw, firewall_b, tmp_path) as pair:
        port_a = free_port()
        trust = TrustStore.load(pair.b.config)
        a = trust.get("hosta")
        trust.add("hosta", f"127.0.0.1:{port_a}", a.public_raw, replace=True, vms=a.vms)
        trust.save()
        vm_side, uplink = links
        set_role(pair.b.fw, vm_side, "vm")
        set_role(pair.b.fw, uplink, "uplink")
        agent_a = start_agent(pair.a, port_a)
        try:
            yield pair, agent_a, links
        finally:
            agent_a.stop()


def start_migration(pair: Pair) -> subprocess.Popen[str]:
    bg = pair.a.popen("migrate", "--vm", VM, "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1", "--keep-source", "--json")
    pair.agent.wait_event("cutover-armed", vm=VM)
    return bg


def test_the_vm_arriving_at_b_ends_the_migration_with_no_final_typed(hosts):
    pair, agent_a, (vm_side, _) = hosts
    establish(pair.a.fw, 6)
    bg = start_migration(pair)
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw) == 6, alive=bg)
        establish(pair.a.fw, 2, base=31000)  # the VM keeps working during pre-copy
        assert bg.poll() is None
        # the hypervisor moved the VM: its announcement reaches B on the VM side
        verdict, _ = run_program(pair.b.fw, P.garp(VM), ifindex=vm_side)
        assert verdict == "PASS"
        out, err = bg.communicate(timeout=30)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode == 0, err
    report = json.loads(out)
    assert report["outcome"] == "completed"
    assert report["phases"][-1]["name"] == "final delta"
    assert report["cutover"] == f"hostb saw {VM} arrive (arp on ifindex {vm_side})"
    pair.agent.wait_event("cutover-requested", vm=VM)
    agent_a.wait_event("cutover", peer="hostb", vm=VM)
    assert count_vm(pair.b.fw) == 8
    # the final round closed the watch and opened the pickup window
    assert len(pair.b.fw.maps["arrivals"].keys()) == 0
    assert len(pair.b.fw.maps["pickup"].keys()) == 1


def test_a_spoofed_announcement_from_the_uplink_starts_no_cutover(hosts):
    pair, _, (_, uplink) = hosts
    establish(pair.a.fw, 3)
    bg = start_migration(pair)
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw) == 3, alive=bg)
        run_program(pair.b.fw, P.garp(VM), ifindex=uplink)
        run_program(pair.b.fw, P.udp(VM, 5353, "192.0.2.10", 53), ifindex=uplink)
        with pytest.raises(AssertionError):
            pair.agent.wait_event("cutover-seen", timeout=1.5)
        assert bg.poll() is None  # still pre-copying
        assert len(pair.b.fw.maps["pickup"].keys()) == 0
        fin = pair.a.cli("migrate", "--vm", VM, "--final", "--json")
        assert fin.returncode == 0, fin.stderr
        assert json.loads(fin.stdout)["cutover"].startswith("the operator")
        bg.wait(timeout=20)
    finally:
        if bg.poll() is None:
            bg.kill()


def test_only_the_destination_may_end_the_migration(hosts, tmp_path):
    """C, trusted by A, signs a valid cutover request for A's migration to B: refused,
    and the migration goes on."""
    pair, agent_a, _ = hosts
    establish(pair.a.fw, 2)
    c = HostIdentity.init(tmp_path / "c-cfg", "hostc")
    trust_a = TrustStore.load(pair.a.config)
    trust_a.add("hostc", "127.0.0.1:1", c.public_b64, vms="10.1.1.0/24")
    trust_a.save()
    trust_c = TrustStore.load(tmp_path / "c-cfg")
    ida = HostIdentity.load(pair.a.config)
    trust_c.add("hosta", f"127.0.0.1:{agent_a.port}", ida.public_b64)
    trust_c.save()
    bg = start_migration(pair)
    try:
        mid = pair.agent.wait_event("cutover-armed", vm=VM)["migration_id"]
        with pytest.raises(MigrationRefused, match="goes to hostb, not hostc"):
            send_cutover(c, trust_c, trust_c.get("hosta"), mid, VmAddrs.parse([VM]),
                         {"text": "hostc says so"})
        with pytest.raises(MigrationRefused, match="no running migration"):
            send_cutover(c, trust_c, trust_c.get("hosta"), "ab" * 16, VmAddrs.parse([VM]),
                         {"text": "a made-up migration"})
        assert bg.poll() is None
    finally:
        bg.kill()
        bg.wait()


HOOK = Path(__file__).resolve().parent.parent / "contrib" / "libvirt" / "qemu"
DOMAIN_XML = f"""<domain type='kvm'><name>vm1</name>
  <metadata><samixdp:vm xmlns:samixdp="urn:samixdp:vm:1">
    <samixdp:address>{VM}</samixdp:address></samixdp:vm></metadata>
  <devices><interface type='bridge'><mac address='52:54:00:00:00:01'/></interface></devices>
</domain>"""


def hook(host, *args: str, xml: str = DOMAIN_XML) -> subprocess.CompletedProcess[str]:
    """libvirt's call of the qemu hook on `host` (its samixdp through the environment)."""
    env = {**os.environ, "SAMIXDP": str(Path(sys.executable).parent / "samixdp"),
           "SAMIXDP_BPFFS": str(host.fw.path), "SAMIXDP_CONFIG_DIR": str(host.config),
           "SAMIXDP_STATE_DIR": str(host.state)}
    return subprocess.run([sys.executable, str(HOOK), "vm1", *args], input=xml, text=True,
                          capture_output=True, env=env, timeout=60)


def test_libvirt_hook_pulls_the_state_and_releases_it(hosts):
    """`migrate begin` on B pulls the VM's state from A (A's agent starts the
    migration); the VM's arrival at B ends it; `release end` on A deletes A's copy."""
    pair, agent_a, (vm_side, _) = hosts
    establish(pair.a.fw, 4)
    assert hook(pair.b, "prepare", "begin", "-").returncode == 0  # not ours: nothing
    res = hook(pair.b, "migrate", "begin", "-")
    assert res.returncode == 0 and "hosta: started" in res.stderr, res.stderr
    agent_a.wait_event("pulled", peer="hostb", vm=VM)
    pair.agent.wait_event("cutover-armed", vm=VM)
    assert count_vm(pair.b.fw) == 4
    run_program(pair.b.fw, P.garp(VM), ifindex=vm_side)
    record = pair.a.state / "migrations" / f"{VM}.json"
    wait_for("A's migration to complete",
             lambda: json.loads(record.read_text())["status"] == "completed", timeout=30)
    assert count_vm(pair.a.fw) == 4  # a pulled migration keeps the source until release
    assert hook(pair.a, "release", "end", "-").returncode == 0
    assert count_vm(pair.a.fw) == 0 and count_vm(pair.b.fw) == 4
    # a domain without our metadata, or a peer asked about a VM it does not hold
    assert hook(pair.b, "migrate", "begin", "-", xml="<domain/>").returncode == 0
    again = pair.b.cli("pull", "--vm", VM)
    assert again.returncode != 0 and "holds no state of 10.1.1.1" in again.stdout + again.stderr
