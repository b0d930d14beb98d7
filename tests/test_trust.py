"""Host identity, trust store, replay cache, and the trust checks of verification
(signer, audience, validity window, replay). Pure Python, real Ed25519."""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

import numpy as np
import pytest

from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import ip_to_addr, port_be
from sami_xdp.migrate import wire
from sami_xdp.migrate.bundle import encode_bundle
from sami_xdp.migrate.errors import (
    AudienceError,
    ExpiredError,
    IdentityError,
    NotYetValidError,
    ReplayError,
    SignatureError,
    SignerMismatchError,
    TrustStoreError,
    UnknownSignerError,
)
from sami_xdp.migrate.keys import (
    HOST_KEY_FILE,
    HostIdentity,
    key_id_of,
    parse_address,
    parse_public,
)
from sami_xdp.migrate.peers import TrustStore
from sami_xdp.migrate.replay import ReplayCache
from sami_xdp.migrate.verify import inspect_bundle, verify_bundle

VM = "10.1.1.1"
LAYOUT = load_layout().const("SAMIXDP_LAYOUT_VERSION")


def bundle(
    ident: HostIdentity,
    audience: str = "host-b",
    seq: int = 1,
    mid: bytes = b"m" * 16,
    **kw: Any,
) -> bytes:
    rec = np.zeros(1, dtype=wire.SESSION_WIRE)
    rec["addr_lo"], rec["addr_hi"] = ip_to_addr(VM), ip_to_addr("192.0.2.10")
    rec["port_lo"], rec["port_hi"] = port_be(22), port_be(50000)
    rec["proto"], rec["state"] = 6, 3
    return encode_bundle(
        {"sessions": rec},
        identity=ident,
        vms=[VM],
        audience=audience,
        seq=seq,
        migration_id=mid,
        layout_version=LAYOUT,
        **kw,
    )


@pytest.fixture
def hosts(tmp_path):
    """Two hosts' config dirs, each trusting the other."""
    a = HostIdentity.init(tmp_path / "a", "host-a")
    b = HostIdentity.init(tmp_path / "b", "host-b")
    for me, other in ((tmp_path / "a", b), (tmp_path / "b", a)):
        t = TrustStore.load(me)
        t.add(other.host_id, "127.0.0.1:7800", other.public_b64, vms="10.1.1.0/24")
        t.save()
    return a, b, tmp_path


# ---- identity --------------------------------------------------------------------------


def test_keys_init_files_modes_and_reload(tmp_path):
    ident = HostIdentity.init(tmp_path / "cfg", "host-a")
    key = tmp_path / "cfg" / HOST_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    meta = json.loads((tmp_path / "cfg" / "host.json").read_text())
    assert meta == {
        "host_id": "host-a",
        "public_key": ident.public_b64,
        "key_id": ident.key_id.hex(),
    }
    again = HostIdentity.load(tmp_path / "cfg")
    assert again.host_id == "host-a" and again.public_raw == ident.public_raw
    assert ident.key_id == key_id_of(ident.public_raw) and len(ident.key_id) == 8


def test_keys_init_default_host_id_refuse_overwrite_force(tmp_path):
    ident = HostIdentity.init(tmp_path)
    assert ident.host_id == os.uname().nodename.split(".")[0]
    with pytest.raises(IdentityError, match="already exists"):
        HostIdentity.init(tmp_path, "other")
    new = HostIdentity.init(tmp_path, "other", force=True)
    assert new.public_raw != ident.public_raw
    assert HostIdentity.load(tmp_path).host_id == "other"


def test_identity_refuses_bad_names_missing_and_readable_keys(tmp_path):
    for bad in ("", "-x", "a b", "x" * 33, "höst"):
        with pytest.raises(IdentityError):
            HostIdentity.init(tmp_path / "n", bad)
    with pytest.raises(IdentityError, match="keys init"):
        HostIdentity.load(tmp_path / "missing")
    HostIdentity.init(tmp_path / "c", "host-c")
    (tmp_path / "c" / HOST_KEY_FILE).chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        HostIdentity.load(tmp_path / "c")


# ---- trust store ------------------------------------------------------------------------


def test_trust_store_round_trip_and_lookup(hosts):
    a, b, root = hosts
    t = TrustStore.load(root / "b")
    assert [p.name for p in t.peers()] == ["host-a"]
    p = t.get("host-a")
    assert p.public_raw == a.public_raw and p.address == "127.0.0.1:7800"
    assert t.by_key_id(a.key_id) == p and t.by_key_id(b.key_id) is None
    with pytest.raises(TrustStoreError, match="unknown peer"):
        t.get("host-z")


def test_trust_store_validation(hosts):
    a, b, root = hosts
    t = TrustStore.load(root / "b")
    with pytest.raises(TrustStoreError, match="already exists"):
        t.add("host-a", "10.0.0.1:1", a.public_b64)
    with pytest.raises(TrustStoreError, match="already belongs"):
        t.add("host-x", "10.0.0.1:1", a.public_b64)
    for addr in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", ":80", "a b:1"):
        with pytest.raises(TrustStoreError):
            t.add("host-y", addr, b.public_b64)
    for key in ("abc", "A" * 44, b.public_b64[:-4]):
        with pytest.raises(TrustStoreError):
            t.add("host-y", "10.0.0.1:1", key)
    assert parse_public(a.public_raw.hex()) == a.public_raw
    assert parse_address("[fe80::1]:7800") == ("fe80::1", 7800)
    t.add("host-a", "10.9.9.9:7800", a.public_b64, replace=True)
    t.save()
    assert TrustStore.load(root / "b").get("host-a").address == "10.9.9.9:7800"
    (root / "b" / "peers.json").write_text("{not json")
    with pytest.raises(TrustStoreError, match="cannot read peers file"):
        TrustStore.load(root / "b")


# ---- verification: who, to whom, when ------------------------------------------------------


def test_accepts_trusted_signer_for_this_host(hosts):
    a, b, root = hosts
    vb = verify_bundle(bundle(a), TrustStore.load(root / "b"), "host-b")
    assert vb.peer.name == "host-a" and vb.vm_ips == [VM]


def test_unknown_signer(hosts, tmp_path):
    a, b, root = hosts
    stranger = HostIdentity.generate("host-a")
    with pytest.raises(UnknownSignerError):
        verify_bundle(bundle(stranger), TrustStore.load(root / "b"), "host-b")


def test_wrong_key_for_a_trusted_key_id(hosts):
    """Right key id, signature made with another key: refused as a bad signature."""
    a, b, root = hosts
    impostor = HostIdentity(host_id="host-a", private_key=HostIdentity.generate("x").private_key)
    impostor_bytes = bundle(impostor)
    # forge the key id field to point at host-a's key
    from sami_xdp.migrate.bundle import HEADER

    data = bytearray(impostor_bytes)
    off = HEADER.fields["key_id"][1]
    data[off : off + 8] = a.key_id
    with pytest.raises(SignatureError):
        verify_bundle(bytes(data), TrustStore.load(root / "b"), "host-b")


def test_signer_must_be_the_named_source(hosts, tmp_path):
    a, b, root = hosts
    c = HostIdentity.init(tmp_path / "c", "host-c")
    t = TrustStore.load(root / "b")
    t.add("host-c", "127.0.0.1:7801", c.public_b64, vms="10.1.1.0/24")
    liar = HostIdentity(host_id="host-a", private_key=c.private_key)  # claims to be host-a
    with pytest.raises(SignerMismatchError):
        verify_bundle(bundle(liar), t, "host-b")


def test_wrong_audience(hosts):
    a, b, root = hosts
    with pytest.raises(AudienceError, match="host-c"):
        verify_bundle(bundle(a, audience="host-c"), TrustStore.load(root / "b"), "host-b")


def test_expiry_and_clock_skew(hosts):
    a, b, root = hosts
    t = TrustStore.load(root / "b")
    now = int(time.time() * 1000)
    data = bundle(a, issued_at_ms=now - 60_000, validity_s=30)
    with pytest.raises(ExpiredError):
        verify_bundle(data, t, "host-b", now_ms=now)
    # within the skew allowance (5 s) after expiry: still accepted
    verify_bundle(data, t, "host-b", now_ms=now - 30_000 + 4_000)
    with pytest.raises(ExpiredError):
        verify_bundle(data, t, "host-b", now_ms=now - 30_000 + 6_000)
    future = bundle(a, issued_at_ms=now + 60_000)
    with pytest.raises(NotYetValidError):
        verify_bundle(future, t, "host-b", now_ms=now)


# ---- replay cache -------------------------------------------------------------------------


def test_replay_cache_survives_restart(tmp_path):
    mid = b"x" * 16
    rc = ReplayCache(tmp_path)
    rc.check(mid, 1)
    assert not rc.seen(mid, 1)
    rc.consume(mid, 1, int(time.time() * 1000) + 60_000)
    with pytest.raises(ReplayError, match="already accepted"):
        rc.consume(mid, 1, 0)
    rc.close()
    rc2 = ReplayCache(tmp_path)  # a restart: a new process opens the same file
    with pytest.raises(ReplayError, match="already accepted"):
        rc2.check(mid, 1)
    with pytest.raises(ReplayError):
        rc2.consume(mid, 1, 0)
    rc2.consume(mid, 3, int(time.time() * 1000) + 60_000)
    with pytest.raises(ReplayError, match="stale"):
        rc2.consume(mid, 2, 0)  # older than an accepted round
    rc2.consume(b"y" * 16, 1, int(time.time() * 1000) + 60_000)  # other migrations unaffected
    rc2.close_migration(mid)
    with pytest.raises(ReplayError, match="aborted"):
        rc2.check(mid, 9)
    rc2.close()


def test_replay_refused_by_verify_also_after_restart(hosts):
    a, b, root = hosts
    t = TrustStore.load(root / "b")
    data = bundle(a, seq=5)
    state = root / "b-state"
    rc = ReplayCache(state)
    vb = verify_bundle(data, t, "host-b", rc)
    rc.consume(vb.migration_id, vb.seq, vb.bundle.expires_at_ms)
    with pytest.raises(ReplayError):
        verify_bundle(data, t, "host-b", rc)
    rc.close()
    with ReplayCache(state) as rc2:
        with pytest.raises(ReplayError):
            verify_bundle(data, t, "host-b", rc2)
        verify_bundle(bundle(a, seq=6), t, "host-b", rc2)  # the next round is fine


def test_inspect_does_not_consume(hosts):
    a, b, root = hosts
    t = TrustStore.load(root / "b")
    data = bundle(a)
    with ReplayCache(root / "st") as rc:
        for _ in range(2):
            info = inspect_bundle(data, t, "host-b", rc)
            assert info["valid"] and info["signer"] == "host-a" and info["vm"] == VM
            assert info["counts"]["sessions"] == 1 and info["audience"] == "host-b"
        assert rc.count() == 0
        bad = inspect_bundle(data, t, "host-z", rc)
        assert not bad["valid"] and bad["refusal"] == "wrong-audience"
        junk = inspect_bundle(b"nonsense", t, "host-b", rc)
        assert not junk["valid"] and junk["refusal"] == "malformed"


# ---- scopes of either family ----------------------------------------------------------------


def test_a_scope_holds_prefixes_of_both_families_canonically(hosts):
    from sami_xdp.migrate.peers import parse_scope, scope_text

    a, b, root = hosts
    scope = parse_scope(" 2001:DB8:1:0::/64,10.1.1.0/24 ,2001:db8:1::10/128")
    assert scope_text(scope) == "10.1.1.0/24,2001:db8:1::/64,2001:db8:1::10/128"
    t = TrustStore.load(root / "b")
    t.set_vms("host-a", scope)
    t.save()
    doc = json.loads((root / "b" / "peers.json").read_text())
    assert doc["peers"][0]["vms"] == ["10.1.1.0/24", "2001:db8:1::/64", "2001:db8:1::10/128"]
    p = TrustStore.load(root / "b").get("host-a")
    assert p.covers("2001:db8:1::ffff") and p.covers("10.1.1.9")
    assert not p.covers("2001:db8:2::1") and not p.covers("10.1.2.1")
    assert p.covers("::ffff:10.1.1.9")  # the IPv4-mapped form is the IPv4 address
    for bad in ("2001:db8::/129", "2001:db8::g/64", "10.1.1.0/33", "x"):
        with pytest.raises(TrustStoreError, match="not an IP prefix"):
            parse_scope(bad)
    # an IPv6 prefix around the IPv4-mapped space would cover every IPv4 VM
    for wide in ("::/0", "::/80", "::ffff:0:0/95"):
        with pytest.raises(TrustStoreError, match="covers the IPv4-mapped space"):
            parse_scope(f"10.1.1.0/24,{wide}")
    assert parse_scope("::ffff:10.1.1.0/120") == parse_scope("10.1.1.0/24")
    doc["peers"][0]["vms"] = ["2001:db8:1::/64", "::/0"]  # written by hand
    (root / "b" / "peers.json").write_text(json.dumps(doc))
    with pytest.raises(TrustStoreError, match="covers the IPv4-mapped space"):
        TrustStore.load(root / "b")


def test_peers_cli_takes_and_prints_ipv6_scopes(tmp_path):
    from typer.testing import CliRunner

    from sami_xdp.cli import app

    runner = CliRunner()
    other = HostIdentity.generate("host-a")
    cfg = ["--config-dir", str(tmp_path)]
    res = runner.invoke(app, [*cfg, "peers", "add", "host-a", "--address", "[2001:db8::1]:7800",
                              "--key", other.public_b64, "--vms", "10.1.1.0/24,2001:DB8:1::/64"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "vms 10.1.1.0/24,2001:db8:1::/64" in res.output
    listed = json.loads(runner.invoke(app, [*cfg, "peers", "list", "--json"]).output)
    assert listed[0]["vms"] == ["10.1.1.0/24", "2001:db8:1::/64"]
    res = runner.invoke(app, [*cfg, "peers", "set-vms", "host-a", "2001:db8:1::10"])
    assert res.exit_code == 0 and "may send state for: 2001:db8:1::10/128" in res.output
    res = runner.invoke(app, [*cfg, "peers", "set-vms", "host-a", "2001:db8:1::/129"])
    assert isinstance(res.exception, TrustStoreError)
    assert TrustStore.load(tmp_path).get("host-a").vms[0].compressed == "2001:db8:1::10/128"
