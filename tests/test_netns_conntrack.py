"""sami-xdp against Linux conntrack, the project's yardstick (DESIGN.md sections 1, 6).

Every case is a named sequence of crafted packets, each with conntrack's verdict. The
harness (`conntrack_diff.py`) sends each packet through both firewalls at once; then:

- `test_conntrack_yardstick` checks that conntrack really does what the case says
  (the case documents the yardstick, and the nft rule that dropped each packet);
- `test_samixdp_matches_conntrack` checks that sami-xdp gives the same verdicts, except
  for the packets listed in `INTENDED` (differences that stay, with the reason) and
  `GAPS` (differences reported as gaps of the datapath, to be closed), and that its
  drop counters (`samixdp stats --json`) name the expected reasons, and its final TCP
  state.

IPv4 cases come first; the `v6_` cases run the same ideas over IPv6 (the `inet`
table's ip6 rules, ICMPv6, Fragment headers) and add IPv6's own: extension headers,
routing header type 0, neighbour discovery, IPv4-mapped addresses.

Each case uses its own ports, ICMP ids and IP ids or flow labels, so no case shares
conntrack or session state with another, and any order passes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from conftest import require_tool
from conntrack_diff import (
    ADDR,
    ADDR6,
    DELIVERED,
    DROPPED,
    ICMP6_TOO_BIG,
    DiffHarness,
    Outcome,
    Probe,
    Role,
    TcpFlow,
    Verdict,
    diff_harness,
    icmp6_error,
    icmp_echo,
    icmp_error,
    ip_fragment,
    ip_hdr,
    is_ipv6,
    next_flow_label,
    next_frag_id,
    next_ip_id,
    transport_bytes,
    transport_proto,
    udp,
)
from netns import CLIENT_IP, CLIENT_IP6, VM_IP, VM_IP6, require_root
from scapy.layers.inet6 import (
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]

D, X = DELIVERED, DROPPED
HTTP, SSH, DNS, CLIENT_SVC = 80, 22, 53, 443  # 80/tcp and 53/udp are allowed inbound


@dataclass(frozen=True)
class Ports:
    """A case's own ports and ICMP id, so its tuples are fresh."""

    client: int
    vm: int
    icmp_id: int


NO_ENTRY = "no entry"


@dataclass(frozen=True)
class Case:
    name: str
    doc: str
    build: Callable[[Ports], list[Probe]]
    # conntrack's state of the case's TCP tuple once it is over (sami-xdp's names), or
    # NO_ENTRY; None: not compared. Verdicts alone can't show that a packet which
    # passed (or was dropped) also changed the state, e.g. closed the session.
    state: str | None = None
    v6: bool = False  # the state is read from the IPv6 tables


CASES: dict[str, Case] = {}
Builder = Callable[[Ports], list[Probe]]


def case(doc: str, state: str | None = None) -> Callable[[Builder], Builder]:
    """Registers a case builder under its function name; the order gives its ports.
    A name starting with `v6_` is an IPv6 case."""

    def register(fn: Builder) -> Builder:
        CASES[fn.__name__] = Case(fn.__name__, doc, fn, state, fn.__name__.startswith("v6_"))
        return fn

    return register


def tcp(flow: TcpFlow, label: str, by: Role, flags: str, ct: Verdict, payload: bytes = b"",
        *, sender: Role | None = None, why: str | None = None, ours: str | None = None,
        seq: int | None = None, ack: int | None = None, src: str | None = None,
        ext: Packet | None = None) -> Probe:
    """A probe carrying one segment of `flow` from `by` (sent from `sender`'s veth,
    which differs from `by` only when an address is spoofed); `seq`/`ack` override the
    flow's numbers (an attacker's guess), `src` its source address, `ext` puts IPv6
    extension headers before TCP."""
    ip = flow.segment(by, flags, payload, seq=seq, ack=ack, src=src, ext=ext)
    return Probe(label, sender or by, ip, ct, why=why, ours=ours)


def handshake(flow: TcpFlow, opener: Role) -> list[Probe]:
    peer: Role = "vm" if opener == "client" else "client"
    return [
        tcp(flow, "syn", opener, "S", D),
        tcp(flow, "syn-ack", peer, "SA", D),
        tcp(flow, "ack", opener, "A", D),
    ]


def close(flow: TcpFlow, first: Role) -> list[Probe]:
    """A clean close: FIN, ACK, FIN, ACK."""
    second: Role = "vm" if first == "client" else "client"
    return [
        tcp(flow, "fin-1", first, "FA", D),
        tcp(flow, "ack-fin-1", second, "A", D),
        tcp(flow, "fin-2", second, "FA", D),
        tcp(flow, "ack-fin-2", first, "A", D),
    ]


# ---- the usual ----------------------------------------------------------------------


@case("the VM opens a connection; handshake and data both ways", state="ESTABLISHED")
def outbound_handshake_data(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    return [*handshake(f, "vm"),
            tcp(f, "data-out", "vm", "PA", D, b"request"),
            tcp(f, "data-in", "client", "PA", D, b"response"),
            tcp(f, "ack-out", "vm", "A", D)]


@case("unsolicited SYN to a port no ACL allows; the VM's SYN/ACK would open nothing",
      state=NO_ENTRY)
def inbound_syn_closed_port(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, SSH)
    return [tcp(f, "syn", "client", "S", X, why="policy", ours="drop-acl-default"),
            tcp(f, "syn-ack", "vm", "SA", X, why="invalid", ours="drop-no-session")]


@case("SYN to an allowed port, handshake and data both ways", state="ESTABLISHED")
def inbound_allowed_handshake_data(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [*handshake(f, "client"),
            tcp(f, "data-in", "client", "PA", D, b"GET /"),
            tcp(f, "data-out", "vm", "PA", D, b"200 OK"),
            tcp(f, "ack-in", "client", "A", D)]


@case("ACK and data towards the VM without any session (no mid-stream pickup)")
def no_session_inbound(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [tcp(f, "ack", "client", "A", X, why="invalid", ours="drop-no-session"),
            tcp(f, "data", "client", "PA", X, b"data", why="invalid", ours="drop-no-session")]


@case("ACK and data from the VM without any session (strict in both directions)")
def no_session_outbound(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    return [tcp(f, "ack", "vm", "A", X, why="invalid", ours="drop-no-session"),
            tcp(f, "data", "vm", "PA", X, b"data", why="invalid", ours="drop-no-session")]


@case("in-window data after a clean FIN exchange (TIME_WAIT)", state="TIME_WAIT")
def data_after_fin(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    return [*handshake(f, "vm"), *close(f, "vm"),
            tcp(f, "data-in", "client", "PA", D, b"late"),
            tcp(f, "data-out", "vm", "PA", D, b"late")]


@case("data after an in-window RST", state="CLOSED")
def data_after_rst(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    return [*handshake(f, "vm"),
            tcp(f, "data-out", "vm", "PA", D, b"request"),
            tcp(f, "rst", "client", "R", D),
            tcp(f, "data-out-2", "vm", "PA", D, b"more"),
            tcp(f, "data-in", "client", "PA", D, b"late")]


@case("a second SYN (new ISN) on an established tuple, then data", state="ESTABLISHED")
def second_syn_established(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    return [*handshake(f, "vm"),
            tcp(f, "syn-again", "vm", "S", D, seq=f.isn["vm"] + 500_000),
            tcp(f, "data-out", "vm", "PA", D, b"still"),
            tcp(f, "data-in", "client", "PA", D, b"here")]


@case("TIME_WAIT reuse: after a clean close, a new SYN with a higher ISN opens again",
      state="ESTABLISHED")
def time_wait_reuse(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    probes = [*handshake(f, "vm"), *close(f, "vm")]
    f.reopen(client_isn=f.nxt["client"] + 1_000_000, vm_isn=f.nxt["vm"] + 1_000_000)
    again = handshake(f, "vm")
    probes += [Probe(f"{q.label}-2", q.sender, q.ip, q.ct) for q in again]
    return [*probes, tcp(f, "data-out", "vm", "PA", D, b"second life")]


@case("UDP from the VM and its reply; another client port may not answer")
def udp_outbound(p: Ports) -> list[Probe]:
    return [Probe("request", "vm", udp(VM_IP, p.vm, CLIENT_IP, DNS), D),
            Probe("reply", "client", udp(CLIENT_IP, DNS, VM_IP, p.vm), D),
            Probe("other-port", "client", udp(CLIENT_IP, DNS + 1, VM_IP, p.vm), X,
                  why="policy", ours="drop-acl-default")]


@case("UDP to an allowed port and the VM's reply")
def udp_inbound_allowed(p: Ports) -> list[Probe]:
    return [Probe("request", "client", udp(CLIENT_IP, p.client, VM_IP, DNS), D),
            Probe("reply", "vm", udp(VM_IP, DNS, CLIENT_IP, p.client), D)]


@case("unsolicited UDP to a port no ACL allows")
def udp_unsolicited(p: Ports) -> list[Probe]:
    return [Probe("request", "client", udp(CLIENT_IP, p.client, VM_IP, DNS + 1), X,
                  why="policy", ours="drop-acl-default")]


@case("ICMP echo from the VM and its reply")
def icmp_echo_outbound(p: Ports) -> list[Probe]:
    return [Probe("request", "vm", icmp_echo(VM_IP, CLIENT_IP, p.icmp_id), D),
            Probe("reply", "client", icmp_echo(CLIENT_IP, VM_IP, p.icmp_id, reply=True), D)]


@case("ICMP echo to the VM (allowed) and its reply")
def icmp_echo_inbound(p: Ports) -> list[Probe]:
    return [Probe("request", "client", icmp_echo(CLIENT_IP, VM_IP, p.icmp_id), D),
            Probe("reply", "vm", icmp_echo(VM_IP, CLIENT_IP, p.icmp_id, reply=True), D)]


@case("an echo reply nobody asked for")
def icmp_reply_unsolicited(p: Ports) -> list[Probe]:
    return [Probe("reply", "client", icmp_echo(CLIENT_IP, VM_IP, p.icmp_id, reply=True), X,
                  why="invalid", ours="drop-no-session")]


@case("port unreachable quoting the VM's live SYN")
def icmp_unreachable_live(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    syn = tcp(f, "syn", "vm", "S", D)
    return [syn, Probe("unreachable", "client", icmp_error(CLIENT_IP, VM_IP, syn.ip), D)]


@case("fragmentation needed quoting a live session's data")
def icmp_frag_needed_live(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    probes = handshake(f, "vm")
    data = tcp(f, "data-out", "vm", "PA", D, b"x" * 200)
    return [*probes, data,
            Probe("frag-needed", "client",
                  icmp_error(CLIENT_IP, VM_IP, data.ip, 3, 4, mtu=1280), D)]


@case("the VM's port unreachable about a live inbound UDP flow")
def icmp_unreachable_outbound_live(p: Ports) -> list[Probe]:
    request = Probe("request", "client", udp(CLIENT_IP, p.client, VM_IP, DNS), D)
    return [request,
            Probe("unreachable", "vm", icmp_error(VM_IP, CLIENT_IP, request.ip), D)]


@case("an error towards the VM quoting nothing live")
def icmp_error_inbound_nothing(p: Ports) -> list[Probe]:
    quoted = TcpFlow(CLIENT_SVC, p.vm).segment("vm", "S")
    return [Probe("unreachable", "client", icmp_error(CLIENT_IP, VM_IP, quoted), X,
                  why="invalid", ours="drop-no-session")]


@case("an error from the VM quoting nothing live")
def icmp_error_outbound_nothing(p: Ports) -> list[Probe]:
    quoted = udp(CLIENT_IP, p.client, VM_IP, 9999)
    return [Probe("unreachable", "vm", icmp_error(VM_IP, CLIENT_IP, quoted), X,
                  why="invalid", ours="drop-no-session")]


@case("an error sent to the VM about a packet the VM received (not one it sent)")
def icmp_error_misaddressed(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm)
    probes = handshake(f, "vm")
    data_in = tcp(f, "data-in", "client", "PA", D, b"response")
    return [*probes, data_in,
            Probe("unreachable", "client", icmp_error(CLIENT_IP, VM_IP, data_in.ip), X,
                  why="invalid", ours="drop-no-session")]


# ---- the attacks of the datapath-security issue ----------------------------------------


@case("from the uplink, spoofing the VM: SYN out, then the 'reply' into a denied port",
      state=NO_ENTRY)
def spoofed_vm_source_tcp(p: Ports) -> list[Probe]:
    f = TcpFlow(2222, p.vm)  # the VM's port p.vm is not allowed inbound
    return [
        tcp(f, "spoofed-syn", "vm", "S", X, sender="client", why="rpf", ours="drop-spoofed"),
        tcp(f, "syn-ack", "client", "SA", X, why="invalid", ours="drop-no-session"),
        tcp(f, "spoofed-ack", "vm", "A", X, sender="client", why="rpf", ours="drop-spoofed"),
        tcp(f, "data-in", "client", "PA", X, b"in through a denied port", why="invalid",
            ours="drop-no-session"),
    ]


@case("from the uplink, spoofing the VM: UDP out, then the 'reply' into a denied port")
def spoofed_vm_source_udp(p: Ports) -> list[Probe]:
    return [Probe("spoofed-request", "client", udp(VM_IP, p.vm, CLIENT_IP, DNS), X, why="rpf",
                  ours="drop-spoofed"),
            Probe("reply", "client", udp(CLIENT_IP, DNS, VM_IP, p.vm), X, why="policy",
                  ours="drop-acl-default")]


@case("a blind RST far outside the window, then data that must still pass",
      state="ESTABLISHED")
def blind_rst_out_of_window(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [*handshake(f, "client"),
            tcp(f, "blind-rst", "client", "R", X, why="invalid", ours="drop-invalid",
                seq=f.nxt["client"] + 2**30),
            tcp(f, "data-in", "client", "PA", D, b"GET /"),
            tcp(f, "data-out", "vm", "PA", D, b"200 OK")]


@case("data with a sequence number far outside the window, and an ACK of unsent data",
      state="ESTABLISHED")
def out_of_window_data(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [*handshake(f, "client"),
            tcp(f, "far-data", "client", "PA", X, b"injected", why="invalid",
                ours="drop-invalid", seq=f.nxt["client"] + 2**31 - 1),
            tcp(f, "ack-unsent", "client", "A", X, why="invalid", ours="drop-invalid",
                seq=f.nxt["client"], ack=f.nxt["vm"] + 2**30),
            tcp(f, "data-in", "client", "PA", D, b"GET /")]


@case("SYN|FIN to an allowed port", state=NO_ENTRY)
def syn_fin_allowed_port(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [tcp(f, "syn-fin", "client", "SF", X, why="invalid", ours="drop-invalid"),
            tcp(f, "syn-ack", "vm", "SA", X, why="invalid", ours="drop-no-session")]


@case("NULL scan (no flags) to an allowed port, no session")
def null_scan(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [tcp(f, "null", "client", "", X, why="invalid", ours="drop-invalid")]


@case("XMAS scan (FIN|PSH|URG) to an allowed port, no session")
def xmas_scan(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [tcp(f, "xmas", "client", "FPU", X, why="invalid", ours="drop-invalid")]


@case("NULL flags inside an established session", state="ESTABLISHED")
def null_in_session(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [*handshake(f, "client"),
            tcp(f, "null", "client", "", X, why="invalid", ours="drop-invalid",
                seq=f.nxt["client"]),
            tcp(f, "data-in", "client", "PA", D, b"GET /")]


@case("XMAS flags (FIN|PSH|URG) inside an established session", state="ESTABLISHED")
def xmas_in_session(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP)
    return [*handshake(f, "client"),
            tcp(f, "xmas", "client", "FPU", X, why="invalid", ours="drop-invalid",
                seq=f.nxt["client"]),
            tcp(f, "data-in", "client", "PA", D, b"GET /")]


@case("simultaneous open (RFC 793 crossing SYNs) completing", state="ESTABLISHED")
def simultaneous_open(p: Ports) -> list[Probe]:
    f = TcpFlow(2223, p.vm)
    return [tcp(f, "syn-out", "vm", "S", D),
            tcp(f, "syn-in", "client", "S", D),
            tcp(f, "syn-ack-out", "vm", "SA", D, seq=f.isn["vm"]),
            tcp(f, "syn-ack-in", "client", "SA", D, seq=f.isn["client"]),
            tcp(f, "ack-out", "vm", "A", D),
            tcp(f, "ack-in", "client", "A", D)]


# ---- fragments ----------------------------------------------------------------------


def fragments(whole: bytes, pieces: list[tuple[str, int, int, Verdict]], sender: Role,
              rewrite: tuple[str, int, bytes] | None = None) -> list[Probe]:
    """Probes carrying byte ranges [start, end) of `whole`'s transport bytes as fragments
    of one datagram (one IP id; for IPv6 one Fragment header identification and one
    flow label), in this order; every piece but the last has MF set. `rewrite` =
    (label, offset, bytes) puts other bytes at that transport offset in that piece
    only: an attacker's overlapping fragment."""
    data = transport_bytes(whole)
    addr = ADDR6 if is_ipv6(whole) else ADDR
    src, dst, proto = addr[sender], addr["vm" if sender == "client" else "client"], \
        transport_proto(whole)
    ip_id = next_frag_id() if is_ipv6(whole) else next_ip_id()
    flow_label = next_flow_label()
    probes = []
    for i, (label, start, end, ct) in enumerate(pieces):
        chunk = bytearray(data[start:end])
        if rewrite is not None and rewrite[0] == label:
            at = rewrite[1] - start
            chunk[at: at + len(rewrite[2])] = rewrite[2]
        last = i == len(pieces) - 1
        probes.append(Probe(label, sender,
                            ip_fragment(src, dst, proto, ip_id, start, bytes(chunk), not last,
                                        flow_label),
                            ct, why="defrag" if ct == X else None, wait=last))
    return probes


@case("a UDP datagram to an allowed port in two clean fragments")
def frag_clean(p: Ports) -> list[Probe]:
    whole = udp(CLIENT_IP, p.client, VM_IP, DNS, b"q" * 56)
    return fragments(whole, [("first", 0, 32, D), ("last", 32, 64, D)], "client")


@case("a later fragment whose first fragment never came")
def frag_orphan(p: Ports) -> list[Probe]:
    whole = udp(CLIENT_IP, p.client, VM_IP, DNS, b"q" * 56)
    return fragments(whole, [("later", 32, 64, X)], "client")


@case("RFC 1858 tiny fragment: the first fragment ends before the TCP flags")
def frag_tiny_first(p: Ports) -> list[Probe]:
    whole = TcpFlow(p.client, HTTP).segment("client", "S")
    return fragments(whole, [("tiny-first", 0, 8, D), ("rest", 8, 20, D)], "client")


@case("RFC 1858/3128: a fragment at offset 1 rewrites the checked TCP header's flags")
def frag_offset1_overlap(p: Ports) -> list[Probe]:
    whole = TcpFlow(p.client, HTTP).segment("client", "S", b"p" * 12)
    # byte 13 of the TCP header holds the flags: SYN becomes FIN|SYN|RST|PSH|URG
    return fragments(whole, [("first", 0, 24, X), ("overlap-1", 8, 32, X)], "client",
                     rewrite=("overlap-1", 13, bytes([0x2F])))


@case("a later fragment overlapping the transport header of an accepted first fragment")
def frag_overlap_transport_header(p: Ports) -> list[Probe]:
    whole = TcpFlow(p.client, HTTP).segment("client", "S", b"p" * 28)
    # bytes 16-19: the checksum and urgent pointer the first fragment was checked with
    return fragments(whole, [("first", 0, 40, X), ("overlap-2", 16, 48, X)], "client",
                     rewrite=("overlap-2", 16, b"\xde\xad\xbe\xef"))


# ---- IPv6 (the `inet` table's ip6 rules; the same ACL on the VM's IPv6 address) -------


@case("IPv6: the VM opens a connection; handshake and data both ways", state="ESTABLISHED")
def v6_outbound_handshake_data(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm, v6=True)
    return [*handshake(f, "vm"),
            tcp(f, "data-out", "vm", "PA", D, b"request"),
            tcp(f, "data-in", "client", "PA", D, b"response"),
            tcp(f, "ack-out", "vm", "A", D)]


@case("IPv6: SYN to an allowed port, handshake and data both ways, clean close",
      state="TIME_WAIT")
def v6_inbound_allowed_handshake_data(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [*handshake(f, "client"),
            tcp(f, "data-in", "client", "PA", D, b"GET /"),
            tcp(f, "data-out", "vm", "PA", D, b"200 OK"),
            *close(f, "client")]


@case("IPv6: unsolicited SYN to a port no ACL allows; the VM's SYN/ACK opens nothing",
      state=NO_ENTRY)
def v6_inbound_syn_closed_port(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, SSH, v6=True)
    return [tcp(f, "syn", "client", "S", X, why="policy", ours="drop-acl-default"),
            tcp(f, "syn-ack", "vm", "SA", X, why="invalid", ours="drop-no-session")]


@case("IPv6: ACK and data towards the VM without any session")
def v6_no_session_inbound(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [tcp(f, "ack", "client", "A", X, why="invalid", ours="drop-no-session"),
            tcp(f, "data", "client", "PA", X, b"data", why="invalid", ours="drop-no-session")]


@case("IPv6: UDP from the VM and its reply; another client port may not answer")
def v6_udp_outbound(p: Ports) -> list[Probe]:
    return [Probe("request", "vm", udp(VM_IP6, p.vm, CLIENT_IP6, DNS), D),
            Probe("reply", "client", udp(CLIENT_IP6, DNS, VM_IP6, p.vm), D),
            Probe("other-port", "client", udp(CLIENT_IP6, DNS + 1, VM_IP6, p.vm), X,
                  why="policy", ours="drop-acl-default")]


@case("IPv6: UDP to an allowed port and the VM's reply; UDP to a port no ACL allows")
def v6_udp_inbound(p: Ports) -> list[Probe]:
    return [Probe("request", "client", udp(CLIENT_IP6, p.client, VM_IP6, DNS), D),
            Probe("reply", "vm", udp(VM_IP6, DNS, CLIENT_IP6, p.client), D),
            Probe("unsolicited", "client", udp(CLIENT_IP6, p.client, VM_IP6, DNS + 1), X,
                  why="policy", ours="drop-acl-default")]


@case("IPv6: ICMPv6 echo from the VM and its reply")
def v6_echo_outbound(p: Ports) -> list[Probe]:
    return [Probe("request", "vm", icmp_echo(VM_IP6, CLIENT_IP6, p.icmp_id), D),
            Probe("reply", "client", icmp_echo(CLIENT_IP6, VM_IP6, p.icmp_id, reply=True), D)]


@case("IPv6: ICMPv6 echo to the VM (allowed) and its reply")
def v6_echo_inbound(p: Ports) -> list[Probe]:
    return [Probe("request", "client", icmp_echo(CLIENT_IP6, VM_IP6, p.icmp_id), D),
            Probe("reply", "vm", icmp_echo(VM_IP6, CLIENT_IP6, p.icmp_id, reply=True), D)]


@case("IPv6: an echo reply nobody asked for")
def v6_echo_reply_unsolicited(p: Ports) -> list[Probe]:
    return [Probe("reply", "client", icmp_echo(CLIENT_IP6, VM_IP6, p.icmp_id, reply=True), X,
                  why="invalid", ours="drop-no-session")]


@case("IPv6: packet too big quoting a live session's data (PMTU discovery)")
def v6_too_big_live(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm, v6=True)
    probes = handshake(f, "vm")
    data = tcp(f, "data-out", "vm", "PA", D, b"x" * 1300)
    return [*probes, data,
            Probe("too-big", "client",
                  icmp6_error(CLIENT_IP6, VM_IP6, data.ip, ICMP6_TOO_BIG, 0, mtu=1280), D)]


@case("IPv6: the VM's port unreachable about a live inbound UDP flow")
def v6_unreachable_outbound_live(p: Ports) -> list[Probe]:
    request = Probe("request", "client", udp(CLIENT_IP6, p.client, VM_IP6, DNS), D)
    return [request,
            Probe("unreachable", "vm", icmp6_error(VM_IP6, CLIENT_IP6, request.ip), D)]


@case("IPv6: packet too big towards the VM quoting nothing live")
def v6_too_big_nothing(p: Ports) -> list[Probe]:
    quoted = TcpFlow(CLIENT_SVC, p.vm, v6=True).segment("vm", "PA", b"x" * 1300)
    return [Probe("too-big", "client",
                  icmp6_error(CLIENT_IP6, VM_IP6, quoted, ICMP6_TOO_BIG, 0), X,
                  why="invalid", ours="drop-no-session")]


@case("IPv6: an error from the VM quoting nothing live")
def v6_error_outbound_nothing(p: Ports) -> list[Probe]:
    quoted = udp(CLIENT_IP6, p.client, VM_IP6, 9999)
    return [Probe("unreachable", "vm", icmp6_error(VM_IP6, CLIENT_IP6, quoted), X,
                  why="invalid", ours="drop-no-session")]


@case("IPv6: an error sent to the VM about a packet the VM received (not one it sent)")
def v6_error_misaddressed(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm, v6=True)
    probes = handshake(f, "vm")
    data_in = tcp(f, "data-in", "client", "PA", D, b"response")
    return [*probes, data_in,
            Probe("unreachable", "client", icmp6_error(CLIENT_IP6, VM_IP6, data_in.ip), X,
                  why="invalid", ours="drop-no-session")]


@case("IPv6: packet too big quoting a live session's data sent with a destination "
      "options header")
def v6_too_big_quote_ext_headers(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm, v6=True)
    probes = handshake(f, "vm")
    data = tcp(f, "data-out", "vm", "PA", D, b"x" * 1300, ext=IPv6ExtHdrDestOpt())
    return [*probes, data,
            Probe("too-big", "client",
                  icmp6_error(CLIENT_IP6, VM_IP6, data.ip, ICMP6_TOO_BIG, 0), D)]


@case("IPv6: from the uplink, spoofing the VM: SYN out, then the 'reply' into a denied port",
      state=NO_ENTRY)
def v6_spoofed_vm_source_tcp(p: Ports) -> list[Probe]:
    f = TcpFlow(2222, p.vm, v6=True)  # the VM's port p.vm is not allowed inbound
    return [
        tcp(f, "spoofed-syn", "vm", "S", X, sender="client", why="rpf", ours="drop-spoofed"),
        tcp(f, "syn-ack", "client", "SA", X, why="invalid", ours="drop-no-session"),
        tcp(f, "data-in", "client", "PA", X, b"in through a denied port", why="invalid",
            ours="drop-no-session"),
    ]


@case("IPv6: from the uplink, spoofing the VM: UDP out, then the 'reply' into a denied port")
def v6_spoofed_vm_source_udp(p: Ports) -> list[Probe]:
    return [Probe("spoofed-request", "client", udp(VM_IP6, p.vm, CLIENT_IP6, DNS), X,
                  why="rpf", ours="drop-spoofed"),
            Probe("reply", "client", udp(CLIENT_IP6, DNS, VM_IP6, p.vm), X, why="policy",
                  ours="drop-acl-default")]


@case("IPv6: a blind RST far outside the window, then data that must still pass",
      state="ESTABLISHED")
def v6_blind_rst_out_of_window(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [*handshake(f, "client"),
            tcp(f, "blind-rst", "client", "R", X, why="invalid", ours="drop-invalid",
                seq=f.nxt["client"] + 2**30),
            tcp(f, "data-in", "client", "PA", D, b"GET /"),
            tcp(f, "data-out", "vm", "PA", D, b"200 OK")]


@case("IPv6: data far outside the window, and an ACK of unsent data", state="ESTABLISHED")
def v6_out_of_window_data(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [*handshake(f, "client"),
            tcp(f, "far-data", "client", "PA", X, b"injected", why="invalid",
                ours="drop-invalid", seq=f.nxt["client"] + 2**31 - 1),
            tcp(f, "ack-unsent", "client", "A", X, why="invalid", ours="drop-invalid",
                seq=f.nxt["client"], ack=f.nxt["vm"] + 2**30),
            tcp(f, "data-in", "client", "PA", D, b"GET /")]


@case("IPv6: data after an in-window RST", state="CLOSED")
def v6_data_after_rst(p: Ports) -> list[Probe]:
    f = TcpFlow(CLIENT_SVC, p.vm, v6=True)
    return [*handshake(f, "vm"),
            tcp(f, "data-out", "vm", "PA", D, b"request"),
            tcp(f, "rst", "client", "R", D),
            tcp(f, "data-out-2", "vm", "PA", D, b"more")]


@case("IPv6: SYN|FIN to an allowed port", state=NO_ENTRY)
def v6_syn_fin_allowed_port(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [tcp(f, "syn-fin", "client", "SF", X, why="invalid", ours="drop-invalid"),
            tcp(f, "syn-ack", "vm", "SA", X, why="invalid", ours="drop-no-session")]


@case("IPv6: NULL and XMAS scans to an allowed port, no session")
def v6_null_xmas_scan(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [tcp(f, "null", "client", "", X, why="invalid", ours="drop-invalid"),
            tcp(f, "xmas", "client", "FPU", X, why="invalid", ours="drop-invalid")]


@case("IPv6: XMAS flags inside an established session", state="ESTABLISHED")
def v6_xmas_in_session(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [*handshake(f, "client"),
            tcp(f, "xmas", "client", "FPU", X, why="invalid", ours="drop-invalid",
                seq=f.nxt["client"]),
            tcp(f, "data-in", "client", "PA", D, b"GET /")]


@case("IPv6: simultaneous open (RFC 793 crossing SYNs) completing", state="ESTABLISHED")
def v6_simultaneous_open(p: Ports) -> list[Probe]:
    f = TcpFlow(2223, p.vm, v6=True)
    return [tcp(f, "syn-out", "vm", "S", D),
            tcp(f, "syn-in", "client", "S", D),
            tcp(f, "syn-ack-out", "vm", "SA", D, seq=f.isn["vm"]),
            tcp(f, "syn-ack-in", "client", "SA", D, seq=f.isn["client"]),
            tcp(f, "ack-out", "vm", "A", D),
            tcp(f, "ack-in", "client", "A", D)]


# IPv6 fragments: a Fragment header (identification, offset, M), `fragments` above


@case("IPv6: a UDP datagram to an allowed port in two clean fragments")
def v6_frag_clean(p: Ports) -> list[Probe]:
    whole = udp(CLIENT_IP6, p.client, VM_IP6, DNS, b"q" * 56)
    return fragments(whole, [("first", 0, 32, D), ("last", 32, 64, D)], "client")


@case("IPv6: a later fragment whose first fragment never came")
def v6_frag_orphan(p: Ports) -> list[Probe]:
    whole = udp(CLIENT_IP6, p.client, VM_IP6, DNS, b"q" * 56)
    return fragments(whole, [("later", 32, 64, X)], "client")


@case("IPv6: a tiny first fragment ending before the TCP flags (RFC 7112: the first "
      "fragment must hold the whole header chain)")
def v6_frag_tiny_first(p: Ports) -> list[Probe]:
    whole = TcpFlow(p.client, HTTP, v6=True).segment("client", "S")
    tiny, rest = fragments(whole, [("tiny-first", 0, 8, X), ("rest", 8, 20, X)], "client")
    # conntrack's reassembly refuses the tiny first fragment (RFC 7112) and lets it go on
    # alone, where it is `ct state invalid`; the rest waits for it in vain
    return [replace(tiny, why="invalid", ours="drop-malformed"),
            replace(rest, ours="drop-fragment")]


@case("IPv6: a UDP datagram to an allowed port in two fragments whose fragmentable part "
      "starts with a destination options header (RFC 8200 4.5)")
def v6_frag_dstopts(p: Ports) -> list[Probe]:
    whole = udp(CLIENT_IP6, p.client, VM_IP6, DNS, b"q" * 56, ext=IPv6ExtHdrDestOpt())
    return fragments(whole, [("first", 0, 40, D), ("last", 40, 72, D)], "client")


@case("IPv6: a fragment at offset 1 rewrites the checked TCP header's flags")
def v6_frag_offset1_overlap(p: Ports) -> list[Probe]:
    whole = TcpFlow(p.client, HTTP, v6=True).segment("client", "S", b"p" * 12)
    return fragments(whole, [("first", 0, 24, X), ("overlap-1", 8, 32, X)], "client",
                     rewrite=("overlap-1", 13, bytes([0x2F])))


# IPv6's own: extension headers, routing header type 0, neighbour discovery, addresses


@case("IPv6: hop-by-hop and destination options before TCP, handshake and data",
      state="ESTABLISHED")
def v6_ext_headers_handshake(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [tcp(f, "syn", "client", "S", D, ext=hbh_dst()),
            tcp(f, "syn-ack", "vm", "SA", D, ext=hbh_dst()),
            tcp(f, "ack", "client", "A", D, ext=hbh_dst()),
            tcp(f, "data-in", "client", "PA", D, b"GET /", ext=hbh_dst()),
            tcp(f, "data-out", "vm", "PA", D, b"200 OK")]


@case("IPv6: six extension headers (hop-by-hop, five destination options) before a SYN "
      "to an allowed port: the most the datapath walks", state="SYN_SENT")
def v6_six_ext_headers(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [tcp(f, "syn", "client", "S", D, ext=ext_chain(6))]


@case("IPv6: seven extension headers before a SYN to an allowed port")
def v6_seven_ext_headers(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    return [tcp(f, "syn", "client", "S", D, ext=ext_chain(7))]


@case("IPv6: a SYN to an allowed port through a routing header type 0 (RFC 5095)")
def v6_routing_header_type0(p: Ports) -> list[Probe]:
    f = TcpFlow(p.client, HTTP, v6=True)
    # one segment left, the final destination the VM itself: the TCP checksum is the same
    # whether the pseudo-header takes the header's destination or the route's last one
    rh0 = IPv6ExtHdrRouting(type=0, segleft=1, addresses=[VM_IP6])
    return [tcp(f, "syn-rh0", "client", "S", D, ext=rh0)]


@case("IPv6: neighbour solicitations routed to the VM's global address: hop limit 255 "
      "(as RFC 4861 requires) and 64 (sent from beyond a router)")
def v6_ndp_hop_limit(p: Ports) -> list[Probe]:
    ns = ICMPv6ND_NS(tgt=VM_IP6)
    return [Probe("ns-hlim-255", "client", ndp(CLIENT_IP6, VM_IP6, ns, 255), X,
                  why="policy"),
            Probe("ns-hlim-64", "client", ndp(CLIENT_IP6, VM_IP6, ns, 64), X, why="policy",
                  ours="drop-malformed")]


@case("IPv6: from the uplink, a neighbour advertisement in the VM's name (hop limit 255)")
def v6_ndp_spoofed_vm_source(p: Ports) -> list[Probe]:
    na = ICMPv6ND_NA(tgt=VM_IP6, R=0, S=0, O=1)
    return [Probe("spoofed-na", "client", ndp(VM_IP6, VM_IP6, na, 255), X, why="rpf",
                  ours="drop-spoofed")]


@case("IPv6: an IPv4-mapped source address (::ffff:192.0.2.10) in an IPv6 header, a SYN "
      "to an allowed port")
def v6_mapped_source(p: Ports) -> list[Probe]:
    # the firewalls' IPv6 default route leads to the uplink: the reverse path holds
    f = TcpFlow(p.client, HTTP, v6=True)
    return [tcp(f, "syn-mapped", "client", "S", D, src=f"::ffff:{CLIENT_IP}")]


def hbh_dst() -> Packet:
    """A hop-by-hop options header (one PadN) and a destination options header."""
    return IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()


def ext_chain(n: int) -> Packet:
    """`n` extension headers: hop-by-hop, then destination options."""
    chain: Packet = IPv6ExtHdrHopByHop()
    for _ in range(n - 1):
        chain = chain / IPv6ExtHdrDestOpt()
    return chain


def ndp(src: str, dst: str, msg: Packet, hlim: int) -> bytes:
    return bytes(ip_hdr(src, dst, hlim=hlim) / msg)


# ---- where sami-xdp differs ----------------------------------------------------------

# Differences that stay: (case, probe) -> (sami-xdp's verdict, its drop reason, why).
INTENDED: dict[tuple[str, str], tuple[Verdict, str | None, str]] = {
    ("frag_tiny_first", "tiny-first"): (
        X, "drop-malformed",
        "stricter: a first fragment must carry the whole TCP header (RFC 1858 section "
        "3.1); conntrack reassembles first, so the tiny fragment is harmless there"),
    ("frag_tiny_first", "rest"): (
        X, "drop-fragment",
        "follows from the above: its first fragment was not accepted"),
    ("frag_offset1_overlap", "first"): (
        D, None,
        "XDP cannot hold a fragment back until its datagram is complete: an acceptable "
        "first fragment passes at once (the receiver's reassembly drops overlaps); "
        "conntrack reassembles first and drops the whole datagram on overlap"),
    ("frag_overlap_transport_header", "first"): (
        D, None, "as above: XDP passes an acceptable first fragment at once"),
    ("v6_frag_offset1_overlap", "first"): (
        D, None, "as for IPv4: XDP passes an acceptable first fragment at once (conntrack "
        "drops the whole datagram on overlap, RFC 5722)"),
    ("v6_too_big_quote_ext_headers", "too-big"): (
        X, "drop-no-session",
        "the datapath reads the quoted transport header only right behind the quoted IPv6 "
        "header (a bounded parse); a quote with extension headers relates to nothing, "
        "where conntrack walks them and finds the session"),
    ("v6_seven_ext_headers", "syn"): (
        X, "drop-malformed",
        "stricter: at most 6 extension headers are walked and a packet with more is never "
        "passed unfiltered; conntrack walks any number"),
    ("v6_routing_header_type0", "syn-rh0"): (
        X, "drop-invalid",
        "stricter: routing header type 0 is deprecated (RFC 5095); a router forwards it "
        "untouched (only the destination processes routing headers) and conntrack ignores "
        "it"),
    ("v6_ndp_hop_limit", "ns-hlim-255"): (
        D, None,
        "XDP runs before routing and cannot tell NDP for the host from NDP routed through "
        "it, so any NDP with hop limit 255 passes (stateless); the router then forwards it "
        "with hop limit 254, which every receiver discards (RFC 4861 7.1). conntrack does "
        "not track NDP and the forward chain accepts none"),
    ("v6_mapped_source", "syn-mapped"): (
        X, "drop-malformed",
        "stricter: an IPv4-mapped address never appears in an IPv6 header (RFC 4291 "
        "2.5.5.2), and here it would be keyed as the IPv4 address; a router forwards it and "
        "conntrack tracks it as any IPv6 source"),
}

# Differences that show a gap in the datapath, reported for a fix (not by design):
# sami-xdp's verdict today. A fix turns the case red; then the entry goes.
GAPS: dict[tuple[str, str], tuple[Verdict, str | None, str]] = {
    # both found by this suite and fixed: NDP from a protected source is checked for
    # spoofing like any packet; fragments with destination options behind the
    # Fragment header are tracked by that header's next header (tests/test_ipv6.py)
}


# ---- running and judging ------------------------------------------------------------


def case_ports(name: str) -> Ports:
    """A case's own ports, from its place in CASES."""
    idx = list(CASES).index(name)
    return Ports(client=20000 + 16 * idx, vm=40000 + 16 * idx, icmp_id=0x5000 + idx)


def build_case(name: str) -> list[Probe]:
    probes = CASES[name].build(case_ports(name))
    labels = [q.label for q in probes]
    assert len(set(labels)) == len(labels), f"{name}: labels repeat: {labels}"
    return probes


def expected_ours(name: str, probes: list[Probe]) -> tuple[list[Verdict], Counter[str] | None]:
    """sami-xdp's expected verdicts (conntrack's, with the intended differences) and
    drop reasons (None when some drop has no reason listed)."""
    verdicts: list[Verdict] = []
    reasons: Counter[str] = Counter()
    complete = True
    for q in probes:
        verdict, reason = q.ct, q.ours
        if (name, q.label) in INTENDED | GAPS:
            verdict, reason, _ = (INTENDED | GAPS)[(name, q.label)]
        verdicts.append(verdict)
        if verdict == X:
            if reason is None:
                complete = False
            else:
                reasons[reason] += 1
    return verdicts, reasons if complete else None


def table(probes: list[Probe], got: list[Verdict], want: list[Verdict]) -> str:
    return "\n".join(f"  {q.label:<14} {q.sender:<6} got {g:<9} want {w}"
                     + ("" if g == w else "   <--")
                     for q, g, w in zip(probes, got, want, strict=True))


@pytest.fixture(scope="module")
def harness() -> Iterator[DiffHarness]:
    require_root()
    for tool in ("nft", "conntrack", "ip"):
        require_tool(tool)
    with diff_harness() as h:
        yield h


Runs = dict[str, tuple[list[Probe], Outcome]]


@pytest.fixture(scope="module")
def outcomes() -> Runs:
    return {}


def run_case(harness: DiffHarness, outcomes: Runs, name: str) -> tuple[list[Probe], Outcome]:
    """Each case is sent once per module; both firewalls' tests read that run."""
    if name not in outcomes:
        probes = build_case(name)
        ports = case_ports(name)
        check_state = CASES[name].state is not None
        outcomes[name] = (probes, harness.run(
            probes, state_ports=(ports.client, ports.vm) if check_state else (),
            v6=CASES[name].v6))
    return outcomes[name]


@pytest.mark.parametrize("name", list(CASES))
def test_conntrack_yardstick(harness: DiffHarness, outcomes: Runs, name: str) -> None:
    probes, out = run_case(harness, outcomes, name)
    got, want = out.verdicts["conntrack"], [q.ct for q in probes]
    assert got == want, f"{name}: conntrack\n{table(probes, got, want)}"
    why = Counter(q.why for q in probes if q.ct == X and q.why != "defrag")
    assert out.drops["conntrack"] == why, f"{name}: nft drop rules {out.drops['conntrack']}"
    if CASES[name].state is not None:
        assert final_state(out, "conntrack") == CASES[name].state, f"{name}: conntrack state"


def final_state(out: Outcome, side: str) -> str:
    state = out.states[side]
    return NO_ENTRY if state is None else state


@pytest.mark.parametrize("name", list(CASES))
def test_samixdp_matches_conntrack(harness: DiffHarness, outcomes: Runs, name: str) -> None:
    probes, out = run_case(harness, outcomes, name)
    want, reasons = expected_ours(name, probes)
    got = out.verdicts["samixdp"]
    assert got == want, f"{name}: sami-xdp\n{table(probes, got, want)}"
    if reasons is not None:
        assert out.drops["samixdp"] == reasons, f"{name}: drop counters"
    if CASES[name].state is not None:
        assert final_state(out, "samixdp") == CASES[name].state, f"{name}: session state"


def test_tables_name_real_probes() -> None:
    """A typo in INTENDED or GAPS must not silently match nothing."""
    for name, label in INTENDED | GAPS:
        assert label in [q.label for q in build_case(name)], (name, label)
