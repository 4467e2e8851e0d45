"""Job traces: JSONL, one job per line, as in DESIGN 2.2 plus when it arrives.

```json
{"at_ms": 1250.5, "id": "job-7", "type": "text-gen", "model": "llama-3.1-8b-instruct",
 "priority": "interactive", "tenant_id": "acme", "max_tokens": 512, "output_tokens": 180,
 "prompt_tokens": 240, "deadline_ms": 8000, "session_id": "u-3-s1",
 "user": {"id": "u-3", "geo": {"region": "EU", "country": "NL",
                              "latitude": 52.37, "longitude": 4.9}}}
```

``at_ms`` is the arrival in milliseconds from the start of the trace (lines
need not be in order); ``output_tokens`` is what the worker really
generates (default ``max_tokens``, or 0); ``deadline_ms`` counts from the
arrival. Bad lines raise :class:`TraceError` naming ``file:line`` and the
field. ``rbee policy diff`` reads the same format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["TraceError", "TraceJob", "read_trace", "parse_trace", "JOB_TYPES",
           "ENDPOINT_OF_TYPE"]

JOB_TYPES = ("text-gen", "image-gen", "embedding", "audio")
ENDPOINT_OF_TYPE = {"text-gen": "chat.completions", "image-gen": "images.generations",
                    "embedding": "embeddings", "audio": "chat.completions"}
# Names people reach for by habit, and what the trace calls them.
_HINTS = {"deadline": "deadline_ms", "arrival_ms": "at_ms", "time_ms": "at_ms", "at": "at_ms",
          "tenant": "tenant_id", "session": "session_id", "completion_tokens": "output_tokens"}


class TraceError(ValueError):
    """A trace line is invalid; the message names the file, the line and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Geo(_Strict):
    region: str | None = None
    country: str | None = None
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)


class _User(_Strict):
    id: str | None = None
    geo: _Geo | None = None


class _Line(_Strict):
    at_ms: float = Field(ge=0, allow_inf_nan=False)
    id: str | None = Field(default=None, min_length=1)
    type: Literal["text-gen", "image-gen", "embedding", "audio"] = "text-gen"
    endpoint: Literal["chat.completions", "completions", "embeddings", "images.generations",
                      "jobs"] | None = None
    model: str | None = None
    priority: str = "normal"
    tenant_id: str | None = None
    user: _User | None = None
    deadline_ms: int | None = Field(default=None, ge=0)
    timeout_ms: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=0)
    prompt_tokens: int = Field(default=0, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    session_id: str | None = None
    stream: bool = False
    tags: dict[str, str] = Field(default_factory=dict)


@dataclass(eq=False)
class TraceJob:
    """One job of a trace: when it arrives, what the policy sees, and what
    really happens when it runs."""

    line: int
    at_ms: float
    id: str
    type: str
    model: str | None
    priority: str
    tenant_id: str | None
    deadline_ms: int | None
    timeout_ms: int | None
    max_tokens: int | None
    prompt_tokens: int
    output_tokens: int
    latitude: float | None
    longitude: float | None
    # The job as policies see it (DESIGN 2.2); the simulator fills in
    # ``deadline``, ``created_at`` and ``wait_ms`` before each decision.
    fields: dict[str, Any]


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(the line)"
    if error["type"] == "extra_forbidden":
        hint = _HINTS.get(str(error["loc"][-1]))
        return f"{path}: unknown field" + (f" (did you mean {hint}?)" if hint else "")
    if error["type"] == "missing":
        return f"{path}: required"
    return f"{path}: {error['msg']} (got {error.get('input')!r})"


def _job(number: int, value: Any, where: str) -> TraceJob:
    if not isinstance(value, dict):
        raise TraceError(f"{where}: each line must be a JSON object (a job), "
                         f"got {type(value).__name__}")
    try:
        line = _Line.model_validate(value)
    except ValidationError as exc:
        raise TraceError("; ".join(f"{where}: {_describe(e)}" for e in exc.errors())) from None
    if line.output_tokens is not None and line.max_tokens is not None \
            and line.output_tokens > line.max_tokens:
        raise TraceError(f"{where}: output_tokens: {line.output_tokens} is more than "
                         f"max_tokens ({line.max_tokens}), which stops generation")
    job_id = line.id or f"job-{number}"
    user = line.user.model_dump(exclude_none=True) if line.user is not None else None
    geo = line.user.geo if line.user is not None else None
    fields = {
        "id": job_id,
        "type": line.type,
        "endpoint": line.endpoint or ENDPOINT_OF_TYPE[line.type],
        "model": line.model,
        "priority": line.priority,
        "tenant_id": line.tenant_id,
        "user": user,
        "deadline": None,
        "max_tokens": line.max_tokens,
        "prompt_tokens": line.prompt_tokens,
        "session_id": line.session_id,
        "stream": line.stream,
        "tags": dict(line.tags),
        "created_at": 0,
        "wait_ms": 0,
        "attempts": 0,
    }
    output = line.output_tokens if line.output_tokens is not None else (line.max_tokens or 0)
    return TraceJob(
        line=number, at_ms=line.at_ms, id=job_id, type=line.type, model=line.model,
        priority=line.priority, tenant_id=line.tenant_id, deadline_ms=line.deadline_ms,
        timeout_ms=line.timeout_ms, max_tokens=line.max_tokens,
        prompt_tokens=line.prompt_tokens, output_tokens=output,
        latitude=geo.latitude if geo is not None else None,
        longitude=geo.longitude if geo is not None else None,
        fields=fields,
    )


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> list[TraceJob]:
    """The jobs of a trace, in arrival order (file order among equal times)."""
    jobs: list[TraceJob] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{source}:{number}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}:{exc.colno}: invalid JSON: {exc.msg}") from None
        job = _job(number, value, where)
        if job.id in seen:
            raise TraceError(f"{where}: id: {job.id!r} is already the id of line "
                             f"{seen[job.id]} (ids must be unique: they seed random())")
        seen[job.id] = number
        jobs.append(job)
    jobs.sort(key=lambda j: j.at_ms)  # stable: file order among equal times
    return jobs


def read_trace(path: str | Path) -> list[TraceJob]:
    """Reads a JSONL trace file (``-`` for standard input)."""
    if str(path) == "-":
        import sys

        return parse_trace(sys.stdin, "<stdin>")
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return parse_trace(handle, str(path))
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, expected a JSONL file") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
