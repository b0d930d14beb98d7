"""Datapath security through BPF_PROG_TEST_RUN: what an attacker on the uplink may not
get past (DESIGN.md section 6, first two rows).

- anti-spoofing: a protected source is accepted only where this host reaches it;
- TCP window tracking with conntrack's semantics: out-of-window segments and blind
  RSTs change nothing, invalid flag combinations are dropped, simultaneous open works;
- fragments (RFC 1858 / 3128): nothing may rewrite a transport header that was checked;
- state exhaustion: one-shot flows live in the evictable `unassured` LRU and can't pin
  the table of assured sessions full.

Verdicts are read as the reason counter that moved (`test_datapath.run`).
"""

from __future__ import annotations

import struct
import subprocess
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import PROGRAM_KINDS, fresh_firewall, unavailable
from test_datapath import CLIENT, NET, NS, ST, TCP, UDP, VM, VM2, find, key_of, run, state_of

from sami_xdp.loader.pinned import Firewall
from sami_xdp.policy import acl, protect
from sami_xdp.policy.roles import set_role
from testbed import packets as P

pytestmark = pytest.mark.needs_root

ATTACKER = "203.0.113.66"



@pytest.fixture(params=PROGRAM_KINDS)
def fw(request: pytest.FixtureRequest, firewall: Firewall) -> Firewall:
    """Every test here runs against the XDP program and against the TC one."""
    return fresh_firewall(firewall, request.param)

@pytest.fixture
def pfw(fw: Firewall) -> Firewall:
    protect.add_protected(fw, NET)
    return fw


@pytest.fixture
def link() -> Iterator[int]:
    """A fresh veth of our own (no address, no route to the VMs): an uplink as the
    routing sees it. Removed afterwards."""
    name = f"sxsp{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name",
                           name + "p"], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable(f"cannot add a veth pair: {made.stderr.strip()}")
    try:
        ifindex = int(open(f"/sys/class/net/{name}/ifindex").read())
        yield ifindex
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def allow(fw: Firewall, **kw: object) -> None:
    acl.add_rules(fw, [acl.make_rule(fw, vm=VM, **kw)])  # type: ignore[arg-type]


# ---- anti-spoofing ----------------------------------------------------------------------


@pytest.mark.parametrize("role", ["uplink", "auto"])
def test_vm_source_from_the_uplink_is_spoofed_and_creates_nothing(pfw, link, role):
    """`auto`: the route to 10.1.1.1 does not leave by this link, so a packet from
    10.1.1.1 cannot have come in through it (strict reverse path)."""
    fw = pfw
    set_role(fw, link, role)
    for frame in (P.tcp(VM, 40000, CLIENT, 80, P.SYN), P.udp(VM, 5353, CLIENT, 53),
                  P.icmp_echo(VM, CLIENT, 7), P.tcp(VM2, 40000, VM, 22, P.SYN)):
        assert run(fw, frame, ifindex=link) == "drop-spoofed"
    assert len(fw.maps["unassured"].dump()[0]) == 0 and len(fw.maps["sessions"].dump()[0]) == 0
    # the "replies" find nothing to ride on
    allow(fw, proto="tcp", dport="22")
    assert run(fw, P.tcp(CLIENT, 80, VM, 40000, P.SYN | P.ACK)) == "drop-no-session"
    assert run(fw, P.udp(CLIENT, 53, VM, 5353)) == "drop-acl-default"
    # clients' own sources are not protected: they are not checked
    assert run(fw, P.tcp(CLIENT, 5555, VM, 22, P.SYN), ifindex=link) == "pass-acl"


def test_vm_role_accepts_protected_sources(pfw, link):
    set_role(pfw, link, "vm")
    assert run(pfw, P.tcp(VM, 40000, CLIENT, 80, P.SYN), ifindex=link) == "pass-outbound"


def test_spoofed_packet_of_a_live_session_is_dropped_on_the_fast_path(pfw, link):
    """An attacker who knows an established connection's tuple injects the VM's side
    from the uplink: dropped before it touches the session."""
    fw = pfw
    set_role(fw, link, "uplink")
    flow = P.TcpFlow(VM, 40000, CLIENT, 80)
    for frame in (flow.syn(), flow.synack(), flow.ack("a")):
        assert run(fw, frame) in ("pass-outbound", "pass-session")
    _, before = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert run(fw, flow.rst("a", advance=False), ifindex=link) == "drop-spoofed"
    assert run(fw, flow.data("a", b"forged", advance=False), ifindex=link) == "drop-spoofed"
    _, after = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert after.tobytes() == before.tobytes()
    assert run(fw, flow.data("a", b"real")) == "pass-session"  # the VM's own side, on lo


# ---- TCP window tracking -----------------------------------------------------------------


def established(fw: Firewall, **kw: object) -> P.TcpFlow:
    flow = P.TcpFlow(VM, 40000, CLIENT, 80, **kw)  # type: ignore[arg-type]
    for frame in (flow.syn(), flow.synack(), flow.ack("a")):
        assert run(fw, frame) in ("pass-outbound", "pass-session")
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "ESTABLISHED"
    return flow


def test_out_of_window_data_and_acks_change_nothing(pfw):
    fw = pfw
    flow = established(fw)
    assert run(fw, flow.data("b", b"hello")) == "pass-session"
    _, before = find(fw, TCP, VM, 40000, CLIENT, 80)
    far = flow.snd_nxt["b"] + 2**30
    assert run(fw, flow.data("b", b"injected", seq=far)) == "drop-invalid"
    assert run(fw, flow.ack("b", ack=flow.snd_nxt["a"] + 100_000, advance=False)) \
        == "drop-invalid"
    assert run(fw, flow.data("a", b"x", ack=flow.snd_nxt["b"] + 2**20, advance=False)) \
        == "drop-invalid"
    _, after = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert after.tobytes() == before.tobytes(), "an invalid segment changes nothing"
    assert run(fw, flow.data("b", b"more")) == "pass-session"


def test_old_retransmission_passes_without_refreshing(pfw):
    """Data the receiver acknowledged long ago (below the window): conntrack passes it
    and changes nothing; so does sami-xdp."""
    fw = pfw
    flow = established(fw)
    old = flow.snd_nxt["b"]
    for _ in range(60):  # 84 KB: the old data is now more than a window behind
        assert run(fw, flow.data("b", b"z" * 1400)) == "pass-session"
        assert run(fw, flow.ack("a")) == "pass-session"
    key = key_of(fw, TCP, VM, 40000, CLIENT, 80)
    v = fw.maps["sessions"].lookup(key)
    v = np.array([v], dtype=fw.maps["sessions"].value_dtype)
    v["last_seen_ns"] = time.monotonic_ns() - 5 * NS
    fw.maps["sessions"].update(key, v)
    assert run(fw, flow.data("b", b"old", seq=old)) == "pass-session"
    after = fw.maps["sessions"].lookup(key)
    assert int(after["last_seen_ns"]) == int(v["last_seen_ns"][0])


@pytest.mark.parametrize("sender", ["a", "b"])
def test_blind_rst_far_from_the_window_is_dropped(pfw, sender):
    fw = pfw
    flow = established(fw)
    # a small overshoot (less than a window) passes like conntrack's "bytes more than
    # expected" but closes nothing; these are far out
    for delta in (2**30, -(2**30), 200_000):
        rst = flow.rst(sender, seq=flow.snd_nxt[sender] + delta)
        assert run(fw, rst) == "drop-invalid"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "ESTABLISHED"
    assert run(fw, flow.data("b", b"still alive")) == "pass-session"


def test_in_window_rst_must_match_exactly_to_close(pfw):
    """RFC 5961: an in-window RST that is not at the next expected sequence passes (the
    endpoint answers with a challenge ACK) but closes nothing; the exact one closes."""
    fw = pfw
    flow = established(fw)
    assert run(fw, flow.data("a", b"x" * 100)) == "pass-session"
    assert run(fw, flow.ack("b")) == "pass-session"
    assert run(fw, flow.rst("b", seq=flow.snd_nxt["b"] + 1000)) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "ESTABLISHED"
    # behind what the VM acknowledged: invalid
    assert run(fw, flow.rst("b", seq=flow.snd_nxt["b"] - 10)) == "drop-invalid"
    assert run(fw, flow.rst("b")) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "CLOSED"


def test_window_scaling_is_negotiated_by_both_syns(pfw):
    """With scale 7 on both SYNs the advertised 512 means 64 KiB: data within it
    passes, data beyond the scaled window is invalid."""
    fw = pfw
    flow = P.TcpFlow(VM, 40000, CLIENT, 80, win=512)
    assert run(fw, flow.syn(options=P.syn_options(7))) == "pass-outbound"
    assert run(fw, flow.synack(options=P.syn_options(7))) == "pass-session"
    assert run(fw, flow.ack("a")) == "pass-session"
    _, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert list(v["tcp"]["scale"]) == [7, 7]
    assert run(fw, flow.data("b", b"y" * 1400)) == "pass-session"
    assert run(fw, flow.ack("a")) == "pass-session"
    assert run(fw, flow.data("b", b"y" * 100, seq=flow.snd_nxt["b"] + 40_000)) \
        == "pass-session", "inside 512 << 7"
    assert run(fw, flow.data("b", b"y" * 100, seq=flow.snd_nxt["b"] + 200_000)) \
        == "drop-invalid", "beyond 512 << 7"


def test_window_scaling_needs_both_ends(pfw):
    fw = pfw
    flow = P.TcpFlow(VM, 40000, CLIENT, 80, win=512)
    assert run(fw, flow.syn(options=P.syn_options(7))) == "pass-outbound"
    assert run(fw, flow.synack(options=P.syn_options(None))) == "pass-session"
    assert run(fw, flow.ack("a")) == "pass-session"
    _, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert list(v["tcp"]["scale"]) == [0, 0]
    assert run(fw, flow.data("b", b"y" * 100, seq=flow.snd_nxt["b"] + 40_000)) \
        == "drop-invalid", "512 bytes of window, unscaled"


def test_liberal_setting_passes_out_of_window(pfw):
    fw = pfw
    fw.set_config(fw.const("CFG_TCP_LIBERAL"), 1)
    flow = established(fw)
    assert run(fw, flow.data("b", b"far", seq=flow.snd_nxt["b"] + 2**30)) == "pass-session"


@pytest.mark.parametrize("flags", [P.SYN | P.FIN, 0, P.FIN | P.PSH | 0x20, P.FIN,
                                   P.SYN | P.RST], ids=["syn-fin", "null", "xmas", "fin",
                                                        "syn-rst"])
def test_invalid_flag_combinations_are_dropped(pfw, flags):
    fw = pfw
    allow(fw, proto="tcp", dport="80")
    assert run(fw, P.tcp(CLIENT, 5555, VM, 80, flags)) == "drop-invalid"
    assert len(fw.maps["unassured"].dump()[0]) == 0
    flow = established(fw)
    assert run(fw, flow.frame("b", flags, advance=False)) == "drop-invalid"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "ESTABLISHED"


def test_simultaneous_open_completes(pfw):
    """RFC 793 crossing SYNs: SYN_SENT -> SYN_SENT2 -> SYN_RECV -> ESTABLISHED, each
    crossing SYN and SYN/ACK passing (no ACL needed: it belongs to the VM's SYN)."""
    fw = pfw
    flow = P.TcpFlow(VM, 40000, CLIENT, 80)
    isn_a, isn_b = flow.snd_nxt["a"], flow.snd_nxt["b"]
    assert run(fw, flow.syn()) == "pass-outbound"
    assert run(fw, flow.frame("b", P.SYN)) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "SYN_SENT2"
    assert run(fw, flow.frame("a", P.SYN | P.ACK, seq=isn_a)) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "SYN_RECV"
    assert run(fw, flow.frame("b", P.SYN | P.ACK, seq=isn_b)) == "pass-session"
    assert run(fw, flow.ack("b")) == "pass-session"
    where, v = find(fw, TCP, VM, 40000, CLIENT, 80)
    assert where == "sessions" and v["state"] == ST["ESTABLISHED"]
    assert run(fw, flow.data("a", b"hi")) == "pass-session"


def test_migrated_session_anchors_its_window_on_the_first_packets(pfw):
    """A session imported without window edges (only the scales travel) learns them
    from its first packet each way; an RST before that closes nothing; afterwards the
    window is enforced again."""
    fw = pfw
    flow = established(fw)
    key = key_of(fw, TCP, VM, 40000, CLIENT, 80)
    m = fw.maps["sessions"]
    v = np.array([m.lookup(key)], dtype=m.value_dtype)
    for f in ("end", "maxend", "maxwin", "maxack"):
        v["tcp"][f] = 0
    v["tcp"]["flags"] = 0
    m.update(key, v)
    assert run(fw, flow.rst("b", seq=flow.snd_nxt["b"] + 2**30)) == "pass-session"
    assert state_of(fw, TCP, VM, 40000, CLIENT, 80) == "ESTABLISHED", "RSTs anchor nothing"
    assert run(fw, flow.data("b", b"first after the move")) == "pass-session"
    assert run(fw, flow.data("a", b"and the other way")) == "pass-session"
    assert run(fw, flow.data("b", b"far", seq=flow.snd_nxt["b"] + 2**30)) == "drop-invalid"


# ---- fragments (RFC 1858, RFC 3128) --------------------------------------------------------


def _tcp_first_fragment(src: str, dst: str, ident: int, sport: int, dport: int,
                        flags: int) -> bytes:
    seg = P.tcp_seg(sport, dport, flags, b"p" * 12)
    return P.eth(P.ipv4(src, dst, 6, seg[:24], frag=P.IP_MF, ident=ident))


def test_tcp_fragment_at_offset_one_is_dropped(pfw):
    fw = pfw
    allow(fw, proto="tcp", dport="80")
    assert run(fw, _tcp_first_fragment(CLIENT, VM, 71, 5555, 80, P.SYN)) == "pass-acl"
    overlap = bytes(P.tcp_seg(5555, 80, P.SYN, b"p" * 12)[8:])
    overlap = overlap[:5] + bytes([0x2F]) + overlap[6:]  # rewrite the flags byte
    assert run(fw, P.eth(P.ipv4(CLIENT, VM, 6, overlap, frag=1, ident=71))) == "drop-fragment"
    # offset 1 is never legitimate TCP, first fragment seen or not, whatever the policy
    fw.set_config(fw.const("CFG_FRAG_POLICY"), 1)  # pass later fragments untracked
    assert run(fw, P.eth(P.ipv4(CLIENT, VM, 6, overlap, frag=1, ident=72))) == "drop-fragment"
    assert run(fw, P.eth(P.ipv4(CLIENT, VM, 6, overlap, frag=2, ident=72))) == "pass-fragment"


def test_later_fragment_overlapping_the_checked_header_is_dropped(pfw):
    fw = pfw
    flow = established(fw)
    seg = bytes(flow.frame("b", P.PSH | P.ACK, b"q" * 40, advance=False)[34:])
    first = P.eth(P.ipv4(CLIENT, VM, 6, seg[:24], frag=P.IP_MF, ident=81))
    assert run(fw, first) == "pass-session"
    assert run(fw, P.eth(P.ipv4(CLIENT, VM, 6, seg[16:], frag=2, ident=81))) \
        == "drop-fragment", "offset 16 < the 20-byte TCP header"
    assert run(fw, P.eth(P.ipv4(CLIENT, VM, 6, seg[24:], frag=3, ident=81))) \
        == "pass-fragment", "offset 24: past the header"


def test_udp_follower_right_after_the_header_passes(pfw):
    fw = pfw
    first = P.eth(P.ipv4(VM, CLIENT, 17, P.udp_seg(5000, 53, b"x" * 16)[:8], frag=P.IP_MF,
                         ident=91))
    assert run(fw, first) == "pass-outbound"
    assert run(fw, P.eth(P.ipv4(VM, CLIENT, 17, b"x" * 16, frag=1, ident=91))) \
        == "pass-fragment"


# ---- state exhaustion ------------------------------------------------------------------


def test_one_shot_udp_flood_cannot_lock_out_new_connections(pfw):
    """Spoofed one-shot UDP to an allowed port the VM answers: each flow sees a request
    and a reply, then nothing. They stay unassured (short timeout, evictable LRU), so a
    flood of twice the LRU's size neither fills `sessions` nor stops new connections,
    and established sessions are never evicted."""
    fw = pfw
    allow(fw, proto="udp", dport="53")
    flow = established(fw)
    cap = fw.maps["unassured"].info.max_entries
    for i in range(2 * cap):
        src = f"100.{64 + (i >> 16) % 64}.{(i >> 8) & 255}.{i & 255}"
        assert run(fw, P.udp(src, 1024 + i % 60000, VM, 53)) == "pass-acl"
        assert run(fw, P.udp(VM, 53, src, 1024 + i % 60000)) == "pass-session"
    assert len(fw.maps["unassured"].dump()[0]) <= cap
    assert len(fw.maps["sessions"].dump()[0]) == 1, "only the established TCP session"
    # new connections of every kind still work
    assert run(fw, P.udp(CLIENT, 5000, VM, 53)) == "pass-acl"
    assert run(fw, P.udp(VM, 53, CLIENT, 5000)) == "pass-session"
    new = P.TcpFlow(VM, 41000, CLIENT, 443)
    for frame in (new.syn(), new.synack(), new.ack("a")):
        assert run(fw, frame) in ("pass-outbound", "pass-session")
    assert find(fw, TCP, VM, 41000, CLIENT, 443)[0] == "sessions"
    assert run(fw, flow.data("b", b"never evicted")) == "pass-session"
    # and the flood's entries are on a 30 s timeout, as conntrack's unassured UDP
    keys, values = fw.maps["unassured"].dump()
    udp_states = values["state"][keys["proto"] == UDP]
    assert set(udp_states.tolist()) == {ST["UDP_REPLIED"]}
    assert fw.read_config()[ST["UDP_REPLIED"]] == 30


def test_frame_helpers_build_the_flags_they_claim():
    """The tests above rely on these builders: flags at byte 13 of the TCP header."""
    f = P.TcpFlow(VM, 1, CLIENT, 2)
    frame = f.frame("a", P.SYN | P.FIN, advance=False)
    assert frame[14 + 20 + 13] == P.SYN | P.FIN
    assert struct.unpack("!I", frame[14 + 20 + 4:14 + 20 + 8])[0] == f.snd_nxt["a"]
