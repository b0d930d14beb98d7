"""Host drain and migrations run by the agent (issue: host drain), end to end:
real agent processes on A and B, the real CLI, real bundles over TLS.

A's agent runs A's outgoing migrations: `samixdp drain` and `samixdp migrate`
hand them over its local socket. Asserted: every VM's sessions land exactly; one
VM's failure (outside B's scope of A) ends only that VM's migration; a killed
client aborts its migration and B drops what it got; `--final` reaches the
agent; the local socket answers root alone and survives garbage; with no agent
the CLI runs the drain itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agents import Agent, Pair, count_vm, establish, free_port, make_pair, start_agent, wait_for

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import TrustStore
from sami_xdp.migrate.localproto import socket_path
from sami_xdp.migrate.vmset import VmAddrs
from sami_xdp.policy import acl, sessions

pytestmark = pytest.mark.needs_root

VMS = ("10.1.1.1", "10.1.1.2", "10.1.1.3")
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def hosts(fw: Firewall, firewall_b: Firewall, tmp_path: Path) -> Iterator[tuple[Pair, Agent]]:
    """A and B, both with agents (A's runs A's outgoing migrations); B takes A's VMs
    in 10.1.1.0/30 only (10.1.1.9 is outside its scope)."""
    with make_pair(fw, firewall_b, tmp_path, a_scope="10.1.1.0/30") as pair:
        port_a = free_port()
        trust = TrustStore.load(pair.b.config)
        a = trust.get("hosta")
        trust.add("hosta", f"127.0.0.1:{port_a}", a.public_raw, replace=True, vms=a.vms)
        trust.save()
        agent_a = start_agent(pair.a, port_a)
        try:
            yield pair, agent_a
        finally:
            agent_a.stop()


def keyset(fw: Firewall, vm: str) -> set[bytes]:
    t = sessions.read_sessions(fw)
    return {k.tobytes() for k in t.keys[sessions.vm_mask(t.keys, vm)]}


def fill(pair: Pair, vms: tuple[str, ...], n: int = 5) -> None:
    for i, vm in enumerate(vms):
        establish(pair.a.fw, n + i, base=20000 + 100 * i, vm=vm)


def test_a_drain_through_the_agent_moves_every_vm_exactly(hosts):
    pair, agent_a = hosts
    fill(pair, VMS)
    res = pair.a.cli("drain", "--peer", "hostb", "--json", "--keep-source",
                     "--interval", "0.1", "--parallel", "3")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["via"] == "agent" and report["completed"] == 3 and report["failed"] == 0
    rows = {r["vm"]: r for r in report["vms"]}
    assert set(rows) == set(VMS)
    # three full copies started together: fewer passes over the maps than VMs
    passes = _ask(socket_path(pair.a.state), b'{"op": "list"}\n')["scan_passes"]
    assert 1 <= passes < 3, passes
    for i, vm in enumerate(VMS):
        assert rows[vm]["outcome"] == "completed" and rows[vm]["peer"] == "hostb"
        assert rows[vm]["sessions"] == 5 + i
        assert keyset(pair.b.fw, vm) == keyset(pair.a.fw, vm) != set()
        agent_a.wait_event("migration-completed", vm=vm)
    # the agent ran them: no migrate process, records marked as the agent's
    recs = [json.loads(p.read_text()) for p in (pair.a.state / "migrations").glob("*.json")]
    assert sorted(r["vm"] for r in recs) == sorted(VMS)
    assert {r["via"] for r in recs} == {"agent"} and {r["pid"] for r in recs} == {
        agent_a.proc.pid}


def test_one_vms_failure_ends_only_its_own_migration(hosts):
    pair, _ = hosts
    fill(pair, ("10.1.1.1", "10.1.1.2", "10.1.1.9"))
    res = pair.a.cli("drain", "--peer", "hostb", "--json", "--keep-source", "--interval", "0")
    assert res.returncode == 10, res.stderr  # some VM did not move
    assert "1 of 3 VMs did not move (first: 10.1.1.9" in res.stderr
    rows = {r["vm"]: r for r in json.loads(res.stdout)["vms"]}
    assert rows["10.1.1.9"]["outcome"].startswith("failed: ")
    assert "outside the scope of hosta" in rows["10.1.1.9"]["outcome"]
    for vm in ("10.1.1.1", "10.1.1.2"):
        assert rows[vm]["outcome"] == "completed"
        assert keyset(pair.b.fw, vm) == keyset(pair.a.fw, vm) != set()
    assert count_vm(pair.b.fw, "10.1.1.9") == 0


def test_drain_picks_vms_by_prefix_and_reads_a_mapping_file(hosts, tmp_path):
    pair, _ = hosts
    fill(pair, VMS, n=2)
    dry = pair.a.cli("drain", "--peer", "hostb", "--vms", "10.1.1.2/31", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert [r["vm"] for r in json.loads(dry.stdout)["vms"]] == ["10.1.1.2", "10.1.1.3"]
    # a VM with rules of its own and no session yet is a VM too
    acl.add_rules(pair.a.fw, [acl.make_rule(pair.a.fw, vm="10.1.1.5", proto="tcp", dport=22)])
    dry = pair.a.cli("drain", "--peer", "hostb", "--dry-run", "--json")
    assert [r["vm"] for r in json.loads(dry.stdout)["vms"]] == [*VMS, "10.1.1.5"]
    mapping = tmp_path / "map"
    mapping.write_text("# vm  peer\n10.1.1.2 hostb\n")
    res = pair.a.cli("drain", "--map", str(mapping), "--vms", "10.1.1.2/32", "--json",
                     "--keep-source", "--interval", "0")
    assert res.returncode == 0, res.stderr
    assert [r["vm"] for r in json.loads(res.stdout)["vms"]] == ["10.1.1.2"]
    assert count_vm(pair.b.fw, "10.1.1.1") == 0 and count_vm(pair.b.fw, "10.1.1.2") == 3
    mapping.write_text("10.1.1.2 nobody-knows\n")
    bad = pair.a.cli("drain", "--map", str(mapping))
    assert bad.returncode == 10 and "unknown peer 'nobody-knows'" in bad.stderr


def test_a_killed_client_aborts_its_migration_in_the_agent(hosts):
    pair, agent_a = hosts
    establish(pair.a.fw, 4)
    bg = pair.a.popen("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1", "--json")
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw) == 4, alive=bg)
    finally:
        bg.kill()
        bg.wait()
    ev = agent_a.wait_event("migration-failed", vm="10.1.1.1")
    assert "client went away" in ev["reason"]
    pair.agent.wait_event("aborted")
    wait_for("B to drop what it got", lambda: count_vm(pair.b.fw) == 0)
    # the agent lives on and runs the next one
    res = pair.a.cli("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--keep-source",
                     "--interval", "0", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outcome"] == "completed"
    assert count_vm(pair.b.fw) == 4


def test_final_and_abort_from_another_shell_reach_the_agent(hosts):
    pair, _ = hosts
    establish(pair.a.fw, 3)
    bg = pair.a.popen("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1", "--keep-source", "--json")
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw) == 3, alive=bg)
        fin = pair.a.cli("migrate", "--vm", "10.1.1.1", "--final", "--json")
        assert fin.returncode == 0, fin.stderr
        assert json.loads(fin.stdout)["phases"][-1]["name"] == "final delta"
        out, err = bg.communicate(timeout=30)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode == 0, err
    assert json.loads(out)["outcome"] == "completed"
    bg = pair.a.popen("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1", "--keep-source")
    try:
        wait_for("the migration to run", lambda: any(
            json.loads(p.read_text()).get("status") == "running"
            for p in (pair.a.state / "migrations").glob("*.json")), alive=bg)
        ab = pair.a.cli("migrate", "--vm", "10.1.1.1", "--abort")
        assert ab.returncode == 0, ab.stderr
        assert "aborted migration" in ab.stdout
        bg.wait(timeout=30)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode == 17  # the migrate client: refused (aborted by the operator)


def _as_nobody(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`code` as uid 65534, started in `cwd` (entered as root: the test's parent
    directories are root's alone)."""
    def drop() -> None:
        os.chdir(cwd)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    # the system's python: the venv may lie below a directory only root may enter
    return subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True, text=True,
                          timeout=30, preexec_fn=drop)


def _ask(path: Path, raw: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(raw)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def test_the_local_socket_answers_root_alone_and_survives_garbage(hosts):
    pair, agent_a = hosts
    path = socket_path(pair.a.state)
    assert path.stat().st_mode & 0o777 == 0o600
    connect = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path.name!r}); "
               "print(s.recv(4096).decode())")  # refused before any request is read
    denied = _as_nobody(connect, path.parent)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr
    path.chmod(0o666)  # a careless chmod still lets no other user in
    try:
        other = _as_nobody(connect, path.parent)
    finally:
        path.chmod(0o600)
    assert other.returncode == 0, other.stderr
    answer = json.loads(other.stdout)
    assert answer["ok"] is False and "may not control the agent" in answer["error"]
    for raw, why in [
        (b"not json\n", "must be one JSON object"),
        (b"[1, 2]\n", "must be one JSON object"),
        (b'{"op": "reboot"}\n', "must be migrate, final, abort or list"),
        (b'{"op": "migrate", "vms": ["10.1.1.1"], "peer": "hostb", "options": {"rounds": -1,'
         b' "interval_s": 0, "until_cutover": false, "source_grace_s": 1, "keep_source": true,'
         b' "compression": "none", "plaintext": false}}\n', "rounds"),
        (b'{"op": "migrate", "vms": ["10.1.1.1"], "peer": "hostb", "options": {}}\n',
         "compression"),
        (b'{"op": "final", "vms": ["10.1.1.1"]}\n', "no running migration"),
        (b"x" * 70000 + b"\n", "longer than"),
    ]:
        got = _ask(path, raw)
        assert got["ok"] is False and why in got["error"], (raw[:40], got)
    assert _ask(path, b'{"op": "list"}\n') == {"ok": True, "running": [], "scan_passes": 0}
    assert agent_a.proc.poll() is None


def test_with_no_agent_the_cli_runs_the_drain_itself(hosts):
    pair, agent_a = hosts
    agent_a.stop()
    assert not socket_path(pair.a.state).exists()
    fill(pair, VMS[:2], n=3)
    res = pair.a.cli("drain", "--peer", "hostb", "--json", "--keep-source", "--interval", "0")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["via"] == "process" and report["completed"] == 2
    for vm in VMS[:2]:
        assert keyset(pair.b.fw, vm) == keyset(pair.a.fw, vm) != set()
    assert np.all([r["outcome"] == "completed" for r in report["vms"]])


def test_stopping_the_agent_aborts_its_migrations(hosts):
    """SIGTERM (systemctl stop) of A's agent mid-migration: the migration is aborted,
    B drops the full copy, the record says failed and the client exits non-zero."""
    pair, agent_a = hosts
    establish(pair.a.fw, 3)
    bg = pair.a.popen("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1")
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw) == 3, alive=bg)
        agent_a.proc.terminate()
        agent_a.proc.wait(timeout=30)
        bg.wait(timeout=30)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode != 0
    ev = agent_a.wait_event("migration-failed", vm="10.1.1.1")
    assert "the agent stopped" in ev["reason"]
    wait_for("B to drop what it got", lambda: count_vm(pair.b.fw) == 0)
    rec = json.loads(next((pair.a.state / "migrations").glob("*.json")).read_text())
    assert rec["status"] == "failed"
    assert not socket_path(pair.a.state).exists()


def test_with_every_tracking_slot_taken_a_migration_scans_its_deltas(hosts):
    """Eight other processes track VMs (every slot of the dirty log): a migration
    still runs, its delta rounds read the tables as before the dirty log."""
    pair, _ = hosts
    establish(pair.a.fw, 4)
    holder = subprocess.Popen(["sleep", "120"])  # alive: its slots are not reaped
    tracking = pair.a.fw.maps["tracking"]
    fake = VmAddrs.parse([f"10.1.1.{200 + s}" for s in range(8)]).addrs
    try:
        vals = np.zeros(1, dtype=tracking.value_dtype)
        for slot in range(pair.a.fw.const("SAMIXDP_TRACK_SLOTS")):
            vals["round"], vals["slot"], vals["owner"] = 1, slot, holder.pid
            tracking.update(fake[slot : slot + 1], vals)
        res = pair.a.cli("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--keep-source",
                         "--interval", "0")
        assert res.returncode == 0, res.stderr
        assert "no dirty log for this migration" in res.stderr
        assert keyset(pair.b.fw, "10.1.1.1") == keyset(pair.a.fw, "10.1.1.1") != set()
    finally:
        holder.kill()
        holder.wait()
        tracking.delete_many(fake)


def test_kill_9_of_the_agent_mid_migration_leaves_nothing_running(hosts):
    """The agent dies (kill -9) while it runs a migration: the client fails with one
    line; the restarted agent marks the record failed, takes the dead agent's dirty-log
    slot back, and runs the next migration."""
    pair, agent_a = hosts
    establish(pair.a.fw, 3)
    bg = pair.a.popen("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--until-cutover",
                      "--interval", "0.1")
    try:
        wait_for("the full copy on B", lambda: count_vm(pair.b.fw) == 3, alive=bg)
        agent_a.proc.kill()
        agent_a.proc.wait(timeout=10)
        _, err = bg.communicate(timeout=30)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode == 10 and "closed the connection without an answer" in err
    assert len(pair.a.fw.maps["tracking"].keys()) == 1  # the dead agent's entry, for now
    again = start_agent(pair.a, agent_a.port)
    try:
        again.wait_event("stale-migrations-failed")
        wait_for("the dead agent's slot to be reaped",
                 lambda: len(pair.a.fw.maps["tracking"].keys()) == 0)
        rec = json.loads(next((pair.a.state / "migrations").glob("*.json")).read_text())
        assert rec["status"] == "failed" and "stopped" in rec["reason"]
        res = pair.a.cli("migrate", "--vm", "10.1.1.1", "--peer", "hostb", "--keep-source",
                         "--interval", "0", "--json")
        assert res.returncode == 0, res.stderr
    finally:
        again.stop()
