"""Signed control messages (preflight, acknowledgements, abort): who may say what.

Pure Python with real Ed25519 keys: a message is believed only when it is signed by
a trusted peer's key, names that peer as its sender, is addressed to this host and
is fresh."""

from __future__ import annotations

import base64
import json
import time

import pytest

from sami_xdp.migrate import HostIdentity, ReplayCache, TrustStore
from sami_xdp.migrate.control import (
    MAX_SKEW_MS,
    ControlError,
    nonce_of,
    sign_control,
    verify_control,
)
from sami_xdp.migrate.fields import FieldError, want_int, want_ip, want_mid, want_vms
from sami_xdp.migrate.vmset import MAX_VM_ADDRS


@pytest.fixture(scope="module")
def hosts() -> tuple[HostIdentity, HostIdentity, TrustStore]:
    a, c = HostIdentity.generate("host-a"), HostIdentity.generate("host-c")
    trust_b = TrustStore()
    trust_b.add("host-a", "192.0.2.1:7800", a.public_raw)
    trust_b.add("host-c", "192.0.2.3:7800", c.public_raw)
    return a, c, trust_b


def _resign(ident: HostIdentity, body: dict) -> bytes:
    """A message with an arbitrary body, correctly signed by `ident`."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    sig = ident.sign(b"samixdp-control-v1\0" + canon)
    return json.dumps({"body": body, "key_id": ident.key_id.hex(),
                       "sig": base64.b64encode(sig).decode()}).encode()


def test_a_trusted_fresh_message_addressed_here_is_believed(hosts):
    a, _, trust_b = hosts
    peer, body = verify_control(sign_control(a, {"type": "abort", "to": "host-b"}), trust_b,
                                "host-b", expect_from="host-a")
    assert peer.name == "host-a" and body["type"] == "abort" and body["from"] == "host-a"


def test_message_for_another_host_is_refused(hosts):
    a, _, trust_b = hosts
    with pytest.raises(ControlError, match="addressed to host-x"):
        verify_control(sign_control(a, {"type": "abort", "to": "host-x"}), trust_b, "host-b")


def test_stale_and_future_messages_are_refused(hosts):
    a, _, trust_b = hosts
    now = int(time.time() * 1000)
    for ts in (now - MAX_SKEW_MS - 5000, now + MAX_SKEW_MS + 5000):
        msg = _resign(a, {"type": "abort", "to": "host-b", "from": "host-a", "ts_ms": ts,
                          "nonce": "0" * 32})
        with pytest.raises(ControlError, match="stale"):
            verify_control(msg, trust_b, "host-b")


def test_tampered_body_and_untrusted_key_are_refused(hosts):
    a, _, trust_b = hosts
    doc = json.loads(sign_control(a, {"type": "abort", "to": "host-b", "migration_id": "00"}))
    doc["body"]["migration_id"] = "ff"
    with pytest.raises(ControlError, match="bad signature"):
        verify_control(json.dumps(doc).encode(), trust_b, "host-b")
    stranger = HostIdentity.generate("host-a")  # same name, unknown key
    with pytest.raises(ControlError, match="untrusted key"):
        verify_control(sign_control(stranger, {"to": "host-b"}), trust_b, "host-b")


def test_a_peer_cannot_speak_for_another(hosts):
    a, c, trust_b = hosts
    forged = _resign(c, {"type": "abort", "to": "host-b", "from": "host-a",
                         "ts_ms": int(time.time() * 1000), "nonce": "0" * 32})
    with pytest.raises(ControlError, match="claims to be from host-a"):
        verify_control(forged, trust_b, "host-b")
    with pytest.raises(ControlError, match="expected a reply from host-a"):
        verify_control(sign_control(c, {"to": "host-b"}), trust_b, "host-b",
                       expect_from="host-a")


@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b'{"body": 1}', b"\xff" * 40,
                                 b'{"body": {}, "key_id": "zz", "sig": ""}'])
def test_malformed_messages_are_refused(hosts, raw):
    _, _, trust_b = hosts
    with pytest.raises(ControlError):
        verify_control(raw, trust_b, "host-b")


def test_every_message_carries_a_fresh_nonce(hosts):
    a, _, trust_b = hosts
    m1, m2 = (sign_control(a, {"type": "abort", "to": "host-b"}) for _ in range(2))
    n1, n2 = nonce_of(m1), nonce_of(m2)
    assert n1 and n2 and n1 != n2
    body = json.loads(m1)["body"]
    del body["nonce"]
    with pytest.raises(ControlError, match="nonce"):
        verify_control(_resign(a, body), trust_b, "host-b")


def test_a_message_is_accepted_once_also_after_a_restart(hosts, tmp_path):
    a, _, trust_b = hosts
    msg = sign_control(a, {"type": "abort", "to": "host-b", "migration_id": "00" * 16})
    with ReplayCache(tmp_path) as rc:
        verify_control(msg, trust_b, "host-b", replay=rc)
        with pytest.raises(ControlError, match="replay"):
            verify_control(msg, trust_b, "host-b", replay=rc)
    with ReplayCache(tmp_path) as rc:  # the agent restarted
        with pytest.raises(ControlError, match="replay"):
            verify_control(msg, trust_b, "host-b", replay=rc)
        verify_control(sign_control(a, {"type": "abort", "to": "host-b"}), trust_b, "host-b",
                       replay=rc)


def test_a_reply_must_answer_this_request(hosts):
    a, c, trust_b = hosts
    request = sign_control(c, {"type": "preflight", "to": "host-a"})
    answer = sign_control(a, {"type": "preflight-reply", "to": "host-b"}, nonce_of(request))
    verify_control(answer, trust_b, "host-b", in_reply_to=nonce_of(request))
    other = sign_control(c, {"type": "preflight", "to": "host-a"})
    with pytest.raises(ControlError, match="does not answer this request"):
        verify_control(answer, trust_b, "host-b", in_reply_to=nonce_of(other))


@pytest.mark.parametrize("body,field", [
    ({"sessions": "lots"}, "sessions"),
    ({"sessions": True}, "sessions"),
    ({"sessions": -1}, "sessions"),
    ({"sessions": 2**70}, "sessions"),
    ({"sessions": 1.5}, "sessions"),
    ({"migration_id": "not hex at all, not even 32 chars"}, "migration_id"),
    ({"migration_id": "AB" * 16}, "migration_id"),
    ({"migration_id": 7}, "migration_id"),
    ({"vm": "10.1.1.300"}, "vm"),
    ({"vm": ["10.1.1.1"]}, "vm"),
])
def test_bad_field_values_are_refusals_naming_the_field(body, field):
    full = {"sessions": 1, "migration_id": "ab" * 16, "vm": "10.1.1.1", **body}
    with pytest.raises(FieldError) as exc:
        want_int(full, "sessions")
        want_mid(full)
        want_ip(full, "vm")
    assert exc.value.field == field and field in str(exc.value)
    assert isinstance(exc.value, ControlError)


def test_addresses_of_either_family_are_read_canonically():
    assert want_ip({"vm": "2001:DB8:1:0::10"}, "vm") == "2001:db8:1::10"
    assert want_ip({"vm": "::ffff:10.1.1.1"}, "vm") == "10.1.1.1"
    vms = want_vms({"vms": ["10.1.1.1", "2001:DB8:1::10"]})
    assert vms.ips == ("10.1.1.1", "2001:db8:1::10") and len(vms.addrs) == 2


@pytest.mark.parametrize("value,why", [
    ("10.1.1.1", "expected a list"),
    ([], "expected 1 to"),
    ([f"10.1.1.{i}" for i in range(1, MAX_VM_ADDRS + 2)], "expected 1 to"),
    (["10.1.1.1", "2001:db8:1::10", "::ffff:10.1.1.1"], "10.1.1.1 is given twice"),
    (["10.1.1.1", "2001:db8:1::g"], "not an IP address"),
    (["10.1.1.1", 7], "expected a string"),
    (["10.1.1.0/24"], "not an IP address"),
])
def test_a_bad_vm_address_list_is_a_refusal_naming_the_field(value, why):
    with pytest.raises(FieldError, match=why) as exc:
        want_vms({"vms": value})
    assert exc.value.field == "vms" and isinstance(exc.value, ControlError)
