"""Cutover detection in the datapath (BPF_PROG_TEST_RUN, both program kinds).

While a VM's migration to this host is watched, its first frame on an interface
that leads to it (a gratuitous ARP, an unsolicited neighbour advertisement, any
packet from its address) marks the arrival and opens its pickup window. A frame
that claims the VM's address from the uplink marks nothing (DESIGN section 6:
a spoofer must not trigger a cutover), and nothing changes for a VM not watched.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import PROGRAM_KINDS, fresh_firewall, unavailable
from test_datapath import CLIENT, NET, NS, TICK_NS, VM, VM2, run
from test_ipv6 import CLIENT6, NET6, VM6

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import cutover
from sami_xdp.migrate.vmset import VmAddrs
from sami_xdp.policy import protect
from sami_xdp.policy.roles import set_role
from testbed import packets as P

pytestmark = pytest.mark.needs_root

PICKUP_S = 7.0
ALL_NODES = "ff02::1"
NA = 136


@pytest.fixture(params=PROGRAM_KINDS)
def fw(request: pytest.FixtureRequest, firewall: Firewall) -> Firewall:
    fw = fresh_firewall(firewall, request.param)
    protect.add_protected(fw, NET)
    protect.add_protected(fw, NET6)
    return fw


def veth() -> Iterator[int]:
    name = f"sxco{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name",
                           name + "p"], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable(f"cannot add a veth pair: {made.stderr.strip()}")
    try:
        yield int(open(f"/sys/class/net/{name}/ifindex").read())
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


@pytest.fixture
def vm_link(fw: Firewall) -> Iterator[int]:
    """The VM-facing interface the VM arrives on."""
    for ifindex in veth():
        set_role(fw, ifindex, "vm")
        yield ifindex


@pytest.fixture
def uplink(fw: Firewall) -> Iterator[int]:
    for ifindex in veth():
        set_role(fw, ifindex, "uplink")
        yield ifindex


def pickup_until(fw: Firewall, ip: str) -> int | None:
    v = fw.maps["pickup"].lookup(cutover.key_of(fw, ip))
    return None if v is None else int(v)


def mid_flow(src: str, dst: str) -> bytes:
    """A TCP segment of a connection this host never saw (ACK, no SYN)."""
    return P.tcp(src, 443, dst, 40000, P.ACK) if ":" not in src else P.tcp6(
        src, 443, dst, 40000, P.ACK)


def test_garp_on_the_vm_side_marks_the_arrival_and_opens_the_pickup_window(fw, vm_link):
    vms = VmAddrs.parse([VM, VM6])
    cutover.arm(fw, vms, PICKUP_S)
    assert run(fw, mid_flow(CLIENT, VM), ifindex=vm_link) == "drop-no-session"
    t0 = time.monotonic_ns()
    assert run(fw, P.garp(VM), ifindex=vm_link) == "pass-non-ip"  # ARP's verdict is as ever
    seen = cutover.arrivals(fw, vms)
    assert [(a.vm, a.how, a.ifindex) for a in seen] == [(VM, "arp", vm_link)]
    assert t0 - TICK_NS <= seen[0].seen_ns <= time.monotonic_ns()
    until = pickup_until(fw, VM)
    assert until is not None and abs(until - (seen[0].seen_ns + int(PICKUP_S * NS))) < 1000
    # the window is open: a session the source made after its last delta is picked up
    assert run(fw, mid_flow(CLIENT, VM)) == "pass-pickup"
    # the VM's other address was not announced: its window stays shut
    assert pickup_until(fw, VM6) is None


def test_a_spoofed_announcement_from_the_uplink_marks_nothing(fw, uplink):
    vms = VmAddrs.parse([VM, VM6])
    cutover.arm(fw, vms, PICKUP_S)
    assert run(fw, P.garp(VM), ifindex=uplink) == "pass-non-ip"
    assert run(fw, P.ndp(VM6, ALL_NODES, NA, target=VM6), ifindex=uplink) == "drop-spoofed"
    assert run(fw, P.udp(VM, 5353, CLIENT, 53), ifindex=uplink) == "drop-spoofed"
    assert run(fw, P.tcp6(VM6, 40000, CLIENT6, 80, P.SYN), ifindex=uplink) == "drop-spoofed"
    assert cutover.arrivals(fw, vms) == []
    assert pickup_until(fw, VM) is None and pickup_until(fw, VM6) is None
    assert run(fw, mid_flow(CLIENT, VM)) == "drop-no-session"


def test_a_vm_not_watched_changes_nothing(fw, vm_link):
    cutover.arm(fw, VmAddrs.parse([VM2]), PICKUP_S)
    assert run(fw, P.garp(VM), ifindex=vm_link) == "pass-non-ip"
    assert run(fw, P.udp(VM, 5353, CLIENT, 53), ifindex=vm_link) == "pass-outbound"
    assert cutover.arrivals(fw, VmAddrs.parse([VM, VM2])) == []
    assert len(fw.maps["pickup"].keys()) == 0
    assert len(fw.maps["arrivals"].keys()) == 1


def test_unsolicited_neighbour_advertisement_marks_an_ipv6_arrival(fw, vm_link):
    vms = VmAddrs.parse([VM, VM6])
    cutover.arm(fw, vms, PICKUP_S)
    assert run(fw, P.ndp(VM6, ALL_NODES, NA, target=VM6), ifindex=vm_link) == "pass-ndp"
    assert [(a.vm, a.how) for a in cutover.arrivals(fw, vms)] == [(VM6, "ndp")]
    assert run(fw, mid_flow(CLIENT6, VM6)) == "pass-pickup"


@pytest.mark.parametrize("frame", [
    pytest.param(lambda: P.udp(VM, 5353, CLIENT, 53), id="udp"),
    pytest.param(lambda: P.tcp(VM, 40000, CLIENT, 80, P.SYN), id="tcp-syn"),
    pytest.param(lambda: P.icmp_echo(VM, CLIENT, 9), id="echo"),
])
def test_any_packet_from_the_vm_marks_the_arrival(fw, vm_link, frame):
    cutover.arm(fw, VmAddrs.parse([VM]), PICKUP_S)
    assert run(fw, frame(), ifindex=vm_link) == "pass-outbound"
    assert [a.how for a in cutover.arrivals(fw, VmAddrs.parse([VM]))] == ["ip"]


def test_an_established_session_on_its_new_interface_marks_the_arrival(fw, vm_link):
    """The VM's first packets after a move may all be segments of sessions the full copy
    brought here: the fast path notices the interface change (the only time it looks)."""
    flow = P.TcpFlow(VM, 40000, CLIENT, 80)
    for frame in (flow.syn(), flow.synack(), flow.ack("a")):
        assert run(fw, frame) in ("pass-outbound", "pass-session")  # on lo, before the move
    cutover.arm(fw, VmAddrs.parse([VM]), PICKUP_S)
    assert run(fw, flow.data("a", b"moved"), ifindex=vm_link) == "pass-session"
    seen = cutover.arrivals(fw, VmAddrs.parse([VM]))
    assert [(a.how, a.ifindex) for a in seen] == [("ip", vm_link)]


def test_only_the_first_sighting_is_kept(fw, vm_link, uplink):
    vms = VmAddrs.parse([VM])
    cutover.arm(fw, vms, PICKUP_S)
    assert run(fw, P.garp(VM), ifindex=vm_link) == "pass-non-ip"
    first = cutover.arrivals(fw, vms)
    time.sleep(0.03)
    set_role(fw, uplink, "vm")  # a second VM-side link: the VM's frames appear there too
    assert run(fw, P.udp(VM, 5353, CLIENT, 53), ifindex=uplink) == "pass-outbound"
    assert cutover.arrivals(fw, vms) == first


def test_disarm_forgets_and_rearm_starts_over(fw, vm_link):
    vms = VmAddrs.parse([VM])
    cutover.arm(fw, vms, 0)  # no pickup window asked for: none is opened
    assert run(fw, P.garp(VM), ifindex=vm_link) == "pass-non-ip"
    assert pickup_until(fw, VM) is None
    assert [a.how for a in cutover.disarm(fw, vms)] == ["arp"]
    assert len(fw.maps["arrivals"].keys()) == 0
    cutover.arm(fw, vms, PICKUP_S)
    assert cutover.arrivals(fw, vms) == []
    assert cutover.clear(fw) == 1
    assert np.size(fw.maps["arrivals"].keys()) == 0
