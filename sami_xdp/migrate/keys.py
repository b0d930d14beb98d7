"""This host's identity: an Ed25519 key pair and a host id, plus the key and
address encodings shared with the peers file (peers.py).

Config dir layout (default /etc/samixdp, `--config-dir` / SAMIXDP_CONFIG_DIR):
    host_key.pem   PKCS#8 private key, mode 0600
    host.json      {"host_id": ..., "public_key": base64, "key_id": hex}
    peers.json     see peers.py

The key id is the first 8 bytes of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import IdentityError, TrustStoreError

HOST_KEY_FILE = "host_key.pem"
HOST_FILE = "host.json"
PEERS_FILE = "peers.json"
KEY_ID_LEN = 8
MAX_HOST_ID_BYTES = 32
MAX_KEY_FILE = 64 << 10  # key and host files are read up to this size
_HOST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


def validate_host_id(name: str) -> str:
    if not _HOST_ID_RE.match(name) or len(name.encode()) > MAX_HOST_ID_BYTES:
        raise IdentityError(
            f"invalid host id {name!r}: 1-32 characters of letters, digits, '.', '_', '-'"
        )
    return name


def one_line(exc: BaseException) -> str:
    """An exception's message as one line (file errors name the reason, not the path)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(pub_raw: bytes) -> bytes:
    return hashlib.sha256(pub_raw).digest()[:KEY_ID_LEN]


def encode_public(pub_raw: bytes) -> str:
    return base64.b64encode(pub_raw).decode()


def parse_public(text: str) -> bytes:
    """Raw 32-byte key from base64 (44 chars) or hex (64 chars)."""
    t = text.strip()
    raw: bytes | None = None
    if re.fullmatch(r"[0-9a-fA-F]{64}", t):
        raw = bytes.fromhex(t)
    else:
        try:
            raw = base64.b64decode(t, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise TrustStoreError(
            "public key must be 32 bytes as base64 (as printed by `samixdp keys show`) or hex"
        )
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise TrustStoreError("not a valid Ed25519 public key") from exc
    return raw


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT -> (host, port)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([^:\s]+):(\d+)", text)
    if not m:
        raise TrustStoreError(f"address must be HOST:PORT, got {text!r}")
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise TrustStoreError(f"port out of range in {text!r}")
    return m.group(1), port


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write-to-temp, fsync, rename, fsync dir: the file is old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---- this host -------------------------------------------------------------------


@dataclass
class HostIdentity:
    host_id: str
    private_key: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return raw_public(self.private_key.public_key())

    @property
    def public_b64(self) -> str:
        return encode_public(self.public_raw)

    @property
    def key_id(self) -> bytes:
        return key_id_of(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls, host_id: str) -> HostIdentity:
        return cls(validate_host_id(host_id), Ed25519PrivateKey.generate())

    @classmethod
    def init(
        cls, config_dir: Path, host_id: str | None = None, force: bool = False
    ) -> HostIdentity:
        """Creates the key pair and host id in `config_dir` (refuses to overwrite)."""
        key_path = config_dir / HOST_KEY_FILE
        if key_path.exists() and not force:
            raise IdentityError(
                f"a host key already exists at {key_path} (add --force to replace it; peers "
                "that trust the old key will refuse this host until updated)"
            )
        default = socket.gethostname().split(".")[0]
        ident = cls.generate(default if host_id is None else host_id)
        config_dir.mkdir(parents=True, exist_ok=True)
        pem = ident.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(key_path, pem, 0o600)
        ident._write_host_file(config_dir)
        return ident

    def _write_host_file(self, config_dir: Path) -> None:
        meta = {"host_id": self.host_id, "public_key": self.public_b64, "key_id": self.key_id.hex()}
        atomic_write(config_dir / HOST_FILE, (json.dumps(meta, indent=2) + "\n").encode(), 0o644)

    @classmethod
    def load(cls, config_dir: Path) -> HostIdentity:
        key_path = config_dir / HOST_KEY_FILE
        host_path = config_dir / HOST_FILE
        if not key_path.exists():
            raise IdentityError(
                f"no host key in {config_dir}: run `samixdp keys init` (or pass --config-dir)"
            )
        if not key_path.is_file():
            raise IdentityError(f"{key_path} is not a regular file")
        st = key_path.stat()
        if st.st_mode & 0o077:
            raise IdentityError(
                f"{key_path} is readable by others (mode {st.st_mode & 0o777:o}): chmod 600 it"
            )
        try:
            key = serialization.load_pem_private_key(
                key_path.read_bytes()[:MAX_KEY_FILE], password=None
            )
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"cannot read the host key {key_path}: {one_line(exc)}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{key_path} is not an Ed25519 key")
        try:
            meta = json.loads(host_path.read_bytes()[:MAX_KEY_FILE])
        except (OSError, ValueError) as exc:
            raise IdentityError(f"cannot read {host_path}: {one_line(exc)}") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("host_id"), str):
            raise IdentityError(f"{host_path} must be a JSON object with a string 'host_id'")
        return cls(validate_host_id(meta["host_id"]), key)

    @classmethod
    def exists(cls, config_dir: Path) -> bool:
        return (config_dir / HOST_KEY_FILE).exists()
