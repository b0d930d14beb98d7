"""SYN accounting, blacklist and ACLs through the real program (PROG_TEST_RUN)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_frame

from sami_xdp.base.netutil import ip_to_addr
from sami_xdp.policy import acl, blacklist, protect, sessions, stats
from testbed import packets as P

pytestmark = pytest.mark.needs_root

VM, VM2, CLIENT, CLIENT2 = "10.1.1.1", "10.1.1.2", "192.0.2.10", "198.51.100.7"


@pytest.fixture
def pfw(fw):
    protect.add_protected(fw, "10.1.1.0/24")
    return fw


def rule(fw, **kw):
    return acl.make_rule(fw, **kw)


def add(fw, **kw) -> int:
    return acl.add_rules(fw, [rule(fw, **kw)])[0]


def syn(src, sport, dst, dport):
    return P.tcp(src, sport, dst, dport, P.SYN)


# ---- SYN accounting and blacklist -------------------------------------------


def test_syn_rate_just_under_and_just_over(pfw):
    pfw.set_config(pfw.const("CFG_SYN_RATE"), 10)
    pfw.set_config(pfw.const("CFG_SYN_WINDOW_MS"), 60_000)  # one window for the whole test
    add(pfw, vm=VM, proto="tcp", dport="80")
    for i in range(10):
        assert run_frame(pfw, syn(CLIENT, 1000 + i, VM, 80)) == "PASS"
    assert blacklist.blacklist_records(pfw) == []
    assert run_frame(pfw, syn(CLIENT, 2000, VM, 80)) == "DROP"
    (rec,) = blacklist.blacklist_records(pfw)
    assert rec["ip"] == CLIENT and rec["vm"] == VM and rec["active"]
    assert 55 < rec["expires_in_s"] <= 60
    counts = stats.verdict_packets(pfw)
    assert counts["drop-syn-rate"] == 1 and counts["pass-acl"] == 10


def test_ban_applies_to_every_vm_and_counts_drops(pfw):
    add(pfw, vm=VM2, proto="tcp", dport="22")
    blacklist.ban(pfw, CLIENT, VM, 30)
    assert run_frame(pfw, syn(CLIENT, 1000, VM2, 22)) == "DROP"
    assert run_frame(pfw, P.udp(CLIENT, 5, VM, 53)) == "DROP"
    assert run_frame(pfw, syn(CLIENT2, 1000, VM2, 22)) == "PASS"
    (rec,) = blacklist.blacklist_records(pfw)
    assert rec["dropped"] == 2
    assert stats.verdict_packets(pfw)["drop-blacklist"] == 2


def test_ban_blocks_half_open_sessions_of_that_source(pfw):
    assert run_frame(pfw, syn(VM, 4000, CLIENT, 443)) == "PASS"
    blacklist.ban(pfw, CLIENT, VM, 30)
    assert run_frame(pfw, P.tcp(CLIENT, 443, VM, 4000, P.SYN | P.ACK)) == "DROP"


def _established(fw, key_src: str) -> None:
    """The flow's session is ESTABLISHED in the main table (the datapath's fast path)."""
    t = sessions.read_sessions(fw)
    mine = t.select(sessions.vm_mask(t.keys, key_src))
    assert len(mine) == 1 and sessions.SESSION_MAPS[int(mine.source[0])] == "sessions"
    assert int(mine.values["state"][0]) == fw.const("ST_ESTABLISHED")


@pytest.mark.parametrize("opened_by", ["vm", "client"])
def test_ban_blocks_established_sessions_of_that_source(pfw, opened_by):
    """A ban cuts the source's live sessions too, not only new ones: checked on the
    established fast path, for a flow the VM opened and one an ACL let in."""
    if opened_by == "vm":
        hs = [(VM, 4000, CLIENT, 443, P.SYN), (CLIENT, 443, VM, 4000, P.SYN | P.ACK),
              (VM, 4000, CLIENT, 443, P.ACK)]
    else:
        add(pfw, vm=VM, proto="tcp", dport="443")
        hs = [(CLIENT, 4000, VM, 443, P.SYN), (VM, 443, CLIENT, 4000, P.SYN | P.ACK),
              (CLIENT, 4000, VM, 443, P.ACK)]
    for src, sport, dst, dport, flags in hs:
        assert run_frame(pfw, P.tcp(src, sport, dst, dport, flags)) == "PASS"
    _established(pfw, CLIENT)
    c_port, v_port = (443, 4000) if opened_by == "vm" else (4000, 443)
    data = P.tcp(CLIENT, c_port, VM, v_port, P.PSH | P.ACK, b"data")
    assert run_frame(pfw, data) == "PASS"
    before = stats.verdict_packets(pfw)
    blacklist.ban(pfw, CLIENT, VM, 30)
    assert run_frame(pfw, data) == "DROP"
    after = stats.verdict_packets(pfw)
    assert after["drop-blacklist"] - before["drop-blacklist"] == 1
    (rec,) = blacklist.blacklist_records(pfw)
    assert rec["dropped"] == 1
    # the VM's own packets of that session still leave (the ban is on the source)
    assert run_frame(pfw, P.tcp(VM, v_port, CLIENT, c_port, P.PSH | P.ACK, b"x")) == "PASS"
    blacklist.unban(pfw, CLIENT)
    assert run_frame(pfw, data) == "PASS"


def test_ban_expires_in_datapath_and_gc_removes_it(pfw):
    add(pfw, vm=VM, proto="tcp", dport="80")
    bl = pfw.maps["blacklist"]
    blacklist.ban(pfw, CLIENT, VM, 30)
    key = np.zeros(1, bl.key_dtype)
    key[0] = ip_to_addr(CLIENT)
    value = bl.lookup(key)
    value["expires_ns"] = time.monotonic_ns() - 50_000_000  # ended (past a coarse-clock tick)
    bl.update(key, value)
    assert run_frame(pfw, syn(CLIENT, 1000, VM, 80)) == "PASS"
    assert blacklist.gc(pfw)["blacklist"] == 1
    assert blacklist.blacklist_records(pfw) == []


def test_syn_window_resets(pfw):
    pfw.set_config(pfw.const("CFG_SYN_RATE"), 3)
    pfw.set_config(pfw.const("CFG_SYN_WINDOW_MS"), 200)
    add(pfw, vm=VM, proto="tcp", dport="80")
    for i in range(3):
        assert run_frame(pfw, syn(CLIENT, 1000 + i, VM, 80)) == "PASS"
    time.sleep(0.25)
    for i in range(3):
        assert run_frame(pfw, syn(CLIENT, 2000 + i, VM, 80)) == "PASS"
    assert blacklist.blacklist_records(pfw) == []


def test_syn_counters_are_per_vm(pfw):
    pfw.set_config(pfw.const("CFG_SYN_RATE"), 2)
    pfw.set_config(pfw.const("CFG_SYN_WINDOW_MS"), 60_000)
    add(pfw, vm="10.1.1.0/24", proto="tcp", dport="80")
    for dst in (VM, VM2):
        for i in range(2):
            assert run_frame(pfw, syn(CLIENT, 1000 + i, dst, 80)) == "PASS"
    assert blacklist.blacklist_records(pfw) == []


# ---- flood safety --------------------------------------------------------------


def test_spoofed_syn_flood_never_evicts_established(pfw):
    add(pfw, vm=VM, proto="tcp", dport="80")
    established = []
    for i in range(50):
        sport = 20000 + i
        assert run_frame(pfw, syn(VM, sport, CLIENT, 443)) == "PASS"
        assert run_frame(pfw, P.tcp(CLIENT, 443, VM, sport, P.SYN | P.ACK)) == "PASS"
        assert run_frame(pfw, P.tcp(VM, sport, CLIENT, 443, P.ACK)) == "PASS"
        established.append(sport)
    halfopen_cap = pfw.maps["unassured"].info.max_entries
    # 2x the half-open capacity of spoofed sources, one SYN each (under the rate)
    for i in range(2 * halfopen_cap):
        src = f"100.{64 + (i >> 16) % 64}.{(i >> 8) & 255}.{i & 255}"
        run_frame(pfw, syn(src, 1024 + i % 60000, VM, 80))
    assert len(pfw.maps["unassured"].dump()[0]) <= halfopen_cap
    est = sessions.read_sessions(pfw)
    est = est.select(est.source == 0)
    assert len(est) == 50
    for sport in established:
        assert run_frame(pfw, P.tcp(CLIENT, 443, VM, sport, P.ACK | P.PSH, b"x")) == "PASS"


# ---- ACL ------------------------------------------------------------------------


def test_default_inbound_policy_is_drop(pfw):
    assert run_frame(pfw, syn(CLIENT, 1000, VM, 22)) == "DROP"
    assert stats.verdict_packets(pfw)["drop-acl-default"] == 1


def test_acl_allow_creates_session_and_replies_follow(pfw):
    add(pfw, vm=VM, proto="tcp", dport="22")
    assert run_frame(pfw, syn(CLIENT, 1000, VM, 22)) == "PASS"
    assert run_frame(pfw, P.tcp(VM, 22, CLIENT, 1000, P.SYN | P.ACK)) == "PASS"
    assert run_frame(pfw, P.tcp(CLIENT, 1000, VM, 22, P.ACK)) == "PASS"
    rows = sessions.session_records(pfw, sessions.read_sessions(pfw))
    assert [(r["src"], r["dport"], r["state"]) for r in rows] == [(CLIENT, 22, "ESTABLISHED")]
    assert run_frame(pfw, syn(CLIENT, 1001, VM, 23)) == "DROP"


def test_first_match_order_and_deny_before_allow(pfw):
    deny = add(pfw, vm=VM, proto="tcp", dport="22", src="192.0.2.0/24", action="deny",
               priority=10)
    allow = add(pfw, vm=VM, proto="tcp", dport="22", priority=20)
    assert run_frame(pfw, syn(CLIENT, 1000, VM, 22)) == "DROP"
    assert run_frame(pfw, syn(CLIENT2, 1000, VM, 22)) == "PASS"
    hits = acl.hits(pfw, np.array([deny, allow]))
    assert hits == {deny: 1, allow: 1}
    counts = stats.verdict_packets(pfw)
    assert counts["drop-acl-deny"] == 1 and counts["pass-acl"] == 1


def test_priority_not_insertion_order_decides(pfw):
    allow = add(pfw, vm=VM, proto="any", priority=50)
    deny = add(pfw, vm=VM, proto="udp", action="deny", priority=5)
    assert run_frame(pfw, P.udp(CLIENT, 5, VM, 53)) == "DROP"
    assert run_frame(pfw, syn(CLIENT, 5, VM, 53)) == "PASS"
    assert acl.hits(pfw, np.array([allow, deny])) == {allow: 1, deny: 1}


def test_port_ranges_inclusive(pfw):
    add(pfw, vm=VM, proto="udp", dport="8000-8010")
    for port, verdict in ((7999, "DROP"), (8000, "PASS"), (8010, "PASS"), (8011, "DROP")):
        assert run_frame(pfw, P.udp(CLIENT, 5, VM, port)) == verdict, port


def test_port_rule_does_not_match_icmp_but_any_rule_does(pfw):
    add(pfw, vm=VM, proto="tcp", dport="1-65535")
    assert run_frame(pfw, P.icmp_echo(CLIENT, VM, 9)) == "DROP"
    add(pfw, vm=VM, proto="icmp")
    assert run_frame(pfw, P.icmp_echo(CLIENT, VM, 9)) == "PASS"
    assert run_frame(pfw, P.icmp_echo(VM, CLIENT, 9, reply=True)) == "PASS"


def test_vlan_match(pfw):
    add(pfw, vm=VM, proto="tcp", dport="80", vlan=100)
    assert run_frame(pfw, P.tcp(CLIENT, 1, VM, 80, P.SYN, vlans=(100,))) == "PASS"
    assert run_frame(pfw, P.tcp(CLIENT, 2, VM, 80, P.SYN, vlans=(200,))) == "DROP"
    assert run_frame(pfw, P.tcp(CLIENT, 3, VM, 80, P.SYN)) == "DROP"
    assert run_frame(pfw, P.tcp(CLIENT, 4, VM, 80, P.SYN, vlans=(7, 100))) == "PASS"


@pytest.fixture
def dummy_iface():
    name = f"sxdm{os.getpid() % 100000}"
    subprocess.run(
        ["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True
    )
    try:
        yield name, socket.if_nametoindex(name)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_iface_match(pfw, dummy_iface):
    name, ifindex = dummy_iface
    add(pfw, vm=VM, proto="udp", iface=name)
    assert run_frame(pfw, P.udp(CLIENT, 5, VM, 53), ifindex=ifindex) == "PASS"
    assert run_frame(pfw, P.udp(CLIENT, 6, VM, 53), ifindex=1) == "DROP"  # lo


def test_prefix_rules_merge_with_vm_rules(pfw):
    add(pfw, vm="10.1.1.0/24", proto="tcp", dport="22", priority=10)
    add(pfw, vm=VM, proto="udp", dport="53", priority=20)
    assert run_frame(pfw, syn(CLIENT, 1, VM, 22)) == "PASS"  # prefix rule applies to VM
    assert run_frame(pfw, P.udp(CLIENT, 1, VM, 53)) == "PASS"
    assert run_frame(pfw, syn(CLIENT, 2, VM2, 22)) == "PASS"
    assert run_frame(pfw, P.udp(CLIENT, 2, VM2, 53)) == "DROP"  # VM-only rule


def test_vm_and_prefix_rules_interleave_by_priority(pfw):
    """A VM's rule set merges its own rules with the prefix rules covering it, in one
    priority order: neither kind goes first as a block."""
    add(pfw, vm="10.1.1.0/24", proto="tcp", src=f"{CLIENT2}/32", action="deny", priority=5)
    add(pfw, vm=VM, proto="tcp", dport="22", priority=10)
    add(pfw, vm=VM, proto="tcp", dport="22", src=f"{CLIENT}/32", action="deny", priority=1)
    add(pfw, vm="10.1.1.0/24", proto="tcp", priority=20)
    assert run_frame(pfw, syn(CLIENT, 1, VM, 22)) == "DROP"  # VM deny, priority 1
    assert run_frame(pfw, syn(CLIENT2, 1, VM, 22)) == "DROP"  # prefix deny, priority 5
    assert run_frame(pfw, syn("192.0.2.11", 1, VM, 22)) == "PASS"  # VM allow, priority 10
    assert run_frame(pfw, syn("192.0.2.11", 2, VM, 80)) == "PASS"  # prefix allow, 20
    counts = stats.verdict_packets(pfw)
    assert counts["drop-acl-deny"] == 2 and counts["pass-acl"] == 2


def test_delete_rule(pfw):
    rid = add(pfw, vm=VM, proto="udp")
    assert run_frame(pfw, P.udp(CLIENT, 1, VM, 53)) == "PASS"
    assert acl.delete_rules(pfw, [rid]) == 1
    assert run_frame(pfw, P.udp(CLIENT, 2, VM, 53)) == "DROP"
    assert len(acl.read_rules(pfw)) == 0


def test_reload_is_atomic_and_flips_generation(pfw, tmp_path: Path):
    add(pfw, vm=VM, proto="udp", dport="53")
    gen_before = pfw.read_config()[pfw.const("CFG_ACL_GEN")]
    f = tmp_path / "rules.toml"
    f.write_text(
        'default = "drop"\n'
        '[[rules]]\nvm = "10.1.1.1"\nproto = "tcp"\ndport = "443"\n'
        '[[rules]]\nvm = "10.1.1.2"\nproto = "udp"\ndport = 53\naction = "deny"\n'
    )
    ids = acl.load_rules(pfw, acl.parse_rule_file(pfw, f))
    assert ids == [1, 2]
    assert pfw.read_config()[pfw.const("CFG_ACL_GEN")] == gen_before ^ 1
    assert run_frame(pfw, P.udp(CLIENT, 1, VM, 53)) == "DROP"
    assert run_frame(pfw, syn(CLIENT, 1, VM, 443)) == "PASS"
    keys = pfw.maps["acl_sets"].keys()
    assert set(keys["gen"]) == {gen_before ^ 1}  # old generation removed


def test_bad_file_changes_nothing(pfw, tmp_path: Path):
    rid = add(pfw, vm=VM, proto="udp", dport="53")
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - vm: 10.1.1.1\n    proto: tcp\n    dport: 70000\n")
    with pytest.raises(acl.AclError, match="port out of range"):
        acl.load_rules(pfw, acl.parse_rule_file(pfw, bad))
    assert list(acl.read_rules(pfw)["rule"]["id"]) == [rid]
    assert run_frame(pfw, P.udp(CLIENT, 1, VM, 53)) == "PASS"


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"vm": "10.1.1.1", "src": "300.1.1.0/24"}, "not an IP prefix"),
        ({"vm": "10.1.1.1", "proto": "tcp", "dport": "70000"}, "port out of range"),
        ({"vm": "10.1.1.1", "proto": "sctp"}, "unknown protocol"),
        ({"vm": "10.9.9.9", "proto": "tcp"}, "not inside a protected prefix"),
        ({"vm": "10.1.1.1", "proto": "icmp", "dport": "22"}, "needs --proto tcp or udp"),
        ({"vm": "10.1.1.1", "vlan": 5000}, "VLAN"),
        ({"vm": "10.1.1.1", "action": "maybe"}, "unknown action"),
        ({"vm": "10.1.1.1", "iface": "nosuchif0"}, "no such interface"),
    ],
)
def test_bad_rules_rejected(pfw, kw, msg):
    with pytest.raises(acl.AclError, match=msg):
        rule(pfw, **kw)


def test_too_many_rules_for_one_vm_refused_and_nothing_changes(pfw):
    rules = [rule(pfw, vm=VM, proto="udp", dport=str(1000 + i)) for i in range(64)]
    acl.add_rules(pfw, rules)
    with pytest.raises(acl.AclError, match="at most 64"):
        acl.add_rules(pfw, [rule(pfw, vm=VM, proto="udp", dport="9")])
    assert len(acl.read_rules(pfw)) == 64
    assert run_frame(pfw, P.udp(CLIENT, 1, VM, 1063)) == "PASS"


def test_64th_rule_matches(pfw):
    rules = [rule(pfw, vm=VM, proto="udp", dport=str(1000 + i)) for i in range(64)]
    acl.add_rules(pfw, rules)
    assert run_frame(pfw, P.udp(CLIENT, 1, VM, 1063)) == "PASS"
    assert run_frame(pfw, P.udp(CLIENT, 1, VM, 1064)) == "DROP"
