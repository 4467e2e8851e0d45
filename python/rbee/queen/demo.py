"""The simulated cluster behind `rbee queen --demo`.

Eight fake workers on loopback, spread over five made-up machines (pools) in
Europe and the US, with the kinds of hardware a home lab or a small team has: a
gaming PC, a dual-GPU workstation, a Mac, a rented cloud GPU and an old laptop.
They differ in speed, price, place and models, so that scheduling policies have
real choices to make. Everything here is labelled simulated (the `simulated`
label on pools and workers, "(simulated)" in GPU names and in the pools' `name`
label), so nobody mistakes the demo for hardware.

The shapes follow DESIGN 2.2 and 5: `DemoCluster.workers` are entries of the
configuration's `workers:`, `models` of its `models:`, and `pools` the pool maps
(with their GPU maps) that a script sees.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from .fakeworker import FakeWorker

__all__ = ["DemoCluster", "start_demo_cluster", "SIMULATED_LABEL"]

GIB = 1024**3
MIB = 1024**2
SIMULATED_LABEL = {"simulated": "true"}


def _geo(region: str, country: str, latitude: float, longitude: float) -> dict[str, Any]:
    return {"region": region, "country": country, "latitude": latitude, "longitude": longitude}


# The models catalogue (sizes are those of common GGUF/safetensors builds).
_MODELS: list[dict[str, Any]] = [
    {"id": "llama-3.1-8b-instruct", "aliases": ["llama3-8b", "llama3.1:8b"],
     "size_bytes": 4_920_734_720, "vram_required": 6 * GIB, "context_length": 131_072,
     "family": "llama", "quantization": "q4_k_m", "capability": "text-gen"},
    {"id": "llama-3.1-70b-instruct", "aliases": ["llama3-70b", "llama3.1:70b"],
     "size_bytes": 42_520_395_776, "vram_required": 46 * GIB, "context_length": 131_072,
     "family": "llama", "quantization": "q4_k_m", "capability": "text-gen"},
    {"id": "qwen2.5-32b-instruct", "aliases": ["qwen2.5:32b"],
     "size_bytes": 19_851_336_256, "vram_required": 22 * GIB, "context_length": 32_768,
     "family": "qwen", "quantization": "q4_k_m", "capability": "text-gen"},
    {"id": "llama-3.2-1b-instruct", "aliases": ["llama3.2:1b"],
     "size_bytes": 807_694_464, "vram_required": 1536 * MIB, "context_length": 131_072,
     "family": "llama", "quantization": "q4_k_m", "capability": "text-gen"},
    {"id": "sdxl-turbo", "aliases": ["sdxl"],
     "size_bytes": 6_938_078_335, "vram_required": 8 * GIB, "context_length": None,
     "family": "stable-diffusion", "quantization": "fp16", "capability": "image-gen"},
    {"id": "nomic-embed-text", "aliases": ["nomic-embed-text-v1.5", "nomic"],
     "size_bytes": 274_290_656, "vram_required": 512 * MIB, "context_length": 8192,
     "family": "nomic-bert", "quantization": "f16", "capability": "embedding"},
]

# Pools: name, place, and GPUs as (device name, backend, VRAM, utilization, °C).
_POOLS: list[dict[str, Any]] = [
    {"id": "gaming-pc", "name": "Gaming PC, Amsterdam (simulated)",
     "geo": _geo("EU", "NL", 52.3676, 4.9041), "labels": {"site": "home"},
     "gpus": [("NVIDIA GeForce RTX 4090", "cuda", 24 * GIB, 0.35, 58)]},
    {"id": "workstation", "name": "Workstation, Frankfurt (simulated)",
     "geo": _geo("EU", "DE", 50.1109, 8.6821), "labels": {"site": "office"},
     "gpus": [("NVIDIA GeForce RTX 3090", "cuda", 24 * GIB, 0.62, 67),
              ("NVIDIA GeForce RTX 3090", "cuda", 24 * GIB, 0.58, 64)]},
    {"id": "mac-studio", "name": "Mac Studio, San Francisco (simulated)",
     "geo": _geo("US", "US", 37.7749, -122.4194), "labels": {"site": "home"},
     "gpus": [("Apple M2 Ultra", "metal", 192 * GIB, 0.20, 45)]},
    {"id": "cloud-a100", "name": "Rented A100, Ashburn (simulated)",
     "geo": _geo("US", "US", 39.0438, -77.4874), "labels": {"site": "cloud"},
     "gpus": [("NVIDIA A100-SXM4-80GB", "cuda", 80 * GIB, 0.10, 41)]},
    {"id": "old-laptop", "name": "Old laptop, Lyon (simulated)",
     "geo": _geo("EU", "FR", 45.7640, 4.8357), "labels": {"site": "home"},
     "gpus": []},
]

# Workers: (id, pool, GPU indexes, models, capability, slots, $/token, TTFT ms, tok/s).
# Image and embedding workers have no meaningful token rate for the scheduler.
_WORKERS: list[tuple[str, str, list[int], list[str], str, int, float, float, float | None]] = [
    ("gaming-pc-llama8b", "gaming-pc", [0], ["llama-3.1-8b-instruct"], "text-gen",
     4, 0.0000001, 45.0, 110.0),
    ("gaming-pc-sdxl", "gaming-pc", [0], ["sdxl-turbo"], "image-gen",
     1, 0.0000004, 350.0, None),
    ("workstation-llama70b", "workstation", [0, 1], ["llama-3.1-70b-instruct"], "text-gen",
     2, 0.0000003, 220.0, 18.0),
    ("mac-studio-qwen32b", "mac-studio", [0], ["qwen2.5-32b-instruct", "llama-3.1-8b-instruct"],
     "text-gen", 2, 0.00000015, 150.0, 28.0),
    ("cloud-a100-llama70b", "cloud-a100", [0], ["llama-3.1-70b-instruct"], "text-gen",
     16, 0.000002, 70.0, 42.0),
    ("cloud-a100-llama8b", "cloud-a100", [0], ["llama-3.1-8b-instruct"], "text-gen",
     32, 0.0000008, 30.0, 160.0),
    ("old-laptop-llama1b", "old-laptop", [], ["llama-3.2-1b-instruct"], "text-gen",
     1, 0.00000002, 300.0, 12.0),
    ("old-laptop-embed", "old-laptop", [], ["nomic-embed-text"], "embedding",
     2, 0.00000001, 25.0, None),
]

# The fake's own rate for workers whose configuration states none.
_FALLBACK_TPS = 1000.0


@dataclass
class DemoCluster:
    """A running simulated cluster; `stop()` shuts every worker down."""

    workers: list[dict[str, Any]]
    pools: list[dict[str, Any]]
    models: list[dict[str, Any]]
    fakes: dict[str, FakeWorker] = field(default_factory=dict)

    async def stop(self) -> None:
        await asyncio.gather(*(fake.stop() for fake in self.fakes.values()))

    def config(self) -> dict[str, Any]:
        """The `workers:` and `models:` sections of a queen configuration."""
        return {"workers": self.workers, "models": self.models}


def _vram_use() -> dict[tuple[str, int], int]:
    """Bytes held on each GPU by the models its workers keep loaded; a model on
    several GPUs is split evenly between them."""
    need = {m["id"]: m["vram_required"] for m in _MODELS}
    used: dict[tuple[str, int], int] = {}
    for _wid, pool, indexes, models, *_rest in _WORKERS:
        for index in indexes:
            share = sum(need[m] for m in models) // len(indexes)
            used[(pool, index)] = used.get((pool, index), 0) + share
    return used


def _pools() -> list[dict[str, Any]]:
    used = _vram_use()
    pools = []
    for spec in _POOLS:
        pid = spec["id"]
        gpus = []
        for index, (name, backend, total, utilization, temperature) in enumerate(spec["gpus"]):
            allocated = used.get((pid, index), 0)
            gpus.append({"id": f"{pid}/{index}", "pool": pid, "index": index,
                         "name": f"{name} (simulated)", "backend": backend,
                         "vram_total": total, "vram_free": total - allocated,
                         "vram_allocated": allocated, "utilization": utilization,
                         "temperature": temperature})
        # Pools have no name field (DESIGN 2.2); the readable name is a label.
        pools.append({"id": pid, "geo": dict(spec["geo"]), "gpus": gpus,
                      "workers": [w[0] for w in _WORKERS if w[1] == pid],
                      "labels": {**SIMULATED_LABEL, **spec["labels"], "name": spec["name"]}})
    return pools


def _worker_config(spec: tuple[Any, ...], url: str, pools: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
    wid, pool_id, indexes, models, capability, slots, cost, ttft, tps = spec
    pool = pools[pool_id]
    gpus = [pool["gpus"][i] for i in indexes]
    backend = gpus[0]["backend"] if gpus else "cpu"
    return {
        "id": wid, "url": url, "pool": pool_id, "model": models[0], "models": list(models),
        "capability": capability, "backend": backend, "gpus": len(gpus),
        "gpu_ids": [g["id"] for g in gpus],
        "vram_total": sum(g["vram_total"] for g in gpus),
        "vram_free": sum(g["vram_free"] for g in gpus),
        "slots": slots, "cost_per_token": cost, "tokens_per_sec": tps, "latency_ms": ttft,
        "geo": dict(pool["geo"]),
        "labels": {**SIMULATED_LABEL, "site": pool["labels"]["site"]},
    }


async def start_demo_cluster(host: str = "127.0.0.1") -> DemoCluster:
    """Starts the simulated workers on loopback ports and describes them."""
    fakes = {spec[0]: FakeWorker(spec[0], list(spec[3]), capability=spec[4],
                                 ttft_ms=spec[7], tokens_per_sec=spec[8] or _FALLBACK_TPS,
                                 seed=seed)
             for seed, spec in enumerate(_WORKERS)}
    results = await asyncio.gather(*(f.start(host) for f in fakes.values()),
                                   return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        # Leave no half-started cluster listening behind.
        await asyncio.gather(*(f.stop() for f in fakes.values()))
        raise failure
    pools = _pools()
    by_id = {p["id"]: p for p in pools}
    workers = [_worker_config(spec, fakes[spec[0]].url, by_id) for spec in _WORKERS]
    models = [{**m, "aliases": list(m["aliases"])} for m in _MODELS]
    return DemoCluster(workers=workers, pools=pools, models=models, fakes=fakes)
