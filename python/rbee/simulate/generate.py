"""Synthetic traces: Poisson arrivals (optionally with a daily swing) and
seeded mixes of task types, models, priorities, tenants, deadlines and user
locations. The same options and seed always give the same trace.

Arrival times, users (each with a tenant and a location) and the rest of
each job (type, model, priority, deadline, token counts) come from three
random streams derived from the seed, so changing a mix does not move the
arrivals and changing the rate does not change the jobs.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from rbee.simulate.trace import ENDPOINT_OF_TYPE, JOB_TYPES

__all__ = ["GeneratorSpec", "GeneratorError", "generate", "parse_weights", "parse_models",
           "parse_geo", "dumps", "LOCATIONS", "DEFAULT_MODELS"]

#: Named user locations for ``--geo``: region, country, latitude, longitude.
LOCATIONS: dict[str, tuple[str, str, float, float]] = {
    "amsterdam": ("EU", "NL", 52.37, 4.90),
    "frankfurt": ("EU", "DE", 50.11, 8.68),
    "london": ("EU", "GB", 51.51, -0.13),
    "paris": ("EU", "FR", 48.86, 2.35),
    "madrid": ("EU", "ES", 40.42, -3.70),
    "stockholm": ("EU", "SE", 59.33, 18.07),
    "new-york": ("US", "US", 40.71, -74.01),
    "virginia": ("US", "US", 39.04, -77.49),
    "chicago": ("US", "US", 41.88, -87.63),
    "dallas": ("US", "US", 32.78, -96.80),
    "san-francisco": ("US", "US", 37.77, -122.42),
    "sao-paulo": ("SA", "BR", -23.55, -46.63),
    "tokyo": ("APAC", "JP", 35.68, 139.69),
    "singapore": ("APAC", "SG", 1.35, 103.82),
    "mumbai": ("APAC", "IN", 19.08, 72.88),
    "sydney": ("APAC", "AU", -33.87, 151.21),
}

DEFAULT_MODELS: dict[str, dict[str, float]] = {
    "text-gen": {"llama-3.1-8b-instruct": 1.0},
    "embedding": {"nomic-embed-text": 1.0},
    "image-gen": {"sdxl": 1.0},
    "audio": {"whisper-large-v3": 1.0},
}

# Users are scattered this far (degrees) around their location.
_JITTER_DEG = 0.3
_SESSIONS_PER_USER = 4


class GeneratorError(ValueError):
    """An option of the generator is invalid; the message names it."""


@dataclass
class GeneratorSpec:
    jobs: int
    seed: int = 0
    rate: float = 10.0  # jobs per second on average
    mix: dict[str, float] = field(default_factory=lambda: {"text-gen": 1.0})
    models: dict[str, dict[str, float]] = field(default_factory=dict)
    priorities: dict[str, float] = field(default_factory=lambda: {"normal": 1.0})
    tenants: dict[str, float] = field(default_factory=dict)
    deadline_share: float = 0.0
    deadline_ms: tuple[int, int] = (5_000, 30_000)
    geo: dict[str, float] = field(
        default_factory=lambda: {"amsterdam": 0.5, "new-york": 0.3, "tokyo": 0.2})
    users: int = 200
    max_tokens: int = 512
    diurnal: float = 0.0  # 0: a steady rate; 0.5: the rate swings +-50% over a period
    period_s: float = 86_400.0

    def check(self) -> None:
        if self.jobs < 0:
            raise GeneratorError("--jobs must not be negative")
        if not self.rate > 0 or math.isinf(self.rate):
            raise GeneratorError("--rate must be a positive number of jobs per second")
        if not 0.0 <= self.deadline_share <= 1.0:
            raise GeneratorError("--deadline-share must be between 0 and 1")
        lo, hi = self.deadline_ms
        if not 0 < lo <= hi:
            raise GeneratorError("--deadline-ms must be MS or MIN-MAX with 0 < MIN <= MAX")
        if self.users < 1:
            raise GeneratorError("--users must be at least 1")
        if self.max_tokens < 1:
            raise GeneratorError("--max-tokens must be at least 1")
        if not 0.0 <= self.diurnal < 1.0:
            raise GeneratorError("--diurnal must be at least 0 and below 1")
        if not self.period_s > 0:
            raise GeneratorError("--period-s must be positive")
        for job_type in self.mix:
            if job_type not in JOB_TYPES:
                raise GeneratorError(f"--mix: unknown task type {job_type!r} "
                                     f"(known: {', '.join(JOB_TYPES)})")
        for name in self.geo:
            _location(name)


def parse_weights(text: str, option: str) -> dict[str, float]:
    """``a=0.7,b=0.3`` (a name without ``=`` weighs 1) -> weights; they need
    not add up to 1."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition("=") if "=" in item else (item, "", "1")
        name = name.strip()
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not name or not value >= 0 or math.isinf(value):
            raise GeneratorError(f"{option} {text!r}: {item!r} is not NAME=WEIGHT "
                                 "with a weight of 0 or more")
        if name in weights:
            raise GeneratorError(f"{option} {text!r}: {name!r} is given twice")
        weights[name] = value
    if not weights or sum(weights.values()) <= 0:
        raise GeneratorError(f"{option} {text!r}: give at least one NAME=WEIGHT above 0")
    return weights


def parse_models(text: str) -> dict[str, dict[str, float]]:
    """``[TYPE:]MODEL[=WEIGHT],...``; TYPE defaults to text-gen. Types listed
    replace their default models; the others keep theirs."""
    by_type: dict[str, dict[str, float]] = {}
    for name, weight in parse_weights(text, "--models").items():
        job_type, sep, model = name.partition(":")
        if not sep:
            job_type, model = "text-gen", name
        if job_type not in JOB_TYPES:
            raise GeneratorError(f"--models: {name!r}: unknown task type {job_type!r} "
                                 f"(known: {', '.join(JOB_TYPES)})")
        if not model:
            raise GeneratorError(f"--models: {name!r}: the model name is missing")
        by_type.setdefault(job_type, {})[model] = weight
    return by_type


def parse_geo(text: str) -> dict[str, float]:
    weights = parse_weights(text, "--geo")
    for name in weights:
        _location(name)
    return weights


def _location(name: str) -> tuple[str | None, str | None, float, float]:
    """A named location, or ``LAT:LON``."""
    if name in LOCATIONS:
        return LOCATIONS[name]
    lat, sep, lon = name.partition(":")
    try:
        latitude, longitude = float(lat), float(lon)
    except ValueError:
        latitude = longitude = math.nan
    if sep and -90 <= latitude <= 90 and -180 <= longitude <= 180:
        return None, None, latitude, longitude
    raise GeneratorError(f"--geo: unknown location {name!r} (give LAT:LON, e.g. 48.14:11.58, "
                         f"or one of: {', '.join(LOCATIONS)})")


class _Picker:
    """Weighted choices that cost one uniform draw each."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.names = list(weights)
        total = sum(weights.values())
        running, self.bounds = 0.0, []
        for name in self.names:
            running += weights[name] / total
            self.bounds.append(running)

    def __call__(self, rng: random.Random) -> str:
        u = rng.random()
        for name, bound in zip(self.names, self.bounds):
            if u < bound:
                return name
        return self.names[-1]


def _users(spec: GeneratorSpec, rng: random.Random) -> list[dict[str, Any]]:
    tenant = _Picker(spec.tenants) if spec.tenants else None
    place = _Picker(spec.geo)
    users = []
    for i in range(spec.users):
        region, country, lat, lon = _location(place(rng))
        geo: dict[str, Any] = {
            "latitude": round(max(-90.0, min(90.0, lat + rng.uniform(-1, 1) * _JITTER_DEG)), 4),
            "longitude": round((lon + rng.uniform(-1, 1) * _JITTER_DEG + 540) % 360 - 180, 4),
        }
        if region is not None:
            geo = {"region": region, "country": country, **geo}
        users.append({"id": f"u-{i + 1}", "tenant": tenant(rng) if tenant else None,
                      "geo": geo})
    return users


def _tokens(job_type: str, spec: GeneratorSpec, rng: random.Random) -> tuple[int, int, int]:
    """(max_tokens, output_tokens, prompt_tokens) for a job of this type."""
    if job_type == "embedding":
        return 0, 0, min(8192, max(8, int(rng.lognormvariate(5.0, 0.7))))
    if job_type == "image-gen":
        return 1, 1, rng.randint(10, 80)  # one image: tokens_per_sec reads images/s
    # Answers use 10-100% of their budget; prompts have a long tail (median ~245).
    output = max(1, round(spec.max_tokens * rng.uniform(0.1, 1.0)))
    prompt = min(32_000, max(16, int(rng.lognormvariate(5.5, 0.8))))
    return spec.max_tokens, output, prompt


def generate(spec: GeneratorSpec) -> Iterator[dict[str, Any]]:
    """The trace's jobs, one dict per line, in arrival order."""
    spec.check()
    arrivals = random.Random(f"{spec.seed}:arrivals")
    users = _users(spec, random.Random(f"{spec.seed}:users"))
    rng = random.Random(f"{spec.seed}:jobs")
    kind = _Picker(spec.mix)
    models = {t: _Picker(spec.models.get(t) or DEFAULT_MODELS[t]) for t in spec.mix}
    priority = _Picker(spec.priorities)
    peak = spec.rate * (1.0 + spec.diurnal)
    width = len(str(max(spec.jobs, 1)))
    t = 0.0
    for n in range(spec.jobs):
        # Thinning: candidates at the peak rate, kept in proportion to the
        # rate at their time, give a Poisson process of that varying rate.
        while True:
            t += arrivals.expovariate(peak)
            if spec.diurnal == 0.0:
                break
            swing = spec.diurnal * math.sin(2 * math.pi * t / spec.period_s)
            if arrivals.random() * (1.0 + spec.diurnal) < 1.0 + swing:
                break
        user = users[rng.randrange(len(users))]
        job_type = kind(rng)
        job: dict[str, Any] = {
            "at_ms": round(t * 1000.0, 3),
            "id": f"job-{n + 1:0{width}d}",
            "type": job_type,
            "endpoint": ENDPOINT_OF_TYPE[job_type],
            "model": models[job_type](rng),
            "priority": priority(rng),
        }
        if user["tenant"] is not None:
            job["tenant_id"] = user["tenant"]
        job["user"] = {"id": user["id"], "geo": user["geo"]}
        if rng.random() < spec.deadline_share:
            job["deadline_ms"] = rng.randint(*spec.deadline_ms)
        max_tokens, output, prompt = _tokens(job_type, spec, rng)
        job.update(max_tokens=max_tokens, output_tokens=output, prompt_tokens=prompt)
        job["session_id"] = f"{user['id']}-s{rng.randrange(_SESSIONS_PER_USER) + 1}"
        yield job


def dumps(job: dict[str, Any]) -> str:
    return json.dumps(job, separators=(",", ":"), ensure_ascii=False)
