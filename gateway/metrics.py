"""Prometheus metrics: built once per process, fed by finished requests and by the state.

The request path only adds to plain counts: a dict entry per label set and, per model, a
bucket count found by bisection, with no lock and no prometheus-client call (those cost more
than all the rest of a request's bookkeeping; bench/instructions.py counts it). `refresh`
moves the counts into the prometheus-client metrics, after each round of health checks and
before each scrape, and copies what is a state rather than an event (replicas up, ejected, in
flight) from the live objects.

With several workers, prometheus-client's multi-process mode keeps each worker's values in
files of a shared directory (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor before the
workers start) and any worker's scrape sums them all; a dead worker's counters stay in the sum,
so a counter never goes backwards. The other workers' figures are as fresh as their last
health round (GATEWAY_HEALTH_INTERVAL_S).
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__
from gateway.observe import CLIENT_CLOSED_STATUS, RequestRecord
from gateway.replicas import Registry, Replica
from gateway.routing import RoutingState

PREFIX = "vllm_gateway"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# vLLM's own bounds (vllm/v1/metrics/buckets.py, 0.32): the gateway's time to first byte of
# a stream and vLLM's vllm:time_to_first_token_seconds can be read side by side, bucket by
# bucket, and so can the gateway's duration and vllm:e2e_request_latency_seconds.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

# The one `model` label value of every request whose model the gateway does not serve: a
# client cannot grow the label set by sending made-up names. Routes without a model (the
# gateway's own GET routes) have the empty value.
OTHER_MODEL = "_other"
OTHER_ROUTE = "other"


class Metrics:
    """Every metric of one gateway process, in a registry of its own (never the global one)."""

    __slots__ = (
        "_registry",
        "_multiprocess_dir",
        "_routes",
        "_known_model",
        "_requests",
        "_request_children",
        "_counted",
        "_ttfb",
        "_duration",
        "_times",
        "_retries",
        "_upstream_errors",
        "_health_checks",
        "_ejections",
        "_ejections_seen",
        "_log_dropped",
        "_replica_up",
        "_replica_ejected",
        "_replica_inflight",
        "_replica_never_up",
        "_gateway_inflight",
        "_replicas_shown",
        "_routing_policy",
        "_index_entries",
        "_index_capacity",
        "_index_lookups",
        "_index_hits",
        "_bound_spills",
        "_routing_seen",
    )

    def __init__(
        self, *, routes: Iterable[str], known_model: Any, multiprocess_dir: str = ""
    ) -> None:
        # In multi-process mode the metrics live in files and a scrape reads those; the
        # metrics themselves must then not be in the registry too, or they would count twice.
        self._multiprocess_dir = multiprocess_dir
        self._registry = CollectorRegistry(auto_describe=True)
        registry = None if multiprocess_dir else self._registry
        self._routes = frozenset(routes)
        self._known_model = known_model
        p = PREFIX
        build = Gauge(
            f"{p}_build_info",
            "The gateway's version and Python, as labels; always 1.",
            ["version", "python"],
            registry=registry,
            multiprocess_mode="max",
        )
        build.labels(__version__, platform.python_version()).set(1)
        self._requests = Counter(
            f"{p}_requests",
            "Requests by model, route, status code sent (499: the client left first) and "
            "outcome (ok, client_closed, client_timeout, upstream_error, timeout, rejected).",
            ["model", "route", "code", "outcome"],
            registry=registry,
        )
        self._request_children: dict[tuple[str, str, int, str], Any] = {}
        # Requests counted since the last `refresh`, by label values.
        self._counted: dict[tuple[str, str, int, str], int] = {}
        self._ttfb = Histogram(
            f"{p}_time_to_first_byte_seconds",
            "From the request's arrival to the first byte of the answer's body sent to the "
            "client: for a stream, its first token. Buckets are vLLM's TTFT buckets.",
            ["model"],
            registry=registry,
            buckets=TTFT_BUCKETS,
        )
        self._duration = Histogram(
            f"{p}_request_duration_seconds",
            "From the request's arrival to its end, however it ended. Buckets are vLLM's "
            "e2e request latency buckets.",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self._times: dict[str, Times] = {}
        self._retries = Counter(
            f"{p}_retries",
            "Requests sent again to another replica, by the reason the previous try failed.",
            ["reason"],
            registry=registry,
        )
        self._upstream_errors = Counter(
            f"{p}_upstream_errors",
            "Failed tries to backends by kind: connect, timeout, reset, 5xx, protocol.",
            ["kind"],
            registry=registry,
        )
        self._health_checks = Counter(
            f"{p}_health_checks",
            "Active health checks by result: pass, fail, busy (timed out on a replica that "
            "answered requests since its last check, which keeps it in rotation).",
            ["result"],
            registry=registry,
        )
        self._ejections = Counter(
            f"{p}_replica_ejections",
            "Times a replica was ejected for failing requests (passive health checks).",
            ["replica"],
            registry=registry,
        )
        self._ejections_seen: dict[Replica, int] = {}
        self._log_dropped = Counter(
            f"{p}_log_lines_dropped",
            "Log lines dropped because the output did not keep up (the log never blocks).",
            registry=registry,
        )
        self._replica_up = Gauge(
            f"{p}_replica_up",
            "1 while the replica passes its health checks, else 0.",
            ["replica"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._replica_ejected = Gauge(
            f"{p}_replica_ejected",
            "1 while the replica is ejected for failing requests, else 0.",
            ["replica"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._replica_never_up = Gauge(
            f"{p}_replica_never_up",
            "1 while the replica has never passed a health check since the gateway started.",
            ["replica"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self._replica_inflight = Gauge(
            f"{p}_replica_requests_in_flight",
            "Requests of this gateway on the replica now.",
            ["replica"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._gateway_inflight = Gauge(
            f"{p}_requests_in_flight",
            "Requests being forwarded by the gateway now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._replicas_shown: set[str] = set()
        self._routing_policy = Gauge(
            f"{p}_routing_policy_info",
            "The routing policy in force (GATEWAY_ROUTING), as a label; always 1.",
            ["policy"],
            registry=registry,
            multiprocess_mode="max",
        )
        self._index_entries = Gauge(
            f"{p}_prefix_index_entries",
            "Prompt blocks the prefix index remembers now (GATEWAY_ROUTING=prefix), all workers.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._index_capacity = Gauge(
            f"{p}_prefix_index_capacity",
            "The most prompt blocks the prefix index may remember (GATEWAY_PREFIX_INDEX_ENTRIES"
            " per worker), all workers.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._index_lookups = Counter(
            f"{p}_prefix_index_lookups",
            "Requests whose prompt blocks were looked up in the prefix index.",
            registry=registry,
        )
        self._index_hits = Counter(
            f"{p}_prefix_index_hits",
            "Lookups that found a live replica holding enough of the prompt to route by it "
            "(the index's hit ratio is hits / lookups).",
            registry=registry,
        )
        self._bound_spills = Counter(
            f"{p}_prefix_load_bound_spills",
            "Requests the load bound (GATEWAY_PREFIX_LOAD_FACTOR) sent away from the replica "
            "that held their prefix.",
            registry=registry,
        )
        # The policy's own running totals at the last refresh: counters add the difference.
        self._routing_seen = (0, 0, 0)

    # The request path ------------------------------------------------------------------

    def request_done(self, record: RequestRecord) -> None:
        model = record.model
        if model and not self._known_model(model):
            model = OTHER_MODEL
        route = record.path if record.path in self._routes else OTHER_ROUTE
        key = (model, route, record.status or CLIENT_CLOSED_STATUS, record.outcome)
        counted = self._counted
        counted[key] = counted.get(key, 0) + 1
        times = self._times.get(model)
        if times is None:
            times = self._times[model] = Times()
        if record.first_byte:
            ttfb = record.first_byte - record.started
            times.ttfb[bisect_left(TTFT_BUCKETS, ttfb)] += 1
            times.ttfb_sum += ttfb
        duration = record.ended - record.started
        times.duration[bisect_left(LATENCY_BUCKETS, duration)] += 1
        times.duration_sum += duration

    def _flush(self) -> None:
        """Move the counts of finished requests into the prometheus-client metrics."""
        children = self._request_children
        for key, count in self._counted.items():
            child = children.get(key)
            if child is None:
                model, route, status, outcome = key
                child = children[key] = self._requests.labels(model, route, str(status), outcome)
            child.inc(count)
        self._counted.clear()
        for model, times in self._times.items():
            if any(times.ttfb):
                _add_observations(self._ttfb.labels(model), times.ttfb, times.ttfb_sum)
            if any(times.duration):
                _add_observations(self._duration.labels(model), times.duration, times.duration_sum)
            times.clear()

    # Rare events -------------------------------------------------------------------------

    def retry(self, reason: str) -> None:
        self._retries.labels(reason).inc()

    def upstream_error(self, kind: str) -> None:
        self._upstream_errors.labels(kind).inc()

    def health_check(self, passed: bool | None) -> None:
        """None: timed out on a replica that answered requests since its last check (busy)."""
        result = "busy" if passed is None else "pass" if passed else "fail"
        self._health_checks.labels(result).inc()

    def log_lines_dropped(self, count: int) -> None:
        self._log_dropped.inc(count)

    # State -------------------------------------------------------------------------------

    def refresh(self, registry: Registry, inflight: int) -> None:
        """Bring every metric up to date: the requests counted since the last refresh, and the
        replicas' state copied into the gauges (replicas that left are forgotten)."""
        self._flush()
        self._gateway_inflight.set(inflight)
        shown = set()
        for replica in registry.replicas:
            name = replica.backend.url
            shown.add(name)
            self._replica_up.labels(name).set(1 if replica.healthy else 0)
            self._replica_ejected.labels(name).set(1 if replica.ejected_until else 0)
            self._replica_never_up.labels(name).set(0 if replica.ever_up else 1)
            self._replica_inflight.labels(name).set(replica.inflight)
            seen = self._ejections_seen.get(replica, 0)
            if replica.ejections > seen:
                self._ejections.labels(name).inc(replica.ejections - seen)
                self._ejections_seen[replica] = replica.ejections
        for name in self._replicas_shown - shown:
            # A replica gone from discovery: its gauges go (a file-backed value is zeroed
            # first, since removing it from this process does not remove it from the files).
            for gauge in (
                self._replica_up,
                self._replica_ejected,
                self._replica_never_up,
                self._replica_inflight,
            ):
                gauge.labels(name).set(0)
                gauge.remove(name)
        self._replicas_shown = shown
        for replica in list(self._ejections_seen):
            if replica.backend.url not in shown:
                del self._ejections_seen[replica]
        self._refresh_routing(registry.routing_state())

    def _refresh_routing(self, state: RoutingState) -> None:
        self._routing_policy.labels(state.policy).set(1)
        self._index_entries.set(state.index_entries)
        self._index_capacity.set(state.index_capacity)
        lookups, hits, spills = self._routing_seen
        self._index_lookups.inc(state.index_lookups - lookups)
        self._index_hits.inc(state.index_hits - hits)
        self._bound_spills.inc(state.bound_spills - spills)
        self._routing_seen = (state.index_lookups, state.index_hits, state.bound_spills)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or every worker's summed."""
        if self._multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self._registry)

    def __repr__(self) -> str:
        mode = f"multiprocess in {self._multiprocess_dir}" if self._multiprocess_dir else "local"
        return f"<Metrics [{mode} | {len(self._request_children)} request series]>"


class Times:
    """One model's observations since the last refresh: a count per bucket (the last one past
    every bound: +Inf) and the sum, as a prometheus-client histogram keeps them."""

    __slots__ = ("ttfb", "ttfb_sum", "duration", "duration_sum")

    def __init__(self) -> None:
        self.ttfb = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttfb_sum = 0.0
        self.duration = [0] * (len(LATENCY_BUCKETS) + 1)
        self.duration_sum = 0.0

    def clear(self) -> None:
        self.ttfb[:] = [0] * len(self.ttfb)
        self.ttfb_sum = 0.0
        self.duration[:] = [0] * len(self.duration)
        self.duration_sum = 0.0


def _add_observations(child: Any, counts: list[int], total: float) -> None:
    """Add many observations to a histogram child at once.

    prometheus-client has no public call for it (`observe` takes one value, with a lock per
    bucket and per sum); its children keep one value per bucket, +Inf last, and one for the
    sum, non-cumulative (the exposition accumulates them). tests/test_metrics.py checks the
    buckets and sums that come out.
    """
    buckets = child._buckets
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
    child._sum.inc(total)
