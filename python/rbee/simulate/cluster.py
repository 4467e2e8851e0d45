"""The simulated cluster: a YAML file whose ``workers:`` are described as in
the queen's configuration, plus what the simulator needs to know about each
worker's speed (``ttft_ms``, ``tokens_per_sec``) and the network.

```yaml
network: {base_ms: 5, ms_per_100km: 1.5, unknown_ms: 20}
queue: {aging_ms: 10000, default_timeout_ms: 300000}
workers:
  - id: fra-4090
    models: [llama-3.1-8b-instruct]
    slots: 4
    cost_per_token: 0.0000002
    ttft_ms: 250
    tokens_per_sec: 60
    geo: {region: EU, country: DE, latitude: 50.11, longitude: 8.68}
    replicas: 3                 # fra-4090-1 .. fra-4090-3
```

Errors name the file, the line and the field (``workers[2].ttft_ms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rbee import yaml_nodes
from rbee.queen.config import ModelConfig, QueueConfig, TenantConfig, WorkerConfig

__all__ = ["Cluster", "ClusterError", "SimWorker", "Network", "load_cluster", "parse_cluster",
           "great_circle_km"]

EARTH_RADIUS_KM = 6371.0


class ClusterError(ValueError):
    """The cluster file is invalid; the message says where and what."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimWorker(WorkerConfig):
    """A worker of the configuration, with the figures the model runs on.

    ``url`` is optional (nothing is called). ``ttft_ms`` is the true time to
    first token; ``latency_ms``, what policies see, defaults to it.
    """

    url: str | None = None  # type: ignore[assignment]
    ttft_ms: float = Field(ge=0)
    tokens_per_sec: float = Field(gt=0)  # type: ignore[assignment]
    network_latency_ms: float | None = Field(default=None, ge=0)
    replicas: int = Field(default=1, ge=1, le=100_000)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url


class Network(_Strict):
    """Round-trip time between a user and a worker, added once to each job:
    ``base_ms + ms_per_100km * distance_km / 100``, or ``unknown_ms`` when the
    user or the worker has no coordinates. A worker's ``network_latency_ms``
    replaces the formula for every user."""

    base_ms: float = Field(default=5.0, ge=0)
    ms_per_100km: float = Field(default=1.5, ge=0)
    unknown_ms: float = Field(default=20.0, ge=0)


class ClusterFile(_Strict):
    network: Network = Field(default_factory=Network)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    workers: list[SimWorker] = Field(min_length=1)
    models: list[ModelConfig] = Field(default_factory=list)
    tenants: list[TenantConfig] = Field(default_factory=list)


@dataclass
class Cluster:
    """A validated cluster: workers expanded (replicas), in file order."""

    workers: list[SimWorker]
    network: Network
    queue: QueueConfig
    models: list[dict[str, Any]]
    tenants: list[dict[str, Any]]
    source: str = "<cluster>"

    def network_ms(self, worker: SimWorker, lat: float | None, lon: float | None) -> float:
        """The round trip between a user at (lat, lon) and ``worker``."""
        if worker.network_latency_ms is not None:
            return worker.network_latency_ms
        geo = worker.geo
        if lat is None or lon is None or geo is None or geo.latitude is None \
                or geo.longitude is None:
            return self.network.unknown_ms
        km = great_circle_km(lat, lon, geo.latitude, geo.longitude)
        return self.network.base_ms + self.network.ms_per_100km * km / 100.0

    def snapshot(self, worker: SimWorker) -> dict[str, Any]:
        """The worker as policies see it (DESIGN 2.2), idle."""
        data = worker.model_dump(exclude_none=True, exclude={"ttft_ms", "replicas",
                                                              "network_latency_ms"})
        models = list(worker.models)
        if worker.model and worker.model not in models:
            models.insert(0, worker.model)
        data["models"] = models
        if models:
            data["model"] = models[0]
        data.setdefault("latency_ms", worker.ttft_ms)
        data.update(status="ready", active=0, load=0.0)
        return data


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance on a sphere of the Earth's mean radius."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def _node_at(root: Any, loc: tuple[Any, ...], key: bool = False) -> Any:
    """The deepest YAML node along a pydantic error location (with ``key``,
    the last step's key rather than its value)."""
    node = root
    for depth, part in enumerate(loc):
        child = None
        if isinstance(part, int) and yaml_nodes.is_sequence(node):
            child = node.value[part] if part < len(node.value) else None
        elif isinstance(part, str) and yaml_nodes.is_mapping(node):
            pairs = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if pairs and key and depth == len(loc) - 1:
                return pairs[0][0]
            child = pairs[0][1] if pairs else None
        if child is None:
            return node  # a missing key: its mapping is where it belongs
        node = child
    return node


def _describe(error: dict[str, Any], data: Any) -> str:
    loc = error["loc"]
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    path = path or "(top level)"
    if len(loc) >= 2 and loc[0] == "workers" and isinstance(loc[1], int):
        try:
            worker_id = data["workers"][loc[1]].get("id")
        except (AttributeError, IndexError, KeyError, TypeError):
            worker_id = None
        if isinstance(worker_id, str):
            path += f" (worker {worker_id!r})"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: required"
    return f"{path}: {error['msg']} (got {error.get('input')!r})"


def parse_cluster(text: str, source: str = "<cluster>") -> Cluster:
    """Validates a cluster file's text; ClusterError names the line and field."""
    try:
        root = yaml_nodes.compose(text)
        data = yaml_nodes.value(root) if root is not None else None
    except yaml_nodes.LocatedError as exc:
        where = f"{source}:{exc.line}:{exc.column}" if exc.line else source
        raise ClusterError(f"{where}: {exc.message}") from None
    if not isinstance(data, dict):
        raise ClusterError(f"{source}: expected a mapping with a 'workers:' list")
    try:
        parsed = ClusterFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            node = _node_at(root, tuple(error["loc"]), key=error["type"] == "extra_forbidden")
            line, column = yaml_nodes.position(node)
            problems.append(f"{source}:{line}:{column}: {_describe(error, data)}")
        raise ClusterError("\n".join(problems)) from None
    workers: list[SimWorker] = []
    for worker in parsed.workers:
        if worker.replicas == 1:
            workers.append(worker)
            continue
        width = len(str(worker.replicas))
        for i in range(1, worker.replicas + 1):
            workers.append(worker.model_copy(update={"id": f"{worker.id}-{i:0{width}d}",
                                                     "replicas": 1}))
    seen: dict[str, int] = {}
    for index, worker in enumerate(workers):
        if worker.id in seen:
            raise ClusterError(f"{source}: workers: the id {worker.id!r} is given twice "
                               "(replicas are named ID-1, ID-2, ...)")
        seen[worker.id] = index
    return Cluster(
        workers=workers,
        network=parsed.network,
        queue=parsed.queue,
        models=[m.model_dump(exclude_none=True) for m in parsed.models],
        tenants=[t.model_dump(exclude_none=True) for t in parsed.tenants],
        source=source,
    )


def load_cluster(path: str | Path) -> Cluster:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClusterError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterError(f"{path}: cannot read ({exc})") from None
    return parse_cluster(text, str(path))
