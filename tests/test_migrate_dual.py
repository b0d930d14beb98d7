"""A VM is all its addresses: a dual-stack VM (10.1.1.1 and 2001:db8:1::10) migrates
as one bundle per round, on two real firewalls (real bcc program, real Ed25519).

A's state is made by the real program (PROG_TEST_RUN) for both families: handshakes,
UDP, ICMP and ICMPv6 echo, ACL-allowed inbound SYNs, SYN floods that ban a source
(an IPv6 one by its /64), ACL rules of both families (one with an IPv6 source
prefix). The bundle is verified and imported on B all or nothing: both addresses'
sessions, SYN counters, bans, rules and pickup windows, or none of them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from conftest import run_frame
from test_bundle import format2_bundle
from typer.testing import CliRunner

from sami_xdp.base.netutil import addr_array, addr_to_ip, addrs_to_ips
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import (
    ExportState,
    ImportRecords,
    abort_import,
    build_bundle,
    new_migration_id,
)
from sami_xdp.migrate.bundle import parse_bundle
from sami_xdp.migrate.errors import (
    BundleFormatError,
    ImportFailed,
    MigrationConflict,
    NotProtectedError,
    ReplayError,
    ScopeError,
)
from sami_xdp.policy import acl, protect, stats
from testbed import packets as P

pytestmark = pytest.mark.needs_root

from twohosts import (  # noqa: E402
    ATTACKER,
    ATTACKER6,
    ATTACKER6_BAN,
    CLIENT,
    CLIENT6,
    DUAL,
    MIGRATED,
    PREFIX,
    PREFIX6,
    VM,
    VM2,
    VM2_6,
    VM6,
    full_bundle,
    fw_a,
    fw_b,
    hosts,
    make_dual_state_a,
    snapshot,
    vm_entries,
)

__all__ = ["fw_a", "fw_b", "hosts"]  # fixtures used by name

LABEL = "10.1.1.1,2001:db8:1::10"


def rules(fw: Firewall, vm: str) -> list[tuple]:
    """A VM address's own rules as the operator sees them (ids aside)."""
    return [(r["priority"], r["action"], r["proto"], r["dport"], r["src"], r["hits"])
            for r in acl.describe(fw, acl.vm_entries(fw, vm))]


def pickup_deadline(fw: Firewall, vm: str) -> int | None:
    value = fw.maps["pickup"].lookup(addr_array([vm]))
    return None if value is None else int(value)


# ---- the whole VM, both families ------------------------------------------------------------


def test_export_import_moves_exactly_both_addresses_state(fw_a, fw_b, hosts):
    make_dual_state_a(fw_a)
    before = vm_entries(fw_a, DUAL)
    six = vm_entries(fw_a, VM6)
    # per family: TCP established; outbound SYN, ACL-allowed inbound SYN, UDP, echo
    assert len(before["sessions"][0]) == 2 and len(six["sessions"][0]) == 1
    assert len(before["unassured"][0]) == 8 and len(six["unassured"][0]) == 4
    assert sorted(six["syn_counters"][1]["count"].tolist()) == [1, 3]
    assert addrs_to_ips(six["blacklist"][0]) == [ATTACKER6_BAN]  # the flooder's /64
    assert sorted(addrs_to_ips(before["blacklist"][0])) == sorted([ATTACKER, ATTACKER6_BAN])
    assert len(vm_entries(fw_a, [VM2, VM2_6])["sessions"][0]) == 2  # another VM's
    rules_a = {vm: rules(fw_a, vm) for vm in DUAL}
    assert len(rules_a[VM]) == 2 and len(rules_a[VM6]) == 4

    data = full_bundle(fw_a, hosts, kind="final", vm=DUAL)
    b = parse_bundle(data)
    assert b.vm_ips == DUAL and b.counts()["sessions"] == 10 and b.counts()["acl"] == 6
    t0 = time.monotonic_ns()
    res = hosts.receive(fw_b, data, pickup_s=5)
    assert res.vms == DUAL and res.vm == LABEL
    assert res.counts == {"sessions": 2, "unassured": 8, "syn_counters": 4, "blacklist": 2,
                          "acl_rules": 6}
    assert not res.warnings
    after = vm_entries(fw_b, DUAL)
    for name in ("sessions", "unassured"):
        ka, va = before[name]
        kb, vb = after[name]
        assert ka.tobytes() == kb.tobytes(), name
        for f in ("state", "initiator", "packets", "bytes"):
            assert (va[f] == vb[f]).all(), (name, f)
        assert (vb["flags"] == (va["flags"] | MIGRATED)).all()
        assert (vb["tcp"]["scale"] == va["tcp"]["scale"]).all()
        for f in ("created_ns", "last_seen_ns"):  # one machine, one CLOCK_MONOTONIC
            diff = vb[f].astype(np.int64) - va[f].astype(np.int64)
            assert (np.abs(diff) < 20_000_000).all(), (name, f, diff)
    for name in ("syn_counters", "blacklist"):
        assert before[name][0].tobytes() == after[name][0].tobytes(), name
    assert after["syn_counters"][1]["count"].tolist() == before["syn_counters"][1]["count"].tolist()
    assert after["blacklist"][1]["dropped"].tolist() == before["blacklist"][1]["dropped"].tolist()
    assert [addr_to_ip(v) for v in after["blacklist"][1]["vm"]] == [
        addr_to_ip(v) for v in before["blacklist"][1]["vm"]]
    assert {vm: rules(fw_b, vm) for vm in DUAL} == rules_a  # hit counters too
    for vm in DUAL:  # a pickup window for each address, the same one
        assert pickup_deadline(fw_b, vm) == res.pickup_until_ns
    assert t0 < res.pickup_until_ns <= time.monotonic_ns() + 5 * 10**9
    # nothing of the other VM travelled
    assert all(len(k) == 0 for k, _ in vm_entries(fw_b, [VM2, VM2_6]).values())
    assert len(acl.vm_entries(fw_b, VM2)) == len(acl.vm_entries(fw_b, VM2_6)) == 0
    assert pickup_deadline(fw_b, VM2) is None and pickup_deadline(fw_b, VM2_6) is None


def test_bs_datapath_carries_both_families_after_the_import(fw_a, fw_b, hosts):
    """B finds the imported entries: mid-flow TCP of both families passes as a session
    (not a pickup), the banned IPv6 /64 stays banned towards the VM (another address
    of it too), the IPv6 rules (source prefix, ICMPv6) apply."""
    make_dual_state_a(fw_a)
    assert run_frame(fw_b, P.tcp6(CLIENT6, 80, VM6, 40000, P.ACK)) == "DROP"  # unknown yet
    hosts.receive(fw_b, full_bundle(fw_a, hosts, vm=DUAL), pickup_s=0)
    assert run_frame(fw_b, P.tcp(CLIENT, 80, VM, 40000, P.ACK | P.PSH, b"y")) == "PASS"
    assert run_frame(fw_b, P.tcp6(CLIENT6, 80, VM6, 40000, P.ACK | P.PSH, b"y")) == "PASS"
    assert run_frame(fw_b, P.tcp6(VM6, 40000, CLIENT6, 80, P.ACK)) == "PASS"
    assert run_frame(fw_b, P.tcp6(CLIENT6, 80, VM6, 40001, P.SYN | P.ACK)) == "PASS"  # half-open
    assert run_frame(fw_b, P.udp6(CLIENT6, 53, VM6, 5353)) == "PASS"
    assert run_frame(fw_b, P.icmp6_echo(CLIENT6, VM6, 7, reply=True)) == "PASS"
    assert run_frame(fw_b, P.tcp6(ATTACKER6, 3000, VM6, 22, P.SYN)) == "DROP"  # banned
    assert run_frame(fw_b, P.tcp6("2001:db8:66::99", 3000, VM6, 22, P.SYN)) == "DROP"  # its /64
    assert run_frame(fw_b, P.tcp(ATTACKER, 3000, VM, 22, P.SYN)) == "DROP"  # banned
    assert run_frame(fw_b, P.tcp6("2001:db8:77::1", 3000, VM6, 22, P.SYN)) == "PASS"  # ACL
    assert run_frame(fw_b, P.tcp6("2001:db8:99:5::1", 3000, VM6, 443, P.SYN)) == "PASS"  # src
    assert run_frame(fw_b, P.tcp6("2001:db8:77::1", 3001, VM6, 443, P.SYN)) == "DROP"
    assert run_frame(fw_b, P.udp6("2001:db8:77::1", 3000, VM6, 9)) == "DROP"  # ACL deny
    assert run_frame(fw_b, P.icmp6_echo("2001:db8:77::1", VM6, 9)) == "PASS"  # icmpv6 rule
    counts = stats.verdict_packets(fw_b)
    assert counts["pass-pickup"] == 0 and counts["pass-session"] >= 6
    assert counts["drop-blacklist"] == 3


def test_a_ban_of_an_ipv6_64_travels_for_its_vm_only(fw_a, fw_b, hosts):
    """The /64 banned for the VM's IPv6 address still reaches another VM of B."""
    make_dual_state_a(fw_a)
    acl.add_rules(fw_b, [acl.make_rule(fw_b, vm=VM2_6, proto="tcp", dport="80")])
    hosts.receive(fw_b, full_bundle(fw_a, hosts, vm=DUAL), pickup_s=0)
    assert run_frame(fw_b, P.tcp6(ATTACKER6, 4000, VM6, 80, P.SYN)) == "DROP"
    assert run_frame(fw_b, P.tcp6(ATTACKER6, 4001, VM2_6, 80, P.SYN)) == "PASS"


# ---- all addresses or none -------------------------------------------------------------------


@pytest.mark.parametrize("order", [DUAL, DUAL[::-1]], ids=["4,6", "6,4"])
def test_one_address_outside_the_peers_scope_refuses_everything(fw_a, fw_b, hosts, order):
    """B trusts A for the VM's IPv4 prefix only: the dual-stack bundle is refused in one
    line naming the IPv6 address, and nothing of either address is loaded."""
    make_dual_state_a(fw_a)
    hosts.set_scope("host-a", PREFIX)
    run_frame(fw_b, P.tcp(VM2, 40000, CLIENT, 80, P.SYN))  # B has state of its own
    before = snapshot(fw_b)
    data = full_bundle(fw_a, hosts, kind="final", vm=order)
    with pytest.raises(ScopeError) as exc:
        hosts.receive(fw_b, data, pickup_s=5)
    assert str(exc.value) == (
        f"bundle for VM {VM6} is outside the scope of peer host-a (vms: {PREFIX})")
    assert snapshot(fw_b) == before
    assert hosts.replay.count() == 0 and ImportRecords(hosts.state_b).list() == []
    # the refusal was the scope and nothing else: the IPv4 address alone loads
    res = hosts.receive(fw_b, full_bundle(fw_a, hosts, vm=VM), pickup_s=0)
    assert res.counts["sessions"] == 1 and res.vms == [VM]


def test_one_address_outside_this_hosts_prefixes_refuses_everything(fw_a, fw_b, hosts):
    make_dual_state_a(fw_a)
    protect.remove_protected(fw_b, PREFIX6)
    before = snapshot(fw_b)
    with pytest.raises(NotProtectedError, match=f"VM {VM6} is not in a protected prefix"):
        hosts.receive(fw_b, full_bundle(fw_a, hosts, vm=DUAL))
    assert snapshot(fw_b) == before and hosts.replay.count() == 0


def _preexisting_on_b(fw_a: Firewall, fw_b: Firewall) -> None:
    """B holds rules of both addresses (replaced by the import), a pickup window of the
    IPv6 address, one of the VM's IPv6 session keys (another value), and entries of
    another VM: overwritten ones must come back byte for byte."""
    acl.add_rules(fw_b, [acl.make_rule(fw_b, vm=VM, proto="tcp", dport="8080"),
                         acl.make_rule(fw_b, vm=VM6, proto="udp", dport="9000"),
                         acl.make_rule(fw_b, vm=VM2_6, proto="tcp", dport="80")])
    fw_b.maps["pickup"].update(addr_array([VM6]), np.array([12345], np.uint64))
    k, v = fw_a.maps["sessions"].dump()
    mine = k["addr_lo"] == addr_array([VM6])[0]
    old = v[mine][:1].copy()
    old["state"], old["packets"] = 5, [[111, 222]]
    fw_b.maps["sessions"].update_many(k[mine][:1], old)
    run_frame(fw_b, P.tcp6(VM2_6, 40000, CLIENT6, 80, P.SYN))


@pytest.mark.parametrize("how", ["acl-second-address", "pickup", "syn-write"])
def test_a_failure_mid_load_rolls_back_both_addresses(fw_a, fw_b, hosts, monkeypatch, how):
    """The IPv4 address's rules are installed when the IPv6 address's fail (or the
    pickup windows, or an earlier map write): everything of both goes back."""
    make_dual_state_a(fw_a)
    data = full_bundle(fw_a, hosts, kind="final", vm=DUAL)
    _preexisting_on_b(fw_a, fw_b)
    before = snapshot(fw_b)
    calls = {"n": 0}
    if how == "acl-second-address":
        real_replace = acl.replace_rules

        def broken(fw: Firewall, entries: np.ndarray) -> None:
            calls["n"] += 1
            if calls["n"] == 2:  # the second address's reload
                raise RuntimeError("injected ACL failure")
            real_replace(fw, entries)

        monkeypatch.setattr(acl, "replace_rules", broken)
    else:
        name = "pickup" if how == "pickup" else "syn_counters"
        m = fw_b.maps[name]
        cls = type(m)
        real_update, real_many = cls.update, cls.update_many

        def flaky_update(self: Any, key: np.ndarray, value: np.ndarray, flags: int = 0) -> None:
            if self.name == name:
                calls["n"] += 1
                if calls["n"] == 2:  # the second address's window
                    raise OSError(28, "injected failure")
            real_update(self, key, value, flags)

        def flaky_many(self: Any, keys: np.ndarray, values: np.ndarray, flags: int = 0) -> int:
            if self.name == name and not calls.get("many"):
                calls["many"] = 1
                raise OSError(28, "injected failure")
            return real_many(self, keys, values, flags)

        monkeypatch.setattr(cls, "update", flaky_update)
        monkeypatch.setattr(cls, "update_many", flaky_many)
    with pytest.raises(ImportFailed, match="rolled back"):
        hosts.receive(fw_b, data, pickup_s=5)
    monkeypatch.undo()
    assert snapshot(fw_b) == before
    assert ImportRecords(hosts.state_b).list() == [] and hosts.replay.count() == 0
    res = hosts.receive(fw_b, data, pickup_s=5)  # the same bundle, retried, loads whole
    assert res.counts["acl_rules"] == 6 and res.counts["sessions"] == 2


def test_abort_removes_both_addresses_and_restores_what_was_overwritten(fw_a, fw_b, hosts):
    make_dual_state_a(fw_a)
    _preexisting_on_b(fw_a, fw_b)
    before = snapshot(fw_b)
    rules_before = {vm: rules(fw_b, vm) for vm in DUAL}
    mid = new_migration_id()
    src = ExportState()
    hosts.receive(fw_b, full_bundle(fw_a, hosts, mid, 1, src, vm=DUAL), pickup_s=5)
    run_frame(fw_a, P.tcp6(VM6, 40009, CLIENT6, 80, P.SYN))
    final = build_bundle(fw_a, DUAL, "host-b", 2, mid, "final", src, identity=hosts.a)
    res = hosts.receive(fw_b, final, pickup_s=5)
    assert res.counts["unassured"] >= 1 and pickup_deadline(fw_b, VM) == res.pickup_until_ns
    assert snapshot(fw_b) != before
    counts = abort_import(fw_b, mid, hosts.state_b, replay=hosts.replay)
    assert counts["unassured.removed"] >= 8 and counts["sessions.restored"] >= 1
    assert snapshot(fw_b) == before  # both addresses' entries gone, overwritten ones back
    assert {vm: rules(fw_b, vm) for vm in DUAL} == rules_before
    assert pickup_deadline(fw_b, VM6) == 12345 and pickup_deadline(fw_b, VM) is None
    meta = ImportRecords(hosts.state_b).meta(mid)
    assert meta is not None and meta["status"] == "aborted" and meta["vms"] == DUAL


def test_delta_rounds_of_the_dual_stack_vm(fw_a, fw_b, hosts):
    """Changes of either address travel in the one delta of the round; B ends equal to
    A for both addresses."""
    make_dual_state_a(fw_a)
    time.sleep(0.1)
    mid = new_migration_id()
    src = ExportState()
    hosts.receive(fw_b, full_bundle(fw_a, hosts, mid, 1, src, vm=DUAL), pickup_s=0)
    # IPv6: the half-open SYN completes, UDP goes, a new SYN, the /64's ban is lifted,
    # a rule is added; IPv4: a new SYN
    assert run_frame(fw_a, P.tcp6(CLIENT6, 80, VM6, 40001, P.SYN | P.ACK)) == "PASS"
    assert run_frame(fw_a, P.tcp6(VM6, 40001, CLIENT6, 80, P.ACK)) == "PASS"
    udp6 = [k for k in fw_a.maps["unassured"].dump()[0]
            if int(k["proto"]) == 17 and addr_to_ip(k["addr_lo"]) == VM6]
    fw_a.maps["unassured"].delete(udp6[0])
    assert run_frame(fw_a, P.tcp6(VM6, 40002, CLIENT6, 443, P.SYN)) == "PASS"
    assert run_frame(fw_a, P.tcp(VM, 40002, CLIENT, 443, P.SYN)) == "PASS"
    fw_a.maps["blacklist"].delete(addr_array([ATTACKER6_BAN]))
    acl.add_rules(fw_a, [acl.make_rule(fw_a, vm=VM6, proto="tcp", dport="8443", priority=1)])
    time.sleep(0.1)
    data = build_bundle(fw_a, DUAL, "host-b", 2, mid, "delta", src, identity=hosts.a)
    c = parse_bundle(data).counts()
    assert c["sessions"] == 3 and c["del_sessions"] == 1 and c["del_blacklist"] == 1
    res = hosts.receive(fw_b, data, pickup_s=0)
    assert res.deleted == {"unassured": 2, "blacklist": 1}
    a, bb = vm_entries(fw_a, DUAL), vm_entries(fw_b, DUAL)
    for name in ("sessions", "unassured", "syn_counters", "blacklist"):
        assert a[name][0].tobytes() == bb[name][0].tobytes(), name
    assert [r[3] for r in rules(fw_b, VM6)] == ["8443", "443", "22", "any", "any"]
    # a round naming another set of addresses belongs to another migration: the
    # source refuses to cut it from this one's rounds, the destination to load it
    with pytest.raises(ValueError, match="another VM"):
        build_bundle(fw_a, [VM6], "host-b", 3, mid, "delta", src, identity=hosts.a)
    other = build_bundle(fw_a, [VM6], "host-b", 3, mid, "full", ExportState(),
                         identity=hosts.a)
    before = snapshot(fw_b)
    with pytest.raises(MigrationConflict, match=f"was for VM {LABEL}, not {VM6}"):
        hosts.receive(fw_b, other)
    assert snapshot(fw_b) == before


# ---- the operator's path --------------------------------------------------------------------


def test_cli_export_inspect_import_of_the_dual_stack_vm(fw_a, fw_b, hosts, tmp_path):
    from sami_xdp.cli import app

    make_dual_state_a(fw_a)
    runner = CliRunner()

    def run(cfg: str, bpffs: Firewall, state: str, *args: str, ok: bool = True) -> Any:
        res = runner.invoke(app, ["--config-dir", str(hosts.root / cfg), "--state-dir",
                                  str(tmp_path / state), "--bpffs", str(bpffs.path), *args])
        if ok:
            assert res.exit_code == 0, (args, res.output, res.exception)
        return res

    out = tmp_path / "vm.bundle"
    exp = json.loads(run("a", fw_a, "a-state", "export", "--vm", VM, "--vm",
                         "2001:DB8:1:0::10", "--to", "host-b", "-o", str(out), "--json").output)
    assert exp["vms"] == DUAL and exp["vm"] == LABEL and exp["counts"]["sessions"] == 10
    text = run("b", fw_b, "b-state", "bundle", "inspect", str(out), "--records").output
    assert f"vm {LABEL}" in text
    assert f"sessions: tcp [{VM6}]:40000 -> [{CLIENT6}]:80 ESTABLISHED" in text
    assert f"blacklist: src {ATTACKER6_BAN}/64 vm {VM6}" in text
    assert f"acl: vm {VM6} priority 5 allow tcp dport 443 src 2001:db8:99::/48" in text
    info = json.loads(run("b", fw_b, "b-state", "bundle", "inspect", str(out), "--records",
                          "--json").output)
    assert info["valid"] and info["vms"] == DUAL
    assert {r["src"] for r in info["records"]["syn"]} >= {"2001:db8:99::/64",
                                                         "2001:db8:66::/64"}
    imp = json.loads(run("b", fw_b, "b-state", "import", str(out), "--pickup", "5",
                         "--json").output)
    assert imp["vms"] == DUAL and imp["counts"]["acl_rules"] == 6
    for vm in DUAL:
        assert pickup_deadline(fw_b, vm) == imp["pickup_until_ns"]
    listed = json.loads(run("b", fw_b, "b-state", "imports", "list", "--json").output)
    assert listed[0]["vm"] == LABEL and listed[0]["vms"] == DUAL
    table = run("b", fw_b, "b-state", "imports", "list").output
    assert LABEL in table
    # a VM address given twice is a typo: one line, nothing written
    res = run("a", fw_a, "a-state", "export", "--vm", VM, "--vm", "::ffff:10.1.1.1", "--to",
              "host-b", "-o", str(tmp_path / "x.bundle"), ok=False)
    assert res.exit_code != 0 and "VM address 10.1.1.1 is given twice" in str(res.exception)
    assert not (tmp_path / "x.bundle").exists()
    run("b", fw_b, "b-state", "imports", "abort", listed[0]["migration_id"])
    assert all(len(k) == 0 for k, _ in vm_entries(fw_b, DUAL).values())
    assert pickup_deadline(fw_b, VM) is None and pickup_deadline(fw_b, VM6) is None


def test_cli_import_refuses_an_older_format_in_one_line(fw_b, hosts, tmp_path):
    path = tmp_path / "old.bundle"
    path.write_bytes(format2_bundle(hosts.a))
    before = snapshot(fw_b)
    proc = subprocess.run(
        [sys.executable, "-c", "from sami_xdp.cli import main; main()",
         "--config-dir", str(hosts.root / "b"), "--state-dir", str(hosts.state_b),
         "--bpffs", str(fw_b.path), "import", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 11, proc.stderr  # a refused bundle
    assert proc.stderr == (
        "samixdp: error: bundle format 2 is not supported (this build reads 3)\n")
    assert snapshot(fw_b) == before and hosts.replay.count() == 0
    with pytest.raises(BundleFormatError):
        hosts.receive(fw_b, path.read_bytes())


def test_a_replayed_dual_bundle_is_refused(fw_a, fw_b, hosts):
    make_dual_state_a(fw_a)
    data = full_bundle(fw_a, hosts, vm=DUAL)
    hosts.receive(fw_b, data, pickup_s=0)
    before = snapshot(fw_b)
    with pytest.raises(ReplayError):
        hosts.receive(fw_b, data, pickup_s=0)
    assert snapshot(fw_b) == before
