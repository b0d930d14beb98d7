"""Export from host A's maps, verify and import into host B's maps (real BPF maps).

Host A is the shared `fw` fixture; host B is a second firewall compiled once
for this module in the same test bpffs, emptied per test. A's state is made
by the real program (PROG_TEST_RUN): handshakes, UDP, ICMP, an ACL-allowed
inbound SYN and a SYN flood that gets a source banned for the VM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from conftest import run_frame
from typer.testing import CliRunner

from sami_xdp.base.netutil import addr_array, addr_to_ip, addrs_to_ips, ip_to_addr, port_be
from sami_xdp.loader import batch
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import (
    ExportState,
    HostIdentity,
    ImportRecords,
    abort_import,
    build_bundle,
    import_vm_state,
    new_migration_id,
    verify_bundle,
)
from sami_xdp.migrate.bundle import encode_bundle, parse_bundle
from sami_xdp.migrate.errors import (
    AudienceError,
    BundleRefused,
    CapacityError,
    ExpiredError,
    ImportFailed,
    PoisonedRecordError,
    ReplayError,
    SignatureError,
)
from sami_xdp.migrate.select import export_vm_state
from sami_xdp.policy import acl, stats
from testbed import packets as P

pytestmark = pytest.mark.needs_root

from twohosts import (  # noqa: E402
    ATTACKER,
    CLIENT,
    LAYOUT,
    MIGRATED,
    PREFIX,
    VM,
    VM2,
    Hosts,
    expired_bundle,
    full_bundle,
    fw_a,
    fw_b,
    hosts,
    make_state_a,
    snapshot,
    vm_entries,
)

__all__ = ["fw_a", "fw_b", "hosts"]  # fixtures used by name


# ---- round trip -------------------------------------------------------------------------------


def test_round_trip_sessions_syn_blacklist_acl(fw_a, fw_b, hosts):
    make_state_a(fw_a)
    before = vm_entries(fw_a)
    assert len(before["sessions"][0]) == 1  # TCP established
    # outbound SYN, ACL-allowed inbound SYN, UDP answered once, ICMP echo
    assert len(before["unassured"][0]) == 4
    # SYNs towards the VM: the ACL-allowed client's one and the attacker's three
    assert sorted(before["syn_counters"][1]["count"].tolist()) == [1, 3]
    assert len(before["blacklist"][0]) == 1
    assert len(vm_entries(fw_a, VM2)["sessions"][0]) == 1

    data = full_bundle(fw_a, hosts)
    res = hosts.receive(fw_b, data, pickup_s=0)
    assert res.counts == {
        "sessions": 1,
        "unassured": 4,
        "syn_counters": 2,
        "blacklist": 1,
        "acl_rules": 2,
    }
    assert not res.warnings
    assert hosts.replay.seen(parse_bundle(data).migration_id, 1)  # recorded with the import
    after = vm_entries(fw_b)
    for name in ("sessions", "unassured"):
        ka, va = before[name]
        kb, vb = after[name]
        assert ka.tobytes() == kb.tobytes(), name
        for f in ("state", "initiator"):
            assert (va[f] == vb[f]).all(), (name, f)
        assert (vb["flags"] == (va["flags"] | MIGRATED)).all()
        assert (va["packets"] == vb["packets"]).all() and (va["bytes"] == vb["bytes"]).all()
        assert (vb["ifindex"] == 0).all()
        # same machine, same CLOCK_MONOTONIC: rebased times land where they were
        for f in ("created_ns", "last_seen_ns"):
            diff = vb[f].astype(np.int64) - va[f].astype(np.int64)
            assert (np.abs(diff) < 20_000_000).all(), (name, f, diff)
    (sa, sva), (sb, svb) = before["syn_counters"], after["syn_counters"]
    assert sa.tobytes() == sb.tobytes()
    assert svb["count"].tolist() == sva["count"].tolist()
    assert svb["total"].tolist() == sva["total"].tolist()
    (ba, bva), (bb, bvb) = before["blacklist"], after["blacklist"]
    assert addrs_to_ips(ba) == addrs_to_ips(bb) == [ATTACKER]
    assert abs(int(bvb["expires_ns"][0]) - int(bva["expires_ns"][0])) < 20_000_000
    assert bvb["dropped"].tolist() == bva["dropped"].tolist()
    assert len(vm_entries(fw_b, VM2)["sessions"][0]) == 0  # the other VM stayed on A

    rules_b = acl.vm_entries(fw_b, VM)
    assert [
        (
            int(r["rule"]["proto"]),
            int(r["rule"]["dport_lo"]),
            int(r["rule"]["action"]),
            int(r["priority"]),
        )
        for r in rules_b
    ] == [(6, 22, 1, 10), (17, 0, 2, 20)]
    assert len(acl.vm_entries(fw_b, VM2)) == 0


def test_imported_state_passes_traffic_on_b(fw_a, fw_b, hosts):
    """The datapath on B finds the imported entries: mid-flow TCP passes as a session
    (not a pickup), the banned source stays banned, the ACL applies."""
    make_state_a(fw_a)
    assert run_frame(fw_b, P.tcp(CLIENT, 80, VM, 40000, P.ACK)) == "DROP"  # before: unknown
    hosts.receive(fw_b, full_bundle(fw_a, hosts), pickup_s=0)
    assert run_frame(fw_b, P.tcp(CLIENT, 80, VM, 40000, P.ACK | P.PSH, b"y")) == "PASS"
    assert run_frame(fw_b, P.tcp(VM, 40000, CLIENT, 80, P.ACK)) == "PASS"
    assert run_frame(fw_b, P.tcp(CLIENT, 80, VM, 40001, P.SYN | P.ACK)) == "PASS"  # half-open
    assert run_frame(fw_b, P.udp(CLIENT, 53, VM, 5353)) == "PASS"
    assert run_frame(fw_b, P.tcp(ATTACKER, 3000, VM, 22, P.SYN)) == "DROP"  # banned
    assert run_frame(fw_b, P.tcp("192.0.2.77", 3000, VM, 22, P.SYN)) == "PASS"  # ACL allow
    assert run_frame(fw_b, P.udp("192.0.2.77", 3000, VM, 9)) == "DROP"  # ACL deny
    counts = stats.verdict_packets(fw_b)
    assert counts["pass-pickup"] == 0 and counts["pass-session"] >= 4
    assert counts["drop-blacklist"] == 1


def test_pickup_window_is_set(fw_a, fw_b, hosts):
    make_state_a(fw_a)
    t0 = time.monotonic_ns()
    res = hosts.receive(fw_b, full_bundle(fw_a, hosts, kind="final"), pickup_s=7)
    deadline = int(fw_b.maps["pickup"].lookup(addr_array([VM])))
    assert deadline == res.pickup_until_ns
    assert t0 + 7e9 <= deadline <= time.monotonic_ns() + 7e9
    # mid-flow TCP of an unknown connection of the VM is picked up inside the window
    assert run_frame(fw_b, P.tcp(CLIENT, 81, VM, 41000, P.ACK)) == "PASS"
    assert stats.verdict_packets(fw_b)["pass-pickup"] == 1
    # once the window has closed, mid-flow TCP is strict again
    key = addr_array([VM])
    fw_b.maps["pickup"].update(key, np.array([time.monotonic_ns() - 50_000_000], np.uint64))
    assert run_frame(fw_b, P.tcp(CLIENT, 82, VM, 41001, P.ACK)) == "DROP"
    assert stats.verdict_packets(fw_b)["drop-no-session"] == 1


def test_an_imported_ban_never_replaces_a_live_ban_made_here(fw_a, fw_b, hosts):
    """B's datapath already bans ATTACKER (SYNs to VM2); the VM's bundle also bans
    ATTACKER. B's own ban (host-wide, its VM, its expiry) stays as it is: a bundle
    acts on its own VM only and never narrows this host's bans."""
    make_state_a(fw_a)  # ATTACKER banned for VM on A
    fw_b.set_config(fw_b.const("CFG_SYN_RATE"), 1)
    fw_b.set_config(fw_b.const("CFG_SYN_WINDOW_MS"), 60_000)
    acl.add_rules(fw_b, [acl.make_rule(fw_b, vm=VM2, proto="tcp", dport="80")])
    run_frame(fw_b, P.tcp(ATTACKER, 1000, VM2, 80, P.SYN))
    assert run_frame(fw_b, P.tcp(ATTACKER, 1001, VM2, 80, P.SYN)) == "DROP"
    key = addr_array([ATTACKER])
    own = fw_b.maps["blacklist"].lookup(key)
    assert own is not None and addr_to_ip(own["vm"]) == VM2
    res = hosts.receive(fw_b, full_bundle(fw_a, hosts), pickup_s=0)
    assert res.skipped["local_bans"] == 1 and res.counts["blacklist"] == 0
    after = fw_b.maps["blacklist"].lookup(key)
    assert after is not None and after.tobytes() == own.tobytes()


def test_an_imported_ban_never_replaces_a_live_ban_imported_for_another_vm(fw_a, fw_b, hosts):
    """VM2's migration brought a ban of ATTACKER (for VM2 only); the VM's bundle bans
    ATTACKER too. The entry stays VM2's: one source has one ban entry, and a bundle
    acts on its own VM only."""
    make_state_a(fw_a)  # ATTACKER banned for VM on A
    key = addr_array([ATTACKER])
    value = fw_a.maps["blacklist"].lookup(key)
    fw_a.maps["blacklist"].delete(key)
    assert value is not None
    value["vm"] = ip_to_addr(VM2)
    fw_a.maps["blacklist"].update(key, value)
    hosts.receive(fw_b, build_bundle(fw_a, VM2, "host-b", 1, new_migration_id(), "full",
                                     ExportState(), identity=hosts.a), pickup_s=0)
    theirs = fw_b.maps["blacklist"].lookup(key)
    assert theirs is not None and int(theirs["flags"]) == fw_b.const("BL_F_VM_ONLY")
    value["vm"] = ip_to_addr(VM)
    fw_a.maps["blacklist"].update(key, value)
    res = hosts.receive(fw_b, full_bundle(fw_a, hosts), pickup_s=0)
    assert res.skipped["foreign_bans"] == 1 and res.counts["blacklist"] == 0
    after = fw_b.maps["blacklist"].lookup(key)
    assert after is not None and after.tobytes() == theirs.tobytes()


def test_clock_rebasing_on_another_clock(fw_a, fw_b, hosts):
    """B's CLOCK_MONOTONIC is 1000 s ahead and the bundle spent 2 s in transit:
    ages and remaining ban time are preserved relative to B's clock."""
    make_state_a(fw_a)
    before = vm_entries(fw_a)
    data = full_bundle(fw_a, hosts)
    b = parse_bundle(data)
    vb = verify_bundle(data, hosts.trust_b, "host-b", now_ms=b.issued_at_ms + 2000)
    a_now = time.monotonic_ns()  # ~ the export instant on A's clock
    shift = 1000 * 10**9
    import_vm_state(
        fw_b, vb, hosts.state_b, pickup_s=0, now_ns=a_now + shift, now_ms=b.issued_at_ms + 2000
    )
    after = vm_entries(fw_b)
    tol = 30_000_000  # 30 ms: ms truncation + the time between export and a_now
    for name in ("sessions", "unassured"):
        va, vbv = before[name][1], after[name][1]
        for f in ("created_ns", "last_seen_ns"):
            expect = va[f].astype(np.int64) + shift - 2 * 10**9
            assert (np.abs(vbv[f].astype(np.int64) - expect) < tol).all(), (name, f)
    exp_a = int(before["blacklist"][1]["expires_ns"][0])
    exp_b = int(after["blacklist"][1]["expires_ns"][0])
    assert abs(exp_b - (exp_a + shift - 2 * 10**9)) < tol
    win_a = before["syn_counters"][1]["window_start_ns"].astype(np.int64)
    win_b = after["syn_counters"][1]["window_start_ns"].astype(np.int64)
    assert (np.abs(win_b - (win_a + shift - 2 * 10**9)) < tol).all()


# ---- refusals change nothing ----------------------------------------------------------------


def _poisoned(hosts: Hosts, section: str) -> bytes:
    from sami_xdp.migrate import wire

    rec = np.zeros(2, dtype=wire.SESSION_WIRE)
    rec["addr_lo"], rec["addr_hi"] = ip_to_addr(VM), ip_to_addr(CLIENT)
    rec["port_lo"], rec["port_hi"] = port_be(22), [port_be(5000), port_be(5001)]
    rec["proto"], rec["state"] = 6, 3
    secs: dict[str, Any] = {"sessions": rec}
    if section == "sessions":
        rec["addr_lo"][1] = ip_to_addr(VM2)  # a session of another VM
    else:
        bl = np.zeros(1, dtype=wire.BLACKLIST_WIRE)
        bl["src"], bl["vm"], bl["remaining_ms"] = ip_to_addr(ATTACKER), ip_to_addr(VM2), 60_000
        secs["blacklist"] = bl  # a ban that belongs to another VM
    return encode_bundle(
        secs,
        identity=hosts.a,
        vms=[VM],
        audience="host-b",
        seq=1,
        migration_id=new_migration_id(),
        layout_version=LAYOUT,
    )


@pytest.mark.parametrize("section", ["sessions", "blacklist"])
def test_poisoned_record_refused_maps_unchanged(fw_b, hosts, section):
    run_frame(fw_b, P.tcp(VM2, 40000, CLIENT, 80, P.SYN))  # B has state of its own
    before = snapshot(fw_b)
    with pytest.raises(PoisonedRecordError):
        hosts.receive(fw_b, _poisoned(hosts, section))
    assert snapshot(fw_b) == before
    assert hosts.replay.count() == 0
    assert ImportRecords(hosts.state_b).list() == []


@pytest.mark.parametrize("kind", ["audience", "expired", "tampered", "replay", "unknown"])
def test_refusals_leave_maps_unchanged(fw_a, fw_b, hosts, kind):
    make_state_a(fw_a)
    data = full_bundle(fw_a, hosts)
    if kind == "audience":
        data = build_bundle(fw_a, VM, "host-c", 1, new_migration_id(), identity=hosts.a)
    elif kind == "expired":
        data = expired_bundle(fw_a, hosts)
    elif kind == "tampered":
        bad = bytearray(data)
        bad[300] ^= 1
        data = bytes(bad)
    elif kind == "replay":
        hosts.receive(fw_b, data)
        hosts.reopen_replay()  # the agent restarted
    elif kind == "unknown":
        data = build_bundle(
            fw_a, VM, "host-b", 1, new_migration_id(), identity=HostIdentity.generate("host-a")
        )
    before = snapshot(fw_b)
    expected = {
        "audience": AudienceError,
        "expired": ExpiredError,
        "tampered": SignatureError,
        "replay": ReplayError,
        "unknown": BundleRefused,
    }[kind]
    consumed = hosts.replay.count()
    with pytest.raises(expected):
        hosts.receive(fw_b, data)  # the real receive path: no clock passed in
    assert snapshot(fw_b) == before
    assert hosts.replay.count() == consumed, "a refused bundle must not burn a replay entry"


def test_cli_import_refuses_an_expired_bundle(fw_a, fw_b, hosts, tmp_path):
    """Expiry holds on the operator's path too: `samixdp import` (no clock of the
    caller's) refuses with one line and the refusal's exit code, and loads nothing."""
    make_state_a(fw_a)
    path = tmp_path / "old.bundle"
    path.write_bytes(expired_bundle(fw_a, hosts))
    before = snapshot(fw_b)
    proc = subprocess.run(
        [sys.executable, "-c", "from sami_xdp.cli import main; main()",
         "--config-dir", str(hosts.root / "b"), "--state-dir", str(hosts.state_b),
         "--bpffs", str(fw_b.path), "import", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 11, proc.stderr  # a refused bundle (README: exit codes)
    assert proc.stderr.startswith("samixdp: error: bundle expired")
    assert proc.stderr.count("\n") == 1
    assert snapshot(fw_b) == before
    assert hosts.replay.count() == 0


def test_capacity_refusal_writes_nothing(fw_a, fw_b, hosts):
    make_state_a(fw_a)  # 1 established session of the VM
    m = fw_b.maps["sessions"]
    cap = m.info.max_entries
    n = cap  # full
    k = np.zeros(n, m.key_dtype)
    k["addr_lo"]["w"][:, 3] = np.arange(n, dtype=np.uint32)  # distinct, all below addr_hi
    k["addr_hi"] = ip_to_addr("172.16.0.1")
    k["proto"] = 17
    v = np.zeros(n, m.value_dtype)
    v["state"] = 8
    v["last_seen_ns"] = time.monotonic_ns()
    m.update_many(k, v)
    before = snapshot(fw_b)
    with pytest.raises(CapacityError, match="sessions"):
        hosts.receive(fw_b, full_bundle(fw_a, hosts))
    assert snapshot(fw_b) == before
    assert hosts.replay.count() == 0
    assert ImportRecords(hosts.state_b).list() == []
    # one entry less on B: now it fits
    m.delete(k[:1])
    res = hosts.receive(fw_b, full_bundle(fw_a, hosts))
    assert res.counts["sessions"] == 1
    assert len(m.dump()[0]) == cap


def _preexisting_on_b(fw_b: Firewall, fw_a: Firewall) -> None:
    """B already holds one of the VM's session keys (other value), one of its SYN
    counter keys, and unrelated entries: overwritten ones must come back."""
    k, v = fw_a.maps["sessions"].dump()
    mine = (k["addr_lo"] == ip_to_addr(VM)) & (k["proto"] == 6)
    old = v[mine][:1].copy()
    old["state"] = 5
    old["packets"] = [[111, 222]]
    fw_b.maps["sessions"].update_many(k[mine][:1], old)
    sk, sv = fw_a.maps["syn_counters"].dump()
    sv2 = sv.copy()
    sv2["total"] = 999
    fw_b.maps["syn_counters"].update_many(sk, sv2)
    run_frame(fw_b, P.tcp(VM2, 40000, CLIENT, 80, P.SYN))
    run_frame(fw_b, P.udp(VM2, 1, CLIENT, 2))
    acl.add_rules(fw_b, [acl.make_rule(fw_b, vm=VM, proto="tcp", dport="8080")])


@pytest.mark.parametrize("how", ["second-call", "mid-batch", "acl"])
def test_failure_mid_load_rolls_everything_back(fw_a, fw_b, hosts, monkeypatch, how):
    make_state_a(fw_a)
    data = full_bundle(fw_a, hosts)
    _preexisting_on_b(fw_b, fw_a)
    before = snapshot(fw_b)
    real = batch.update_all
    calls = {"n": 0}

    def flaky(fd: int, keys: np.ndarray, values: np.ndarray, flags: int = 0) -> int:
        calls["n"] += 1
        if how == "second-call" and calls["n"] == 2:
            raise OSError(28, "injected failure")
        if how == "mid-batch" and calls["n"] == 1:
            real(fd, keys[: len(keys) // 2], values[: len(keys) // 2], flags)
            raise OSError(28, "injected failure after half the batch")
        return real(fd, keys, values, flags)

    monkeypatch.setattr(batch, "update_all", flaky)
    if how == "acl":  # the last step fails; its own rollback (a second call) works
        real_replace = acl.replace_rules

        def broken(fw: Firewall, entries: np.ndarray) -> None:
            calls["acl"] = calls.get("acl", 0) + 1
            if calls["acl"] == 1:
                raise RuntimeError("injected ACL failure")
            real_replace(fw, entries)

        monkeypatch.setattr(acl, "replace_rules", broken)
    with pytest.raises(ImportFailed, match="rolled back"):
        hosts.receive(fw_b, data, pickup_s=5)
    monkeypatch.undo()
    assert snapshot(fw_b) == before
    assert ImportRecords(hosts.state_b).list() == []  # a round that failed left no record
    assert not list(hosts.state_b.rglob("*.npz")) and not list(hosts.state_b.glob(".tmp/*"))
    assert hosts.replay.count() == 0
    res = hosts.receive(fw_b, data, pickup_s=5)  # the same bundle, retried, now loads
    assert res.counts["sessions"] == 1


# ---- abort and deltas ---------------------------------------------------------------------


def test_delta_rounds_apply_changes_and_deletes(fw_a, fw_b, hosts):
    make_state_a(fw_a)
    time.sleep(0.1)  # entries heard from just before a round are re-sent by the next one
    mid = new_migration_id()
    src = ExportState()
    hosts.receive(fw_b, full_bundle(fw_a, hosts, mid, 1, src), pickup_s=0)
    # A moves on: the half-open outbound SYN completes, UDP is removed, a new session
    # appears, the ban is lifted, the ACL changes
    assert run_frame(fw_a, P.tcp(CLIENT, 80, VM, 40001, P.SYN | P.ACK)) == "PASS"
    assert run_frame(fw_a, P.tcp(VM, 40001, CLIENT, 80, P.ACK)) == "PASS"
    udp = [k for k in fw_a.maps["unassured"].dump()[0] if int(k["proto"]) == 17]
    fw_a.maps["unassured"].delete(udp[0])
    assert run_frame(fw_a, P.tcp(VM, 40002, CLIENT, 443, P.SYN)) == "PASS"
    fw_a.maps["blacklist"].delete(addr_array([ATTACKER]))
    acl.add_rules(fw_a, [acl.make_rule(fw_a, vm=VM, proto="tcp", dport="443", priority=5)])
    time.sleep(0.1)

    data = build_bundle(fw_a, VM, "host-b", 2, mid, "delta", src, identity=hosts.a)
    b = parse_bundle(data)
    assert b.is_delta and b.has_acl
    c = b.counts()
    assert c["del_sessions"] == 1 and c["del_blacklist"] == 1
    assert c["sessions"] == 2  # the completed handshake and the new SYN, nothing else
    res = hosts.receive(fw_b, data, pickup_s=0)
    # the UDP flow went, the completed handshake moved to `sessions`, the ban was lifted
    assert res.deleted == {"unassured": 2, "blacklist": 1}
    # B now equals A for this VM (modulo rebased times and the migrated flag)
    a, bb = vm_entries(fw_a), vm_entries(fw_b)
    for name in ("sessions", "unassured", "syn_counters", "blacklist"):
        assert a[name][0].tobytes() == bb[name][0].tobytes(), name
    assert a["sessions"][1]["state"].tolist() == bb["sessions"][1]["state"].tolist()
    assert len(bb["unassured"][0]) == 3  # inbound SYN to :22, the new outbound SYN, ICMP
    assert [int(r["rule"]["dport_lo"]) for r in acl.vm_entries(fw_b, VM)] == [443, 22, 0]

    # an unchanged round carries nothing but the ACL digest
    quiet = build_bundle(fw_a, VM, "host-b", 3, mid, "final", src, identity=hosts.a)
    qb = parse_bundle(quiet)
    assert qb.kind == "delta+final" and not qb.has_acl
    assert sum(qb.counts().values()) == 0
    before = snapshot(fw_b)
    res = hosts.receive(fw_b, quiet, pickup_s=0)
    assert res.kind == "delta+final" and res.seq == 3
    assert sum(res.counts.values()) == 0 and sum(res.deleted.values()) == 0
    assert snapshot(fw_b) == before, "a quiet final round must change nothing"
    rounds = ImportRecords(hosts.state_b).meta(mid)["rounds"]
    assert [(r["seq"], r["status"]) for r in rounds] == [
        (1, "committed"), (2, "committed"), (3, "committed")]


def test_abort_removes_exactly_the_imported_entries(fw_a, fw_b, hosts):
    make_state_a(fw_a)
    _preexisting_on_b(fw_b, fw_a)
    before = snapshot(fw_b)
    mid = new_migration_id()
    src = ExportState()
    hosts.receive(fw_b, full_bundle(fw_a, hosts, mid, 1, src))
    run_frame(fw_a, P.tcp(VM, 40009, CLIENT, 80, P.SYN))
    hosts.receive(fw_b, build_bundle(fw_a, VM, "host-b", 2, mid, "delta", src, identity=hosts.a))
    assert snapshot(fw_b) != before
    counts = abort_import(fw_b, mid, hosts.state_b, replay=hosts.replay)
    assert counts["unassured.removed"] >= 4 and counts["sessions.restored"] >= 1
    assert snapshot(fw_b) == before  # imported gone, overwritten back, the rest untouched
    meta = ImportRecords(hosts.state_b).meta(mid)
    assert meta is not None and meta["status"] == "aborted"
    # the migration is closed: a later bundle of it is refused, also after a restart
    hosts.reopen_replay()
    with pytest.raises(ReplayError, match="aborted"):
        hosts.receive(fw_b, build_bundle(fw_a, VM, "host-b", 3, mid, "full", identity=hosts.a))
    assert snapshot(fw_b) == before
    assert abort_import(fw_b, mid, hosts.state_b) == {}  # idempotent


def test_selection_ignores_other_vms_and_expired(fw_a, hosts):
    make_state_a(fw_a)
    st = export_vm_state(fw_a, VM)
    assert len(st.sess_keys) == 5 and len(st.syn_keys) == 2 and len(st.bl_keys) == 1
    assert isinstance(st.acl, np.ndarray) and len(st.acl) == 2
    fw_a.set_config(fw_a.const("ST_UDP_REPLIED"), 0)  # UDP timeout 0 s: expired at once
    time.sleep(0.01)
    assert len(export_vm_state(fw_a, VM).sess_keys) == 4


# ---- the CLI, two hosts on one machine --------------------------------------------------------


def test_cli_keys_peers_export_inspect_import_abort(fw_a, fw_b, tmp_path):
    from sami_xdp.cli import app

    make_state_a(fw_a)
    runner = CliRunner()
    cfg = {h: tmp_path / f"cfg-{h}" for h in "ab"}
    st = {h: tmp_path / f"state-{h}" for h in "ab"}
    bpffs = {"a": fw_a.path, "b": fw_b.path}

    def run(h: str, *args: str, ok: bool = True) -> Any:
        res = runner.invoke(
            app,
            [
                "--config-dir",
                str(cfg[h]),
                "--state-dir",
                str(st[h]),
                "--bpffs",
                str(bpffs[h]),
                *args,
            ],
        )
        if ok:
            assert res.exit_code == 0, (args, res.output, res.exception)
        return res

    run("a", "keys", "init", "--host-id", "host-a")
    run("b", "keys", "init", "--host-id", "host-b")
    key_a = run("a", "keys", "show").output
    key_b = run("b", "keys", "show").output
    assert key_a.count("\n") == 1 and len(key_a.strip()) == 44  # alone on one line
    run("a", "peers", "add", "host-b", "--address", "127.0.0.1:7801", "--key", key_b.strip())
    run("b", "peers", "add", "host-a", "--address", "127.0.0.1:7800", "--key", key_a.strip(),
        "--vms", PREFIX)
    peers = json.loads(run("b", "peers", "list", "--json").output)
    assert [p["name"] for p in peers] == ["host-a"]

    out = tmp_path / "vm.bundle"
    run("a", "export", "--vm", VM, "--to", "host-b", "-o", str(out))
    assert out.stat().st_mode & 0o777 == 0o600
    for _ in range(2):  # inspecting twice: the replay cache is not consumed
        info = json.loads(run("b", "bundle", "inspect", str(out), "--json").output)
        assert info["valid"] and info["signer"] == "host-a" and info["audience"] == "host-b"
        assert info["counts"]["sessions"] == 5 and info["vm"] == VM
    assert "valid" in run("b", "bundle", "inspect", str(out)).output
    res = run("a", "bundle", "inspect", str(out), ok=False)  # A is not the audience
    assert isinstance(res.exception, BundleRefused) and "host-b" in res.output  # exit 11

    imp = json.loads(run("b", "import", str(out), "--pickup", "0", "--json").output)
    assert imp["counts"]["sessions"] == 1 and imp["counts"]["unassured"] == 4
    assert len(vm_entries(fw_b)["sessions"][0]) == 1
    again = run("b", "import", str(out), ok=False)
    assert isinstance(again.exception, ReplayError)
    res = run("b", "bundle", "inspect", str(out), ok=False)
    assert isinstance(res.exception, BundleRefused) and "replay" in res.output

    # through cli.main(): one line on stderr and the refusal's exit code
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sami_xdp.cli import main; main()",
            "--config-dir",
            str(cfg["b"]),
            "--state-dir",
            str(st["b"]),
            "--bpffs",
            str(bpffs["b"]),
            "import",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 11
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("samixdp: error: replay")

    listed = json.loads(run("b", "imports", "list", "--json").output)
    assert len(listed) == 1 and listed[0]["vm"] == VM
    run("b", "imports", "abort", listed[0]["migration_id"])
    assert all(len(k) == 0 for k, _ in vm_entries(fw_b).values())


def test_the_journal_refuses_a_round_it_committed_even_without_the_replay_cache(
    fw_a, fw_b, hosts
):
    """The import journal is the durable truth: a round it lists is never loaded
    again, whatever the replay cache says (its entry is only a mirror)."""
    make_state_a(fw_a)
    vb = verify_bundle(full_bundle(fw_a, hosts), hosts.trust_b, "host-b")
    import_vm_state(fw_b, vb, hosts.state_b, pickup_s=0)
    before = snapshot(fw_b)
    with pytest.raises(ReplayError, match="already accepted"):
        import_vm_state(fw_b, vb, hosts.state_b, pickup_s=0)
    assert snapshot(fw_b) == before
