"""The datapath core (issue 2) through BPF_PROG_TEST_RUN on the real compiled program.

Every frame goes through `run()`, which returns the verdict reason by diffing the
per-CPU `verdicts` counters around one PROG_TEST_RUN, and checks that exactly one
reason moved, by one packet and the frame's length in bytes, and that the XDP
action agrees with the reason (pass-* -> XDP_PASS, drop-* -> XDP_DROP). Map
contents are read back through the pinned maps (sami_xdp.policy.sessions / fw.maps).

Regression tests for datapath bugs found by this suite (fixed in 37bca57) say
so in their docstrings.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import PROGRAM_KINDS, fresh_firewall, program_kind, run_program, unavailable

from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import addrs_to_ips, ip_to_addr, ipv4_addr_array, port_be
from sami_xdp.loader.pinned import Firewall
from sami_xdp.policy import protect, sessions, stats
from sami_xdp.policy.roles import set_role
from testbed import packets as P

pytestmark = pytest.mark.needs_root

NET = "10.1.1.0/24"
VM, VM2 = "10.1.1.1", "10.1.1.2"
CLIENT = "192.0.2.10"  # numerically above the VM: the VM is the key's lo side
TICK_NS = 20_000_000  # the datapath's coarse clock lags CLOCK_MONOTONIC by < one tick
CLIENT_LOW = "9.9.9.9"  # numerically below the VM: the VM is the key's hi side
ROUTER = "198.51.100.254"
OUT_A, OUT_B = "198.51.100.1", "203.0.113.7"  # two unprotected hosts (transit)

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
ST = {name: value for value, name in load_layout().names("ST_").items()}
SIDE_LO, SIDE_HI = 0, 1
LO_IFINDEX = socket.if_nametoindex("lo")
NS = 1_000_000_000

# ---- harness ----------------------------------------------------------------


def run(fw: Firewall, frame: bytes, ifindex: int = 0) -> str:
    """One PROG_TEST_RUN; returns the verdict reason name (e.g. "pass-session")."""
    before = stats.read_verdicts(fw)
    verdict, res = run_program(fw, frame, ifindex)
    after = stats.read_verdicts(fw)
    moved = {
        name: (after[name]["packets"] - before[name]["packets"],
               after[name]["bytes"] - before[name]["bytes"])
        for name in after
        if after[name] != before[name]
    }
    assert len(moved) == 1, f"expected one verdict counter to move, got {moved}"
    ((reason, (pkts, nbytes)),) = moved.items()
    assert (pkts, nbytes) == (1, len(frame)), (reason, pkts, nbytes)
    action = verdict.lower()
    kind = program_kind(fw)
    assert reason.startswith(action + "-"), f"{kind} action {action} but reason {reason}"
    assert res.data_out == frame, "the firewall must never rewrite a frame"
    return reason


def _host(ip: str) -> int:
    """An IPv4 address as a host-order integer."""
    return int(ipaddress.IPv4Address(ip))


def _mapped(ip: str) -> int:
    """An address as the 128-bit number the datapath orders keys by: IPv6 as it is,
    IPv4 as ::ffff:a.b.c.d (so IPv4 addresses keep their order among themselves)."""
    addr = ipaddress.ip_address(ip)
    return int(addr) if addr.version == 6 else (0xFFFF << 32) | int(addr)


def key_of(fw: Firewall, proto: int, src: str, sport: int, dst: str, dport: int) -> np.ndarray:
    """The normalised session key, computed independently of the datapath:
    the numerically lower (address, port) end first; ICMP/ICMPv6 echo keeps the
    identifier in port_lo and 0 in port_hi."""
    icmp = proto in (ICMP, ICMPV6)
    if icmp:
        sport, dport = max(sport, dport), 0
    a, b = (_mapped(src), sport, src), (_mapped(dst), dport, dst)
    (_, lo_port, lo_ip), (_, hi_port, hi_ip) = sorted([a, b])
    if icmp:
        lo_port, hi_port = sport, 0
    key = np.zeros(1, dtype=fw.maps["sessions"].key_dtype)
    key["addr_lo"] = ip_to_addr(lo_ip)
    key["addr_hi"] = ip_to_addr(hi_ip)
    key["port_lo"] = port_be(lo_port)
    key["port_hi"] = port_be(hi_port)
    key["proto"] = proto
    return key


def side_of(src: str, sport: int, dst: str, dport: int) -> int:
    return SIDE_LO if (_mapped(src), sport) <= (_mapped(dst), dport) else SIDE_HI


def find(fw: Firewall, proto: int, src: str, sport: int, dst: str, dport: int):
    """(map name, value) of a flow's session, or (None, None). Never in both maps."""
    key = key_of(fw, proto, src, sport, dst, dport)
    hits = [(name, fw.maps[name].lookup(key)) for name in ("sessions", "unassured")]
    hits = [(n, v) for n, v in hits if v is not None]
    assert len(hits) <= 1, f"flow in both session maps: {hits}"
    return hits[0] if hits else (None, None)


def state_of(fw: Firewall, proto: int, src: str, sport: int, dst: str, dport: int) -> str | None:
    _, v = find(fw, proto, src, sport, dst, dport)
    if v is None:
        return None
    return {n: s for s, n in ST.items()}[int(v["state"])]


def n_sessions(fw: Firewall) -> int:
    return len(sessions.read_sessions(fw))


def age(fw: Firewall, map_name: str, key: np.ndarray, seconds: float) -> None:
    """Rewrites an entry's last-heard time `seconds` into the past (no sleeping)."""
    m = fw.maps[map_name]
    v = m.lookup(key)
    assert v is not None, f"no entry to age in {map_name}"
    v = np.array([v], dtype=m.value_dtype)
    v["last_seen_ns"] = time.monotonic_ns() - int(seconds * NS)
    m.update(key, v)


def set_timeout(fw: Firewall, state: str, seconds: int) -> None:
    fw.set_config(ST[state], seconds)



@pytest.fixture(params=PROGRAM_KINDS)
def fw(request: pytest.FixtureRequest, firewall: Firewall) -> Firewall:
    """Every test here runs against the XDP program and against the TC one."""
    return fresh_firewall(firewall, request.param)

@pytest.fixture
def pfw(fw: Firewall) -> Firewall:
    """The emptied firewall protecting 10.1.1.0/24."""
    protect.add_protected(fw, NET)
    return fw


def handshake(fw: Firewall, vm: str = VM, vport: int = 40000, peer: str = CLIENT,
              pport: int = 80, vlans: tuple[int, ...] = ()) -> P.TcpFlow:
    """VM-initiated TCP handshake with consistent sequence numbers; asserts each
    step's verdict and returns the flow ("a" = the VM) to continue it."""
    flow = P.TcpFlow(vm, vport, peer, pport, vlans=vlans)
    assert run(fw, flow.syn()) == "pass-outbound"
    assert run(fw, flow.synack()) == "pass-session"
    assert run(fw, flow.ack("a")) == "pass-session"
    return flow


@pytest.fixture
def other_ifindex() -> Iterator[int]:
    """A real, non-loopback device of this netns for ingress_ifindex (PROG_TEST_RUN
    looks it up; without a ctx the kernel reports loopback). Uses an existing one, or
    makes a veth pair for the test."""
    for idx, _name in socket.if_nameindex():
        if idx != LO_IFINDEX:
            yield idx
            return
    name = f"sxdp{os.getpid() % 100000}"
    made = subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name",
                           name + "p"], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable(f"no non-loopback interface and cannot add one: {made.stderr.strip()}")
    try:
        yield socket.if_nametoindex(name)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


# ---- TCP handshake, counters, times, ifindex ----------------------------------


@pytest.mark.parametrize("peer", [CLIENT, CLIENT_LOW], ids=["vm-is-lo", "vm-is-hi"])
def test_outbound_handshake_promotes_halfopen_to_established(pfw, peer):
    fw = pfw
    t0 = time.monotonic_ns()
    syn = P.tcp(VM, 40000, peer, 80, P.SYN)
    assert run(fw, syn, ifindex=LO_IFINDEX) == "pass-outbound"
    t_syn = time.monotonic_ns()
    where, v = find(fw, TCP, VM, 40000, peer, 80)
    assert where == "unassured"
    assert v["state"] == ST["SYN_SENT"]
    assert v["initiator"] == side_of(VM, 40000, peer, 80)
    assert list(v["packets"]) == [1, 0] and list(v["bytes"]) == [40, 0]
    # the datapath reads the coarse monotonic clock: up to a tick behind ours
    assert t0 - TICK_NS <= v["created_ns"] <= t_syn and v["last_seen_ns"] == v["created_ns"]
    created = int(v["created_ns"])
    assert fw.maps["sessions"].lookup(key_of(fw, TCP, VM, 40000, peer, 80)) is None

    assert run(fw, P.tcp(peer, 80, VM, 40000, P.SYN | P.ACK), ifindex=LO_IFINDEX) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, peer, 80)
    assert where == "unassured" and v["state"] == ST["SYN_RECV"]
    assert list(v["packets"]) == [1, 1]

    assert run(fw, P.tcp(VM, 40000, peer, 80, P.ACK), ifindex=LO_IFINDEX) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, peer, 80)
    assert where == "sessions", "the completed handshake must leave the half-open LRU"
    assert v["state"] == ST["ESTABLISHED"]

    # data both ways: per-direction counters relative to the initiator (the VM)
    assert run(fw, P.tcp(VM, 40000, peer, 80, P.PSH | P.ACK, b"x" * 100),
               ifindex=LO_IFINDEX) == "pass-session"
    assert run(fw, P.tcp(peer, 80, VM, 40000, P.PSH | P.ACK, b"y" * 1000),
               ifindex=LO_IFINDEX) == "pass-session"
    assert run(fw, P.tcp(peer, 80, VM, 40000, P.ACK), ifindex=LO_IFINDEX) == "pass-session"
    t1 = time.monotonic_ns()
    where, v = find(fw, TCP, VM, 40000, peer, 80)
    assert list(v["packets"]) == [3, 3]
    assert list(v["bytes"]) == [40 + 40 + 140, 40 + 1040 + 40]  # IPv4 total lengths
    assert int(v["created_ns"]) == created, "created time is the first packet's"
    assert created <= v["last_seen_ns"] <= t1
    assert list(v["ifindex"]) == [LO_IFINDEX, LO_IFINDEX]
    vm_flag = fw.const("SESS_F_VM_LO") if peer == CLIENT else fw.const("SESS_F_VM_HI")
    assert v["flags"] == vm_flag, "only the VM's end is marked: not inbound, migrated, picked up"

    (rec,) = sessions.session_records(fw, sessions.read_sessions(fw), now_ns=t1)
    assert (rec["proto"], rec["src"], rec["sport"], rec["dst"], rec["dport"], rec["state"]) == (
        "tcp", VM, 40000, peer, 80, "ESTABLISHED")
    assert (rec["packets"], rec["packets_orig"], rec["packets_reply"]) == (6, 3, 3)
    assert rec["table"] == "sessions" and 0 <= rec["idle_s"] <= rec["age_s"] < 60


def test_ingress_ifindex_recorded_per_direction(pfw, other_ifindex):
    """Each direction records the interface its latest packet came in on (DESIGN 1:
    one set of maps shared by every interface)."""
    fw = pfw
    set_role(fw, other_ifindex, "vm")  # the VM's side, for anti-spoofing
    assert run(fw, P.tcp(VM, 40000, CLIENT, 80, P.SYN), ifindex=other_ifindex) == "pass-outbound"
    _, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert list(v["ifindex"]) == [other_ifindex, 0]
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.SYN | P.ACK),
               ifindex=LO_IFINDEX) == "pass-session"
    _, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert list(v["ifindex"]) == [other_ifindex, LO_IFINDEX]
    assert run(fw, P.udp(VM, 5000, CLIENT, 53), ifindex=other_ifindex) == "pass-outbound"
    _, v = find(fw, UDP, VM, 5000, CLIENT, 53)
    assert list(v["ifindex"]) == [other_ifindex, 0]


def test_syn_retransmission_stays_half_open(pfw):
    fw = pfw
    syn = P.tcp(VM, 40000, CLIENT, 80, P.SYN)
    assert run(fw, syn) == "pass-outbound"
    assert run(fw, syn) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "unassured" and v["state"] == ST["SYN_SENT"]
    assert list(v["packets"]) == [2, 0]


def test_packets_invalid_in_syn_sent_are_dropped(pfw):
    """The initiator may not ACK what it has not been answered (conntrack: invalid)."""
    fw = pfw
    flow = P.TcpFlow(VM, 40000, CLIENT, 80)
    assert run(fw, flow.syn()) == "pass-outbound"
    assert run(fw, flow.ack("a", ack=900_001)) == "drop-invalid"  # ACKs the unknown
    assert run(fw, flow.ack("a", ack=0, advance=False)) == "drop-invalid"  # the state says so
    assert run(fw, flow.data("a", b"early", ack=900_001)) == "drop-invalid"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "unassured" and v["state"] == ST["SYN_SENT"]
    assert list(v["packets"]) == [1, 0], "a dropped packet is not counted in the session"


def test_responder_ack_in_syn_sent_is_ignored(pfw):
    """A bare ACK from the responder before its SYN/ACK (a half-open connection on
    its side) passes but changes nothing, as conntrack ignores it."""
    fw = pfw
    flow = P.TcpFlow(VM, 40000, CLIENT, 80)
    assert run(fw, flow.syn()) == "pass-outbound"
    before = find(fw, TCP, VM, 40000, CLIENT, 80)[1]
    assert run(fw, flow.ack("b", ack=1001)) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "unassured" and v["state"] == ST["SYN_SENT"]
    assert v["last_seen_ns"] == before["last_seen_ns"], "an ignored packet refreshes nothing"


@pytest.mark.parametrize("peer", [CLIENT, CLIENT_LOW], ids=["vm-is-lo", "vm-is-hi"])
def test_only_the_initiators_ack_completes_the_handshake(pfw, peer):
    """In SYN_RECV the responder's own ACK (it sent the SYN/ACK) must not establish the
    session: only the initiator's ACK answers the SYN/ACK (as in conntrack)."""
    fw = pfw
    flow = P.TcpFlow(VM, 40000, peer, 80)
    assert run(fw, flow.syn()) == "pass-outbound"
    assert run(fw, flow.synack()) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, peer, 80) == "SYN_RECV"
    assert run(fw, flow.ack("b")) == "pass-session"  # in window: passes, changes nothing
    where, v = find(fw, TCP, VM, 40000, peer, 80)
    assert where == "unassured" and v["state"] == ST["SYN_RECV"]
    assert run(fw, flow.data("b", b"data")) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, peer, 80) == "SYN_RECV"
    # the initiator's ACK does complete it
    assert run(fw, flow.ack("a")) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, peer, 80)
    assert where == "sessions" and v["state"] == ST["ESTABLISHED"]


# ---- unsolicited traffic, strict TCP -------------------------------------------


@pytest.mark.parametrize(
    "frame, reason",
    [
        (P.tcp(CLIENT, 5555, VM, 22, P.SYN), "drop-acl-default"),
        (P.tcp(CLIENT, 5555, VM, 22, P.ACK), "drop-no-session"),
        (P.tcp(CLIENT, 5555, VM, 22, P.SYN | P.ACK), "drop-no-session"),
        (P.tcp(CLIENT, 5555, VM, 22, P.PSH | P.ACK, b"data"), "drop-no-session"),
        (P.tcp(CLIENT, 5555, VM, 22, P.FIN | P.ACK), "drop-no-session"),
        (P.tcp(CLIENT, 5555, VM, 22, P.RST), "drop-no-session"),
        (P.udp(CLIENT, 5555, VM, 53), "drop-acl-default"),
        (P.icmp_echo(CLIENT, VM, ident=7), "drop-acl-default"),
        (P.icmp_echo(CLIENT, VM, ident=7, reply=True), "drop-no-session"),
        (P.eth(P.ipv4(CLIENT, VM, 47, b"\0" * 8)), "drop-acl-default"),  # GRE
    ],
    ids=["syn", "ack", "synack", "data", "fin", "rst", "udp", "echo", "echo-reply", "gre"],
)
def test_unsolicited_inbound_dropped_without_state(pfw, frame, reason):
    assert run(pfw, frame) == reason
    assert n_sessions(pfw) == 0, "unsolicited inbound traffic must create no session"


@pytest.mark.parametrize(
    "flags", [P.ACK, P.SYN | P.ACK, P.PSH | P.ACK, P.FIN | P.ACK, P.RST, P.RST | P.ACK, 0],
    ids=["ack", "synack", "data", "fin", "rst", "rstack", "null"],
)
def test_strict_tcp_outbound_non_syn_without_session_dropped(pfw, flags):
    want = "drop-invalid" if flags == 0 else "drop-no-session"  # no flags: never valid
    assert run(pfw, P.tcp(VM, 40000, CLIENT, 80, flags, b"z" if flags & P.PSH else b"")) \
        == want
    assert n_sessions(pfw) == 0


def test_unsolicited_inbound_to_unknown_port_of_live_session_peer_dropped(pfw):
    """A session pins the exact 5-tuple: other ports of the same peers stay closed."""
    fw = pfw
    handshake(fw)
    assert run(fw, P.tcp(CLIENT, 81, VM, 40000, P.ACK)) == "drop-no-session"
    assert run(fw, P.tcp(CLIENT, 80, VM, 40001, P.ACK)) == "drop-no-session"
    assert run(fw, P.tcp(CLIENT, 80, VM2, 40000, P.ACK)) == "drop-no-session"
    assert run(fw, P.udp(CLIENT, 80, VM, 40000)) == "drop-acl-default"  # other protocol


# ---- UDP and ICMP echo ----------------------------------------------------------


def test_udp_reply_passes_and_marks_replied(pfw):
    fw = pfw
    assert run(fw, P.udp(VM, 5353, CLIENT, 53, b"q" * 30)) == "pass-outbound"
    where, v = find(fw, UDP, VM, 5353, CLIENT, 53)
    assert where == "unassured" and v["state"] == ST["UDP_NEW"]
    assert list(v["packets"]) == [1, 0] and list(v["bytes"]) == [20 + 8 + 30, 0]
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-session"
    assert state_of(fw, UDP, VM, 5353, CLIENT, 53) == "UDP_NEW"
    assert run(fw, P.udp(CLIENT, 53, VM, 5353, b"a" * 100)) == "pass-session"
    _, v = find(fw, UDP, VM, 5353, CLIENT, 53)
    assert v["state"] == ST["UDP_REPLIED"]
    assert list(v["packets"]) == [2, 1] and list(v["bytes"]) == [58 + 29, 128]
    # a reply from another port or host is not part of the flow
    assert run(fw, P.udp(CLIENT, 54, VM, 5353)) == "drop-acl-default"
    assert run(fw, P.udp(ROUTER, 53, VM, 5353)) == "drop-acl-default"
    assert find(fw, UDP, VM, 5353, CLIENT, 53)[0] == "unassured", "one answer assures nothing"


def test_udp_flow_still_talking_after_two_seconds_is_assured(pfw):
    """Like conntrack's UDP stream: answered, and still active 2 s after its first
    packet, a flow moves to the never-evicted table with the long timeout."""
    fw = pfw
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-outbound"
    assert run(fw, P.udp(CLIENT, 53, VM, 5353)) == "pass-session"
    key = key_of(fw, UDP, VM, 5353, CLIENT, 53)
    m = fw.maps["unassured"]
    v = np.array([m.lookup(key)], dtype=m.value_dtype)
    v["created_ns"] = time.monotonic_ns() - int(1.9 * NS)
    m.update(key, v)
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-session"
    assert find(fw, UDP, VM, 5353, CLIENT, 53)[0] == "unassured", "1.9 s: not yet"
    v = np.array([m.lookup(key)], dtype=m.value_dtype)
    v["created_ns"] = time.monotonic_ns() - int(2.1 * NS)
    m.update(key, v)
    assert run(fw, P.udp(CLIENT, 53, VM, 5353)) == "pass-session"
    where, v = find(fw, UDP, VM, 5353, CLIENT, 53)
    assert where == "sessions" and v["state"] == ST["UDP_ASSURED"]
    assert list(v["packets"]) == [2, 2]


def test_unanswered_udp_is_never_assured(pfw):
    fw = pfw
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-outbound"
    key = key_of(fw, UDP, VM, 5353, CLIENT, 53)
    m = fw.maps["unassured"]
    v = np.array([m.lookup(key)], dtype=m.value_dtype)
    v["created_ns"] = time.monotonic_ns() - 10 * NS
    m.update(key, v)
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-session"
    where, v = find(fw, UDP, VM, 5353, CLIENT, 53)
    assert where == "unassured" and v["state"] == ST["UDP_NEW"]


def test_icmp_echo_reply_matches_request(pfw):
    fw = pfw
    assert run(fw, P.icmp_echo(VM, CLIENT, ident=0x1234)) == "pass-outbound"
    where, v = find(fw, ICMP, VM, 0x1234, CLIENT, 0)
    assert where == "unassured" and v["state"] == ST["ICMP"]
    assert run(fw, P.icmp_echo(CLIENT, VM, ident=0x1234, reply=True)) == "pass-session"
    _, v = find(fw, ICMP, VM, 0x1234, CLIENT, 0)
    assert list(v["packets"]) == [1, 1]
    # another identifier, or the same identifier from another host, has no session
    assert run(fw, P.icmp_echo(CLIENT, VM, ident=0x1235, reply=True)) == "drop-no-session"
    assert run(fw, P.icmp_echo(ROUTER, VM, ident=0x1234, reply=True)) == "drop-no-session"
    (rec,) = sessions.session_records(fw, sessions.read_sessions(fw))
    assert (rec["proto"], rec["src"], rec["dst"], rec["sport"]) == ("icmp", VM, CLIENT, 0x1234)


def test_outbound_icmp_other_than_echo_passes_without_session(pfw):
    fw = pfw
    assert run(fw, P.eth(P.ipv4(VM, CLIENT, 1, P.icmp_msg(13)))) == "pass-outbound"  # timestamp
    # an echo reply answers a request, or nothing (conntrack: invalid)
    assert run(fw, P.icmp_echo(VM, CLIENT, ident=9, reply=True)) == "drop-no-session"
    assert n_sessions(fw) == 0


def test_udp_from_two_vms_to_same_service_are_distinct_sessions(pfw):
    fw = pfw
    assert run(fw, P.udp(VM, 5000, CLIENT, 53)) == "pass-outbound"
    assert run(fw, P.udp(VM2, 5000, CLIENT, 53)) == "pass-outbound"
    assert run(fw, P.udp(CLIENT, 53, VM2, 5000)) == "pass-session"
    assert state_of(fw, UDP, VM, 5000, CLIENT, 53) == "UDP_NEW"
    assert state_of(fw, UDP, VM2, 5000, CLIENT, 53) == "UDP_REPLIED"


# ---- FIN / RST transitions and port reuse ---------------------------------------


def _close_init(v: np.ndarray, d: int) -> bool:
    return bool(v["tcp"][d]["flags"] & load_layout().const("TCPD_F_CLOSE_INIT"))


@pytest.mark.parametrize("closer", ["a", "b"], ids=["vm", "peer"])
@pytest.mark.parametrize("peer", [CLIENT, CLIENT_LOW], ids=["vm-is-lo", "vm-is-hi"])
def test_orderly_close_fin_wait_close_wait_last_ack_time_wait(pfw, closer, peer):
    """conntrack's close: FIN -> FIN_WAIT, its ACK -> CLOSE_WAIT (the other end may
    still talk: half-close), the other FIN -> LAST_ACK, the last ACK -> TIME_WAIT."""
    fw = pfw
    flow = handshake(fw, peer=peer)
    other = "b" if closer == "a" else "a"
    d = 0 if closer == "a" else 1  # direction index of the closer (the VM opened)
    assert run(fw, flow.fin(closer)) == "pass-session"
    _, v = find(fw, TCP, VM, 40000, peer, 80)
    assert v["state"] == ST["FIN_WAIT"] and _close_init(v, d) and not _close_init(v, 1 - d)
    assert run(fw, flow.ack(other)) == "pass-session"  # the other side acks the FIN
    assert state_of(fw, TCP, VM, 40000, peer, 80) == "CLOSE_WAIT"
    assert run(fw, flow.data(other, b"tail")) == "pass-session"  # half-close: it talks on
    assert run(fw, flow.ack(closer)) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, peer, 80) == "CLOSE_WAIT"
    assert run(fw, flow.fin(other)) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, peer, 80) == "LAST_ACK"
    assert run(fw, flow.ack(closer)) == "pass-session"  # last ACK
    where, v = find(fw, TCP, VM, 40000, peer, 80)
    assert where == "sessions" and v["state"] == ST["TIME_WAIT"]


def test_simultaneous_close_goes_to_time_wait(pfw):
    fw = pfw
    flow = handshake(fw)
    assert run(fw, flow.fin("a")) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "FIN_WAIT"
    assert run(fw, flow.fin("b")) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "LAST_ACK"
    assert run(fw, flow.ack("a")) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "TIME_WAIT"


def test_retransmitted_fin_counts_as_both_ways(pfw):
    """As in conntrack, a second FIN in FIN_WAIT (a retransmission, or the other
    one) means FIN seen both ways: LAST_ACK."""
    fw = pfw
    flow = handshake(fw)
    fin = flow.fin("a")
    assert run(fw, fin) == "pass-session"
    assert run(fw, fin) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "LAST_ACK"


@pytest.mark.parametrize("sender", ["a", "b"], ids=["vm", "peer"])
def test_rst_closes_established(pfw, sender):
    fw = pfw
    flow = handshake(fw)
    assert run(fw, flow.rst(sender)) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "sessions" and v["state"] == ST["CLOSED"]


def _to_time_wait(fw: Firewall) -> None:
    flow = handshake(fw)
    for frame in (flow.fin("a"), flow.fin("b"), flow.ack("a")):
        assert run(fw, frame) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "TIME_WAIT"


def _to_closed(fw: Firewall) -> None:
    flow = handshake(fw)
    assert run(fw, flow.rst("b")) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "CLOSED"


@pytest.mark.parametrize("close", [_to_time_wait, _to_closed], ids=["time-wait", "closed"])
def test_port_reuse_after_close_reopens(pfw, close):
    """A SYN on a TIME_WAIT/CLOSED tuple is a new connection: unassured again."""
    fw = pfw
    close(fw)
    _, old = find(fw, TCP, VM, 40000, CLIENT, 80)
    t0 = time.monotonic_ns()
    flow = P.TcpFlow(VM, 40000, CLIENT, 80, isn_a=5_000_000, isn_b=7_000_000)
    assert run(fw, flow.syn()) == "pass-outbound"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "unassured" and v["state"] == ST["SYN_SENT"]
    assert v["created_ns"] >= t0 - TICK_NS, "a reopened session is a new connection"
    assert v["created_ns"] >= old["created_ns"]
    assert v["initiator"] == side_of(VM, 40000, CLIENT, 80)
    assert not _close_init(v, 0) and not _close_init(v, 1)
    assert run(fw, flow.synack()) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "SYN_RECV"
    assert run(fw, flow.ack("a")) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "sessions" and v["state"] == ST["ESTABLISHED"]


def test_reopened_session_starts_with_fresh_counters(pfw):
    """Regression: the reopen used to keep the old connection's packets/bytes."""
    fw = pfw
    _to_time_wait(fw)
    assert run(fw, P.tcp(VM, 40000, CLIENT, 80, P.SYN)) == "pass-outbound"
    _, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert list(v["packets"]) == [1, 0] and list(v["bytes"]) == [40, 0]


@pytest.mark.parametrize("close", [_to_time_wait, _to_closed], ids=["time-wait", "closed"])
def test_inbound_syn_on_closed_tuple_still_needs_the_acl(pfw, close):
    """Regression: an inbound SYN used to reopen a TIME_WAIT/CLOSED tuple as
    pass-session, skipping SYN accounting and the ACL."""
    fw = pfw
    close(fw)
    # the former server now opens a connection *to* the VM on the same 5-tuple;
    # there is no ACL rule for VM:40000, so the default inbound policy applies
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.SYN)) == "drop-acl-default"
    syn_key = np.zeros(1, dtype=fw.maps["syn_counters"].key_dtype)
    syn_key["src"], syn_key["dst"] = ip_to_addr(CLIENT), ip_to_addr(VM)
    counted = fw.maps["syn_counters"].lookup(syn_key)
    assert counted is not None and counted["total"] == 1, "the SYN went through SYN accounting"
    assert find(fw, TCP, VM, 40000, CLIENT, 80) == (None, None)


@pytest.mark.parametrize("who", ["b", "a"], ids=["refused", "aborted"])
def test_rst_during_handshake_stays_out_of_main_table(pfw, who):
    """Regression: a RST on a half-open entry used to promote it (CLOSED) into the
    never-evicted main table, so refused or aborted handshakes consumed its slots."""
    fw = pfw
    flow = P.TcpFlow(VM, 40000, CLIENT, 80)
    assert run(fw, flow.syn()) == "pass-outbound"
    # a refusal answers the SYN (seq 0, ack ISN+1); an abort is the initiator's own
    rst = flow.frame("b", P.RST | P.ACK, seq=0) if who == "b" else flow.frame("a", P.RST)
    assert run(fw, rst) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "unassured" and v["state"] == ST["CLOSED"]
    # the tuple can be reused at once
    assert run(fw, P.tcp(VM, 40000, CLIENT, 80, P.SYN)) == "pass-outbound"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "unassured" and v["state"] == ST["SYN_SENT"]
    assert list(v["packets"]) == [1, 0]


# ---- expiry and GC ----------------------------------------------------------------


def test_expired_udp_session_is_a_miss_and_is_recreated(pfw):
    fw = pfw
    set_timeout(fw, "UDP_REPLIED", 30)
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-outbound"
    assert run(fw, P.udp(CLIENT, 53, VM, 5353)) == "pass-session"
    key = key_of(fw, UDP, VM, 5353, CLIENT, 53)
    age(fw, "unassured", key, 29)
    assert run(fw, P.udp(CLIENT, 53, VM, 5353)) == "pass-session", "29 s idle of 30: live"
    age(fw, "unassured", key, 31)
    assert run(fw, P.udp(CLIENT, 53, VM, 5353)) == "drop-acl-default", "expired = miss"
    t0 = time.monotonic_ns()
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-outbound"
    _, v = find(fw, UDP, VM, 5353, CLIENT, 53)
    assert v["state"] == ST["UDP_NEW"] and v["created_ns"] >= t0 - TICK_NS
    assert list(v["packets"]) == [1, 0], "an expired entry is replaced, not continued"


def test_expired_established_tcp_is_a_miss_both_ways(pfw):
    fw = pfw
    set_timeout(fw, "ESTABLISHED", 20)
    handshake(fw)
    age(fw, "sessions", key_of(fw, TCP, VM, 40000, CLIENT, 80), 21)
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.ACK)) == "drop-no-session"
    assert run(fw, P.tcp(VM, 40000, CLIENT, 80, P.ACK)) == "drop-no-session"
    # a fresh SYN on the tuple starts a new session
    assert run(fw, P.tcp(VM, 40000, CLIENT, 80, P.SYN)) == "pass-outbound"


def test_expired_halfopen_is_a_miss(pfw):
    fw = pfw
    set_timeout(fw, "SYN_SENT", 10)
    assert run(fw, P.tcp(VM, 40000, CLIENT, 80, P.SYN)) == "pass-outbound"
    age(fw, "unassured", key_of(fw, TCP, VM, 40000, CLIENT, 80), 11)
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.SYN | P.ACK)) == "drop-no-session"


def test_expired_icmp_echo_is_a_miss(pfw):
    fw = pfw
    set_timeout(fw, "ICMP", 5)
    assert run(fw, P.icmp_echo(VM, CLIENT, ident=77)) == "pass-outbound"
    age(fw, "unassured", key_of(fw, ICMP, VM, 77, CLIENT, 0), 6)
    assert run(fw, P.icmp_echo(CLIENT, VM, ident=77, reply=True)) == "drop-no-session"


def test_timeout_is_read_per_packet_from_config(pfw):
    """Expiry is evaluated on every lookup: changing a timeout applies to existing entries."""
    fw = pfw
    handshake(fw)
    key = key_of(fw, TCP, VM, 40000, CLIENT, 80)
    age(fw, "sessions", key, 100)
    set_timeout(fw, "ESTABLISHED", 50)
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.ACK)) == "drop-no-session"
    set_timeout(fw, "ESTABLISHED", 200)
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.ACK)) == "pass-session"


def test_short_timeout_expires_on_the_real_clock(pfw):
    fw = pfw
    set_timeout(fw, "UDP_NEW", 1)
    assert run(fw, P.udp(VM, 6000, CLIENT, 53)) == "pass-outbound"
    time.sleep(1.2)
    assert run(fw, P.udp(CLIENT, 53, VM, 6000)) == "drop-acl-default"


def test_session_touched_just_after_our_clock_read_is_live(pfw):
    """Simulates the multi-CPU race: last_seen_ns slightly ahead of this packet's `now`.
    Regression: is_live() computed now - last_seen_ns unsigned, so it wrapped and a live
    session became a miss (sessions.expired_mask clamps the same case to idle 0)."""
    fw = pfw
    handshake(fw)
    key = key_of(fw, TCP, VM, 40000, CLIENT, 80)
    age(fw, "sessions", key, -0.5)  # 0.5 s in the "future", as if written by a later packet
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.ACK)) == "pass-session"


def test_gc_removes_expired_and_keeps_live(pfw):
    fw = pfw
    set_timeout(fw, "UDP_NEW", 30)
    set_timeout(fw, "SYN_SENT", 30)
    set_timeout(fw, "ESTABLISHED", 30)
    handshake(fw)  # live ESTABLISHED
    for port in (1001, 1002, 1003):
        assert run(fw, P.udp(VM, port, CLIENT, 53)) == "pass-outbound"
    assert run(fw, P.tcp(VM, 41000, CLIENT, 443, P.SYN)) == "pass-outbound"  # half-open
    assert run(fw, P.tcp(VM, 41001, CLIENT, 443, P.SYN)) == "pass-outbound"
    age(fw, "unassured", key_of(fw, UDP, VM, 1002, CLIENT, 53), 31)
    age(fw, "unassured", key_of(fw, UDP, VM, 1003, CLIENT, 53), 60)
    age(fw, "unassured", key_of(fw, TCP, VM, 41001, CLIENT, 443), 31)
    age(fw, "unassured", key_of(fw, UDP, VM, 1001, CLIENT, 53), 25)  # idle but live

    assert sessions.gc(fw) == {"sessions": 0, "unassured": 3}
    assert find(fw, UDP, VM, 1002, CLIENT, 53) == (None, None)
    assert find(fw, UDP, VM, 1003, CLIENT, 53) == (None, None)
    assert find(fw, TCP, VM, 41001, CLIENT, 443) == (None, None)
    assert state_of(fw, UDP, VM, 1001, CLIENT, 53) == "UDP_NEW"
    assert state_of(fw, TCP, VM, 41000, CLIENT, 443) == "SYN_SENT"
    assert n_sessions(fw) == 3
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.ACK)) == "pass-session"
    assert run(fw, P.udp(CLIENT, 53, VM, 1001)) == "pass-session"
    assert sessions.gc(fw) == {"sessions": 0, "unassured": 0}


def test_gc_in_bulk(pfw):
    """GC on thousands of entries loaded with batch updates: exactly the expired go."""
    fw = pfw
    set_timeout(fw, "UDP_REPLIED", 30)
    m = fw.maps["sessions"]
    n = 5000
    keys = np.zeros(n, dtype=m.key_dtype)
    vals = np.zeros(n, dtype=m.value_dtype)
    i = np.arange(n)
    keys["addr_lo"] = ip_to_addr(VM)
    keys["addr_hi"] = ipv4_addr_array(_host("172.16.0.0") + i)
    keys["port_lo"] = np.uint16(2000).byteswap()
    keys["port_hi"] = np.uint16(53).byteswap()
    keys["proto"] = UDP
    now = time.monotonic_ns()
    vals["state"] = ST["UDP_REPLIED"]
    vals["created_ns"] = now - 40 * NS
    vals["last_seen_ns"] = np.where(i % 2 == 0, now - 31 * NS, now - 1 * NS)
    assert m.update_many(keys, vals) == n
    assert sessions.gc(fw) == {"sessions": n // 2, "unassured": 0}
    left, _ = m.dump()
    assert len(left) == n // 2
    assert set(addrs_to_ips(left["addr_hi"])) == {
        str(ipaddress.IPv4Address(_host("172.16.0.0") + j)) for j in range(1, n, 2)}


# ---- VLAN, transit, non-IP --------------------------------------------------------


@pytest.mark.parametrize("vlans", [(100,), (100, 200)], ids=["802.1q", "qinq"])
def test_vlan_tagged_frames_parsed_like_untagged(pfw, vlans):
    fw = pfw
    handshake(fw, vlans=vlans)
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.PSH | P.ACK, b"d" * 10, vlans=vlans)) \
        == "pass-session"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "sessions" and v["state"] == ST["ESTABLISHED"]
    assert list(v["bytes"]) == [80, 40 + 50], "counters count IPv4 bytes, not tags"
    # the VLAN is not part of the key: the same flow untagged continues the session
    assert run(fw, P.tcp(VM, 40000, CLIENT, 80, P.ACK)) == "pass-session"
    # unsolicited tagged inbound traffic is dropped like untagged
    assert run(fw, P.tcp(CLIENT, 5555, VM, 22, P.SYN, vlans=vlans)) == "drop-acl-default"
    assert run(fw, P.tcp(CLIENT, 5555, VM, 22, P.ACK, vlans=vlans)) == "drop-no-session"
    assert run(fw, P.udp(CLIENT, 5555, VM, 53, vlans=vlans)) == "drop-acl-default"
    assert run(fw, P.udp(VM, 5555, CLIENT, 53, vlans=vlans)) == "pass-outbound"


@pytest.mark.parametrize("tags", [
    ((P.TPID_8021Q, 10),),
    ((P.TPID_8021AD, 10),),
    ((P.TPID_8021AD, 10), (P.TPID_8021Q, 20)),
    ((P.TPID_8021Q, 10), (P.TPID_8021Q, 20)),  # double 802.1Q (legacy QinQ)
], ids=["q", "ad", "ad-q", "q-q"])
def test_vlan_tpids(pfw, tags):
    frame = P.eth_tags(P.ipv4(VM, CLIENT, 17, P.udp_seg(7000, 53)), tags)
    assert run(pfw, frame) == "pass-outbound"
    assert state_of(pfw, UDP, VM, 7000, CLIENT, 53) == "UDP_NEW"


def test_truncated_vlan_tag_is_malformed(pfw):
    frame = P.ETH_DST + P.ETH_SRC + struct.pack("!H", 0x8100) + b"\x00\x64"  # tag cut short
    assert run(pfw, frame) == "drop-malformed"


def test_ipv4_under_three_vlan_tags_is_not_passed_unfiltered(pfw):
    """Regression: a third tag used to make the frame pass-non-ip, unfiltered."""
    tags = ((P.TPID_8021AD, 10), (P.TPID_8021Q, 20), (P.TPID_8021Q, 30))
    frame = P.eth_tags(P.ipv4(CLIENT, VM, 6, P.tcp_seg(5555, 22, P.ACK)), tags)
    assert run(pfw, frame) == "drop-malformed"
    assert run(pfw, P.eth_tags(P.ipv4(VM, CLIENT, 17, P.udp_seg(1, 2)), tags)) == "drop-malformed"


def test_transit_passes_and_is_counted(pfw):
    fw = pfw
    frames = [
        P.tcp(OUT_A, 1234, OUT_B, 80, P.ACK),  # mid-flow, no SYN ever seen: still transit
        P.tcp(OUT_B, 80, OUT_A, 1234, P.SYN | P.ACK),
        P.udp(OUT_A, 1, OUT_B, 2, vlans=(5,)),
        P.icmp_echo(OUT_A, OUT_B, ident=3),
        P.eth(P.ipv4(OUT_A, OUT_B, 17, P.udp_seg(1, 2), frag=185)),  # non-first fragment
    ]
    for frame in frames:
        assert run(fw, frame) == "pass-transit"
    assert n_sessions(fw) == 0, "transit traffic creates no session"
    v = stats.read_verdicts(fw)["pass-transit"]
    assert v == {"packets": len(frames), "bytes": sum(len(f) for f in frames)}


def test_nothing_protected_everything_is_transit(fw):
    assert run(fw, P.tcp(CLIENT, 5555, VM, 22, P.SYN)) == "pass-transit"
    assert run(fw, P.tcp(VM, 22, CLIENT, 5555, P.ACK)) == "pass-transit"


def test_protected_prefix_decides_direction(pfw):
    fw = pfw
    protect.add_protected(fw, "10.9.0.5/32")
    assert run(fw, P.udp("10.9.0.5", 1, CLIENT, 2)) == "pass-outbound"
    assert run(fw, P.udp(CLIENT, 3, "10.9.0.5", 4)) == "drop-acl-default"
    assert run(fw, P.udp("10.9.0.6", 1, CLIENT, 2)) == "pass-transit"
    assert protect.remove_protected(fw, "10.9.0.5/32")
    assert run(fw, P.udp(CLIENT, 3, "10.9.0.5", 4)) == "pass-transit"


@pytest.mark.parametrize("frame", [
    P.arp(),
    P.eth(b"\x00\x01\x08\x00\x06\x04\x00\x02" + b"\0" * 20, ethertype=0x0806, vlans=(7,)),
    P.eth(b"\0" * 46, ethertype=0x88CC),  # LLDP
    P.eth(b"\0" * 46, ethertype=0x8847),  # MPLS (IPv6 is parsed: tests/test_ipv6.py)
], ids=["arp", "arp-vlan", "lldp", "mpls"])
def test_non_ip_passes(pfw, frame):
    assert run(pfw, frame) == "pass-non-ip"
    assert n_sessions(pfw) == 0


# ---- ICMP errors --------------------------------------------------------------------


def test_icmp_error_quoting_udp_session_passes_related(pfw):
    fw = pfw
    out = P.ipv4(VM, CLIENT, 17, P.udp_seg(5353, 53))
    assert run(fw, P.eth(out)) == "pass-outbound"
    assert run(fw, P.icmp_error(CLIENT, VM, out)) == "pass-related"  # port unreachable
    assert run(fw, P.icmp_error(ROUTER, VM, out, icmp_type=11, code=0)) == "pass-related"
    assert run(fw, P.icmp_error(ROUTER, VM, out, icmp_type=3, code=4)) == "pass-related"  # PMTU
    assert run(fw, P.icmp_error(ROUTER, VM, out, icmp_type=12, code=0)) == "pass-related"


def test_icmp_error_quoting_half_open_tcp_passes_related(pfw):
    fw = pfw
    syn_ip = P.ipv4(VM, CLIENT, 6, P.tcp_seg(40000, 80, P.SYN))
    assert run(fw, P.eth(syn_ip)) == "pass-outbound"
    assert run(fw, P.icmp_error(ROUTER, VM, syn_ip, icmp_type=3, code=1)) == "pass-related"
    handshake(fw, vport=40001)
    est = P.ipv4(VM, CLIENT, 6, P.tcp_seg(40001, 80, P.ACK))
    assert run(fw, P.icmp_error(ROUTER, VM, est, icmp_type=3, code=4)) == "pass-related"


def test_icmp_error_quoting_echo_request_passes_related(pfw):
    fw = pfw
    req = P.icmp_echo_ip(VM, CLIENT, ident=0x4242)
    assert run(fw, P.eth(req)) == "pass-outbound"
    assert run(fw, P.icmp_error(ROUTER, VM, req, icmp_type=11, code=0)) == "pass-related"


def test_icmp_error_must_go_to_the_quoted_packets_sender(pfw):
    fw = pfw
    vm2_out = P.ipv4(VM2, CLIENT, 17, P.udp_seg(5353, 53))
    assert run(fw, P.eth(vm2_out)) == "pass-outbound"  # VM2 has a live session
    assert run(fw, P.icmp_error(ROUTER, VM2, vm2_out)) == "pass-related"  # to its sender
    # the same quote sent to VM, which is no party to that flow (conntrack: outer daddr
    # must equal the quoted saddr, else the error is not RELATED)
    assert run(fw, P.icmp_error(ROUTER, VM, vm2_out)) == "drop-no-session"


def test_unrelated_icmp_errors(pfw):
    fw = pfw
    stray = P.ipv4(VM, CLIENT, 17, P.udp_seg(5353, 53))  # never sent
    assert run(fw, P.icmp_error(CLIENT, VM, stray)) == "drop-no-session"
    assert run(fw, P.icmp_error(ROUTER, VM, P.icmp_echo_ip(VM, CLIENT, 5), 11, 0)) \
        == "drop-no-session"
    # nor may the VM send errors about packets the firewall never let in (conntrack:
    # invalid; the VM never saw an inbound probe this firewall dropped)
    probe = P.ipv4(CLIENT, VM, 17, P.udp_seg(4444, 9))
    assert run(fw, P.icmp_error(VM, CLIENT, probe)) == "drop-no-session"
    assert n_sessions(fw) == 0, "errors never create sessions"


def test_icmp_error_quoting_expired_session_dropped(pfw):
    fw = pfw
    set_timeout(fw, "UDP_NEW", 10)
    out = P.ipv4(VM, CLIENT, 17, P.udp_seg(5353, 53))
    assert run(fw, P.eth(out)) == "pass-outbound"
    age(fw, "unassured", key_of(fw, UDP, VM, 5353, CLIENT, 53), 11)
    assert run(fw, P.icmp_error(CLIENT, VM, out)) == "drop-no-session"


@pytest.mark.parametrize("quote_len", [0, 8, 19, 20, 27])
def test_icmp_error_with_short_quote_is_malformed(pfw, quote_len):
    out = P.ipv4(VM, CLIENT, 17, P.udp_seg(5353, 53))
    frame = P.eth(P.ipv4(ROUTER, VM, 1, P.icmp_msg(3, 3, payload=out[:quote_len])))
    assert run(pfw, frame) == "drop-malformed"


# ---- fragments ------------------------------------------------------------------------


def _frag_key(fw: Firewall, src: str, dst: str, ident: int, proto: int) -> np.ndarray:
    k = np.zeros(1, dtype=fw.maps["fragments"].key_dtype)
    k["src"], k["dst"] = ip_to_addr(src), ip_to_addr(dst)
    k["id"], k["proto"] = port_be(ident), proto
    return k


def _first(src, dst, ident, sport=5000, dport=53):
    return P.eth(P.ipv4(src, dst, 17, P.udp_seg(sport, dport, b"a" * 64), frag=P.IP_MF,
                        ident=ident))


def _later(src, dst, ident, offset=9, more=False, proto=17):
    return P.eth(P.ipv4(src, dst, proto, b"b" * 64, frag=offset | (P.IP_MF if more else 0),
                        ident=ident))


def test_fragments_follow_an_accepted_first_fragment(pfw):
    fw = pfw
    assert run(fw, _first(VM, CLIENT, 77)) == "pass-outbound"
    assert fw.maps["fragments"].lookup(_frag_key(fw, VM, CLIENT, 77, 17)) is not None
    assert run(fw, _later(VM, CLIENT, 77, 9, more=True)) == "pass-fragment"
    assert run(fw, _later(VM, CLIENT, 77, 18)) == "pass-fragment"
    # the reply's first fragment matches the session, its followers pass too
    assert run(fw, _first(CLIENT, VM, 900, sport=53, dport=5000)) == "pass-session"
    assert run(fw, _later(CLIENT, VM, 900)) == "pass-fragment"


def test_orphan_and_mismatched_fragments_dropped(pfw):
    fw = pfw
    assert run(fw, _later(CLIENT, VM, 55)) == "drop-fragment"  # inbound orphan
    assert run(fw, _later(VM, CLIENT, 55)) == "drop-fragment"  # outbound orphan
    assert run(fw, _first(VM, CLIENT, 77)) == "pass-outbound"
    assert run(fw, _later(VM, CLIENT, 78)) == "drop-fragment"  # other id
    assert run(fw, _later(VM, CLIENT, 77, proto=6)) == "drop-fragment"  # other protocol
    assert run(fw, _later(VM2, CLIENT, 77)) == "drop-fragment"  # other source
    assert run(fw, _later(CLIENT, VM, 77)) == "drop-fragment"  # reversed direction


def test_followers_of_a_dropped_first_fragment_dropped(pfw):
    fw = pfw
    assert run(fw, _first(CLIENT, VM, 66)) == "drop-acl-default"
    assert fw.maps["fragments"].lookup(_frag_key(fw, CLIENT, VM, 66, 17)) is None
    assert run(fw, _later(CLIENT, VM, 66)) == "drop-fragment"


def test_transit_first_fragments_are_not_tracked(pfw):
    fw = pfw
    assert run(fw, _first(OUT_A, OUT_B, 99)) == "pass-transit"
    assert run(fw, _later(OUT_A, OUT_B, 99)) == "pass-transit"
    assert len(fw.maps["fragments"].dump()[0]) == 0


def test_fragment_policy_pass_and_drop(pfw):
    fw = pfw
    policy = fw.const("CFG_FRAG_POLICY")
    fw.set_config(policy, 1)  # pass every non-first fragment
    assert run(fw, _later(CLIENT, VM, 55)) == "pass-fragment"
    fw.set_config(policy, 2)  # drop every non-first fragment
    assert run(fw, _first(VM, CLIENT, 77)) == "pass-outbound"
    assert run(fw, _later(VM, CLIENT, 77)) == "drop-fragment"
    fw.set_config(policy, 0)  # back to tracking
    assert run(fw, _later(VM, CLIENT, 77)) == "pass-fragment"


# ---- full session table -------------------------------------------------------------


def _fill_sessions(fw: Firewall, n: int) -> None:
    """Loads n live, distinct UDP sessions VM2:port <-> 172.16.x.y:53 in one batch."""
    m = fw.maps["sessions"]
    i = np.arange(n, dtype=np.uint32)
    keys = np.zeros(n, dtype=m.key_dtype)
    keys["addr_lo"] = ip_to_addr(VM2)  # 10.1.1.2 < 172.16/12: VM2 is the lo end
    keys["addr_hi"] = ipv4_addr_array(_host("172.16.0.0") + (i >> 8))
    keys["port_lo"] = (np.uint16(10000) + (i & 255).astype(np.uint16)).byteswap()
    keys["port_hi"] = np.uint16(53).byteswap()
    keys["proto"] = UDP
    vals = np.zeros(n, dtype=m.value_dtype)
    now = time.monotonic_ns()
    vals["created_ns"] = now
    vals["last_seen_ns"] = now
    vals["state"] = ST["UDP_ASSURED"]
    vals["initiator"] = SIDE_LO
    vals["packets"][:, 0] = 1
    assert m.update_many(keys, vals) == n


def test_full_table_keeps_established_and_new_flows_stay_unassured(pfw):
    """A full `sessions` table evicts nothing: established and assured sessions keep
    passing; a new flow still works, unassured (in the LRU), until room is made."""
    fw = pfw
    flow = handshake(fw)  # an established TCP session
    assert run(fw, P.udp(VM, 5353, CLIENT, 53)) == "pass-outbound"
    cap = fw.maps["sessions"].info.max_entries
    _fill_sessions(fw, cap - 1)
    assert len(fw.maps["sessions"].dump()[0]) == cap

    # existing sessions keep passing both ways
    for frame in (flow.data("b", b"still here"), flow.ack("a"),
                  P.udp("172.16.0.1", 53, VM2, 10000)):  # a loaded entry is a real session
        assert run(fw, frame) == "pass-session"
    # a new TCP handshake completes but cannot be promoted: it stays unassured and works
    new = P.TcpFlow(VM, 41000, CLIENT, 443)
    for frame in (new.syn(), new.synack(), new.ack("a"), new.data("b", b"x")):
        assert run(fw, frame) in ("pass-outbound", "pass-session")
    where, v = find(fw, TCP, VM, 41000, CLIENT, 443)
    assert where == "unassured" and v["state"] == ST["ESTABLISHED"]
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "ESTABLISHED"
    assert len(fw.maps["sessions"].dump()[0]) == cap

    # an expired entry's own flow may take its slot back (same key, no new slot)
    set_timeout(fw, "UDP_ASSURED", 30)
    age(fw, "sessions", key_of(fw, UDP, VM2, 10001, "172.16.0.0", 53), 31)
    assert run(fw, P.udp(VM2, 10001, "172.16.0.0", 53)) == "pass-outbound"
    # room made by deletion is used by the next flow that becomes assured
    assert fw.maps["sessions"].delete(key_of(fw, UDP, VM2, 10002, "172.16.0.0", 53))
    assert run(fw, new.data("a", b"y")) == "pass-session"
    assert find(fw, TCP, VM, 41000, CLIENT, 443)[0] == "sessions"


def test_echo_request_from_the_pinged_side_does_not_ride_the_ping_session(pfw):
    fw = pfw
    assert run(fw, P.icmp_echo(VM, CLIENT, 4242)) == "pass-outbound"
    # same identifier, but a *request* from the pinged host: a new inbound flow
    assert run(fw, P.icmp_echo(CLIENT, VM, 4242)) == "drop-invalid"
    assert run(fw, P.icmp_echo(CLIENT, VM, 4242, reply=True)) == "pass-session"


def test_fragment_followers_expire_after_30s(pfw):
    fw = pfw
    first = P.eth(P.ipv4(VM, CLIENT, 17, P.udp_seg(5000, 53) + b"x" * 16, frag=0x2000, ident=77))
    later = P.eth(P.ipv4(VM, CLIENT, 17, b"y" * 16, frag=3, ident=77))
    assert run(fw, first).startswith("pass-")
    assert run(fw, later) == "pass-fragment"
    m = fw.maps["fragments"]
    keys, values = m.dump()
    values["seen_ns"] = time.monotonic_ns() - 31 * 10**9
    m.update(keys[:1], values[:1])
    assert run(fw, later) == "drop-fragment"
