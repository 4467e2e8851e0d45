"""A realistic cluster for the sandbox, template and fallback tests.

Five pools (Amsterdam, Frankfurt, Paris, New York, San Francisco), ten workers
on cuda/rocm/metal/cpu with text-gen and image-gen capabilities, a model
catalogue with aliases and tenants with quotas. Every expected decision in the
tests is worked out by hand from the tables below, so change them only
together with those tests.

Worker table (load = active / slots; only ready and busy workers are eligible):

    id            status    backend cap        gpus slots act load  vram  cost/token
    ams-4090      ready     cuda    text-gen   1    4     1   .25   14G   2e-7
    ams-h100x8    down      cuda    text-gen   8    8     0   0     600G  0
    ams-sdxl      busy      cuda    image-gen  1    2     1   .5    6G    4e-7
    fra-a100x4    busy      cuda    text-gen   4    8     4   .5    120G  1.5e-6
    fra-sdxl      ready     cuda    image-gen  1    4     1   .25   9G    6e-7
    nyc-mi210x2   busy      rocm    text-gen   2    8     2   .25   40G   9e-7
    nyc-spare     starting  cpu     text-gen   2    4     0   0     0     0
    par-mac       ready     metal   text-gen   1    2     0   0     40G   1e-7
    par-rocm-sd   ready     rocm    image-gen  1    2     0   0     12G   3e-7
    sfo-cpu       ready     cpu     text-gen   0    8     0   0     0     5e-8
"""

from __future__ import annotations

import copy
from typing import Any

from rbee.scheduler import Policy

GIB = 1024**3
MIB = 1024**2
NOW_MS = 1_765_000_000_000

# (latitude, longitude)
AMSTERDAM = (52.3676, 4.9041)
FRANKFURT = (50.1109, 8.6821)
PARIS = (48.8566, 2.3522)
NEW_YORK = (40.7128, -74.0060)
SAN_FRANCISCO = (37.7749, -122.4194)
# Where users are.
LONDON = (51.5074, -0.1278)
BERLIN = (52.52, 13.405)
BRUSSELS = (50.8503, 4.3517)
BOSTON = (42.3601, -71.0589)
LOS_ANGELES = (34.0522, -118.2437)

LLAMA_8B = "llama-3.1-8b-instruct"
LLAMA_70B = "llama-3.1-70b-instruct"
SDXL = "sdxl"


def geo(region: str, country: str, where: tuple[float, float]) -> dict[str, Any]:
    return {"region": region, "country": country, "latitude": where[0], "longitude": where[1]}


EU_NL = geo("EU", "NL", AMSTERDAM)
EU_DE = geo("EU", "DE", FRANKFURT)
EU_FR = geo("EU", "FR", PARIS)
US_NY = geo("US", "US", NEW_YORK)
US_CA = geo("US", "US", SAN_FRANCISCO)


def worker(
    wid: str,
    *,
    status: str,
    backend: str,
    capability: str,
    model: str,
    gpus: int,
    slots: int,
    active: int,
    vram_free: int,
    cost: float,
    tokens_per_sec: float,
    latency_ms: float,
    where: dict[str, Any],
) -> dict[str, Any]:
    pool = wid.split("-", 1)[0]
    return {
        "id": wid,
        "pool": pool,
        "url": f"http://{pool}.lan:8080/v1",
        "status": status,
        "model": model,
        "models": [model],
        "capability": capability,
        "backend": backend,
        "gpus": gpus,
        "gpu_ids": [f"{pool}/{i}" for i in range(gpus)],
        "vram_total": vram_free + 8 * GIB if gpus else 0,
        "vram_free": vram_free,
        "slots": slots,
        "active": active,
        "tokens_per_sec": tokens_per_sec,
        "latency_ms": latency_ms,
        "cost_per_token": cost,
        "geo": dict(where),
        "labels": {},
        "last_used_at": NOW_MS - 60_000,
    }


WORKERS = [
    worker("ams-4090", status="ready", backend="cuda", capability="text-gen",
           model=LLAMA_8B, gpus=1, slots=4, active=1, vram_free=14 * GIB, cost=2e-7,
           tokens_per_sec=110.0, latency_ms=60, where=EU_NL),
    worker("ams-h100x8", status="down", backend="cuda", capability="text-gen",
           model=LLAMA_70B, gpus=8, slots=8, active=0, vram_free=600 * GIB, cost=0.0,
           tokens_per_sec=200.0, latency_ms=50, where=EU_NL),
    worker("ams-sdxl", status="busy", backend="cuda", capability="image-gen",
           model=SDXL, gpus=1, slots=2, active=1, vram_free=6 * GIB, cost=4e-7,
           tokens_per_sec=2.0, latency_ms=300, where=EU_NL),
    worker("fra-a100x4", status="busy", backend="cuda", capability="text-gen",
           model=LLAMA_70B, gpus=4, slots=8, active=4, vram_free=120 * GIB, cost=1.5e-6,
           tokens_per_sec=40.0, latency_ms=200, where=EU_DE),
    worker("fra-sdxl", status="ready", backend="cuda", capability="image-gen",
           model=SDXL, gpus=1, slots=4, active=1, vram_free=9 * GIB, cost=6e-7,
           tokens_per_sec=2.5, latency_ms=250, where=EU_DE),
    worker("nyc-mi210x2", status="busy", backend="rocm", capability="text-gen",
           model=LLAMA_70B, gpus=2, slots=8, active=2, vram_free=40 * GIB, cost=9e-7,
           tokens_per_sec=30.0, latency_ms=250, where=US_NY),
    worker("nyc-spare", status="starting", backend="cpu", capability="text-gen",
           model=LLAMA_8B, gpus=2, slots=4, active=0, vram_free=0, cost=0.0,
           tokens_per_sec=5.0, latency_ms=1000, where=US_NY),
    worker("par-mac", status="ready", backend="metal", capability="text-gen",
           model=LLAMA_8B, gpus=1, slots=2, active=0, vram_free=40 * GIB, cost=1e-7,
           tokens_per_sec=35.0, latency_ms=150, where=EU_FR),
    worker("par-rocm-sd", status="ready", backend="rocm", capability="image-gen",
           model=SDXL, gpus=1, slots=2, active=0, vram_free=12 * GIB, cost=3e-7,
           tokens_per_sec=1.5, latency_ms=400, where=EU_FR),
    worker("sfo-cpu", status="ready", backend="cpu", capability="text-gen",
           model=LLAMA_8B, gpus=0, slots=8, active=0, vram_free=0, cost=5e-8,
           tokens_per_sec=8.0, latency_ms=900, where=US_CA),
]

#: Workers a policy may pick (status ready or busy), in id order.
ELIGIBLE = ["ams-4090", "ams-sdxl", "fra-a100x4", "fra-sdxl", "nyc-mi210x2",
            "par-mac", "par-rocm-sd", "sfo-cpu"]


def _pool(pid: str, where: dict[str, Any], gpus: list[tuple[str, str, int]]) -> dict[str, Any]:
    return {
        "id": pid,
        "url": f"http://{pid}.lan:9200",
        "status": "healthy",
        "last_heartbeat_ms": 500,
        "gpus": [
            {"index": i, "name": name, "backend": backend, "vram_total": total * GIB,
             "vram_free": total * GIB // 2, "vram_allocated": total * GIB // 2,
             "utilization": 0.5, "temperature": 60}
            for i, (name, backend, total) in enumerate(gpus)
        ],
        "workers": [w["id"] for w in WORKERS if w["pool"] == pid],
        "geo": dict(where),
        "labels": {},
    }


POOLS = [
    _pool("ams", EU_NL, [("NVIDIA GeForce RTX 4090", "cuda", 24)]
          + [("NVIDIA H100", "cuda", 80)] * 8),
    _pool("fra", EU_DE, [("NVIDIA A100", "cuda", 80)] * 4),
    _pool("nyc", US_NY, [("AMD Instinct MI210", "rocm", 64)] * 2),
    _pool("par", EU_FR, [("Apple M2 Ultra", "metal", 64)]),
    _pool("sfo", US_CA, []),
]

MODELS = [
    {"id": LLAMA_8B, "aliases": ["llama3-8b"], "size_bytes": 4_920_734_720,
     "vram_required": 6 * GIB, "context_length": 131_072, "family": "llama",
     "quantization": "q4_k_m", "capability": "text-gen"},
    {"id": LLAMA_70B, "aliases": ["llama3-70b"], "size_bytes": 42_520_395_776,
     "vram_required": 48 * GIB, "context_length": 131_072, "family": "llama",
     "quantization": "q4_k_m", "capability": "text-gen"},
    {"id": SDXL, "aliases": ["stable-diffusion-xl"], "size_bytes": 6_938_078_335,
     "vram_required": 8 * GIB, "family": "stable-diffusion", "capability": "image-gen"},
]

TENANTS = [
    # Well within quota.
    {"id": "acme", "name": "Acme", "weight": 3,
     "quota": {"tokens_per_day": 1_000_000, "max_concurrent": 8, "requests_per_minute": 600},
     "usage": {"tokens_today": 250_000, "concurrent": 3, "requests_last_minute": 42}},
    # Used more tokens today than its quota allows.
    {"id": "globex", "name": "Globex", "weight": 1,
     "quota": {"tokens_per_day": 100_000, "max_concurrent": 2},
     "usage": {"tokens_today": 120_000, "concurrent": 1}},
    # Every concurrent slot in use.
    {"id": "hooli", "name": "Hooli", "weight": 1,
     "quota": {"tokens_per_day": 1_000_000, "max_concurrent": 4},
     "usage": {"tokens_today": 10, "concurrent": 4}},
    # The queen says so explicitly.
    {"id": "initech", "name": "Initech", "weight": 2,
     "quota": {"tokens_per_day": 500_000}, "usage": {"tokens_today": 10},
     "over_quota": True},
    # No quota at all.
    {"id": "umbrella", "name": "Umbrella"},
]


def cluster() -> dict[str, Any]:
    """A fresh deep copy of the whole cluster, safe to modify in a test."""
    return copy.deepcopy({
        "workers": WORKERS, "pools": POOLS, "models": MODELS, "tenants": TENANTS,
        "queue": [], "now": NOW_MS,
    })


def cluster_with(**changes: dict[str, Any]) -> dict[str, Any]:
    """The cluster with some workers changed: ``cluster_with(par_mac={"active": 2})``
    (dashes in ids are written as underscores); ``None`` removes the worker."""
    state = cluster()
    for key, change in changes.items():
        wid = key.replace("_", "-")
        index = next(i for i, w in enumerate(state["workers"]) if w["id"] == wid)
        if change is None:
            del state["workers"][index]
        else:
            state["workers"][index].update(change)
    return state


def make_job(**fields: Any) -> dict[str, Any]:
    """A text-gen chat job from an Amsterdam user of tenant acme."""
    job = {
        "id": "job-1", "type": "text-gen", "endpoint": "chat.completions",
        "model": LLAMA_8B, "priority": "normal", "tenant_id": "acme",
        "user": {"id": "u-1", "geo": geo("EU", "NL", AMSTERDAM)},
        "deadline": None, "max_tokens": 256, "prompt_tokens": 100,
        "session_id": "s-1", "stream": False, "tags": {}, "created_at": NOW_MS,
        "wait_ms": 0, "attempts": 0,
    }
    job.update(fields)
    return job


def user_at(where: tuple[float, float], region: str = "EU") -> dict[str, Any]:
    return {"id": "u-2", "geo": {"latitude": where[0], "longitude": where[1],
                                 "region": region, "country": "XX"}}


def schedule_fn(body: str, extra: str = "") -> str:
    """A policy source whose schedule_job runs ``body``."""
    return f"{extra}fn schedule_job(job, pools, workers) {{\n{body}\n}}\n"


def policy(body: str, *, extra: str = "", **kw: Any) -> Policy:
    return Policy.from_source(schedule_fn(body, extra), **kw)
