"""One pass for many VMs (host drain): `export_vm_states`, `vms_last_seen_ns` and
`SharedScan` against the per-VM selection, on the real maps."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sami_xdp.base.netutil import addr_array, ip_to_addr, port_be
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import select as sel
from sami_xdp.migrate import sharedscan
from sami_xdp.migrate.select import VmState, export_vm_state, export_vm_states, vms_last_seen_ns
from sami_xdp.migrate.sharedscan import SharedScan
from sami_xdp.migrate.vmset import VmAddrs
from sami_xdp.policy import acl, protect

pytestmark = pytest.mark.needs_root

A, A6, B, C, OTHER = "10.1.1.1", "2001:db8:1::10", "10.1.1.2", "10.1.1.3", "10.1.1.9"
CLIENT, CLIENT6 = "192.0.2.10", "2001:db8:99::5"
VM_A, VM_B, VM_C = VmAddrs.parse([A, A6]), VmAddrs.parse([B]), VmAddrs.parse([C])


def _put(fw: Firewall, x: str, y: str, ports: list[int], state: int = 3, ago_s: float = 1.0,
         table: str = "sessions") -> None:
    """Sessions between x and y written straight into a map, normalised as the
    datapath does (the lower address first)."""
    m = fw.maps[table]
    now = time.monotonic_ns()
    lo, hi = sorted([x, y], key=lambda ip: addr_array([ip]).tobytes())
    k = np.zeros(len(ports), m.key_dtype)
    v = np.zeros(len(ports), m.value_dtype)
    k["addr_lo"], k["addr_hi"] = ip_to_addr(lo), ip_to_addr(hi)
    k["port_lo"] = [port_be(p) for p in ports]
    k["port_hi"] = port_be(40000)
    k["proto"] = 6
    v["state"] = state
    v["created_ns"] = now - int(100e9)
    v["last_seen_ns"] = now - int(ago_s * 1e9)
    v["packets"] = [3, 4]
    v["ifindex"] = 7
    m.update_many(k, v)


def _state_of_host(fw: Firewall) -> None:
    """Sessions of A (both families), B and C, one between A and B, another VM's,
    expired ones, a key live in both maps; SYN counters and bans of each."""
    _put(fw, A, CLIENT, [1, 2, 3])
    _put(fw, A6, CLIENT6, [4, 5])
    _put(fw, A, CLIENT, [6], state=1, table="unassured")
    _put(fw, A, CLIENT, [7], state=8, ago_s=31)  # UDP_NEW idle 31 s: expired
    _put(fw, B, CLIENT, [10, 11])
    _put(fw, C, "198.51.100.7", [20])
    _put(fw, A, B, [30])  # between two of the VMs: in both states
    _put(fw, A6, A, [31])  # between two addresses of one VM: once
    _put(fw, OTHER, CLIENT, [40, 41])  # another VM
    _put(fw, B, CLIENT, [12])
    _put(fw, B, CLIENT, [12], state=1, table="unassured")  # promotion caught mid-way
    syn_m, bl_m = fw.maps["syn_counters"], fw.maps["blacklist"]
    now = time.monotonic_ns()
    dsts = [A, A6, B, C, OTHER]
    sk = np.zeros(len(dsts), syn_m.key_dtype)
    sk["src"] = addr_array(["198.51.100.1", "2001:db8:51::", "198.51.100.1", "198.51.100.2",
                            "198.51.100.1"])
    sk["dst"] = addr_array(dsts)
    sv = np.zeros(len(dsts), syn_m.value_dtype)
    sv["window_start_ns"] = now
    sv["count"], sv["total"] = [1, 2, 3, 4, 5], 9
    syn_m.update_many(sk, sv)
    bans = [("203.0.113.1", A), ("2001:db8:113:1::", A6), ("203.0.113.2", B),
            ("203.0.113.3", B), ("203.0.113.4", OTHER)]
    bk = np.zeros(len(bans), bl_m.key_dtype)
    bk[:] = addr_array([s for s, _ in bans])
    bv = np.zeros(len(bans), bl_m.value_dtype)
    bv["vm"] = addr_array([v for _, v in bans])
    bv["banned_ns"] = now
    bv["expires_ns"] = [now + 60 * 10**9] * 3 + [now - 1, now + 60 * 10**9]  # B's 2nd: expired
    bl_m.update_many(bk, bv)
    protect.add_protected(fw, "10.1.1.0/24")
    protect.add_protected(fw, "2001:db8:1::/64")
    acl.add_rules(fw, [acl.make_rule(fw, vm=A, proto="tcp", dport="22"),
                       acl.make_rule(fw, vm=A6, proto="tcp", dport="443"),
                       acl.make_rule(fw, vm=C, proto="udp", dport="53")])


def _rows(keys: np.ndarray, values: np.ndarray) -> dict[bytes, bytes]:
    return {k.tobytes(): v.tobytes() for k, v in zip(keys, values, strict=True)}


def _assert_same(got: VmState, want: VmState) -> None:
    """Every section of two selections of one VM: key sets and values."""
    assert got.vms == want.vms
    assert _rows(got.sess_keys, got.sess_values) == _rows(want.sess_keys, want.sess_values)
    assert len(got.sess_keys) == len(want.sess_keys)
    assert _rows(got.syn_keys, got.syn_values) == _rows(want.syn_keys, want.syn_values)
    assert _rows(got.bl_keys, got.bl_values) == _rows(want.bl_keys, want.bl_values)
    assert (got.acl is None) == (want.acl is None)
    if got.acl is not None and want.acl is not None:
        assert got.acl.tobytes() == want.acl.tobytes()
    assert got.acl_digest == want.acl_digest


def _ports(st: VmState) -> list[int]:
    return sorted(int(np.uint16(p).byteswap()) for p in st.sess_keys["port_lo"])


def test_one_pass_equals_each_vms_own_selection(fw):
    _state_of_host(fw)
    now = time.monotonic_ns()
    states = export_vm_states(fw, [VM_A, VM_B, VM_C], now_ns=now)
    assert [s.vms for s in states] == [VM_A, VM_B, VM_C]
    for st in states:
        _assert_same(st, export_vm_state(fw, st.vms, now_ns=now))
        assert st.now_ns == now and st.watermark_ns < now
        assert set(st.timings) == {"dump_s", "select_s"}
    a, b, c = states
    assert _ports(a) == [1, 2, 3, 4, 5, 6, 30, 31]  # not 7 (expired)
    assert _ports(b) == [10, 11, 12, 30]  # 12 once (the `sessions` copy), 30 shared with A
    assert _ports(c) == [20]
    assert [len(s.syn_keys) for s in states] == [2, 1, 1]
    assert [len(s.bl_keys) for s in states] == [2, 1, 0]
    assert [len(s.acl) for s in states if s.acl is not None] == [2, 0, 1]
    # the same VM twice and no ACL: two equal states; no VM: nothing read
    twice = export_vm_states(fw, [VM_B, VM_B], now_ns=now, include_acl=False)
    _assert_same(twice[0], twice[1])
    assert twice[0].acl is None and _ports(twice[0]) == [10, 11, 12, 30]
    assert export_vm_states(fw, []) == []


def test_last_seen_of_many_vms_from_one_pass(fw):
    _state_of_host(fw)
    _put(fw, C, CLIENT, [21], ago_s=0)
    nobody = VmAddrs.parse(["10.9.9.9"])
    got = vms_last_seen_ns(fw, [VM_A, VM_B, VM_C, nobody])
    for vms, seen in zip([VM_A, VM_B, VM_C], got[:3], strict=True):
        values = sel.vm_sessions(fw, vms)[1]
        assert seen == int(values["last_seen_ns"].max())
    assert got[2] > got[1] and got[3] == 0


def test_shared_scan_serves_eight_threads_with_few_passes(fw):
    vms_list = [VmAddrs.parse([f"10.1.2.{i}", f"2001:db8:2::{i}"]) for i in range(1, 9)]
    for i, vms in enumerate(vms_list):
        _put(fw, vms.ips[0], CLIENT, [100 + i, 200 + i])
        _put(fw, vms.ips[1], CLIENT6, [300 + i])
    _put(fw, vms_list[0].ips[0], vms_list[1].ips[0], [999])
    shared = SharedScan(fw, gather_s=1.0)
    shared.expect(len(vms_list))
    start = threading.Barrier(len(vms_list))
    got: dict[int, VmState] = {}

    def one(i: int) -> None:
        start.wait()
        got[i] = shared.select(vms_list[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(vms_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(len(vms_list)))
    assert 1 <= shared.passes < len(vms_list)
    for i, vms in enumerate(vms_list):
        assert got[i].vms is vms
        _assert_same(got[i], export_vm_state(fw, vms, now_ns=got[i].now_ns))
        assert got[i].timings["gather_s"] >= 0
    assert _ports(got[0]) == [100, 200, 300, 999] and _ports(got[1]) == [101, 201, 301, 999]
    # alone, with nobody expected: one more pass after the window
    shared.expect(0)
    shared.gather_s = 0.0
    _assert_same(shared.select(vms_list[2]), export_vm_state(fw, vms_list[2]))
    assert shared.passes >= 2


def test_a_failed_pass_is_raised_in_every_caller_of_its_batch(fw, monkeypatch):
    calls: list[int] = []

    def broken(_fw, vms_list, **_kw):
        calls.append(len(vms_list))
        raise OSError("map read failed")

    monkeypatch.setattr(sharedscan, "export_vm_states", broken)
    shared = SharedScan(fw, gather_s=1.0)
    n = 4
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def one(i: int) -> None:
        with shared.member():  # one migration's life
            start.wait()
            try:
                shared.select(VmAddrs.parse([f"10.1.3.{i + 1}"]))
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == n and all("map read failed" in str(e) for e in errors)
    assert sum(calls) == n and shared.passes == len(calls)
    assert shared.expected == 0  # member() put back what it took


def test_bad_arguments_are_refused(fw):
    from sami_xdp.base.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="gather window"):
        SharedScan(fw, gather_s=-1)
    with pytest.raises(InvalidArgument, match="expected requests"):
        SharedScan(fw).expect(-1)
