"""IPv6 in the policy layer (issue 12 items 2 and 4) through the real program
(PROG_TEST_RUN): protected IPv6 prefixes, ACL rules with IPv6 VMs and sources
(`icmpv6`, rule files), mixed-family rules refused, SYN accounting and bans per
/64, and the canonical compressed text of every address the operator sees. Each
packet's verdict is the exact reason, read by `test_datapath.run`."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np
import pytest
from test_datapath import run

from sami_xdp.base.errors import InvalidArgument
from sami_xdp.base.netutil import addr_to_ip, ip_to_addr
from sami_xdp.loader.pinned import Firewall
from sami_xdp.policy import acl, blacklist, protect, sessions, stats
from testbed import packets as P

pytestmark = pytest.mark.needs_root

NET6, NET4 = "2001:db8:1::/64", "10.1.1.0/24"
VM6, VM6B, VM4 = "2001:db8:1::10", "2001:db8:1::11", "10.1.1.1"
SRC_NET = "2001:db8:99::/48"
CLIENT6 = "2001:db8:99:1::5"  # inside SRC_NET
CLIENT6_SAME64 = "2001:db8:99:1:ffff::9"  # another address of CLIENT6's /64
CLIENT6_OTHER64 = "2001:db8:99:2::5"  # inside SRC_NET, another /64
OUTSIDER6 = "2001:db8:98::5"  # outside SRC_NET
OUTSIDER6_WORD0 = "2001:db9:99:1::5"  # outside SRC_NET in its first 32 bits only
CLIENT4 = "192.0.2.10"


@pytest.fixture
def pfw(fw: Firewall) -> Firewall:
    protect.add_protected(fw, NET6)
    protect.add_protected(fw, NET4)
    return fw


def add(fw: Firewall, **kw: object) -> int:
    return acl.add_rules(fw, [acl.make_rule(fw, **kw)])[0]  # type: ignore[arg-type]


def syn6(src: str, sport: int, dst: str = VM6, dport: int = 22) -> bytes:
    return P.tcp6(src, sport, dst, dport, P.SYN)


# ---- protected prefixes ----------------------------------------------------------------


def test_protected_prefixes_of_both_families_list_and_decide_direction(fw):
    assert str(protect.add_protected(fw, "2001:DB8:1:0::/64")) == NET6  # canonical
    protect.add_protected(fw, NET4)
    assert [str(n) for n in protect.list_protected(fw)] == [NET4, NET6]
    keys = fw.maps["protected"].keys()
    assert sorted(int(p) for p in keys["prefixlen"]) == [64, 96 + 24]  # the mapped space
    assert protect.is_protected(fw, VM6) and protect.is_protected(fw, VM4)
    assert not protect.is_protected(fw, "2001:db8:2::10")
    assert not protect.is_protected(fw, "::ffff:10.2.0.1")
    # inbound to the v6 VM needs the ACL, its outbound opens a session
    assert run(fw, syn6(CLIENT6, 1000)) == "drop-acl-default"
    assert run(fw, P.tcp6(VM6, 40000, CLIENT6, 443, P.SYN)) == "pass-outbound"
    assert protect.remove_protected(fw, NET6)
    assert not protect.remove_protected(fw, NET6)
    assert [str(n) for n in protect.list_protected(fw)] == [NET4]
    assert run(fw, syn6(CLIENT6, 1001)) == "pass-ipv6-unprotected"


def test_a_bad_prefix_is_refused(fw):
    for bad in ("2001:db8::/129", "2001:db8::g/64", "::/0", "::fffe:0:0/95", "::/8", "x"):
        with pytest.raises(InvalidArgument):
            protect.add_protected(fw, bad)
    assert protect.list_protected(fw) == []


# ---- ACL rules -------------------------------------------------------------------------


def test_acl_allow_with_an_ipv6_source_prefix(pfw):
    rid = add(pfw, vm=VM6, proto="tcp", dport="22", src=SRC_NET)
    assert run(pfw, syn6(CLIENT6, 1000)) == "pass-acl"
    assert run(pfw, syn6(CLIENT6_OTHER64, 1000)) == "pass-acl"
    assert run(pfw, syn6(OUTSIDER6, 1000)) == "drop-acl-default"
    assert run(pfw, syn6(OUTSIDER6_WORD0, 1000)) == "drop-acl-default"
    assert run(pfw, syn6(CLIENT6, 1001, dport=23)) == "drop-acl-default"
    assert acl.hits(pfw, np.array([rid])) == {rid: 2}
    rows = sessions.session_records(pfw, sessions.read_sessions(pfw))
    got = sorted((r["proto"], r["src"], r["sport"], r["dst"], r["dport"], r["state"])
                 for r in rows)
    assert got == sorted([("tcp", CLIENT6, 1000, VM6, 22, "SYN_SENT"),
                          ("tcp", CLIENT6_OTHER64, 1000, VM6, 22, "SYN_SENT")])


def test_an_ipv4_rule_never_matches_ipv6_and_the_reverse(pfw):
    add(pfw, vm=VM4, proto="tcp", dport="22")
    add(pfw, vm="10.1.1.0/24", proto="any")
    assert run(pfw, syn6(CLIENT6, 1000)) == "drop-acl-default"
    add(pfw, vm=NET6, proto="any")
    assert run(pfw, syn6(CLIENT6, 1001)) == "pass-acl"
    assert run(pfw, P.tcp(CLIENT4, 1000, VM4, 22, P.SYN)) == "pass-acl"


def test_deny_before_allow_for_an_ipv6_source(pfw):
    deny = add(pfw, vm=VM6, proto="tcp", dport="22", src="2001:db8:99:1::/64",
               action="deny", priority=10)
    allow = add(pfw, vm=VM6, proto="tcp", dport="22", src=SRC_NET, priority=20)
    assert run(pfw, syn6(CLIENT6, 1000)) == "drop-acl-deny"
    assert run(pfw, syn6(CLIENT6_SAME64, 1000)) == "drop-acl-deny"
    assert run(pfw, syn6(CLIENT6_OTHER64, 1000)) == "pass-acl"
    assert acl.hits(pfw, np.array([deny, allow])) == {deny: 2, allow: 1}


def test_a_single_source_address_rule(pfw):
    add(pfw, vm=VM6, proto="udp", dport="53", src=CLIENT6)
    assert run(pfw, P.udp6(CLIENT6, 5000, VM6, 53)) == "pass-acl"
    assert run(pfw, P.udp6(CLIENT6_SAME64, 5000, VM6, 53)) == "drop-acl-default"


def test_prefix_and_vm_rules_merge_for_ipv6(pfw):
    add(pfw, vm=NET6, proto="tcp", dport="22", priority=10)
    add(pfw, vm=VM6, proto="udp", dport="53", priority=20)
    assert run(pfw, syn6(CLIENT6, 1, VM6, 22)) == "pass-acl"
    assert run(pfw, P.udp6(CLIENT6, 1, VM6, 53)) == "pass-acl"
    assert run(pfw, syn6(CLIENT6, 2, VM6B, 22)) == "pass-acl"
    assert run(pfw, P.udp6(CLIENT6, 2, VM6B, 53)) == "drop-acl-default"  # VM6's own rule


def test_icmpv6_rule_lets_echo_in_and_its_reply_out(pfw):
    add(pfw, vm=VM6, proto="udp")
    assert run(pfw, P.icmp6_echo(CLIENT6, VM6, 9)) == "drop-acl-default"
    add(pfw, vm=VM6, proto="icmpv6")
    assert run(pfw, P.icmp6_echo(CLIENT6, VM6, 9)) == "pass-acl"
    assert run(pfw, P.icmp6_echo(VM6, CLIENT6, 9, reply=True)) == "pass-session"
    (row,) = sessions.session_records(pfw, sessions.read_sessions(pfw))
    assert (row["proto"], row["src"], row["dst"], row["sport"]) == ("icmpv6", CLIENT6, VM6, 9)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"vm": VM6, "src": "192.0.2.0/24"}, "is IPv4 but VM 2001:db8:1::10/128 is IPv6"),
    ({"vm": VM4, "src": SRC_NET}, "is IPv6 but VM 10.1.1.1/32 is IPv4"),
    ({"vm": NET6, "src": "0.0.0.0/0"}, "must be of one family"),
    ({"vm": VM6, "proto": "icmp"}, "use icmpv6"),
    ({"vm": VM4, "proto": "icmpv6"}, "use icmp"),
    ({"vm": VM6, "src": "2001:db8::/129"}, "not an IP prefix"),
    ({"vm": "2001:db8:2::10", "proto": "tcp"}, "not inside a protected prefix"),
    ({"vm": VM6, "proto": "icmpv6", "dport": "22"}, "needs --proto tcp or udp"),
], ids=["v4-src-v6-vm", "v6-src-v4-vm", "v4-any-v6-vm", "icmp-v6", "icmpv6-v4", "bad-src",
        "unprotected", "icmpv6-port"])
def test_bad_ipv6_rules_are_refused_in_one_line(pfw, kw, msg):
    with pytest.raises(acl.AclError, match=msg) as err:
        acl.make_rule(pfw, **kw)
    assert "\n" not in str(err.value)
    assert len(acl.read_rules(pfw)) == 0


def test_rules_print_in_canonical_form(pfw):
    add(pfw, vm="2001:DB8:1:0:0:0:0:10", proto="tcp", dport="22",
        src="2001:0db8:0099:0000::/48")
    add(pfw, vm=NET6, proto="icmpv6")
    add(pfw, vm=VM4, proto="udp", dport="53")
    add(pfw, vm=VM6, proto="udp", src="::/0")
    rows = [(r["vm"], r["proto"], r["src"]) for r in acl.describe(pfw, acl.read_rules(pfw))]
    assert rows == [(VM6, "tcp", SRC_NET), (NET6, "icmpv6", "::/0"), (VM4, "udp", "0.0.0.0/0"),
                    (VM6, "udp", "::/0")]
    mine = acl.describe(pfw, acl.vm_entries(pfw, VM6))
    assert [r["proto"] for r in mine] == ["tcp", "udp"]  # its own rules, not the /64's


def test_rule_files_with_ipv6_vms_and_sources(pfw, tmp_path: Path):
    toml = tmp_path / "rules.toml"
    toml.write_text(
        'default = "drop"\n'
        f'[[rules]]\nvm = "{VM6}"\nproto = "tcp"\ndport = "22"\nsrc = "{SRC_NET}"\n'
        f'[[rules]]\nvm = "{NET6}"\nproto = "icmpv6"\n'
        f'[[rules]]\nvm = "{VM4}"\nproto = "udp"\ndport = 53\n'
    )
    assert acl.load_rules(pfw, acl.parse_rule_file(pfw, toml)) == [1, 2, 3]
    assert run(pfw, syn6(CLIENT6, 1000)) == "pass-acl"
    assert run(pfw, syn6(OUTSIDER6, 1000)) == "drop-acl-default"
    assert run(pfw, P.icmp6_echo(OUTSIDER6, VM6B, 7)) == "pass-acl"
    assert run(pfw, P.udp(CLIENT4, 5, VM4, 53)) == "pass-acl"
    yaml = tmp_path / "rules.yaml"
    yaml.write_text(f"rules:\n  - vm: {VM6B}\n    proto: udp\n    src: {SRC_NET}\n"
                    f"    action: deny\n")
    acl.load_rules(pfw, acl.parse_rule_file(pfw, yaml))
    assert [(r["vm"], r["src"], r["action"]) for r in acl.describe(pfw, acl.read_rules(pfw))] \
        == [(VM6B, SRC_NET, "deny")]
    assert run(pfw, P.udp6(CLIENT6, 5, VM6B, 53)) == "drop-acl-deny"


def test_a_mixed_family_rule_file_changes_nothing(pfw, tmp_path: Path):
    rid = add(pfw, vm=VM6, proto="udp", dport="53")
    bad = tmp_path / "rules.yaml"
    bad.write_text(f"rules:\n  - vm: {VM6}\n    proto: tcp\n"
                   f"  - vm: {VM6}\n    src: 192.0.2.0/24\n")
    with pytest.raises(acl.AclError, match=r"rule 2: source 192\.0\.2\.0/24 is IPv4") as err:
        acl.load_rules(pfw, acl.parse_rule_file(pfw, bad))
    assert "\n" not in str(err.value)
    assert list(acl.read_rules(pfw)["rule"]["id"]) == [rid]
    assert run(pfw, P.udp6(CLIENT6, 1, VM6, 53)) == "pass-acl"


def test_an_ipv6_looking_number_in_yaml_is_refused_with_a_hint(pfw, tmp_path: Path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - vm: 2001:0:0:0:0:0:0:10\n")  # YAML 1.1 reads base 60
    with pytest.raises(acl.AclError, match="quote"):
        acl.parse_rule_file(pfw, bad)


def test_vm_rules_of_an_ipv6_vm_are_its_own(pfw):
    add(pfw, vm=VM6, proto="tcp", dport="22")
    add(pfw, vm=VM6B, proto="tcp", dport="80")
    add(pfw, vm=NET6, proto="icmpv6")
    snap = acl.snapshot_vm_rules(pfw, VM6)
    assert len(snap) == 1 and addr_to_ip(snap["dst_addr"][0]) == VM6
    assert int(snap["dst_prefixlen"][0]) == 128
    exported = acl.export_vm_rules(pfw, VM6)
    assert acl.delete_vm_rules(pfw, VM6) == 1
    assert run(pfw, syn6(CLIENT6, 1)) == "drop-acl-default"
    acl.replace_vm_rules(pfw, VM6, exported)
    assert run(pfw, syn6(CLIENT6, 2)) == "pass-acl"
    assert len(acl.read_rules(pfw)) == 3


# ---- SYN accounting and bans per /64 ---------------------------------------------------


def test_syn_flood_from_one_ipv6_address_bans_its_64(pfw):
    pfw.set_config(pfw.const("CFG_SYN_RATE"), 5)
    pfw.set_config(pfw.const("CFG_SYN_WINDOW_MS"), 60_000)
    add(pfw, vm=VM6, proto="tcp", dport="22")
    for i in range(5):
        assert run(pfw, syn6(CLIENT6, 1000 + i)) == "pass-acl"
    # another address of the same /64 shares the counter: the 6th SYN crosses the rate
    assert run(pfw, syn6(CLIENT6_SAME64, 2000)) == "drop-syn-rate"
    (rec,) = blacklist.blacklist_records(pfw)
    assert rec["ip"] == "2001:db8:99:1::/64" and rec["vm"] == VM6 and rec["active"]
    assert rec["scope"] == "all"
    assert run(pfw, syn6(CLIENT6, 3000)) == "drop-blacklist"
    assert run(pfw, P.udp6(CLIENT6_SAME64, 5, VM6, 53)) == "drop-blacklist"
    assert run(pfw, syn6(CLIENT6_OTHER64, 3000)) == "pass-acl"
    keys, _ = pfw.maps["syn_counters"].dump()
    assert sorted(addr_to_ip(k["src"]) for k in keys) == ["2001:db8:99:1::", "2001:db8:99:2::"]
    assert {addr_to_ip(k["dst"]) for k in keys} == {VM6}
    assert stats.verdict_packets(pfw)["drop-blacklist"] == 2


def test_manual_ban_of_an_ipv6_address_covers_its_64(pfw):
    add(pfw, vm=VM6, proto="tcp", dport="22")
    assert blacklist.ban(pfw, CLIENT6, VM6, 30) == "2001:db8:99:1::/64"
    (key,) = pfw.maps["blacklist"].dump()[0]
    assert addr_to_ip(key) == "2001:db8:99:1::"
    assert run(pfw, syn6(CLIENT6_SAME64, 1)) == "drop-blacklist"
    assert run(pfw, syn6(CLIENT6_OTHER64, 1)) == "pass-acl"
    # lifted by any address of the /64, or by the /64 as `list` prints it
    assert blacklist.unban(pfw, CLIENT6_SAME64)
    assert run(pfw, syn6(CLIENT6, 2)) == "pass-acl"
    blacklist.ban(pfw, "2001:db8:99:1::/64", None, 30)
    (rec,) = blacklist.blacklist_records(pfw)
    assert (rec["ip"], rec["vm"]) == ("2001:db8:99:1::/64", None)
    assert blacklist.unban(pfw, "2001:DB8:99:1::/64")
    assert not blacklist.unban(pfw, CLIENT6)
    assert blacklist.blacklist_records(pfw) == []


def test_a_blacklist_key_with_interface_bits_lists_as_the_address(pfw):
    """Not a key the datapath makes or matches (it bans /64s): shown as it is, never
    as the /64 it would seem to cover."""
    bl = pfw.maps["blacklist"]
    key = np.zeros(1, bl.key_dtype)
    key[0] = ip_to_addr(CLIENT6)
    value = np.zeros(1, bl.value_dtype)
    value["expires_ns"] = 2**62
    bl.update(key, value)
    (rec,) = blacklist.blacklist_records(pfw)
    assert rec["ip"] == CLIENT6
    pfw.set_bans_hint(True)
    add(pfw, vm=VM6, proto="tcp", dport="22")
    assert run(pfw, syn6(CLIENT6, 1)) == "pass-acl"


@pytest.mark.parametrize("bad", ["2001:db8:99::/48", "2001:db8:99:1::/128", "192.0.2.0/24",
                                 "192.0.2.1/64", "x", ""])
def test_a_ban_is_of_one_address_or_an_ipv6_64(pfw, bad):
    with pytest.raises(InvalidArgument):
        blacklist.ban(pfw, bad, VM6, 30)
    with pytest.raises(InvalidArgument):
        blacklist.unban(pfw, bad)
    assert blacklist.blacklist_records(pfw) == []


def test_ipv4_bans_stay_per_address_beside_ipv6_ones(pfw):
    blacklist.ban(pfw, CLIENT4, VM4, 30)
    blacklist.ban(pfw, CLIENT6, VM6, 30)
    recs = blacklist.blacklist_records(pfw)
    assert sorted((r["ip"], r["vm"]) for r in recs) == [
        (CLIENT4, VM4), ("2001:db8:99:1::/64", VM6)]
    add(pfw, vm=VM4, proto="udp")
    assert run(pfw, P.udp(CLIENT4, 1, VM4, 53)) == "drop-blacklist"
    assert run(pfw, P.udp("192.0.2.11", 1, VM4, 53)) == "pass-acl"


# ---- sessions by VM ------------------------------------------------------------------


def test_sessions_of_an_ipv6_vm_by_text_or_address(pfw):
    assert run(pfw, P.tcp6(VM6, 40000, CLIENT6, 443, P.SYN)) == "pass-outbound"
    assert run(pfw, P.tcp6(VM6B, 40000, CLIENT6, 443, P.SYN)) == "pass-outbound"
    assert run(pfw, P.tcp(VM4, 40000, CLIENT4, 443, P.SYN)) == "pass-outbound"
    table = sessions.read_sessions(pfw)
    for vm in (VM6, "2001:DB8:1:0::10", ip_to_addr(VM6), ipaddress.ip_address(VM6)):
        mine = table.select(sessions.vm_mask(table.keys, vm))
        assert [r["src"] for r in sessions.session_records(pfw, mine)] == [VM6]
    keys, _, _ = sessions.vm_sessions(pfw, ip_to_addr(VM6B))
    assert len(keys) == 1 and addr_to_ip(keys["addr_lo"][0]) == VM6B
    assert len(sessions.vm_sessions(pfw, VM4)[0]) == 1
    with pytest.raises(InvalidArgument):
        sessions.vm_mask(table.keys, "2001:db8::g")


# ---- verdict counters -------------------------------------------------------------------


def test_stats_name_the_ipv6_reasons_from_the_header(pfw):
    names = stats.reason_names(pfw.layout)
    assert names[pfw.const("REASON_PASS_IPV6_UNPROTECTED")] == "pass-ipv6-unprotected"
    assert names[pfw.const("REASON_PASS_NDP")] == "pass-ndp"
    assert len(set(names)) == len(names) == pfw.const("SAMIXDP_N_REASONS") and all(names)
    assert run(pfw, P.ndp("fe80::1", "ff02::1:ff00:10", 135, VM6)) == "pass-ndp"
    assert run(pfw, P.udp6("2001:db8:77::1", 1, "2001:db8:78::1", 2)) == "pass-ipv6-unprotected"
    assert run(pfw, P.udp("198.51.100.1", 1, "203.0.113.7", 2)) == "pass-transit"
    counts = stats.verdict_packets(pfw)
    assert (counts["pass-ndp"], counts["pass-ipv6-unprotected"], counts["pass-transit"]) \
        == (1, 1, 1)
    first_drop = pfw.const("SAMIXDP_FIRST_DROP")
    assert all(n.startswith("pass-") for n in names[:first_drop])
    assert all(n.startswith("drop-") for n in names[first_drop:])
