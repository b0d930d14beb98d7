"""The dirty-state log (migrate/dirty.py, the datapath's track_session()): real
packets through the real programs (PROG_TEST_RUN, XDP and TC), then the log read
back as a migration's delta round reads it."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from conftest import PROGRAM_KINDS, fresh_firewall
from test_datapath import CLIENT, NET, TCP, VM, VM2, handshake, key_of, run

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import dirty as dirty_mod
from sami_xdp.migrate.dirty import DirtyLog, TrackGroup, bloom_bits, reap_stale
from sami_xdp.migrate.errors import MigrateError
from sami_xdp.migrate.vmset import VmAddrs
from sami_xdp.policy import acl, protect
from testbed import packets as P

pytestmark = pytest.mark.needs_root


@pytest.fixture(params=PROGRAM_KINDS)
def fw(request: pytest.FixtureRequest, firewall: Firewall) -> Firewall:
    return fresh_firewall(firewall, request.param)


@pytest.fixture
def pfw(fw: Firewall):
    protect.add_protected(fw, NET)
    yield fw
    keys, _ = fw.maps["tracking"].dump()  # a failed test must not leave tracking on
    if len(keys):
        fw.maps["tracking"].delete_many(keys)
    fw.maps["track"].update(np.zeros(1, np.uint32), np.zeros(1, fw.maps["track"].value_dtype))


def head(fw: Firewall, log: DirtyLog) -> int:
    return int(fw.maps["dirty_head"].lookup(np.array([log.slot], np.uint32)))


def keyset(keys: np.ndarray) -> set[bytes]:
    return {k.tobytes() for k in keys}


def test_untracked_sessions_log_nothing(pfw):
    before = fw_heads(pfw)
    flow = handshake(pfw)
    assert run(pfw, flow.data("a", b"x")) == "pass-session"
    assert fw_heads(pfw) == before
    row = pfw.maps["sessions"].lookup(key_of(pfw, TCP, VM, 40000, CLIENT, 80))
    assert row is not None and int(row["dirty_round"]) == 0
    assert int(pfw.maps["track"].lookup(np.zeros(1, np.uint32))["active"]) == 0


def fw_heads(fw: Firewall) -> list[int]:
    n = fw.const("SAMIXDP_TRACK_SLOTS")
    return [int(fw.maps["dirty_head"].lookup(np.array([i], np.uint32))) for i in range(n)]


def test_a_tracked_vm_logs_each_touched_session_once_per_round(pfw):
    mine = handshake(pfw, vport=40001)
    other = handshake(pfw, vm=VM2, vport=40002)
    idle = handshake(pfw, vport=40003)
    log = DirtyLog.start(pfw, VmAddrs.parse(VM))
    try:
        state = pfw.maps["track"].lookup(np.zeros(1, np.uint32))
        assert int(state["active"]) == 1
        word, bit = bloom_bits(VmAddrs.parse(VM).addrs, pfw.const("TRACK_BLOOM_WORDS"))
        assert int(state["bloom"][int(word[0])]) >> int(bit[0]) & 1
        start = head(pfw, log)
        for _ in range(3):  # three packets of one session: logged once
            assert run(pfw, mine.data("a", b"x")) == "pass-session"
        assert run(pfw, other.data("a", b"y")) == "pass-session"  # another VM: not logged
        assert head(pfw, log) == start + 1
        syn = P.TcpFlow(VM, 40004, CLIENT, 80).syn()  # created while tracked: logged
        assert run(pfw, syn) == "pass-outbound"
        got = log.cut()
        assert got is not None
        assert keyset(got) == keyset(np.concatenate([
            key_of(pfw, TCP, VM, 40001, CLIENT, 80), key_of(pfw, TCP, VM, 40004, CLIENT, 80)]))
        assert run(pfw, idle.data("a", b"z")) == "pass-session"  # next round: only this one
        assert run(pfw, mine.data("a", b"x")) == "pass-session"  # logged again: a new round
        got = log.cut()
        assert got is not None
        assert keyset(got) == keyset(np.concatenate([
            key_of(pfw, TCP, VM, 40003, CLIENT, 80), key_of(pfw, TCP, VM, 40001, CLIENT, 80)]))
        assert log.cut() is not None and len(log.cut()) == 0  # nothing since
    finally:
        log.stop()
    assert len(pfw.maps["tracking"].dump()[0]) == 0
    assert int(pfw.maps["track"].lookup(np.zeros(1, np.uint32))["active"]) == 0


def test_a_wrapped_ring_asks_for_a_scan(pfw):
    log = DirtyLog.start(pfw, VmAddrs.parse(VM))
    try:
        size = pfw.const("SAMIXDP_DIRTY_LOG")
        pfw.maps["dirty_head"].update(np.array([log.slot], np.uint32),
                                      np.array([log.cursor + size + 1], np.uint64))
        assert log.cut() is None and log.overflows == 1
        flow = handshake(pfw, vport=40005)  # the log goes on after the overflow
        got = log.cut()
        assert got is not None and keyset(got) == keyset(key_of(pfw, TCP, VM, 40005, CLIENT, 80))
        del flow
    finally:
        log.stop()


def test_one_vm_is_tracked_once_and_a_dead_owner_is_taken_back(pfw):
    vm = VmAddrs.parse(VM)
    log = DirtyLog.start(pfw, vm)
    try:
        with pytest.raises(MigrateError, match="already being migrated"):
            DirtyLog.start(pfw, vm)
    finally:
        log.stop()
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    tracking = pfw.maps["tracking"]
    stale = np.zeros(1, dtype=tracking.value_dtype)
    stale["round"], stale["slot"], stale["owner"] = 7, 0, proc.pid
    tracking.update(vm.addrs[0:1], stale)
    log = DirtyLog.start(pfw, vm)  # the crashed migration's entry is reclaimed
    try:
        row = tracking.lookup(vm.addrs[0:1])
        assert row is not None and int(row["owner"]) == os.getpid()
    finally:
        log.stop()


def test_a_change_during_the_cut_is_read_again_next_round(pfw, monkeypatch):
    """A packet between the round's move and the log's read is logged in the new
    round: it is read now, and again at the next cut (a later packet of that round
    logs nothing, so dropping it now would lose that packet's change)."""
    flow = handshake(pfw, vport=40006)
    log = DirtyLog.start(pfw, VmAddrs.parse(VM))
    sent = []

    def packet_while_settling(_s: float) -> None:
        if not sent:
            sent.append(run(pfw, flow.data("a", b"racing")))

    try:
        monkeypatch.setattr(dirty_mod.time, "sleep", packet_while_settling)
        first = log.cut()
        monkeypatch.undo()
        assert sent == ["pass-session"]
        want = keyset(key_of(pfw, TCP, VM, 40006, CLIENT, 80))
        assert first is not None and keyset(first) == want
        assert run(pfw, flow.data("a", b"later")) == "pass-session"  # same round: unlogged
        again = log.cut()
        assert again is not None and keyset(again) == want
    finally:
        log.stop()


def test_a_group_hands_each_vm_its_sessions_and_a_shared_one_to_both(pfw):
    """Migrations of one process share a slot and a round: a session between two
    of their VMs (the datapath logs it under one end's entry) reaches both, and a
    member's keys wait for its own cut when another member cut first."""
    group = TrackGroup(pfw)
    a = group.join(VmAddrs.parse(VM))
    b = group.join(VmAddrs.parse(VM2))
    try:
        assert a.slot == b.slot
        with pytest.raises(MigrateError, match="already being migrated"):
            group.join(VmAddrs.parse(VM))
        handshake(pfw, vport=41001)
        theirs = handshake(pfw, vm=VM2, vport=41002)
        acl.add_rules(pfw, [acl.make_rule(pfw, vm=VM2, proto="tcp", dport=22)])
        east_west = P.TcpFlow(VM, 41003, VM2, 22)  # VM to VM: VM2's ACL admits it
        assert run(pfw, east_west.syn()) == "pass-acl"
        assert run(pfw, east_west.synack()) == "pass-session"
        shared = key_of(pfw, TCP, VM, 41003, VM2, 22)
        got = a.cut()
        assert got is not None
        assert keyset(got) == keyset(np.concatenate([key_of(pfw, TCP, VM, 41001, CLIENT, 80),
                                                     shared]))
        assert run(pfw, theirs.data("a", b"x")) == "pass-session"  # after a's cut: logged
        got = b.cut()
        assert got is not None
        assert keyset(got) == keyset(np.concatenate([key_of(pfw, TCP, VM2, 41002, CLIENT, 80),
                                                     shared]))
        got = b.cut()
        assert got is not None and len(got) == 0
    finally:
        a.stop()
        b.stop()
    assert len(pfw.maps["tracking"].keys()) == 0
    assert int(pfw.maps["track"].lookup(np.zeros(1, np.uint32))["active"]) == 0


def test_a_wrapped_ring_sends_every_member_of_the_group_to_a_scan(pfw):
    group = TrackGroup(pfw)
    a = group.join(VmAddrs.parse(VM))
    b = group.join(VmAddrs.parse(VM2))
    try:
        size = pfw.const("SAMIXDP_DIRTY_LOG")
        pfw.maps["dirty_head"].update(np.array([a.slot], np.uint32),
                                      np.array([a.cursor + size + 1], np.uint64))
        assert a.cut() is None
        assert b.cut() is None and b.overflows == 1
        got = b.cut()
        assert got is not None and len(got) == 0
    finally:
        a.stop()
        b.stop()


def test_a_killed_migration_stops_being_logged_when_reaped(pfw):
    """kill -9 of a migration leaves its tracking entries: `reap_stale` (the agent
    runs it) takes them back, and the datapath stops logging the VM."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    tracking = pfw.maps["tracking"]
    stale = np.zeros(1, dtype=tracking.value_dtype)
    stale["round"], stale["slot"], stale["owner"] = 7, 0, proc.pid
    tracking.update(VmAddrs.parse(VM).addrs[0:1], stale)
    dirty_mod._publish(pfw)
    assert int(pfw.maps["track"].lookup(np.zeros(1, np.uint32))["active"]) == 1
    assert reap_stale(pfw) == 1
    assert int(pfw.maps["track"].lookup(np.zeros(1, np.uint32))["active"]) == 0
    before = fw_heads(pfw)
    handshake(pfw, vport=41010)
    assert fw_heads(pfw) == before
    assert reap_stale(pfw) == 0
