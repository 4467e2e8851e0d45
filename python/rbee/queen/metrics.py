"""Prometheus metrics of one queen (its own registry, so tests and several
queens in one process do not share counters).

prometheus_client renders every metric. The ones updated on every request
(decisions, decision time, in flight, upstream time, tokens, requests) are
counted by the small classes below instead of its own: a prometheus_client
update takes a lock and checks its labels each time, five microseconds per
request in all (`bench/bench_queen_path.py`), and these are only ever
updated from the event loop's thread, where plain arithmetic is safe.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

# Decisions take microseconds; the default buckets start at 5 ms.
_DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                     50e-3, 100e-3)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Value:
    """One labelled value of a counter or a gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _Buckets:
    """One labelled histogram: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # Buckets are "less than or equal": the first bound not below it.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _HotMetric:
    """A counter, gauge or histogram of the request path; `labels()` as
    prometheus_client's, without the lock."""

    def __init__(self, kind: str, name: str, documentation: str,
                 labelnames: tuple[str, ...] = (), buckets: tuple[float, ...] = ()) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = labelnames
        self.buckets = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = (
                _Buckets(self.buckets) if self.kind == "histogram" else _Value())
        return child

    def family(self) -> Metric:
        labels = list(self.labelnames)
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=labels)
            bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
            for values, child in list(self._children.items()):
                running, cumulative = 0, []
                for bound, count in zip(bounds, child.counts):
                    running += count
                    cumulative.append((bound, running))
                histogram.add_metric(list(values), cumulative, child.sum)
            return histogram
        family_of = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = family_of(self.name, self.documentation, labels=labels)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        return family


class _HotCollector:
    def __init__(self, metrics: list[_HotMetric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decisions = _HotMetric(
            "counter", "rbee_decisions", "Scheduling decisions by outcome", ("outcome",))
        decision_seconds = _HotMetric(
            "histogram", "rbee_decision_seconds", "Time to make one scheduling decision",
            buckets=_DECISION_BUCKETS)
        self.decision_seconds = decision_seconds.labels()
        self.in_flight = _HotMetric(
            "gauge", "rbee_worker_in_flight", "Requests in flight per worker", ("worker",))
        self.upstream_seconds = _HotMetric(
            "histogram", "rbee_upstream_seconds", "Upstream request duration", ("worker",),
            buckets=_UPSTREAM_BUCKETS)
        self.upstream_ttft_seconds = _HotMetric(
            "histogram", "rbee_upstream_ttft_seconds", "Upstream time to first byte",
            ("worker",), buckets=_UPSTREAM_BUCKETS)
        self.tokens = _HotMetric(
            "counter", "rbee_tokens", "Tokens by worker and kind", ("worker", "kind"))
        self.requests = _HotMetric(
            "counter", "rbee_requests", "Requests answered by endpoint and status",
            ("endpoint", "status"))
        r.register(_HotCollector([  # type: ignore[arg-type]
            self.decisions, decision_seconds, self.in_flight, self.upstream_seconds,
            self.upstream_ttft_seconds, self.tokens, self.requests]))

        self.policy_errors = Counter(
            "rbee_policy_errors", "Policy failures by kind", ["code"], registry=r)
        self.fallbacks = Counter(
            "rbee_policy_fallbacks", "Decisions made by a fallback policy",
            ["code", "used"], registry=r)
        self.policy_reloads = Counter(
            "rbee_policy_reloads", "Policy changes by origin and result",
            ["origin", "result"], registry=r)
        self.queue_depth = Gauge("rbee_queue_depth", "Jobs waiting to be scheduled", registry=r)
        self.upstream_failures = Counter(
            "rbee_upstream_failures", "Upstream failures by worker and stage",
            ["worker", "stage"], registry=r)
        self.tenant_seconds = Histogram(
            "rbee_tenant_request_seconds", "Request duration per tenant", ["tenant"],
            buckets=_UPSTREAM_BUCKETS, registry=r)
        self.tenant_rejections = Counter(
            "rbee_tenant_rejections", "Refused requests per tenant and code",
            ["tenant", "code"], registry=r)
        self.tenant_tokens = Counter(
            "rbee_tenant_tokens", "Tokens used per tenant", ["tenant"], registry=r)

        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: a lookup by name on every
        request costs more than one in this dict."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def count_request(self, endpoint: str, status: int) -> None:
        self.child(self.requests, endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
