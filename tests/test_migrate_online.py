"""The online path: a real `samixdp agent` process, `samixdp migrate` with its
phases, --until-cutover/--final, --abort, refusals and the source cleanup.

Hosts A and B are two firewalls in the test bpffs; the agent listens on
loopback. A's sessions are made by the real program through PROG_TEST_RUN."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_frame

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, ImportRecords, TrustStore, new_migration_id
from sami_xdp.migrate.bundle import encode_bundle
from sami_xdp.migrate.control import verify_control
from sami_xdp.migrate.select import export_vm_state
from sami_xdp.migrate.transport import MSG_ACK, MSG_BUNDLE, Connection
from sami_xdp.policy import acl, protect, sessions
from testbed import packets as P

pytestmark = pytest.mark.needs_root

SAMIXDP = Path(sys.executable).parent / "samixdp"
VM, CLIENT = "10.1.1.1", "192.0.2.10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Host:
    name: str
    fw: Firewall
    config: Path
    state: Path

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SAMIXDP), "--bpffs", str(self.fw.path), "--config-dir", str(self.config),
             "--state-dir", str(self.state), *args],
            capture_output=True, text=True, timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(SAMIXDP), "--bpffs", str(self.fw.path), "--config-dir", str(self.config),
             "--state-dir", str(self.state), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


@dataclass
class Pair:
    a: Host
    b: Host
    agent: subprocess.Popen[str]
    port: int


def _wait_line(proc: subprocess.Popen[str], needle: str, timeout: float = 15) -> str:
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            line = proc.stdout.readline()
            if needle in line:
                return line
        elif proc.poll() is not None:
            break
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"no {needle!r} from agent; stderr: {err}")


@pytest.fixture
def pair(fw: Firewall, firewall_b: Firewall, tmp_path: Path) -> Iterator[Pair]:
    from conftest import reset_firewall

    reset_firewall(firewall_b)
    a = Host("hosta", fw, tmp_path / "a-cfg", tmp_path / "a-state")
    b = Host("hostb", firewall_b, tmp_path / "b-cfg", tmp_path / "b-state")
    for h in (a, b):
        protect.add_protected(h.fw, "10.1.1.0/24")
        assert h.cli("keys", "init", "--host-id", h.name).returncode == 0
    port = free_port()
    key_a = a.cli("keys", "show").stdout.strip()
    key_b = b.cli("keys", "show").stdout.strip()
    assert a.cli("peers", "add", "hostb", "--address", f"127.0.0.1:{port}", "--key",
                 key_b).returncode == 0
    assert b.cli("peers", "add", "hosta", "--address", "127.0.0.1:1", "--key",
                 key_a, "--vms", "10.1.1.0/24").returncode == 0
    agent = b.popen("agent", "--listen", f"127.0.0.1:{port}", "--pickup", "5")
    try:
        _wait_line(agent, '"listening"')
        yield Pair(a, b, agent, port)
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=5)
        except subprocess.TimeoutExpired:
            agent.kill()


def establish(fw: Firewall, n: int, base: int = 20000) -> None:
    for i in range(n):
        sp = base + i
        assert run_frame(fw, P.tcp(VM, sp, CLIENT, 443, P.SYN)) == "PASS"
        assert run_frame(fw, P.tcp(CLIENT, 443, VM, sp, P.SYN | P.ACK)) == "PASS"
        assert run_frame(fw, P.tcp(VM, sp, CLIENT, 443, P.ACK)) == "PASS"


def count_vm(fw: Firewall) -> int:
    t = sessions.read_sessions(fw)
    return int(sessions.vm_mask(t.keys, VM).sum())


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


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 15.0,
             alive: subprocess.Popen[str] | None = None) -> None:
    """Polls `cond` until true (bounded); fails early if `alive` exited meanwhile."""
    end = time.monotonic() + timeout
    while not cond():
        if alive is not None and alive.poll() is not None:
            err = alive.stderr.read() if alive.stderr else ""
            raise AssertionError(f"process exited ({alive.returncode}) waiting for {what}: {err}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


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


def test_agent_refuses_oversized_message(pair: Pair) -> None:
    from sami_xdp.migrate.transport import HEADER, MAGIC, MSG_BUNDLE, VERSION

    with socket.create_connection(("127.0.0.1", pair.port), timeout=5) as s:
        s.sendall(HEADER.pack(MAGIC, VERSION, MSG_BUNDLE, 0, 1 << 31))
        reply = s.recv(4096)
    assert b"exceeds the limit" in reply
    # still serving: a new connection gets a whole migration through
    establish(pair.a.fw, 2)
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "0",
                     "--keep-source", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outcome"] == "completed"
    assert count_vm(pair.b.fw) == 2


def test_agent_refuses_an_expired_bundle(pair: Pair) -> None:
    """Expiry is enforced on the agent's receive path: a correctly signed bundle of A,
    issued 70 s ago and valid 60 s, gets a signed refusal and loads nothing."""
    establish(pair.a.fw, 3)
    ident = HostIdentity.load(pair.a.config)
    state = export_vm_state(pair.a.fw, VM)
    data = encode_bundle(
        state.sections(), identity=ident, vm=state.vm, audience="hostb", seq=1,
        migration_id=new_migration_id(),
        layout_version=pair.a.fw.const("SAMIXDP_LAYOUT_VERSION"),
        acl_digest=state.acl_digest, validity_s=60,
        issued_at_ms=int(time.time() * 1000) - 70_000,
    )
    with Connection(f"127.0.0.1:{pair.port}") as conn:
        reply = conn.request(MSG_BUNDLE, data)
    assert reply.type == MSG_ACK
    _, body = verify_control(reply.payload, TrustStore.load(pair.a.config), "hosta",
                             expect_from="hostb")
    assert body["ok"] is False and "expired" in body["reason"], body
    assert count_vm(pair.b.fw) == 0
    assert ImportRecords(pair.b.state).list() == []
