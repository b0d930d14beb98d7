"""Issue 3 integration: ACL-allowed ports, SYN-flood ban, and an established
connection that survives the flood, through the real CLI and XDP on veth."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import require_tool
from netns import (
    CLIENT_IP,
    VM_IP,
    VM_NET,
    CoreTopology,
    build_core,
    one_line_error,
    require_root,
)

from testbed.netns import (
    Lab,
    tcp_connect,
)

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]

OPEN_PORT, CLOSED_PORT = 2222, 2223
FLOODER_IP = "192.0.2.66"


@pytest.fixture(scope="module")
def policy_topology() -> Iterator[CoreTopology]:
    require_root()
    with Lab(tag="p") as lab:
        t = build_core(lab)
        for link in t.fw_links:
            res = t.samixdp("attach", link, "--protect", VM_NET, "--syn-rate", "50/s",
                            "--ban", "30")
            assert res.returncode == 0, res.stderr
        t.client.ip("addr", "add", f"{FLOODER_IP}/24", "dev", "sxc-fw")
        for port in (OPEN_PORT, CLOSED_PORT):
            lab.echo_server(t.vm, VM_IP, port, lifetime=120)
        yield t


@pytest.fixture
def policy(policy_topology: CoreTopology) -> CoreTopology:
    """The module's topology with no ACL rule and no ban: each test starts the same,
    whatever ran before it."""
    t = policy_topology
    empty = t.lab.run_dir / "no-rules.yaml"
    empty.write_text("default: drop\nrules: []\n")
    res = t.samixdp("acl", "load", str(empty))
    assert res.returncode == 0, res.stderr
    for ban in t.samixdp_json("blacklist", "list"):
        res = t.samixdp("blacklist", "del", ban["ip"])
        assert res.returncode == 0, res.stderr
    assert t.samixdp_json("acl", "list") == [] and t.samixdp_json("blacklist", "list") == []
    return t


def acl_add(t: CoreTopology, *args: str) -> int:
    res = t.samixdp("acl", "add", *args)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())


def test_acl_opens_one_port_only(policy: CoreTopology) -> None:
    t = policy
    ok, out = tcp_connect(t.client, VM_IP, OPEN_PORT)
    assert not ok, f"no rule yet, default drop expected: {out}"
    rule_id = acl_add(t, "--vm", VM_IP, "--proto", "tcp", "--dport", str(OPEN_PORT))
    ok, out = tcp_connect(t.client, VM_IP, OPEN_PORT)
    assert ok, out
    ok, out = tcp_connect(t.client, VM_IP, CLOSED_PORT)
    assert not ok, out
    rules = t.samixdp_json("acl", "list")
    assert isinstance(rules, list)
    (mine,) = [r for r in rules if r["id"] == rule_id]
    assert mine["hits"] >= 1 and mine["dport"] == str(OPEN_PORT)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--vm", VM_IP, "--proto", "tcp", "--dport", "70000"], "port out of range"),
        (["--vm", "10.99.0.1", "--proto", "tcp"], "not inside a protected prefix"),
        (["--vm", VM_IP, "--proto", "gre"], "unknown protocol"),
        (["--vm", VM_IP, "--src", "1.2.3.4/40"], "not an IP prefix"),
        (["--vm", VM_IP, "--src", "2001:db8:99::/48"], "must be of one family"),
        (["--vm", VM_IP, "--proto", "icmpv6"], "use icmp"),
    ],
)
def test_bad_rules_change_nothing(policy: CoreTopology, args, needle) -> None:
    t = policy
    acl_add(t, "--vm", VM_IP, "--proto", "tcp", "--dport", str(OPEN_PORT))
    before = t.samixdp_json("acl", "list")
    err = one_line_error(t.samixdp("acl", "add", *args))
    assert needle in err
    assert t.samixdp_json("acl", "list") == before


def test_syn_flood_bans_flooder_while_established_connection_lives(
    policy: CoreTopology,
) -> None:
    t = policy
    require_tool("hping3")
    acl_add(t, "--vm", VM_IP, "--proto", "tcp", "--dport", str(OPEN_PORT))
    conn = t.lab.held_connection(t.client, VM_IP, OPEN_PORT)
    assert conn.established(), conn.reader.seen
    # 1500 SYNs at ~1000/s from a second address: well over 50/s
    t.client.run(
        "timeout", "10", "hping3", "-S", "-p", str(OPEN_PORT), "-a", FLOODER_IP,
        "-i", "u1000", "-c", "1500", VM_IP, check=False, timeout=20,
    )
    bans = t.samixdp_json("blacklist", "list")
    assert isinstance(bans, list)
    mine = [b for b in bans if b["ip"] == FLOODER_IP]
    assert mine, bans
    assert mine[0]["vm"] == VM_IP and mine[0]["expires_in_s"] > 0 and mine[0]["dropped"] > 0
    assert all(b["ip"] != CLIENT_IP for b in bans)
    rc, seen = conn.release()
    assert rc == 0, f"established connection broke during the flood: {seen}"
    stats = t.samixdp_json("stats")
    assert isinstance(stats, dict)
    assert stats["drop-syn-rate"] >= 1 and stats["drop-blacklist"] > 0
    # the ban is lifted by the operator
    res = t.samixdp("blacklist", "del", FLOODER_IP)
    assert res.returncode == 0, res.stderr
    assert all(b["ip"] != FLOODER_IP for b in t.samixdp_json("blacklist", "list"))


def test_acl_file_load_replaces_rules(policy: CoreTopology) -> None:
    t = policy
    acl_add(t, "--vm", VM_IP, "--proto", "tcp", "--dport", str(OPEN_PORT))
    ok, out = tcp_connect(t.client, VM_IP, OPEN_PORT)
    assert ok, out
    f = t.lab.run_dir / "rules.yaml"
    f.write_text(
        "default: drop\n"
        "rules:\n"
        f"  - vm: {VM_IP}\n    proto: tcp\n    dport: {CLOSED_PORT}\n    priority: 10\n"
    )
    res = t.samixdp("acl", "load", str(f))
    assert res.returncode == 0, res.stderr
    ok, out = tcp_connect(t.client, VM_IP, CLOSED_PORT)
    assert ok, out
    ok, out = tcp_connect(t.client, VM_IP, OPEN_PORT)
    assert not ok, out
    rules = t.samixdp_json("acl", "list")
    assert [r["dport"] for r in rules] == [str(CLOSED_PORT)]


