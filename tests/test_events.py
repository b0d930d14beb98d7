"""The event stream (`samixdp events`): new sessions, session ends and drops, read back
through the project's own ring buffer reader from the real program (PROG_TEST_RUN,
both program kinds), its rate limit and lost counters, its single reader, and the
real CLI as a process.

Events are committed before PROG_TEST_RUN returns, so a read right after a run sees
all of them; `drain()` reads until the ring is empty.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LO_IFINDEX, PROGRAM_KINDS, fresh_firewall, program_kind, run_program

from sami_xdp.base.errors import BusyError
from sami_xdp.loader import bpfsys
from sami_xdp.loader.pinned import EVENTS_LOCK, Firewall, possible_cpus
from sami_xdp.loader.ringbuf import lock_holder
from sami_xdp.policy import acl, protect, stats
from sami_xdp.policy.events import Event, EventStream, read_lost
from testbed import packets as P

pytestmark = pytest.mark.needs_root

REPO = Path(__file__).resolve().parent.parent
NET, VM, CLIENT = "10.1.1.0/24", "10.1.1.1", "192.0.2.10"
NET6, VM6, CLIENT6 = "2001:db8:1::/64", "2001:db8:1::10", "2001:db8:99::7"
EXIT_BUSY = 9


@pytest.fixture(params=PROGRAM_KINDS)
def fw(request: pytest.FixtureRequest, firewall: Firewall) -> Firewall:
    """The emptied firewall (XDP program, then TC), protecting NET and NET6, events on
    at the default rate with a fresh budget."""
    f = fresh_firewall(firewall, request.param)
    protect.add_protected(f, NET)
    protect.add_protected(f, NET6)
    zero_budget(f)
    return f


@pytest.fixture
def stream(fw: Firewall):
    with EventStream(fw) as s:
        yield s


def zero_budget(fw: Firewall) -> None:
    m = fw.maps["event_budget"]
    m.update(np.zeros(1, np.uint32), np.zeros(possible_cpus(), m.value_dtype))


def budget_used(fw: Firewall) -> int:
    per_cpu = fw.maps["event_budget"].lookup(np.zeros(1, np.uint32))
    return int(per_cpu["used"].sum())


def set_rate(fw: Firewall, rate: int) -> None:
    fw.set_config(fw.const("CFG_EVENT_RATE"), rate)


def drain(stream: EventStream) -> list[Event]:
    out: list[Event] = []
    while got := stream.read(0):
        out.extend(got)
    return out


def verdict(fw: Firewall, frame: bytes) -> str:
    """One run: the reason whose counter moved (exactly one, by one packet)."""
    before = stats.verdict_packets(fw)
    run_program(fw, frame)
    after = stats.verdict_packets(fw)
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert list(moved.values()) == [1], moved
    return next(iter(moved))


def burst(fw: Firewall, frame: bytes, n: int) -> None:
    """`n` runs of one frame in one PROG_TEST_RUN (one CPU, a few hundred microseconds)."""
    bpfsys.prog_test_run(fw.prog_fd, frame, repeat=n, skb=program_kind(fw) == "tc")


def unsolicited(sport: int = 40000) -> bytes:
    return P.tcp(CLIENT, sport, VM, 9001, P.SYN)


# floods are UDP: as many SYNs would get their source banned (drop-syn-rate)
FLOOD = P.udp(CLIENT, 5000, VM, 53)


def established(fw: Firewall) -> P.TcpFlow:
    flow = P.TcpFlow(VM, 40000, CLIENT, 80)
    assert verdict(fw, flow.syn()) == "pass-outbound"
    assert verdict(fw, flow.synack()) == "pass-session"
    assert verdict(fw, flow.ack("a")) == "pass-session"
    return flow


# ---- what is reported ------------------------------------------------------------


def test_unsolicited_syn_is_reported_as_a_drop_with_its_reason(fw, stream):
    t0 = time.time()
    assert verdict(fw, unsolicited()) == "drop-acl-default"
    (ev,) = drain(stream)
    assert (ev.type, ev.reason, ev.state) == ("drop", "drop-acl-default", None)
    assert (ev.proto, ev.src, ev.sport, ev.dst, ev.dport) == ("tcp", CLIENT, 40000, VM, 9001)
    assert ev.tcp_flags == "S" and ev.ifindex == LO_IFINDEX
    assert abs(ev.ts_ns - time.monotonic_ns()) < 5 * 10**9
    assert t0 - 1 <= ev.time <= time.time() + 1


def test_ipv6_drop_carries_canonical_addresses(fw, stream):
    frame = P.tcp6(CLIENT6, 5555, VM6, 22, P.SYN)
    assert verdict(fw, frame) == "drop-acl-default"
    (ev,) = drain(stream)
    assert (ev.src, ev.sport, ev.dst, ev.dport) == (CLIENT6, 5555, VM6, 22)


def test_outbound_flow_is_new_and_its_fin_close_one_end(fw, stream):
    flow = established(fw)
    (new,) = drain(stream)
    assert (new.type, new.reason, new.state) == ("new", "pass-outbound", "SYN_SENT")
    assert (new.src, new.sport, new.dst, new.dport) == (VM, 40000, CLIENT, 80)
    # the close: FIN, its ACK, the other FIN (still the fast path), the last ACK
    assert verdict(fw, flow.fin("a")) == "pass-session"
    assert verdict(fw, flow.ack("b")) == "pass-session"
    assert verdict(fw, flow.fin("b")) == "pass-session"
    assert drain(stream) == [], "only the move into TIME_WAIT or CLOSED is an end"
    assert verdict(fw, flow.ack("a")) == "pass-session"
    (end,) = drain(stream)
    assert (end.type, end.state, end.reason) == ("end", "TIME_WAIT", "pass-session")
    # src is the initiator (the VM), as `samixdp sessions` lists it
    assert (end.src, end.sport, end.dst, end.dport, end.tcp_flags) == (VM, 40000, CLIENT, 80, "A")
    # a retransmitted last ACK and an RST in TIME_WAIT end nothing more
    assert verdict(fw, flow.ack("a", advance=False)) == "pass-session"
    assert verdict(fw, flow.rst("b")) == "pass-session"
    assert drain(stream) == []


def test_rst_close_is_one_end_in_closed(fw, stream):
    flow = established(fw)
    drain(stream)
    assert verdict(fw, flow.rst("b")) == "pass-session"
    (end,) = drain(stream)
    assert (end.type, end.state, end.tcp_flags) == ("end", "CLOSED", "RA")
    assert (end.src, end.dst) == (VM, CLIENT)


def test_inbound_flow_allowed_by_an_acl_is_new_from_the_client(fw, stream):
    acl.add_rules(fw, [acl.make_rule(fw, vm=VM, proto="tcp", dport="9001")])
    assert verdict(fw, unsolicited()) == "pass-acl"
    (ev,) = drain(stream)
    assert (ev.type, ev.reason, ev.state) == ("new", "pass-acl", "SYN_SENT")
    assert (ev.src, ev.sport, ev.dst, ev.dport) == (CLIENT, 40000, VM, 9001)


def test_established_fast_path_emits_nothing_and_touches_no_budget(fw, stream):
    flow = established(fw)
    drain(stream)
    used = budget_used(fw)
    for i in range(20):
        frame = flow.data("a" if i % 2 else "b", b"x" * 100)
        assert verdict(fw, frame) == "pass-session"
    assert drain(stream) == []
    assert budget_used(fw) == used, "an established hit must not even look at the budget"


def test_a_drop_decided_in_stage_0_is_reported_once(fw, stream):
    """An invalid flag combination on an established session is dropped by the fast
    path, which hands it to the slow stage only to report it: one event, one count."""
    flow = established(fw)
    drain(stream)
    bad = flow.frame("b", P.SYN | P.FIN, advance=False)
    assert verdict(fw, bad) == "drop-invalid"
    (ev,) = drain(stream)
    assert (ev.type, ev.reason, ev.src, ev.dst, ev.tcp_flags) == (
        "drop", "drop-invalid", CLIENT, VM, "FS")
    set_rate(fw, 0)
    assert verdict(fw, bad) == "drop-invalid"
    assert drain(stream) == []


# ---- the rate limit, the lost counters -------------------------------------------


def test_a_flood_of_drops_yields_the_budget_and_counts_the_rest(fw, stream):
    set_rate(fw, 10)
    before = read_lost(fw)
    burst(fw, FLOOD, 1000)
    got = drain(stream)
    assert len(got) == 10, "one CPU, one window: exactly the budget"
    assert {(e.type, e.reason) for e in got} == {("drop", "drop-acl-default")}
    lost = read_lost(fw) - before
    assert (lost.rate_limited, lost.ring_full) == (990, 0)
    assert stream.lost() == lost


def test_events_rate_0_sends_nothing_and_counts_nothing(fw, stream):
    set_rate(fw, 0)
    before = read_lost(fw)
    burst(fw, FLOOD, 1000)
    assert established(fw) is not None  # new sessions too
    assert drain(stream) == []
    assert read_lost(fw) == before and budget_used(fw) == 0


def test_a_full_ring_keeps_what_fits_and_counts_the_rest(fw, stream):
    """No rate, nobody reading: the ring (a fixed size) fills, the rest is counted."""
    set_rate(fw, 2**32)
    before = read_lost(fw)
    record = (8 + fw.layout.sizeof("fw_event") + 7) // 8 * 8
    size = fw.const("SAMIXDP_EVENT_PAGES") * mmap.PAGESIZE
    assert fw.maps["events"].info.max_entries == size
    burst(fw, FLOOD, 5000)
    got = drain(stream)
    assert size // record - 1 <= len(got) <= size // record  # the kernel keeps one byte free
    lost = read_lost(fw) - before
    assert lost.rate_limited == 0 and lost.ring_full == 5000 - len(got)
    burst(fw, FLOOD, 10)  # read out, the ring takes events again
    assert len(drain(stream)) == 10


def test_opening_skips_what_the_ring_held(fw):
    burst(fw, FLOOD, 5)
    with EventStream(fw) as s:
        assert drain(s) == []
        verdict(fw, unsolicited(41000))
        assert [e.sport for e in drain(s)] == [41000]


# ---- one reader ------------------------------------------------------------------


def test_a_second_reader_is_refused_naming_the_first(fw, stream):
    with pytest.raises(BusyError, match=rf"already has a reader \(pid {os.getpid()}\)"):
        EventStream(fw)
    lock = fw.path / EVENTS_LOCK
    assert lock_holder(lock) == os.getpid()
    st = os.stat(lock)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), "no one else may open the lock"
    stream.close()
    with EventStream(fw) as again:  # released with the first reader
        verdict(fw, unsolicited())
        assert len(drain(again)) == 1


# ---- the CLI, a real process -----------------------------------------------------


def cli(fw: Firewall, *args: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from sami_xdp.cli import main; main()",
         "--bpffs", str(fw.path), "events", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, **kw,
    )


def feed_until_output(fw: Firewall, proc: subprocess.Popen[str], frame: bytes,
                      deadline_s: float = 30) -> str:
    """Sends `frame` until the reader prints (it skips what came before it was ready);
    returns its first line."""
    assert proc.stdout is not None
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        run_program(fw, frame)
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline()
    proc.kill()
    raise AssertionError(f"no event printed: {proc.communicate()}")


@pytest.fixture
def xdp_fw(firewall: Firewall) -> Firewall:
    f = fresh_firewall(firewall, "xdp")
    protect.add_protected(f, NET)
    zero_budget(f)
    return f


def test_cli_prints_the_drop_of_an_unsolicited_connection_as_one_json_line(xdp_fw):
    proc = cli(xdp_fw, "--json", "--count", "1", "--timeout", "60")
    line = feed_until_output(xdp_fw, proc, unsolicited())
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "" and err == "", "exactly one line, nothing on stderr"
    rec = json.loads(line)
    assert {k: rec[k] for k in ("type", "reason", "proto", "src", "sport", "dst", "dport",
                                "tcp_flags", "ifindex", "iface")} == {
        "type": "drop", "reason": "drop-acl-default", "proto": "tcp", "src": CLIENT,
        "sport": 40000, "dst": VM, "dport": 9001, "tcp_flags": "S", "ifindex": LO_IFINDEX,
        "iface": "lo"}


def test_cli_human_line_is_conntrack_like(xdp_fw):
    proc = cli(xdp_fw, "--count", "1", "--type", "drop", "--timeout", "60")
    line = feed_until_output(xdp_fw, proc, unsolicited())
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert line == f"[DROP drop-acl-default] tcp {CLIENT}:40000 -> {VM}:9001 flags=S iface=lo\n"


def test_cli_second_reader_is_refused_in_one_line(xdp_fw):
    with EventStream(xdp_fw):
        proc = cli(xdp_fw, "--count", "1", "--timeout", "5")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_BUSY
    assert out == ""
    assert err == (f"samixdp: error: the event stream of {xdp_fw.path} already has a reader "
                   f"(pid {os.getpid()}); only one at a time\n")


def test_cli_reports_lost_events_and_ends_on_timeout(xdp_fw):
    proc = cli(xdp_fw, "--json", "--timeout", "4")
    t0 = time.monotonic()
    feed_until_output(xdp_fw, proc, unsolicited())
    assert lock_holder(xdp_fw.path / EVENTS_LOCK) == proc.pid
    set_rate(xdp_fw, 5)
    burst(xdp_fw, FLOOD, 500)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and time.monotonic() - t0 < 30
    shown = len(out.splitlines())
    assert shown <= 5, "the burst's CPU had at most the budget left"
    lines = err.splitlines()
    assert lines, "the lost events are reported on stderr"
    assert all(x.startswith("samixdp: ") and x.endswith("0 with the ring full)") for x in lines)
    lost = sum(int(x.split()[1]) for x in lines)
    assert 500 - 5 <= lost <= 500


def test_cli_ctrl_c_ends_cleanly_and_a_killed_reader_frees_the_stream(xdp_fw):
    proc = cli(xdp_fw)
    feed_until_output(xdp_fw, proc, unsolicited())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err
    # a reader killed outright leaves no lock behind (the kernel drops its flock)
    proc = cli(xdp_fw)
    feed_until_output(xdp_fw, proc, unsolicited())
    proc.kill()
    proc.communicate(timeout=30)
    with EventStream(xdp_fw) as again:
        verdict(xdp_fw, unsolicited(41000))
        assert [e.sport for e in drain(again)] == [41000]


def test_cli_refuses_an_unknown_type(xdp_fw):
    proc = cli(xdp_fw, "--type", "new,bogus")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.startswith("samixdp: error: --type takes a list of new, end, drop")
