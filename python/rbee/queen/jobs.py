"""Jobs: one inference request on its way through the queen (DESIGN 2.2)."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENDPOINTS", "Job", "JobError", "PRIORITY_CLASSES", "priority_class"]

#: endpoint name -> (upstream path, job type)
ENDPOINTS: dict[str, tuple[str, str]] = {
    "chat.completions": ("/chat/completions", "text-gen"),
    "completions": ("/completions", "text-gen"),
    "embeddings": ("/embeddings", "embedding"),
    "images.generations": ("/images/generations", "image-gen"),
}

#: Priority classes, most urgent first; unknown priorities count as normal.
PRIORITY_CLASSES = ("interactive", "high", "normal", "batch", "low")
_CLASS = {name: i for i, name in enumerate(PRIORITY_CLASSES)}

_sequence = itertools.count()
# Job ids: a random prefix per process and a counter. Unique across restarts
# like random ids, without asking the kernel for randomness per request
# (a system call that costs tens of microseconds on some virtual machines).
_ID_PREFIX = "job-" + secrets.token_hex(5)
_ids = itertools.count(1)


def new_job_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):06x}"


def priority_class(priority: str) -> int:
    return _CLASS.get(priority, _CLASS["normal"])


def now_ms() -> int:
    return int(time.time() * 1000)


class JobError(Exception):
    """A job that ends without a result: refused, expired, failed or cancelled.

    ``status`` is the HTTP status to answer, ``code`` the stable error code;
    ``retry_after_ms`` is set for 429 answers.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after_ms: int | None = None,
        policy_version: int | None = None,
        kind: str = "scheduler_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.policy_version = policy_version
        self.kind = kind

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.kind, "code": self.code}
        if self.retry_after_ms is not None:
            error["retry_after_ms"] = self.retry_after_ms
        if self.policy_version is not None:
            error["policy_version"] = self.policy_version
        return {"error": error}

    def headers(self) -> dict[str, str]:
        """Retry-After (whole seconds, rounded up) on a 429."""
        if self.status != 429:
            return {}
        return {"Retry-After": str(max(1, -(-(self.retry_after_ms or 1000) // 1000)))}


# slots: ten thousand recent jobs are kept, and attribute reads are on the
# request path.
@dataclass(eq=False, slots=True)
class Job:
    endpoint: str
    model: str | None = None
    type: str = "text-gen"
    priority: str = "normal"
    tenant_id: str | None = None
    user: dict[str, Any] | None = None
    deadline_ms: int | None = None
    max_tokens: int | None = None
    prompt_tokens: int = 0
    session_id: str | None = None
    stream: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    timeout_ms: int = 300_000
    id: str = field(default_factory=new_job_id)
    created_at: int = field(default_factory=now_ms)
    seq: int = field(default_factory=lambda: next(_sequence))
    attempts: int = 0
    failed_workers: list[str] = field(default_factory=list)
    status: str = "queued"
    worker_id: str | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, int] = field(default_factory=dict)
    finished_at: int | None = None
    # Scheduling state, owned by the queen.
    waiter: asyncio.Future | None = None
    wake_at: int | None = None
    wait_reason: str | None = None
    # Platform mode: weighted fair queuing tags, and what the job holds.
    vstart: float = 0.0
    vfinish: float = 0.0
    rate_counted: bool = False
    vram_bytes: int = 0

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint][0] if self.endpoint in ENDPOINTS else "/chat/completions"

    @property
    def expires_at(self) -> int:
        """When the job gives up waiting: its deadline or its timeout."""
        limit = self.created_at + self.timeout_ms
        if self.deadline_ms is not None:
            limit = min(limit, self.created_at + self.deadline_ms)
        return limit

    def to_script(self, at_ms: int) -> dict[str, Any]:
        """The job as a policy sees it; `deadline` is what is left of it."""
        deadline = None
        if self.deadline_ms is not None:
            deadline = self.created_at + self.deadline_ms - at_ms
        return {
            "id": self.id,
            "type": self.type,
            "endpoint": self.endpoint,
            "model": self.model,
            "priority": self.priority,
            "tenant_id": self.tenant_id,
            "user": self.user,
            "deadline": deadline,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens,
            "session_id": self.session_id,
            "stream": self.stream,
            "tags": self.tags,
            "created_at": self.created_at,
            "wait_ms": max(0, at_ms - self.created_at),
            "attempts": self.attempts,
            "failed_workers": list(self.failed_workers),
        }

    def record(self) -> dict[str, Any]:
        """What GET /v1/jobs/{id} answers and the store keeps."""
        return {
            "id": self.id,
            "object": "job",
            "endpoint": self.endpoint,
            "model": self.model,
            "type": self.type,
            "priority": self.priority,
            "tenant_id": self.tenant_id,
            "status": self.status,
            "worker_id": self.worker_id,
            "attempts": self.attempts,
            "failed_workers": list(self.failed_workers),
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "usage": dict(self.usage),
            "error": self.error,
        }
