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

import pytest
from conftest import require_tool
from netns import CLIENT_IP, VM_IP, VM_NET, CoreTopology, build_core, require_root

from testbed.netns import PROBE, Lab, tcp_connect

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]

OPEN, DENIED, UDP_PORT = 2222, 2223, 5300
ATTACKER_PORT = 40404
UNASSURED = 2048  # a small unassured table, so the flood overflows it several times


def _scapy(t: CoreTopology, code: str) -> None:
    """Runs scapy in the client namespace (the attacker's host)."""
    dst_mac = json.loads(t.fw.ip("-j", "link", "show", "sxf-cl").stdout)[0]["address"]
    t.client.run(sys.executable, "-c",
                 "from scapy.all import *\n"
                 f"sendp(Ether(dst='{dst_mac}')/{code}, iface='sxc-fw', verbose=0)\n",
                 timeout=30)


@pytest.fixture(scope="module")
def topo() -> Iterator[CoreTopology]:
    require_root()
    with Lab(tag="s") as lab:
        t = build_core(lab)
        for link in t.fw_links:
            res = t.samixdp("attach", link, "--protect", VM_NET, "--max-unassured",
                            str(UNASSURED))
            assert res.returncode == 0, res.stderr
        for args in (("--proto", "tcp", "--dport", str(OPEN)),
                     ("--proto", "udp", "--dport", str(UDP_PORT))):
            assert t.samixdp("acl", "add", "--vm", VM_IP, *args).returncode == 0
        for port in (OPEN, DENIED):
            lab.echo_server(t.vm, VM_IP, port, lifetime=180)
        lab.spawn(t.vm, sys.executable, PROBE, "udp-echo", VM_IP, str(UDP_PORT),
                  "--lifetime", "180", lifetime=180)
        yield t


@pytest.fixture
def uplink_role(topo: CoreTopology) -> Iterator[CoreTopology]:
    """Each test starts with the uplink as routed (role auto) and ends that way."""
    assert topo.samixdp("attach", "sxf-cl", "--role", "auto").returncode == 0
    yield topo
    topo.samixdp("attach", "sxf-cl", "--role", "auto")


def _spoofed_connect(t: CoreTopology, sport: int) -> tuple[bool, str]:
    """The attack: a SYN from VM:DENIED to the attacker's port, then a real connect
    from that port to VM:DENIED, with the attacker's kernel kept from answering the
    spoofed SYN with an RST."""
    t.client.run("nft", "add", "table", "inet", "sxatk")
    t.client.run("nft", "add", "chain", "inet", "sxatk", "out",
                 "{ type filter hook output priority 0; }")
    t.client.run("nft", "add", "rule", "inet", "sxatk", "out", "tcp", "flags", "rst", "drop")
    try:
        _scapy(t, f"IP(src='{VM_IP}', dst='{CLIENT_IP}')/TCP(sport={DENIED}, "
                  f"dport={sport}, flags='S', seq=1000)")
        return tcp_connect(t.client, VM_IP, DENIED, timeout=1.5, sport=sport)
    finally:
        t.client.run("nft", "delete", "table", "inet", "sxatk", check=False)


def test_spoofed_vm_source_cannot_open_a_denied_port(uplink_role: CoreTopology) -> None:
    t = uplink_role
    before = t.samixdp_json("stats")["drop-spoofed"]
    ok, out = _spoofed_connect(t, ATTACKER_PORT)
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
    _spoofed_connect(t, sport)
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
            _scapy(t, f"IP(src='{CLIENT_IP}', dst='{VM_IP}', ttl=2)/TCP(sport={port}, "
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
