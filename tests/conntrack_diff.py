"""Differential harness: the same crafted packets through sami-xdp and Linux conntrack.

Two copies of the issue-2 topology run side by side, dual stack (client 192.0.2.10
and 2001:db8:c::10 <-> firewall, a router <-> VM 10.1.1.1 and 2001:db8:1::10). In one
firewall namespace sami-xdp is attached to both links with the real CLI, protecting
both VM prefixes; in the other there is no XDP but an nftables `inet` forward chain
with the same policy for both families (`CONNTRACK_RULESET`), conntrack in its strict
settings (`nf_conntrack_tcp_loose=0`, `tcp_be_liberal=0`) and a `fib` reverse-path
check.

Packets are not sent by the endpoints' kernels: every frame is built here and written
with an AF_PACKET socket on a client or VM veth, towards the firewall veth's MAC, so a
TCP exchange can have consistent sequence numbers from both ends without a real socket.
The endpoints' kernels are kept silent (an `inet` nft rule drops everything at
prerouting, raw priority; AF_PACKET taps see frames before netfilter), or they would
answer the crafted segments with RSTs and disturb the state under test. The firewalls
have static neighbour entries for both families and send no redirects, so they emit
nothing of their own either. The endpoints keep IPv6 enabled (without DAD, router
advertisements or solicitations); what IPv6 still says by itself (MLD reports) carries
no probe's mark and is ignored by the receivers.

A packet is "delivered" when it shows up on the far endpoint's veth (an AF_PACKET
receive socket) before its case ends, else "dropped". Probes are recognised by
(source, destination, mark, piece): the mark is the IP id for IPv4 and the flow label
for IPv6 (which has no id outside fragment headers; a router forwards the flow label
untouched, and conntrack's reassembly re-fragments a datagram under its first
fragment's header, so every fragment keeps it); every datagram gets its own. The piece
is the fragment offset for IPv4; for IPv6 whether it is the first, a middle or the last
fragment, as conntrack re-fragments a reassembled IPv6 datagram at boundaries of its
own (`ipv6_pieces`).
Behind each probe goes a sentinel on the same path and of the same family (an ICMP or
ICMPv6 echo request that both firewalls pass), and the next probe leaves only once it
has come out at the far end: so each firewall has handled a packet before it sees the
next, a drop is known as soon as that happened rather than after a guessed timeout,
and a slow machine makes the run slower, not wrong. Both firewalls get each packet at
the same moment and are waited for together.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from netns import (
    CLIENT_IP,
    CLIENT_IP6,
    VM_IP,
    VM_IP6,
    VM_NET,
    VM_NET6,
    CoreTopology,
    build_core,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.packet import Packet, Raw

from testbed.netns import Lab, Netns

Verdict = Literal["delivered", "dropped"]
DELIVERED: Verdict = "delivered"
DROPPED: Verdict = "dropped"
Role = Literal["client", "vm"]

# After each probe (or batch of fragments) a sentinel goes out on the same path, and
# the next probe waits until it came out at the far end of both firewalls (at most
# SENTINEL_WAIT_S): then each firewall has handled the probe before it sees the next,
# and a drop is known without guessing a timeout. A probe still counts as delivered if
# it arrives any time before the case ends (a short grace after the last sentinel
# covers reordering between CPUs' backlogs).
SENTINEL_WAIT_S = 5.0
GRACE_S = 0.02

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
SOL_PACKET = 263  # linux/socket.h
PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h, since 4.20
CLONE_NEWNET = 0x40000000

QUIET_RULESET = """
table inet sxquiet {
    chain pre {
        type filter hook prerouting priority raw; policy drop;
    }
}
"""

# Neighbour discovery is the firewall host's own business: its input chain accepts it
# with the hop limit RFC 4861 requires (255: it never crossed a router), as any `inet`
# host ruleset must for the stack to work. NDP routed through the host (addressed to a
# global address beyond it) is not tracked by conntrack (`ct state untracked`) and no
# forward rule accepts it. MLD (hop limit 1) is never forwarded.
NDP_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, " \
            "nd-redirect"

# The yardstick: what a conntrack firewall with sami-xdp's policy looks like, for both
# families in one `inet` table. The comments name the rules; the counters of the forward
# chain's drop rules tell why conntrack dropped a packet.
CONNTRACK_RULESET = f"""
table inet sxfw {{
    chain input {{
        type filter hook input priority filter; policy drop;
        iif lo accept
        icmpv6 type {{ {NDP_TYPES} }} ip6 hoplimit 255 accept comment "ndp"
        icmpv6 type {{ mld-listener-query, mld-listener-report, mld-listener-done, \
            mld2-listener-report }} ip6 hoplimit 1 accept comment "mld"
        ct state established,related accept comment "established"
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        fib saddr . iif oif missing counter drop comment "rpf"
        ip saddr != {VM_NET} ip daddr != {VM_NET} counter accept comment "transit"
        ip6 saddr != {VM_NET6} ip6 daddr != {VM_NET6} counter accept comment "transit6"
        ct state invalid counter drop comment "invalid"
        ct state established,related counter accept comment "established"
        ip saddr {VM_NET} ct state new counter accept comment "new-outbound"
        ip6 saddr {VM_NET6} ct state new counter accept comment "new-outbound6"
        ip daddr {VM_IP} tcp dport 80 ct state new counter accept comment "acl-tcp-80"
        ip daddr {VM_IP} udp dport 53 ct state new counter accept comment "acl-udp-53"
        ip daddr {VM_IP} icmp type echo-request ct state new counter accept comment "acl-icmp"
        ip6 daddr {VM_IP6} tcp dport 80 ct state new counter accept comment "acl6-tcp-80"
        ip6 daddr {VM_IP6} udp dport 53 ct state new counter accept comment "acl6-udp-53"
        ip6 daddr {VM_IP6} icmpv6 type echo-request ct state new counter accept \
            comment "acl6-icmpv6"
        counter drop comment "policy"
    }}
}}
"""
CONNTRACK_SYSCTLS = {
    "net.netfilter.nf_conntrack_tcp_loose": 0,  # no mid-stream pickup, like sami-xdp
    "net.netfilter.nf_conntrack_tcp_be_liberal": 0,  # window tracking on
}
# (VM address, rule): the same ACL for both of the VM's addresses
ACL_RULES: tuple[tuple[str, ...], ...] = (
    (VM_IP, "--proto", "tcp", "--dport", "80"),
    (VM_IP, "--proto", "udp", "--dport", "53"),
    (VM_IP, "--proto", "icmp"),
    (VM_IP6, "--proto", "tcp", "--dport", "80"),
    (VM_IP6, "--proto", "udp", "--dport", "53"),
    (VM_IP6, "--proto", "icmpv6"),
)

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Runs the block in namespace `name` (this thread only): sockets made inside keep
    that namespace for their whole life, so one process can talk on every veth."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(own)
        os.close(target)


def link_mac(ns: Netns, link: str) -> bytes:
    info = json.loads(ns.ip("-j", "link", "show", link).stdout)[0]
    return bytes.fromhex(info["address"].replace(":", ""))


# ---- probes -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeKey:
    """What identifies one datagram (or one of its fragments) on the far side: its
    addresses, its mark (IPv4: the IP id; IPv6: the flow label) and which piece of it
    this is: for IPv4 the fragment offset (8-byte units), for IPv6 the fragment's place
    (`ipv6_pieces`)."""

    src: bytes
    dst: bytes
    mark: int
    piece: int


# IPv6 extension headers a receiver walks to find a Fragment header
_EXT_HDRS = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8
NH_AH, NH_FRAGMENT = 51, 44


PIECE_FIRST, PIECE_MIDDLE, PIECE_LAST = 0, 1, 2
ALL_PIECES = (PIECE_FIRST, PIECE_MIDDLE, PIECE_LAST)


def ipv6_pieces(ip: bytes) -> tuple[int, ...]:
    """Which pieces of its datagram an IPv6 packet carries: PIECE_FIRST (a whole
    datagram, or its first fragment), PIECE_MIDDLE (a later fragment with more to
    come), PIECE_LAST; a fragment at offset 0 without more to come carries them all.
    Not offsets: conntrack's reassembly sends a datagram on re-fragmented at boundaries
    of its own, in fewer pieces (or one) and with offsets shifted when a destination
    options header of the fragmentable part moves in front of the Fragment header
    (RFC 8200 4.5 allows either); it forwards a whole datagram or nothing."""
    nh, at = ip[6], 40
    for _ in range(16):
        if at + 8 > len(ip):
            break
        if nh == NH_FRAGMENT:
            field = struct.unpack_from("!H", ip, at + 2)[0]
            more, offset = field & 1, field >> 3
            if offset == 0:
                return (PIECE_FIRST,) if more else ALL_PIECES
            return (PIECE_MIDDLE,) if more else (PIECE_LAST,)
        if nh in _EXT_HDRS:
            nh, at = ip[at], at + (ip[at + 1] + 1) * 8
        elif nh == NH_AH:
            nh, at = ip[at], at + (ip[at + 1] + 2) * 4
        else:
            break
    return (PIECE_FIRST,)


def ip_keys(ip: bytes) -> list[ProbeKey]:
    """The keys an IPv4 or IPv6 datagram answers to (none: too short to be a probe)."""
    if ip and ip[0] >> 4 == 6 and len(ip) >= 40:
        mark = int.from_bytes(ip[1:4], "big") & 0xFFFFF
        return [ProbeKey(ip[8:24], ip[24:40], mark, piece) for piece in ipv6_pieces(ip)]
    if ip and ip[0] >> 4 == 4 and len(ip) >= 20:
        frag = struct.unpack_from("!H", ip, 6)[0]
        return [ProbeKey(ip[12:16], ip[16:20], struct.unpack_from("!H", ip, 4)[0],
                         frag & 0x1FFF)]
    return []


def is_ipv6(ip: bytes) -> bool:
    return ip[0] >> 4 == 6


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


@dataclass(frozen=True)
class Probe:
    """One packet of a case: who sends it, its IPv4 or IPv6 bytes and conntrack's
    verdict.

    `why` names the nft rule that drops it on the conntrack side ("rpf", "invalid",
    "policy"; "defrag" when reassembly swallows it before any rule), `ours` the
    sami-xdp reason counter expected when sami-xdp drops it too.
    """

    label: str
    sender: Role
    ip: bytes
    ct: Verdict
    why: str | None = None
    ours: str | None = None
    wait: bool = True  # False: part of a batch (fragments), judged at the next wait

    @property
    def key(self) -> ProbeKey:
        keys = ip_keys(self.ip)
        assert len(keys) == 1, f"{self.label}: a probe is one piece of its datagram"
        return keys[0]

    @property
    def v6(self) -> bool:
        return is_ipv6(self.ip)

    @property
    def receiver(self) -> Role:
        vm = packed(VM_IP6 if self.v6 else VM_IP)
        return "vm" if self.key.dst == vm else "client"


# ---- one topology -----------------------------------------------------------------


@dataclass
class Endpoint:
    """A client or VM veth: frames go out through `tx`, frames the firewall forwards
    to this end are read from `rx`."""

    role: Role
    ns: Netns
    link: str
    mac: bytes
    fw_mac: bytes
    tx: socket.socket
    rx: socket.socket

    def send(self, ip: bytes) -> None:
        ethertype = ETH_P_IPV6 if is_ipv6(ip) else ETH_P_IP
        self.tx.send(self.fw_mac + self.mac + struct.pack("!H", ethertype) + ip)

    def drain(self) -> list[ProbeKey]:
        """Every IPv4 and IPv6 frame received so far (non-blocking). Frames that are no
        probes (the kernels' MLD reports) give keys no probe has."""
        keys: list[ProbeKey] = []
        while True:
            try:
                frame, addr = self.rx.recvfrom(65535)
            except BlockingIOError:
                return keys
            if addr[2] == PACKET_OUTGOING or len(frame) < 34:
                continue
            if struct.unpack_from("!H", frame, 12)[0] not in (ETH_P_IP, ETH_P_IPV6):
                continue
            keys += ip_keys(frame[14:])

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def open_endpoint(role: Role, ns: Netns, link: str, fw: Netns, fw_link: str) -> Endpoint:
    with in_netns(ns.name):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        tx.bind((link, 0))
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        rx.bind((link, ETH_P_ALL))
        rx.setblocking(False)
    return Endpoint(role, ns, link, link_mac(ns, link), link_mac(fw, fw_link), tx, rx)


@dataclass
class Side:
    """One side of the comparison: a topology, its endpoints and its drop counters."""

    name: str  # "samixdp" or "conntrack"
    topo: CoreTopology
    ends: dict[Role, Endpoint] = field(default_factory=dict)

    def counters(self) -> Counter[str]:
        """Drop counters by reason: sami-xdp's verdict counters read through the real
        CLI (`samixdp stats --json`), or the nft rule counters by rule comment."""
        if self.name == "samixdp":
            stats = self.topo.samixdp_json("stats")
            assert isinstance(stats, dict)
            return Counter({k: int(v) for k, v in stats.items() if k.startswith("drop-")})
        out = self.topo.fw.run("nft", "-j", "list", "table", "inet", "sxfw").stdout
        counts: Counter[str] = Counter()
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule or rule["chain"] != "forward" \
                    or not any("drop" in e for e in rule["expr"]):
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    counts[rule.get("comment", "?")] = int(expr["counter"]["packets"])
        return counts

    def close(self) -> None:
        for end in self.ends.values():
            end.close()

    def tcp_state(self, ports: Sequence[int], v6: bool = False) -> str | None:
        """State of the TCP entry of the family whose tuple uses one of `ports` (None:
        no entry), in sami-xdp's names (conntrack's CLOSE is CLOSED)."""
        if self.name == "samixdp":
            rows = self.topo.samixdp_json("sessions")
            assert isinstance(rows, list)
            states = [r["state"] for r in rows
                      if r["proto"] == "tcp" and {r["sport"], r["dport"]} & set(ports)
                      and (":" in r["src"]) == v6]
        else:
            out = self.topo.fw.run("conntrack", "-L", "-f", "ipv6" if v6 else "ipv4",
                                   "-p", "tcp", check=False).stdout
            states = []
            for line in out.splitlines():
                words = line.split()  # tcp 6 TIMEOUT STATE src= dst= sport= dport= ...
                first = dict(w.split("=", 1) for w in words[4:8] if "=" in w)
                if {int(first.get("sport", -1)), int(first.get("dport", -1))} & set(ports):
                    states.append({"CLOSE": "CLOSED"}.get(words[3], words[3]))
        assert len(states) <= 1, f"{self.name}: more than one entry for {ports}: {states}"
        return states[0] if states else None


def load_ruleset(lab: Lab, ns: Netns, name: str, text: str) -> None:
    """`nft -f` inside `ns` (the file lives under the lab's run directory)."""
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    path = lab.run_dir / f"{name}.nft"
    path.write_text(text)
    ns.run("nft", "-f", path)


def _prepare_endpoint_ns(lab: Lab, ns: Netns, link: str) -> None:
    """A kernel that never answers what we inject, and IPv6 without chatter of its own
    but MLD reports (the topology turned DAD and router advertisements off)."""
    for scope in ("all", "default", link):
        ns.sysctl(f"net.ipv6.conf.{scope}.router_solicitations", 0)
    load_ruleset(lab, ns, f"quiet-{ns.name}", QUIET_RULESET)


def _prepare_firewall_ns(t: CoreTopology) -> None:
    """Static neighbours (no ARP or NDP wait on the first packet), no ICMP redirects (a
    spoofed packet routed back out of its ingress link would trigger one; IPv6 has no
    switch for them, but what such a redirect sends to the client's link carries no
    probe's mark), and for IPv6 a default route through the uplink, as a firewall at
    the edge has (it lets the reverse-path check pass sources from anywhere beyond the
    client's link)."""
    t.fw.sysctl("net.ipv4.conf.all.send_redirects", 0)
    for link in t.fw_links:
        t.fw.sysctl(f"net.ipv4.conf.{link}.send_redirects", 0)
    client_mac = link_mac(t.client, "sxc-fw").hex(":")
    vm_mac = link_mac(t.vm, "sxv-fw").hex(":")
    for client_ip, vm_ip in ((CLIENT_IP, VM_IP), (CLIENT_IP6, VM_IP6)):
        t.fw.ip("neigh", "replace", client_ip, "lladdr", client_mac, "dev", "sxf-cl",
                "nud", "permanent")
        t.fw.ip("neigh", "replace", vm_ip, "lladdr", vm_mac, "dev", "sxf-vm",
                "nud", "permanent")
    t.fw.ip("-6", "route", "add", "default", "via", CLIENT_IP6, "dev", "sxf-cl")


def _endpoints(t: CoreTopology) -> dict[Role, Endpoint]:
    return {
        "client": open_endpoint("client", t.client, "sxc-fw", t.fw, "sxf-cl"),
        "vm": open_endpoint("vm", t.vm, "sxv-fw", t.fw, "sxf-vm"),
    }


def build_samixdp(lab: Lab) -> Side:
    t = build_core(lab)
    for ns, link in ((t.client, "sxc-fw"), (t.vm, "sxv-fw")):
        _prepare_endpoint_ns(lab, ns, link)
    _prepare_firewall_ns(t)
    for link in t.fw_links:
        res = t.samixdp("attach", link, "--protect", VM_NET, "--protect", VM_NET6)
        assert res.returncode == 0, f"attach {link}: {res.stderr}"
    for vm, *rule in ACL_RULES:
        res = t.samixdp("acl", "add", "--vm", vm, *rule)
        assert res.returncode == 0, f"acl add {vm} {rule}: {res.stderr}"
    return Side("samixdp", t, _endpoints(t))


def build_conntrack(lab: Lab) -> Side:
    t = build_core(lab)
    for ns, link in ((t.client, "sxc-fw"), (t.vm, "sxv-fw")):
        _prepare_endpoint_ns(lab, ns, link)
    _prepare_firewall_ns(t)
    load_ruleset(lab, t.fw, "conntrack-fw", CONNTRACK_RULESET)
    for key, value in CONNTRACK_SYSCTLS.items():  # per namespace once conntrack is in use
        t.fw.sysctl(key, value)
        got = t.fw.run("cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()
        assert got == str(value), (key, got)
    return Side("conntrack", t, _endpoints(t))


# ---- running a case -----------------------------------------------------------------


@dataclass
class Outcome:
    """What each firewall did with a case's probes, and its drop counter deltas."""

    verdicts: dict[str, list[Verdict]]
    drops: dict[str, Counter[str]]
    states: dict[str, str | None]  # final TCP state, when the case asked for it
    seconds: float


_ip_ids = itertools.count(int.from_bytes(os.urandom(2), "big") | 1)
_flow_labels = itertools.count(int.from_bytes(os.urandom(3), "big") | 1)
_frag_ids = itertools.count(int.from_bytes(os.urandom(4), "big") | 1)
_sentinels = itertools.count()  # their ICMP ids are 0xE000 and up; cases use 0x5000 + n


def next_ip_id() -> int:
    """A fresh IP id per datagram (never 0), so every probe can be recognised."""
    while True:
        value = next(_ip_ids) & 0xFFFF
        if value:
            return value


def next_flow_label() -> int:
    """A fresh flow label per IPv6 datagram (never 0: the label of unlabelled flows)."""
    while True:
        value = next(_flow_labels) & 0xFFFFF
        if value:
            return value


def next_frag_id() -> int:
    """A fresh identification for an IPv6 Fragment header."""
    return next(_frag_ids) & 0xFFFFFFFF


Lane = tuple[Role, Role, bool]  # a sentinel's sender, receiver, IPv6


@dataclass
class DiffHarness:
    sides: tuple[Side, ...]
    # drop counters after the last case: the next case's "before" (only the harness
    # sends to these topologies, and a CLI call costs ~0.4 s)
    last_counters: dict[str, Counter[str]] | None = None

    def run(self, probes: Sequence[Probe], state_ports: Sequence[int] = (),
            v6: bool = False) -> Outcome:
        """Sends every probe through both firewalls at once; a probe is delivered if it
        reached its far endpoint at any time before the case ended. With `state_ports`,
        also reads each side's final state of the TCP tuple (of the family `v6` says)
        using one of them."""
        keys = [p.key for p in probes]
        assert len(set(keys)) == len(keys), "two probes share a mark and piece"
        start = time.monotonic()
        before = self.last_counters or {fw.name: fw.counters() for fw in self.sides}
        for fw in self.sides:
            for end in fw.ends.values():
                end.drain()  # whatever an earlier case left
        seen: dict[str, set[ProbeKey]] = {fw.name: set() for fw in self.sides}
        batch: list[Probe] = []
        for probe in probes:
            for fw in self.sides:
                fw.ends[probe.sender].send(probe.ip)
            batch.append(probe)
            if probe.wait:
                self._flush({(p.sender, p.receiver, p.v6) for p in batch}, seen)
                batch = []
        self._flush({(p.sender, p.receiver, p.v6) for p in batch}, seen)
        self._wait([], seen, GRACE_S)
        verdicts = {
            fw.name: [DELIVERED if k in seen[fw.name] else DROPPED for k in keys]
            for fw in self.sides
        }
        # the CLI calls (~0.4 s each) run side by side
        with ThreadPoolExecutor(max_workers=2 * len(self.sides)) as pool:
            counting = {fw.name: pool.submit(fw.counters) for fw in self.sides}
            reading = {fw.name: pool.submit(fw.tcp_state, state_ports, v6)
                       for fw in self.sides} if state_ports else {}
            self.last_counters = {name: f.result() for name, f in counting.items()}
            states = {name: f.result() for name, f in reading.items()}
        drops = {fw.name: self.last_counters[fw.name] - before[fw.name] for fw in self.sides}
        return Outcome(verdicts, drops, states, time.monotonic() - start)

    def _flush(self, paths: set[Lane], seen: dict[str, set[ProbeKey]]) -> None:
        """Waits until both firewalls have handled everything sent so far: an ICMP or
        ICMPv6 echo request (which both let through: ACL, outbound or transit) goes out
        behind the probes on every path, and must come out at the far end."""
        if not paths:
            return
        sentinels = []
        for sender, receiver, v6 in sorted(paths):
            addr = ADDR6 if v6 else ADDR
            ip = icmp_echo(addr[sender], addr[receiver], 0xE000 + next(_sentinels) % 0x2000)
            sentinels.append(Probe("sentinel", sender, ip, DELIVERED))
            for fw in self.sides:
                fw.ends[sender].send(ip)
        self._wait(sentinels, seen, SENTINEL_WAIT_S)
        lost = [(fw.name, p.sender, p.receiver, p.v6) for p in sentinels for fw in self.sides
                if p.key not in seen[fw.name]]
        assert not lost, f"harness: sentinel echo requests lost on {lost}"

    def _wait(self, batch: list[Probe], seen: dict[str, set[ProbeKey]],
              timeout: float) -> None:
        """Reads every receiver until each probe of `batch` arrived on both sides, or
        `timeout` passed (then the missing ones are drops, unless they show up later)."""
        deadline = time.monotonic() + timeout
        rx = {end.rx.fileno(): (fw.name, end) for fw in self.sides for end in fw.ends.values()}
        while True:
            for name, end in rx.values():
                seen[name].update(end.drain())
            if batch and all(p.key in seen[fw.name] for p in batch for fw in self.sides):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select(list(rx), [], [], left)



@contextlib.contextmanager
def diff_harness() -> Iterator[DiffHarness]:
    """Both topologies, built once; namespaces, mounts and sockets always removed."""
    with Lab(tag="dx") as lab_x, Lab(tag="dn") as lab_n, contextlib.ExitStack() as stack:
        ours = build_samixdp(lab_x)
        stack.callback(ours.close)
        theirs = build_conntrack(lab_n)
        stack.callback(theirs.close)
        yield DiffHarness((ours, theirs))


# ---- packet builders ------------------------------------------------------------------
# scapy computes lengths and checksums (conntrack checks them at prerouting); every
# datagram gets a fresh mark (IP id, flow label) so it can be recognised on the far
# side. An address with a colon makes an IPv6 packet.

ADDR: dict[Role, str] = {"client": CLIENT_IP, "vm": VM_IP}
ADDR6: dict[Role, str] = {"client": CLIENT_IP6, "vm": VM_IP6}


def other(role: Role) -> Role:
    return "vm" if role == "client" else "client"


def ip_hdr(src: str, dst: str, hlim: int = 64) -> Packet:
    """An IPv4 header with a fresh IP id, or an IPv6 header with a fresh flow label."""
    if ":" in src or ":" in dst:
        return IPv6(src=src, dst=dst, fl=next_flow_label(), hlim=hlim)
    return IP(src=src, dst=dst, id=next_ip_id())


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"udp-probe",
        ext: Packet | None = None) -> bytes:
    """A UDP datagram; `ext`: IPv6 extension headers between the header and UDP."""
    hdr = ip_hdr(src, dst) if ext is None else ip_hdr(src, dst) / ext
    return bytes(hdr / UDP(sport=sport, dport=dport) / Raw(payload))


def icmp_echo(src: str, dst: str, ident: int, seq: int = 1, reply: bool = False) -> bytes:
    """An ICMP echo request or reply, ICMPv6's between IPv6 addresses."""
    if ":" in src:
        echo: Packet = ICMPv6EchoReply(id=ident, seq=seq) if reply \
            else ICMPv6EchoRequest(id=ident, seq=seq)
        return bytes(ip_hdr(src, dst) / echo / Raw(b"echo-probe"))
    return bytes(ip_hdr(src, dst) / ICMP(type=0 if reply else 8, id=ident, seq=seq)
                 / Raw(b"echo-probe"))


def icmp_error(src: str, dst: str, quoted: bytes, icmp_type: int = 3, code: int = 3,
               mtu: int = 0) -> bytes:
    """An ICMP error quoting the IP header and first 8 transport bytes of `quoted`,
    as routers do (RFC 792)."""
    ihl = (quoted[0] & 0x0F) * 4
    icmp = ICMP(type=icmp_type, code=code)
    if icmp_type == 3 and code == 4:
        icmp.nexthopmtu = mtu  # fragmentation needed: the next hop's MTU
    return bytes(ip_hdr(src, dst) / icmp / Raw(quoted[: ihl + 8]))


ICMP6_UNREACH, ICMP6_TOO_BIG, ICMP6_TIME_EXCEEDED = 1, 2, 3


def icmp6_error(src: str, dst: str, quoted: bytes, icmp_type: int = ICMP6_UNREACH,
                code: int = 4, mtu: int = 1280) -> bytes:
    """An ICMPv6 error quoting as much of `quoted` as fits in 1280 bytes (RFC 4443
    2.4(c)); code 4 of destination unreachable is port unreachable."""
    msg: Packet
    if icmp_type == ICMP6_TOO_BIG:
        msg = ICMPv6PacketTooBig(mtu=mtu)
    elif icmp_type == ICMP6_TIME_EXCEEDED:
        msg = ICMPv6TimeExceeded(code=code)
    else:
        msg = ICMPv6DestUnreach(code=code)
    return bytes(ip_hdr(src, dst) / msg / Raw(quoted[: 1280 - 48]))


def ip_fragment(src: str, dst: str, proto: int, ip_id: int, offset: int, data: bytes,
                more: bool, flow_label: int = 0) -> bytes:
    """One fragment carrying `data` at byte `offset` (a multiple of 8) of the original
    datagram's payload: an IPv4 fragment, or between IPv6 addresses an IPv6 packet
    with a Fragment header (`ip_id` its identification, every fragment of a datagram
    with the same `flow_label`, the mark of its probes)."""
    assert offset % 8 == 0, offset
    if ":" in src:
        return bytes(IPv6(src=src, dst=dst, fl=flow_label)
                     / IPv6ExtHdrFragment(nh=proto, offset=offset // 8, m=int(more), id=ip_id)
                     / Raw(data))
    return bytes(IP(src=src, dst=dst, id=ip_id, proto=proto, flags="MF" if more else 0,
                    frag=offset // 8) / Raw(data))


def transport_bytes(ip: bytes) -> bytes:
    """The transport header and payload of a whole datagram (checksums included; an
    IPv6 datagram without extension headers)."""
    if is_ipv6(ip):
        return ip[40:]
    return ip[(ip[0] & 0x0F) * 4:]


def transport_proto(ip: bytes) -> int:
    return ip[6] if is_ipv6(ip) else ip[9]


@dataclass
class TcpFlow:
    """Both ends of one TCP connection, so that crafted segments carry the sequence and
    acknowledgement numbers the two stacks would use (conntrack tracks windows).
    `v6`: between the endpoints' IPv6 addresses."""

    client_port: int
    vm_port: int
    isn: dict[Role, int] = field(default_factory=lambda: {"client": 1_000_000,
                                                          "vm": 3_000_000})
    window: int = 65535
    v6: bool = False

    def __post_init__(self) -> None:
        self.nxt: dict[Role, int] = dict(self.isn)

    def port(self, role: Role) -> int:
        return self.client_port if role == "client" else self.vm_port

    def addr(self, role: Role) -> str:
        return (ADDR6 if self.v6 else ADDR)[role]

    def segment(self, by: Role, flags: str, payload: bytes = b"", *, seq: int | None = None,
                ack: int | None = None, src: str | None = None,
                ext: Packet | None = None) -> bytes:
        """A segment from `by` to the other end. Without `seq` it continues `by`'s
        stream (and advances it); an explicit `seq` (an attacker's guess) does not.
        `ext`: IPv6 extension headers between the IPv6 header and TCP."""
        peer = other(by)
        advance = seq is None
        seq = self.nxt[by] if seq is None else seq
        if ack is None:
            ack = self.nxt[peer] if "A" in flags else 0
        tcp = TCP(sport=self.port(by), dport=self.port(peer), flags=flags,
                  seq=seq % 2**32, ack=ack % 2**32, window=self.window)
        hdr = ip_hdr(src or self.addr(by), self.addr(peer))
        if ext is not None:
            hdr = hdr / ext
        ip = bytes(hdr / tcp / Raw(payload)) if payload else bytes(hdr / tcp)
        if advance:
            self.nxt[by] = seq + len(payload) + ("S" in flags) + ("F" in flags)
        return ip

    def reopen(self, client_isn: int, vm_isn: int) -> None:
        """A new incarnation of the same 4-tuple (TIME_WAIT reuse) with fresh ISNs."""
        self.isn = {"client": client_isn, "vm": vm_isn}
        self.nxt = dict(self.isn)
