"""Verification of a bundle before anything touches a map.

Order matters: only the key id is read from an unauthenticated header (to
pick the peer key); the signature is checked before any other field is
believed and before the body is decompressed. Then: the signer is the
bundle's source host, the audience is this host, the validity window, the
layout version, the replay cache (read-only here: the importer consumes the
sequence), the counts against the body, and finally every record: it must
involve one of the VM's addresses (the bundle's address table) and hold valid
enums, keys as the datapath builds them, one address family per record. The
signer's scope must hold every one of the VM's addresses. Capacity needs the
maps and is checked by the importer, still before any write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..base.layout import Layout, load_layout
from ..base.netutil import addrs_to_ips, is_ipv4_addr
from .bundle import (
    COMP_NONE,
    FLAG_ACL,
    FLAG_ACL_BLOB,
    FLAG_DELTA,
    HEADER_SIZE,
    MAX_RAW_BODY,
    MAX_VALIDITY_S,
    SIG_LEN,
    Bundle,
    expected_raw_len,
    parse_bundle,
)
from .describe import bundle_records
from .errors import (
    AudienceError,
    BundleFormatError,
    BundleRefused,
    CountMismatchError,
    ExpiredError,
    InvalidRecordError,
    LayoutVersionError,
    NotYetValidError,
    PoisonedRecordError,
    ScopeError,
    SignatureError,
    SignerMismatchError,
    TooLargeError,
    UnknownSignerError,
)
from .peers import Peer, TrustStore, scope_text
from .replay import ReplayCache
from .vmset import (
    ADDR_BYTES,
    MAX_VM_ADDRS,
    VmAddrs,
    addr_halves,
    addr_isin,
    halves_eq,
    halves_ipv4,
    halves_isin,
    halves_lt,
)
from .wire import ACL_WIRE_FLAGS, SECTIONS, ruleset_digest, tcp_wire_flags

DEFAULT_SKEW_S = 5.0

# the session states each protocol may be in (names of the header's ST_* constants)
TCP_STATES = ("SYN_SENT", "SYN_SENT2", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSED")
UDP_STATES = ("UDP_NEW", "UDP_REPLIED", "UDP_ASSURED")
ICMP_STATES = ("ICMP",)
MAX_PORT = 65535
MAX_VLAN = 4094


@dataclass(frozen=True)
class RecordLimits:
    """The most records of each kind a bundle may announce on this host: what its
    maps could ever hold. A bundle above them is refused before its body is
    inflated, so a small compressed body cannot claim gigabytes."""

    sessions: int  # both session maps
    syn: int
    blacklist: int
    acl: int  # per VM address
    acl_blob: int = 64 << 10

    def check(self, h: np.void) -> None:
        for field, count, cap in (
            ("n_sessions", "sessions", self.sessions),
            ("n_del_sessions", "deleted sessions", self.sessions),
            ("n_syn", "SYN counters", self.syn),
            ("n_del_syn", "deleted SYN counters", self.syn),
            ("n_blacklist", "bans", self.blacklist),
            ("n_del_blacklist", "deleted bans", self.blacklist),
            ("n_acl", "ACL rules", self.acl * int(h["n_vms"])),
            ("acl_blob_len", "bytes of ACL blob", self.acl_blob),
        ):
            if int(h[field]) > cap:
                raise TooLargeError(
                    f"bundle announces {int(h[field])} {count}, this host holds at most {cap}"
                )

    def max_bundle_bytes(self) -> int:
        """The largest bundle these limits allow, stored uncompressed (zlib adds at
        most a few bytes per 16 KiB to incompressible data: 1% is plenty)."""
        sizes = {name: dt.itemsize for name, dt, _ in SECTIONS}
        raw = (
            self.sessions * (sizes["sessions"] + sizes["del_sessions"])
            + self.syn * (sizes["syn"] + sizes["del_syn"])
            + self.blacklist * (sizes["blacklist"] + sizes["del_blacklist"])
            + max(self.acl * MAX_VM_ADDRS * sizes["acl"], self.acl_blob)
        )
        table = MAX_VM_ADDRS * ADDR_BYTES
        return HEADER_SIZE + table + SIG_LEN + raw + raw // 100 + 4096


@dataclass
class VerifiedBundle:
    """A bundle whose signature, audience, freshness and records were checked."""

    bundle: Bundle
    peer: Peer
    sections: dict[str, np.ndarray | bytes]
    verified_at_ms: int

    @property
    def migration_id(self) -> bytes:
        return self.bundle.migration_id

    @property
    def seq(self) -> int:
        return self.bundle.seq

    @property
    def vms(self) -> VmAddrs:
        return self.bundle.vms

    @property
    def vm_ips(self) -> list[str]:
        return self.bundle.vm_ips


def _host_port(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.uint16).byteswap()


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _ip(values: np.ndarray, i: int) -> str:
    return addrs_to_ips(values[i : i + 1])[0]


def _describe_session(rec: np.ndarray, i: int) -> str:
    r = rec[i : i + 1]
    return (
        f"proto {int(r['proto'][0])} {_ip(r['addr_lo'], 0)} port "
        f"{int(_host_port(r['port_lo'])[0])} <-> {_ip(r['addr_hi'], 0)} port "
        f"{int(_host_port(r['port_hi'])[0])}"
    )


def _states(layout: Layout, names: tuple[str, ...]) -> np.ndarray:
    return np.array([layout.const(f"ST_{n}") for n in names], dtype=np.uint8)


def _low_bits(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The lowest n (0..64) bits of each u64."""
    n = np.asarray(n, dtype=np.uint64)
    mask = np.where(n >= np.uint64(64), np.uint64(2**64 - 1),
                    (np.uint64(1) << np.minimum(n, np.uint64(63))) - np.uint64(1))
    return x & mask


def past_prefix(values: np.ndarray, plen: np.ndarray | int) -> np.ndarray:
    """Which addresses have a one bit past the first `plen` bits (0..128)."""
    bits = 8 * ADDR_BYTES
    p = np.clip(np.broadcast_to(np.asarray(plen, dtype=np.int64), (len(values),)), 0, bits)
    hi, lo = addr_halves(values)
    half = bits // 2
    return (_low_bits(hi, half - np.clip(p, 0, half)) != 0) | (
        _low_bits(lo, half - np.clip(p - half, 0, half)) != 0
    )


def _v6_host_bits(values: np.ndarray) -> np.ndarray:
    """Which IPv6 addresses are not a /IPV6_BAN_PLEN prefix: an IPv6 source is counted
    and banned per /64, the datapath never keys one otherwise."""
    plen = load_layout().const("IPV6_BAN_PLEN")
    return ~is_ipv4_addr(values) & past_prefix(values, plen)


def check_sessions(
    rec: np.ndarray, vms: VmAddrs, layout: Layout, what: str = "session"
) -> None:
    if not len(rec):
        return
    c = layout.consts
    a_lo, a_hi = addr_halves(rec["addr_lo"]), addr_halves(rec["addr_hi"])
    foreign = ~halves_isin(a_lo, vms.addrs) & ~halves_isin(a_hi, vms.addrs)
    if foreign.any():
        i = _first(foreign)
        raise PoisonedRecordError(
            f"{what} record {i} ({_describe_session(rec, i)}) does not involve VM {vms.label}"
        )
    v4_lo = halves_ipv4(a_lo)
    mixed = v4_lo != halves_ipv4(a_hi)
    if mixed.any():
        i = _first(mixed)
        raise InvalidRecordError(
            f"{what} record {i} ({_describe_session(rec, i)}) mixes IPv4 and IPv6"
        )
    lt, eq = halves_lt(a_lo, a_hi), halves_eq(a_lo, a_hi)
    plo, phi = _host_port(rec["port_lo"]), _host_port(rec["port_hi"])
    proto = rec["proto"]
    icmp = np.where(v4_lo, proto == c["PROTO_ICMP"], proto == c["PROTO_ICMPV6"])
    wrong_icmp = np.where(v4_lo, proto == c["PROTO_ICMPV6"], proto == c["PROTO_ICMP"])
    tcp = proto == c["PROTO_TCP"]
    ported = tcp | (proto == c["PROTO_UDP"])
    normal = np.where(icmp, (lt | eq) & (phi == 0), lt | (eq & (plo <= phi)))
    normal &= ported | icmp | ((plo == 0) & (phi == 0))
    normal &= ~wrong_icmp
    if not normal.all():
        i = _first(~normal)
        raise InvalidRecordError(
            f"{what} record {i} ({_describe_session(rec, i)}) has a "
            "key that is not normalised as the datapath builds it"
        )
    if what != "session":
        return
    state = rec["state"]
    ok = np.where(
        tcp,
        np.isin(state, _states(layout, TCP_STATES)),
        np.where(
            icmp,
            np.isin(state, _states(layout, ICMP_STATES)),
            np.isin(state, _states(layout, UDP_STATES)),
        ),
    )
    if not ok.all():
        i = _first(~ok)
        raise InvalidRecordError(
            f"session record {i} has state {int(state[i])}, invalid for protocol {int(proto[i])}"
        )
    sides = (c["SIDE_LO"], c["SIDE_HI"])
    bad_side = ~np.isin(rec["initiator"], sides)
    if bad_side.any():
        i = _first(bad_side)
        raise InvalidRecordError(f"session record {i} has initiator {int(rec['initiator'][i])}")
    known = np.uint8(c["SESS_F_ALL"])
    if (rec["flags"] & ~known).any():
        i = _first((rec["flags"] & ~known) != 0)
        raise InvalidRecordError(f"session record {i} has unknown flags {int(rec['flags'][i]):#x}")
    tcp_ok = (rec["tcp_scale"] <= c["TCP_MAX_WSCALE"]).all(axis=1)
    tcp_ok &= ((rec["tcp_flags"] & ~np.uint8(tcp_wire_flags(layout))) == 0).all(axis=1)
    tcp_ok &= tcp | ((rec["tcp_scale"] == 0) & (rec["tcp_flags"] == 0)).all(axis=1)
    if not tcp_ok.all():
        i = _first(~tcp_ok)
        raise InvalidRecordError(f"session record {i} has invalid TCP window scale or flags")


def _check_vm_field(values: np.ndarray, vms: VmAddrs, what: str) -> None:
    """Every record's VM field is one of the VM's addresses."""
    bad = ~vms.contains(values)
    if bad.any():
        i = _first(bad)
        raise PoisonedRecordError(f"{what} {i} is for {_ip(values, i)}, not VM {vms.label}")


def _check_sources(src: np.ndarray, vm: np.ndarray, what: str) -> None:
    """A SYN counter's or ban's source: of its VM's family, an IPv6 one as its /64."""
    bad = is_ipv4_addr(src) != is_ipv4_addr(vm)
    if bad.any():
        i = _first(bad)
        raise InvalidRecordError(
            f"{what} {i}: source {_ip(src, i)} and VM {_ip(vm, i)} are of two families"
        )
    bad = _v6_host_bits(src)
    if bad.any():
        i = _first(bad)
        raise InvalidRecordError(
            f"{what} {i}: IPv6 source {_ip(src, i)} is not a /64 as the datapath keys it"
        )


def check_acl(acl: np.ndarray, vms: VmAddrs, layout: Layout) -> None:
    c = layout.consts
    _check_vm_field(acl["vm"], vms, "ACL rule")
    cap = c["SAMIXDP_ACL_MAX_RULES_PER_SET"]
    for i, ip in enumerate(vms.ips):
        n = int(addr_isin(acl["vm"], vms.addrs[i : i + 1]).sum())
        if n > cap:
            raise InvalidRecordError(f"{n} ACL rules for VM address {ip}, at most {cap}")
    v4 = is_ipv4_addr(acl["vm"])
    icmp = np.where(v4, c["PROTO_ICMP"], c["PROTO_ICMPV6"])
    bad = ~np.isin(acl["action"], (c["ACL_ACT_ALLOW"], c["ACL_ACT_DENY"]))
    ported = np.isin(acl["proto"], (c["PROTO_TCP"], c["PROTO_UDP"]))
    bad |= ~(ported | (acl["proto"] == c["ACL_PROTO_ANY"]) | (acl["proto"] == icmp))
    bad |= acl["dport_lo"] > acl["dport_hi"]
    bad |= ~ported & ((acl["dport_lo"] != 0) | (acl["dport_hi"] != MAX_PORT))
    bad |= acl["vlan"] > MAX_VLAN
    bad |= (acl["flags"] & ~np.uint8(ACL_WIRE_FLAGS)) != 0
    # the source: a prefix of the VM's family (its address bits past the length zero)
    plen = acl["src_plen"].astype(np.int64)
    bad |= plen > 8 * ADDR_BYTES
    bad |= past_prefix(acl["src_addr"], plen)
    mapped_plen = c["IPV4_MAPPED_PLEN"]
    any_src = plen == 0
    bad |= ~any_src & (is_ipv4_addr(acl["src_addr"]) != v4)
    bad |= ~any_src & v4 & (plen < mapped_plen)
    if bad.any():
        raise InvalidRecordError(f"ACL rule {_first(bad)} is invalid")


def check_records(b: Bundle, sections: dict[str, np.ndarray | bytes]) -> None:
    """Every record involves one of the VM's addresses and holds valid values."""
    layout = load_layout()
    vms = b.vms
    sessions = sections["sessions"]
    assert isinstance(sessions, np.ndarray)
    check_sessions(sessions, vms, layout)

    syn = sections["syn"]
    assert isinstance(syn, np.ndarray)
    if len(syn):
        _check_vm_field(syn["dst"], vms, "SYN counter record")
        _check_sources(syn["src"], syn["dst"], "SYN counter record")
        if (syn["count"] > syn["total"]).any():
            raise InvalidRecordError("a SYN counter has a window count above its total")

    bl = sections["blacklist"]
    assert isinstance(bl, np.ndarray)
    if len(bl):
        _check_vm_field(bl["vm"], vms, "blacklist record")
        _check_sources(bl["src"], bl["vm"], "blacklist record")
        if (bl["remaining_ms"] == 0).any():
            raise InvalidRecordError("a blacklist record has no ban time left")

    acl = sections["acl"]
    if b.has_acl and isinstance(acl, np.ndarray) and len(acl):
        check_acl(acl, vms, layout)

    dsess = sections["del_sessions"]
    assert isinstance(dsess, np.ndarray)
    check_sessions(dsess, vms, layout, what="deleted-session")
    dsyn = sections["del_syn"]
    dbl = sections["del_blacklist"]
    assert isinstance(dsyn, np.ndarray) and isinstance(dbl, np.ndarray)
    if len(dsyn):
        _check_vm_field(dsyn["dst"], vms, "deleted SYN counter")
        _check_sources(dsyn["src"], dsyn["dst"], "deleted SYN counter")
    if len(dbl):
        _check_vm_field(dbl["vm"], vms, "deleted blacklist entry")
        _check_sources(dbl["src"], dbl["vm"], "deleted blacklist entry")


def check_counts(b: Bundle) -> None:
    h = b.header
    flags = b.flags
    raw = expected_raw_len(h)
    if raw > MAX_RAW_BODY:
        raise CountMismatchError(f"bundle announces {raw} bytes of records, over the limit")
    if raw != int(h["raw_body_len"]):
        raise CountMismatchError(
            f"record counts make {raw} bytes, header says the body holds {int(h['raw_body_len'])}"
        )
    if int(h["compression"]) == COMP_NONE and int(h["body_len"]) != raw:
        raise CountMismatchError("uncompressed body length differs from the record sections")
    if not flags & FLAG_ACL and (int(h["n_acl"]) or int(h["acl_blob_len"])):
        raise CountMismatchError("ACL records present but the ACL flag is not set")
    if flags & FLAG_ACL_BLOB and (int(h["n_acl"]) or not flags & FLAG_ACL):
        raise CountMismatchError("ACL blob flag set with ACL records or without the ACL flag")
    if not flags & FLAG_ACL_BLOB and int(h["acl_blob_len"]):
        raise CountMismatchError("ACL blob length set without the blob flag")
    if not flags & FLAG_DELTA and (
        int(h["n_del_sessions"]) or int(h["n_del_syn"]) or int(h["n_del_blacklist"])
    ):
        raise CountMismatchError("a full bundle carries delete lists")


def check_scope(peer: Peer, vms: VmAddrs) -> None:
    """Every one of the VM's addresses must lie in the peer's scope: one outside it
    refuses the whole bundle, naming that address."""
    inside = peer.covers_all(vms.addrs)
    if not inside.all():
        ip = vms.ips[_first(~inside)]
        raise ScopeError(
            f"bundle for VM {ip} is outside the scope of peer {peer.name} "
            f"(vms: {scope_text(peer.vms)})"
        )


def verify_bundle(
    data: bytes | bytearray | memoryview | Bundle,
    trust: TrustStore,
    host_id: str | None,
    replay: ReplayCache | None = None,
    *,
    now_ms: int | None = None,
    skew_s: float = DEFAULT_SKEW_S,
    layout_version: int | None = None,
    limits: RecordLimits | None = None,
) -> VerifiedBundle:
    """Raises a BundleRefused subclass naming the first failed check.

    `host_id` None skips the audience check (inspection without an identity);
    `replay` None skips the replay check; `limits` (this host's map capacities)
    None allows up to MAX_RAW_BODY. Nothing is recorded anywhere."""
    b = data if isinstance(data, Bundle) else parse_bundle(data)
    peer = trust.by_key_id(b.key_id)
    if peer is None:
        raise UnknownSignerError(
            f"bundle signed by unknown key {b.key_id.hex()}: no trusted peer has it"
        )
    if not peer.verify(b.signature, bytes(b.signed_part)):
        raise SignatureError(
            f"bad signature: bundle is not signed by {peer.name}'s key (tampered or forged)"
        )
    source = b.source
    if source != peer.name:
        raise SignerMismatchError(
            f"bundle claims source host {source!r} but is signed by peer {peer.name!r}"
        )
    check_scope(peer, b.vms)
    audience = b.audience
    if host_id is not None and audience != host_id:
        raise AudienceError(f"bundle is addressed to {audience!r}, this host is {host_id!r}")
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    skew = int(skew_s * 1000)
    if b.expires_at_ms < b.issued_at_ms or b.expires_at_ms - b.issued_at_ms > MAX_VALIDITY_S * 1000:
        raise BundleFormatError("bundle validity window is negative or longer than a day")
    if now > b.expires_at_ms + skew:
        raise ExpiredError(
            f"bundle expired {(now - b.expires_at_ms) / 1000:.1f} s ago (issued "
            f"{(now - b.issued_at_ms) / 1000:.1f} s ago)"
        )
    if b.issued_at_ms > now + skew:
        raise NotYetValidError(
            f"bundle issued {(b.issued_at_ms - now) / 1000:.1f} s in the future (clock skew?)"
        )
    want_layout = layout_version or load_layout().consts["SAMIXDP_LAYOUT_VERSION"]
    if int(b.header["layout_version"]) != want_layout:
        raise LayoutVersionError(
            f"bundle has map layout version {int(b.header['layout_version'])}, this host "
            f"uses {want_layout}"
        )
    if replay is not None:
        replay.check(b.migration_id, b.seq)
    check_counts(b)
    if limits is not None:
        limits.check(b.header)
    sections = b.sections()
    if b.has_acl:
        acl = sections["acl"]
        raw = acl if isinstance(acl, bytes) else acl.tobytes()
        if ruleset_digest(raw) != b.ruleset_digest:
            raise CountMismatchError("ACL section does not match the header's ruleset digest")
    check_records(b, sections)
    return VerifiedBundle(bundle=b, peer=peer, sections=sections, verified_at_ms=now)


def authentic_sections(b: Bundle, trust: TrustStore) -> dict[str, np.ndarray | bytes] | None:
    """The records of a bundle signed by a trusted peer whose counts hold (None if
    not): what `inspect` may show of a bundle refused for another reason."""
    peer = trust.by_key_id(b.key_id)
    if peer is None or not peer.verify(b.signature, bytes(b.signed_part)):
        return None
    try:
        check_counts(b)
        return b.sections()
    except BundleRefused:
        return None


def inspect_bundle(
    data: bytes,
    trust: TrustStore,
    host_id: str | None,
    replay: ReplayCache | None = None,
    *,
    now_ms: int | None = None,
    records: bool = False,
) -> dict[str, object]:
    """Verifies without consuming anything and summarises the bundle (`records`:
    and lists its records, when a trusted peer signed it).

    Header fields are reported even when verification fails (then they are
    unauthenticated claims: `valid` is False and `reason` says why)."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    out: dict[str, object] = {"bytes": len(data), "valid": False}
    try:
        b = parse_bundle(data)
    except BundleFormatError as exc:
        out["reason"] = str(exc)
        out["refusal"] = exc.reason
        return out
    counts = b.counts()
    out.update(
        {
            "migration_id": b.migration_id.hex(),
            "seq": b.seq,
            "kind": b.kind,
            "vm": b.vm_label,
            "vms": b.vm_ips,
            "compression": b.compression,
            "layout_version": int(b.header["layout_version"]),
            "key_id": b.key_id.hex(),
            "issued_at_ms": b.issued_at_ms,
            "expires_at_ms": b.expires_at_ms,
            "age_s": round((now - b.issued_at_ms) / 1000, 3),
            "expires_in_s": round((b.expires_at_ms - now) / 1000, 3),
            "counts": counts,
            "acl": ("blob" if b.flags & FLAG_ACL_BLOB else "records") if b.has_acl else "absent",
            "ruleset_digest": b.ruleset_digest.hex(),
            "bytes_per_session": round(len(data) / counts["sessions"], 2)
            if counts["sessions"]
            else None,
        }
    )
    for field_name, fn in (("source", lambda: b.source), ("audience", lambda: b.audience)):
        try:
            out[field_name] = fn()
        except BundleFormatError:
            out[field_name] = None
    peer = trust.by_key_id(b.key_id)
    out["signer"] = peer.name if peer else None
    if records:
        sections = authentic_sections(b, trust)
        if sections is not None:
            out["records"] = bundle_records(sections, load_layout())
    try:
        verify_bundle(b, trust, host_id, replay, now_ms=now)
    except BundleRefused as exc:
        out["reason"] = str(exc)
        out["refusal"] = exc.reason
        return out
    out["valid"] = True
    out["reason"] = None
    notes = []
    if host_id is None:
        notes.append("no local host identity: audience not checked")
    if replay is None:
        notes.append("no replay cache here: replay not checked")
    notes.append("map capacity is checked at import")
    out["notes"] = notes
    return out
