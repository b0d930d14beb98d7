"""Network namespaces for tests and benchmarks, removed even when a run fails.

A `Lab` owns everything a test builds: namespaces named ``sx<role><suffix>`` (the
suffix is unique per Lab, so several runs can share a machine), bpffs mounts and
directories under ``/run/sx<tag><suffix>``, and the processes it starts. `Lab.close()`
runs from the fixtures' teardown and again at interpreter exit as a safety net; it
kills those processes, deletes the namespaces (which deletes their veths and with them
any XDP attachment) and unmounts the bpffs (which frees the pinned program and maps).

Everything runs through `ip netns exec`, which gives each command a private mount
namespace: a bpffs mounted *inside* it vanishes with the command, so the bpffs the CLI
uses is mounted here, in the test's own mount namespace, before any CLI call.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "scripts" / "tcp_probe.py"
TOPOLOGY = REPO / "scripts" / "veth_topology.sh"
SAMIXDP = Path(sys.executable).parent / "samixdp"


def unique_suffix() -> str:
    return uuid.uuid4().hex[:6]


def sh(
    *cmd: str | os.PathLike[str],
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs a command, capturing text output; a failure shows both streams."""
    args = [str(c) for c in cmd]
    full_env = None if env is None else {**os.environ, **env}
    res = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"command failed ({res.returncode}): {' '.join(args)}\n"
            f"stdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}"
        )
    return res


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def bpffs_mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (deepest first), from this mount namespace."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def kill_netns_pids(name: str) -> None:
    """Ends the processes left inside one of our namespaces, by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        res = sh("ip", "netns", "pids", name, check=False)
        pids = [int(p) for p in res.stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(20):
            if not sh("ip", "netns", "pids", name, check=False).stdout.split():
                return
            time.sleep(0.05)


@dataclass(frozen=True)
class Netns:
    name: str

    def run(
        self,
        *cmd: str | os.PathLike[str],
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout, env=env)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", self.name, *args, check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.run("sh", "-c", f"echo {value} > {path}")

    def xdp_prog_id(self, link: str) -> int:
        """The XDP program id on `link` (0 when none)."""
        out = self.ip("-j", "-d", "link", "show", link).stdout
        info = json.loads(out)[0]
        xdp = info.get("xdp") or {}
        prog = xdp.get("prog") or {}
        return int(prog.get("id", 0))

    def tc_prog_ids(self, link: str) -> list[int]:
        """The programs of the TC ingress filters on `link`, as `tc` reports them."""
        res = self.run("tc", "-j", "filter", "show", "dev", link, "ingress", check=False)
        if res.returncode != 0 or not res.stdout.strip():
            return []
        return [int(f["options"]["prog"]["id"]) for f in json.loads(res.stdout)
                if "prog" in f.get("options", {})]

    def datapath_prog_id(self, link: str) -> int:
        """The firewall program on `link`, XDP or TC (0 when none)."""
        return self.xdp_prog_id(link) or next(iter(self.tc_prog_ids(link)), 0)


class LineReader:
    """Reads lines from a child's stdout with a deadline (no blocking forever)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.seen: list[str] = []

    def readline(self, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.decode(errors="replace")
        self.seen.append(text)
        return text


@dataclass
class Lab:
    """Namespaces, mounts and processes of one test (or module), cleaned up always."""

    tag: str = "t"
    suffix: str = field(default_factory=unique_suffix)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        self.run_dir = Path(f"/run/sx{self.tag}{self.suffix}")
        atexit.register(self.close)

    # ---- building --------------------------------------------------------

    def netns(self, role: str) -> Netns:
        name = f"sx{role}{self.suffix}"
        assert len(name) <= 15, name
        self.namespaces.append(name)  # registered first: removed even if setup fails
        sh("ip", "netns", "add", name)
        ns = Netns(name)
        ns.ip("link", "set", "lo", "up")
        for scope in ("all", "default"):
            ns.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 0)
        return ns

    def adopt_netns(self, name: str) -> None:
        """A namespace built by someone else (a script) that this Lab must remove."""
        self.namespaces.append(name)

    def veth(self, a: Netns, a_name: str, b: Netns, b_name: str) -> None:
        """A veth pair created directly inside the two namespaces."""
        for n in (a_name, b_name):
            assert n.startswith("sx") and len(n) <= 15, n
        sh(
            "ip",
            "-n",
            a.name,
            "link",
            "add",
            a_name,
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name,
        )
        a.sysctl(f"net.ipv4.conf.{a_name}.rp_filter", 0)
        b.sysctl(f"net.ipv4.conf.{b_name}.rp_filter", 0)

    def bpffs(self, name: str = "bpf") -> Path:
        """A private bpffs under /run, mounted in this (the root) mount namespace."""
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        if str(path) not in bpffs_mounts_under(path):
            sh("mount", "-t", "bpf", "bpf", path)
        return path

    def spawn(
        self,
        ns: Netns | None,
        *cmd: str | os.PathLike[str],
        lifetime: float = 60,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """A background process (inside `ns`), killed after `lifetime` s at most. Its
        output comes through a pipe, or goes to `log` for a chatty long-lived process
        (an agent) that would stall on a full pipe nobody reads."""
        args = ["timeout", "-s", "KILL", str(int(lifetime) + 5), *map(str, cmd)]
        if ns is not None:
            args = ["ip", "netns", "exec", ns.name, *args]
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("wb")) if log is not None else subprocess.PIPE
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)
        return proc

    # ---- traffic -----------------------------------------------------------

    def echo_server(self, ns: Netns, addr: str, port: int, lifetime: float = 60) -> None:
        """tcp_probe's echo server in `ns`; returns once it listens."""
        proc = self.spawn(
            ns,
            sys.executable,
            PROBE,
            "serve",
            addr,
            str(port),
            "--lifetime",
            str(lifetime),
            lifetime=lifetime,
        )
        line = LineReader(proc).readline(timeout=10)
        assert line and line.startswith("listening"), f"echo server in {ns.name}: {line!r}"

    def held_connection(
        self, ns: Netns, addr: str, port: int, timeout: float = 2.0
    ) -> HeldConnection:
        hold = self.run_dir / f"hold-{uuid.uuid4().hex[:8]}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        proc = self.spawn(
            ns,
            sys.executable,
            PROBE,
            "connect",
            addr,
            str(port),
            "--timeout",
            str(timeout),
            "--hold-file",
            hold,
            "--hold-max",
            "60",
            "--after-hold",
            "after hold",
            lifetime=70,
        )
        return HeldConnection(proc, LineReader(proc), hold, timeout)

    # ---- teardown ----------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # `timeout` passes it on to the command it runs
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=3)
            if proc.stdout:
                proc.stdout.close()
        for name in reversed(self.namespaces):
            if netns_exists(name):
                kill_netns_pids(name)
                sh("ip", "netns", "del", name, check=False)
        for mnt in bpffs_mounts_under(self.run_dir):
            sh("umount", "-l", mnt, check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        leftovers = [n for n in self.namespaces if netns_exists(n)]
        assert not leftovers, f"namespaces left behind: {leftovers}"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class HeldConnection:
    """A VM/client TCP connection kept open until released (tcp_probe --hold-file)."""

    proc: subprocess.Popen[bytes]
    reader: LineReader
    hold_file: Path
    timeout: float
    first: str | None = None

    def established(self) -> bool:
        """Waits for the first exchange; True when it worked."""
        if self.first is None:
            self.first = self.reader.readline(timeout=self.timeout + 5) or ""
        return self.first.startswith("ok ")

    @property
    def local_port(self) -> int:
        assert self.first and self.first.startswith("ok "), self.first
        return int(self.first.split()[1].rsplit(":", 1)[1])

    def release(self) -> tuple[int, list[str]]:
        """Lets the client exchange one more line and close; (exit code, its output)."""
        self.hold_file.touch()
        try:
            rc = self.proc.wait(timeout=self.timeout + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        while self.reader.readline(timeout=0.5) is not None:
            pass
        return rc, self.reader.seen


def wait_for_text(path: Path, text: str, timeout: float,
                  proc: subprocess.Popen[bytes] | None = None) -> str:
    """Waits until the file `path` (a process's log) holds `text`; returns the file.
    Fails at the deadline, or as soon as `proc` (the writer) has ended."""
    end = time.monotonic() + timeout
    while True:
        ended = proc is not None and proc.poll() is not None
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if ended or time.monotonic() > end:
            raise AssertionError(f"waited for {text!r} in {path}; it holds: {content[-2000:]!r}")
        time.sleep(0.1)


def tcp_connect(
    ns: Netns, addr: str, port: int, timeout: float = 1.5, sport: int = 0
) -> tuple[bool, str]:
    """One bounded connect + echo from `ns` (from local port `sport` if given);
    (worked, what the probe said)."""
    res = ns.run(
        sys.executable,
        PROBE,
        "connect",
        addr,
        str(port),
        "--timeout",
        str(timeout),
        "--sport",
        str(sport),
        check=False,
        timeout=timeout * 3 + 10,
    )
    return res.returncode == 0, (res.stdout + res.stderr).strip()
