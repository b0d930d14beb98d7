"""Two hosts with real CLIs and a real `samixdp agent` process on B (loopback),
shared by the online tests: A and B are the two test firewalls, each with its own
config and state dirs; B's agent logs to a file (a full pipe would stall it)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import reset_firewall, run_frame

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, TrustStore
from sami_xdp.policy import protect, sessions
from testbed import packets as P

SAMIXDP = Path(sys.executable).parent / "samixdp"
VM, CLIENT = "10.1.1.1", "192.0.2.10"
PREFIX = "10.1.1.0/24"
VM6, CLIENT6 = "2001:db8:1::10", "2001:db8:99::5"  # the VM's other address: dual-stack
PREFIX6 = "2001:db8:1::/64"
BOTH = f"{PREFIX},{PREFIX6}"


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

    def argv(self, *args: str) -> list[str]:
        return [str(SAMIXDP), "--bpffs", str(self.fw.path), "--config-dir", str(self.config),
                "--state-dir", str(self.state), *args]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_event(self, event: str, timeout: float = 20.0, **match: object) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events():
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event} {match} from the agent; log: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Pair:
    a: Host
    b: Host
    agent: Agent
    port: int


def start_agent(host: Host, port: int, *args: str) -> Agent:
    log = host.state.parent / f"agent-{host.name}-{port}.log"
    fh = open(log, "wb")  # noqa: SIM115 - the child holds it; closed below
    proc = subprocess.Popen(host.argv("agent", "--listen", f"127.0.0.1:{port}", *args),
                            stdout=fh, stderr=subprocess.STDOUT)
    fh.close()
    agent = Agent(proc, log, port)
    try:
        agent.wait_event("listening")
    except BaseException:
        agent.stop()
        raise
    return agent


@contextlib.contextmanager
def make_pair(fw_a: Firewall, fw_b: Firewall, root: Path, *agent_args: str,
              a_scope: str = BOTH) -> Iterator[Pair]:
    """A trusts B (its agent); B trusts A for `a_scope`; B's agent runs. Both protect
    the VM's two prefixes (IPv4 and IPv6)."""
    reset_firewall(fw_b)
    a = Host("hosta", fw_a, root / "a-cfg", root / "a-state")
    b = Host("hostb", fw_b, root / "b-cfg", root / "b-state")
    ids = {}
    for h in (a, b):  # what `keys init` and `peers add` write (the CLI has tests of its own)
        protect.add_protected(h.fw, PREFIX)
        protect.add_protected(h.fw, PREFIX6)
        ids[h.name] = HostIdentity.init(h.config, h.name)
    port = free_port()
    for h, other, address, scope in ((a, b, f"127.0.0.1:{port}", BOTH),
                                     (b, a, "127.0.0.1:1", a_scope)):
        trust = TrustStore.load(h.config)
        trust.add(other.name, address, ids[other.name].public_b64, vms=scope)
        trust.save()
    agent = start_agent(b, port, "--pickup", "5", *agent_args)
    try:
        yield Pair(a, b, agent, port)
    finally:
        agent.stop()


def establish(fw: Firewall, n: int, base: int = 20000, vm: str = VM) -> None:
    """n outbound TCP connections of the VM's address `vm` (IPv4 or IPv6), established
    by the real program."""
    tcp, client = (P.tcp6, CLIENT6) if ":" in vm else (P.tcp, CLIENT)
    for i in range(n):
        sp = base + i
        assert run_frame(fw, tcp(vm, sp, client, 443, P.SYN)) == "PASS"
        assert run_frame(fw, tcp(client, 443, vm, sp, P.SYN | P.ACK)) == "PASS"
        assert run_frame(fw, tcp(vm, sp, client, 443, P.ACK)) == "PASS"


def count_vm(fw: Firewall, vm: str = VM) -> int:
    t = sessions.read_sessions(fw)
    return int(sessions.vm_mask(t.keys, vm).sum())


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
