"""The Prometheus endpoint: `samixdp agent --metrics HOST:PORT`, `samixdp metrics`.

One custom collector builds every family when it is scraped (no background
polling) from what is there to read: the pinned maps (verdict counters, fill
levels, sessions by state, bans, ACL rule hits), the agent's own counters
(migrate/agentstats.py) and the records of outgoing migrations in the state dir
(migrate/running.py). Each part is read on its own: one that fails is left out
of that scrape and counted in `samixdp_scrape_errors_total{part}`, the others
are served. Scrapes are serialised, and the text of one younger than
`min_interval_s` (or ten times what it took to collect, whichever is longer) is
served again, so a client that scrapes in a loop keeps at most a tenth of a CPU
collecting, however big the tables (a collection at 1M sessions takes ~0.5 s);
the HTTP server takes a few connections at once, each with a deadline. The
endpoint is unauthenticated and read-only (README "Metrics")."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..base.errors import InvalidArgument, SamiError
from ..loader.pinned import Firewall
from ..migrate.agent import Agent
from ..migrate.agentstats import Histogram
from ..migrate.running import RECORDS_DIR
from ..policy import acl, sessions, stats
from ..policy.config import state_names

MAX_RECORDS = 1000  # migration records read per scrape (the newest)
MAX_RECORD_BYTES = 1 << 20  # a record is a few kB; a larger file is skipped
MAX_RULE_SERIES = 1000  # more ACL rules than this: no per-rule series (the verdicts count)
MAX_BUSY_SHARE = 0.1  # of one CPU, at most, spent collecting however often it is scraped
MAX_CONNS = 8  # scrapes served at once; more connections are closed at once
REQUEST_TIMEOUT_S = 10.0  # a client must send its request (and read the answer) in time
FINISHED = ("completed", "failed", "aborted")
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
COUNTED_MAPS = ("hash", "lru_hash", "lpm_trie")  # arrays are full by construction


def parse_listen(text: str, option: str = "--metrics") -> tuple[str, int]:
    """HOST:PORT (an IPv4 address or `localhost`) or [V6]:PORT; port 0 takes a free one.
    No name is resolved: the operator says which address the endpoint is on."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", text) or re.fullmatch(r"([^:\[\]]+):(\d{1,5})",
                                                                       text)
    bad = InvalidArgument(f"{option} must be IP:PORT or [IPV6]:PORT (e.g. 127.0.0.1:9477), "
                          f"got {text!r}")
    if not m or int(m.group(2)) > 65535:
        raise bad
    host = "127.0.0.1" if m.group(1) == "localhost" else m.group(1)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise bad from None
    if (addr.version == 6) != text.startswith("["):
        raise bad
    return str(addr), int(m.group(2))


# ---- outgoing migrations (records in the state dir) ----------------------------------


def phase_label(name: str) -> str:
    """A report's phase name as a label: preflight, full, delta or final."""
    if name == "full copy":
        return "full"
    if name == "final delta":
        return "final"
    if name.startswith("delta"):
        return "delta"
    return name if name == "preflight" else "other"


def read_records(state_dir: Path, limit: int = MAX_RECORDS) -> tuple[list[dict[str, Any]], int]:
    """The newest `limit` migration records (parsed) and how many could not be read."""
    folder = state_dir / RECORDS_DIR
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if e.name.endswith(".json") and e.is_file()]
    except FileNotFoundError:
        return [], 0
    bad = 0
    dated = []
    for e in entries:
        try:
            st = e.stat()
        except OSError:
            continue  # gone since the listing
        dated.append((st.st_mtime, st.st_size, e.path))
    dated.sort(reverse=True)
    docs = []
    for _mtime, size, path in dated[:limit]:
        try:
            if size > MAX_RECORD_BYTES:
                raise ValueError("too large")
            doc = json.loads(Path(path).read_bytes())
            if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
                raise ValueError("not a record")
        except (OSError, ValueError):
            bad += 1
            continue
        docs.append(doc)
    return docs, bad


@dataclass
class MigrationTally:
    """Counts each finished migration once, by its id, while its record is read:
    the counters and histograms only grow (Prometheus counter semantics), though
    a record is replaced by the VM's next migration. What a record held before
    this process first read it is counted at that first scrape."""

    seen: set[str] = field(default_factory=set)
    finished: Counter[str] = field(default_factory=Counter)
    phases: dict[str, Histogram] = field(default_factory=dict)
    bytes_sent: int = 0

    def update(self, docs: list[dict[str, Any]]) -> int:
        """Adds the finished migrations not counted yet; returns how many records
        were malformed."""
        bad = 0
        present = set()
        for doc in docs:
            mid, status = doc.get("migration_id"), doc["status"]
            if not isinstance(mid, str):
                bad += 1
                continue
            present.add(mid)
            if status not in FINISHED or mid in self.seen:
                continue
            try:
                phases = [(phase_label(str(p["name"])), float(p["seconds"]), int(p["bytes"]))
                          for p in (doc.get("report") or {}).get("phases", [])]
                if not all(math.isfinite(t) and t >= 0 and b >= 0 for _, t, b in phases):
                    raise ValueError("a negative or infinite phase")
            except (KeyError, TypeError, ValueError, AttributeError):
                bad += 1
                continue
            self.seen.add(mid)
            self.finished[status] += 1
            for name, seconds, sent in phases:
                self.phases.setdefault(name, Histogram()).observe(seconds)
                self.bytes_sent += sent
        self.seen &= present  # only ids whose record may be read again are remembered
        return bad


# ---- the collector --------------------------------------------------------------------


def _histogram(name: str, doc: str, label: str,
               hists: dict[str, Histogram]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=[label])
    for value, h in sorted(hists.items()):
        buckets = [("+Inf" if b == float("inf") else repr(b), float(n))
                   for b, n in h.cumulative()]
        fam.add_metric([value], buckets, h.total)
    return fam


class FirewallCollector:
    """Builds the families at scrape time from the maps, the agent and the records."""

    def __init__(self, fw: Firewall, state_dir: Path | None = None,
                 agent: Agent | None = None, max_rule_series: int = MAX_RULE_SERIES) -> None:
        self.fw, self.state_dir, self.agent = fw, state_dir, agent
        self.max_rule_series = max_rule_series
        self.errors: Counter[str] = Counter()
        self.tally = MigrationTally()
        self._lock = threading.Lock()
        self._reasons = stats.reason_names(fw.layout)
        self._states = state_names(fw.layout)

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # one collection at a time: the tally and the error counts
            families = self._collect()
        yield from families

    def _collect(self) -> list[Metric]:
        t0 = time.perf_counter()
        out: list[Metric] = []
        parts: list[tuple[str, Callable[[], Iterable[Metric]]]] = [
            ("verdicts", self._verdicts),
            ("maps", self._maps),
            ("sessions", self._sessions),
            ("acl", self._acl_hits),
        ]
        if self.agent is not None:
            parts.append(("agent", self._agent))
        if self.state_dir is not None:
            parts.append(("migrations", self._migrations))
        for part, fn in parts:
            try:
                out.extend(list(fn()))
            except Exception as exc:  # noqa: BLE001 - a scrape must never take the agent down
                self._failed(part, exc)
        err = CounterMetricFamily("samixdp_scrape_errors", "Parts of a scrape that could not "
                                  "be read (left out of that scrape).", labels=["part"])
        for part, n in sorted(self.errors.items()):
            err.add_metric([part], n)
        out.append(err)
        out.append(GaugeMetricFamily("samixdp_scrape_duration_seconds",
                                     "Time the last collection took.",
                                     value=time.perf_counter() - t0))
        return out

    def _failed(self, part: str, exc: Exception) -> None:
        self.errors[part] += 1
        print(f"metrics: cannot read {part}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)

    # ---- the firewall's maps ---------------------------------------------------------

    def _verdicts(self) -> Iterator[Metric]:
        v = stats.read_verdicts(self.fw)
        packets = CounterMetricFamily("samixdp_verdict_packets", "Packets by verdict reason "
                                      "(pass-* passed, drop-* dropped).", labels=["reason"])
        nbytes = CounterMetricFamily("samixdp_verdict_bytes", "Bytes by verdict reason.",
                                     labels=["reason"])
        for reason, c in v.items():
            packets.add_metric([reason], c["packets"])
            nbytes.add_metric([reason], c["bytes"])
        yield packets
        yield nbytes

    def _maps(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily("samixdp_map_entries", "Entries a map holds (the kernel's "
                                    "count for hash maps).", labels=["map"])
        capacity = GaugeMetricFamily("samixdp_map_capacity", "Entries a map can hold.",
                                     labels=["map"])
        counts: dict[str, int] = {}
        for name, m in sorted(self.fw.maps.items()):
            if m.info.type_name not in COUNTED_MAPS:
                continue
            try:
                counts[name] = m.count()
            except Exception as exc:  # noqa: BLE001 - one map failing leaves the others
                self._failed(f"map:{name}", exc)
                continue
            entries.add_metric([name], counts[name])
            capacity.add_metric([name], m.info.max_entries)
        yield entries
        yield capacity
        if "blacklist" in counts:
            yield GaugeMetricFamily("samixdp_bans", "Sources banned (blacklist entries, "
                                    "expired ones until gc).", value=counts["blacklist"])
        if "protected" in counts:
            yield GaugeMetricFamily("samixdp_protected_prefixes", "Protected prefixes (the VMs "
                                    "behind this host).", value=counts["protected"])

    def _sessions(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily("samixdp_sessions", "Sessions by state and table (expired "
                                "ones until gc).", labels=["table", "state"])
        for table, counts in sessions.count_states(self.fw).items():
            for value, n in enumerate(counts):
                name = self._states.get(value)
                if name is not None and name != "NONE":
                    fam.add_metric([table, name.lower().replace("_", "-")], int(n))
                elif n:
                    fam.add_metric([table, "unknown"], int(n))
        yield fam

    def _acl_hits(self) -> Iterator[Metric]:
        """A series per rule while there are at most `max_rule_series` rules (a host of
        10k VMs may hold 40k); the pass-acl and drop-acl-deny verdicts count them all."""
        rules = acl.read_rules(self.fw)
        ids = rules["rule"]["id"]
        yield GaugeMetricFamily("samixdp_acl_rules", "ACL rules loaded.", value=len(ids))
        if len(ids) > self.max_rule_series:
            return
        fam = CounterMetricFamily("samixdp_acl_rule_hits", "Packets each ACL rule matched "
                                  "(rule: its id, as `acl list` shows it).", labels=["rule"])
        for rule, n in zip(ids.tolist(), acl.all_hits(self.fw, ids).tolist(), strict=True):
            fam.add_metric([str(rule)], n)
        yield fam

    # ---- the agent's counters -----------------------------------------------------------

    def _agent(self) -> Iterator[Metric]:
        assert self.agent is not None
        s = self.agent.counters.snapshot()
        conns = CounterMetricFamily("samixdp_agent_connections", "Connections to the agent: "
                                    "accepted, refused (over a cap), authenticated, "
                                    "unauthenticated (dropped at the handshake).",
                                    labels=["outcome"])
        for outcome in ("accepted", "refused", "authenticated", "unauthenticated"):
            conns.add_metric([outcome], s.connections[outcome])
        yield conns
        yield GaugeMetricFamily("samixdp_agent_connections_open", "Connections open now.",
                                value=self.agent.admission.active)
        peers = CounterMetricFamily("samixdp_agent_peer_connections", "Authenticated "
                                    "connections by peer.", labels=["peer"])
        for peer, n in sorted(s.peer_connections.items()):
            peers.add_metric([peer], n)
        yield peers
        refusals = CounterMetricFamily("samixdp_agent_refusals", "Requests refused, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(s.refusals.items()):
            refusals.add_metric([reason], n)
        yield refusals
        pre = CounterMetricFamily("samixdp_agent_preflights", "Preflights answered, by outcome.",
                                  labels=["outcome"])
        for outcome in ("ok", "refused"):
            pre.add_metric([outcome], s.preflights[outcome])
        yield pre
        yield CounterMetricFamily("samixdp_agent_aborts", "Aborts obeyed.", value=s.aborts)
        bundles = CounterMetricFamily("samixdp_import_bundles", "Bundles read whole, by kind "
                                      "and outcome (imported or refused).",
                                      labels=["kind", "outcome"])
        for (kind, outcome), n in sorted(s.bundles.items()):
            bundles.add_metric([kind, outcome], n)
        yield bundles
        yield CounterMetricFamily("samixdp_import_bytes", "Bytes of bundles read whole.",
                                  value=s.bytes_received)
        yield _histogram("samixdp_import_phase_seconds", "Time of each phase of an import "
                         "(verify, plan, undo-log, write, import, total).", "phase", s.phases)

    # ---- outgoing migrations --------------------------------------------------------------

    def _migrations(self) -> Iterator[Metric]:
        assert self.state_dir is not None
        docs, bad = read_records(self.state_dir)
        bad += self.tally.update(docs)
        if bad:
            self.errors["migration-records"] += bad
        now = GaugeMetricFamily("samixdp_migrations", "Outgoing migrations recorded here (the "
                                "last one of each VM), by status.", labels=["status"])
        status = Counter(d["status"] for d in docs)
        for st in ("running", *FINISHED):
            now.add_metric([st], status[st])
        yield now
        done = CounterMetricFamily("samixdp_migrations_finished", "Outgoing migrations seen "
                                   "finished, by status.", labels=["status"])
        for st in FINISHED:
            done.add_metric([st], self.tally.finished[st])
        yield done
        yield CounterMetricFamily("samixdp_migration_bytes_sent", "Bytes of bundles sent by "
                                  "finished outgoing migrations.", value=self.tally.bytes_sent)
        yield _histogram("samixdp_migration_phase_seconds", "Time of each phase of a finished "
                         "outgoing migration (preflight, full, delta, final).", "phase",
                         self.tally.phases)


class Exposition:
    """The registry's text, collected again only once the last one is older than
    `min_interval_s` and than ten times what collecting it took (0: every time)."""

    def __init__(self, registry: CollectorRegistry, min_interval_s: float) -> None:
        self.registry, self.min_interval_s = registry, min_interval_s
        self._lock = threading.Lock()
        self._body = b""
        self._at = -float("inf")
        self._interval = 0.0

    def body(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            if self.min_interval_s <= 0 or now - self._at >= self._interval:
                self._body = generate_latest(self.registry)
                self._at = now
                self._interval = max(self.min_interval_s,
                                     (time.monotonic() - now) / MAX_BUSY_SHARE)
            return self._body


def wsgi_app(exposition: Exposition) -> Callable[..., Iterable[bytes]]:
    """GET (or HEAD) /metrics: the exposition; nothing else is served."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics is served here\n"]
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        body = exposition.body()
        start_response("200 OK", [("Content-Type", TEXT_FORMAT),
                                  ("Content-Length", str(len(body)))])
        return [b""] if method == "HEAD" else [body]

    return app


# ---- the HTTP server --------------------------------------------------------------------


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # a log line per scrape is noise


class _HttpServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], max_conns: int, timeout_s: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(max_conns)
        handler = type("_TimedHandler", (_Handler,), {"timeout": timeout_s})
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed, nothing read
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


@dataclass
class MetricsServer:
    """A running endpoint; `close()` stops it and closes its map handles."""

    httpd: _HttpServer
    thread: threading.Thread
    collector: FirewallCollector
    exposition: Exposition

    @property
    def address(self) -> str:
        host, port = str(self.httpd.server_address[0]), int(self.httpd.server_address[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        self.collector.fw.close()


def serve_metrics(addr: str, bpffs: Path, state_dir: Path | None = None,
                  agent: Agent | None = None, min_interval_s: float = 1.0,
                  max_conns: int = MAX_CONNS, max_rule_series: int = MAX_RULE_SERIES,
                  request_timeout_s: float = REQUEST_TIMEOUT_S,
                  option: str = "--metrics") -> MetricsServer:
    """Serves /metrics on `addr` (IP:PORT or [IPV6]:PORT) in a daemon thread. The maps
    are read through handles of its own (opened from `bpffs`), not the agent's."""
    host, port = parse_listen(addr, option)
    fw = Firewall.open(bpffs)
    try:
        collector = FirewallCollector(fw, state_dir, agent, max_rule_series)
        registry = CollectorRegistry()
        registry.register(collector)
        exposition = Exposition(registry, min_interval_s)
        try:
            httpd = _HttpServer((host, port), max_conns, request_timeout_s)
        except OSError as exc:
            raise SamiError(f"cannot serve metrics on {addr}: {exc.strerror or exc}") from exc
        httpd.set_app(wsgi_app(exposition))
    except BaseException:
        fw.close()
        raise
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
                              name="metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread, collector, exposition)
