"""Verification of a bundle before anything touches a map.

Order matters: only the key id is read from an unauthenticated header (to
pick the peer key); the signature is checked before any other field is
believed and before the body is decompressed. Then: the signer is the
bundle's source host, the audience is this host, the validity window, the
layout version, the replay cache (read-only here: the importer consumes the
sequence), the counts against the body, and finally every record: it must
belong to the header's VM and hold valid enums. Capacity needs the maps and
is checked by the importer, still before any write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..base.layout import Layout, load_layout
from ..base.netutil import be32_to_ip
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
from .wire import ACL_WIRE_FLAGS, SECTIONS, ruleset_digest, tcp_wire_flags

DEFAULT_SKEW_S = 5.0

# the session states each protocol may be in (names of the header's ST_* constants)
TCP_STATES = ("SYN_SENT", "SYN_SENT2", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSED")
UDP_STATES = ("UDP_NEW", "UDP_REPLIED", "UDP_ASSURED")
ICMP_STATES = ("ICMP",)


@dataclass(frozen=True)
class RecordLimits:
    """The most records of each kind a bundle may announce on this host: what its
    maps could ever hold. A bundle above them is refused before its body is
    inflated, so a small compressed body cannot claim gigabytes."""

    sessions: int  # both session maps
    syn: int
    blacklist: int
    acl: int
    acl_blob: int = 64 << 10

    def check(self, h: np.void) -> None:
        for field, count, cap in (
            ("n_sessions", "sessions", self.sessions),
            ("n_del_sessions", "deleted sessions", self.sessions),
            ("n_syn", "SYN counters", self.syn),
            ("n_del_syn", "deleted SYN counters", self.syn),
            ("n_blacklist", "bans", self.blacklist),
            ("n_del_blacklist", "deleted bans", self.blacklist),
            ("n_acl", "ACL rules", self.acl),
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
            + max(self.acl * sizes["acl"], self.acl_blob)
        )
        return HEADER_SIZE + SIG_LEN + raw + raw // 100 + 4096


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
    def vm(self) -> int:
        return self.bundle.vm

    @property
    def vm_ip(self) -> str:
        return self.bundle.vm_ip


def _host_port(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.uint16).byteswap()


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _describe_session(rec: np.void) -> str:
    return (
        f"proto {int(rec['proto'])} {be32_to_ip(int(rec['addr_lo']))}:"
        f"{int(_host_port(np.array([rec['port_lo']]))[0])} <-> "
        f"{be32_to_ip(int(rec['addr_hi']))}:{int(_host_port(np.array([rec['port_hi']]))[0])}"
    )


def _states(layout: Layout, names: tuple[str, ...]) -> np.ndarray:
    return np.array([layout.const(f"ST_{n}") for n in names], dtype=np.uint8)


def check_sessions(rec: np.ndarray, vm: int, layout: Layout, what: str = "session") -> None:
    if not len(rec):
        return
    c = layout.consts
    foreign = (rec["addr_lo"] != vm) & (rec["addr_hi"] != vm)
    if foreign.any():
        i = _first(foreign)
        raise PoisonedRecordError(
            f"{what} record {i} ({_describe_session(rec[i])}) does not involve VM {be32_to_ip(vm)}"
        )
    lo = np.asarray(rec["addr_lo"], dtype=np.uint32).byteswap()
    hi = np.asarray(rec["addr_hi"], dtype=np.uint32).byteswap()
    plo, phi = _host_port(rec["port_lo"]), _host_port(rec["port_hi"])
    proto = rec["proto"]
    icmp = proto == c["PROTO_ICMP"]
    tcp = proto == c["PROTO_TCP"]
    ported = tcp | (proto == c["PROTO_UDP"])
    normal = np.where(
        icmp,
        (lo <= hi) & (phi == 0),
        (lo < hi) | ((lo == hi) & (plo <= phi)),
    )
    normal &= ported | icmp | ((plo == 0) & (phi == 0))
    if not normal.all():
        i = _first(~normal)
        raise InvalidRecordError(
            f"{what} record {i} ({_describe_session(rec[i])}) has a "
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


def check_records(b: Bundle, sections: dict[str, np.ndarray | bytes]) -> None:
    """Every record belongs to the header's VM and holds valid values."""
    layout = load_layout()
    c = layout.consts
    vm = b.vm
    vm_ip = be32_to_ip(vm)
    sessions = sections["sessions"]
    assert isinstance(sessions, np.ndarray)
    check_sessions(sessions, vm, layout)

    syn = sections["syn"]
    assert isinstance(syn, np.ndarray)
    if len(syn):
        bad = syn["dst"] != vm
        if bad.any():
            i = _first(bad)
            raise PoisonedRecordError(
                f"SYN counter record {i} is towards {be32_to_ip(int(syn['dst'][i]))}, "
                f"not VM {vm_ip}"
            )
        if (syn["count"] > syn["total"]).any():
            raise InvalidRecordError("a SYN counter has a window count above its total")

    bl = sections["blacklist"]
    assert isinstance(bl, np.ndarray)
    if len(bl):
        bad = bl["vm"] != vm
        if bad.any():
            i = _first(bad)
            raise PoisonedRecordError(
                f"blacklist record {i} ({be32_to_ip(int(bl['src'][i]))}) was triggered by "
                f"{be32_to_ip(int(bl['vm'][i]))}, not VM {vm_ip}"
            )
        if (bl["remaining_ms"] == 0).any():
            raise InvalidRecordError("a blacklist record has no ban time left")

    acl = sections["acl"]
    if b.has_acl and isinstance(acl, np.ndarray):
        cap = c["SAMIXDP_ACL_MAX_RULES_PER_SET"]
        if len(acl) > cap:
            raise InvalidRecordError(f"{len(acl)} ACL rules for one VM, at most {cap}")
        bad = ~np.isin(acl["action"], (c["ACL_ACT_ALLOW"], c["ACL_ACT_DENY"]))
        ported = np.isin(acl["proto"], (c["PROTO_TCP"], c["PROTO_UDP"]))
        bad |= ~(ported | np.isin(acl["proto"], (c["ACL_PROTO_ANY"], c["PROTO_ICMP"])))
        bad |= acl["dport_lo"] > acl["dport_hi"]
        bad |= ~ported & ((acl["dport_lo"] != 0) | (acl["dport_hi"] != 65535))
        bad |= (acl["src_addr"] & ~acl["src_mask"]) != 0
        inv = ~np.asarray(acl["src_mask"], dtype=np.uint32).byteswap()  # host order
        bad |= (inv & (inv + np.uint32(1))) != 0  # the mask is not a prefix
        bad |= acl["vlan"] > 4094
        bad |= (acl["flags"] & ~np.uint32(ACL_WIRE_FLAGS)) != 0
        if bad.any():
            raise InvalidRecordError(f"ACL rule {_first(bad)} is invalid")

    dsess = sections["del_sessions"]
    assert isinstance(dsess, np.ndarray)
    check_sessions(dsess, vm, layout, what="deleted-session")
    dsyn = sections["del_syn"]
    dbl = sections["del_blacklist"]
    assert isinstance(dsyn, np.ndarray) and isinstance(dbl, np.ndarray)
    if len(dsyn) and (dsyn["dst"] != vm).any():
        raise PoisonedRecordError(f"a deleted SYN counter is not towards VM {vm_ip}")
    if len(dbl) and (dbl["vm"] != vm).any():
        raise PoisonedRecordError(f"a deleted blacklist entry does not belong to VM {vm_ip}")


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
    if not peer.covers(b.vm):
        raise ScopeError(
            f"bundle for VM {b.vm_ip} is outside the scope of peer {peer.name} "
            f"(vms: {scope_text(peer.vms)})"
        )
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


def inspect_bundle(
    data: bytes,
    trust: TrustStore,
    host_id: str | None,
    replay: ReplayCache | None = None,
    *,
    now_ms: int | None = None,
) -> dict[str, object]:
    """Verifies without consuming anything and summarises the bundle.

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
            "vm": b.vm_ip,
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
