"""Issue 12's done-when on the demo topology with its dual-stack VM, real stacks only.

Host A is attached as `make demo` attaches it (both links, both VM prefixes, role
auto). Checked: outbound IPv6 TCP works and shows in `sessions --json`; unsolicited
inbound IPv6 TCP and UDP are dropped and counted; an IPv6 ACL allow opens its port;
neighbour discovery keeps working through the firewall (caches flushed, counted as
pass-ndp); PMTU discovery works: with a 1400-byte-MTU hop on the path, the gateway's
packet-too-big reaches the VM through A (pass-related) and a bulk IPv6 transfer from
the VM completes. The migration of both addresses is the demo's test
(tests/test_netns_migrate.py).
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import require_tool
from netns import demo_env, demo_topology, lab, require_root  # noqa: F401

from testbed.netns import SAMIXDP, Lab, Netns, tcp_connect, unique_suffix

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]

OPEN, CLOSED, UDP_PORT, BULK = 2322, 2323, 5301, 5201
BULK_BYTES = 8 * 1024 * 1024

UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(1.5)
s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
try:
    print("reply", s.recvfrom(100)[0].decode())
except OSError:
    print("no reply")
"""


class HostA:
    """samixdp on host A with the demo's dirs."""

    def __init__(self, env: dict[str, str]) -> None:
        self.ns = Netns(env["SX_NS_A"])
        self.env = {"SAMIXDP_BPFFS": env["SX_A_BPFFS"],
                    "SAMIXDP_CONFIG_DIR": env["SX_A_CONFIG_DIR"],
                    "SAMIXDP_STATE_DIR": env["SX_A_STATE_DIR"]}

    def run(self, *args: str) -> str:
        return self.ns.run(SAMIXDP, *args, env=self.env).stdout

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json"))

    def stat(self, reason: str) -> int:
        stats = self.json("stats")
        assert isinstance(stats, dict)
        return int(stats[reason])


def wait_bound(ns: Netns, port: int, udp: bool = False, timeout: float = 10) -> None:
    """Polls until something in `ns` listens on (or, for UDP, is bound to) `port`."""
    flags = "-Hlun" if udp else "-Hltn"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if f":{port} " in ns.run("ss", flags, check=False).stdout:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing bound to port {port} in {ns.name} after {timeout}s")


@pytest.fixture
def dual(lab: Lab) -> tuple[Lab, dict[str, str], HostA]:  # noqa: F811
    require_root()
    suffix = "v" + unique_suffix()[:5]
    demo_topology(lab, suffix, "up")
    env = demo_env(lab, suffix)
    host_a = HostA(env)
    for iface in env["SX_A_IFACES"].split():
        host_a.run("attach", iface, "--protect", env["SX_VM_NET"],
                   "--protect", env["SX_VM_NET6"])
    return lab, env, host_a


def test_ipv6_outbound_works_inbound_needs_the_acl(dual) -> None:
    the_lab, env, host_a = dual
    client, vm = Netns(env["SX_NS_CLIENT"]), Netns(env["SX_NS_VM"])
    vm6, client6 = env["SX_VM_IP6"], env["SX_CLIENT_IP6"]
    the_lab.echo_server(client, client6, OPEN, lifetime=60)
    for port in (OPEN, CLOSED):
        the_lab.echo_server(vm, vm6, port, lifetime=60)
    the_lab.spawn(vm, sys.executable, "-c",
              "import socket\n"
              "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
              f"s.bind(('{vm6}', {UDP_PORT}))\n"
              "while True:\n"
              "    d, a = s.recvfrom(100)\n"
              "    s.sendto(d, a)\n", lifetime=60)
    wait_bound(vm, UDP_PORT, udp=True)

    ok, out = tcp_connect(vm, client6, OPEN, timeout=3.0)
    assert ok, out
    rows = host_a.json("sessions", "--vm", vm6)
    assert isinstance(rows, list)
    assert any(r["proto"] == "tcp" and r["src"] == vm6 and r["dst"] == client6
               and r["dport"] == OPEN for r in rows), rows

    before = host_a.stat("drop-acl-default")
    ok, out = tcp_connect(client, vm6, CLOSED, timeout=1.5)
    assert not ok, f"unsolicited IPv6 TCP reached the VM: {out}"
    udp = client.run(sys.executable, "-c", UDP_SEND, vm6, str(UDP_PORT)).stdout
    assert "no reply" in udp, udp
    assert host_a.stat("drop-acl-default") >= before + 2

    host_a.run("acl", "add", "--vm", vm6, "--proto", "tcp", "--dport", str(CLOSED))
    ok, out = tcp_connect(client, vm6, CLOSED, timeout=3.0)
    assert ok, f"the IPv6 ACL allow did not open its port: {out}"
    host_a.run("acl", "add", "--vm", vm6, "--proto", "udp", "--dport", str(UDP_PORT))
    udp = client.run(sys.executable, "-c", UDP_SEND, vm6, str(UDP_PORT)).stdout
    assert "reply ping" in udp, udp
    # and the IPv4 address of the same VM is not opened by the IPv6 rule
    ok, _ = tcp_connect(client, env["SX_VM_IP"], CLOSED, timeout=1.5)
    assert not ok


def test_neighbour_discovery_and_pmtu_discovery_keep_working(dual) -> None:
    the_lab, env, host_a = dual
    require_tool("iperf3")
    client, vm, gw = (Netns(env["SX_NS_CLIENT"]), Netns(env["SX_NS_VM"]),
                      Netns(env["SX_NS_GW"]))
    client6 = env["SX_CLIENT_IP6"]
    # forget every neighbour: the next packets must resolve them again through A
    for ns in (vm, gw, host_a.ns):
        ns.ip("-6", "neigh", "flush", "all", check=False)
    ndp_before = host_a.stat("pass-ndp")
    the_lab.echo_server(client, client6, OPEN, lifetime=60)
    ok, out = tcp_connect(vm, client6, OPEN, timeout=3.0)
    assert ok, out
    assert host_a.stat("pass-ndp") > ndp_before

    # a 1400-byte hop: the gateway's link to the client (its side only), so the
    # client still announces an MSS of 1440 and the VM's full-size segments need
    # the gateway's packet-too-big, which enters A from its uplink
    gw.ip("link", "set", "sxg-cl", "mtu", "1400")
    related_before = host_a.stat("pass-related")
    the_lab.spawn(client, "iperf3", "-s", "-1", "-B", client6, "-p", str(BULK), lifetime=40)
    wait_bound(client, BULK)
    res = vm.run("iperf3", "-c", client6, "-p", str(BULK), "-n", str(BULK_BYTES), "-J",
                 "--connect-timeout", "3000", check=False, timeout=30)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-1000:]
    # what the sender got rid of: more than any socket buffer holds (tcp_wmem max 4 MiB),
    # so most of it was acknowledged across the 1400-byte link (iperf3's received count
    # may be cut short: the test ends when the sender is done, which on the TC path,
    # with GSO, takes a few ms)
    sent = json.loads(res.stdout)["end"]["sum_sent"]["bytes"]
    assert sent >= BULK_BYTES
    assert host_a.stat("pass-related") > related_before, "no packet-too-big crossed A"
    mtu = vm.run("ip", "-6", "route", "get", client6).stdout
    assert "mtu 1400" in mtu, mtu
