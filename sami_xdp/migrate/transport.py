"""Framed messages between a migrating source and the destination's agent.

A frame is a fixed header {magic, version, type, length} and a payload. The
receiver refuses frames above its size limit before reading them, and every
socket operation has a timeout, so a slow or hostile peer cannot hold an
agent thread or its memory. Bundles carry their own Ed25519 signature;
control messages (preflight, abort) are signed JSON (see `control.py`).
TLS is optional and only adds confidentiality: trust comes from the keys.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass

from .errors import TransportError

MAGIC = b"SXMG"
VERSION = 1
HEADER = struct.Struct("!4sBBHI")  # magic, version, type, reserved, payload length

MSG_PREFLIGHT = 1
MSG_PREFLIGHT_REPLY = 2
MSG_BUNDLE = 3
MSG_ACK = 4
MSG_ABORT = 5
MSG_ERROR = 6

DEFAULT_MAX_MESSAGE = 256 << 20  # a 1M-session bundle is ~32 MiB
CONTROL_MAX_MESSAGE = 64 << 10
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_PORT = 7800


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        number = int(port)
    except ValueError as exc:
        raise TransportError(f"bad address {text!r}: port must be a number") from exc
    if not 0 < number < 65536:
        raise TransportError(f"bad address {text!r}: port out of range")
    return host.strip("[]") or "0.0.0.0", number


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    remaining = n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise TransportError("peer closed the connection mid-message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, msg_type: int, payload: bytes) -> None:
    head = HEADER.pack(MAGIC, VERSION, msg_type, 0, len(payload))
    if len(payload) < 1 << 16:
        sock.sendall(head + payload)
    else:  # a bundle: no copy of it just to prepend 12 bytes
        sock.sendall(head)
        sock.sendall(payload)


def recv_frame(sock: socket.socket, max_size: int = DEFAULT_MAX_MESSAGE) -> Frame:
    try:
        head = _recv_exact(sock, HEADER.size)
    except TimeoutError as exc:
        raise TransportError("timed out waiting for the peer") from exc
    magic, version, msg_type, _, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise TransportError("not a sami-xdp migration peer (bad magic)")
    if version != VERSION:
        raise TransportError(f"peer speaks protocol version {version}, this host {VERSION}")
    if length > max_size:
        raise TransportError(f"message of {length} bytes exceeds the limit of {max_size}")
    try:
        return Frame(msg_type, _recv_exact(sock, length))
    except TimeoutError as exc:
        raise TransportError("timed out receiving a message") from exc


@dataclass(frozen=True)
class TlsConfig:
    """Optional TLS: server cert/key on the agent, CA file on the client."""

    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None

    def server_context(self) -> ssl.SSLContext | None:
        if not self.certfile:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.certfile, self.keyfile)
        return ctx

    def client_context(self) -> ssl.SSLContext | None:
        if not self.cafile:
            return None
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.check_hostname = False  # peers are identified by their Ed25519 keys
        return ctx


class Connection:
    """A client connection to a peer's agent: request/response frames."""

    def __init__(
        self, address: str, timeout: float = DEFAULT_TIMEOUT_S, tls: TlsConfig | None = None
    ) -> None:
        host, port = parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise TransportError(
                f"cannot reach peer at {host}:{port}: {exc.strerror or exc}"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = tls.client_context() if tls else None
        self.sock: socket.socket = ctx.wrap_socket(sock) if ctx else sock
        self.address = f"{host}:{port}"

    def request(self, msg_type: int, payload: bytes, max_reply: int = CONTROL_MAX_MESSAGE) -> Frame:
        try:
            send_frame(self.sock, msg_type, payload)
            reply = recv_frame(self.sock, max_reply)
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"connection to {self.address} failed: {exc}") from exc
        return reply

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
