"""Differential harness: the same crafted packets through sami-xdp and Linux conntrack.

Two copies of the issue-2 topology run side by side (client 192.0.2.10 <-> firewall,
a router <-> VM 10.1.1.1). In one firewall namespace sami-xdp is attached to both
links with the real CLI; in the other there is no XDP but an nftables forward chain
with the same policy (`CONNTRACK_RULESET`), conntrack in its strict settings
(`nf_conntrack_tcp_loose=0`, `tcp_be_liberal=0`) and a reverse-path check.

Packets are not sent by the endpoints' kernels: every frame is built here and written
with an AF_PACKET socket on a client or VM veth, towards the firewall veth's MAC, so a
TCP exchange can have consistent sequence numbers from both ends without a real socket.
The endpoints' kernels are kept silent (an nft rule drops everything at prerouting,
raw priority; AF_PACKET taps see frames before netfilter), or they would answer the
crafted segments with RSTs and disturb the state under test. The firewalls have static
neighbour entries and send no redirects, so they emit nothing of their own either.

A packet is "delivered" when it shows up on the far endpoint's veth (an AF_PACKET
receive socket) before its case ends, else "dropped". Probes are recognised by
(source, destination, IP id, fragment offset): every datagram gets its own IP id.
Behind each probe goes a sentinel on the same path (an ICMP echo request that both
firewalls pass), and the next probe leaves only once it has come out at the far end:
so each firewall has handled a packet before it sees the next, a drop is known as soon
as that happened rather than after a guessed timeout, and a slow machine makes the run
slower, not wrong. Both firewalls get each packet at the same moment and are waited
for together.

For an IPv6 variant: the nft table would become `inet` (or `ip6`) with `ip6 saddr`,
`icmpv6 type echo-request`, and ICMPv6 neighbour discovery accepted (ND is not
tracked, and with static neighbours it is not needed on the firewalls; the endpoints'
quiet rule must then be `inet` too); `ProbeKey` would take the flow label or a payload
token instead of the IP id (IPv6 has none outside fragment headers), fragments a
Fragment extension header, and the endpoints must keep IPv6 enabled (here it is
switched off to keep router solicitations and MLD reports out of the receive sockets).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from netns import (
    CLIENT_IP,
    VM_IP,
    VM_NET,
    CoreTopology,
    build_core,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

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

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SOL_PACKET = 263  # linux/socket.h
PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h, since 4.20
CLONE_NEWNET = 0x40000000

QUIET_RULESET = """
table ip sxquiet {
    chain pre {
        type filter hook prerouting priority raw; policy drop;
    }
}
"""

# The yardstick: what a conntrack firewall with sami-xdp's policy looks like. The
# comments name the rules; their counters tell why conntrack dropped a packet.
CONNTRACK_RULESET = f"""
table ip sxfw {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        fib saddr . iif oif missing counter drop comment "rpf"
        ip saddr != {VM_NET} ip daddr != {VM_NET} counter accept comment "transit"
        ct state invalid counter drop comment "invalid"
        ct state established,related counter accept comment "established"
        ip saddr {VM_NET} ct state new counter accept comment "new-outbound"
        ip daddr {VM_IP} tcp dport 80 ct state new counter accept comment "acl-tcp-80"
        ip daddr {VM_IP} udp dport 53 ct state new counter accept comment "acl-udp-53"
        ip daddr {VM_IP} icmp type echo-request ct state new counter accept comment "acl-icmp"
        counter drop comment "policy"
    }}
}}
"""
CONNTRACK_SYSCTLS = {
    "net.netfilter.nf_conntrack_tcp_loose": 0,  # no mid-stream pickup, like sami-xdp
    "net.netfilter.nf_conntrack_tcp_be_liberal": 0,  # window tracking on
}
ACL_RULES: tuple[tuple[str, ...], ...] = (
    ("--proto", "tcp", "--dport", "80"),
    ("--proto", "udp", "--dport", "53"),
    ("--proto", "icmp"),
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
    """What identifies one datagram (or one of its fragments) on the far side."""

    src: bytes
    dst: bytes
    ip_id: int
    frag_off: int


def ip_key(ip_bytes: bytes) -> ProbeKey:
    frag = struct.unpack_from("!H", ip_bytes, 6)[0]
    return ProbeKey(ip_bytes[12:16], ip_bytes[16:20], struct.unpack_from("!H", ip_bytes, 4)[0],
                    frag & 0x1FFF)


@dataclass(frozen=True)
class Probe:
    """One packet of a case: who sends it, its IPv4 bytes and conntrack's verdict.

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
        return ip_key(self.ip)

    @property
    def receiver(self) -> Role:
        return "vm" if self.ip[16:20] == socket.inet_aton(VM_IP) else "client"


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
        self.tx.send(self.fw_mac + self.mac + struct.pack("!H", ETH_P_IP) + ip)

    def drain(self) -> list[ProbeKey]:
        """Every IPv4 frame received so far (non-blocking)."""
        keys: list[ProbeKey] = []
        while True:
            try:
                frame, addr = self.rx.recvfrom(65535)
            except BlockingIOError:
                return keys
            if addr[2] == PACKET_OUTGOING or len(frame) < 34:
                continue
            if struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
                continue
            keys.append(ip_key(frame[14:]))

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def open_endpoint(role: Role, ns: Netns, link: str, fw: Netns, fw_link: str) -> Endpoint:
    with in_netns(ns.name):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        tx.bind((link, 0))
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        rx.bind((link, ETH_P_IP))
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
        out = self.topo.fw.run("nft", "-j", "list", "table", "ip", "sxfw").stdout
        counts: Counter[str] = Counter()
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule or not any("drop" in e for e in rule["expr"]):
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    counts[rule.get("comment", "?")] = int(expr["counter"]["packets"])
        return counts

    def close(self) -> None:
        for end in self.ends.values():
            end.close()

    def tcp_state(self, ports: Sequence[int]) -> str | None:
        """State of the TCP entry whose tuple uses one of `ports` (None: no entry), in
        sami-xdp's names (conntrack's CLOSE is CLOSED)."""
        if self.name == "samixdp":
            rows = self.topo.samixdp_json("sessions")
            assert isinstance(rows, list)
            states = [r["state"] for r in rows
                      if r["proto"] == "tcp" and {r["sport"], r["dport"]} & set(ports)]
        else:
            out = self.topo.fw.run("conntrack", "-L", "-p", "tcp", check=False).stdout
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


def _prepare_endpoint_ns(lab: Lab, ns: Netns) -> None:
    """No IPv6 chatter, and a kernel that never answers what we inject."""
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    load_ruleset(lab, ns, f"quiet-{ns.name}", QUIET_RULESET)


def _prepare_firewall_ns(t: CoreTopology) -> None:
    """Static neighbours (no ARP wait on the first packet), no ICMP redirects (a
    spoofed packet routed back out of its ingress link would trigger one)."""
    t.fw.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    t.fw.sysctl("net.ipv4.conf.all.send_redirects", 0)
    for link in t.fw_links:
        t.fw.sysctl(f"net.ipv4.conf.{link}.send_redirects", 0)
    client_mac = link_mac(t.client, "sxc-fw").hex(":")
    vm_mac = link_mac(t.vm, "sxv-fw").hex(":")
    t.fw.ip("neigh", "replace", CLIENT_IP, "lladdr", client_mac, "dev", "sxf-cl",
            "nud", "permanent")
    t.fw.ip("neigh", "replace", VM_IP, "lladdr", vm_mac, "dev", "sxf-vm", "nud", "permanent")


def _endpoints(t: CoreTopology) -> dict[Role, Endpoint]:
    return {
        "client": open_endpoint("client", t.client, "sxc-fw", t.fw, "sxf-cl"),
        "vm": open_endpoint("vm", t.vm, "sxv-fw", t.fw, "sxf-vm"),
    }


def build_samixdp(lab: Lab) -> Side:
    t = build_core(lab)
    for ns in (t.client, t.vm):
        _prepare_endpoint_ns(lab, ns)
    _prepare_firewall_ns(t)
    for link in t.fw_links:
        res = t.samixdp("attach", link, "--protect", VM_NET)
        assert res.returncode == 0, f"attach {link}: {res.stderr}"
    for rule in ACL_RULES:
        res = t.samixdp("acl", "add", "--vm", VM_IP, *rule)
        assert res.returncode == 0, f"acl add {rule}: {res.stderr}"
    return Side("samixdp", t, _endpoints(t))


def build_conntrack(lab: Lab) -> Side:
    t = build_core(lab)
    for ns in (t.client, t.vm):
        _prepare_endpoint_ns(lab, ns)
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
_sentinels = itertools.count()  # their ICMP ids are 0xE000 and up; cases use 0x5000 + n


def next_ip_id() -> int:
    """A fresh IP id per datagram (never 0), so every probe can be recognised."""
    while True:
        value = next(_ip_ids) & 0xFFFF
        if value:
            return value


@dataclass
class DiffHarness:
    sides: tuple[Side, Side]
    # drop counters after the last case: the next case's "before" (only the harness
    # sends to these topologies, and a CLI call costs ~0.4 s)
    last_counters: dict[str, Counter[str]] | None = None

    def run(self, probes: Sequence[Probe], state_ports: Sequence[int] = ()) -> Outcome:
        """Sends every probe through both firewalls at once; a probe is delivered if it
        reached its far endpoint at any time before the case ended. With `state_ports`,
        also reads each side's final state of the TCP tuple using one of them."""
        keys = [p.key for p in probes]
        assert len(set(keys)) == len(keys), "two probes share an IP id and offset"
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
                self._flush({(p.sender, p.receiver) for p in batch}, seen)
                batch = []
        self._flush({(p.sender, p.receiver) for p in batch}, seen)
        self._wait([], seen, GRACE_S)
        verdicts = {
            fw.name: [DELIVERED if k in seen[fw.name] else DROPPED for k in keys]
            for fw in self.sides
        }
        self.last_counters = {fw.name: fw.counters() for fw in self.sides}
        drops = {fw.name: self.last_counters[fw.name] - before[fw.name] for fw in self.sides}
        states = {fw.name: fw.tcp_state(state_ports) for fw in self.sides} if state_ports \
            else {}
        return Outcome(verdicts, drops, states, time.monotonic() - start)

    def _flush(self, paths: set[tuple[Role, Role]], seen: dict[str, set[ProbeKey]]) -> None:
        """Waits until both firewalls have handled everything sent so far: an ICMP echo
        request (which both let through: ACL, outbound or transit) goes out behind the
        probes on every path, and must come out at the far end."""
        if not paths:
            return
        sentinels = []
        for sender, receiver in sorted(paths):
            ip = icmp_echo(ADDR[sender], ADDR[receiver], 0xE000 + next(_sentinels) % 0x2000)
            sentinels.append(Probe("sentinel", sender, ip, DELIVERED))
            for fw in self.sides:
                fw.ends[sender].send(ip)
        self._wait(sentinels, seen, SENTINEL_WAIT_S)
        lost = [(fw.name, p.sender, p.receiver) for p in sentinels for fw in self.sides
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
# datagram gets a fresh IP id so it can be recognised on the far side.

ADDR: dict[Role, str] = {"client": CLIENT_IP, "vm": VM_IP}


def other(role: Role) -> Role:
    return "vm" if role == "client" else "client"


def ip_hdr(src: str, dst: str) -> IP:
    return IP(src=src, dst=dst, id=next_ip_id())


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"udp-probe") -> bytes:
    return bytes(ip_hdr(src, dst) / UDP(sport=sport, dport=dport) / Raw(payload))


def icmp_echo(src: str, dst: str, ident: int, seq: int = 1, reply: bool = False) -> bytes:
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


def ip_fragment(src: str, dst: str, proto: int, ip_id: int, offset: int, data: bytes,
                more: bool) -> bytes:
    """One IPv4 fragment carrying `data` at byte `offset` (a multiple of 8) of the
    original datagram's payload."""
    assert offset % 8 == 0, offset
    return bytes(IP(src=src, dst=dst, id=ip_id, proto=proto, flags="MF" if more else 0,
                    frag=offset // 8) / Raw(data))


def transport_bytes(ip: bytes) -> bytes:
    """The transport header and payload of a whole datagram (checksums included)."""
    return ip[(ip[0] & 0x0F) * 4:]


@dataclass
class TcpFlow:
    """Both ends of one TCP connection, so that crafted segments carry the sequence and
    acknowledgement numbers the two stacks would use (conntrack tracks windows)."""

    client_port: int
    vm_port: int
    isn: dict[Role, int] = field(default_factory=lambda: {"client": 1_000_000,
                                                          "vm": 3_000_000})
    window: int = 65535

    def __post_init__(self) -> None:
        self.nxt: dict[Role, int] = dict(self.isn)

    def port(self, role: Role) -> int:
        return self.client_port if role == "client" else self.vm_port

    def segment(self, by: Role, flags: str, payload: bytes = b"", *, seq: int | None = None,
                ack: int | None = None, src: str | None = None) -> bytes:
        """A segment from `by` to the other end. Without `seq` it continues `by`'s
        stream (and advances it); an explicit `seq` (an attacker's guess) does not."""
        peer = other(by)
        advance = seq is None
        seq = self.nxt[by] if seq is None else seq
        if ack is None:
            ack = self.nxt[peer] if "A" in flags else 0
        tcp = TCP(sport=self.port(by), dport=self.port(peer), flags=flags,
                  seq=seq % 2**32, ack=ack % 2**32, window=self.window)
        ip = bytes(ip_hdr(src or ADDR[by], ADDR[peer]) / tcp / Raw(payload)) if payload \
            else bytes(ip_hdr(src or ADDR[by], ADDR[peer]) / tcp)
        if advance:
            self.nxt[by] = seq + len(payload) + ("S" in flags) + ("F" in flags)
        return ip

    def reopen(self, client_isn: int, vm_isn: int) -> None:
        """A new incarnation of the same 4-tuple (TIME_WAIT reuse) with fresh ISNs."""
        self.isn = {"client": client_isn, "vm": vm_isn}
        self.nxt = dict(self.isn)
