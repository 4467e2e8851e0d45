"""Shared fixtures: a realistic home/lab cluster and small helpers to run policies.

The cluster has four pools (Amsterdam, Paris, New York, San Francisco), GPUs
named "<pool>/<index>", workers on cuda/rocm/metal/cpu in regions EU and US, a
models catalogue with aliases and a few tenants with quotas.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from rbee.scheduler import Decision, Policy, State

GIB = 1024**3

AMSTERDAM = {"latitude": 52.3676, "longitude": 4.9041}
PARIS = {"latitude": 48.8566, "longitude": 2.3522}
NEW_YORK = {"latitude": 40.7128, "longitude": -74.0060}
SAN_FRANCISCO = {"latitude": 37.7749, "longitude": -122.4194}

NOW_MS = 1_760_000_000_000


def geo(region: str, country: str, where: dict) -> dict:
    return {"region": region, "country": country, **where}


POOLS = [
    {
        "id": "ams",
        "url": "http://10.0.0.10:9200",
        "status": "healthy",
        "last_heartbeat_ms": 400,
        "gpus": [
            {"index": 0, "name": "NVIDIA GeForce RTX 4090", "backend": "cuda",
             "vram_total": 24 * GIB, "vram_free": 16 * GIB, "vram_allocated": 8 * GIB,
             "utilization": 0.35, "temperature": 61},
            {"index": 1, "name": "NVIDIA GeForce RTX 3090", "backend": "cuda",
             "vram_total": 24 * GIB, "vram_allocated": 14 * GIB,
             "utilization": 0.0, "temperature": 38},
        ],
        "workers": ["ams-4090", "ams-sdxl", "ams-starting"],
        "geo": geo("EU", "NL", AMSTERDAM),
        "labels": {"room": "office"},
    },
    {
        "id": "par",
        "url": "http://10.0.1.10:9200",
        "status": "healthy",
        "last_heartbeat_ms": 900,
        "gpus": [
            {"index": 0, "name": "Apple M2 Ultra", "backend": "metal",
             "vram_total": 64 * GIB, "vram_free": 40 * GIB, "vram_allocated": 24 * GIB,
             "utilization": 0.5, "temperature": 48},
        ],
        "workers": ["par-mac", "par-draining"],
        "geo": geo("EU", "FR", PARIS),
        "labels": {},
    },
    {
        "id": "nyc",
        "url": "http://10.1.0.10:9200",
        "status": "degraded",
        "last_heartbeat_ms": 2500,
        "gpus": [
            {"index": 0, "name": "AMD Instinct MI210", "backend": "rocm",
             "vram_total": 64 * GIB, "vram_free": 20 * GIB, "vram_allocated": 44 * GIB,
             "utilization": 0.8, "temperature": 71},
            {"index": 1, "name": "AMD Instinct MI210", "backend": "rocm",
             "vram_total": 64 * GIB, "vram_free": 20 * GIB, "vram_allocated": 44 * GIB,
             "utilization": 0.75, "temperature": 69},
        ],
        "workers": ["nyc-70b", "nyc-down"],
        "geo": geo("US", "US", NEW_YORK),
        "labels": {"rack": "b2"},
    },
    {
        "id": "sfo",
        "url": "http://10.2.0.10:9200",
        "status": "healthy",
        "last_heartbeat_ms": 300,
        "gpus": [],
        "workers": ["sfo-cpu"],
        "geo": geo("US", "US", SAN_FRANCISCO),
        "labels": {},
    },
]

WORKERS = [
    {
        "id": "ams-4090", "pool": "ams", "url": "http://10.0.0.10:8080/v1",
        "status": "busy", "model": "llama-3.1-8b-instruct",
        "models": ["llama-3.1-8b-instruct"], "capability": "text-gen",
        "backend": "cuda", "gpus": 1, "gpu_ids": ["ams/0"],
        "vram_total": 24 * GIB, "vram_free": 16 * GIB, "slots": 4, "active": 1,
        "tokens_per_sec": 120.0, "latency_ms": 80, "cost_per_token": 0.0000002,
        "geo": geo("EU", "NL", AMSTERDAM), "labels": {"room": "office"},
        "last_used_at": NOW_MS - 1_000, "priority": 5,
    },
    {
        "id": "ams-sdxl", "pool": "ams", "url": "http://10.0.0.10:8081/v1",
        "status": "ready", "model": "sdxl", "models": ["sdxl"],
        "capability": "image-gen", "backend": "cuda", "gpus": 1, "gpu_ids": [1],
        "vram_total": 24 * GIB, "vram_free": 10 * GIB, "slots": 2, "active": 0,
        "tokens_per_sec": 2.0, "latency_ms": 400, "cost_per_token": 0.0000005,
        "geo": geo("EU", "NL", AMSTERDAM), "labels": {},
        "last_used_at": NOW_MS - 600_000, "priority": 3,
    },
    {
        "id": "ams-starting", "pool": "ams", "status": "starting",
        "model": "llama-3.1-8b-instruct", "capability": "text-gen", "backend": "cuda",
        "gpus": 1, "gpu_ids": ["ams/1"], "vram_total": 24 * GIB, "vram_free": 24 * GIB,
        "slots": 4, "active": 0, "cost_per_token": 0.00000001,
        "geo": geo("EU", "NL", AMSTERDAM), "last_used_at": 0,
    },
    {
        "id": "nyc-70b", "pool": "nyc", "url": "http://10.1.0.10:8080/v1",
        "status": "busy", "model": "llama-3.1-70b-instruct",
        "models": ["llama-3.1-70b-instruct"], "capability": "text-gen",
        "backend": "rocm", "gpus": 2, "gpu_ids": ["nyc/0", "nyc/1"],
        "vram_total": 128 * GIB, "vram_free": 40 * GIB, "slots": 8, "active": 2,
        "tokens_per_sec": 30.0, "latency_ms": 250, "cost_per_token": 0.0000009,
        "geo": geo("US", "US", NEW_YORK), "labels": {"rack": "b2"},
        "last_used_at": NOW_MS - 5_000, "priority": 9,
    },
    {
        "id": "nyc-down", "pool": "nyc", "status": "down", "model": "llama-3.1-8b-instruct",
        "capability": "text-gen", "backend": "rocm", "gpus": 1, "gpu_ids": ["nyc/1"],
        "vram_free": 64 * GIB, "slots": 4, "active": 0, "cost_per_token": 0.0,
        "geo": geo("US", "US", NEW_YORK), "last_used_at": 1,
    },
    {
        "id": "par-draining", "pool": "par", "status": "draining",
        "model": "llama-3.1-8b-instruct", "capability": "text-gen", "backend": "metal",
        "gpus": 1, "gpu_ids": ["par/0"], "vram_free": 40 * GIB, "slots": 2, "active": 0,
        "cost_per_token": 0.00000001, "geo": geo("EU", "FR", PARIS), "last_used_at": 2,
    },
    {
        "id": "par-mac", "pool": "par", "url": "http://10.0.1.10:8080/v1",
        "status": "ready", "model": "llama-3.1-8b-instruct",
        "models": ["llama-3.1-8b-instruct", "nomic-embed-text"], "capability": "text-gen",
        "backend": "metal", "gpus": 1, "gpu_ids": ["par/0"],
        "vram_total": 64 * GIB, "vram_free": 40 * GIB, "slots": 2, "active": 1,
        "tokens_per_sec": 45.0, "latency_ms": 120, "cost_per_token": 0.0000001,
        "geo": geo("EU", "FR", PARIS), "labels": {},
        "last_used_at": NOW_MS - 60_000, "priority": 5,
    },
    {
        "id": "sfo-cpu", "pool": "sfo", "url": "http://10.2.0.10:8080/v1",
        "status": "ready", "model": "nomic-embed-text", "models": ["nomic-embed-text"],
        "capability": "embedding", "backend": "cpu", "gpus": 0, "gpu_ids": [],
        "vram_total": 0, "vram_free": 0, "slots": 4, "active": 0,
        "tokens_per_sec": 500.0, "latency_ms": 30, "cost_per_token": 0.00000005,
        "geo": geo("US", "US", SAN_FRANCISCO), "labels": {},
        "last_used_at": NOW_MS - 3_600_000, "priority": 1,
    },
]

#: The ids of the workers a policy may pick (status ready or busy), in id order.
ELIGIBLE = ["ams-4090", "ams-sdxl", "nyc-70b", "par-mac", "sfo-cpu"]

MODELS = [
    {"id": "llama-3.1-8b-instruct", "aliases": ["llama3-8b", "llama3.1:8b"],
     "size_bytes": 4_920_734_720, "vram_required": 6_442_450_944,
     "context_length": 131_072, "family": "llama", "quantization": "q4_k_m",
     "capability": "text-gen"},
    {"id": "llama-3.1-70b-instruct", "aliases": ["llama3-70b"],
     "size_bytes": 42_520_395_776, "vram_required": 48 * GIB,
     "context_length": 131_072, "family": "llama", "quantization": "q4_k_m",
     "capability": "text-gen"},
    {"id": "sdxl", "aliases": ["stable-diffusion-xl"], "size_bytes": 6_938_078_335,
     "family": "stable-diffusion", "capability": "image-gen"},
    {"id": "nomic-embed-text", "aliases": ["nomic"], "size_bytes": 274_290_656,
     "vram_required": 512 * 1024**2, "context_length": 8192, "family": "nomic-bert",
     "capability": "embedding"},
]

TENANTS = [
    {"id": "acme", "name": "Acme Corp", "weight": 3,
     "quota": {"tokens_per_day": 1_000_000, "max_concurrent": 8,
               "requests_per_minute": 600},
     "usage": {"tokens_today": 250_000, "concurrent": 3, "requests_last_minute": 42}},
    {"id": "globex", "name": "Globex", "weight": 1,
     "quota": {"tokens_per_day": 100_000, "max_concurrent": 2},
     "usage": {"tokens_today": 120_000, "concurrent": 1}},
    {"id": "initech", "name": "Initech", "weight": 2,
     "quota": {"tokens_per_day": 500_000},
     "usage": {"tokens_today": 10, "concurrent": 0}, "over_quota": True},
    {"id": "umbrella", "name": "Umbrella (no quota)"},
]

QUEUE = [
    {"id": "q-1", "type": "text-gen", "model": "llama-3.1-8b-instruct",
     "priority": "batch", "tenant_id": "acme", "max_tokens": 512},
    {"id": "q-2", "type": "image-gen", "model": "sdxl", "priority": "normal",
     "tenant_id": "globex", "max_tokens": 1},
    {"id": "q-3", "type": "embedding", "model": "nomic", "priority": "low",
     "tenant_id": "acme", "max_tokens": 0},
]


def cluster_snapshot() -> dict[str, Any]:
    """A fresh deep copy of the whole cluster, safe to modify in a test."""
    return copy.deepcopy({
        "workers": WORKERS, "pools": POOLS, "models": MODELS,
        "tenants": TENANTS, "queue": QUEUE, "now": NOW_MS,
    })


def make_job(**fields: Any) -> dict[str, Any]:
    job = {
        "id": "job-42", "type": "text-gen", "endpoint": "chat.completions",
        "model": "llama-3.1-8b-instruct", "priority": "interactive",
        "tenant_id": "acme",
        "user": {"id": "u-1", "geo": geo("EU", "NL", AMSTERDAM)},
        "deadline": 5_000, "max_tokens": 256, "prompt_tokens": 120,
        "session_id": "sess-7", "stream": True, "tags": {"team": "research"},
        "created_at": NOW_MS - 20, "wait_ms": 20, "attempts": 0,
    }
    job.update(fields)
    return job


def policy_of(body: str, *, extra: str = "") -> Policy:
    """A policy whose schedule_job has ``body``; ``extra`` adds functions."""
    return Policy.from_source(f"{extra}\nfn schedule_job(job, pools, workers) {{\n{body}\n}}\n")


def run(body: str, state: Any = None, job: dict | None = None, **kw: Any) -> Decision:
    """Decides ``make_job()`` (or ``job``) with a one-off policy."""
    if state is None:
        state = cluster_snapshot()
    return policy_of(body, extra=kw.pop("extra", "")).decide(job or make_job(), state, **kw)


def probe(expr: str, state: Any = None, job: dict | None = None, **kw: Any) -> Any:
    """The value of a Rhai expression inside a decision, as JSON-decoded data.

    The expression is evaluated in schedule_job (so `job`, `workers` and every
    helper are available) and logged as JSON; the decision itself waits.
    """
    body = f"let __v = {{ {expr} }};\nlog(#{{v: __v}}.to_json());\n()"
    decision = run(body, state, job, **kw)
    assert decision.kind == "wait", decision
    return json.loads(decision.logs[-1])["v"]


def ids(expr: str, state: Any = None, job: dict | None = None, **kw: Any) -> list[str]:
    """The ids of an array of workers an expression yields."""
    return probe(f"({expr}).map(|w| w.id)", state, job, **kw)


def pick(expr: str, state: Any = None, job: dict | None = None, **kw: Any) -> str | None:
    """The id of the worker a selection expression yields, or None for `()`."""
    return probe(f"let w = {{ {expr} }}; if type_of(w) == \"()\" {{ () }} else {{ w.id }}",
                 state, job, **kw)


@pytest.fixture
def snapshot() -> dict[str, Any]:
    return cluster_snapshot()


@pytest.fixture
def state(snapshot: dict[str, Any]) -> State:
    return State(snapshot)


@pytest.fixture
def job() -> dict[str, Any]:
    return make_job()
