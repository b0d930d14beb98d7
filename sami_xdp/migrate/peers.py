"""The peers this host trusts: name, agent address, Ed25519 public key and scope.

    peers.json  {"peers": [{"name": "host-a", "address": "10.9.1.2:7800",
                            "public_key": base64, "vms": ["10.1.1.0/24", ...]}, ...]}

A peer's NAME is its host id: bundles name their source and audience by host
id, and a bundle is only accepted from the peer whose name matches its source.
A peer's scope (`vms`) lists the VM prefixes (of either family) it may send
state for, and a bundle must have every one of its VM's addresses in it; a peer
without one may send state for no VM (this host can still migrate VMs to it
and believe its acknowledgements). The file is re-read by every command and by
the agent on every request, so changes take effect at once.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..base.errors import InvalidArgument
from ..base.layout import load_layout
from ..base.netutil import IPNetwork, addr_array, in_networks, parse_network
from .errors import IdentityError, TrustStoreError
from .keys import (
    atomic_write,
    encode_public,
    key_id_of,
    one_line,
    parse_address,
    parse_public,
    validate_host_id,
)

PEERS_FILE = "peers.json"
MAX_PEERS_FILE = 4 << 20
MAX_SCOPE = 1024  # prefixes per peer

Scope = tuple[IPNetwork, ...]


def _scope_order(net: IPNetwork) -> tuple[int, IPNetwork]:
    return (net.version, net)


def _mapped_space() -> ipaddress.IPv6Network:
    """Where IPv4 addresses live among IPv6 ones in the maps (::ffff:0:0/96)."""
    return ipaddress.IPv6Network(("::ffff:0:0", load_layout().const("IPV4_MAPPED_PLEN")))


def _scope_prefix(part: str) -> IPNetwork:
    try:
        net = parse_network(part)
    except InvalidArgument:
        raise TrustStoreError(f"not an IP prefix in the scope: {part!r}"[:200]) from None
    if isinstance(net, ipaddress.IPv6Network) and _mapped_space().subnet_of(net):
        raise TrustStoreError(
            f"{net} in the scope covers the IPv4-mapped space {_mapped_space()}, so every "
            "IPv4 VM: give IPv4 prefixes as IPv4 and IPv6 ones without it (e.g. 2000::/3)"
        )
    return net


def parse_scope(items: str | Iterable[object]) -> Scope:
    """VM prefixes from "P1,P2,..." (or a list of them); "" and "none" are no VM."""
    if isinstance(items, str):
        text = items.strip()
        parts: list[object] = [] if text.lower() in ("", "none") else list(text.split(","))
    else:
        parts = list(items)
    if len(parts) > MAX_SCOPE:
        raise TrustStoreError(f"a scope holds at most {MAX_SCOPE} prefixes, got {len(parts)}")
    nets: list[IPNetwork] = []
    for part in parts:
        if not isinstance(part, str):
            raise TrustStoreError(f"a VM prefix must be a string, got {part!r}"[:200])
        nets.append(_scope_prefix(part))
    return tuple(sorted(set(nets), key=_scope_order))


def scope_text(scope: Scope) -> str:
    return ",".join(map(str, scope)) or "none"


def in_scope(scope: Scope, vm: str | np.ndarray) -> np.ndarray:
    """Which VM addresses (text, or `struct ip_addr` values as bundles and maps hold
    them) lie in the scope."""
    addrs = addr_array([vm]) if isinstance(vm, str) else vm
    return in_networks(addrs, scope)


@dataclass(frozen=True)
class Peer:
    name: str
    address: str
    public_raw: bytes
    vms: Scope = field(default=())

    @property
    def key_id(self) -> bytes:
        return key_id_of(self.public_raw)

    @property
    def public_b64(self) -> str:
        return encode_public(self.public_raw)

    def covers(self, vm: str) -> bool:
        """May this peer send state for the VM address?"""
        return bool(in_scope(self.vms, vm)[0])

    def covers_all(self, addrs: np.ndarray) -> np.ndarray:
        """Which of these `struct ip_addr` values this peer may send state for."""
        return in_scope(self.vms, addrs)

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "address": self.address,
            "public_key": self.public_b64,
            "key_id": self.key_id.hex(),
            "vms": [str(n) for n in self.vms],
        }


def _peer_from(entry: object, n: int) -> Peer:
    if not isinstance(entry, dict):
        raise TrustStoreError(f"peer entry {n} is not a JSON object")
    for key in ("name", "address", "public_key"):
        if not isinstance(entry.get(key), str):
            raise TrustStoreError(f"peer entry {n} needs a string {key!r}")
    vms = entry.get("vms", [])
    if not isinstance(vms, list):
        raise TrustStoreError(f"peer entry {n}: 'vms' must be a list of prefixes")
    try:
        name = validate_host_id(entry["name"])
    except IdentityError as exc:
        raise TrustStoreError(f"peer entry {n}: {exc}".replace("host id", "peer name")) from exc
    try:
        parse_address(entry["address"])
        return Peer(name, entry["address"], parse_public(entry["public_key"]), parse_scope(vms))
    except TrustStoreError as exc:
        raise TrustStoreError(f"peer {name}: {exc}") from exc


class TrustStore:
    """Peers this host accepts bundles from (and sends bundles to)."""

    def __init__(self, peers: list[Peer] | None = None, path: Path | None = None) -> None:
        self.path = path
        self._peers: dict[str, Peer] = {}
        for p in peers or []:
            self._peers[p.name] = p

    @classmethod
    def load(cls, config_dir: Path) -> TrustStore:
        path = config_dir / PEERS_FILE
        if not path.exists():
            return cls([], path)
        try:
            if not path.is_file():
                raise TrustStoreError("not a regular file")
            raw = path.read_bytes()
            if len(raw) > MAX_PEERS_FILE:
                raise TrustStoreError(f"larger than {MAX_PEERS_FILE} bytes")
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("peers", []), list):
                raise TrustStoreError('expected {"peers": [...]}')
            store = cls([], path)
            for n, entry in enumerate(doc.get("peers", []), start=1):
                peer = _peer_from(entry, n)
                store._check_unique(peer)
                store._peers[peer.name] = peer
        except (OSError, ValueError, TrustStoreError) as exc:
            raise TrustStoreError(f"cannot read peers file {path}: {one_line(exc)}") from exc
        return store

    def _check_unique(self, peer: Peer, replace: bool = False) -> None:
        if peer.name in self._peers and not replace:
            raise TrustStoreError(f"peer {peer.name} already exists (add --replace to change it)")
        for other in self._peers.values():
            if other.name != peer.name and other.public_raw == peer.public_raw:
                raise TrustStoreError(f"this key already belongs to peer {other.name}")

    def save(self) -> None:
        if self.path is None:
            raise TrustStoreError("this trust store has no file")
        doc = {
            "peers": [
                {
                    "name": p.name,
                    "address": p.address,
                    "public_key": p.public_b64,
                    "vms": [str(n) for n in p.vms],
                }
                for p in self.peers()
            ]
        }
        atomic_write(self.path, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)

    def add(
        self,
        name: str,
        address: str,
        public_key: str | bytes,
        replace: bool = False,
        vms: Scope | str = (),
    ) -> Peer:
        try:
            validate_host_id(name)
        except IdentityError as exc:
            raise TrustStoreError(str(exc).replace("host id", "peer name")) from exc
        parse_address(address)
        raw = public_key if isinstance(public_key, bytes) else parse_public(public_key)
        if len(raw) != 32:
            raise TrustStoreError("public key must be 32 bytes")
        scope = parse_scope(vms) if isinstance(vms, str) else tuple(vms)
        peer = Peer(name, address, raw, scope)
        self._check_unique(peer, replace)
        self._peers[name] = peer
        return peer

    def set_vms(self, name: str, vms: Scope | str) -> Peer:
        """Replaces a peer's scope ("" or "none": no VM)."""
        old = self.get(name)
        peer = Peer(old.name, old.address, old.public_raw,
                    parse_scope(vms) if isinstance(vms, str) else tuple(vms))
        self._peers[name] = peer
        return peer

    def remove(self, name: str) -> None:
        if self._peers.pop(name, None) is None:
            raise TrustStoreError(f"no peer named {name!r}")

    def peers(self) -> list[Peer]:
        return sorted(self._peers.values(), key=lambda p: p.name)

    def get(self, name: str) -> Peer:
        try:
            return self._peers[name]
        except KeyError:
            raise TrustStoreError(
                f"unknown peer {name!r}: add it with `samixdp peers add {name} --address "
                "HOST:PORT --key PUBKEY --vms PREFIXES`"[:300]
            ) from None

    def by_key_id(self, key_id: bytes) -> Peer | None:
        for p in self._peers.values():
            if p.key_id == key_id:
                return p
        return None

    def by_public_key(self, raw: bytes) -> Peer | None:
        for p in self._peers.values():
            if p.public_raw == raw:
                return p
        return None

    def __len__(self) -> int:
        return len(self._peers)
