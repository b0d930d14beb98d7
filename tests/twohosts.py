"""Two firewall hosts for the migration tests: A (the shared `fw` fixture) and B (a
second firewall in the same test bpffs), their identities, trust stores and B's
replay cache, the VM's state made on A by the datapath (for its IPv4 address and,
dual-stack, its IPv6 address), and map snapshots."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import reset_firewall, run_frame

from sami_xdp.base.layout import load_layout
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import (
    ExportState,
    HostIdentity,
    ReplayCache,
    TrustStore,
    VmAddrs,
    build_bundle,
    new_migration_id,
    receive_bundle,
)
from sami_xdp.migrate.bundle import encode_bundle
from sami_xdp.migrate.select import export_vm_state
from sami_xdp.policy import acl, protect
from testbed import packets as P

VM, VM2, CLIENT, ATTACKER = "10.1.1.1", "10.1.1.2", "192.0.2.10", "198.51.100.7"
PREFIX = "10.1.1.0/24"
# the VM is dual-stack: VM and VM6 are its addresses (VM2, VM2_6 another VM's)
VM6, VM2_6 = "2001:db8:1::10", "2001:db8:1::20"
CLIENT6, ATTACKER6 = "2001:db8:99::5", "2001:db8:66::7"
ATTACKER6_BAN = "2001:db8:66::"  # what a ban of ATTACKER6 keys: its /64
CLIENT6_NET = "2001:db8:99::/48"
PREFIX6 = "2001:db8:1::/64"
DUAL = [VM, VM6]
A_SCOPE = f"{PREFIX},{PREFIX6}"  # B trusts A for both of the VM's prefixes
C_SCOPE = "10.2.0.0/24"  # B trusts C for another prefix only
MIGRATED = 1
STATE_MAPS = ("sessions", "unassured", "syn_counters", "blacklist", "pickup")
LAYOUT = load_layout().consts["SAMIXDP_LAYOUT_VERSION"]


# ---- two hosts -------------------------------------------------------------------------------


@pytest.fixture
def fw_a(fw: Firewall) -> Firewall:
    protect.add_protected(fw, PREFIX)
    protect.add_protected(fw, PREFIX6)
    return fw


@pytest.fixture
def fw_b(firewall_b: Firewall) -> Firewall:
    reset_firewall(firewall_b)
    protect.add_protected(firewall_b, PREFIX)
    protect.add_protected(firewall_b, PREFIX6)
    return firewall_b


class Hosts:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.a = HostIdentity.init(root / "a", "host-a")
        self.b = HostIdentity.init(root / "b", "host-b")
        self.c = HostIdentity.init(root / "c", "host-c")  # a trusted peer hosting none of B's VMs
        ta = TrustStore.load(root / "a")
        ta.add("host-b", "127.0.0.1:7801", self.b.public_b64)
        ta.save()
        tb = TrustStore.load(root / "b")
        tb.add("host-a", "127.0.0.1:7800", self.a.public_b64, vms=A_SCOPE)
        tb.add("host-c", "127.0.0.1:7802", self.c.public_b64, vms=C_SCOPE)
        tb.save()
        self.trust_b = TrustStore.load(root / "b")
        self.state_b = root / "b-state"
        self.replay = ReplayCache(self.state_b)

    def set_scope(self, peer: str, vms: str) -> None:
        tb = TrustStore.load(self.root / "b")
        tb.set_vms(peer, vms)
        tb.save()
        self.trust_b = TrustStore.load(self.root / "b")

    def reopen_replay(self) -> None:
        self.replay.close()
        self.replay = ReplayCache(self.state_b)

    def receive(self, fw_b: Firewall, data: bytes, **kw: Any) -> Any:
        return receive_bundle(fw_b, data, self.trust_b, self.replay, "host-b", **kw)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(tmp_path)
    yield h
    h.replay.close()


def make_state_a(fw: Firewall) -> None:
    """The VM's state on A, made by the datapath itself."""
    fw.set_config(fw.const("CFG_SYN_RATE"), 2)
    fw.set_config(fw.const("CFG_SYN_WINDOW_MS"), 60_000)
    acl.add_rules(
        fw,
        [
            acl.make_rule(fw, vm=VM, proto="tcp", dport="22", action="allow", priority=10),
            acl.make_rule(fw, vm=VM, proto="udp", action="deny", priority=20),
            acl.make_rule(fw, vm=VM2, proto="tcp", dport="80", priority=10),
        ],
    )
    ok = [
        # outbound TCP, established
        P.tcp(VM, 40000, CLIENT, 80, P.SYN),
        P.tcp(CLIENT, 80, VM, 40000, P.SYN | P.ACK),
        P.tcp(VM, 40000, CLIENT, 80, P.ACK),
        P.tcp(VM, 40000, CLIENT, 80, P.ACK | P.PSH, b"x" * 100),
        # outbound TCP, half-open
        P.tcp(VM, 40001, CLIENT, 80, P.SYN),
        # inbound TCP allowed by the ACL, half-open
        P.tcp(CLIENT, 50000, VM, 22, P.SYN),
        # UDP both ways, ICMP echo
        P.udp(VM, 5353, CLIENT, 53),
        P.udp(CLIENT, 53, VM, 5353),
        P.icmp_echo(VM, CLIENT, 7),
        # another VM: must not travel
        P.tcp(VM2, 40000, CLIENT, 80, P.SYN),
        P.tcp(CLIENT, 80, VM2, 40000, P.SYN | P.ACK),
        P.tcp(VM2, 40000, CLIENT, 80, P.ACK),
    ]
    for frame in ok:
        assert run_frame(fw, frame) == "PASS"
    # SYN flood towards the VM: the third SYN crosses the rate, the source is banned
    for i in range(3):
        run_frame(fw, P.tcp(ATTACKER, 1000 + i, VM, 80, P.SYN))
    assert run_frame(fw, P.tcp(ATTACKER, 2000, VM2, 80, P.SYN)) == "DROP"


def make_state_a6(fw: Firewall) -> None:
    """The state of the VM's IPv6 address on A, made by the datapath itself: as
    `make_state_a` for IPv4, plus a rule with an IPv6 source prefix and an ICMPv6 rule."""
    fw.set_config(fw.const("CFG_SYN_RATE"), 2)
    fw.set_config(fw.const("CFG_SYN_WINDOW_MS"), 60_000)
    acl.add_rules(
        fw,
        [
            acl.make_rule(fw, vm=VM6, proto="tcp", dport="22", action="allow", priority=10),
            acl.make_rule(fw, vm=VM6, proto="udp", action="deny", priority=20),
            acl.make_rule(fw, vm=VM6, proto="tcp", dport="443", src=CLIENT6_NET, priority=5),
            acl.make_rule(fw, vm=VM6, proto="icmpv6", priority=30),
            acl.make_rule(fw, vm=VM2_6, proto="tcp", dport="80", priority=10),
        ],
    )
    ok = [
        # outbound TCP, established
        P.tcp6(VM6, 40000, CLIENT6, 80, P.SYN),
        P.tcp6(CLIENT6, 80, VM6, 40000, P.SYN | P.ACK),
        P.tcp6(VM6, 40000, CLIENT6, 80, P.ACK),
        P.tcp6(VM6, 40000, CLIENT6, 80, P.ACK | P.PSH, b"x" * 100),
        # outbound TCP, half-open
        P.tcp6(VM6, 40001, CLIENT6, 80, P.SYN),
        # inbound TCP allowed by the ACL, half-open
        P.tcp6(CLIENT6, 50000, VM6, 22, P.SYN),
        # UDP both ways, ICMPv6 echo
        P.udp6(VM6, 5353, CLIENT6, 53),
        P.udp6(CLIENT6, 53, VM6, 5353),
        P.icmp6_echo(VM6, CLIENT6, 7),
        # another VM: must not travel
        P.tcp6(VM2_6, 40000, CLIENT6, 80, P.SYN),
        P.tcp6(CLIENT6, 80, VM2_6, 40000, P.SYN | P.ACK),
        P.tcp6(VM2_6, 40000, CLIENT6, 80, P.ACK),
    ]
    for frame in ok:
        assert run_frame(fw, frame) == "PASS"
    # SYN flood towards the VM's IPv6 address: its /64 is banned at the third SYN
    for i in range(3):
        run_frame(fw, P.tcp6(ATTACKER6, 1000 + i, VM6, 80, P.SYN))
    assert run_frame(fw, P.tcp6(ATTACKER6, 2000, VM2_6, 80, P.SYN)) == "DROP"


def make_dual_state_a(fw: Firewall) -> None:
    """The dual-stack VM's state on A, both families (and another VM's of both)."""
    make_state_a(fw)
    make_state_a6(fw)


def vm_entries(fw: Firewall, vm: str | list[str] = VM) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each state map's entries of one VM (one address or all of them), sorted by key
    bytes."""
    vms = VmAddrs.parse(vm)
    out = {}
    for name in ("sessions", "unassured", "syn_counters", "blacklist"):
        k, v = fw.maps[name].dump()
        if name in ("sessions", "unassured"):
            mask = vms.contains(k["addr_lo"]) | vms.contains(k["addr_hi"])
        elif name == "syn_counters":
            mask = vms.contains(k["dst"])
        else:
            mask = vms.contains(v["vm"])
        k, v = k[mask], v[mask]
        order = np.argsort([x.tobytes() for x in k]) if len(k) else np.zeros(0, int)
        out[name] = (k[order], v[order])
    return out


def snapshot(fw: Firewall) -> dict[str, set[bytes]]:
    """Every entry of every state map as raw bytes, plus the ACL rule table."""
    snap = {}
    for name in STATE_MAPS:
        k, v = fw.maps[name].dump()
        snap[name] = {a.tobytes() + b.tobytes() for a, b in zip(k, v, strict=True)}
    snap["acl_rules"] = {e.tobytes() for e in acl.read_rules(fw)}
    return snap


def expired_bundle(fw_a: Firewall, hosts: Hosts, seq: int = 1) -> bytes:
    """A valid, signed full bundle of the VM issued 70 s ago with 60 s of validity:
    expired by 10 s, past the 5 s clock-skew allowance."""
    state = export_vm_state(fw_a, VM)
    return encode_bundle(
        state.sections(),
        identity=hosts.a,
        vms=state.vms.addrs,
        audience="host-b",
        seq=seq,
        migration_id=new_migration_id(),
        layout_version=LAYOUT,
        acl_digest=state.acl_digest,
        validity_s=60,
        issued_at_ms=int(time.time() * 1000) - 70_000,
    )


def full_bundle(
    fw_a: Firewall,
    hosts: Hosts,
    mid: bytes | None = None,
    seq: int = 1,
    state: ExportState | None = None,
    kind: str = "full",
    vm: str | list[str] = VM,
    **kw: Any,
) -> bytes:
    return build_bundle(
        fw_a,
        vm,
        "host-b",
        seq,
        mid or new_migration_id(),
        kind,  # type: ignore[arg-type]
        state if state is not None else ExportState(),
        identity=hosts.a,
        **kw,
    )


