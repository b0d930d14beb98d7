#!/usr/bin/env python3
"""Tiny, time-bounded TCP echo server and client for the demo and the netns tests.

Standard library only, so it runs under any python3 inside `ip netns exec`.

  tcp_probe.py serve ADDR PORT [--lifetime S] [--ready-file F]
      Echo every line back on every connection, until S seconds have passed.
      Prints "listening ADDR:PORT" once ready (and creates F if given).

  tcp_probe.py connect ADDR PORT [--timeout S] [--message TEXT] [--sport P]
                       [--hold-file F] [--hold-max S] [--after-hold TEXT]
      Connect (failing after S seconds), send TEXT, expect it echoed.
      Prints "ok LOCAL -> REMOTE" and exits 0, or "fail: REASON" and exits 1.
      With --hold-file the connection then stays open until F exists (at most
      --hold-max seconds); with --after-hold, that text is exchanged next, so
      the same connection is proved to still carry data (exit 1 if not).
      --sport binds the local port first (an attacker's chosen port).

  tcp_probe.py udp-echo ADDR PORT [--lifetime S]
      Answer every UDP datagram with the same bytes, until S seconds have passed.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import threading
import time


def family(addr: str) -> socket.AddressFamily:
    """The socket family of an address text (IPv6 if it holds a colon)."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _say(text: str) -> None:
    print(text, flush=True)


def _handle(conn: socket.socket, deadline: float) -> None:
    with conn:
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([conn], [], [], 0.2)
            if not ready:
                continue
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    conn.sendall(line + b"\n")
                except OSError:
                    return


def serve(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.lifetime
    srv = socket.socket(family(args.addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((args.addr, args.port))
    except OSError as exc:
        _say(f"fail: bind {args.addr}:{args.port}: {exc.strerror or exc}")
        return 1
    srv.listen(64)
    srv.settimeout(0.2)
    _say(f"listening {args.addr}:{args.port}")
    if args.ready_file:
        with open(args.ready_file, "w") as fh:
            fh.write(f"{os.getpid()}\n")
    workers = []
    while time.monotonic() < deadline:
        try:
            conn, _peer = srv.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        t = threading.Thread(target=_handle, args=(conn, deadline), daemon=True)
        t.start()
        workers.append(t)
    srv.close()
    return 0


def _exchange(sock: socket.socket, text: str, timeout: float) -> str | None:
    """Sends one line, returns None when it came back, else the reason."""
    sock.settimeout(timeout)
    try:
        sock.sendall(text.encode() + b"\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                return "connection closed by peer"
            got += chunk
    except TimeoutError:
        return f"no echo within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    if got.decode(errors="replace").rstrip("\n") != text:
        return f"echo mismatch: {got!r}"
    return None


def udp_echo(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.lifetime
    sock = socket.socket(family(args.addr), socket.SOCK_DGRAM)
    try:
        sock.bind((args.addr, args.port))
    except OSError as exc:
        _say(f"fail: bind {args.addr}:{args.port}: {exc.strerror or exc}")
        return 1
    sock.settimeout(0.2)
    _say(f"listening udp {args.addr}:{args.port}")
    with sock:
        while time.monotonic() < deadline:
            try:
                data, peer = sock.recvfrom(65536)
                sock.sendto(data, peer)
            except (TimeoutError, OSError):
                continue
    return 0


def connect(args: argparse.Namespace) -> int:
    sock = socket.socket(family(args.addr), socket.SOCK_STREAM)
    sock.settimeout(args.timeout)
    if args.sport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if ":" in args.addr else "0.0.0.0", args.sport))
    try:
        sock.connect((args.addr, args.port))
    except TimeoutError:
        _say(f"fail: connect to {args.addr}:{args.port} timed out after {args.timeout:g}s")
        return 1
    except OSError as exc:
        _say(f"fail: connect to {args.addr}:{args.port}: {exc.strerror or exc}")
        return 1
    with sock:
        local = "{}:{}".format(*sock.getsockname())
        remote = "{}:{}".format(*sock.getpeername())
        err = _exchange(sock, args.message, args.timeout)
        if err:
            _say(f"fail: {err}")
            return 1
        _say(f"ok {local} -> {remote}")
        if not args.hold_file:
            return 0
        end = time.monotonic() + args.hold_max
        while not os.path.exists(args.hold_file):
            if time.monotonic() > end:
                _say(f"fail: {args.hold_file} did not appear within {args.hold_max:g}s")
                return 1
            time.sleep(0.05)
        if args.after_hold is not None:
            err = _exchange(sock, args.after_hold, args.timeout)
            if err:
                _say(f"fail after hold: {err}")
                return 1
            _say(f"ok again {local} -> {remote}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("addr")
    s.add_argument("port", type=int)
    s.add_argument("--lifetime", type=float, default=30.0)
    s.add_argument("--ready-file")
    c = sub.add_parser("connect")
    c.add_argument("addr")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--message", default="hello from sami-xdp")
    c.add_argument("--hold-file")
    c.add_argument("--hold-max", type=float, default=30.0)
    c.add_argument("--after-hold")
    c.add_argument("--sport", type=int, default=0)
    u = sub.add_parser("udp-echo")
    u.add_argument("addr")
    u.add_argument("port", type=int)
    u.add_argument("--lifetime", type=float, default=30.0)
    args = ap.parse_args(argv)
    return {"serve": serve, "connect": connect, "udp-echo": udp_echo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
