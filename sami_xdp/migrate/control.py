"""Signed control messages (hello, preflight, acknowledgements, abort, refusals).

Bundles carry their own signature; the small JSON messages around them are
signed too, so a destination only obeys an abort from the peer that started
the migration, and a source only believes an acknowledgement signed by the
destination it chose. A message names its sender and recipient and carries a
timestamp and a random nonce: the receiver refuses one addressed elsewhere,
stale, or seen before (the agent keeps the nonces of the last few minutes in
its replay cache, across restarts). A reply names the nonce of the request it
answers (`in_reply_to`), so an old reply cannot answer a new request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from typing import Any

from .errors import ControlError, ReplayError
from .keys import HostIdentity
from .peers import Peer, TrustStore
from .replay import ReplayCache

MAX_SKEW_MS = 120_000
NONCE_WINDOW_MS = 2 * MAX_SKEW_MS  # a nonce is remembered as long as its message is fresh
_NONCE = re.compile(r"[0-9a-f]{32}")
_DOMAIN = b"samixdp-control-v1\0"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_control(
    identity: HostIdentity, body: dict[str, Any], reply_to: str | None = None
) -> bytes:
    body = {
        **body,
        "from": identity.host_id,
        "ts_ms": int(time.time() * 1000),
        "nonce": os.urandom(16).hex(),
    }
    if reply_to is not None:
        body["in_reply_to"] = reply_to
    sig = identity.sign(_DOMAIN + _canonical(body))
    doc = {"body": body, "key_id": identity.key_id.hex(), "sig": base64.b64encode(sig).decode()}
    return json.dumps(doc).encode()


def bundle_digest(data: bytes | bytearray | memoryview) -> str:
    """What an acknowledgement names (`in_reply_to`) as the bundle it answers: a hash
    of the bundle's signature (its last 64 bytes), which names the bundle as well as a
    hash of all of it would, at no cost for a big one."""
    return hashlib.sha256(bytes(memoryview(data)[-64:])).hexdigest()[:32]


def nonce_of(data: bytes) -> str | None:
    """The nonce of a message (unverified: for naming it in a reply or a refusal)."""
    try:
        nonce = json.loads(data)["body"]["nonce"]
    except (ValueError, KeyError, TypeError):
        return None
    return nonce if isinstance(nonce, str) and _NONCE.fullmatch(nonce) else None


def verify_control(
    data: bytes,
    trust: TrustStore,
    me: str,
    expect_from: str | None = None,
    *,
    replay: ReplayCache | None = None,
    in_reply_to: str | None = None,
) -> tuple[Peer, dict[str, Any]]:
    """Returns (signing peer, body); raises ControlError with the reason.

    `replay`: refuse a (sender, nonce) seen before (and remember this one);
    `in_reply_to`: the message must answer the request with that nonce."""
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
    if not peer.verify(sig, _DOMAIN + _canonical(body)):
        raise ControlError(f"bad signature on control message claiming to be from {peer.name}")
    if body.get("from") != peer.name:
        raise ControlError(
            f"message signed by {peer.name} claims to be from {body.get('from')}"[:300]
        )
    if expect_from is not None and peer.name != expect_from:
        raise ControlError(f"expected a reply from {expect_from}, got one from {peer.name}")
    if body.get("to") != me:
        raise ControlError(f"control message is addressed to {body.get('to')}, not {me}"[:300])
    ts = body.get("ts_ms")
    if (
        isinstance(ts, bool)
        or not isinstance(ts, int)
        or abs(time.time() * 1000 - ts) > MAX_SKEW_MS
    ):
        raise ControlError("control message is stale or from a clock far off")
    nonce = body.get("nonce")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise ControlError("control message without a valid nonce")
    if in_reply_to is not None and body.get("in_reply_to") != in_reply_to:
        raise ControlError(f"{peer.name}'s reply does not answer this request (replayed?)")
    if replay is not None:
        try:
            replay.control_once(peer.name, nonce, ts, NONCE_WINDOW_MS)
        except ReplayError as exc:
            raise ControlError(str(exc)) from exc
    return peer, body
