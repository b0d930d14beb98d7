"""Framed messages between a migrating source and the destination's agent.

A frame is a fixed header {magic, version, type, length} and a payload. Every
read and write has an overall deadline (not a per-read timeout: a peer sending
a byte every few seconds is cut off when the deadline passes), payloads are
read into one buffer of the announced size only after the receiver accepted
that size, and nothing is read before the peer is authenticated:

* TLS (the default): mutual TLS bound to the host keys (tlsid.py); the agent
  knows which peer it talks to when the handshake ends;
* plaintext (`--plaintext`, for debugging): the first frame must be a small
  signed hello (control.py) naming the sender; no confidentiality, and an
  on-path attacker could hijack the connection after it (bundles and replies
  stay signed).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass

from .control import nonce_of, sign_control, verify_control
from .errors import ControlError, TransportError
from .keys import HostIdentity
from .peers import Peer, TrustStore
from .tlsid import client_context, peer_key

MAGIC = b"SXMG"
VERSION = 2
HEADER = struct.Struct("!4sBBHI")  # magic, version, type, reserved, payload length

MSG_PREFLIGHT = 1
MSG_PREFLIGHT_REPLY = 2
MSG_BUNDLE = 3
MSG_ACK = 4
MSG_ABORT = 5
MSG_ERROR = 6  # a signed refusal
MSG_HELLO = 7  # plaintext mode: the signed first frame that names the sender
MSG_CUTOVER = 8  # a migration's destination saw the VM arrive: send the final delta
MSG_PULL = 9  # a VM is about to arrive at the sender (its hypervisor said so): send its state

DEFAULT_MAX_MESSAGE = 256 << 20  # a 1M-session bundle is ~32 MiB
CONTROL_MAX_MESSAGE = 64 << 10
HELLO_MAX_MESSAGE = 4 << 10
DEFAULT_TIMEOUT_S = 30.0  # one frame, whole
DEFAULT_REPLY_TIMEOUT_S = 120.0  # a reply, whole (includes the peer's import)
DEFAULT_PORT = 7800


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes | bytearray


class Deadline:
    """An instant by which a whole exchange must be done."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self, what: str = "the peer") -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TransportError(f"timed out waiting for {what}")
        return left


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


def recv_into(sock: socket.socket, buf: memoryview, deadline: Deadline, what: str) -> None:
    """Fills `buf` from the socket, all of it before the deadline."""
    got = 0
    while got < len(buf):
        sock.settimeout(deadline.remaining(what))
        try:
            n = sock.recv_into(buf[got:], min(len(buf) - got, 1 << 20))
        except TimeoutError as exc:
            raise TransportError(f"timed out waiting for {what}") from exc
        except ssl.SSLError as exc:
            raise TransportError(f"TLS error receiving {what}: {exc.reason or exc}") from exc
        except OSError as exc:
            raise TransportError(f"connection lost receiving {what}: {exc.strerror}") from exc
        if not n:
            raise TransportError("peer closed the connection" + (" mid-message" if got else ""))
        got += n


def send_all(sock: socket.socket, data: bytes | bytearray | memoryview, deadline: Deadline) -> None:
    view = memoryview(data).cast("B")
    sent = 0
    while sent < len(view):
        sock.settimeout(deadline.remaining("the peer to take our message"))
        try:
            sent += sock.send(view[sent : sent + (1 << 20)])
        except TimeoutError as exc:
            raise TransportError("timed out sending to the peer") from exc
        except OSError as exc:
            raise TransportError(f"connection lost sending: {exc}") from exc


def send_frame(
    sock: socket.socket, msg_type: int, payload: bytes | bytearray, deadline: Deadline
) -> None:
    head = HEADER.pack(MAGIC, VERSION, msg_type, 0, len(payload))
    if len(payload) < 1 << 16:
        send_all(sock, head + bytes(payload), deadline)
    else:  # a bundle: no copy of it just to prepend 12 bytes
        send_all(sock, head, deadline)
        send_all(sock, payload, deadline)


def recv_header(sock: socket.socket, deadline: Deadline, first: bytes = b"") -> tuple[int, int]:
    """(type, payload length) of the next frame, checked for magic and version
    (`first`: its bytes already read)."""
    head = bytearray(first) + bytearray(HEADER.size - len(first))
    recv_into(sock, memoryview(head)[len(first) :], deadline, "a message")
    magic, version, msg_type, _, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise TransportError("not a sami-xdp migration peer (bad magic)")
    if version != VERSION:
        raise TransportError(f"peer speaks protocol version {version}, this host {VERSION}")
    return msg_type, length


def recv_frame(sock: socket.socket, max_size: int, deadline: Deadline) -> Frame:
    msg_type, length = recv_header(sock, deadline)
    if length > max_size:
        raise TransportError(f"message of {length} bytes exceeds the limit of {max_size}")
    payload = bytearray(length)
    recv_into(sock, memoryview(payload), deadline, "the rest of the message")
    return Frame(msg_type, payload)


class Connection:
    """A client connection to a peer's agent: request/response frames, mutually
    authenticated (the peer's key pinned) unless `plaintext`."""

    def __init__(
        self,
        peer: Peer,
        identity: HostIdentity,
        *,
        plaintext: bool = False,
        timeout: float = DEFAULT_TIMEOUT_S,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT_S,
    ) -> None:
        host, port = parse_address(peer.address)
        self.address = f"{host}:{port}"
        self.peer = peer
        self.timeout, self.reply_timeout = timeout, reply_timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise TransportError(
                f"cannot reach peer at {host}:{port}: {exc.strerror or exc}"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = sock
        self.last_used = time.monotonic()
        try:
            if not plaintext:
                self._tls(identity, timeout)
            self._welcome(identity, plaintext)
        except BaseException:
            self.close()
            raise

    def _tls(self, identity: HostIdentity, timeout: float) -> None:
        peer = self.peer
        try:
            tls = client_context(identity, peer.public_raw).wrap_socket(
                self.sock, do_handshake_on_connect=False
            )
            self.sock = tls
            tls.settimeout(timeout)
            tls.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(
                f"TLS: the agent at {self.address} does not hold {peer.name}'s key "
                f"from the peers file ({exc.verify_message})"
            ) from exc
        except OSError as exc:
            raise TransportError(
                f"TLS handshake with {self.address} failed (an agent run with --plaintext?): "
                f"{exc}"
            ) from exc
        if peer_key(tls) != peer.public_raw:  # the anchor already saw to it
            raise TransportError(f"TLS: the agent at {self.address} is not {peer.name}")

    def _welcome(self, identity: HostIdentity, plaintext: bool) -> None:
        """The agent's signed welcome, once it knows who we are. In plaintext mode it
        answers our signed hello (which named us); over TLS it proves the agent
        accepted our certificate (TLS 1.3 tells a client only at its first read)."""
        hello = b""
        if plaintext:
            hello = sign_control(identity, {"type": "hello", "to": self.peer.name})
            self.send(MSG_HELLO, hello)
        try:
            reply = self.receive(HELLO_MAX_MESSAGE, Deadline(self.timeout))
        except TransportError as exc:
            if "ALERT" in str(exc).upper() or "closed the connection" in str(exc) or plaintext:
                raise TransportError(
                    f"{self.peer.name} at {self.address} refused the connection: is this "
                    f"host's key in its peers file (untrusted)? ({exc})"
                ) from exc
            raise
        if reply.type != MSG_HELLO:
            raise TransportError(f"{self.peer.name} did not welcome us (message {reply.type})")
        try:
            verify_control(
                bytes(reply.payload),
                TrustStore([self.peer]),
                identity.host_id,
                expect_from=self.peer.name,
                in_reply_to=nonce_of(hello) if plaintext else None,
            )
        except ControlError as exc:
            raise TransportError(f"{self.peer.name}'s welcome is not believable: {exc}") from exc

    def send(self, msg_type: int, payload: bytes | bytearray) -> None:
        send_frame(self.sock, msg_type, payload, Deadline(self.timeout))
        self.last_used = time.monotonic()

    def receive(self, max_reply: int = CONTROL_MAX_MESSAGE, deadline: Deadline | None = None
                ) -> Frame:
        frame = recv_frame(self.sock, max_reply, deadline or Deadline(self.reply_timeout))
        self.last_used = time.monotonic()
        return frame

    def request(
        self, msg_type: int, payload: bytes | bytearray, max_reply: int = CONTROL_MAX_MESSAGE
    ) -> Frame:
        self.send(msg_type, payload)
        return self.receive(max_reply)

    @property
    def idle_s(self) -> float:
        return time.monotonic() - self.last_used

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
