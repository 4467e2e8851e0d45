"""The workload of bench/bench_engine.py: seeded synthetic clusters and jobs,
and the two seed policies written by hand in Python over the same data, the
reference the engine is compared with."""

from __future__ import annotations

import random
from typing import Any, Callable

GIB = 1 << 30

# --------------------------------------------------------------------------
# Synthetic cluster


REGIONS = (
    ("eu-west", "IE", 53.35, -6.26),
    ("eu-central", "DE", 50.11, 8.68),
    ("us-east", "US", 39.04, -77.49),
    ("us-west", "US", 45.52, -122.68),
    ("ap-south", "IN", 19.08, 72.88),
)
MODELS = {
    "text-gen": ("llama-3-8b", "llama-3-70b", "mixtral-8x7b", "qwen2-72b"),
    "image-gen": ("sdxl", "flux-dev"),
    "embedding": ("bge-large",),
}
STATUSES = ("starting", "draining", "down")


def make_workers(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` workers in id order, the same for the same ``n`` and ``seed``.

    Every worker has every field the policies read, so the Python reference
    never meets a missing key (the engine's rules for ``()`` are not what
    is being measured). About 7% are not ready or busy, so the engine's
    eligibility filter has something to do.
    """
    rng = random.Random(f"{seed}:{n}")
    workers = []
    for i in range(1, n + 1):
        backend = rng.choices(("cuda", "rocm", "metal", "cpu"), (50, 20, 15, 15))[0]
        capability = rng.choices(tuple(MODELS), (60, 25, 15))[0]
        if backend == "metal":
            gpus, vram_total = 1, rng.choice((64, 128, 192)) * GIB
        elif backend == "cpu":
            gpus, vram_total = 0, 0
        else:
            gpus = rng.choice((1, 1, 2, 2, 4, 8))
            vram_total = gpus * rng.choice((24, 48, 80)) * GIB
        slots = rng.choice((1, 2, 4, 8, 16))
        active = rng.randint(0, slots)
        status = "busy" if active == slots else "ready"
        if rng.random() < 0.07:
            status = rng.choice(STATUSES)
        region, country, lat, lon = rng.choice(REGIONS)
        pool = f"pool-{(i - 1) // 8 + 1:04d}"
        speed = 0.2 if backend == "cpu" else 1.0
        workers.append({
            "id": f"w{i:05d}",
            "pool": pool,
            "url": f"http://{pool}.lan:{8000 + i % 8}",
            "status": status,
            "model": rng.choice(MODELS[capability]),
            "capability": capability,
            "backend": backend,
            "gpus": gpus,
            "gpu_ids": [f"{pool}/{g}" for g in range(gpus)],
            "vram_total": vram_total,
            "vram_free": int(vram_total * rng.uniform(0.0, 0.9)),
            "slots": slots,
            "active": active,
            # Two decimals of a dollar per million tokens: coarse enough that
            # ties happen at 1,000+ workers and the id tie-break is exercised.
            "cost_per_token": round(rng.uniform(0.05, 2.0), 2) / 1e6,
            "latency_ms": rng.randint(20, 400),
            "tokens_per_sec": round(rng.uniform(15.0, 250.0) * speed, 1),
            "geo": {
                "region": region,
                "country": country,
                "latitude": lat + rng.uniform(-1, 1),
                "longitude": lon + rng.uniform(-1, 1),
            },
            "labels": {"tier": rng.choice(("gold", "silver", "bronze"))},
            "last_used_at": 1_760_000_000_000 - rng.randint(0, 3_600_000),
        })
    return workers


def make_pools(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pools: dict[str, dict[str, Any]] = {}
    for w in workers:
        pool = pools.setdefault(w["pool"], {
            "id": w["pool"],
            "url": f"http://{w['pool']}.lan:9200",
            "status": "healthy",
            "last_heartbeat_ms": 500,
            "geo": w["geo"],
            "workers": [],
        })
        pool["workers"].append(w["id"])
    return list(pools.values())


def make_jobs() -> list[tuple[str, dict[str, Any]]]:
    """The job mix: (label, job). Labels name the router branch taken and,
    for the cost optimizer, whether any worker can meet the deadline."""

    def job(n: int, kind: str, model: str, priority: str, max_tokens: int,
            deadline: int, endpoint: str) -> dict[str, Any]:
        return {
            "id": f"job-{n:04d}",
            "type": kind,
            "endpoint": endpoint,
            "model": model,
            "priority": priority,
            "tenant_id": f"tenant-{n % 3}",
            "user": {"id": f"user-{n}", "geo": {"region": "eu-west", "country": "IE",
                                                 "latitude": 53.3, "longitude": -6.2}},
            "deadline": deadline,
            "max_tokens": max_tokens,
            "prompt_tokens": 40 * n,
            "session_id": f"s-{n}",
            "stream": kind == "text-gen",
            "tags": {"app": "bench"},
            "created_at": 1_760_000_000_000,
            "wait_ms": 0,
            "attempts": 0,
        }

    chat, images, embed = "chat.completions", "images.generations", "embeddings"
    return [
        ("image-gen high", job(1, "image-gen", "sdxl", "high", 64, 8_000, images)),
        ("image-gen high", job(2, "image-gen", "flux-dev", "high", 64, 3_000, images)),
        ("text-gen 70b", job(3, "text-gen", "llama-3-70b", "normal", 1_024, 60_000, chat)),
        ("text-gen 70b", job(4, "text-gen", "llama-3.1-70b-instruct", "batch", 4_096,
                             600_000, chat)),
        ("other: text-gen 8b", job(5, "text-gen", "llama-3-8b", "interactive", 256,
                                   4_000, chat)),
        ("other: embedding", job(6, "embedding", "bge-large", "normal", 1, 500, embed)),
        ("other: image-gen normal", job(7, "image-gen", "sdxl", "normal", 64, 20_000,
                                        images)),
        # No worker can produce 128 tokens in 40 ms: the cost optimizer's
        # reject branch.
        ("other: deadline too tight", job(8, "text-gen", "llama-3-8b", "high", 128,
                                          40, chat)),
    ]


# --------------------------------------------------------------------------
# The same policies, hand-written in Python


def python_state(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a Python scheduler would keep between decisions: the workers a
    policy may pick (ready or busy, in id order) with their load. State does
    the same work once, at conversion, so neither side pays it per decision."""
    eligible = []
    for w in workers:
        if w["status"] in ("ready", "busy"):
            w = dict(w, load=w["active"] / w["slots"] if w["slots"] > 0 else 1.0)
            eligible.append(w)
    eligible.sort(key=lambda w: w["id"])
    return eligible


def estimated_time(w: dict[str, Any], max_tokens: float) -> float | None:
    """Milliseconds to finish a job on ``w``, computed step for step as the
    engine does (``Rec::estimate`` in src/record.rs), so floats compare equal."""
    tps = w.get("tokens_per_sec")
    if tps is None or tps <= 0:
        return None
    service = float(w.get("latency_ms", 0)) + max_tokens / float(tps) * 1000.0
    slots = max(float(w.get("slots", 1)), 1.0)
    ahead = max(float(w.get("active", 0)) - slots + 1.0, 0.0)
    return ahead * service / slots + service


def py_multi_modal_router(job: dict[str, Any], workers: list[dict[str, Any]]) -> tuple:
    if job["type"] == "image-gen" and job["priority"] == "high":
        gpus = [w for w in workers if w["capability"] == "image-gen" and w["backend"] == "cuda"]
        if not gpus:
            return ("wait", "no_worker")
        # least_loaded(): lowest load, then most free VRAM, then smallest id.
        best = min(gpus, key=lambda w: (w["load"], -w["vram_free"], w["id"]))
        return ("dispatch", best["id"])
    if job["type"] == "text-gen" and "70b" in job["model"]:
        for w in workers:
            if w["gpus"] > 1:
                return ("dispatch", w["id"])
        return ("wait", "no_worker")
    if not workers:
        return ("wait", "no_worker")
    best = min(workers, key=lambda w: (w["cost_per_token"], w["id"]))
    return ("dispatch", best["id"])


def py_cost_optimizer(job: dict[str, Any], workers: list[dict[str, Any]]) -> tuple:
    max_tokens = float(job.get("max_tokens", 256))
    deadline = job.get("deadline")
    ok = []
    for w in workers:
        estimate = estimated_time(w, max_tokens)
        if estimate is not None and deadline is not None and estimate < deadline:
            ok.append(w)
    if not ok:
        return ("reject", "no_workers_meet_deadline")
    best = min(ok, key=lambda w: (w["cost_per_token"], w["id"]))
    return ("dispatch", best["id"])


PYTHON_POLICIES: dict[str, Callable[[dict, list], tuple]] = {
    "multi-modal-router": py_multi_modal_router,
    "cost-optimizer": py_cost_optimizer,
}


def outcome(decision: Any) -> tuple:
    target = decision.worker_id if decision.kind == "dispatch" else decision.reason
    return (decision.kind, target)
