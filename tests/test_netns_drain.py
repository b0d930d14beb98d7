"""Host drain on the demo topology: several VMs, each with live TCP connections in
both directions, leave host A for host B (`samixdp drain`, run by A's agent), then
the hypervisor moves them behind B; every connection of every VM keeps exchanging
data, through B's migrated sessions alone (B's agent opens no pickup window).

The VMs are addresses of the topology's VM namespace (the firewall knows a VM by
its address): 10.1.1.1 plus extra ones (`veth_topology.sh add-vm-addr`), one of
them IPv6; one `move-to-b` moves them all, as a host evacuation does. The drain
keeps the default source cleanup, with a short grace: A's agent must keep each VM's
state while its connections still run through A and drop it once the VM is gone,
which the test checks too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns import demo_env, demo_topology, lab, require_root  # noqa: F401

from testbed.netns import SAMIXDP, Lab, LineReader, Netns, wait_for_text

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]

LOAD = Path(__file__).resolve().parent.parent / "scripts" / "conn_load.py"
CLIENT_IP, CLIENT_IP6 = "192.0.2.10", "2001:db8:c::10"
VM_NET, VM_NET6 = "10.1.1.0/24", "2001:db8:1::/64"
VMS = ("10.1.1.1", "10.1.1.2", "10.1.1.3", "2001:db8:1::11")  # 10.1.1.1: the topology's
TO_CLIENT_PORT, TO_VM_PORT = 9000, 9001
CONNS = 2  # per VM and direction
AGENT_PORT = 7800
SOURCE_GRACE_S = 5  # A drops a moved VM's state after this long without its traffic
AFTER_MOVE_S = 5.0  # traffic after the move before the connections are judged
LIFETIME = 180  # bound of every process the test starts
PEER_B = "hostb"


@dataclass
class DemoHost:
    """One firewall host of the demo topology: its namespace and its own dirs."""

    name: str
    ns: Netns
    dirs: list[str]  # the CLI's --bpffs/--config-dir/--state-dir options
    uplink_ip: str
    ifaces: list[str]

    @classmethod
    def of(cls, env: dict[str, str], which: str) -> DemoHost:
        return cls(
            name=f"host{which.lower()}",
            ns=Netns(env[f"SX_NS_{which}"]),
            dirs=["--bpffs", env[f"SX_{which}_BPFFS"],
                  "--config-dir", env[f"SX_{which}_CONFIG_DIR"],
                  "--state-dir", env[f"SX_{which}_STATE_DIR"]],
            uplink_ip=env[f"SX_{which}_UPLINK_IP"],
            ifaces=env[f"SX_{which}_IFACES"].split(),
        )

    def cli(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.ns.run(SAMIXDP, *self.dirs, *args, check=check, timeout=timeout)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def vm_sessions(self, vm: str) -> list[dict[str, Any]]:
        """The TCP sessions of the test's connections with `vm` at one end."""
        rows = self.cli_json("sessions", "--vm", vm)
        return [r for r in rows if r["proto"] == "tcp"
                and (r["dport"] == TO_CLIENT_PORT or r["dport"] == TO_VM_PORT)]


@dataclass
class Load:
    """One conn_load client: CONNS connections to (addr, port), timeline to `out`."""

    label: str
    proc: subprocess.Popen[bytes]
    out: Path


def alive_after(load: dict[str, Any], moved_at: float) -> list[str]:
    """What went wrong with each connection that did not exchange data after the
    move (echoes received after `moved_at`, monotonic time); empty when all did."""
    after_s = moved_at - load["start"]
    bad = []
    for c in load["conns"]:
        after = [t for t in c["echoes"] if t > after_s]
        if c["end"] != "open" or len(after) < 2:
            last = c["echoes"][-1] if c["echoes"] else None
            bad.append(f"conn {c['idx']}: end {c['end']!r}, {len(c['echoes'])} echoes, "
                       f"{len(after)} after the move, last at {last} s (move done at "
                       f"{after_s:.2f} s)")
    return bad


def test_drain_moves_every_vm_with_its_connections(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    require_root()
    suffix = "d" + lab.suffix
    demo_topology(lab, suffix, "up")
    for vm in VMS[1:]:
        demo_topology(lab, suffix, "add-vm-addr", vm)
    env = demo_env(lab, suffix)
    assert env["SX_VM_IP"] == VMS[0]
    client, vm_ns = Netns(env["SX_NS_CLIENT"]), Netns(env["SX_NS_VM"])
    a, b = DemoHost.of(env, "A"), DemoHost.of(env, "B")

    # identities and mutual trust for the VM prefixes; the firewall on both hosts
    for h in (a, b):
        h.cli("keys", "init", "--host-id", h.name)
    keys = {h.name: h.cli("keys", "show").stdout.strip() for h in (a, b)}
    for h, other in ((a, b), (b, a)):
        h.cli("peers", "add", other.name, "--address", f"{other.uplink_ip}:{AGENT_PORT}",
              "--key", keys[other.name], "--vms", f"{VM_NET},{VM_NET6}")
        for iface in h.ifaces:
            h.cli("attach", iface, "--protect", VM_NET, "--protect", VM_NET6)
    for vm in VMS:  # each VM's own inbound rule: it travels with the VM
        a.cli("acl", "add", "--vm", vm, "--proto", "tcp", "--dport", str(TO_VM_PORT))

    # an agent on each host: A's runs the drain's migrations, B's receives them and
    # opens no pickup window, so only migrated sessions can carry the connections
    agents = {}
    for h, extra in ((a, []), (b, ["--pickup", "0"])):
        log = tmp_path / f"{h.name}-agent.log"
        proc = lab.spawn(h.ns, SAMIXDP, *h.dirs, "agent", "--listen",
                         f"{h.uplink_ip}:{AGENT_PORT}", *extra, lifetime=LIFETIME, log=log)
        agents[h.name] = (proc, log)
    for proc, log in agents.values():
        wait_for_text(log, '"listening"', 30, proc)

    # servers: the client's (both families) and each VM's
    servers = [(client, CLIENT_IP, TO_CLIENT_PORT), (client, CLIENT_IP6, TO_CLIENT_PORT),
               *((vm_ns, vm, TO_VM_PORT) for vm in VMS)]
    for ns, ip, port in servers:
        srv = lab.spawn(ns, sys.executable, LOAD, "serve", ip, str(port), "--lifetime",
                        str(LIFETIME), lifetime=LIFETIME)
        line = LineReader(srv).readline(timeout=20)
        assert line and line.startswith("listening"), f"server {ip}:{port}: {line!r}"

    # per VM: CONNS connections it opened to the client, CONNS the client opened to it
    stop = tmp_path / "stop"
    loads: list[Load] = []
    for vm in VMS:
        to_client = CLIENT_IP6 if ":" in vm else CLIENT_IP
        for label, ns, addr, port, local in (
            (f"{vm}->client", vm_ns, to_client, TO_CLIENT_PORT, ["--local", vm]),
            (f"client->{vm}", client, vm, TO_VM_PORT, []),
        ):
            out = tmp_path / f"load-{len(loads)}.json"
            proc = lab.spawn(ns, sys.executable, LOAD, "run", addr, str(port), "--conns",
                             str(CONNS), "--duration", str(LIFETIME - 30), "--interval", "100",
                             "--stop-file", stop, "--out", out, *local, lifetime=LIFETIME)
            loads.append(Load(label, proc, out))
    for ld in loads:
        line = LineReader(ld.proc).readline(timeout=30)
        assert line == f"connected {CONNS}/{CONNS}", f"{ld.label}: {line!r}"
    time.sleep(1.0)  # a few records on every connection through A
    for vm in VMS:
        assert len(a.vm_sessions(vm)) == 2 * CONNS, a.cli("sessions", "--vm", vm).stdout

    # the drain: A's agent migrates every VM to B, the connections still running
    res = a.cli("drain", "--peer", PEER_B, "--parallel", "4", "--source-grace",
                str(SOURCE_GRACE_S), "--json", check=False, timeout=150)
    logs = {name: log.read_text(errors="replace")[-3000:] for name, (_, log) in agents.items()}
    assert res.returncode == 0, f"drain: {res.stdout[-3000:]}{res.stderr[-2000:]}\n{logs}"
    report = json.loads(res.stdout)

    # the hypervisor moves every VM behind B (and announces their addresses there)
    moved = demo_topology(lab, suffix, "move-to-b").stdout
    moved_at = time.monotonic()
    assert all(vm in moved for vm in VMS), moved
    time.sleep(AFTER_MOVE_S)

    # B holds each VM's sessions: migrated ones, none picked up mid-flow
    for vm in VMS:
        rows = b.vm_sessions(vm)
        assert len(rows) == 2 * CONNS, rows
        assert all(r["migrated"] and not r["picked_up"] for r in rows), rows
        assert all(r["state"] == "ESTABLISHED" for r in rows), rows

    stop.touch()
    for ld in loads:
        ld.proc.wait(timeout=30)
    b_stats = b.cli_json("stats")
    b_drops = {k: v for k, v in b_stats.items() if k.startswith("drop-") and v}
    broken = {ld.label: bad for ld in loads
              if (bad := alive_after(json.loads(ld.out.read_text()), moved_at))}
    assert not broken, f"connections that broke: {broken}; B's drops: {b_drops}"

    # the report: every VM moved, by A's agent, with its sessions
    by_vm = {r["vm"]: r for r in report["vms"]}
    assert sorted(by_vm) == sorted(VMS), report
    assert report["via"] == "agent" and report["failed"] == 0, report
    assert report["completed"] == len(VMS), report
    for row in by_vm.values():
        assert row["outcome"] == "completed" and row["peer"] == PEER_B, row
        assert row["sessions"] >= 2 * CONNS and row["bytes"] > 0, row
        assert "full copy" in row["phases"] and "final delta" in row["phases"], row
    assert report["sessions"] == sum(r["sessions"] for r in by_vm.values())

    # A's agent drops each VM's state once the VM has gone quiet there
    proc_a, log_a = agents[a.name]
    end = time.monotonic() + SOURCE_GRACE_S + 40
    left = {vm: a.vm_sessions(vm) for vm in VMS}
    while any(left.values()) and time.monotonic() < end:
        time.sleep(1.0)
        left = {vm: a.vm_sessions(vm) for vm in VMS}
    assert not any(left.values()), f"A kept state of moved VMs: {left}\n{log_a.read_text()[-3000:]}"
    cleaned = [json.loads(line) for line in log_a.read_text().splitlines()
               if '"source-cleanup"' in line]
    assert sorted(e["vm"] for e in cleaned) == sorted(VMS), cleaned
    assert proc_a.poll() is None and agents[b.name][0].poll() is None  # both agents still up
