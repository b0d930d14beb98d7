"""The agent as an attacker meets it: a real `samixdp agent` process on loopback.

Who may talk to it (mutual TLS bound to the host keys, or a signed hello in
--plaintext mode), what it reads before it knows the sender (a handshake, a
frame header), how long a connection may dribble (deadlines), how many may wait
(caps), what a trusted peer's control messages may do (only abort its own
migrations, never twice, bad fields refused by name) and what a trusted peer's
bundle may inflate to (what its signed header allows, within this host's maps)."""

from __future__ import annotations

import base64
import json
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agents import (
    PREFIX,
    PREFIX6,
    VM,
    VM6,
    Pair,
    count_vm,
    establish,
    free_port,
    make_pair,
    start_agent,
)

from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import addr_array
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, TrustStore, new_migration_id, wire
from sami_xdp.migrate.bundle import COMP_ZLIB, HEADER, HEADER_SIZE, encode_bundle
from sami_xdp.migrate.control import nonce_of, sign_control, verify_control
from sami_xdp.migrate.errors import TransportError
from sami_xdp.migrate.transport import (
    HEADER as FRAME,
)
from sami_xdp.migrate.transport import (
    MAGIC,
    MSG_ABORT,
    MSG_ACK,
    MSG_BUNDLE,
    MSG_ERROR,
    MSG_PREFLIGHT,
    MSG_PREFLIGHT_REPLY,
    VERSION,
    Connection,
    Deadline,
    recv_frame,
    send_all,
)

pytestmark = pytest.mark.needs_root
LAYOUT = load_layout().const("SAMIXDP_LAYOUT_VERSION")


@pytest.fixture
def pair(fw: Firewall, firewall_b: Firewall, tmp_path: Path) -> Iterator[Pair]:
    with make_pair(fw, firewall_b, tmp_path, "--handshake-timeout", "2", "--timeout", "2",
                   "--idle", "5") as p:
        yield p


def talk(pair: Pair, who: str = "hosta") -> tuple[Connection, HostIdentity, TrustStore]:
    host = pair.a if who == "hosta" else None
    assert host is not None
    ident = HostIdentity.load(host.config)
    trust = TrustStore.load(host.config)
    return Connection(trust.get("hostb"), ident), ident, trust


def answer(pair: Pair, reply, trust: TrustStore, me: str = "hosta") -> dict:
    _, body = verify_control(bytes(reply.payload), trust, me, expect_from="hostb")
    return body


def add_peer_c(pair: Pair, tmp_path: Path, scope: str = "10.2.0.0/24") -> tuple[HostIdentity, TrustStore]:
    """Peer C: trusted by B for another prefix; C trusts B (to reach its agent)."""
    c = HostIdentity.init(tmp_path / "c-cfg", "hostc")
    res = pair.b.cli("peers", "add", "hostc", "--address", "127.0.0.1:2", "--key", c.public_b64,
                     "--vms", scope)
    assert res.returncode == 0, res.stderr
    t = TrustStore.load(tmp_path / "c-cfg")
    t.add("hostb", f"127.0.0.1:{pair.port}", pair.b.cli("keys", "show").stdout.strip())
    t.save()
    return c, TrustStore.load(tmp_path / "c-cfg")


def resign(ident: HostIdentity, body: dict) -> bytes:
    """A control message with any body, correctly signed."""
    body = {"from": ident.host_id, "ts_ms": int(time.time() * 1000),
            "nonce": new_migration_id().hex(), **body}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    sig = ident.sign(b"samixdp-control-v1\0" + canon)
    return json.dumps({"body": body, "key_id": ident.key_id.hex(),
                       "sig": base64.b64encode(sig).decode()}).encode()


# ---- control messages --------------------------------------------------------------------


BAD_FIELDS = [
    ("sessions", "lots"), ("sessions", -5), ("sessions", 2**80), ("migration_id", "zz" * 16),
    ("migration_id", None), ("vms", "not-an-ip"), ("vms", ["not-an-ip"]), ("vms", []),
    ("vms", [VM, VM6, VM]), ("vms", [VM] * 40), ("vms", [VM, 7]), ("layout_version", 1.5),
    ("type", "abort"),
]


def test_bad_fields_get_a_signed_refusal_naming_them(pair):
    conn, ident, trust = talk(pair)
    good = {"type": "preflight", "to": "hostb", "vms": [VM, VM6], "migration_id": "ab" * 16,
            "layout_version": LAYOUT, "sessions": 1}
    with conn:
        for field, value in BAD_FIELDS:
            msg = resign(ident, {**good, field: value})
            reply = conn.request(MSG_PREFLIGHT, msg)
            assert reply.type == MSG_ERROR, field
            refusal = answer(pair, reply, trust)
            assert refusal["ok"] is False and refusal["field"] == field, refusal
            assert field in refusal["reason"] and refusal["in_reply_to"] == nonce_of(msg)
        # the same connection is still served
        reply = conn.request(MSG_PREFLIGHT, sign_control(ident, good))
        assert reply.type == MSG_PREFLIGHT_REPLY and answer(pair, reply, trust)["ok"] is True
        reply = conn.request(MSG_ABORT, resign(ident, {"type": "abort", "to": "hostb",
                                                       "migration_id": "not hex"}))
        assert answer(pair, reply, trust)["field"] == "migration_id"
    assert not [e for e in pair.agent.events() if e["event"] == "internal-error"]


def test_an_abort_is_obeyed_only_from_the_migrations_source_and_only_once(pair, tmp_path):
    establish(pair.a.fw, 4)
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0", "--keep-source")
    assert res.returncode == 0, res.stderr
    mid = json.loads(pair.b.cli("imports", "list", "--json").stdout)[0]["migration_id"]
    assert count_vm(pair.b.fw) == 4
    c, trust_c = add_peer_c(pair, tmp_path, scope=PREFIX)  # C may even send state for the VM
    with Connection(trust_c.get("hostb"), c) as conn:
        reply = conn.request(MSG_ABORT, sign_control(c, {"type": "abort", "to": "hostb",
                                                         "migration_id": mid}))
    assert reply.type == MSG_ERROR
    assert "hostc may not abort it" in answer(pair, reply, trust_c, "hostc")["reason"]
    assert count_vm(pair.b.fw) == 4
    conn, ident, trust = talk(pair)
    abort = sign_control(ident, {"type": "abort", "to": "hostb", "migration_id": mid})
    with conn:
        reply = conn.request(MSG_ABORT, abort)
        assert reply.type == MSG_ACK and answer(pair, reply, trust)["ok"] is True
        assert count_vm(pair.b.fw) == 0
        reply = conn.request(MSG_ABORT, abort)  # the same signed message again
    assert reply.type == MSG_ERROR and "replay" in answer(pair, reply, trust)["reason"]
    assert count_vm(pair.a.fw) == 4  # the source is untouched throughout


def test_a_replayed_preflight_is_refused(pair):
    conn, ident, trust = talk(pair)
    msg = sign_control(ident, {"type": "preflight", "to": "hostb", "vms": [VM],
                               "migration_id": "cd" * 16, "layout_version": LAYOUT,
                               "sessions": 0})
    with conn:
        assert answer(pair, conn.request(MSG_PREFLIGHT, msg), trust)["ok"] is True
        reply = conn.request(MSG_PREFLIGHT, msg)
    assert reply.type == MSG_ERROR and "replay" in answer(pair, reply, trust)["reason"]


def test_preflight_names_the_scope(pair, tmp_path):
    c, trust_c = add_peer_c(pair, tmp_path)
    with Connection(trust_c.get("hostb"), c) as conn:
        reply = conn.request(MSG_PREFLIGHT, sign_control(c, {
            "type": "preflight", "to": "hostb", "vms": [VM], "migration_id": "ef" * 16,
            "layout_version": LAYOUT, "sessions": 0}))
    body = answer(pair, reply, trust_c, "hostc")
    assert body["ok"] is False and "outside the scope of hostc" in body["reason"]


# ---- who may connect ---------------------------------------------------------------------


def test_a_client_whose_key_is_not_trusted_is_dropped_at_the_handshake(pair, tmp_path):
    stranger = HostIdentity.init(tmp_path / "x-cfg", "hosta")  # a valid cert, an unknown key
    with pytest.raises(TransportError, match="untrusted"):
        Connection(TrustStore.load(pair.a.config).get("hostb"), stranger)
    pair.agent.wait_event("connection-closed")
    assert not [e for e in pair.agent.events() if e["event"] == "connected"]


def test_the_source_pins_the_destinations_key(pair, tmp_path):
    """A peers entry for hostb at B's address but with another key: whoever answers
    there is not hostb, and migrate refuses to talk to it."""
    other = HostIdentity.init(tmp_path / "m-cfg", "mallory")
    res = pair.a.cli("peers", "add", "hostb", "--address", f"127.0.0.1:{pair.port}", "--key",
                     other.public_b64, "--vms", PREFIX, "--replace")
    assert res.returncode == 0
    establish(pair.a.fw, 2)
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0")
    assert res.returncode == 16, res.stderr
    assert "does not hold hostb's key" in res.stderr and res.stderr.count("\n") <= 2
    assert count_vm(pair.b.fw) == 0


def test_slow_clients_are_cut_off_by_the_handshake_deadline(pair):
    """Connections sending a ClientHello a byte at a time, unauthenticated: each is
    closed by the agent once its handshake deadline (2 s here) has passed, while it
    still sends (the 512-byte record would take 150 s)."""
    conns = []
    for _ in range(4):  # at most 4 unauthenticated connections per address (the default)
        s = socket.create_connection(("127.0.0.1", pair.port), timeout=5)
        s.sendall(bytes.fromhex("1603010200"))  # a TLS record of 512 bytes begins...
        conns.append(s)
    closed = set()
    end = time.monotonic() + 30
    while len(closed) < len(conns) and time.monotonic() < end:
        for i, s in enumerate(conns):
            if i in closed:
                continue
            try:
                s.send(b"\0")  # ... and goes on, a byte at a time
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        closed.add(i)
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                closed.add(i)
        time.sleep(0.3)
    for s in conns:
        s.close()
    assert len(closed) == len(conns)


def test_connections_over_the_per_address_cap_are_closed_at_once(fw, firewall_b, tmp_path):
    with make_pair(fw, firewall_b, tmp_path, "--max-pending-per-ip", "2",
                   "--handshake-timeout", "20") as pair:
        waiting = [socket.create_connection(("127.0.0.1", pair.port), timeout=5)
                   for _ in range(2)]
        extra = socket.create_connection(("127.0.0.1", pair.port), timeout=5)
        extra.settimeout(10)
        try:
            assert extra.recv(1) == b""  # closed by the agent, no handshake offered
        except ConnectionResetError:
            pass
        pair.agent.wait_event("connection-refused")
        for s in waiting:
            s.close()
        extra.close()
        establish(pair.a.fw, 2)  # the slots are free again
        res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0",
                         "--keep-source")
        assert res.returncode == 0, res.stderr


def test_an_authenticated_peer_that_dribbles_a_frame_is_cut_off(pair):
    conn, _, _ = talk(pair)
    with conn:
        send_all(conn.sock, FRAME.pack(MAGIC, VERSION, MSG_PREFLIGHT, 0, 1000), Deadline(5))
        with pytest.raises(TransportError):
            for _ in range(100):  # 1000 bytes at 3 bytes/s would take 5 minutes
                send_all(conn.sock, b"{", Deadline(5))
                conn.sock.settimeout(0.3)
                try:
                    if conn.sock.recv(1) == b"":
                        raise TransportError("closed")
                except TimeoutError:
                    pass
    pair.agent.wait_event("connection-closed", peer=None)


# ---- what a trusted peer's bundle may cost -----------------------------------------------------


def bomb(ident: HostIdentity, declared_sessions: int, inflated: int) -> bytes:
    """A signed bundle (zlib) whose header declares `declared_sessions` records and
    whose body inflates to `inflated` bytes of zeros."""
    base = encode_bundle({}, identity=ident, vms=[VM], audience="hostb", seq=1,
                         migration_id=new_migration_id(), layout_version=LAYOUT,
                         compression="zlib")
    h = np.frombuffer(base[:HEADER_SIZE], dtype=HEADER).copy()
    body = zlib.compressobj(9)
    chunk = b"\0" * (1 << 20)
    parts = [body.compress(chunk) for _ in range(inflated >> 20)]
    parts.append(body.flush())
    data = b"".join(parts)
    h["n_sessions"] = declared_sessions
    h["raw_body_len"] = declared_sessions * wire.SESSION_WIRE.itemsize
    h["body_len"] = len(data)
    h["compression"] = COMP_ZLIB
    signed = h.tobytes() + addr_array([VM]).tobytes() + data
    return signed + ident.sign(signed)


def test_a_bundle_announcing_more_than_the_maps_hold_is_refused_unread(pair):
    conn, ident, trust = talk(pair)
    data = bomb(ident, 10**8, 64 << 20)
    with conn:
        send_all(conn.sock, FRAME.pack(MAGIC, VERSION, MSG_BUNDLE, 0, len(data)), Deadline(5))
        send_all(conn.sock, data[:HEADER_SIZE], Deadline(5))  # the rest is never needed
        reply = recv_frame(conn.sock, 1 << 16, Deadline(10))
    assert reply.type == MSG_ERROR
    assert "holds at most" in answer(pair, reply, trust)["reason"]


def test_a_zlib_bomb_inflates_no_further_than_its_signed_header_allows(pair):
    conn, ident, trust = talk(pair)
    data = bomb(ident, 1000, 256 << 20)  # declares 36 kB, inflates to 256 MiB
    with conn:
        reply = conn.request(MSG_BUNDLE, data)
    body = answer(pair, reply, trust)
    assert body["ok"] is False and f"inflates past the {1000 * wire.SESSION_WIRE.itemsize} bytes" in body["reason"]
    assert count_vm(pair.b.fw) == 0


# ---- plaintext mode (debugging) ----------------------------------------------------------------


def test_plaintext_mode_authenticates_with_a_signed_hello(fw, firewall_b, tmp_path):
    with make_pair(fw, firewall_b, tmp_path, "--plaintext") as pair:
        establish(pair.a.fw, 3)
        res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0",
                         "--keep-source")
        assert res.returncode == 16 and "TLS handshake" in res.stderr  # TLS vs plain
        res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0",
                         "--keep-source", "--plaintext")
        assert res.returncode == 0, res.stderr
        assert count_vm(pair.b.fw) == 3
        # an unsigned first frame announcing 256 MiB: dropped, nothing read
        with socket.create_connection(("127.0.0.1", pair.port), timeout=5) as s:
            s.sendall(FRAME.pack(MAGIC, VERSION, MSG_BUNDLE, 0, 256 << 20) + b"\0" * 65536)
            s.settimeout(10)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass


def test_a_second_agent_on_the_same_state_dir_recovers_nothing_twice(pair, tmp_path):
    """Starting another agent (another port) on B's state while the first runs is
    harmless: recovery takes the import lock and finds nothing to do."""
    other = start_agent(pair.b, free_port())
    try:
        assert not [e for e in other.events() if e["event"] == "recovered"]
    finally:
        other.stop()


# ---- a VM of several addresses -------------------------------------------------------------------


def test_preflight_names_each_address_outside_the_scope(fw, firewall_b, tmp_path):
    with make_pair(fw, firewall_b, tmp_path, a_scope=PREFIX) as pair:  # IPv4 only
        conn, ident, trust = talk(pair)
        with conn:
            reply = conn.request(MSG_PREFLIGHT, sign_control(ident, {
                "type": "preflight", "to": "hostb", "vms": [VM, VM6],
                "migration_id": "ab" * 16, "layout_version": LAYOUT, "sessions": 0}))
        body = answer(pair, reply, trust)
        assert body["ok"] is False
        assert body["reason"] == f"{VM6} is outside the scope of hosta here (vms: {PREFIX})"


@pytest.mark.parametrize("table", ["out-of-scope", "twice"])
def test_a_bundle_is_refused_on_its_address_table_before_its_body_is_read(fw, firewall_b,
                                                                          tmp_path, table):
    """B trusts A for the VM's IPv4 prefix only: a bundle of the dual-stack VM (or one
    listing an address twice) is refused once its header and address table are in, with
    the rest of it never sent, and nothing is loaded."""
    from sami_xdp.migrate import wire

    with make_pair(fw, firewall_b, tmp_path, a_scope=f"{PREFIX},{PREFIX6}" if table == "twice"
                   else PREFIX) as pair:
        conn, ident, trust = talk(pair)
        rec = np.zeros(1000, dtype=wire.SESSION_WIRE)
        rec["addr_lo"], rec["addr_hi"] = addr_array([VM6])[0], addr_array(["2001:db8:99::5"])[0]
        rec["port_lo"], rec["proto"], rec["state"] = np.arange(1000), 6, 3
        vms = [VM, VM6] if table == "out-of-scope" else [VM6, VM, VM6]
        data = encode_bundle({"sessions": rec}, identity=ident, vms=vms, audience="hostb",
                             seq=1, migration_id=new_migration_id(), layout_version=LAYOUT)
        head = HEADER_SIZE + 16 * len(vms)
        with conn:
            send_all(conn.sock, FRAME.pack(MAGIC, VERSION, MSG_BUNDLE, 0, len(data)),
                     Deadline(5))
            send_all(conn.sock, data[:head], Deadline(5))  # the records are never sent
            reply = recv_frame(conn.sock, 1 << 16, Deadline(10))
        assert reply.type == MSG_ERROR
        body = answer(pair, reply, trust)
        if table == "out-of-scope":
            assert body["error"] == "out-of-scope"
            assert body["reason"] == (
                f"bundle for VM {VM6} is outside the scope of peer hosta (vms: {PREFIX})")
        else:
            assert body["error"] == "malformed" and f"lists VM address {VM6} twice" in (
                body["reason"])
        assert count_vm(pair.b.fw, VM6) == 0 and count_vm(pair.b.fw, VM) == 0
