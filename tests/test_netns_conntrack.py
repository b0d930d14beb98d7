"""sami-xdp against Linux conntrack, the project's yardstick (DESIGN.md sections 1, 6).

Every case is a named sequence of crafted packets, each with conntrack's verdict. The
harness (`conntrack_diff.py`) sends each packet through both firewalls at once; then:

- `test_conntrack_yardstick` checks that conntrack really does what the case says
  (the case documents the yardstick, and the nft rule that dropped each packet);
- `test_samixdp_matches_conntrack` checks that sami-xdp gives the same verdicts, except
  for the packets listed in `INTENDED` (differences that stay, with the reason), and
  that its drop counters (`samixdp stats --json`) name the expected reasons, and its
  final TCP state.

Each case uses its own ports, ICMP ids and IP ids, so no case shares conntrack or
session state with another, and any order passes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from conftest import require_tool
from conntrack_diff import (
    ADDR,
    DELIVERED,
    DROPPED,
    DiffHarness,
    Outcome,
    Probe,
    Role,
    TcpFlow,
    Verdict,
    diff_harness,
    icmp_echo,
    icmp_error,
    ip_fragment,
    next_ip_id,
    transport_bytes,
    udp,
)
from netns import CLIENT_IP, VM_IP, require_root

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


CASES: dict[str, Case] = {}
Builder = Callable[[Ports], list[Probe]]


def case(doc: str, state: str | None = None) -> Callable[[Builder], Builder]:
    """Registers a case builder under its function name; the order gives its ports."""

    def register(fn: Builder) -> Builder:
        CASES[fn.__name__] = Case(fn.__name__, doc, fn, state)
        return fn

    return register


def tcp(flow: TcpFlow, label: str, by: Role, flags: str, ct: Verdict, payload: bytes = b"",
        *, sender: Role | None = None, why: str | None = None, ours: str | None = None,
        seq: int | None = None, ack: int | None = None) -> Probe:
    """A probe carrying one segment of `flow` from `by` (sent from `sender`'s veth,
    which differs from `by` only when an address is spoofed); `seq`/`ack` override the
    flow's numbers (an attacker's guess)."""
    ip = flow.segment(by, flags, payload, seq=seq, ack=ack)
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
    of one datagram (one IP id), in this order; every piece but the last has MF set.
    `rewrite` = (label, offset, bytes) puts other bytes at that transport offset in
    that piece only: an attacker's overlapping fragment."""
    data = transport_bytes(whole)
    src, dst, proto = ADDR[sender], ADDR["vm" if sender == "client" else "client"], whole[9]
    ip_id = next_ip_id()
    probes = []
    for i, (label, start, end, ct) in enumerate(pieces):
        chunk = bytearray(data[start:end])
        if rewrite is not None and rewrite[0] == label:
            at = rewrite[1] - start
            chunk[at: at + len(rewrite[2])] = rewrite[2]
        last = i == len(pieces) - 1
        probes.append(Probe(label, sender,
                            ip_fragment(src, dst, proto, ip_id, start, bytes(chunk), not last),
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
        if (name, q.label) in INTENDED:
            verdict, reason, _ = INTENDED[(name, q.label)]
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
            probes, state_ports=(ports.client, ports.vm) if check_state else ()))
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
    """A typo in INTENDED must not silently match nothing."""
    for name, label in INTENDED:
        assert label in [q.label for q in build_case(name)], (name, label)
