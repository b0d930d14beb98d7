"""A trusted peer may touch only its own VMs (per-peer scope), and everything a
bundle does stays with its VM: the attacks of the control-plane issue, on two real
pinned firewalls.

B protects 10.1.1.0/24 and 2001:db8:1::/64 and trusts A for them; B also trusts C,
but for 10.2.0.0/24 only. C signs perfectly valid bundles about B's dual-stack VM
(10.1.1.1 and 2001:db8:1::10), of either address or both."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from conftest import run_frame
from twohosts import (
    ATTACKER,
    ATTACKER6,
    ATTACKER6_BAN,
    CLIENT,
    CLIENT6,
    DUAL,
    LAYOUT,
    PREFIX,
    PREFIX6,
    VM,
    VM2,
    VM2_6,
    VM6,
    Hosts,
    full_bundle,
    fw_a,
    fw_b,
    hosts,
    make_state_a,
    snapshot,
)

from sami_xdp.base.errors import InvalidArgument
from sami_xdp.base.netutil import addr_array, addr_to_ip, ip_to_addr, port_be
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import (
    ExportState,
    ImportRecords,
    abort_import,
    build_bundle,
    new_migration_id,
    wire,
)
from sami_xdp.migrate.bundle import FLAG_DELTA, FLAG_FINAL, encode_bundle
from sami_xdp.migrate.errors import (
    ControlError,
    MigrationConflict,
    NotProtectedError,
    ReplayError,
    ScopeError,
)
from sami_xdp.policy import acl, blacklist, stats
from testbed import packets as P

pytestmark = pytest.mark.needs_root
__all__ = ["fw_a", "fw_b", "hosts"]  # fixtures used by name

U32_MAX = 2**32 - 1


def session_rec(a: str, pa: int, b: str, pb: int, state: int = 3, flags: int = 0) -> np.ndarray:
    """One normalised TCP session record between a:pa and b:pb (either family)."""
    ends = sorted([(addr_array([x]).tobytes(), port, x) for x, port in ((a, pa), (b, pb))])
    rec = np.zeros(1, dtype=wire.SESSION_WIRE)
    rec["addr_lo"], rec["addr_hi"] = ip_to_addr(ends[0][2]), ip_to_addr(ends[1][2])
    rec["port_lo"], rec["port_hi"] = port_be(ends[0][1]), port_be(ends[1][1])
    rec["proto"], rec["state"], rec["flags"] = 6, state, flags
    return rec


def signed(ident: Any, sections: dict, *, vm: str | list[str] = VM, seq: int = 1,
           mid: bytes | None = None, flags: int = 0) -> bytes:
    digest = b"\0" * 16
    if "acl" in sections:
        digest = wire.ruleset_digest(sections["acl"].tobytes())
    vms = [vm] if isinstance(vm, str) else vm
    return encode_bundle(sections, identity=ident, vms=vms, audience="host-b",
                         seq=seq, migration_id=mid or new_migration_id(),
                         layout_version=LAYOUT, flags=flags, acl_digest=digest)


# per address of the dual-stack VM: (a client, a denied source prefix and one of it)
FAMILY = {VM: (CLIENT, "198.51.100.0/24", "198.51.100.9"),
          VM6: (CLIENT6, "2001:db8:66::/48", "2001:db8:66:1::9")}


def _tcp(src: str, sport: int, dst: str, dport: int, flags: int) -> bytes:
    return (P.tcp6 if ":" in src else P.tcp)(src, sport, dst, dport, flags)


def b_has_state(fw_b: Firewall) -> None:
    """B's own state for its VM (both addresses): a session, ACL rules (a deny among
    them), a ban and a pickup entry, all of which C's bundles must leave byte-for-byte
    alone."""
    for vm, (client, denied, _) in FAMILY.items():
        acl.add_rules(fw_b, [
            acl.make_rule(fw_b, vm=vm, proto="tcp", dport="22"),
            acl.make_rule(fw_b, vm=vm, proto="any", src=denied, action="deny", priority=1),
        ])
        for frame in (_tcp(vm, 40000, client, 80, P.SYN),
                      _tcp(client, 80, vm, 40000, P.SYN | P.ACK),
                      _tcp(vm, 40000, client, 80, P.ACK)):
            assert run_frame(fw_b, frame) == "PASS"
    blacklist.ban(fw_b, ATTACKER, VM2, 60)
    blacklist.ban(fw_b, ATTACKER6, VM2_6, 60)
    for vm in (VM2, VM2_6):
        fw_b.maps["pickup"].update(addr_array([vm]),
                                   np.array([time.monotonic_ns() + 10**12], np.uint64))


def attack(hosts: Hosts, kind: str, vm: str = VM) -> bytes:
    """C's bundle about one of B's VM's addresses, one per attack of the issue."""
    c = hosts.c
    client = FAMILY[vm][0]
    if kind == "session":  # a mid-flow connection to a closed port of the VM
        return signed(c, {"sessions": session_rec(client, 5555, vm, 23)}, vm=vm)
    if kind == "acl-allow-all":
        rule = np.zeros(1, dtype=wire.ACL_WIRE)
        rule["vm"] = ip_to_addr(vm)
        rule["action"], rule["dport_hi"], rule["priority"] = 1, 65535, 0
        return signed(c, {"acl": rule}, vm=vm)
    if kind == "delete-b-session":  # B's own session, through a delta's delete list
        dele = wire.session_keys_to_del(session_rec(vm, 40000, client, 80))
        return signed(c, {"del_sessions": dele}, flags=FLAG_DELTA, vm=vm)
    if kind == "eternal-ban":  # 2^32 ms, for a client of the VM
        bl = np.zeros(1, dtype=wire.BLACKLIST_WIRE)
        src = client if vm == VM else "2001:db8:99::"  # an IPv6 client's /64
        bl["src"], bl["vm"], bl["remaining_ms"] = ip_to_addr(src), ip_to_addr(vm), U32_MAX
        return signed(c, {"blacklist": bl}, vm=vm)
    assert kind == "pickup"  # an empty final bundle: a pickup window for the VM
    return signed(c, {}, flags=FLAG_FINAL, vm=vm)


@pytest.mark.parametrize("vm", [VM, VM6])
@pytest.mark.parametrize(
    "kind", ["session", "acl-allow-all", "delete-b-session", "eternal-ban", "pickup"]
)
def test_a_peer_outside_its_scope_changes_nothing(fw_b, hosts, kind, vm):
    b_has_state(fw_b)
    before = snapshot(fw_b)
    data = attack(hosts, kind, vm)
    for _ in range(2):  # re-sending changes nothing either
        with pytest.raises(ScopeError, match=f"bundle for VM {vm} is outside the scope of peer "
                                             r"host-c \(vms: 10\.2\.0\.0/24\)"):
            hosts.receive(fw_b, data)
    assert snapshot(fw_b) == before
    assert hosts.replay.count() == 0 and ImportRecords(hosts.state_b).list() == []
    # the datapath still says what B says: mid-flow TCP to a closed port is dropped,
    # the denied source is denied, the client reaches the VM's open port
    client, _, denied = FAMILY[vm]
    assert run_frame(fw_b, _tcp(client, 5555, vm, 23, P.ACK)) == "DROP"
    assert run_frame(fw_b, _tcp(denied, 5555, vm, 22, P.SYN)) == "DROP"
    assert run_frame(fw_b, _tcp(client, 5556, vm, 22, P.SYN)) == "PASS"
    assert run_frame(fw_b, _tcp(client, 80, vm, 40000, P.ACK)) == "PASS"


def test_a_peer_in_scope_for_one_address_may_not_send_the_whole_vm(fw_b, hosts):
    """C is trusted for the VM's IPv4 address: its bundle of the whole dual-stack VM
    (both addresses, an allow-all rule for each) is refused, naming the IPv6 address,
    and changes nothing of either address."""
    hosts.set_scope("host-c", f"{VM}/32")
    b_has_state(fw_b)
    before = snapshot(fw_b)
    rules = np.zeros(2, dtype=wire.ACL_WIRE)
    rules["vm"] = addr_array(DUAL)
    rules["action"], rules["dport_hi"] = 1, 65535
    for order in (DUAL, DUAL[::-1]):
        with pytest.raises(ScopeError, match=f"bundle for VM {VM6} is outside the scope of "
                                             f"peer host-c \\(vms: {VM}/32\\)"):
            hosts.receive(fw_b, signed(hosts.c, {"acl": rules}, vm=order))
    assert snapshot(fw_b) == before and hosts.replay.count() == 0
    for vm, (client, _, _) in FAMILY.items():
        assert run_frame(fw_b, _tcp(client, 5555, vm, 23, P.SYN)) == "DROP"


def test_the_same_bundle_from_the_peer_in_scope_loads(fw_b, hosts):
    """The refusal above is the scope, nothing else: A (trusted for the prefix) may."""
    res = hosts.receive(fw_b, signed(hosts.a, {"sessions": session_rec(CLIENT, 5555, VM, 23)}))
    assert res.counts["sessions"] == 1
    assert run_frame(fw_b, P.tcp(CLIENT, 5555, VM, 23, P.ACK)) == "PASS"


def test_a_peer_without_scope_may_send_state_for_no_vm(fw_b, hosts):
    hosts.set_scope("host-a", "none")
    before = snapshot(fw_b)
    with pytest.raises(ScopeError, match=r"vms: none"):
        hosts.receive(fw_b, signed(hosts.a, {"sessions": session_rec(CLIENT, 1, VM, 2)}))
    assert snapshot(fw_b) == before


def test_a_vm_outside_the_protected_prefixes_is_refused(fw_b, hosts):
    """In the signer's scope is not enough: the VM must be behind this host."""
    hosts.set_scope("host-a", f"{PREFIX},8.8.8.0/24")
    before = snapshot(fw_b)
    data = signed(hosts.a, {"sessions": session_rec("8.8.8.8", 53, CLIENT, 5353)}, vm="8.8.8.8",
                  flags=FLAG_FINAL)
    with pytest.raises(NotProtectedError, match="8.8.8.8 is not in a protected prefix"):
        hosts.receive(fw_b, data)
    assert snapshot(fw_b) == before and hosts.replay.count() == 0


def test_export_of_an_unprotected_address_is_refused(fw_a, hosts):
    with pytest.raises(InvalidArgument, match="8.8.8.8 is not in a protected prefix"):
        build_bundle(fw_a, "8.8.8.8", "host-b", 1, new_migration_id(), identity=hosts.a)


def test_an_imported_ban_lasts_at_most_this_hosts_ban_time(fw_b, hosts):
    fw_b.set_config(fw_b.const("CFG_BAN_S"), 30)
    bl = np.zeros(1, dtype=wire.BLACKLIST_WIRE)
    bl["src"], bl["vm"], bl["remaining_ms"] = ip_to_addr(ATTACKER), ip_to_addr(VM), U32_MAX
    t0 = time.monotonic_ns()
    res = hosts.receive(fw_b, signed(hosts.a, {"blacklist": bl}))
    assert res.counts["blacklist"] == 1 and res.skipped["capped_bans"] == 1
    ban = fw_b.maps["blacklist"].lookup(addr_array([ATTACKER]))
    assert ban is not None and addr_to_ip(ban["vm"]) == VM
    assert int(ban["expires_ns"]) <= time.monotonic_ns() + 30 * 10**9
    assert int(ban["expires_ns"]) >= t0 + 29 * 10**9


def _ban_record(src: str, vm: str, remaining_ms: int = 60_000) -> np.ndarray:
    bl = np.zeros(1, dtype=wire.BLACKLIST_WIRE)
    bl["src"], bl["vm"], bl["remaining_ms"] = ip_to_addr(src), ip_to_addr(vm), remaining_ms
    return bl


def test_an_imported_ban_drops_traffic_to_its_vm_only(fw_b, hosts):
    """The ban travelled with VM: the source is dropped towards VM, and still reaches
    VM2 (allowed by B's ACL) and VM2's established session with it."""
    acl.add_rules(fw_b, [acl.make_rule(fw_b, vm=VM2, proto="tcp", dport="80")])
    flow = P.TcpFlow(ATTACKER, 4000, VM2, 80)
    for frame in (flow.syn(), flow.synack(), flow.ack()):
        assert run_frame(fw_b, frame) == "PASS"
    res = hosts.receive(fw_b, signed(hosts.a, {"blacklist": _ban_record(ATTACKER, VM)}))
    assert res.counts["blacklist"] == 1
    (row,) = blacklist.blacklist_records(fw_b)
    assert row["scope"] == "vm" and row["vm"] == VM and row["active"]
    assert run_frame(fw_b, P.tcp(ATTACKER, 4001, VM, 22, P.SYN)) == "DROP"
    assert run_frame(fw_b, P.udp(ATTACKER, 4002, VM, 53)) == "DROP"
    assert run_frame(fw_b, P.tcp(ATTACKER, 4003, VM2, 80, P.SYN)) == "PASS"  # slow path
    assert run_frame(fw_b, flow.data("a", b"x" * 10)) == "PASS"  # fast path
    assert stats.verdict_packets(fw_b)["drop-blacklist"] == 2
    assert blacklist.blacklist_records(fw_b)[0]["dropped"] == 2


def test_a_ban_made_here_covers_every_vm_and_no_bundle_narrows_or_lifts_it(fw_b, hosts):
    """B's own ban (its datapath or its operator) is host-wide; the VM's bundle banning
    the same source for the VM only, or deleting its ban, leaves it as it is."""
    blacklist.ban(fw_b, ATTACKER, VM, 60)
    key = addr_array([ATTACKER])
    own = fw_b.maps["blacklist"].lookup(key)
    assert own is not None
    mid = new_migration_id()
    res = hosts.receive(fw_b, signed(hosts.a, {"blacklist": _ban_record(ATTACKER, VM)}, mid=mid))
    assert res.counts["blacklist"] == 0 and res.skipped["local_bans"] == 1
    dbl = np.zeros(1, dtype=wire.DEL_BLACKLIST_WIRE)
    dbl["src"], dbl["vm"] = ip_to_addr(ATTACKER), ip_to_addr(VM)
    hosts.receive(fw_b, signed(hosts.a, {"del_blacklist": dbl}, flags=FLAG_DELTA, mid=mid,
                               seq=2))
    after = fw_b.maps["blacklist"].lookup(key)
    assert after is not None and after.tobytes() == own.tobytes()
    assert blacklist.blacklist_records(fw_b)[0]["scope"] == "all"
    acl.add_rules(fw_b, [acl.make_rule(fw_b, vm=VM2, proto="tcp", dport="80")])
    assert run_frame(fw_b, P.tcp(ATTACKER, 4100, VM2, 80, P.SYN)) == "DROP"


def test_pickup_window_only_from_the_final_round_and_only_once(fw_a, fw_b, hosts):
    """A full pre-copy round opens no window; the final round opens one period; the
    migration then accepts no further round, so nothing re-opens or extends it."""
    make_state_a(fw_a)
    key = addr_array([VM])
    pickup = fw_b.maps["pickup"]
    mid = new_migration_id()
    src = ExportState()
    hosts.receive(fw_b, full_bundle(fw_a, hosts, mid, 1, src), pickup_s=5)
    assert pickup.lookup(key) is None
    assert run_frame(fw_b, P.tcp(CLIENT, 81, VM, 41000, P.ACK)) == "DROP"
    final = build_bundle(fw_a, VM, "host-b", 2, mid, "final", src, identity=hosts.a)
    t0 = time.monotonic_ns()
    res = hosts.receive(fw_b, final, pickup_s=5)
    deadline = int(pickup.lookup(key))
    assert deadline == res.pickup_until_ns and t0 < deadline <= time.monotonic_ns() + 5 * 10**9
    assert run_frame(fw_b, P.tcp(CLIENT, 82, VM, 41001, P.ACK)) == "PASS"  # picked up
    with pytest.raises(ReplayError):
        hosts.receive(fw_b, final, pickup_s=5)
    again = build_bundle(fw_a, VM, "host-b", 3, mid, "final", src, identity=hosts.a)
    with pytest.raises(MigrationConflict, match="already completed its final round #2"):
        hosts.receive(fw_b, again, pickup_s=3600)
    assert int(pickup.lookup(key)) == deadline


def test_a_final_delta_with_no_earlier_round_opens_no_window(fw_b, hosts):
    res = hosts.receive(fw_b, signed(hosts.a, {}, flags=FLAG_DELTA | FLAG_FINAL), pickup_s=5)
    assert res.pickup_until_ns == 0 and any("no pickup window" in w for w in res.warnings)
    assert fw_b.maps["pickup"].lookup(addr_array([VM])) is None


def test_sessions_with_another_vm_outside_the_scope_are_skipped(fw_b, hosts):
    """A is trusted for 10.1.1.1 only; a session between it and 10.1.1.2 (another VM of
    B) would let A act on that VM: it is skipped, the VM's own session loads."""
    hosts.set_scope("host-a", f"{VM}/32")
    recs = np.concatenate([session_rec(VM, 22, VM2, 40000), session_rec(VM, 22, CLIENT, 40000)])
    res = hosts.receive(fw_b, signed(hosts.a, {"sessions": recs}))
    assert res.counts["sessions"] == 1 and res.skipped["foreign_sessions"] == 1
    assert run_frame(fw_b, P.tcp(VM2, 40000, VM, 22, P.ACK)) == "DROP"
    assert run_frame(fw_b, P.tcp(CLIENT, 40000, VM, 22, P.ACK)) == "PASS"


def test_a_dual_stack_vms_sessions_with_another_vm_outside_the_scope_are_skipped(fw_b, hosts):
    """A is trusted for the VM's two addresses only: its sessions with 10.1.1.2 and
    2001:db8:1::20 (another VM of B) are skipped; a session between the VM's own two
    addresses is its own and loads, as do its sessions with clients."""
    hosts.set_scope("host-a", f"{VM}/32,{VM6}/128")
    recs = np.concatenate([
        session_rec(VM, 22, VM2, 40000), session_rec(VM6, 22, VM2_6, 40000),
        session_rec(VM, 22, CLIENT, 40000), session_rec(VM6, 22, CLIENT6, 40000),
        session_rec(VM, 22, "10.1.1.3", 40000),  # B's other VM, also outside the scope
    ])
    own = session_rec(VM, 8, VM, 9)  # the VM talking to itself
    res = hosts.receive(fw_b, signed(hosts.a, {"sessions": np.concatenate([recs, own])},
                                     vm=DUAL))
    assert res.counts["sessions"] == 3 and res.skipped["foreign_sessions"] == 3
    assert run_frame(fw_b, P.tcp6(VM2_6, 40000, VM6, 22, P.ACK)) == "DROP"
    assert run_frame(fw_b, P.tcp6(CLIENT6, 40000, VM6, 22, P.ACK)) == "PASS"
    assert run_frame(fw_b, P.tcp(CLIENT, 40000, VM, 22, P.ACK)) == "PASS"


def test_a_dual_stack_vms_ban_of_an_ipv6_64_drops_its_vm_only(fw_b, hosts):
    """A ban that travelled with the VM's IPv6 address drops the whole /64 towards
    that address only: not towards the VM's other VM neighbours."""
    acl.add_rules(fw_b, [acl.make_rule(fw_b, vm=VM2_6, proto="tcp", dport="80")])
    bl = np.concatenate([_ban_record(ATTACKER6_BAN, VM6), _ban_record(ATTACKER, VM)])
    res = hosts.receive(fw_b, signed(hosts.a, {"blacklist": bl}, vm=DUAL))
    assert res.counts["blacklist"] == 2
    rows = {r["ip"]: r for r in blacklist.blacklist_records(fw_b)}
    assert rows[f"{ATTACKER6_BAN}/64"]["vm"] == VM6 and rows[f"{ATTACKER6_BAN}/64"]["scope"] == "vm"
    assert run_frame(fw_b, P.tcp6("2001:db8:66::beef", 4001, VM6, 22, P.SYN)) == "DROP"
    assert run_frame(fw_b, P.tcp6(ATTACKER6, 4003, VM2_6, 80, P.SYN)) == "PASS"


def test_protected_end_flags_come_from_this_host(fw_b, hosts):
    """A bundle cannot clear the flag that makes the fast path check bans: B bans a
    source, and an imported session of it (flags cleared) does not get it through."""
    res = hosts.receive(fw_b, signed(hosts.a, {"sessions": session_rec(ATTACKER, 5000, VM, 22)}))
    assert res.counts["sessions"] == 1
    k, v = fw_b.maps["sessions"].dump()
    assert int(v["flags"][0]) & fw_b.const("SESS_F_VM_LO")  # 10.1.1.1 is the lo end
    blacklist.ban(fw_b, ATTACKER, VM, 60)
    assert run_frame(fw_b, P.tcp(ATTACKER, 5000, VM, 22, P.ACK)) == "DROP"


def test_rounds_and_aborts_belong_to_the_migrations_source(fw_b, hosts):
    hosts.set_scope("host-c", PREFIX)  # C may send state for the VM too, but not for A's migration
    mid = new_migration_id()
    hosts.receive(fw_b, signed(hosts.a, {"sessions": session_rec(CLIENT, 1, VM, 2)}, mid=mid))
    before = snapshot(fw_b)
    with pytest.raises(MigrationConflict, match="started here by host-a, not host-c"):
        hosts.receive(fw_b, signed(hosts.c, {"sessions": session_rec(CLIENT, 3, VM, 4)},
                                   mid=mid, seq=2))
    with pytest.raises(ControlError, match="host-c may not abort it"):
        abort_import(fw_b, mid, hosts.state_b, replay=hosts.replay, source="host-c")
    assert snapshot(fw_b) == before
    abort_import(fw_b, mid, hosts.state_b, replay=hosts.replay, source="host-a")
    assert run_frame(fw_b, P.tcp(CLIENT, 1, VM, 2, P.ACK)) == "DROP"
