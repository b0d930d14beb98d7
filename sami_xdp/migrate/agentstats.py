"""What the agent counts about itself: connections, refusals, preflights, aborts,
bundles by kind and outcome, bytes received and how long each import phase took.

Plain counters under one lock, read whole by `snapshot()`; the metrics endpoint
(ops/metrics.py) turns a snapshot into Prometheus families at scrape time. Every
label value here comes from the code (a refusal's kind, a timing's name) or from
the peers file (a peer's name), never from what a client sent, so the number of
series stays bounded whatever a client does."""

from __future__ import annotations

import bisect
import copy
import threading
from collections import Counter
from dataclasses import dataclass, field

from .bundle import FLAG_DELTA, FLAG_FINAL, HEADER_SIZE, parse_header
from .errors import BundleRefused

# upper bounds (s) of the duration buckets: a phase takes from ~100 us (a small
# delta's plan) to tens of seconds (a full copy of millions of sessions)
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# the agent's timing names (importer.ImportResult.timings, plus the agent's own)
PHASE_NAMES = {"verify_s": "verify", "plan_s": "plan", "undo_log_s": "undo-log",
               "write_s": "write", "total_s": "import", "receive_total_s": "total"}


@dataclass
class Histogram:
    """Observations in fixed buckets: counts[i] of values <= bounds[i] and above the
    bound before it; the last count is those above every bound (+Inf)."""

    bounds: tuple[float, ...] = PHASE_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) for every bound and +Inf, as exposed."""
        out, run = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            run += n
            out.append((bound, run))
        return out


def bundle_kind(kind: str) -> str:
    """A bundle's kind as counted: full, delta or final (importer's "delta+final")."""
    return "final" if kind.endswith("+final") else kind


def claimed_kind(data: bytes | bytearray) -> str:
    """The kind a bundle's header announces (signed or not: for counting a refusal)."""
    try:
        flags = int(parse_header(memoryview(data)[:HEADER_SIZE])["flags"])
    except BundleRefused:
        return "unknown"
    return "final" if flags & FLAG_FINAL else ("delta" if flags & FLAG_DELTA else "full")


def phase_name(timing: str) -> str:
    return PHASE_NAMES.get(timing, timing.removesuffix("_s").replace("_", "-"))


@dataclass
class AgentStats:
    """A copy of the counters at one instant."""

    connections: Counter[str] = field(default_factory=Counter)  # accepted, refused, ...
    peer_connections: Counter[str] = field(default_factory=Counter)  # authenticated, by peer
    refusals: Counter[str] = field(default_factory=Counter)  # by reason (the refusal's kind)
    preflights: Counter[str] = field(default_factory=Counter)  # ok, refused
    aborts: int = 0
    bundles: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    bytes_received: int = 0  # bundles read whole (verified or not)
    phases: dict[str, Histogram] = field(default_factory=dict)  # import phase durations


class AgentCounters:
    """Thread-safe: the connection threads count, the metrics thread reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = AgentStats()

    def connection(self, outcome: str) -> None:
        """accepted, refused (over a cap), authenticated or unauthenticated."""
        with self._lock:
            self._s.connections[outcome] += 1

    def authenticated(self, peer: str) -> None:
        with self._lock:
            self._s.connections["authenticated"] += 1
            self._s.peer_connections[peer] += 1

    def refusal(self, reason: str) -> None:
        with self._lock:
            self._s.refusals[reason] += 1

    def preflight(self, ok: bool) -> None:
        with self._lock:
            self._s.preflights["ok" if ok else "refused"] += 1

    def abort(self) -> None:
        with self._lock:
            self._s.aborts += 1

    def bundle(self, kind: str, outcome: str, size: int,
               timings: dict[str, float] | None = None) -> None:
        """One bundle read whole: imported (with its phase timings) or refused."""
        with self._lock:
            self._s.bundles[(bundle_kind(kind), outcome)] += 1
            self._s.bytes_received += size
            for name, seconds in (timings or {}).items():
                self._s.phases.setdefault(phase_name(name), Histogram()).observe(seconds)

    def snapshot(self) -> AgentStats:
        with self._lock:
            return copy.deepcopy(self._s)
