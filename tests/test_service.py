"""The agent as a systemd service, without systemd: the notify protocol spoken to a
socket of ours (READY=1 only once it listens, WATCHDOG=1 from its accept loop at
half WatchdogSec, STOPPING=1 and a clean exit on SIGTERM), the units verified by
`systemd-analyze verify` against a real `make install` into a scratch prefix."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agents import free_port
from conftest import require_tool

from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity

pytestmark = pytest.mark.needs_root

REPO = Path(__file__).resolve().parent.parent
SAMIXDP = Path(sys.executable).parent / "samixdp"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_agent_speaks_systemd_notify(fw: Firewall, tmp_path: Path) -> None:
    HostIdentity.init(tmp_path / "cfg", "hosta")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([str(SAMIXDP), "--bpffs", str(fw.path), "--config-dir",
                             str(tmp_path / "cfg"), "--state-dir", str(tmp_path / "state"),
                             "agent", "--listen", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = sock.recv(4096).decode()
        # ready means listening: a connection succeeds the moment READY=1 arrives
        assert first.splitlines()[0] == "READY=1", first
        assert f"STATUS=listening on 127.0.0.1:{port}" in first
        assert listening(port)
        t0 = time.monotonic()
        pets = [sock.recv(4096).decode() for _ in range(3)]
        assert pets == ["WATCHDOG=1"] * 3
        # three pets at half the 0.4 s watchdog, from the accept loop
        assert time.monotonic() - t0 < 2.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
        msgs = []
        sock.settimeout(2)
        while True:
            try:
                msgs.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        assert msgs and msgs[-1] == "STOPPING=1"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_watchdog_for_another_pid_is_not_petted(fw: Firewall, tmp_path: Path) -> None:
    HostIdentity.init(tmp_path / "cfg", "hosta")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000",
           "WATCHDOG_PID": "1"}
    proc = subprocess.Popen([str(SAMIXDP), "--bpffs", str(fw.path), "--config-dir",
                             str(tmp_path / "cfg"), "--state-dir", str(tmp_path / "state"),
                             "agent", "--listen", f"127.0.0.1:{free_port()}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert sock.recv(4096).decode().startswith("READY=1")
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        sock.close()


def test_make_install_then_the_units_verify(tmp_path: Path) -> None:
    """A real install into a scratch prefix: the command runs, and systemd-analyze
    verifies both units against it (their ExecStart exists there)."""
    analyze = require_tool("systemd-analyze")
    prefix, etc = tmp_path / "prefix", tmp_path / "etc"
    res = subprocess.run(["make", "-C", str(REPO), "install", f"PREFIX={prefix}",
                          f"SYSCONFDIR={etc}"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    units = sorted((prefix / "lib" / "systemd" / "system").glob("*.service"))
    assert [u.name for u in units] == ["samixdp-agent.service", "samixdp-apply.service"]
    for u in units:
        text = u.read_text()
        assert "@" not in text.replace("samixdp-", ""), f"unsubstituted placeholder in {u}"
        assert f"ExecStart={prefix}/bin/samixdp" in text
    ver = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True,
                         timeout=120)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    installed = subprocess.run([str(prefix / "bin" / "samixdp"), "--help"], capture_output=True,
                               text=True, timeout=60, cwd=tmp_path)
    assert installed.returncode == 0 and "apply" in installed.stdout
    # the installed copy finds its BPF sources in the prefix, not in this checkout
    where = subprocess.run([str(prefix / "lib" / "samixdp" / "bin" / "python"), "-c",
                            "from sami_xdp.base.paths import program_path; print(program_path())"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(prefix / "lib" / "samixdp" / "share")), where
    assert (etc / "samixdp" / "samixdp.toml").exists()
    assert os.stat(etc / "samixdp").st_mode & 0o777 == 0o700
    # a second install keeps the operator's config and puts the new one beside it
    (etc / "samixdp" / "samixdp.toml").write_text("# edited\n")
    again = subprocess.run(["make", "-C", str(REPO), "install", f"PREFIX={prefix}",
                            f"SYSCONFDIR={etc}"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (etc / "samixdp" / "samixdp.toml").read_text() == "# edited\n"
    assert (etc / "samixdp" / "samixdp.toml.example").exists()
    shutil.rmtree(prefix, ignore_errors=True)
