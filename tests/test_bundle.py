"""Bundle format: wire records, round trip, tamper, structure and record checks, for
a VM of one address and for a dual-stack VM (one IPv4 and one IPv6 address).

Pure Python (real Ed25519, no maps) except the selection/delta tests at the
end, which read real pinned maps through the `fw` fixture."""

from __future__ import annotations

import ipaddress
import time
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest

from sami_xdp.base import rows
from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import addr_array, addrs_to_ips, ip_to_addr, port_be
from sami_xdp.migrate import wire
from sami_xdp.migrate.bundle import (
    FLAG_DELTA,
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    SIG_LEN,
    encode_bundle,
    parse_bundle,
)
from sami_xdp.migrate.errors import (
    BundleFormatError,
    BundleRefused,
    CountMismatchError,
    InvalidRecordError,
    LayoutVersionError,
    PoisonedRecordError,
    ScopeError,
    SignatureError,
    TooLargeError,
    UnknownSignerError,
)
from sami_xdp.migrate.keys import HostIdentity
from sami_xdp.migrate.peers import TrustStore
from sami_xdp.migrate.verify import RecordLimits, inspect_bundle, verify_bundle
from sami_xdp.migrate.vmset import MAX_VM_ADDRS

VM, CLIENT, OTHER = "10.1.1.1", "192.0.2.10", "10.1.1.2"
VM6, CLIENT6, OTHER6 = "2001:db8:1::10", "2001:db8:99::5", "2001:db8:1::11"
DUAL = [VM, VM6]
SCOPE = "10.1.1.0/24,2001:db8:1::/64"
LAYOUT = load_layout().consts["SAMIXDP_LAYOUT_VERSION"]
MID = bytes(range(16))


@pytest.fixture(scope="module")
def ident_a() -> HostIdentity:
    return HostIdentity.generate("host-a")


@pytest.fixture(scope="module")
def trust_b(ident_a: HostIdentity) -> TrustStore:
    t = TrustStore()
    t.add("host-a", "192.0.2.1:7800", ident_a.public_raw, vms=SCOPE)
    return t


def _order(ip: str) -> bytes:
    """What the datapath orders a key's two ends by: the 16 bytes of the mapped space."""
    return addr_array([ip]).tobytes()


def sessions_wire(
    n: int, vm: str = VM, client: str = CLIENT, proto: int = 6, state: int = 3
) -> np.ndarray:
    """n normalised sessions vm:443 <-> client:(10000+i) (vm < client numerically)."""
    assert _order(vm) < _order(client)
    rec = np.zeros(n, dtype=wire.SESSION_WIRE)
    rec["addr_lo"] = ip_to_addr(vm)
    rec["addr_hi"] = ip_to_addr(client)
    rec["port_lo"] = port_be(443)
    rec["port_hi"] = [port_be(10000 + i) for i in range(n)]
    rec["proto"] = proto
    rec["state"] = state
    rec["initiator"] = 1
    rec["flags"] = 4
    rec["created_age_ms"] = 60_000
    rec["idle_age_ms"] = np.arange(n, dtype=np.uint32)
    rec["packets"] = wire.encode_counter16(np.array([[10, 20]] * n, dtype=np.uint64))
    rec["bytes"] = wire.encode_counter16(np.array([[1000, 200000]] * n, dtype=np.uint64))
    return rec


# per family: (a client, SYN sources, ban sources, another client) of the VM's address
PEERS = {
    4: (CLIENT, ["198.51.100.1", "198.51.100.2"], ["203.0.113.5", "203.0.113.6"],
        "192.0.2.99", "198.51.100.9", "203.0.113.9"),
    6: (CLIENT6, ["2001:db8:51::", "2001:db8:52::"], ["2001:db8:113:5::", "2001:db8:113:6::"],
        "2001:db8:99::99", "2001:db8:51:9::", "2001:db8:113:9::"),
}


def _sections_of(vm: str) -> dict[str, np.ndarray]:
    """Every kind of record, for one of the VM's addresses."""
    client, syn_src, ban_src, other_client, del_syn_src, del_ban_src = PEERS[
        ipaddress.ip_address(vm).version]
    syn = np.zeros(2, dtype=wire.SYN_WIRE)
    syn["src"] = addr_array(syn_src)
    syn["dst"] = ip_to_addr(vm)
    syn["count"] = [3, 4]
    syn["total"] = [30, 40]
    bl = np.zeros(2, dtype=wire.BLACKLIST_WIRE)
    bl["src"] = addr_array(ban_src)
    bl["vm"] = ip_to_addr(vm)
    bl["remaining_ms"] = 30_000
    bl["dropped"] = [7, 8]
    acl = np.zeros(2, dtype=wire.ACL_WIRE)
    acl["vm"] = ip_to_addr(vm)
    acl["priority"] = [10, 20]
    acl["dport_lo"] = [22, 0]
    acl["dport_hi"] = [22, 65535]
    acl["proto"] = [6, 0]
    acl["action"] = [1, 2]
    del_s = wire.session_keys_to_del(sessions_wire(2, vm, other_client))
    del_syn = np.zeros(1, dtype=wire.DEL_SYN_WIRE)
    del_syn["src"], del_syn["dst"] = ip_to_addr(del_syn_src), ip_to_addr(vm)
    del_bl = np.zeros(1, dtype=wire.DEL_BLACKLIST_WIRE)
    del_bl["src"], del_bl["vm"] = ip_to_addr(del_ban_src), ip_to_addr(vm)
    return {
        "sessions": sessions_wire(3, vm, client),
        "syn": syn,
        "blacklist": bl,
        "acl": acl,
        "del_sessions": del_s,
        "del_syn": del_syn,
        "del_blacklist": del_bl,
    }


def all_sections(vm: str | list[str] = VM) -> dict[str, np.ndarray]:
    """Every kind of record, for each of the VM's addresses (in that order)."""
    parts = [_sections_of(v) for v in ([vm] if isinstance(vm, str) else vm)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def make(
    ident: HostIdentity,
    sections: dict | None = None,
    *,
    flags: int = FLAG_DELTA,
    audience: str = "host-b",
    vm: str | list[str] = VM,
    seq: int = 1,
    **kw: Any,
) -> bytes:
    from sami_xdp.migrate.wire import ruleset_digest

    secs: dict[str, Any] = all_sections(vm) if sections is None else sections
    digest = ruleset_digest(secs["acl"].tobytes()) if "acl" in secs else b"\0" * 16
    return encode_bundle(
        secs,
        identity=ident,
        vms=[vm] if isinstance(vm, str) else vm,
        audience=audience,
        seq=seq,
        migration_id=MID,
        layout_version=LAYOUT,
        flags=flags,
        acl_digest=digest,
        **kw,
    )


# ---- wire records -------------------------------------------------------------------


def _random_clients6(rec: np.ndarray, rng: np.random.Generator) -> None:
    """Each session's client a random address of 2001:db8::/32 (a /64 of its own)."""
    raw = np.ascontiguousarray(rec["addr_hi"]).view(np.uint8).reshape(-1, 16).copy()
    raw[:, 4:] = rng.integers(0, 256, (len(rec), 12))
    rec["addr_hi"] = raw.view(wire.ADDR).reshape(-1)


@pytest.mark.parametrize("family", [4, 6])
def test_record_sizes_meet_the_budget(ident_a, family):
    """60 B per session record as stored (16-byte addresses of either family); the
    budget (<= 32 B/session) holds once compressed, for realistic records (random
    ports, ages, counters; IPv6 clients at random addresses of distinct /64s)."""
    assert wire.SESSION_WIRE.itemsize == 60
    assert HEADER.itemsize == HEADER_SIZE == 192
    rng = np.random.default_rng(3)
    n = 50_000
    rec = sessions_wire(n) if family == 4 else sessions_wire(n, VM6, CLIENT6)
    if family == 6:
        _random_clients6(rec, rng)
    rec["port_hi"] = rng.integers(1024, 65535, n).astype(np.uint16)
    rec["idle_age_ms"] = rng.integers(0, 600_000, n)
    rec["created_age_ms"] = rec["idle_age_ms"] + rng.integers(0, 86_400_000, n)
    rec["packets"] = wire.encode_counter16(rng.integers(1, 10**6, (n, 2)).astype(np.uint64))
    rec["bytes"] = wire.encode_counter16(rng.integers(60, 10**9, (n, 2)).astype(np.uint64))
    rec["tcp_scale"] = 7
    rec["tcp_flags"] = 3
    data = make(ident_a, {"sessions": rec}, flags=0, compression="zlib+shuffle", vm=DUAL)
    assert len(data) / n <= 32


def test_counter16_exact_small_and_bounded_error_large():
    small = np.arange(0, 2048, dtype=np.uint64)
    assert (wire.decode_counter16(wire.encode_counter16(small)) == small).all()
    rng = np.random.default_rng(5)
    big = rng.integers(0, 2**63, 200_000, dtype=np.uint64) >> rng.integers(0, 63, 200_000).astype(
        np.uint64
    )
    big = np.concatenate(
        [big, np.array([2**64 - 1, 2**53 + 1, 2**60 - 1, 2048, 2049], dtype=np.uint64)]
    )
    dec = wire.decode_counter16(wire.encode_counter16(big))
    assert (dec <= big).all()  # never overstated
    rel = (big - dec).astype(np.float64) / np.maximum(big, 1).astype(np.float64)
    assert rel.max() < 1 / 1024


def test_ages_and_rebase():
    now = 10_000 * 10**9
    then = np.array([now, now - 1, now - 1_500_000, now + 5, 0], dtype=np.uint64)
    assert wire.age_ms(now, then).tolist() == [0, 0, 1, 0, 10_000_000]
    assert wire.remaining_ms(now, np.array([now + 1, now, now - 9], np.uint64)).tolist() == [
        1,
        0,
        0,
    ]
    base = 5 * 10**9
    assert wire.rebase(base, np.array([0, 1000, 6000], np.uint32)).tolist() == [
        base,
        base - 10**9,
        0,
    ]  # clamped at the local clock's origin


def _set_word(field: np.ndarray, word: int, values: np.ndarray) -> None:
    """One 32-bit word of each address of a key field (e.g. keys["addr_lo"])."""
    field["w"][:, word] = values


def test_key_index_matches_python_sets():
    kd = load_layout().dtype("session_key")
    rng = np.random.default_rng(1)
    keys = np.zeros(5000, kd)
    for word in (0, 3):  # IPv6-like high words and IPv4-like low words both differ
        _set_word(keys["addr_lo"], word, rng.integers(0, 7, 5000))
        _set_word(keys["addr_hi"], word, rng.integers(0, 7, 5000))
    keys["port_lo"] = rng.integers(0, 4, 5000)
    keys = np.unique(keys)
    want = np.zeros(3000, kd)
    for word in (0, 3):
        _set_word(want["addr_lo"], word, rng.integers(0, 8, 3000))
        _set_word(want["addr_hi"], word, rng.integers(0, 8, 3000))
    want["port_lo"] = rng.integers(0, 4, 3000)
    found, idx = rows.KeyIndex(keys).find(want)
    have = {k.tobytes(): i for i, k in enumerate(keys)}
    for w, f, i in zip(want, found, idx, strict=True):
        assert f == (w.tobytes() in have)
        if f:
            assert keys[i].tobytes() == w.tobytes()


def test_key_index_resolves_hash_collisions(monkeypatch):
    """With a hash that collides a lot, membership is still exact."""
    kd = load_layout().dtype("session_key")
    keys = np.zeros(50, kd)
    _set_word(keys["addr_lo"], 3, np.arange(50))
    want = np.zeros(60, kd)
    _set_word(want["addr_lo"], 3, np.arange(60)[::-1])
    real = rows.key_u64

    def poor(k: np.ndarray) -> tuple[np.ndarray, bool]:
        h, exact = real(k)
        return h & np.uint64(3), exact  # four buckets for everything

    monkeypatch.setattr(rows, "key_u64", poor)
    found, idx = rows.KeyIndex(keys).find(want)
    assert found.tolist() == [a < 50 for a in want["addr_lo"]["w"][:, 3]]
    assert (keys["addr_lo"][idx[found]] == want["addr_lo"][found]).all()


# ---- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("vm", [[VM], [VM6], DUAL, [VM6, VM]], ids=["v4", "v6", "dual", "6+4"])
@pytest.mark.parametrize("compression", ["none", "zlib", "zlib+shuffle"])
def test_round_trip_every_section(ident_a, trust_b, compression, vm):
    secs = all_sections(vm)
    data = make(ident_a, secs, compression=compression, vm=vm)
    vb = verify_bundle(data, trust_b, "host-b")
    b = vb.bundle
    assert (b.source, b.audience, b.vm_ips, b.seq, b.migration_id) == (
        "host-a",
        "host-b",
        vm,
        1,
        MID,
    )
    assert b.kind == "delta" and b.has_acl and b.compression == compression
    assert vb.peer.name == "host-a"
    for name, arr in secs.items():
        assert vb.sections[name].tobytes() == arr.tobytes(), name
    assert b.counts() == {k: len(v) for k, v in secs.items()}


def test_acl_blob_round_trip(ident_a, trust_b):
    secs = {k: v for k, v in all_sections().items() if not k.startswith("del")}
    secs["acl"] = b"opaque rules from the ACL owner"
    from sami_xdp.migrate.wire import ruleset_digest

    data = encode_bundle(
        secs,
        identity=ident_a,
        vms=[VM],
        audience="host-b",
        seq=1,
        migration_id=MID,
        layout_version=LAYOUT,
        acl_digest=ruleset_digest(secs["acl"]),
    )
    vb = verify_bundle(data, trust_b, "host-b")
    assert vb.sections["acl"] == b"opaque rules from the ACL owner"


def test_shuffled_compression_is_smaller(ident_a):
    secs = {"sessions": sessions_wire(5000)}
    plain = make(ident_a, secs, flags=0)
    packed = make(ident_a, secs, flags=0, compression="zlib+shuffle")
    assert len(plain) == HEADER_SIZE + 16 + SIG_LEN + 5000 * wire.SESSION_WIRE.itemsize
    assert len(packed) < len(plain) / 2


# ---- tamper: every byte of every region ----------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zlib+shuffle"])
def test_flipping_any_byte_is_refused(ident_a, trust_b, compression):
    data = make(ident_a, compression=compression, vm=DUAL)
    b = parse_bundle(data)
    body_at = HEADER_SIZE + 16 * len(DUAL)
    body_end = body_at + len(b.body)
    regions = {
        "header": range(0, HEADER_SIZE),
        "vm addresses": range(HEADER_SIZE, body_at),
        "body": range(body_at, body_end),
        "signature": range(body_end, len(data)),
    }
    assert len(regions["signature"]) == SIG_LEN
    # the body regions of each section (uncompressed bundles: exact offsets)
    if compression == "none":
        off = body_at
        for name, _, _ in [(n, 0, 0) for n in b.counts()]:
            size = len(b.sections()[name].tobytes())
            assert size > 0, name
            regions[f"section:{name}"] = range(off, off + size)
            off += size
        assert off == body_end
    for region, offsets in regions.items():
        for i in offsets:
            bad = bytearray(data)
            bad[i] ^= 0x5A
            with pytest.raises(BundleRefused) as exc:
                verify_bundle(bytes(bad), trust_b, "host-b")
            if region != "header":
                assert isinstance(exc.value, SignatureError), (region, i, exc.value)


def test_truncated_extended_and_garbage_are_refused(ident_a, trust_b):
    data = make(ident_a)
    for bad in (data[:-1], data + b"\0", data[:100], b"", b"SXMB" + b"\0" * 300):
        with pytest.raises(BundleFormatError):
            verify_bundle(bad, trust_b, "host-b")


def test_unknown_signer_and_forged_signature(ident_a, trust_b):
    mallory = HostIdentity.generate("host-a")  # same name, different key
    with pytest.raises(UnknownSignerError):
        verify_bundle(make(mallory), trust_b, "host-b")
    # claims host-a's key id but is signed with another key
    forged = bytearray(make(mallory))
    off = HEADER.fields["key_id"][1]
    forged[off : off + 8] = ident_a.key_id
    with pytest.raises(SignatureError):
        verify_bundle(bytes(forged), trust_b, "host-b")


def test_layout_version_mismatch(ident_a, trust_b):
    secs = {"sessions": sessions_wire(1)}
    data = encode_bundle(
        secs,
        identity=ident_a,
        vms=[VM],
        audience="host-b",
        seq=1,
        migration_id=MID,
        layout_version=LAYOUT + 1,
    )
    with pytest.raises(LayoutVersionError):
        verify_bundle(data, trust_b, "host-b")


# ---- records must belong to the header's VM and be valid -------------------------------------


def _with(section: str, arr: np.ndarray, flags: int = FLAG_DELTA) -> dict:
    secs = all_sections()
    secs[section] = arr
    return secs


@pytest.mark.parametrize("vm", [[VM], DUAL], ids=["v4", "dual"])
@pytest.mark.parametrize("other", [OTHER, OTHER6])
@pytest.mark.parametrize(
    "section", ["sessions", "syn", "blacklist", "acl", "del_sessions", "del_syn", "del_blacklist"]
)
def test_record_for_another_address_is_poison(ident_a, trust_b, section, other, vm):
    """A record of an address that is not one of the bundle's (another VM of either
    family, in the signer's scope) poisons the whole bundle, whichever of the VM's
    addresses' records it sits among."""
    secs = all_sections(vm)
    arr = secs[section].copy()
    i = len(arr) - 1  # the last address's records
    if section in ("sessions", "del_sessions"):
        # a record whose client is of other's family, if there is one
        families = [ipaddress.ip_address(x).version for x in addrs_to_ips(arr["addr_hi"])]
        want = ipaddress.ip_address(other).version
        i = max((j for j, f in enumerate(families) if f == want), default=i)
        arr["addr_lo"][i] = ip_to_addr(other)  # other <-> the client: not the VM's
    elif section in ("syn", "del_syn"):
        arr["dst"][i] = ip_to_addr(other)
    else:
        arr["vm"][i] = ip_to_addr(other)
    secs[section] = arr
    with pytest.raises(PoisonedRecordError, match=other):
        verify_bundle(make(ident_a, secs, vm=vm), trust_b, "host-b")


@pytest.mark.parametrize(
    "field,value",
    [
        ("state", 0),
        ("state", 14),
        ("state", 8),
        ("tcp_scale", 15),
        ("tcp_flags", 0x80),
        ("initiator", 2),
        ("flags", 0x80),
        ("port_lo", 0xFFFF),
    ],
)
@pytest.mark.parametrize("vm,client", [(VM, CLIENT), (VM6, CLIENT6)], ids=["v4", "v6"])
def test_invalid_session_values(ident_a, trust_b, field, value, vm, client):
    arr = sessions_wire(3, vm, client)
    if field == "port_lo":  # VM port above the client port while addresses tie
        arr["addr_hi"] = arr["addr_lo"]
    arr[field][2] = value
    if field == "flags":
        arr[field][2] = value | arr[field][2]
    secs = all_sections(DUAL)
    secs["sessions"] = arr
    with pytest.raises(InvalidRecordError):
        verify_bundle(make(ident_a, secs, vm=DUAL), trust_b, "host-b")


@pytest.mark.parametrize("vm,client", [(VM, CLIENT), (VM6, CLIENT6)], ids=["v4", "v6"])
def test_unnormalised_key_is_invalid(ident_a, trust_b, vm, client):
    arr = sessions_wire(1, vm, client)
    arr["addr_lo"], arr["addr_hi"] = arr["addr_hi"].copy(), arr["addr_lo"].copy()
    secs = all_sections(DUAL)
    secs["sessions"] = arr
    with pytest.raises(InvalidRecordError, match="not normalised"):
        verify_bundle(make(ident_a, secs, vm=DUAL), trust_b, "host-b")


def _session_case(case: str) -> np.ndarray:
    """One session record that the datapath could never have built."""
    if case == "mixed-families":  # the VM's IPv4 address with an IPv6 client
        return sessions_wire(1, VM, CLIENT6)
    if case == "icmp-over-ipv6":
        rec = sessions_wire(1, VM6, CLIENT6, proto=1, state=10)
    elif case == "icmpv6-over-ipv4":
        rec = sessions_wire(1, VM, CLIENT, proto=58, state=10)
    else:
        raise AssertionError(case)
    rec["port_hi"] = 0
    return rec


@pytest.mark.parametrize("case", ["mixed-families", "icmp-over-ipv6", "icmpv6-over-ipv4"])
def test_sessions_the_datapath_never_builds_are_invalid(ident_a, trust_b, case):
    secs = all_sections(DUAL)
    secs["sessions"] = np.concatenate([secs["sessions"], _session_case(case)])
    with pytest.raises(InvalidRecordError):
        verify_bundle(make(ident_a, secs, vm=DUAL), trust_b, "host-b")


def test_icmpv6_echo_sessions_are_valid(ident_a, trust_b):
    """ICMPv6 echo is a session protocol: identifier in port_lo, port_hi 0."""
    rec = sessions_wire(1, VM6, CLIENT6, proto=58, state=10)
    rec["port_hi"] = 0
    vb = verify_bundle(make(ident_a, {"sessions": rec}, flags=0, vm=DUAL), trust_b, "host-b")
    assert vb.sections["sessions"].tobytes() == rec.tobytes()


@pytest.mark.parametrize("section", ["syn", "blacklist", "del_syn", "del_blacklist"])
@pytest.mark.parametrize("case", ["not-a-64", "other-family"])
def test_syn_and_ban_sources_must_be_as_the_datapath_keys_them(ident_a, trust_b, section, case):
    """An IPv6 source is counted and banned by its /64 (the interface half zero), and a
    source is of its VM's family."""
    secs = all_sections(DUAL)
    arr = secs[section].copy()
    i = len(arr) - 1  # a record of the IPv6 address
    arr["src"][i] = ip_to_addr("2001:db8:51::1" if case == "not-a-64" else "198.51.100.1")
    secs[section] = arr
    with pytest.raises(InvalidRecordError, match="/64" if case == "not-a-64" else "famil"):
        verify_bundle(make(ident_a, secs, vm=DUAL), trust_b, "host-b")


def _acl_case(case: str) -> np.ndarray:
    acl = all_sections(DUAL)["acl"].copy()
    v4, v6 = 0, len(acl) - 1  # a rule of the IPv4 address, one of the IPv6 address
    if case == "v6-source-for-v4-vm":
        acl["src_addr"][v4], acl["src_plen"][v4] = ip_to_addr("2001:db8:99::"), 48
    elif case == "v4-source-for-v6-vm":
        acl["src_addr"][v6], acl["src_plen"][v6] = ip_to_addr("192.0.2.0"), 120
    elif case == "bits-past-the-prefix":
        acl["src_addr"][v6], acl["src_plen"][v6] = ip_to_addr("2001:db8:99::1"), 48
    elif case == "prefix-longer-than-128":
        acl["src_addr"][v6], acl["src_plen"][v6] = ip_to_addr("2001:db8:99::"), 129
    elif case == "v4-prefix-shorter-than-the-mapped-space":
        acl["src_addr"][v4], acl["src_plen"][v4] = ip_to_addr("0.0.0.0"), 90
    elif case == "icmp-for-v6-vm":
        acl["proto"][v6], acl["dport_lo"][v6], acl["dport_hi"][v6] = 1, 0, 65535
    elif case == "icmpv6-for-v4-vm":
        acl["proto"][v4], acl["dport_lo"][v4], acl["dport_hi"][v4] = 58, 0, 65535
    else:
        raise AssertionError(case)
    return acl


@pytest.mark.parametrize("case", [
    "v6-source-for-v4-vm", "v4-source-for-v6-vm", "bits-past-the-prefix",
    "prefix-longer-than-128", "v4-prefix-shorter-than-the-mapped-space", "icmp-for-v6-vm",
    "icmpv6-for-v4-vm"])
def test_acl_rules_the_source_never_writes_are_invalid(ident_a, trust_b, case):
    secs = all_sections(DUAL)
    secs["acl"] = _acl_case(case)
    with pytest.raises(InvalidRecordError, match="ACL rule"):
        verify_bundle(make(ident_a, secs, vm=DUAL), trust_b, "host-b")


def test_acl_rules_of_both_families_are_valid(ident_a, trust_b):
    acl = all_sections(DUAL)["acl"].copy()
    acl["src_addr"][0], acl["src_plen"][0] = ip_to_addr("192.0.2.0"), 96 + 24
    acl["src_addr"][-1], acl["src_plen"][-1] = ip_to_addr("2001:db8:99::"), 48
    acl["proto"][-1], acl["dport_lo"][-1], acl["dport_hi"][-1] = 58, 0, 65535
    vb = verify_bundle(make(ident_a, {"acl": acl}, flags=0, vm=DUAL), trust_b, "host-b")
    assert vb.sections["acl"].tobytes() == acl.tobytes()


def test_acl_rule_cap_is_per_address(ident_a, trust_b):
    """Each address may carry as many rules as one VM address holds; the cap counts
    each address's rules, not the bundle's."""
    cap = load_layout().const("SAMIXDP_ACL_MAX_RULES_PER_SET")
    one = all_sections(DUAL)["acl"][:1]
    v4 = np.repeat(one, cap)
    v6 = np.repeat(one, cap)
    v6["vm"] = ip_to_addr(VM6)
    verify_bundle(make(ident_a, {"acl": np.concatenate([v4, v6])}, flags=0, vm=DUAL),
                  trust_b, "host-b")
    with pytest.raises(InvalidRecordError, match=f"{cap + 1} ACL rules for VM address {VM6}"):
        verify_bundle(make(ident_a, {"acl": np.concatenate([v4, v6, v6[:1]])}, flags=0,
                           vm=DUAL), trust_b, "host-b")


def test_invalid_acl_and_ban_values(ident_a, trust_b):
    acl = all_sections()["acl"].copy()
    acl["action"][0] = 7
    with pytest.raises(InvalidRecordError):
        verify_bundle(make(ident_a, _with("acl", acl)), trust_b, "host-b")
    bl = all_sections()["blacklist"].copy()
    bl["remaining_ms"][0] = 0
    with pytest.raises(InvalidRecordError):
        verify_bundle(make(ident_a, _with("blacklist", bl)), trust_b, "host-b")


def test_full_bundle_with_delete_lists_is_refused(ident_a, trust_b):
    with pytest.raises(CountMismatchError):
        verify_bundle(make(ident_a, flags=0), trust_b, "host-b")


@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_counts_must_match_sections(ident_a, compression):
    """A signer cannot make counts and body disagree either (checked before records);
    with compression the body's length says nothing, the signed raw length does."""
    data = bytearray(make(ident_a, {"sessions": sessions_wire(4)}, flags=0,
                          compression=compression))
    h = np.frombuffer(data[:HEADER_SIZE], dtype=HEADER).copy()
    h["n_sessions"] = 3  # body still holds 4 records
    ident = ident_a
    body = bytes(data[HEADER_SIZE:-SIG_LEN])
    resigned = h.tobytes() + body
    resigned += ident.sign(resigned)
    t = TrustStore()
    t.add("host-a", "192.0.2.1:7800", ident.public_raw, vms="10.1.1.0/24")
    with pytest.raises(CountMismatchError):
        verify_bundle(resigned, t, "host-b")


def test_acl_section_must_match_the_signed_digest(ident_a, trust_b):
    """The header's ruleset digest names the ACL the sender meant: a bundle whose
    ACL records differ from it (a signer's bug or a spliced section) is refused."""
    secs = {"acl": all_sections()["acl"]}
    ok = make(ident_a, secs, flags=0)
    verify_bundle(ok, trust_b, "host-b")
    bad = encode_bundle(
        secs, identity=ident_a, vms=[VM], audience="host-b", seq=1,
        migration_id=MID, layout_version=LAYOUT, acl_digest=b"\x01" * 16,
    )
    with pytest.raises(CountMismatchError, match="digest"):
        verify_bundle(bad, trust_b, "host-b")


# ---- the VM's address table ------------------------------------------------------------------


def _resigned(ident: HostIdentity, data: bytes, *, n_vms: int | None = None,
              table: bytes | None = None) -> bytes:
    """`data` with another address count and/or table, correctly signed again."""
    b = parse_bundle(data)
    h = np.frombuffer(data[:HEADER_SIZE], dtype=HEADER).copy()
    old_table = bytes(data[HEADER_SIZE : HEADER_SIZE + 16 * len(b.vm_ips)])
    new_table = old_table if table is None else table
    h["n_vms"] = len(new_table) // 16 if n_vms is None else n_vms
    signed = h.tobytes() + new_table + bytes(b.body)
    return signed + ident.sign(signed)


def test_a_dual_stack_bundle_names_both_addresses(ident_a, trust_b):
    data = make(ident_a, vm=DUAL)
    b = parse_bundle(data)
    assert b.vm_ips == DUAL and b.vm_label == "10.1.1.1,2001:db8:1::10"
    assert bytes(data[HEADER_SIZE : HEADER_SIZE + 32]) == addr_array(DUAL).tobytes()
    assert verify_bundle(data, trust_b, "host-b").vm_ips == DUAL


@pytest.mark.parametrize("dup", [VM, "::ffff:10.1.1.1", "2001:DB8:1:0::10"])
def test_an_address_listed_twice_is_refused(ident_a, trust_b, dup):
    data = make(ident_a, vm=[VM, VM6, dup])
    twice = VM if "." in dup else VM6
    with pytest.raises(BundleFormatError, match=f"lists VM address {twice} twice"):
        verify_bundle(data, trust_b, "host-b")


def test_an_address_list_that_is_too_long_is_refused(ident_a, trust_b):
    """A VM has at most MAX_VM_ADDRS addresses; a longer table (even one claimed by a
    header over a short bundle) is refused before anything else is read."""
    many = [f"10.1.1.{i}" for i in range(1, MAX_VM_ADDRS + 2)]
    secs = {"sessions": sessions_wire(1)}
    ok = make(ident_a, secs, flags=0, vm=many[:MAX_VM_ADDRS])
    assert len(verify_bundle(ok, trust_b, "host-b").vm_ips) == MAX_VM_ADDRS
    with pytest.raises(BundleFormatError, match=f"lists {MAX_VM_ADDRS + 1} VM addresses, "
                                                f"a VM has at most {MAX_VM_ADDRS}"):
        verify_bundle(make(ident_a, secs, flags=0, vm=many), trust_b, "host-b")
    claims = _resigned(ident_a, ok, n_vms=65535)
    with pytest.raises(BundleFormatError, match="lists 65535 VM addresses"):
        verify_bundle(claims, trust_b, "host-b")


def test_a_bundle_without_addresses_is_refused(ident_a, trust_b):
    data = _resigned(ident_a, make(ident_a, {}, flags=0), table=b"")
    with pytest.raises(BundleFormatError, match="names no VM address"):
        verify_bundle(data, trust_b, "host-b")


def test_an_address_table_cut_short_is_refused(ident_a, trust_b):
    """The header counts three addresses, the table holds two: the body's first bytes
    would be read as an address, so the sizes do not add up."""
    data = _resigned(ident_a, make(ident_a, vm=DUAL), n_vms=3)
    with pytest.raises(BundleFormatError, match="header announces"):
        verify_bundle(data, trust_b, "host-b")


@pytest.mark.parametrize("order", [DUAL, DUAL[::-1]], ids=["4,6", "6,4"])
def test_one_address_outside_the_scope_refuses_the_whole_bundle(ident_a, order):
    """The signer is trusted for the VM's IPv4 prefix only: its bundle of the dual-stack
    VM is refused, in one line naming the IPv6 address, whatever the order."""
    t = TrustStore()
    t.add("host-a", "192.0.2.1:7800", ident_a.public_raw, vms="10.1.1.0/24")
    data = make(ident_a, vm=order)
    with pytest.raises(ScopeError) as exc:
        verify_bundle(data, t, "host-b")
    assert str(exc.value) == (
        f"bundle for VM {VM6} is outside the scope of peer host-a (vms: 10.1.1.0/24)")
    t.set_vms("host-a", "10.1.1.0/24,2001:db8:1::10/128")
    assert verify_bundle(data, t, "host-b").vm_ips == order


# ---- older formats ------------------------------------------------------------------------------

# format 2: one IPv4 VM in the header (4 bytes), 36-byte session records with 4-byte
# addresses, map layout 7: what a build before IPv6 wrote
V2_HEADER = np.dtype([
    ("magic", "S4"), ("format_version", "<u2"), ("layout_version", "<u2"),
    ("header_size", "<u2"), ("flags", "<u2"), ("compression", "u1"), ("sig_alg", "u1"),
    ("reserved", "<u2"), ("migration_id", "V16"), ("seq", "<u4"), ("vm", "<u4"),
    ("issued_at_ms", "<u8"), ("expires_at_ms", "<u8"), ("source_host", "V32"),
    ("dest_host", "V32"), ("key_id", "V8"), ("ruleset_digest", "V16"),
    *[(f, "<u4") for f in ("n_sessions", "n_syn", "n_blacklist", "n_acl", "acl_blob_len",
                           "n_del_sessions", "n_del_syn", "n_del_blacklist")],
    ("raw_body_len", "<u8"), ("body_len", "<u8"),
])


def format2_bundle(ident: HostIdentity, audience: str = "host-b") -> bytes:
    """A genuine format 2 bundle (one established session of VM), signed by `ident`."""
    assert V2_HEADER.itemsize == HEADER_SIZE
    rec = bytearray(36)
    rec[0:4] = ipaddress.ip_address(VM).packed
    rec[4:8] = ipaddress.ip_address(CLIENT).packed
    rec[8:10], rec[10:12] = (443).to_bytes(2, "big"), (50000).to_bytes(2, "big")
    rec[12], rec[13], rec[15] = 6, 3, 1
    h = np.zeros(1, V2_HEADER)[0]
    now = int(time.time() * 1000)
    for field, value in (("magic", b"SXMB"), ("format_version", 2), ("layout_version", 7),
                         ("header_size", HEADER_SIZE), ("sig_alg", 1), ("seq", 1),
                         ("vm", int.from_bytes(ipaddress.ip_address(VM).packed, "little")),
                         ("issued_at_ms", now), ("expires_at_ms", now + 60_000),
                         ("n_sessions", 1), ("raw_body_len", 36), ("body_len", 36)):
        h[field] = value
    h["migration_id"] = np.void(MID)
    h["source_host"] = np.void(ident.host_id.encode().ljust(32, b"\0"))
    h["dest_host"] = np.void(audience.encode().ljust(32, b"\0"))
    h["key_id"] = np.void(ident.key_id)
    signed = h.tobytes() + bytes(rec)
    return signed + ident.sign(signed)


def test_an_older_format_is_refused_naming_both_versions(ident_a, trust_b):
    """Read, a format 2 bundle could not be loaded anyway (its records are of map layout
    7): it is refused before its signature is looked at, in one line."""
    assert FORMAT_VERSION == 3
    old = format2_bundle(ident_a)
    with pytest.raises(BundleFormatError) as exc:
        verify_bundle(old, trust_b, "host-b")
    assert str(exc.value) == "bundle format 2 is not supported (this build reads 3)"
    info = inspect_bundle(old, trust_b, "host-b")
    assert not info["valid"] and info["refusal"] == "malformed"
    assert info["reason"] == "bundle format 2 is not supported (this build reads 3)"
    newer = bytearray(make(ident_a))
    newer[4:6] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    with pytest.raises(BundleFormatError, match=r"^bundle format 4 is not supported \(this "
                                                r"build reads 3\)$"):
        verify_bundle(bytes(newer), trust_b, "host-b")


# ---- bundle inspect ---------------------------------------------------------------------------


def test_inspect_lists_the_records_with_canonical_addresses(ident_a, tmp_path):
    """`bundle inspect --records` (text and JSON): IPv6 addresses compressed, an IPv6
    SYN or ban source as its /64, IPv4 dotted, every record of both addresses."""
    from typer.testing import CliRunner

    from sami_xdp.cli import app

    cfg = tmp_path / "cfg"
    HostIdentity.init(cfg, "host-b")
    t = TrustStore.load(cfg)
    t.add("host-a", "192.0.2.1:7800", ident_a.public_raw, vms=SCOPE)
    t.save()
    path = tmp_path / "vm.bundle"
    path.write_bytes(make(ident_a, vm=DUAL, compression="zlib+shuffle"))
    runner = CliRunner()
    base = ["--config-dir", str(cfg), "--state-dir", str(tmp_path / "st"), "bundle", "inspect",
            str(path), "--records"]
    res = runner.invoke(app, [*base, "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    import json

    info = json.loads(res.output)
    assert info["valid"] and info["vms"] == DUAL and info["vm"] == "10.1.1.1,2001:db8:1::10"
    rec = info["records"]
    six = [r for r in rec["sessions"] if ":" in r["dst"]]
    assert [(r["src"], r["sport"], r["dst"], r["dport"], r["state"]) for r in six] == [
        ("2001:db8:99::5", 10000 + i, VM6, 443, "ESTABLISHED") for i in range(3)]
    assert [r["src"] for r in rec["syn"]] == [
        "198.51.100.1", "198.51.100.2", "2001:db8:51::/64", "2001:db8:52::/64"]
    assert [(r["src"], r["vm"]) for r in rec["blacklist"]] == [
        ("203.0.113.5", VM), ("203.0.113.6", VM), ("2001:db8:113:5::/64", VM6),
        ("2001:db8:113:6::/64", VM6)]
    assert [r["vm"] for r in rec["acl"]] == [VM, VM, VM6, VM6]
    assert [(r["src"], r["dst"]) for r in rec["del_sessions"]][-1] == (VM6, "2001:db8:99::99")
    text = runner.invoke(app, base)
    assert text.exit_code == 0, (text.output, text.exception)
    assert "vm 10.1.1.1,2001:db8:1::10" in text.output
    assert "sessions: tcp [2001:db8:99::5]:10000 -> [2001:db8:1::10]:443 ESTABLISHED" in (
        text.output)
    assert "blacklist: src 2001:db8:113:5::/64 vm 2001:db8:1::10" in text.output
    assert "0:0:" not in text.output and "2001:0db8" not in text.output  # compressed only
    old = tmp_path / "old.bundle"
    old.write_bytes(format2_bundle(ident_a))
    res = runner.invoke(app, [*base[:-2], str(old)])
    assert isinstance(res.exception, BundleRefused)
    assert "bundle format 2 is not supported (this build reads 3)" in res.output


# ---- selection and deltas from real maps ----------------------------------------------------


def _put_sessions(
    fw,
    vm: str,
    client: str,
    ports: list[int],
    state: int = 3,
    last_seen_ago_s: float = 1.0,
    table: str = "sessions",
) -> np.ndarray:
    """Sessions written straight into a map (either family), normalised as the datapath
    does: the numerically lower address first."""
    m = fw.maps[table]
    now = time.monotonic_ns()
    k = np.zeros(len(ports), m.key_dtype)
    v = np.zeros(len(ports), m.value_dtype)
    lo_first = _order(vm) < _order(client)
    k["addr_lo"] = ip_to_addr(vm if lo_first else client)
    k["addr_hi"] = ip_to_addr(client if lo_first else vm)
    k["port_lo"] = [port_be(p) for p in ports]
    k["port_hi"] = port_be(40000)
    k["proto"] = 6
    v["state"] = state
    v["created_ns"] = max(now - int(100e9), 0)
    v["last_seen_ns"] = max(now - int(last_seen_ago_s * 1e9), 0)
    v["packets"] = [3, 4]
    v["bytes"] = [300, 4000]
    v["ifindex"] = 7
    m.update_many(k, v)
    return k


def _ports(keys: np.ndarray) -> list[int]:
    return sorted(int(np.uint16(p).byteswap()) for p in keys["port_lo"])


@pytest.mark.needs_root
def test_selection_takes_only_the_vms_live_entries(fw):
    """Of a dual-stack VM, the entries of both its addresses and only those: sessions
    (either end, both maps, live), SYN counters towards it, bans it triggered."""
    from sami_xdp.migrate.select import export_vm_state

    _put_sessions(fw, VM, CLIENT, [1, 2, 3])
    _put_sessions(fw, VM, "9.9.9.9", [4])  # VM is the hi end
    _put_sessions(fw, OTHER, CLIENT, [5, 6])  # another VM
    _put_sessions(fw, VM, CLIENT, [7], state=1, table="unassured")
    _put_sessions(fw, VM, CLIENT, [8], last_seen_ago_s=40)  # ESTABLISHED: live for 5 days
    _put_sessions(fw, VM, CLIENT, [9], state=8, last_seen_ago_s=31)  # UDP_NEW 30 s: expired
    _put_sessions(fw, VM6, CLIENT6, [11, 12])  # the VM's IPv6 address, lo end
    _put_sessions(fw, VM6, "2001:db8::1", [13])  # ... hi end
    _put_sessions(fw, VM6, CLIENT6, [14], state=1, table="unassured")
    _put_sessions(fw, OTHER6, CLIENT6, [15])  # another VM's IPv6 address
    syn_m, bl_m = fw.maps["syn_counters"], fw.maps["blacklist"]
    now = time.monotonic_ns()
    sk = np.zeros(4, syn_m.key_dtype)
    sk["src"] = addr_array(["198.51.100.1", "198.51.100.1", "2001:db8:51::", "2001:db8:51::"])
    sk["dst"] = addr_array([VM, OTHER, VM6, OTHER6])
    sv = np.zeros(4, syn_m.value_dtype)
    sv["window_start_ns"] = now
    sv["count"], sv["total"] = 1, 5
    syn_m.update_many(sk, sv)
    bk = np.zeros(5, bl_m.key_dtype)
    bk[:] = addr_array(["203.0.113.1", "203.0.113.2", "203.0.113.3", "2001:db8:113:1::",
                        "2001:db8:113:2::"])
    bv = np.zeros(5, bl_m.value_dtype)
    bv["vm"] = addr_array([VM, OTHER, VM, VM6, OTHER6])
    bv["banned_ns"] = now
    bv["expires_ns"] = [now + 60 * 10**9, now + 60 * 10**9, now - 1,  # expired
                        now + 60 * 10**9, now + 60 * 10**9]
    bl_m.update_many(bk, bv)

    st = export_vm_state(fw, VM, include_acl=False)
    # 1,2,3 (lo), 4 (hi), 7 (half-open), 8 (idle 40 s, ESTABLISHED: live)
    got = _ports(st.sess_keys)
    assert got == [1, 2, 3, 4, 7, 8]
    assert addrs_to_ips(st.syn_keys["dst"]) == [VM]
    assert addrs_to_ips(st.bl_keys) == ["203.0.113.1"]
    w = st.sections()["sessions"]
    assert (w["state"] >= 1).all()
    assert st.acl is None

    both = export_vm_state(fw, DUAL, include_acl=False)
    assert both.vms.ips == tuple(DUAL)
    assert _ports(both.sess_keys) == [1, 2, 3, 4, 7, 8, 11, 12, 13, 14]
    assert sorted(addrs_to_ips(both.syn_keys["dst"])) == sorted(DUAL)
    assert sorted(addrs_to_ips(both.bl_keys)) == ["2001:db8:113:1::", "203.0.113.1"]
    assert export_vm_state(fw, [VM6], include_acl=False).sess_keys.tobytes() == (
        both.sess_keys[np.isin(_port_list(both.sess_keys), [11, 12, 13, 14])].tobytes())


def _port_list(keys: np.ndarray) -> list[int]:
    return [int(np.uint16(p).byteswap()) for p in keys["port_lo"]]


@pytest.mark.needs_root
def test_a_session_between_two_of_the_vms_addresses_is_selected_once(fw):
    from sami_xdp.migrate.select import export_vm_state

    _put_sessions(fw, VM, "10.1.1.3", [1])
    st = export_vm_state(fw, [VM, "10.1.1.3"], include_acl=False)
    assert len(st.sess_keys) == 1


@pytest.mark.needs_root
@pytest.mark.parametrize("vm,client", [(VM, CLIENT), (VM6, CLIENT6)], ids=["v4", "v6"])
def test_delta_has_changed_new_and_deleted_keys(fw, vm, client):
    from sami_xdp.migrate.select import ExportState, delta_since, export_vm_state

    src = "198.51.100.1" if vm == VM else "2001:db8:51::"
    keys = _put_sessions(fw, vm, client, [1, 2, 3, 4], last_seen_ago_s=5)
    syn_m = fw.maps["syn_counters"]
    sk = np.zeros(1, syn_m.key_dtype)
    sk["src"], sk["dst"] = ip_to_addr(src), ip_to_addr(vm)
    sv = np.zeros(1, syn_m.value_dtype)
    sv["count"], sv["total"] = 1, 1
    syn_m.update_many(sk, sv)
    prev = ExportState()
    prev.advance(export_vm_state(fw, DUAL, include_acl=False))
    prev.watermark_ns = time.monotonic_ns()  # nothing below counts as changed
    # round 2: session 2 heard from, session 3 gone, session 5 new, SYN count moved
    _put_sessions(fw, vm, client, [2], last_seen_ago_s=0)
    fw.maps["sessions"].delete(keys[2:3])
    _put_sessions(fw, vm, client, [5], last_seen_ago_s=60)
    sv["count"], sv["total"] = 2, 2
    syn_m.update_many(sk, sv)
    d = delta_since(prev, export_vm_state(fw, DUAL, include_acl=False))
    assert _ports(d.sess_keys) == [2, 5]
    assert _ports(d.del_sess_keys) == [3]
    assert d.syn_values["count"].tolist() == [2]
    assert len(d.del_syn_keys) == 0 and len(d.del_bl) == 0
    assert d.is_delta


def test_counts_beyond_this_hosts_maps_are_refused_before_inflating(ident_a, trust_b):
    """The signed header's counts are checked against what the maps could hold before
    a byte of the body is inflated."""
    data = make(ident_a, {"sessions": sessions_wire(70)}, flags=0, compression="zlib")
    small = RecordLimits(sessions=64, syn=8, blacklist=8, acl=8)
    with pytest.raises(TooLargeError, match="70 sessions, this host holds at most 64"):
        verify_bundle(data, trust_b, "host-b", limits=small)
    verify_bundle(data, trust_b, "host-b", limits=RecordLimits(sessions=70, syn=8, blacklist=8,
                                                                acl=8))


def test_a_bomb_is_refused_before_a_buffer_of_its_declared_length_exists(ident_a, trust_b):
    """The header declares 12 MB of records, the body inflates to 64 MiB: refused after
    a first, counting pass, so at no point does a buffer of the declared length exist
    (Python's own allocations traced)."""
    data = bytearray(make(ident_a, {"sessions": sessions_wire(1)}, flags=0,
                          compression="zlib"))
    h = np.frombuffer(bytes(data[:HEADER_SIZE]), dtype=HEADER).copy()
    body = zlib.compress(b"\0" * (64 << 20), 9)
    declared = 200_000
    rec = wire.SESSION_WIRE.itemsize
    h["n_sessions"], h["raw_body_len"], h["body_len"] = declared, declared * rec, len(body)
    signed = h.tobytes() + bytes(data[HEADER_SIZE : HEADER_SIZE + 16]) + body
    bomb = signed + ident_a.sign(signed)
    tracemalloc.start()
    try:
        with pytest.raises(CountMismatchError, match=f"inflates past the {declared * rec} bytes"):
            verify_bundle(bomb, trust_b, "host-b")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < declared * rec // 4, peak
