"""Truncated and garbage frames through the real program: counted, never misparsed.

`expected()` is an independent reference parser of what the datapath must
read before it can decide (Ethernet, up to two VLAN tags, IPv4, the L4 header
of TCP/UDP/ICMP, the IPv4+8 bytes quoted by an ICMP error). It sorts a frame
into:
  malformed  - a header the parser needs is missing or invalid: must be
               drop-malformed;
  ok         - every header present and consistent: must NOT be drop-malformed;
  outside    - a UDP/ICMP header or ICMP-error quote lies in the frame but past
               the IPv4 total length (in Ethernet padding): must be
               drop-malformed (`test_l4_header_outside_the_datagram_is_malformed`);
  non-ip     - must be pass-non-ip.
Truncated datagrams (tot_len > frame, TCP data offset past tot_len) and frames
with more VLAN tags than parsed are malformed (regressions, fixed in 37bca57).
BPF_PROG_TEST_RUN rejects frames shorter than an Ethernet header (14 bytes).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from sami_xdp.loader import bpfsys
from sami_xdp.loader.pinned import Firewall
from sami_xdp.policy import protect, stats
from testbed import packets as P

pytestmark = pytest.mark.needs_root

VM, CLIENT, OUTSIDE, ROUTER = "10.1.1.1", "192.0.2.10", "198.51.100.1", "198.51.100.254"
ADDRS = (VM, CLIENT, OUTSIDE)
ETH_MIN = 14
TAG_TPIDS = (0x8100, 0x88A8)
ICMP_ERRORS = (3, 4, 11, 12)
L4_MIN = {6: 20, 17: 8, 1: 8}

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis/ cache in the tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def expected(frame: bytes) -> str:
    """Reference classification: "malformed", "outside", "ok" or "non-ip"."""
    n = len(frame)
    if n < ETH_MIN:
        return "malformed"
    (proto,) = struct.unpack_from("!H", frame, 12)
    off = ETH_MIN
    for _ in range(2):
        if proto not in TAG_TPIDS:
            break
        if n < off + 4:
            return "malformed"
        (proto,) = struct.unpack_from("!H", frame, off + 2)
        off += 4
    if proto in TAG_TPIDS:
        return "malformed"  # more tags than parsed: never passed unfiltered
    if proto != 0x0800:
        return "non-ip"
    if n < off + 20:
        return "malformed"
    version, ihl = frame[off] >> 4, frame[off] & 0x0F
    if version != 4 or ihl < 5:
        return "malformed"
    (tot_len,) = struct.unpack_from("!H", frame, off + 2)
    if tot_len < ihl * 4 or off + tot_len > n:  # inconsistent or truncated datagram
        return "malformed"
    (frag_off,) = struct.unpack_from("!H", frame, off + 6)
    if frag_off & 0x1FFF:
        return "ok"  # no L4 header in later fragments
    l4 = off + ihl * 4
    ip_end = off + tot_len
    ip_proto = frame[off + 9]
    need = l4 + L4_MIN.get(ip_proto, 0)
    if need > n:
        return "malformed"
    if ip_proto == 6:
        doff = frame[l4 + 12] >> 4
        if doff < 5 or l4 + doff * 4 > ip_end:
            return "malformed"
    elif ip_proto == 1 and frame[l4] in ICMP_ERRORS:
        q = l4 + 8
        if n < q + 20:
            return "malformed"
        if frame[q] >> 4 != 4 or frame[q] & 0x0F < 5:
            return "malformed"
        need = q + (frame[q] & 0x0F) * 4 + 8
        if need > n:
            return "malformed"
    # headers the parser read lie in the frame; do they lie in the datagram?
    return "outside" if need > ip_end else "ok"


def verdict(fw: Firewall, frame: bytes) -> str:
    """One PROG_TEST_RUN; the reason whose counter moved (exactly one, by one packet
    and len(frame) bytes, agreeing with the XDP action; the frame is not rewritten)."""
    before = stats.read_verdicts(fw)
    res = bpfsys.prog_test_run(fw.prog_fd, frame)
    after = stats.read_verdicts(fw)
    moved = {k: (after[k]["packets"] - before[k]["packets"], after[k]["bytes"] - before[k]["bytes"])
             for k in after if after[k] != before[k]}
    assert len(moved) == 1, moved
    ((reason, delta),) = moved.items()
    assert delta == (1, len(frame)), (reason, delta)
    action = {1: "drop", 2: "pass"}.get(res.retval, f"retval={res.retval}")
    assert reason.startswith(action + "-"), (res.retval, reason)
    assert res.data_out == frame
    return reason


def check(fw: Firewall, frame: bytes) -> str:
    """Runs a frame and checks the verdict against the reference parser."""
    want = expected(frame)
    got = verdict(fw, frame)
    if currently_in_test_context():
        event(f"{want} -> {got}")  # shown by --hypothesis-show-statistics
    if want == "malformed":
        assert got == "drop-malformed", (want, got, frame.hex())
    elif want == "ok":
        assert got != "drop-malformed", (want, got, frame.hex())
    elif want == "non-ip":
        assert got == "pass-non-ip", (want, got, frame.hex())
    return want


@pytest.fixture
def pfw(fw: Firewall) -> Firewall:
    protect.add_protected(fw, "10.1.1.0/24")
    return fw


# ---- the reference parser agrees with the frame builder ---------------------------


def test_reference_parser_on_known_frames():
    assert expected(P.tcp(VM, 1, CLIENT, 2, P.SYN)) == "ok"
    assert expected(P.tcp(VM, 1, CLIENT, 2, P.SYN, vlans=(1, 2))) == "ok"
    assert expected(P.arp()) == "non-ip"
    assert expected(P.tcp(VM, 1, CLIENT, 2, P.ACK, b"abc")[:-1]) == "malformed"
    assert expected(P.tcp(VM, 1, CLIENT, 2, P.ACK)[:-1]) == "malformed"
    assert expected(P.eth(P.ipv4_raw(VM, CLIENT, 6, P.tcp_seg(1, 2, 0), ihl=4))) == "malformed"
    assert expected(P.eth(P.ipv4(VM, CLIENT, 6, P.tcp_seg_raw(1, 2, 0, doff=4)))) == "malformed"
    assert expected(P.eth(P.ipv4(VM, CLIENT, 6, P.tcp_seg_raw(1, 2, 0, doff=6)))) == "malformed"
    assert expected(P.eth_tags(P.ipv4(VM, CLIENT, 17, P.udp_seg(1, 2)),
                               ((0x88A8, 1), (0x8100, 2), (0x8100, 3)))) == "malformed"
    assert expected(P.eth(P.ipv4_raw(VM, CLIENT, 17, P.udp_seg(1, 2), tot_len=24))) == "outside"
    assert expected(P.eth(P.ipv4(VM, CLIENT, 17, P.udp_seg(1, 2))) + b"\0" * 20) == "ok"


# ---- truncation of valid frames at every length ------------------------------------


def _templates() -> dict[str, bytes]:
    out_udp = P.ipv4(VM, CLIENT, 17, P.udp_seg(5353, 53, b"q" * 12))
    return {
        "tcp-syn-out": P.tcp(VM, 40000, CLIENT, 80, P.SYN),
        "tcp-data-in": P.tcp(CLIENT, 80, VM, 40000, P.PSH | P.ACK, b"hello world"),
        "tcp-options": P.eth(P.ipv4(VM, CLIENT, 6, P.tcp_seg_raw(
            40000, 80, P.SYN, doff=8, options=bytes.fromhex("020405b4" "01030307" "00000000")))),
        "udp-out": P.eth(out_udp),
        "udp-vlan": P.udp(CLIENT, 53, VM, 5353, b"r" * 9, vlans=(42,)),
        "udp-qinq": P.udp(VM, 5353, CLIENT, 53, b"r" * 9, vlans=(42, 43)),
        "icmp-echo": P.icmp_echo(VM, CLIENT, ident=7),
        "icmp-error": P.icmp_error(CLIENT, VM, out_udp),
        "ip-options": P.eth(P.ipv4_raw(CLIENT, VM, 17, P.udp_seg(53, 5353, b"o" * 5), ihl=7,
                                       options=b"\x01" * 8)),
        "transit": P.tcp(OUTSIDE, 1, "203.0.113.9", 2, P.ACK, b"t" * 7),
        "gre": P.eth(P.ipv4(VM, CLIENT, 47, b"\0" * 12)),
        "later-fragment": P.eth(P.ipv4(VM, CLIENT, 17, b"f" * 16, frag=10)),
    }


@pytest.mark.parametrize("name", list(_templates()))
def test_truncation_at_every_length(pfw, name):
    frame = _templates()[name]
    kinds = set()
    for cut in range(ETH_MIN, len(frame) + 1):
        kinds.add(check(pfw, frame[:cut]))
    assert expected(frame) == "ok"
    assert "malformed" in kinds or name == "later-fragment"


def _truncated_cases() -> list[bytes]:
    """Valid frames cut inside their payload: headers complete, datagram truncated."""
    out = []
    for frame in _templates().values():
        out += [frame[:cut] for cut in range(ETH_MIN, len(frame))
                if _ip_end(frame[:cut]) > len(frame[:cut])]
    # headers complete, but the IPv4/TCP lengths claim more than there is
    out.append(P.eth(P.ipv4_raw(VM, CLIENT, 17, P.udp_seg(1, 2), tot_len=1500)))
    out.append(P.eth(P.ipv4(CLIENT, VM, 6, P.tcp_seg_raw(80, 40000, P.ACK, doff=15))))
    out.append(P.eth(P.ipv4_raw(CLIENT, VM, 47, b"", ihl=15, tot_len=60)))  # options cut
    return out


def _ip_end(frame: bytes) -> int:
    """Where the IPv4 datagram claims to end (0 if no complete IPv4 header)."""
    off = ETH_MIN
    for _ in range(2):
        if frame[off - 2:off] not in (b"\x81\x00", b"\x88\xa8"):
            break
        off += 4
    if len(frame) < off + 20:
        return 0
    return off + struct.unpack_from("!H", frame, off + 2)[0]


def test_truncated_datagrams_are_malformed(pfw):
    """Regression: parse_packet() did not check tot_len against the frame (nor TCP
    doff against tot_len), so truncated datagrams passed with their claimed length."""
    cases = _truncated_cases()
    assert len(cases) > 50
    for case in cases:
        assert expected(case) == "malformed", case.hex()
        assert verdict(pfw, case) == "drop-malformed", case.hex()


def _outside_cases() -> list[bytes]:
    quoted = P.ipv4(VM, CLIENT, 17, P.udp_seg(5353, 53))
    return [
        # UDP header in the frame, but tot_len covers only 4 of its 8 bytes
        P.eth(P.ipv4_raw(VM, CLIENT, 17, P.udp_seg(5353, 53, b""), tot_len=24)),
        P.eth(P.ipv4_raw(CLIENT, VM, 17, P.udp_seg(53, 5353, b""), tot_len=20)),
        # ICMP echo header past tot_len
        P.eth(P.ipv4_raw(VM, CLIENT, 1, P.icmp_msg(8, 0, b"\0\1\0\1"), tot_len=24)),
        # ICMP error whose quoted ports lie past tot_len
        P.eth(P.ipv4_raw(ROUTER, VM, 1, P.icmp_msg(3, 3, payload=quoted[:28]), tot_len=48)),
    ]


def test_l4_header_outside_the_datagram_is_malformed(pfw):
    cases = _outside_cases()
    assert all(expected(c) == "outside" for c in cases)
    got = [verdict(pfw, c) for c in cases]
    assert got == ["drop-malformed"] * len(cases)


def test_ethernet_padding_is_not_truncation(pfw):
    """Short frames are padded to 60 bytes on the wire: tot_len < frame is legal."""
    frame = P.udp(VM, 5353, CLIENT, 53, b"")
    padded = frame + b"\0" * (60 - len(frame))
    assert expected(padded) == "ok"
    assert verdict(pfw, padded) == "pass-outbound"


# ---- hypothesis: random bytes, bad IHL, bad doff, garbage ------------------------------

addr = st.sampled_from(ADDRS)
vlan_stack = st.sampled_from([(), (7,), (7, 8)])


@FUZZ
@given(src=addr, dst=addr, vlans=vlan_stack,
       proto=st.one_of(st.sampled_from([6, 17, 1]), st.integers(0, 255)),
       frag=st.sampled_from([0, 0, 0, P.IP_MF, 3, P.IP_MF | 3]),
       payload=st.binary(max_size=80))
def test_random_bytes_after_valid_ipv4_header(pfw, src, dst, vlans, proto, frag, payload):
    frame = P.eth(P.ipv4(src, dst, proto, payload, frag=frag), vlans=vlans)
    check(pfw, frame)


@FUZZ
@given(src=addr, dst=addr, ihl=st.integers(0, 15), version=st.sampled_from([4, 4, 4, 0, 6, 15]),
       opt_len=st.one_of(st.none(), st.integers(0, 44)), proto=st.sampled_from([6, 17, 1, 47]),
       tot_len=st.one_of(st.none(), st.none(), st.integers(0, 200)),
       payload=st.binary(max_size=24))
def test_bad_ihl_and_version(pfw, src, dst, ihl, version, opt_len, proto, tot_len, payload):
    if opt_len is None:  # options that agree with the IHL
        opt_len = max(0, ihl - 5) * 4
    l4 = {6: P.tcp_seg(1000, 80, P.SYN, payload), 17: P.udp_seg(1000, 53, payload),
          1: P.icmp_msg(8, 0, b"\0\1\0\1", payload), 47: payload}[proto]
    ip = P.ipv4_raw(src, dst, proto, l4, ihl=ihl, version=version, tot_len=tot_len,
                    options=b"\x01" * opt_len)
    kind = check(pfw, P.eth(ip))
    if version != 4 or ihl < 5:
        assert kind == "malformed"


@FUZZ
@given(src=addr, dst=addr, flags=st.integers(0, 255), doff=st.integers(0, 15),
       opt_len=st.integers(0, 40), payload=st.binary(max_size=24),
       vlans=vlan_stack)
def test_bad_tcp_data_offset(pfw, src, dst, flags, doff, opt_len, payload, vlans):
    seg = P.tcp_seg_raw(1234, 80, flags, payload, doff=doff, options=b"\x01" * opt_len)
    kind = check(pfw, P.eth(P.ipv4(src, dst, 6, seg), vlans=vlans))
    if doff < 5:
        assert kind == "malformed"
    elif doff * 4 <= len(seg):
        assert kind == "ok"


_quotable = st.sampled_from([
    P.ipv4(VM, CLIENT, 17, P.udp_seg(5353, 53)),
    P.ipv4(VM, CLIENT, 6, P.tcp_seg(40000, 80, P.SYN)),
    P.icmp_echo_ip(VM, CLIENT, 9),
    P.ipv4_raw(VM, CLIENT, 17, P.udp_seg(5353, 53), ihl=6, options=b"\x01" * 4),
])
# a real quoted packet cut anywhere, possibly followed by junk, or plain junk
_quote = st.one_of(
    st.builds(lambda ip, cut, junk: ip[:cut] + junk, _quotable, st.integers(0, 40),
              st.binary(max_size=12)),
    st.binary(max_size=60),
)


@FUZZ
@given(src=addr, dst=addr, icmp_type=st.sampled_from(ICMP_ERRORS), quote=_quote)
def test_icmp_error_with_garbage_quote(pfw, src, dst, icmp_type, quote):
    check(pfw, P.eth(P.ipv4(src, dst, 1, P.icmp_msg(icmp_type, 0, payload=quote))))


@FUZZ
@given(head=st.sampled_from([b"", P.ETH_DST + P.ETH_SRC + b"\x08\x00",
                             P.ETH_DST + P.ETH_SRC + b"\x81\x00",
                             P.ETH_DST + P.ETH_SRC + b"\x88\xa8\x00\x01\x81\x00"]),
       body=st.binary(min_size=ETH_MIN, max_size=120))
def test_garbage_frames(pfw, head, body):
    check(pfw, head + body)


def test_fuzzing_left_every_counter_consistent(pfw):
    """After a burst of garbage the per-CPU verdict counters still add up."""
    rng = np.random.default_rng(1234)
    frames = [bytes(rng.integers(0, 256, int(rng.integers(ETH_MIN, 100)), dtype=np.uint8))
              for _ in range(200)]
    for f in frames:
        verdict(pfw, f)
    totals = stats.read_verdicts(pfw)
    assert sum(v["packets"] for v in totals.values()) == len(frames)
    assert sum(v["bytes"] for v in totals.values()) == sum(len(f) for f in frames)
