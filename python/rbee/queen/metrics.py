"""Prometheus metrics of one queen (its own registry, so tests and several
queens in one process do not share counters)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

# Decisions take microseconds; the default buckets start at 5 ms.
_DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                     50e-3, 100e-3)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decisions = Counter(
            "rbee_decisions", "Scheduling decisions by outcome", ["outcome"], registry=r)
        self.decision_seconds = Histogram(
            "rbee_decision_seconds", "Time to make one scheduling decision",
            buckets=_DECISION_BUCKETS, registry=r)
        self.policy_errors = Counter(
            "rbee_policy_errors", "Policy failures by kind", ["code"], registry=r)
        self.fallbacks = Counter(
            "rbee_policy_fallbacks", "Decisions made by a fallback policy",
            ["code", "used"], registry=r)
        self.policy_reloads = Counter(
            "rbee_policy_reloads", "Policy changes by origin and result",
            ["origin", "result"], registry=r)
        self.queue_depth = Gauge("rbee_queue_depth", "Jobs waiting to be scheduled", registry=r)
        self.in_flight = Gauge(
            "rbee_worker_in_flight", "Requests in flight per worker", ["worker"], registry=r)
        self.upstream_seconds = Histogram(
            "rbee_upstream_seconds", "Upstream request duration", ["worker"],
            buckets=_UPSTREAM_BUCKETS, registry=r)
        self.upstream_ttft_seconds = Histogram(
            "rbee_upstream_ttft_seconds", "Upstream time to first byte", ["worker"],
            buckets=_UPSTREAM_BUCKETS, registry=r)
        self.upstream_failures = Counter(
            "rbee_upstream_failures", "Upstream failures by worker and stage",
            ["worker", "stage"], registry=r)
        self.tokens = Counter(
            "rbee_tokens", "Tokens by worker and kind", ["worker", "kind"], registry=r)
        self.tenant_seconds = Histogram(
            "rbee_tenant_request_seconds", "Request duration per tenant", ["tenant"],
            buckets=_UPSTREAM_BUCKETS, registry=r)
        self.tenant_rejections = Counter(
            "rbee_tenant_rejections", "Refused requests per tenant and code",
            ["tenant", "code"], registry=r)
        self.tenant_tokens = Counter(
            "rbee_tenant_tokens", "Tokens used per tenant", ["tenant"], registry=r)
        self.requests = Counter(
            "rbee_requests", "Requests answered by endpoint and status",
            ["endpoint", "status"], registry=r)

        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: prometheus_client looks the
        child up under a lock on every call, a cost paid on every request."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def count_request(self, endpoint: str, status: int) -> None:
        self.child(self.requests, endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
