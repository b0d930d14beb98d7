"""The online path: a real `samixdp agent` process, `samixdp migrate` with its
phases, --until-cutover/--final, --abort, refusals and the source cleanup.

Hosts A and B are two firewalls in the test bpffs; the agent listens on
loopback. A's sessions are made by the real program through PROG_TEST_RUN."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import (
    CLIENT,
    CLIENT6,
    PREFIX,
    VM,
    VM6,
    Pair,
    count_vm,
    establish,
    free_port,
    make_pair,
    wait_for,
)
from conftest import run_frame

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, ImportRecords, TrustStore, new_migration_id
from sami_xdp.migrate.bundle import encode_bundle
from sami_xdp.migrate.control import verify_control
from sami_xdp.migrate.select import export_vm_state
from sami_xdp.migrate.transport import MSG_ACK, MSG_BUNDLE, Connection
from sami_xdp.policy import acl
from testbed import packets as P

pytestmark = pytest.mark.needs_root



@pytest.fixture
def pair(fw: Firewall, firewall_b: Firewall, tmp_path: Path) -> Iterator[Pair]:
    with make_pair(fw, firewall_b, tmp_path) as p:
        yield p


def test_migrate_copies_state_and_keeps_source(pair: Pair) -> None:
    establish(pair.a.fw, 30)
    acl.add_rules(pair.a.fw, [acl.make_rule(pair.a.fw, vm=VM, proto="tcp", dport="22")])
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "2",
                     "--interval", "0.1", "--keep-source", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["outcome"] == "completed"
    assert [p["name"] for p in report["phases"]] == [
        "preflight", "full copy", "delta 1", "delta 2", "final delta"]
    assert report["phases"][1]["imported"]["sessions"] == 30
    assert report["phases"][1]["imported"]["acl_rules"] == 1
    assert count_vm(pair.b.fw) == 30 and count_vm(pair.a.fw) == 30
    # B now carries the flows mid-stream, and the migrated ACL admits new SYNs
    assert run_frame(pair.b.fw, P.tcp(CLIENT, 443, VM, 20007, P.ACK | P.PSH, b"x")) == "PASS"
    assert run_frame(pair.b.fw, P.tcp(CLIENT, 5555, VM, 22, P.SYN)) == "PASS"
    assert run_frame(pair.b.fw, P.tcp(CLIENT, 5555, VM, 23, P.SYN)) == "DROP"


def test_until_cutover_then_final(pair: Pair) -> None:
    establish(pair.a.fw, 5)
    bg = pair.a.popen("migrate", "--vm", VM, "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1", "--keep-source", "--json")
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw) == 5, alive=bg)
        establish(pair.a.fw, 3, base=30000)  # new sessions during pre-copy travel as deltas
        # they reach B while the migration is still pre-copying: a delta round carried
        # them, not the final one (which has not been asked for yet)
        wait_for("the new sessions on B", lambda: count_vm(pair.b.fw) == 8, alive=bg)
        assert bg.poll() is None
        fin = pair.a.cli("migrate", "--vm", VM, "--final", "--json")
        assert fin.returncode == 0, fin.stderr
        bg.wait(timeout=20)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode == 0
    report = json.loads(fin.stdout)
    assert report["outcome"] == "completed"
    names = [p["name"] for p in report["phases"]]
    assert names[:2] == ["preflight", "full copy"] and names[-1] == "final delta"
    deltas = [p for p in report["phases"] if p["name"].startswith("delta ")]
    assert deltas and len(names) == 3 + len(deltas)
    assert report["phases"][1]["imported"]["sessions"] == 5
    assert sum(p["imported"].get("sessions", 0) for p in deltas) >= 3
    assert count_vm(pair.b.fw) == 8


def test_abort_removes_import_on_destination_only(pair: Pair) -> None:
    establish(pair.a.fw, 10)
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0",
                     "--keep-source")
    assert res.returncode == 0, res.stderr
    assert count_vm(pair.b.fw) == 10
    res = pair.a.cli("migrate", "--vm", VM, "--abort")
    assert res.returncode == 0, res.stderr
    assert "aborted migration" in res.stdout
    assert count_vm(pair.b.fw) == 0
    assert count_vm(pair.a.fw) == 10


def test_untrusted_source_is_refused_and_nothing_loads(pair: Pair) -> None:
    establish(pair.a.fw, 3)
    assert pair.b.cli("peers", "remove", "hosta").returncode == 0
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb")
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("samixdp: error:") and "untrusted" in err, res.stderr
    assert count_vm(pair.b.fw) == 0


def test_unknown_peer_one_line_error(pair: Pair) -> None:
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "nosuchhost")
    assert res.returncode != 0
    assert res.stderr.strip().startswith("samixdp: error: unknown peer")
    assert "\n" not in res.stderr.strip()


def test_unreachable_peer_fails_cleanly(pair: Pair) -> None:
    key_b = pair.b.cli("keys", "show").stdout.strip()
    moved = pair.a.cli("peers", "add", "hostb", "--address", f"127.0.0.1:{free_port()}",
                       "--key", key_b, "--replace")
    assert moved.returncode == 0, moved.stderr
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb")
    assert res.returncode != 0
    assert "cannot reach peer" in res.stderr


def test_source_cleanup_after_grace(pair: Pair) -> None:
    establish(pair.a.fw, 4)
    acl.add_rules(pair.a.fw, [acl.make_rule(pair.a.fw, vm=VM, proto="udp")])
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0",
                     "--source-grace", "1")
    assert res.returncode == 0, res.stderr
    assert count_vm(pair.a.fw) == 4  # the source still serves the VM right after migrate
    deadline = time.monotonic() + 15
    # the helper removes sessions first, rules right after: wait for both
    while time.monotonic() < deadline and (
        count_vm(pair.a.fw) or len(acl.vm_entries(pair.a.fw, VM))
    ):
        time.sleep(0.2)
    assert count_vm(pair.a.fw) == 0
    assert len(acl.vm_entries(pair.a.fw, VM)) == 0
    assert count_vm(pair.b.fw) == 4


def test_unauthenticated_bytes_are_never_read_as_a_message(pair: Pair) -> None:
    """A client without a trusted key gets no further than the TLS handshake: a frame
    header announcing 2 GiB is dropped with the connection, nothing is buffered, and
    the agent keeps serving."""
    from sami_xdp.migrate.transport import HEADER, MAGIC, MSG_BUNDLE, VERSION

    with socket.create_connection(("127.0.0.1", pair.port), timeout=5) as s:
        s.sendall(HEADER.pack(MAGIC, VERSION, MSG_BUNDLE, 0, 1 << 31) + b"\0" * 4096)
        try:
            reply = s.recv(4096)
        except ConnectionResetError:
            reply = b""
    assert b"exceeds" not in reply and b"SXMG" not in reply
    establish(pair.a.fw, 2)
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0",
                     "--keep-source", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outcome"] == "completed"
    assert count_vm(pair.b.fw) == 2


def test_a_trusted_peers_oversized_message_gets_a_signed_refusal(pair: Pair) -> None:
    from sami_xdp.migrate.transport import (
        HEADER,
        MAGIC,
        MSG_ERROR,
        VERSION,
        Deadline,
        recv_frame,
        send_all,
    )

    ident = HostIdentity.load(pair.a.config)
    trust = TrustStore.load(pair.a.config)
    with Connection(trust.get("hostb"), ident) as conn:
        send_all(conn.sock, HEADER.pack(MAGIC, VERSION, MSG_BUNDLE, 0, 1 << 31), Deadline(5))
        reply = recv_frame(conn.sock, 1 << 16, Deadline(10))
    assert reply.type == MSG_ERROR
    _, body = verify_control(bytes(reply.payload), trust, "hosta", expect_from="hostb")
    assert body["ok"] is False and "exceeds the limit" in body["reason"]


def test_agent_refuses_an_expired_bundle(pair: Pair) -> None:
    """Expiry is enforced on the agent's receive path: a correctly signed bundle of A,
    issued 70 s ago and valid 60 s, gets a signed refusal and loads nothing."""
    establish(pair.a.fw, 3)
    ident = HostIdentity.load(pair.a.config)
    state = export_vm_state(pair.a.fw, VM)
    data = encode_bundle(
        state.sections(), identity=ident, vms=state.vms.addrs, audience="hostb", seq=1,
        migration_id=new_migration_id(),
        layout_version=pair.a.fw.const("SAMIXDP_LAYOUT_VERSION"),
        acl_digest=state.acl_digest, validity_s=60,
        issued_at_ms=int(time.time() * 1000) - 70_000,
    )
    with Connection(TrustStore.load(pair.a.config).get("hostb"), ident) as conn:
        reply = conn.request(MSG_BUNDLE, data)
    assert reply.type == MSG_ACK
    _, body = verify_control(reply.payload, TrustStore.load(pair.a.config), "hosta",
                             expect_from="hostb")
    assert body["ok"] is False and "expired" in body["reason"], body
    assert count_vm(pair.b.fw) == 0
    assert ImportRecords(pair.b.state).list() == []


# ---- a dual-stack VM: all its addresses, one bundle a round ------------------------------------


def test_migrate_moves_a_dual_stack_vm_whole(pair: Pair) -> None:
    """`migrate --vm V4 --vm V6`: one bundle a round holds both addresses; B carries the
    flows of both families; the source cleanup removes both."""
    establish(pair.a.fw, 6)
    establish(pair.a.fw, 4, vm=VM6)
    acl.add_rules(pair.a.fw, [acl.make_rule(pair.a.fw, vm=VM, proto="tcp", dport="22"),
                              acl.make_rule(pair.a.fw, vm=VM6, proto="tcp", dport="22")])
    res = pair.a.cli("migrate", "--vm", VM, "--vm", "2001:DB8:1::10", "--peer", "hostb",
                     "--rounds", "1", "--interval", "0.1", "--source-grace", "1", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["outcome"] == "completed"
    assert report["vms"] == [VM, VM6] and report["vm"] == f"{VM},{VM6}"
    full = report["phases"][1]
    assert full["exported"]["sessions"] == 10
    assert full["imported"]["sessions"] == 10 and full["imported"]["acl_rules"] == 2
    assert count_vm(pair.b.fw) == 6 and count_vm(pair.b.fw, VM6) == 4
    imported = json.loads(pair.b.cli("imports", "list", "--json").stdout)
    assert [(r["vms"], len(r["rounds"])) for r in imported] == [([VM, VM6], 3)]
    assert run_frame(pair.b.fw, P.tcp6(CLIENT6, 443, VM6, 20001, P.ACK | P.PSH, b"x")) == "PASS"
    assert run_frame(pair.b.fw, P.tcp(CLIENT, 443, VM, 20001, P.ACK | P.PSH, b"x")) == "PASS"
    assert run_frame(pair.b.fw, P.tcp6(CLIENT6, 5555, VM6, 22, P.SYN)) == "PASS"
    assert run_frame(pair.b.fw, P.tcp6(CLIENT6, 5555, VM6, 23, P.SYN)) == "DROP"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (count_vm(pair.a.fw) or count_vm(pair.a.fw, VM6)):
        time.sleep(0.2)
    assert count_vm(pair.a.fw) == 0 and count_vm(pair.a.fw, VM6) == 0
    wait_for("the rules' cleanup", lambda: len(acl.vm_entries(pair.a.fw, VM6)) == 0)


def test_final_and_abort_find_the_migration_by_any_of_its_addresses(pair: Pair) -> None:
    establish(pair.a.fw, 3)
    establish(pair.a.fw, 2, vm=VM6)
    bg = pair.a.popen("migrate", "--vm", VM, "--vm", VM6, "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1", "--keep-source", "--json")
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw, VM6) == 2, alive=bg)
        fin = pair.a.cli("migrate", "--vm", VM6, "--final", "--json")
        assert fin.returncode == 0, fin.stderr
        bg.wait(timeout=20)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode == 0
    assert json.loads(fin.stdout)["outcome"] == "completed"
    assert count_vm(pair.b.fw) == 3 and count_vm(pair.b.fw, VM6) == 2
    res = pair.a.cli("migrate", "--vm", VM, "--abort")
    assert res.returncode == 0, res.stderr
    assert f"of {VM},{VM6}" in res.stdout
    assert count_vm(pair.b.fw) == 0 and count_vm(pair.b.fw, VM6) == 0
    assert count_vm(pair.a.fw) == 3 and count_vm(pair.a.fw, VM6) == 2
    res = pair.a.cli("migrate", "--vm", "2001:db8:1::99", "--abort")
    assert res.returncode != 0
    assert res.stderr.strip() == "samixdp: error: no migration of 2001:db8:1::99 recorded on " \
                                 "this host"


def test_a_destination_trusting_one_address_refuses_the_whole_vm(fw, firewall_b,
                                                                 tmp_path: Path) -> None:
    with make_pair(fw, firewall_b, tmp_path, a_scope=PREFIX) as pair:
        establish(pair.a.fw, 2)
        establish(pair.a.fw, 2, vm=VM6)
        res = pair.a.cli("migrate", "--vm", VM, "--vm", VM6, "--peer", "hostb")
        assert res.returncode != 0
        err = res.stderr.strip().splitlines()[-1]
        assert err.startswith("samixdp: error: preflight refused by hostb:")
        assert f"{VM6} is outside the scope of hosta here (vms: {PREFIX})" in err
        assert f"{VM} is" not in err  # only the address at fault is named
        assert count_vm(pair.b.fw) == 0 and count_vm(pair.b.fw, VM6) == 0
        assert ImportRecords(pair.b.state).list() == []
