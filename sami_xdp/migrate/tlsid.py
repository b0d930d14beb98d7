"""Mutual TLS between agents, bound to the Ed25519 host keys of the peers file.

No CA to run. Each host presents a certificate for its own host key, issued (and
signed with that key) under the name "samixdp key <key id>". The other side
trusts, per peer it trusts, a trust anchor with that name and that public key,
built here from the peers file alone. RFC 5280 trust anchors are just a name
and a key: OpenSSL does not check an anchor's self-signature (ours is made with
a throwaway key), it checks that the presented certificate is signed by the
anchor's key, and TLS 1.3's CertificateVerify proves the peer holds that key.
So:

* the agent (server) trusts an anchor for every peer in peers.json: a client
  whose key is not there fails the handshake, before any frame is read, and
  the agent learns which peer it talks to from the verified certificate;
* a source (client) trusts the anchor of the one peer it means to reach: a
  machine in the middle with any other key fails the handshake.

The peer's key is checked once more after the handshake (`peer_key`), against
the peers file. Certificates and keys live in memory files (memfd): nothing is
written to disk.
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import TransportError
from .keys import HostIdentity, key_id_of, raw_public

NOT_BEFORE = datetime.datetime(2000, 1, 1)
NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59)
_ANCHOR_SIGNER = Ed25519PrivateKey.generate()  # anchors are trusted by configuration


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issuer_name(pub_raw: bytes) -> x509.Name:
    return _name(f"samixdp key {key_id_of(pub_raw).hex()}")


def host_certificate(identity: HostIdentity) -> x509.Certificate:
    """This host's certificate: its host key, issued under its key's name."""
    pub = identity.private_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"samixdp host {identity.host_id}"))
        .issuer_name(issuer_name(identity.public_raw))
        .public_key(pub)
        .serial_number(int.from_bytes(identity.key_id, "big"))
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(identity.private_key, None)
    )


def trust_anchor(pub_raw: bytes) -> x509.Certificate:
    """The anchor that makes a peer's host certificate verify: its key, its name."""
    return (
        x509.CertificateBuilder()
        .subject_name(issuer_name(pub_raw))
        .issuer_name(issuer_name(pub_raw))
        .public_key(Ed25519PublicKey.from_public_bytes(pub_raw))
        .serial_number(int.from_bytes(key_id_of(pub_raw), "big"))
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(_ANCHOR_SIGNER, None)
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_identity(ctx: ssl.SSLContext, identity: HostIdentity) -> None:
    """load_cert_chain takes file names: memory files (memfd) that vanish when closed."""
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fds = []
    try:
        for data in (_pem(host_certificate(identity)), key_pem):
            fd = os.memfd_create("samixdp-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def _context(side: int, identity: HostIdentity, trusted: Iterable[bytes]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET  # no session resumption: every connection authenticates
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # peers are named by their keys, not by DNS
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_identity(ctx, identity)
    anchors = b"".join(_pem(trust_anchor(raw)) for raw in trusted)
    if anchors:
        ctx.load_verify_locations(cadata=anchors.decode())
    return ctx


def server_context(identity: HostIdentity, trusted: Iterable[bytes]) -> ssl.SSLContext:
    """The agent's side: any peer whose key is in `trusted` may connect."""
    return _context(ssl.PROTOCOL_TLS_SERVER, identity, trusted)


def client_context(identity: HostIdentity, peer_key: bytes) -> ssl.SSLContext:
    """A source's side: only the holder of `peer_key` passes as the agent."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, identity, [peer_key])


def peer_key(sock: ssl.SSLSocket) -> bytes:
    """The raw Ed25519 key of the verified certificate the other side presented."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise TransportError("the peer presented no certificate")
    pub = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise TransportError("the peer's certificate is not for an Ed25519 host key")
    return raw_public(pub)
