"""`samixdp events`: new sessions, session ends and drops as they happen, like
`conntrack -E`."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import typer

from ..base.errors import InvalidArgument
from ..policy.events import Event, EventStream, Lost, iface_name
from .common import endpoint, root_opts
from .values import seconds, whole

TYPES = ("new", "end", "drop")
LOST_EVERY_S = 1.0  # how often the lost counters are looked at
MAX_WAIT_S = 0.5  # the longest sleep between looks (Ctrl-C, deadlines, lost counters)


def register(app: typer.Typer) -> None:
    app.command("events")(events_cmd)


def parse_types(text: str) -> frozenset[str]:
    chosen = frozenset(t.strip().lower() for t in text.split(",") if t.strip())
    unknown = sorted(chosen - set(TYPES))
    if unknown or not chosen:
        raise InvalidArgument(f"--type takes a list of {', '.join(TYPES)}, got {text!r}")
    return chosen


def _where(ev: Event) -> str:
    if ev.proto in ("tcp", "udp"):
        return f"{endpoint(ev.src, ev.sport)} -> {endpoint(ev.dst, ev.dport)}"
    if ev.proto in ("icmp", "icmpv6"):
        return f"{ev.src} -> {ev.dst} id={ev.sport}"
    return f"{ev.src} -> {ev.dst}"


def human(ev: Event) -> str:
    """One line in the manner of `conntrack -E`."""
    iface = iface_name(ev.ifindex) or str(ev.ifindex)
    flags = f" flags={ev.tcp_flags}" if ev.tcp_flags else ""
    if ev.type == "drop":
        return f"[DROP {ev.reason}] {ev.proto} {_where(ev)}{flags} iface={iface}"
    if ev.type == "new":
        return f"[NEW] {ev.proto} {_where(ev)} {ev.state} {ev.reason} iface={iface}"
    return f"[{ev.type.upper()}] {ev.proto} {_where(ev)} {ev.state}{flags} iface={iface}"


def as_json(ev: Event) -> str:
    rec = ev.record()
    rec["iface"] = iface_name(ev.ifindex)
    return json.dumps(rec, sort_keys=False)


def _report_lost(lost: Lost) -> None:
    typer.echo(f"samixdp: {lost.total} events lost ({lost.rate_limited} over events-rate, "
               f"{lost.ring_full} with the ring full)", err=True)


def events_cmd(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    type_: Annotated[
        str, typer.Option("--type", help="Which events, a list of new,end,drop.")
    ] = ",".join(TYPES),
    count: Annotated[
        int | None, typer.Option(help="Stop after this many events.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop after this many seconds.")
    ] = None,
) -> None:
    """Stream new sessions, session ends and drops (Ctrl-C ends it)."""
    wanted = parse_types(type_)
    if count is not None:
        whole("--count", count, 1, 1 << 32)
    if timeout is not None:
        seconds("--timeout", timeout, 0.0, 10**9, lo_open=True)
    shown = 0
    with root_opts(ctx).open() as fw, EventStream(fw) as stream:
        deadline = None if timeout is None else time.monotonic() + timeout
        reported = Lost(0, 0)
        next_look = time.monotonic() + LOST_EVERY_S
        try:
            while count is None or shown < count:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = MAX_WAIT_S if deadline is None else min(MAX_WAIT_S, deadline - now)
                for ev in stream.read(wait):
                    if ev.type not in wanted:
                        continue
                    typer.echo(as_json(ev) if json_ else human(ev))
                    shown += 1
                    if count is not None and shown >= count:
                        break
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + LOST_EVERY_S
                    lost = stream.lost()
                    if lost.total != reported.total:
                        _report_lost(lost - reported)
                        reported = lost
        except KeyboardInterrupt:
            pass  # Ctrl-C: the normal way to end a stream
        except BrokenPipeError:
            # the reader went away (`| head`): nothing more to say, nowhere to say it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        lost = stream.lost()
        if lost.total != reported.total:
            _report_lost(lost - reported)
