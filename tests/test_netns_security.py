"""The datapath-security issue's attacks with real stacks and the attacker's tools, on
the core topology (client <-> firewall <-> VM, default settings):

- a real TCP connect from the uplink to a port the ACL denies, helped by a SYN spoofing
  the VM's address (the attacker's own RSTs suppressed): refused by anti-spoofing,
  counted `drop-spoofed`; with the uplink wrongly declared `--role vm` it gets through,
  which is what the check prevents;
- a blind RST (out of window) into a live connection: dropped, and the connection
  still carries data after idling past the CLOSED timeout;
- a spoofed one-shot UDP flood (hping3 --rand-source) to an allowed port the VM
  answers, several times the unassured table: new connections keep working and the
  table of assured sessions does not fill.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import require_tool
from netns import (
    CLIENT_IP,
    VM_IP,
    VM_NET,
    CoreTopology,
    build_core,
    demo_env,
    demo_topology,
    lab,  # noqa: F401  (fixture)
    require_root,
)

from testbed.netns import PROBE, SAMIXDP, Lab, Netns, tcp_connect, unique_suffix

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]

OPEN, DENIED, UDP_PORT = 2222, 2223, 5300
ATTACKER_PORT = 40404
UNASSURED = 2048  # a small unassured table, so the flood overflows it several times


@dataclass(frozen=True)
class Attacker:
    """The attacker's host: crafted frames (scapy) sent from `iface` in `ns` to the
    next hop's MAC."""

    ns: Netns
    iface: str
    next_hop_mac: str

    @classmethod
    def facing(cls, ns: Netns, iface: str, router: Netns, router_iface: str) -> Attacker:
        mac = json.loads(router.ip("-j", "link", "show", router_iface).stdout)[0]["address"]
        return cls(ns, iface, mac)

    def scapy(self, code: str) -> None:
        self.ns.run(sys.executable, "-c",
                    "from scapy.all import *\n"
                    f"sendp(Ether(dst='{self.next_hop_mac}')/{code}, iface='{self.iface}', "
                    "verbose=0)\n",
                    timeout=30)

    def spoofed_connect(self, sport: int, client: Netns | None = None) -> tuple[bool, str]:
        """The attack: a SYN from VM:DENIED to the client's port, then a real connect
        from the client (this host unless given) from that port to VM:DENIED, with the
        client's kernel kept from answering the spoofed SYN with an RST."""
        client = client or self.ns
        client.run("nft", "add", "table", "inet", "sxatk")
        client.run("nft", "add", "chain", "inet", "sxatk", "out",
                   "{ type filter hook output priority 0; }")
        client.run("nft", "add", "rule", "inet", "sxatk", "out", "tcp", "flags", "rst", "drop")
        try:
            self.scapy(f"IP(src='{VM_IP}', dst='{CLIENT_IP}')/TCP(sport={DENIED}, "
                       f"dport={sport}, flags='S', seq=1000)")
            return tcp_connect(client, VM_IP, DENIED, timeout=1.5, sport=sport)
        finally:
            client.run("nft", "delete", "table", "inet", "sxatk", check=False)


def _attacker(t: CoreTopology) -> Attacker:
    return Attacker.facing(t.client, "sxc-fw", t.fw, "sxf-cl")


@pytest.fixture(scope="module")
def topo() -> Iterator[CoreTopology]:
    require_root()
    with Lab(tag="s") as topo_lab:
        t = build_core(topo_lab)
        for link in t.fw_links:
            res = t.samixdp("attach", link, "--protect", VM_NET, "--max-unassured",
                            str(UNASSURED))
            assert res.returncode == 0, res.stderr
        for args in (("--proto", "tcp", "--dport", str(OPEN)),
                     ("--proto", "udp", "--dport", str(UDP_PORT))):
            assert t.samixdp("acl", "add", "--vm", VM_IP, *args).returncode == 0
        for port in (OPEN, DENIED):
            topo_lab.echo_server(t.vm, VM_IP, port, lifetime=180)
        topo_lab.spawn(t.vm, sys.executable, PROBE, "udp-echo", VM_IP, str(UDP_PORT),
                  "--lifetime", "180", lifetime=180)
        yield t


@pytest.fixture
def uplink_role(topo: CoreTopology) -> Iterator[CoreTopology]:
    """Each test starts with the uplink as routed (role auto) and ends that way."""
    assert topo.samixdp("attach", "sxf-cl", "--role", "auto").returncode == 0
    yield topo
    topo.samixdp("attach", "sxf-cl", "--role", "auto")


def test_spoofed_vm_source_cannot_open_a_denied_port(uplink_role: CoreTopology) -> None:
    t = uplink_role
    before = t.samixdp_json("stats")["drop-spoofed"]
    ok, out = _attacker(t).spoofed_connect(ATTACKER_PORT)
    assert not ok, f"the spoofing trick opened a denied port: {out}"
    assert t.samixdp_json("stats")["drop-spoofed"] > before
    rows = t.samixdp_json("sessions", "--vm", VM_IP)
    assert not [r for r in rows if {r["sport"], r["dport"]} == {DENIED, ATTACKER_PORT}], rows


def test_the_trick_works_where_the_uplink_is_trusted(uplink_role: CoreTopology) -> None:
    """The same attack with the uplink declared VM-facing (a misconfiguration): the
    spoofed SYN makes a session the real SYN rides in (a simultaneous open), so the
    attacker's SYN reaches the denied service, whose socket answers it (SYN-RECV).
    Whether the handshake then completes depends on the VM's ISN (its SYN/ACK must
    fall in the window the spoofed SYN announced), so only the breach is asserted."""
    t = uplink_role
    assert t.samixdp("attach", "sxf-cl", "--role", "vm").returncode == 0
    sport = ATTACKER_PORT + 1
    _attacker(t).spoofed_connect(sport)
    rows = t.samixdp_json("sessions", "--vm", VM_IP)
    mine = [r for r in rows if {r["sport"], r["dport"]} == {DENIED, sport}]
    assert mine and mine[0]["state"] in ("SYN_SENT2", "SYN_RECV", "ESTABLISHED"), rows
    half_open = t.vm.run("ss", "-Htn", "state", "syn-recv", f"( sport = :{DENIED} )").stdout
    established = t.vm.run("ss", "-Htn", f"( sport = :{DENIED} )").stdout
    assert f"{CLIENT_IP}:{sport}" in half_open + established, (half_open, established)


def test_blind_rst_leaves_the_connection_alive_past_the_closed_timeout(
    uplink_role: CoreTopology,
) -> None:
    t = uplink_role
    assert t.samixdp("config", "set", "timeout.closed", "2").returncode == 0
    try:
        conn = t.lab.held_connection(t.client, VM_IP, OPEN, timeout=3.0)
        assert conn.established(), conn.reader.seen
        port = conn.local_port
        # an RST with a guessed sequence number, towards the VM (TTL 2: it would die
        # before the VM if it got past the firewall; the firewall is what must not move)
        for seq in (12345, 2**31 + 7, 4_000_000_000):
            _attacker(t).scapy(f"IP(src='{CLIENT_IP}', dst='{VM_IP}', ttl=2)/TCP(sport={port}, "
                      f"dport={OPEN}, flags='R', seq={seq})")
        rows = t.samixdp_json("sessions", "--vm", VM_IP)
        (mine,) = [r for r in rows if r["sport"] == port and r["dport"] == OPEN]
        assert mine["state"] == "ESTABLISHED", mine
        assert t.samixdp_json("stats")["drop-invalid"] >= 3
        time.sleep(2.5)  # idle past the CLOSED timeout: a closed entry would be gone now
        rc, seen = conn.release()
        assert rc == 0, f"the connection died after the blind RST: {seen}"
    finally:
        t.samixdp("config", "set", "timeout.closed", "10")


def test_one_shot_udp_flood_cannot_lock_out_new_connections(uplink_role: CoreTopology) -> None:
    t = uplink_role
    require_tool("hping3")
    assert t.samixdp("config", "set", "syn-rate", "100000").returncode == 0
    before = t.samixdp_json("status")["maps"]["sessions"]["entries"]
    # 4x the unassured table of spoofed one-shot flows, each answered by the VM
    t.client.run("timeout", "20", "hping3", "--udp", "-p", str(UDP_PORT), "--rand-source",
                 "-i", "u200", "-c", str(4 * UNASSURED), "-d", "8", VM_IP,
                 check=False, timeout=30)
    st = t.samixdp_json("status")["maps"]
    assert st["unassured"]["entries"] <= UNASSURED
    assert st["sessions"]["entries"] <= before + 2, "one-shot flows must not pin sessions"
    ok, out = tcp_connect(t.client, VM_IP, OPEN)
    assert ok, f"a new connection failed after the flood: {out}"
    res = t.client.run(sys.executable, "-c",
                       "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                       f" s.settimeout(2); s.sendto(b'hi', ('{VM_IP}', {UDP_PORT}));"
                       " print(s.recvfrom(100)[0])", check=False, timeout=10)
    assert res.returncode == 0 and "hi" in res.stdout, res.stdout + res.stderr


# ---- the headline attack on the demo topology (client -- gateway -- host A -- VM) -------


def test_spoofed_connect_fails_on_the_demo_topology(lab: Lab) -> None:  # noqa: F811
    """Host A attached as `make demo` attaches it (both links, default role auto). A
    host on A's uplink segment (frames sent from the gateway's link to A) spoofs the
    VM towards the client, and the client connects to a port A's ACL denies. A's
    uplink sees the VM's address arriving where A does not route it: dropped as
    spoofed, nothing opened; the allowed port still works."""
    require_root()
    suffix = "s" + unique_suffix()[:5]
    demo_topology(lab, suffix, "up")
    env = demo_env(lab, suffix)
    host_a, client, vm = Netns(env["SX_NS_A"]), Netns(env["SX_NS_CLIENT"]), Netns(env["SX_NS_VM"])
    dirs = {"SAMIXDP_BPFFS": env["SX_A_BPFFS"], "SAMIXDP_CONFIG_DIR": env["SX_A_CONFIG_DIR"],
            "SAMIXDP_STATE_DIR": env["SX_A_STATE_DIR"]}

    def samixdp(*args: str) -> str:
        return host_a.run(SAMIXDP, *args, env=dirs).stdout

    for iface in env["SX_A_IFACES"].split():
        samixdp("attach", iface, "--protect", env["SX_VM_NET"])
    samixdp("acl", "add", "--vm", VM_IP, "--proto", "tcp", "--dport", str(OPEN))
    for port in (OPEN, DENIED):
        lab.echo_server(vm, VM_IP, port, lifetime=60)
    ok, out = tcp_connect(client, VM_IP, OPEN, timeout=3.0)
    assert ok, out
    attacker = Attacker.facing(Netns(env["SX_NS_GW"]), "sxg-a", host_a, "sxa-gw")
    ok, out = attacker.spoofed_connect(ATTACKER_PORT, client)
    assert not ok, f"the spoofing trick opened a denied port: {out}"
    assert json.loads(samixdp("stats", "--json"))["drop-spoofed"] >= 1
    rows = json.loads(samixdp("sessions", "--vm", VM_IP, "--json"))
    assert not [r for r in rows if {r["sport"], r["dport"]} == {DENIED, ATTACKER_PORT}], rows
    # the same attack with A's uplink wrongly declared VM-facing gets the attacker's
    # SYN to the denied service: what the check above prevents
    samixdp("attach", "sxa-gw", "--role", "vm")
    attacker.spoofed_connect(ATTACKER_PORT + 1, client)
    seen = vm.run("ss", "-Htn", f"( sport = :{DENIED} )").stdout + vm.run(
        "ss", "-Htn", "state", "syn-recv", f"( sport = :{DENIED} )").stdout
    assert f"{CLIENT_IP}:{ATTACKER_PORT + 1}" in seen, seen
