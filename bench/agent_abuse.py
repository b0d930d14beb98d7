#!/usr/bin/env python3
"""What an attacker costs a real `samixdp agent` (DESIGN.md section 6, rows 3 and 4).

Each scenario runs against a fresh agent process (so its peak RSS, VmHWM, belongs to
that scenario alone) on loopback, with a freshly compiled firewall in a private bpffs:

  unauth-frames    4 clients without a trusted key, each announcing a 256 MiB frame
                   and streaming 256 MiB (TLS mode, and --plaintext mode)
  slowloris        20 clients sending one byte every 20 s, unauthenticated: from one
                   address (the per-address cap) and from 20 addresses (127.0.0.x)
  slow-frame       a trusted peer that sends a frame header, then one byte every 2 s
  zlib-bomb        a trusted peer's bundle whose body inflates to 2 GiB of zeros, its
                   signed header declaring 2 GiB (35.8M sessions of 60 B) or 60 MiB
                   (1M sessions)

Prints a table and writes bench/results/agent_abuse.json. Every scenario is bounded in
time and bytes; the agent, the mount and the pins are removed whatever happens.

    sudo .venv/bin/python bench/agent_abuse.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import addr_array
from sami_xdp.loader.compile import Limits
from sami_xdp.loader.pinned import unpin_all
from sami_xdp.migrate import HostIdentity, TrustStore, new_migration_id
from sami_xdp.migrate.bundle import COMP_ZLIB, HEADER, HEADER_SIZE, encode_bundle
from sami_xdp.migrate.control import verify_control
from sami_xdp.migrate.errors import TransportError
from sami_xdp.migrate.transport import (
    HEADER as FRAME,
)
from sami_xdp.migrate.transport import (
    MAGIC,
    MSG_BUNDLE,
    MSG_PREFLIGHT,
    VERSION,
    Connection,
    Deadline,
    recv_frame,
    send_all,
)
from sami_xdp.migrate.wire import SESSION_WIRE
from sami_xdp.policy import protect
from sami_xdp.policy.config import create_firewall

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "agent_abuse.json"
VM = "10.1.1.1"
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


@contextlib.contextmanager
def firewall_env() -> Iterator[Path]:
    mnt = Path(f"/run/samixdp-bench-abuse-{uuid.uuid4().hex[:6]}")
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    try:
        with create_firewall(mnt / "b", Limits()) as fw:
            protect.add_protected(fw, "10.1.1.0/24")
        yield mnt / "b"
    finally:
        unpin_all(mnt / "b")
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


class Agent:
    """A fresh `samixdp agent` of host B; A is a trusted peer with scope 10.1.1.0/24."""

    def __init__(self, bpffs: Path, work: Path, *args: str) -> None:
        self.work = work
        self.a = HostIdentity.init(work / "a", "host-a")
        self.b = HostIdentity.init(work / "b", "host-b")
        self.port = free_port()
        tb = TrustStore.load(work / "b")
        tb.add("host-a", "127.0.0.1:1", self.a.public_b64, vms="10.1.1.0/24")
        tb.save()
        self.trust_a = TrustStore()
        self.trust_a.add("host-b", f"127.0.0.1:{self.port}", self.b.public_raw)
        self.log = open(work / "agent.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sami_xdp", "--bpffs", str(bpffs), "--config-dir",
             str(work / "b"), "--state-dir", str(work / "state"), "agent", "--listen",
             f"127.0.0.1:{self.port}", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        end = time.monotonic() + 30
        while b'"listening"' not in (work / "agent.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError((work / "agent.log").read_text())
            time.sleep(0.05)
        time.sleep(0.3)
        self.rss0 = status_kb(self.proc.pid, "VmRSS")

    def peak_growth_mb(self) -> float:
        return (status_kb(self.proc.pid, "VmHWM") - self.rss0) / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- scenarios ------------------------------------------------------------------------------


def flood_client(port: int, size: int, out: list[int]) -> None:
    """Announces a frame of `size` bytes and streams it; records how much got through."""
    sent = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(FRAME.pack(MAGIC, VERSION, MSG_BUNDLE, 0, size))
            chunk = b"\0" * MiB
            while sent < size:
                sent += s.send(chunk)
    except OSError:
        pass
    out.append(sent)


def unauth_frames(bpffs: Path, work: Path, plaintext: bool, size: int) -> dict[str, Any]:
    agent = Agent(bpffs, work, *(["--plaintext"] if plaintext else []))
    try:
        sent: list[int] = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=flood_client, args=(agent.port, size, sent))
                   for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        return {"mode": "plaintext" if plaintext else "tls", "clients": 4,
                "announced_mib_each": size // MiB,
                "sent_before_close_kib": [s // 1024 for s in sent],
                "agent_rss_growth_mb": round(agent.peak_growth_mb(), 1),
                "agent_rss_before_mb": round(agent.rss0 / 1024, 1),
                "seconds": round(time.monotonic() - t0, 2)}
    finally:
        agent.stop()


def slow_client(port: int, src: str, every_s: float, limit_s: float, out: list[float]) -> None:
    t0 = time.monotonic()
    try:
        s = socket.socket()
        s.bind((src, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        while time.monotonic() - t0 < limit_s:
            s.send(b"\x16")
            s.settimeout(every_s)
            try:
                if s.recv(1) == b"":
                    break
            except TimeoutError:
                continue
        s.close()
    except OSError:
        pass
    out.append(time.monotonic() - t0)


def slowloris(bpffs: Path, work: Path, many_addresses: bool, limit_s: float) -> dict[str, Any]:
    agent = Agent(bpffs, work)
    try:
        closed: list[float] = []
        threads = []
        for i in range(20):
            src = f"127.0.0.{i + 2}" if many_addresses else "127.0.0.1"
            threads.append(threading.Thread(target=slow_client,
                                            args=(agent.port, src, 20.0, limit_s, closed)))
        for th in threads:
            th.start()
        for th in threads:
            th.join(limit_s + 30)
        return {"connections": 20, "byte_every_s": 20, "sources": 20 if many_addresses else 1,
                "closed_after_s": {"min": round(min(closed), 2),
                                   "median": round(statistics.median(closed), 2),
                                   "max": round(max(closed), 2)},
                "still_open_at_limit": sum(1 for c in closed if c >= limit_s)}
    finally:
        agent.stop()


def slow_frame(bpffs: Path, work: Path, limit_s: float) -> dict[str, Any]:
    agent = Agent(bpffs, work)
    try:
        t0 = time.monotonic()
        with Connection(agent.trust_a.get("host-b"), agent.a) as conn:
            send_all(conn.sock, FRAME.pack(MAGIC, VERSION, MSG_PREFLIGHT, 0, 4096), Deadline(5))
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < limit_s:
                    send_all(conn.sock, b"{", Deadline(5))
                    conn.sock.settimeout(2.0)
                    try:
                        if conn.sock.recv(1) == b"":
                            break
                    except TimeoutError:
                        pass
            except (OSError, TransportError):
                pass
        return {"frame_bytes": 4096, "byte_every_s": 2, "closed_after_s":
                round(time.monotonic() - t0, 2)}
    finally:
        agent.stop()


def bomb_bundle(ident: HostIdentity, declared_sessions: int, inflated: int) -> bytes:
    base = encode_bundle({}, identity=ident, vms=[VM], audience="host-b", seq=1,
                         migration_id=new_migration_id(),
                         layout_version=load_layout().const("SAMIXDP_LAYOUT_VERSION"),
                         compression="zlib")
    h = np.frombuffer(base[:HEADER_SIZE], dtype=HEADER).copy()
    z = zlib.compressobj(9)
    zero = b"\0" * (16 * MiB)
    parts = [z.compress(zero) for _ in range(inflated // len(zero))]
    parts.append(z.flush())
    body = b"".join(parts)
    h["n_sessions"] = declared_sessions
    h["raw_body_len"] = declared_sessions * SESSION_WIRE.itemsize
    h["body_len"] = len(body)
    h["compression"] = COMP_ZLIB
    signed = h.tobytes() + addr_array([VM]).tobytes() + body  # header, the VM, records
    return signed + ident.sign(signed)


def zlib_bomb(bpffs: Path, work: Path, declared_sessions: int, inflated: int) -> dict[str, Any]:
    agent = Agent(bpffs, work)
    try:
        data = bomb_bundle(agent.a, declared_sessions, inflated)
        t0 = time.monotonic()
        with Connection(agent.trust_a.get("host-b"), agent.a) as conn:
            try:
                reply = conn.request(MSG_BUNDLE, data)
                _, body = verify_control(bytes(reply.payload), agent.trust_a, "host-a",
                                         expect_from="host-b")
                reason = str(body.get("reason"))
            except TransportError:  # refused before the body was read: the reply came early
                reply = recv_frame(conn.sock, 1 << 16, Deadline(10))
                _, body = verify_control(bytes(reply.payload), agent.trust_a, "host-a",
                                         expect_from="host-b")
                reason = str(body.get("reason"))
        return {"bundle_bytes": len(data), "inflates_to_mib": inflated // MiB,
                "declared_raw_mib": round(declared_sessions * SESSION_WIRE.itemsize / MiB, 1),
                "refusal": reason, "seconds": round(time.monotonic() - t0, 2),
                "agent_rss_growth_mb": round(agent.peak_growth_mb(), 1)}
    finally:
        agent.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB frames, 256 MiB bomb, 30 s")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_abuse: needs root (bpffs, maps)", file=sys.stderr)
        return 1
    frame = (64 if args.quick else 256) * MiB
    bomb = (256 if args.quick else 2048) * MiB
    limit = 30.0 if args.quick else 60.0
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "kernel": os.uname().release}
    with firewall_env() as bpffs:
        work = Path(f"/run/samixdp-bench-abuse-work-{uuid.uuid4().hex[:6]}")
        try:
            def fresh(name: str) -> Path:
                d = work / name
                d.mkdir(parents=True)
                return d

            for plaintext in (False, True):
                mode = "plaintext" if plaintext else "tls"
                log(f"4 x {frame // MiB} MiB unauthenticated frames ({mode})")
                results[f"unauth_frames_{mode}"] = unauth_frames(
                    bpffs, fresh(f"frames-{mode}"), plaintext, frame)
            for many in (False, True):
                log(f"20 slowloris clients ({'20 addresses' if many else 'one address'})")
                results[f"slowloris_{'20_addresses' if many else 'one_address'}"] = slowloris(
                    bpffs, fresh(f"slow-{many}"), many, limit)
            log("a trusted peer dribbling a frame")
            results["slow_frame_trusted_peer"] = slow_frame(bpffs, fresh("slowframe"), limit)
            record = SESSION_WIRE.itemsize
            for declared in (bomb // record, (1 << 20)):
                log(f"zlib bomb: {bomb // MiB} MiB of zeros, header declares {declared} sessions")
                results[f"zlib_bomb_declares_{round(declared * record / MiB)}mib"] = zlib_bomb(
                    bpffs, fresh(f"bomb-{declared}"), declared, bomb)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
