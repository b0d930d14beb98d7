"""Bundle format: wire records, round trip, tamper, structure and record checks.

Pure Python (real Ed25519, no maps) except the selection/delta tests at the
end, which read real pinned maps through the `fw` fixture."""

from __future__ import annotations

import time
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest

from sami_xdp.base import rows
from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import ip_to_be32, port_be
from sami_xdp.migrate import wire
from sami_xdp.migrate.bundle import (
    FLAG_DELTA,
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
    SignatureError,
    TooLargeError,
    UnknownSignerError,
)
from sami_xdp.migrate.keys import HostIdentity
from sami_xdp.migrate.peers import TrustStore
from sami_xdp.migrate.verify import RecordLimits, verify_bundle

VM, CLIENT, OTHER = "10.1.1.1", "192.0.2.10", "10.1.1.2"
LAYOUT = load_layout().consts["SAMIXDP_LAYOUT_VERSION"]
MID = bytes(range(16))


@pytest.fixture(scope="module")
def ident_a() -> HostIdentity:
    return HostIdentity.generate("host-a")


@pytest.fixture(scope="module")
def trust_b(ident_a: HostIdentity) -> TrustStore:
    t = TrustStore()
    t.add("host-a", "192.0.2.1:7800", ident_a.public_raw, vms="10.1.1.0/24")
    return t


def sessions_wire(
    n: int, vm: str = VM, client: str = CLIENT, proto: int = 6, state: int = 3
) -> np.ndarray:
    """n normalised sessions vm:443 <-> client:(10000+i) (vm < client numerically)."""
    rec = np.zeros(n, dtype=wire.SESSION_WIRE)
    rec["addr_lo"] = ip_to_be32(vm)
    rec["addr_hi"] = ip_to_be32(client)
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


def all_sections(vm: str = VM) -> dict[str, np.ndarray]:
    syn = np.zeros(2, dtype=wire.SYN_WIRE)
    syn["src"] = [ip_to_be32("198.51.100.1"), ip_to_be32("198.51.100.2")]
    syn["dst"] = ip_to_be32(vm)
    syn["count"] = [3, 4]
    syn["total"] = [30, 40]
    bl = np.zeros(2, dtype=wire.BLACKLIST_WIRE)
    bl["src"] = [ip_to_be32("203.0.113.5"), ip_to_be32("203.0.113.6")]
    bl["vm"] = ip_to_be32(vm)
    bl["remaining_ms"] = 30_000
    bl["dropped"] = [7, 8]
    acl = np.zeros(2, dtype=wire.ACL_WIRE)
    acl["priority"] = [10, 20]
    acl["dport_lo"] = [22, 0]
    acl["dport_hi"] = [22, 65535]
    acl["proto"] = [6, 0]
    acl["action"] = [1, 2]
    del_s = wire.session_keys_to_del(sessions_wire(2, vm, "192.0.2.99"))
    del_syn = np.zeros(1, dtype=wire.DEL_SYN_WIRE)
    del_syn["src"], del_syn["dst"] = ip_to_be32("198.51.100.9"), ip_to_be32(vm)
    del_bl = np.zeros(1, dtype=wire.DEL_BLACKLIST_WIRE)
    del_bl["src"], del_bl["vm"] = ip_to_be32("203.0.113.9"), ip_to_be32(vm)
    return {
        "sessions": sessions_wire(3, vm),
        "syn": syn,
        "blacklist": bl,
        "acl": acl,
        "del_sessions": del_s,
        "del_syn": del_syn,
        "del_blacklist": del_bl,
    }


def make(
    ident: HostIdentity,
    sections: dict | None = None,
    *,
    flags: int = FLAG_DELTA,
    audience: str = "host-b",
    vm: str = VM,
    seq: int = 1,
    **kw: Any,
) -> bytes:
    from sami_xdp.migrate.wire import ruleset_digest

    secs: dict[str, Any] = all_sections(vm) if sections is None else sections
    digest = ruleset_digest(secs["acl"].tobytes()) if "acl" in secs else b"\0" * 16
    return encode_bundle(
        secs,
        identity=ident,
        vm=ip_to_be32(vm),
        audience=audience,
        seq=seq,
        migration_id=MID,
        layout_version=LAYOUT,
        flags=flags,
        acl_digest=digest,
        **kw,
    )


# ---- wire records -------------------------------------------------------------------


def test_record_sizes_meet_the_budget(ident_a):
    """36 B per session record as stored; the budget (<= 32 B/session) holds once
    compressed, for realistic records (random ports, ages, counters)."""
    assert wire.SESSION_WIRE.itemsize == 36
    assert HEADER.itemsize == HEADER_SIZE == 192
    rng = np.random.default_rng(3)
    n = 50_000
    rec = sessions_wire(n)
    rec["port_hi"] = rng.integers(1024, 65535, n).astype(np.uint16)
    rec["idle_age_ms"] = rng.integers(0, 600_000, n)
    rec["created_age_ms"] = rec["idle_age_ms"] + rng.integers(0, 86_400_000, n)
    rec["packets"] = wire.encode_counter16(rng.integers(1, 10**6, (n, 2)).astype(np.uint64))
    rec["bytes"] = wire.encode_counter16(rng.integers(60, 10**9, (n, 2)).astype(np.uint64))
    rec["tcp_scale"] = 7
    rec["tcp_flags"] = 3
    data = make(ident_a, {"sessions": rec}, flags=0, compression="zlib+shuffle")
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


def test_key_index_matches_python_sets():
    kd = load_layout().dtype("session_key")
    rng = np.random.default_rng(1)
    keys = np.zeros(5000, kd)
    keys["addr_lo"] = rng.integers(0, 50, 5000)
    keys["addr_hi"] = rng.integers(0, 50, 5000)
    keys["port_lo"] = rng.integers(0, 4, 5000)
    keys = np.unique(keys)
    want = np.zeros(3000, kd)
    want["addr_lo"] = rng.integers(0, 60, 3000)
    want["addr_hi"] = rng.integers(0, 60, 3000)
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
    keys["addr_lo"] = np.arange(50)
    want = np.zeros(60, kd)
    want["addr_lo"] = np.arange(60)[::-1]
    real = rows.key_u64

    def poor(k: np.ndarray) -> tuple[np.ndarray, bool]:
        h, exact = real(k)
        return h & np.uint64(3), exact  # four buckets for everything

    monkeypatch.setattr(rows, "key_u64", poor)
    found, idx = rows.KeyIndex(keys).find(want)
    assert found.tolist() == [a < 50 for a in want["addr_lo"]]
    assert (keys["addr_lo"][idx[found]] == want["addr_lo"][found]).all()


# ---- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zlib", "zlib+shuffle"])
def test_round_trip_every_section(ident_a, trust_b, compression):
    secs = all_sections()
    data = make(ident_a, secs, compression=compression)
    vb = verify_bundle(data, trust_b, "host-b")
    b = vb.bundle
    assert (b.source, b.audience, b.vm_ip, b.seq, b.migration_id) == (
        "host-a",
        "host-b",
        VM,
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
        vm=ip_to_be32(VM),
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
    assert len(plain) == HEADER_SIZE + SIG_LEN + 5000 * wire.SESSION_WIRE.itemsize
    assert len(packed) < len(plain) / 2


# ---- tamper: every byte of every region ----------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zlib+shuffle"])
def test_flipping_any_byte_is_refused(ident_a, trust_b, compression):
    data = make(ident_a, compression=compression)
    b = parse_bundle(data)
    body_end = HEADER_SIZE + len(b.body)
    regions = {
        "header": range(0, HEADER_SIZE),
        "body": range(HEADER_SIZE, body_end),
        "signature": range(body_end, len(data)),
    }
    assert len(regions["signature"]) == SIG_LEN
    # the body regions of each section (uncompressed bundles: exact offsets)
    if compression == "none":
        off = HEADER_SIZE
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
        vm=ip_to_be32(VM),
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


@pytest.mark.parametrize(
    "section", ["sessions", "syn", "blacklist", "del_sessions", "del_syn", "del_blacklist"]
)
def test_record_for_another_address_is_poison(ident_a, trust_b, section):
    secs = all_sections()
    arr = secs[section].copy()
    if section in ("sessions", "del_sessions"):
        arr["addr_lo"][1] = ip_to_be32(OTHER)  # OTHER <-> CLIENT: not the VM's
    elif section in ("syn", "del_syn"):
        arr["dst"][0] = ip_to_be32(OTHER)
    else:
        arr["vm"][0] = ip_to_be32(OTHER)
    secs[section] = arr
    with pytest.raises(PoisonedRecordError):
        verify_bundle(make(ident_a, secs), trust_b, "host-b")


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
def test_invalid_session_values(ident_a, trust_b, field, value):
    arr = sessions_wire(3)
    if field == "port_lo":  # VM port above the client port while addresses tie
        arr["addr_hi"] = arr["addr_lo"]
    arr[field][2] = value
    if field == "flags":
        arr[field][2] = value | arr[field][2]
    with pytest.raises(InvalidRecordError):
        verify_bundle(make(ident_a, _with("sessions", arr)), trust_b, "host-b")


def test_unnormalised_key_is_invalid(ident_a, trust_b):
    arr = sessions_wire(1)
    arr["addr_lo"], arr["addr_hi"] = arr["addr_hi"].copy(), arr["addr_lo"].copy()
    with pytest.raises(InvalidRecordError):
        verify_bundle(make(ident_a, _with("sessions", arr)), trust_b, "host-b")


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
        secs, identity=ident_a, vm=ip_to_be32(VM), audience="host-b", seq=1,
        migration_id=MID, layout_version=LAYOUT, acl_digest=b"\x01" * 16,
    )
    with pytest.raises(CountMismatchError, match="digest"):
        verify_bundle(bad, trust_b, "host-b")


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
    m = fw.maps[table]
    now = time.monotonic_ns()
    k = np.zeros(len(ports), m.key_dtype)
    v = np.zeros(len(ports), m.value_dtype)
    lo_first = int.from_bytes(bytes(map(int, vm.split("."))), "big") < int.from_bytes(
        bytes(map(int, client.split("."))), "big"
    )
    k["addr_lo"] = ip_to_be32(vm if lo_first else client)
    k["addr_hi"] = ip_to_be32(client if lo_first else vm)
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


@pytest.mark.needs_root
def test_selection_takes_only_the_vms_live_entries(fw):
    from sami_xdp.migrate.select import export_vm_state

    _put_sessions(fw, VM, CLIENT, [1, 2, 3])
    _put_sessions(fw, VM, "9.9.9.9", [4])  # VM is the hi end
    _put_sessions(fw, OTHER, CLIENT, [5, 6])  # another VM
    _put_sessions(fw, VM, CLIENT, [7], state=1, table="unassured")
    _put_sessions(fw, VM, CLIENT, [8], last_seen_ago_s=40)  # ESTABLISHED: live for 5 days
    _put_sessions(fw, VM, CLIENT, [9], state=8, last_seen_ago_s=31)  # UDP_NEW 30 s: expired
    syn_m, bl_m = fw.maps["syn_counters"], fw.maps["blacklist"]
    now = time.monotonic_ns()
    sk = np.zeros(2, syn_m.key_dtype)
    sk["src"] = ip_to_be32("198.51.100.1")
    sk["dst"] = [ip_to_be32(VM), ip_to_be32(OTHER)]
    sv = np.zeros(2, syn_m.value_dtype)
    sv["window_start_ns"] = now
    sv["count"], sv["total"] = 1, 5
    syn_m.update_many(sk, sv)
    bk = np.array(
        [ip_to_be32("203.0.113.1"), ip_to_be32("203.0.113.2"), ip_to_be32("203.0.113.3")], np.uint32
    )
    bv = np.zeros(3, bl_m.value_dtype)
    bv["vm"] = [ip_to_be32(VM), ip_to_be32(OTHER), ip_to_be32(VM)]
    bv["banned_ns"] = now
    bv["expires_ns"] = [now + 60 * 10**9, now + 60 * 10**9, now - 1]  # last one expired
    bl_m.update_many(bk, bv)

    st = export_vm_state(fw, VM, include_acl=False)
    # 1,2,3 (lo), 4 (hi), 7 (half-open), 8 (idle 40 s, ESTABLISHED: live)
    got = sorted(int(np.uint16(p).byteswap()) for p in st.sess_keys["port_lo"])
    assert got == [1, 2, 3, 4, 7, 8]
    assert st.syn_keys["dst"].tolist() == [ip_to_be32(VM)]
    assert st.bl_keys.tolist() == [ip_to_be32("203.0.113.1")]
    w = st.sections()["sessions"]
    assert (w["state"][np.argsort(got)] >= 1).all()
    assert st.acl is None


@pytest.mark.needs_root
def test_delta_has_changed_new_and_deleted_keys(fw):
    from sami_xdp.migrate.select import ExportState, delta_since, export_vm_state

    keys = _put_sessions(fw, VM, CLIENT, [1, 2, 3, 4], last_seen_ago_s=5)
    syn_m = fw.maps["syn_counters"]
    sk = np.zeros(1, syn_m.key_dtype)
    sk["src"], sk["dst"] = ip_to_be32("198.51.100.1"), ip_to_be32(VM)
    sv = np.zeros(1, syn_m.value_dtype)
    sv["count"], sv["total"] = 1, 1
    syn_m.update_many(sk, sv)
    prev = ExportState()
    prev.advance(export_vm_state(fw, VM, include_acl=False))
    prev.watermark_ns = time.monotonic_ns()  # nothing below counts as changed
    # round 2: session 2 heard from, session 3 gone, session 5 new, SYN count moved
    _put_sessions(fw, VM, CLIENT, [2], last_seen_ago_s=0)
    fw.maps["sessions"].delete(keys[2:3])
    _put_sessions(fw, VM, CLIENT, [5], last_seen_ago_s=60)
    sv["count"], sv["total"] = 2, 2
    syn_m.update_many(sk, sv)
    d = delta_since(prev, export_vm_state(fw, VM, include_acl=False))
    ports = sorted(int(np.uint16(p).byteswap()) for p in d.sess_keys["port_lo"])
    assert ports == [2, 5]
    assert [int(np.uint16(p).byteswap()) for p in d.del_sess_keys["port_lo"]] == [3]
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
    """The header declares 7.2 MB of records, the body inflates to 64 MiB: refused after
    a first, counting pass, so at no point does a buffer of the declared length exist
    (Python's own allocations traced)."""
    data = bytearray(make(ident_a, {"sessions": sessions_wire(1)}, flags=0,
                          compression="zlib"))
    h = np.frombuffer(bytes(data[:HEADER_SIZE]), dtype=HEADER).copy()
    body = zlib.compress(b"\0" * (64 << 20), 9)
    declared = 200_000
    rec = wire.SESSION_WIRE.itemsize
    h["n_sessions"], h["raw_body_len"], h["body_len"] = declared, declared * rec, len(body)
    signed = h.tobytes() + body
    bomb = signed + ident_a.sign(signed)
    tracemalloc.start()
    try:
        with pytest.raises(CountMismatchError, match=f"inflates past the {declared * rec} bytes"):
            verify_bundle(bomb, trust_b, "host-b")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < declared * rec // 4, peak
