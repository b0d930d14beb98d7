"""Signed control messages (preflight, acknowledgements, abort).

Bundles carry their own signature; the small JSON messages around them are
signed too, so a destination only obeys an abort from the peer that started
the migration, and a source only believes an acknowledgement signed by the
destination it chose. A message names its sender and recipient and carries a
timestamp, so it cannot be replayed to another host or much later.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from .errors import ControlError
from .keys import HostIdentity
from .peers import Peer, TrustStore

MAX_SKEW_MS = 120_000


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_control(identity: HostIdentity, body: dict[str, Any]) -> bytes:
    body = {**body, "from": identity.host_id, "ts_ms": int(time.time() * 1000)}
    sig = identity.sign(b"samixdp-control-v1\0" + _canonical(body))
    doc = {"body": body, "key_id": identity.key_id.hex(), "sig": base64.b64encode(sig).decode()}
    return json.dumps(doc).encode()


def verify_control(
    data: bytes, trust: TrustStore, me: str, expect_from: str | None = None
) -> tuple[Peer, dict[str, Any]]:
    """Returns (signing peer, body); raises ControlError with the reason."""
    try:
        doc = json.loads(data)
        body = doc["body"]
        key_id = bytes.fromhex(doc["key_id"])
        sig = base64.b64decode(doc["sig"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ControlError("malformed control message") from exc
    if not isinstance(body, dict):
        raise ControlError("malformed control message")
    peer = trust.by_key_id(key_id)
    if peer is None:
        raise ControlError(f"control message from untrusted key {key_id.hex()}")
    if not peer.verify(sig, b"samixdp-control-v1\0" + _canonical(body)):
        raise ControlError(f"bad signature on control message claiming to be from {peer.name}")
    if body.get("from") != peer.name:
        raise ControlError(f"message signed by {peer.name} claims to be from {body.get('from')}")
    if expect_from is not None and peer.name != expect_from:
        raise ControlError(f"expected a reply from {expect_from}, got one from {peer.name}")
    if body.get("to") != me:
        raise ControlError(f"control message is addressed to {body.get('to')}, not {me}")
    ts = body.get("ts_ms")
    if not isinstance(ts, int) or abs(time.time() * 1000 - ts) > MAX_SKEW_MS:
        raise ControlError("control message is stale or from a clock far off")
    return peer, body
