#!/usr/bin/env python3
"""Many long-lived TCP connections exchanging data continuously, with a timeline.

Standard library only (runs under any python3 inside `ip netns exec`).

  conn_load.py serve ADDR PORT --lifetime S
      Echo server (selectors, one thread) for up to S seconds.

  conn_load.py run ADDR PORT --conns N --duration S --out FILE
               [--interval MS] [--stop-file F] [--local ADDR]
      Opens N connections, then on each one sends a small record every
      MS milliseconds and expects it echoed. Records, per connection, the
      monotonic time of every echo and how it ended, and writes JSON to FILE
      when S seconds have passed (or F appears). Exit 0 whatever happened:
      the caller judges the timeline.

Every loop is bounded by --duration / --lifetime; nothing runs forever.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import time


def family(addr: str) -> socket.AddressFamily:
    """The socket family of an address text (IPv6 if it holds a colon)."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


RECORD = 64  # bytes per exchange


def serve(addr: str, port: int, lifetime: float) -> None:
    sel = selectors.DefaultSelector()
    lsock = socket.socket(family(addr), socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    print(f"listening {addr}:{port}", flush=True)
    end = time.monotonic() + lifetime
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.2):
            if key.data is None:
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, b"")
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            try:
                sock.sendall(data)  # small records: the socket buffer takes them
            except OSError:
                sel.unregister(sock)
                sock.close()
    sel.close()


class Conn:
    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.sock: socket.socket | None = None
        self.echoes: list[float] = []
        self.sent = 0
        self.received = 0
        self.pending = b""
        self.end = "open"
        self.connected_at = 0.0


def run(args: argparse.Namespace) -> None:
    sel = selectors.DefaultSelector()
    conns = []
    deadline_connect = time.monotonic() + 10
    for i in range(args.conns):
        c = Conn(i)
        s = socket.socket(family(args.addr), socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.local:
            s.bind((args.local, 0))
        s.settimeout(max(0.1, deadline_connect - time.monotonic()))
        try:
            s.connect((args.addr, args.port))
        except OSError as exc:
            c.end = f"connect failed: {exc.strerror or exc}"
            s.close()
            conns.append(c)
            continue
        s.setblocking(False)
        c.sock = s
        c.connected_at = time.monotonic()
        sel.register(s, selectors.EVENT_READ, c)
        conns.append(c)
    print(f"connected {sum(1 for c in conns if c.sock)}/{args.conns}", flush=True)
    if args.ready_file:
        open(args.ready_file, "w").close()

    payload = b"x" * (RECORD - 1) + b"\n"
    interval = args.interval / 1000.0
    start = time.monotonic()
    end = start + args.duration
    next_send = start
    while True:
        now = time.monotonic()
        if now >= end or (args.stop_file and os.path.exists(args.stop_file)):
            break
        if now >= next_send:
            for c in conns:
                if c.sock is None or c.end != "open":
                    continue
                # at most 4 records in flight: a stalled connection does not pile up
                if c.sent - c.received >= 4 * RECORD:
                    continue
                try:
                    c.sock.send(payload)
                    c.sent += RECORD
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    c.end = errno.errorcode.get(exc.errno or 0, str(exc))
            next_send = now + interval
        timeout = max(0.0, min(next_send, end) - time.monotonic())
        for key, _ in sel.select(timeout=timeout):
            c = key.data
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                c.end = errno.errorcode.get(exc.errno or 0, str(exc))
                sel.unregister(c.sock)
                continue
            if not data:
                c.end = "closed by peer"
                sel.unregister(c.sock)
                continue
            t = time.monotonic()
            c.received += len(data)
            for _ in range(data.count(b"\n")):
                c.echoes.append(t)
    stopped = time.monotonic()
    out = {
        "start": start,
        "stopped": stopped,
        "interval_ms": args.interval,
        "conns": [
            {"idx": c.idx, "end": c.end, "connected_at": c.connected_at,
             "echoes": [round(t - start, 4) for t in c.echoes]}
            for c in conns
        ],
    }
    for c in conns:
        if c.sock is not None:
            c.sock.close()
    with open(args.out, "w") as fh:
        json.dump(out, fh)


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    _raise_fd_limit()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("addr")
    s.add_argument("port", type=int)
    s.add_argument("--lifetime", type=float, default=120)
    r = sub.add_parser("run")
    r.add_argument("addr")
    r.add_argument("port", type=int)
    r.add_argument("--conns", type=int, default=100)
    r.add_argument("--duration", type=float, default=30)
    r.add_argument("--interval", type=float, default=100, help="ms between records")
    r.add_argument("--out", required=True)
    r.add_argument("--stop-file")
    r.add_argument("--ready-file")
    r.add_argument("--local")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args.addr, args.port, args.lifetime)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
