"""The live picture of pools and workers, kept as the engine's `State`.

Workers come from the configuration (static), from `POST /v1/workers` and
from pools that register. Their load comes from the queen's own in-flight
accounting; time to first token and tokens per second are learned from real
responses; health probing marks a worker down when it stops answering and
ready again when it answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import aiohttp

from rbee.scheduler import State
from rbee.queen.statejournal import StateJournal

__all__ = ["Registry", "Worker", "Pool"]

log = logging.getLogger("rbee.queen.registry")

#: Fields a worker registration may carry (the configuration's `workers:`).
WORKER_FIELDS = {
    "id", "url", "pool", "model", "models", "capability", "backend", "gpus", "gpu_ids",
    "vram_total", "vram_free", "slots", "cost_per_token", "tokens_per_sec", "latency_ms",
    "geo", "labels", "priority", "api_key_env",
}

# Weight of a new observation in the moving averages of latency and speed.
_EWMA = 0.2


def _now_ms() -> int:
    return int(time.time() * 1000)


def _api_key(spec: dict[str, Any]) -> str | None:
    """The key named by `api_key_env`, read from the queen's environment (a
    key is a secret: it stays out of configuration files and of the state)."""
    name = spec.get("api_key_env")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise ValueError("worker field 'api_key_env' must be the name of an environment "
                         "variable")
    key = os.environ.get(name, "").strip()
    if not key:
        raise ValueError(f"worker {spec.get('id')!r}: api_key_env names {name}, which is not "
                         f"set in the queen's environment")
    return key


@dataclass(eq=False)
class Worker:
    id: str
    url: str
    attrs: dict[str, Any]
    source: str = "config"
    # Sent to the worker as `Authorization: Bearer`; never part of the state.
    api_key: str | None = field(default=None, repr=False)
    active: int = 0
    healthy: bool = True
    draining: bool = False
    failures: int = 0
    last_used_at: int | None = None
    latency_ms: float | None = None
    tokens_per_sec: float | None = None

    def __post_init__(self) -> None:
        self.latency_ms = self.attrs.get("latency_ms")
        self.tokens_per_sec = self.attrs.get("tokens_per_sec")

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def slots(self) -> int:
        return int(self.attrs.get("slots") or 1)

    @property
    def status(self) -> str:
        if not self.healthy:
            return "down"
        if self.draining:
            return "draining"
        return "busy" if self.active >= self.slots else "ready"

    @property
    def models(self) -> list[str]:
        names = list(self.attrs.get("models") or [])
        if self.attrs.get("model") and self.attrs["model"] not in names:
            names.insert(0, self.attrs["model"])
        return names

    def snapshot(self) -> dict[str, Any]:
        """The worker as policies see it (DESIGN 2.2)."""
        data = {k: v for k, v in self.attrs.items() if v is not None}
        models = self.models
        data.update(
            id=self.id,
            url=self.url,
            status=self.status,
            model=models[0] if models else None,
            models=models,
            slots=self.slots,
            active=self.active,
            load=self.active / self.slots,
            last_used_at=self.last_used_at,
            latency_ms=self.latency_ms,
            tokens_per_sec=self.tokens_per_sec,
            source=self.source,
        )
        data.setdefault("labels", {})
        return {k: v for k, v in data.items() if v is not None}


@dataclass(eq=False)
class Pool:
    id: str
    url: str | None = None
    geo: dict[str, Any] | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    last_heartbeat: float | None = None
    heartbeat_interval_ms: int = 10_000

    @property
    def status(self) -> str:
        if self.last_heartbeat is None:
            return "healthy"  # a pool known from the configuration, no agent
        age = (time.time() - self.last_heartbeat) * 1000
        if age <= 2 * self.heartbeat_interval_ms:
            return "healthy"
        return "degraded" if age <= 5 * self.heartbeat_interval_ms else "down"

    def snapshot(self, worker_ids: list[str]) -> dict[str, Any]:
        age = None
        if self.last_heartbeat is not None:
            age = int((time.time() - self.last_heartbeat) * 1000)
        gpus = []
        for i, gpu in enumerate(self.gpus):
            gpu = dict(gpu)
            gpu.setdefault("index", i)
            gpu.setdefault("pool", self.id)
            gpu.setdefault("id", f"{self.id}/{gpu['index']}")
            gpus.append(gpu)
        data = {
            "id": self.id, "url": self.url, "status": self.status, "last_heartbeat_ms": age,
            "gpus": gpus, "workers": worker_ids, "geo": self.geo, "labels": self.labels,
        }
        return {k: v for k, v in data.items() if v is not None}


class Registry:
    """Workers and pools; every change is written to `state` at once
    (through `journal`, which keeps the recent changes for replays) and
    announced to `on_change` so queued jobs are looked at again."""

    def __init__(
        self,
        *,
        models: Iterable[dict[str, Any]] = (),
        tenants: Iterable[dict[str, Any]] = (),
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.workers: dict[str, Worker] = {}
        self.pools: dict[str, Pool] = {}
        self.state = State({"models": list(models), "tenants": list(tenants)})
        self.journal = StateJournal(self.state)
        self.on_change = on_change

    # -- workers -------------------------------------------------------------

    def add_worker(self, spec: dict[str, Any], source: str = "api") -> Worker:
        unknown = set(spec) - WORKER_FIELDS
        if unknown:
            raise ValueError(f"unknown worker field(s): {', '.join(sorted(unknown))}")
        for key in ("id", "url"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise ValueError(f"worker field '{key}' must be a non-empty string")
        attrs = {k: v for k, v in spec.items() if k not in ("id", "url", "api_key_env")}
        worker = Worker(id=spec["id"], url=spec["url"].rstrip("/"), attrs=attrs, source=source,
                        api_key=_api_key(spec))
        previous = self.workers.get(worker.id)
        if previous is not None:
            # Re-registration keeps what the queen knows about the running worker.
            worker.active = previous.active
            worker.last_used_at = previous.last_used_at
        self.workers[worker.id] = worker
        pool = attrs.get("pool")
        if pool and pool not in self.pools:
            self.pools[pool] = Pool(id=pool)
            self._publish_pools()
        self._publish(worker)
        return worker

    def remove_worker(self, worker_id: str) -> bool:
        if self.workers.pop(worker_id, None) is None:
            return False
        self.journal.remove_worker(worker_id)
        self._publish_pools()
        self.on_change()
        return True

    def _publish(self, worker: Worker) -> None:
        self.journal.upsert_worker(worker.snapshot())
        self.on_change()

    def _publish_slots(self, worker: Worker) -> None:
        """Publishes what taking or freeing a slot changes (and what
        `observe` learned) without converting the whole worker again; the
        engine works out `load`. A worker the state does not hold gets all
        of it, as `_publish` would."""
        try:
            self.journal.update_slots(worker.id, worker.active, worker.status,
                                      worker.last_used_at, worker.latency_ms,
                                      worker.tokens_per_sec)
        except KeyError:
            self.journal.upsert_worker(worker.snapshot())
        self.on_change()

    def acquire(self, worker: Worker) -> None:
        worker.active += 1
        worker.last_used_at = _now_ms()
        self._publish_slots(worker)

    def release(self, worker: Worker) -> None:
        worker.active = max(0, worker.active - 1)
        if worker.id in self.workers:
            self._publish_slots(worker)

    def observe(self, worker: Worker, ttft_ms: float | None, tokens: int, gen_s: float) -> None:
        """Learns from a finished response: time to first token, and speed
        when enough tokens came to measure it."""
        if ttft_ms is not None:
            worker.latency_ms = (
                ttft_ms if worker.latency_ms is None
                else (1 - _EWMA) * worker.latency_ms + _EWMA * ttft_ms
            )
        if tokens >= 2 and gen_s > 0:
            tps = tokens / gen_s
            worker.tokens_per_sec = (
                tps if worker.tokens_per_sec is None
                else (1 - _EWMA) * worker.tokens_per_sec + _EWMA * tps
            )
        # No publish here: the slot is released right after a response, and
        # that publishes the learned figures with it (one state update, not two).
        worker.failures = 0

    def mark_failed(self, worker: Worker, threshold: int) -> None:
        """A request or probe failed; past `threshold` in a row it is down."""
        worker.failures += 1
        if worker.failures >= threshold and worker.healthy:
            log.warning("worker %s is down after %d failures", worker.id, worker.failures)
            worker.healthy = False
        if worker.id in self.workers:
            self._publish(worker)

    def mark_healthy(self, worker: Worker) -> None:
        worker.failures = 0
        if not worker.healthy:
            log.info("worker %s is back", worker.id)
            worker.healthy = True
            self._publish(worker)

    # -- pools ---------------------------------------------------------------

    def register_pool(self, spec: dict[str, Any]) -> Pool:
        pool_id = spec.get("id")
        if not isinstance(pool_id, str) or not pool_id:
            raise ValueError("pool field 'id' must be a non-empty string")
        unknown = set(spec) - {"id", "url", "geo", "labels", "gpus", "workers",
                               "heartbeat_interval_ms"}
        if unknown:
            raise ValueError(f"unknown pool field(s): {', '.join(sorted(unknown))}")
        pool = self.pools.get(pool_id) or Pool(id=pool_id)
        pool.url = spec.get("url", pool.url)
        pool.geo = spec.get("geo", pool.geo)
        pool.labels = spec.get("labels", pool.labels) or {}
        pool.gpus = list(spec.get("gpus", pool.gpus) or [])
        pool.heartbeat_interval_ms = int(spec.get("heartbeat_interval_ms",
                                                  pool.heartbeat_interval_ms))
        pool.last_heartbeat = time.time()
        self.pools[pool_id] = pool
        for worker in spec.get("workers") or []:
            self.add_worker({**worker, "pool": pool_id}, source="pool")
        self._publish_pools()
        self.on_change()
        return pool

    def heartbeat(self, pool_id: str, spec: dict[str, Any]) -> Pool:
        pool = self.pools.get(pool_id)
        if pool is None:
            raise KeyError(pool_id)
        pool.last_heartbeat = time.time()
        if "gpus" in spec:
            pool.gpus = list(spec["gpus"] or [])
        self._publish_pools()
        return pool

    def _publish_pools(self) -> None:
        members: dict[str, list[str]] = {}
        for w in self.workers.values():
            if w.attrs.get("pool"):
                members.setdefault(w.attrs["pool"], []).append(w.id)
        self.journal.replace(
            "pools", [p.snapshot(sorted(members.get(p.id, []))) for p in self.pools.values()]
        )

    # -- health --------------------------------------------------------------

    async def probe_once(
        self, session: aiohttp.ClientSession, timeout_s: float, threshold: int
    ) -> None:
        async def probe(worker: Worker) -> None:
            try:
                async with session.get(
                    worker.url + "/models", timeout=aiohttp.ClientTimeout(total=timeout_s),
                    headers=worker.auth_headers(),
                ) as response:
                    ok = response.status < 500
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            if ok:
                self.mark_healthy(worker)
            else:
                self.mark_failed(worker, threshold)

        await asyncio.gather(*(probe(w) for w in list(self.workers.values())))

    def served_models(self) -> dict[str, list[str]]:
        """Model id -> ids of the workers that are up and serve it."""
        served: dict[str, list[str]] = {}
        for worker in self.workers.values():
            if worker.status == "down":
                continue
            for model in worker.models:
                served.setdefault(model, []).append(worker.id)
        return served
