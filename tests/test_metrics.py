"""The Prometheus endpoint, scraped over HTTP and parsed as Prometheus parses it.

The firewall's counters are moved by the real program (PROG_TEST_RUN) and its maps
filled by the policy functions; the agent's counters by a real `samixdp migrate`
into a real `samixdp agent --metrics` process, plus requests it refuses; outgoing
migrations by the record that run left in the source's state dir, read by a real
`samixdp metrics` process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import CLIENT, PREFIX, VM, Pair, establish, make_pair
from conftest import PROGRAM_KINDS, fresh_firewall, run_frame
from prometheus_client.parser import text_string_to_metric_families

from sami_xdp.base.errors import InvalidArgument
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, TrustStore, new_migration_id
from sami_xdp.migrate.bundle import encode_bundle
from sami_xdp.migrate.control import sign_control
from sami_xdp.migrate.running import RECORDS_DIR
from sami_xdp.migrate.select import export_vm_state
from sami_xdp.migrate.transport import MSG_ACK, MSG_BUNDLE, MSG_PREFLIGHT, Connection
from sami_xdp.ops.metrics import MetricsServer, parse_listen, serve_metrics
from sami_xdp.policy import acl, blacklist, protect
from testbed import packets as P

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


# ---- the address -----------------------------------------------------------------------


def test_the_address_is_an_ip_and_a_port():
    assert parse_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:80") == ("127.0.0.1", 80)
    for bad in ("9477", "127.0.0.1", "127.0.0.1:", ":9477", "::1:9477", "[127.0.0.1]:80",
                "127.0.0.1:65536", "127.0.0.1:-1", "metrics.example:9477", "[::1]:x",
                "127.0.0.1:9477 ", ""):
        with pytest.raises(InvalidArgument, match="--metrics must be IP:PORT"):
            parse_listen(bad)


# ---- the firewall's maps -----------------------------------------------------------------


@pytest.fixture(params=PROGRAM_KINDS)
def pfw(request: pytest.FixtureRequest, firewall: Firewall) -> Firewall:
    fw = fresh_firewall(firewall, request.param)
    protect.add_protected(fw, PREFIX)
    return fw


@pytest.fixture
def server(pfw: Firewall, tmp_path: Path) -> Iterator[MetricsServer]:
    srv = serve_metrics("127.0.0.1:0", pfw.path, tmp_path / "state", min_interval_s=0)
    try:
        yield srv
    finally:
        srv.close()


pytestmark = pytest.mark.needs_root


def test_a_scrape_counts_what_the_datapath_did(pfw: Firewall, server: MetricsServer):
    fw = pfw
    syn = P.tcp(CLIENT, 5555, VM, 23, P.SYN)  # no rule: drop-acl-default
    for _ in range(7):
        assert run_frame(fw, syn) == "DROP"
    establish(fw, 5)  # 5 sessions: 5 pass-outbound, 10 pass-session
    for i in range(3):  # 3 outbound SYNs left unanswered: SYN_SENT in `unassured`
        assert run_frame(fw, P.tcp(VM, 30000 + i, CLIENT, 443, P.SYN)) == "PASS"
    assert run_frame(fw, P.udp(VM, 5353, CLIENT, 53)) == "PASS"  # UDP_NEW
    (rule,) = acl.add_rules(fw, [acl.make_rule(fw, vm=VM, proto="tcp", dport="22")])
    for i in range(2):  # allowed by the rule: it counts 2 hits, 2 more SYN_SENT sessions
        assert run_frame(fw, P.tcp(CLIENT, 6000 + i, VM, 22, P.SYN)) == "PASS"
    blacklist.ban(fw, "203.0.113.9", None, 60)
    blacklist.ban(fw, "203.0.113.10", VM, 60)

    s = scrape(server.address)
    assert val(s, "samixdp_verdict_packets_total", reason="drop-acl-default") == 7
    assert val(s, "samixdp_verdict_bytes_total", reason="drop-acl-default") == 7 * len(syn)
    assert val(s, "samixdp_verdict_packets_total", reason="pass-outbound") == 5 + 3 + 1
    assert val(s, "samixdp_verdict_packets_total", reason="pass-session") == 10
    assert val(s, "samixdp_verdict_packets_total", reason="pass-acl") == 2
    assert val(s, "samixdp_verdict_packets_total", reason="drop-blacklist") == 0
    assert val(s, "samixdp_sessions", table="sessions", state="established") == 5
    assert val(s, "samixdp_sessions", table="unassured", state="syn-sent") == 3 + 2
    assert val(s, "samixdp_sessions", table="unassured", state="udp-new") == 1
    assert val(s, "samixdp_sessions", table="unassured", state="syn-recv") == 0
    assert val(s, "samixdp_sessions", table="sessions", state="syn-sent") == 0
    assert val(s, "samixdp_map_entries", map="sessions") == 5
    assert val(s, "samixdp_map_entries", map="unassured") == 6
    assert val(s, "samixdp_map_capacity", map="sessions") == fw.maps["sessions"].info.max_entries
    assert val(s, "samixdp_map_entries", map="blacklist") == 2
    assert val(s, "samixdp_bans") == 2
    assert val(s, "samixdp_protected_prefixes") == 1
    assert val(s, "samixdp_map_entries", map="protected") == 1
    assert val(s, "samixdp_acl_rules") == 1
    assert val(s, "samixdp_acl_rule_hits_total", rule=str(rule)) == 2
    assert val(s, "samixdp_map_entries", map="verdicts") is None  # arrays are left out
    assert not [k for k in s if k[0] == "samixdp_scrape_errors_total"]
    assert val(s, "samixdp_migrations", status="running") == 0  # no records yet

    for _ in range(4):  # counters move between scrapes
        assert run_frame(fw, syn) == "DROP"
    s = scrape(server.address)
    assert val(s, "samixdp_verdict_packets_total", reason="drop-acl-default") == 11


def test_acl_hits_read_in_one_batch_equal_the_per_rule_lookups(pfw: Firewall):
    fw = pfw
    ids = acl.add_rules(fw, [acl.make_rule(fw, vm=VM, proto="tcp", dport=str(p))
                             for p in (22, 80, 443)])
    for i, port in enumerate((22, 22, 22, 443)):
        assert run_frame(fw, P.tcp(CLIENT, 7000 + i, VM, port, P.SYN)) == "PASS"
    got = acl.all_hits(fw, ids).tolist()
    assert got == [3, 0, 1]
    assert got == [acl.hits(fw, ids)[i] for i in ids]


def test_past_the_cap_acl_rules_get_no_series_of_their_own(pfw: Firewall, tmp_path: Path):
    fw = pfw
    acl.add_rules(fw, [acl.make_rule(fw, vm=VM, proto="tcp", dport=str(p)) for p in (1, 2, 3)])
    srv = serve_metrics("127.0.0.1:0", fw.path, None, min_interval_s=0, max_rule_series=2)
    try:
        s = scrape(srv.address)
    finally:
        srv.close()
    assert val(s, "samixdp_acl_rules") == 3
    assert "samixdp_acl_rule_hits_total" not in names(s)


def test_a_part_that_cannot_be_read_leaves_the_rest(pfw: Firewall, server: MetricsServer):
    """A map handle that fails (here: the blacklist's, a closed descriptor) drops that
    map from the scrape and counts the failure; a record that is not JSON likewise."""
    m = server.collector.fw.maps["blacklist"]
    good_fd, m.fd = m.fd, -1  # EBADF from the kernel on every call
    records = server.collector.state_dir / RECORDS_DIR
    records.mkdir(parents=True)
    (records / "10.1.1.9.json").write_text("{not json")
    (records / "10.1.1.8.json").write_text(json.dumps(
        {"migration_id": "aa" * 16, "status": "completed",
         "report": {"phases": [{"name": "full copy", "seconds": float("nan"), "bytes": 1}]}}))
    try:
        assert run_frame(pfw, P.tcp(CLIENT, 5555, VM, 23, P.SYN)) == "DROP"
        s = scrape(server.address)
        assert val(s, "samixdp_scrape_errors_total", part="map:blacklist") == 1
        assert val(s, "samixdp_scrape_errors_total", part="migration-records") == 2
        assert val(s, "samixdp_migrations", status="completed") == 1
        assert val(s, "samixdp_migrations_finished_total", status="completed") == 0
        assert val(s, "samixdp_migration_phase_seconds_count", phase="full") is None
        assert val(s, "samixdp_bans") is None
        assert val(s, "samixdp_map_entries", map="blacklist") is None
        assert val(s, "samixdp_map_entries", map="sessions") == 0
        assert val(s, "samixdp_verdict_packets_total", reason="drop-acl-default") == 1
        s = scrape(server.address)
        assert val(s, "samixdp_scrape_errors_total", part="map:blacklist") == 2
    finally:
        m.fd = good_fd


def test_scrapes_within_the_interval_are_served_from_one_collection(pfw: Firewall,
                                                                      tmp_path: Path):
    srv = serve_metrics("127.0.0.1:0", pfw.path, tmp_path, min_interval_s=3600)
    try:
        first = scrape(srv.address)
        assert run_frame(pfw, P.tcp(CLIENT, 5555, VM, 23, P.SYN)) == "DROP"
        assert scrape(srv.address) == first  # nothing read again
    finally:
        srv.close()


def test_connections_over_the_cap_are_closed_unread(pfw: Firewall, tmp_path: Path):
    srv = serve_metrics("127.0.0.1:0", pfw.path, None, min_interval_s=0, max_conns=2)
    host, port = parse_listen(srv.address)
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.3)  # both are taken by the server
        with socket.create_connection((host, port), timeout=5) as third:
            third.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert third.recv(1024) == b""  # closed without an answer
    finally:
        for s in idle:
            s.close()
    try:
        deadline = time.monotonic() + 5
        while True:  # the slots come back once the idle connections are gone
            try:
                assert val(scrape(srv.address), "samixdp_sessions", table="sessions",
                           state="established") == 0
                break
            except (OSError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        srv.close()


def test_a_client_that_sends_nothing_is_cut_off(pfw: Firewall):
    srv = serve_metrics("127.0.0.1:0", pfw.path, None, request_timeout_s=1)
    try:
        with socket.create_connection(parse_listen(srv.address), timeout=10) as s:
            s.sendall(b"GET /metr")  # and no more
            t0 = time.monotonic()
            assert s.recv(1024) == b""
            assert 0.8 < time.monotonic() - t0 < 5
    finally:
        srv.close()


def test_only_get_metrics_is_served(pfw: Firewall):
    srv = serve_metrics("127.0.0.1:0", pfw.path)
    try:
        for path, method, code in (("/", "GET", 404), ("/metrics/x", "GET", 404),
                                   ("/metrics", "POST", 405), ("/metrics", "DELETE", 405)):
            req = urllib.request.Request(f"http://{srv.address}{path}", method=method,
                                         data=b"x" if method == "POST" else None)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == code, (path, method)
        req = urllib.request.Request(f"http://{srv.address}/metrics", method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) > 1000
            assert resp.read() == b""
    finally:
        srv.close()


def test_ipv6_loopback(pfw: Firewall):
    srv = serve_metrics("[::1]:0", pfw.path)
    try:
        assert srv.address.startswith("[::1]:")
        assert "samixdp_verdict_packets_total" in names(scrape(srv.address))
    finally:
        srv.close()


# ---- the agent and outgoing migrations (real processes) -----------------------------------


@pytest.fixture
def pair(fw: Firewall, firewall_b: Firewall, tmp_path: Path) -> Iterator[Pair]:
    protect.add_protected(fw, PREFIX)
    with make_pair(fw, firewall_b, tmp_path, "--metrics", "127.0.0.1:0") as p:
        yield p


def wait_scrape(address: str, done, timeout: float = 10.0) -> Samples:
    """Scrapes until `done(samples)` (the agent counts a connection when it ends)."""
    end = time.monotonic() + timeout
    while True:
        s = scrape(address)
        if done(s) or time.monotonic() > end:
            return s
        time.sleep(0.1)


def test_the_agents_counters_and_the_sources_migration_phases(pair: Pair, tmp_path: Path):
    address = pair.agent.wait_event("metrics")["address"]
    establish(pair.a.fw, 20)
    res = pair.a.cli("migrate", "--vm", VM, "--peer", "hostb", "--rounds", "2", "--interval",
                     "0.1", "--keep-source", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    sent = sum(p["bytes"] for p in report["phases"])

    # refused on the agent: an expired bundle, a bad field, a preflight out of scope
    ident = HostIdentity.load(pair.a.config)
    trust = TrustStore.load(pair.a.config)
    state = export_vm_state(pair.a.fw, VM)
    expired = encode_bundle(
        state.sections(), identity=ident, vms=state.vms.addrs, audience="hostb", seq=1,
        migration_id=new_migration_id(), layout_version=pair.a.fw.const("SAMIXDP_LAYOUT_VERSION"),
        acl_digest=state.acl_digest, validity_s=60, issued_at_ms=int(time.time() * 1000) - 70_000)
    layout = pair.a.fw.const("SAMIXDP_LAYOUT_VERSION")
    preflight = {"type": "preflight", "to": "hostb", "vms": ["10.9.9.9"],
                 "migration_id": "ab" * 16, "layout_version": layout, "sessions": 1}
    with Connection(trust.get("hostb"), ident) as conn:
        assert conn.request(MSG_BUNDLE, expired).type == MSG_ACK  # a signed ack, ok false
        conn.request(MSG_PREFLIGHT, sign_control(ident, {**preflight, "sessions": "lots"}))
        conn.request(MSG_PREFLIGHT, sign_control(ident, preflight))
    with socket.create_connection(("127.0.0.1", pair.port), timeout=5):
        pass  # connects, never authenticates

    s = wait_scrape(address, lambda s: val(s, "samixdp_agent_connections_total",
                                           outcome="unauthenticated") == 1
                    and val(s, "samixdp_agent_connections_open") == 0)
    accepted = val(s, "samixdp_agent_connections_total", outcome="accepted")
    authenticated = val(s, "samixdp_agent_connections_total", outcome="authenticated")
    assert accepted is not None and authenticated is not None and authenticated >= 2
    assert accepted == authenticated + 1
    assert val(s, "samixdp_agent_connections_total", outcome="refused") == 0
    assert val(s, "samixdp_agent_peer_connections_total", peer="hosta") == authenticated
    assert val(s, "samixdp_agent_connections_open") == 0
    for kind, n in (("full", 1), ("delta", 2), ("final", 1)):
        assert val(s, "samixdp_import_bundles_total", kind=kind, outcome="imported") == n, kind
    assert val(s, "samixdp_import_bundles_total", kind="full", outcome="refused") == 1
    assert val(s, "samixdp_import_bytes_total") == sent + len(expired)
    assert val(s, "samixdp_agent_refusals_total", reason="expired") == 1
    assert val(s, "samixdp_agent_refusals_total", reason="bad-field") == 1
    assert val(s, "samixdp_agent_preflights_total", outcome="ok") == 1
    assert val(s, "samixdp_agent_preflights_total", outcome="refused") == 1
    assert val(s, "samixdp_agent_aborts_total") == 0
    for phase in ("verify", "plan", "undo-log", "write", "import", "total"):
        assert val(s, "samixdp_import_phase_seconds_count", phase=phase) == 4, phase
        assert val(s, "samixdp_import_phase_seconds_bucket", phase=phase, le="+Inf") == 4
    assert 0 < val(s, "samixdp_import_phase_seconds_sum", phase="total") < 60
    assert val(s, "samixdp_sessions", table="sessions", state="established") == 20  # B's maps

    # the source: a `samixdp metrics` process reads the record `migrate` left
    proc = subprocess.Popen(pair.a.argv("metrics", "--listen", "127.0.0.1:0"),
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline() if proc.stderr else ""
        assert line.startswith("serving http://"), line
        a_address = line.split("http://", 1)[1].split("/metrics")[0]
        s = scrape(a_address)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert val(s, "samixdp_migrations", status="completed") == 1
    assert val(s, "samixdp_migrations_finished_total", status="completed") == 1
    assert val(s, "samixdp_migration_bytes_sent_total") == sent
    for phase, n in (("preflight", 1), ("full", 1), ("delta", 2), ("final", 1)):
        assert val(s, "samixdp_migration_phase_seconds_count", phase=phase) == n, phase
    assert "samixdp_agent_connections_total" not in names(s)  # no agent there
    assert val(s, "samixdp_sessions", table="sessions", state="established") == 20  # A's

    # the VM's next migration replaces its record: the counters still only grow
    srv = serve_metrics("127.0.0.1:0", pair.a.fw.path, pair.a.state, min_interval_s=0)
    try:
        (path,) = (pair.a.state / RECORDS_DIR).glob("*.json")
        doc = json.loads(path.read_text())
        assert val(scrape(srv.address), "samixdp_migration_phase_seconds_count",
                   phase="full") == 1
        doc["report"]["phases"] = doc["report"]["phases"][:2]  # refused after the full copy
        path.write_text(json.dumps({**doc, "migration_id": "77" * 16, "status": "running"}))
        s = scrape(srv.address)
        assert val(s, "samixdp_migrations", status="running") == 1
        assert val(s, "samixdp_migration_phase_seconds_count", phase="full") == 1
        path.write_text(json.dumps({**doc, "migration_id": "77" * 16, "status": "failed"}))
        for _ in range(2):  # counted once, however often it is read
            s = scrape(srv.address)
            assert val(s, "samixdp_migrations", status="completed") == 0
            assert val(s, "samixdp_migrations", status="failed") == 1
            assert val(s, "samixdp_migrations_finished_total", status="completed") == 1
            assert val(s, "samixdp_migrations_finished_total", status="failed") == 1
            assert val(s, "samixdp_migration_phase_seconds_count", phase="full") == 2
            assert val(s, "samixdp_migration_phase_seconds_count", phase="final") == 1
            assert val(s, "samixdp_migration_bytes_sent_total") == sent + doc["report"][
                "phases"][1]["bytes"]
    finally:
        srv.close()


def test_a_bad_metrics_address_stops_the_agent_before_it_listens(fw: Firewall, tmp_path: Path):
    from agents import SAMIXDP

    for argv in (["agent", "--listen", "127.0.0.1:1", "--metrics", "somewhere:9477"],
                 ["metrics", "--listen", "[::1]"]):
        res = subprocess.run([str(SAMIXDP), "--bpffs", str(fw.path), "--state-dir",
                              str(tmp_path), *argv], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SAMIXDP_CONFIG_DIR": str(tmp_path)})
        assert res.returncode == 2, res
        assert res.stderr.count("\n") == 1 and "must be IP:PORT" in res.stderr, res.stderr
