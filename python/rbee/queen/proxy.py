"""Carrying a job to its worker and the answer back.

A worker that fails before anything reached the client costs nothing but
time: it is marked suspect and the job is scheduled again without it, up to
`max_attempts`. A worker that fails mid-stream ends the stream with an error
event. Either way the slot is freed, and so it is when the client goes away
(the server cancels the handler, which closes the upstream connection).

The client side is a `Downstream`: the queen's own HTTP server (wire.py)
and the aiohttp application (app.py) both serve inference requests, with
this one implementation behind them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol

import orjson

from rbee.queen.core import Queen
from rbee.queen.frontdoor import decode_body, parse_job
from rbee.queen.jobs import Job, JobError, now_ms
from rbee.queen.registry import Worker
from rbee.queen.upstream import UpstreamError, UpstreamPool, UpstreamResponse

__all__ = ["Downstream", "Proxy", "UpstreamFailed"]

log = logging.getLogger("rbee.queen.proxy")

_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache",
                "x-accel-buffering": "no"}


# Headers that describe one connection, or that the queen's server writes
# itself; every other header of the worker's answer reaches the client (a
# worker's Retry-After, request ids, rate-limit headers).
_HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "date", "server"))


def _end_to_end(headers: dict[str, str]) -> dict[str, str]:
    # x-rbee-*: a worker that is itself a queen names its worker; ours count.
    return {k: v for k, v in headers.items()
            if k not in _HOP_BY_HOP and not k.startswith("x-rbee-")}


class UpstreamFailed(Exception):
    """The worker failed before anything was sent to the client."""


def sse_error(message: str, code: str) -> bytes:
    payload = {"error": {"message": message, "type": "upstream_error", "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class Downstream(Protocol):
    """Where an inference answer goes: whole, or as a stream."""

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None: ...

    async def open_stream(self, status: int, headers: dict[str, str]) -> None: ...

    async def write(self, chunk: bytes) -> None: ...

    async def close_stream(self) -> None: ...


class Proxy:
    def __init__(self, queen: Queen, upstream: UpstreamPool) -> None:
        self.queen = queen
        self.upstream = upstream

    async def serve(self, endpoint: str, raw: bytes, headers: Mapping[str, str],
                    tenant: Any, downstream: Downstream) -> None:
        """One OpenAI-compatible request, from its bytes to the answer sent,
        with the job recorded and counted whatever happens."""
        queen = self.queen
        body = decode_body(raw)
        fields = len(body)
        job = parse_job(endpoint, body, headers,
                        default_timeout_ms=queen.config.queue.default_timeout_ms)
        # parse_job took out the fields only rbee reads, if there were any.
        had_extras = len(body) != fields
        if tenant is not None:
            job.tenant_id = tenant.id
        started = time.perf_counter()
        # Forward the client's bytes untouched unless rbee-only fields had to go.
        payload = json.dumps(body).encode() if had_extras else raw
        status = 500
        try:
            status = await self.forward(job, payload, downstream)
            job.status = "done" if status < 400 else "failed"
        except JobError as exc:
            status = exc.status
            job.status, job.error = "failed", exc.to_dict()["error"]
            raise
        except asyncio.CancelledError:
            status, job.status = 499, "cancelled"
            raise
        finally:
            job.finished_at = now_ms()
            queen.finish(job, time.perf_counter() - started)
            queen.store.save_job(job.record())
            queen.metrics.count_request(endpoint, status)

    async def run(
        self, job: Job, attempt: Callable[[Worker], Awaitable[Any]]
    ) -> Any:
        """Schedules the job and runs `attempt` on its worker, again on
        another worker when it fails before the first byte."""
        metrics = self.queen.metrics
        while True:
            worker = await self.queen.acquire(job)
            job.attempts += 1
            job.status = "running"
            try:
                return await attempt(worker)
            except UpstreamFailed as exc:
                metrics.upstream_failures.labels(worker.id, "before_first_byte").inc()
                self.queen.registry.mark_failed(
                    worker, self.queen.config.health.failures_before_down)
                job.failed_workers.append(worker.id)
                log.warning("job %s: worker %s failed (%s), attempt %d",
                            job.id, worker.id, exc, job.attempts,
                            extra={"job_id": job.id, "worker_id": worker.id,
                                   "attempt": job.attempts})
                if job.attempts >= self.queen.config.max_attempts:
                    raise JobError(502, "upstream_failed",
                                   f"no worker answered after {job.attempts} attempts "
                                   f"(last: {worker.id}: {exc})", kind="upstream_error") from None
            finally:
                self.queen.release(job, worker)

    async def _open(self, job: Job, worker: Worker, payload: bytes) -> UpstreamResponse:
        remaining = max(1.0, (job.created_at + job.timeout_ms - now_ms()) / 1000)
        name = self.queen.model_on(worker, job.model)
        if name is not None:
            # Asked for by an alias this worker does not know: send its name.
            payload = orjson.dumps({**orjson.loads(payload), "model": name})
        try:
            response = await self.upstream.post(
                worker.url, job.path, payload,
                # identity: the body is relayed as is, without its encoding headers.
                {"Content-Type": "application/json", "Accept-Encoding": "identity",
                 "X-Rbee-Job": job.id, **worker.auth_headers()},
                remaining)
        except UpstreamError as exc:
            raise UpstreamFailed(str(exc)) from None
        if response.status >= 500:
            response.release()
            raise UpstreamFailed(f"HTTP {response.status}")
        return response

    def _learn(self, job: Job, worker: Worker, started: float, ttft: float | None,
               tokens: int, usage: dict[str, Any] | None) -> None:
        elapsed = time.perf_counter() - started
        metrics = self.queen.metrics
        metrics.child(metrics.upstream_seconds, worker.id).observe(elapsed)
        if ttft is not None:
            metrics.child(metrics.upstream_ttft_seconds, worker.id).observe(ttft)
        if not usage and tokens:
            # No usage from the worker: count what was streamed, and the
            # prompt by its estimate, so quotas still see the job.
            usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": tokens,
                     "total_tokens": job.prompt_tokens + tokens, "estimated": 1}
        if usage:
            job.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
            tokens = usage.get("completion_tokens", tokens) or tokens
            if usage.get("prompt_tokens"):
                metrics.child(metrics.tokens, worker.id, "prompt").inc(usage["prompt_tokens"])
        if tokens:
            metrics.child(metrics.tokens, worker.id, "completion").inc(tokens)
        generation = elapsed - (ttft or 0.0)
        self.queen.registry.observe(
            worker, ttft * 1000 if ttft is not None else None, tokens, generation)

    # -- the OpenAI-compatible front door ------------------------------------

    async def forward(self, job: Job, payload: bytes, downstream: Downstream) -> int:
        """Runs the job and sends the worker's answer; answers the status."""
        async def attempt(worker: Worker) -> int:
            started = time.perf_counter()
            upstream = await self._open(job, worker, payload)
            async with upstream:
                job.worker_id = worker.id
                streaming = job.stream and upstream.status == 200 and \
                    upstream.headers.get("content-type", "").startswith("text/event-stream")
                if streaming:
                    return await self._relay_stream(job, worker, upstream, started, downstream)
                try:
                    body = await upstream.read()
                except UpstreamError as exc:
                    raise UpstreamFailed(f"reading the answer: {exc}") from None
                ttft = time.perf_counter() - started
                usage = None
                if upstream.status == 200:
                    try:
                        usage = orjson.loads(body).get("usage")
                    except (ValueError, AttributeError):
                        usage = None
                self._learn(job, worker, started, None if not job.stream else ttft, 0,
                            usage if isinstance(usage, dict) else None)
                await downstream.send(upstream.status, {
                    "content-type": "application/json", **_end_to_end(upstream.headers),
                    "X-Rbee-Worker": worker.id, "X-Rbee-Job": job.id}, body)
                return upstream.status

        return await self.run(job, attempt)

    async def _relay_stream(self, job: Job, worker: Worker, upstream: UpstreamResponse,
                            started: float, downstream: Downstream) -> int:
        ttft: float | None = None
        tokens = 0
        try:
            async for chunk in upstream.chunks():
                if ttft is None:
                    ttft = time.perf_counter() - started
                    await downstream.open_stream(200, {
                        **_end_to_end(upstream.headers), **_SSE_HEADERS,
                        "X-Rbee-Worker": worker.id, "X-Rbee-Job": job.id})
                tokens += chunk.count(b"data:")
                await downstream.write(chunk)
        except UpstreamError as exc:
            if ttft is None:
                raise UpstreamFailed(f"stream broke before the first byte: {exc}") from None
            self.queen.metrics.upstream_failures.labels(worker.id, "mid_stream").inc()
            self.queen.registry.mark_failed(worker, self.queen.config.health.failures_before_down)
            log.warning("job %s: worker %s failed mid-stream: %s", job.id, worker.id, exc,
                        extra={"job_id": job.id, "worker_id": worker.id})
            job.error = {"message": f"worker {worker.id} failed mid-stream",
                         "code": "upstream_failed_mid_stream"}
            await downstream.write(sse_error(job.error["message"], job.error["code"]))
            await downstream.close_stream()
            return 200
        if ttft is None:
            raise UpstreamFailed("the stream ended before the first byte")
        await downstream.close_stream()
        # `data: [DONE]` is not a token.
        self._learn(job, worker, started, ttft, max(0, tokens - 1), None)
        return 200

    # -- native jobs -----------------------------------------------------------

    async def run_native(self, job: Job, payload: bytes,
                         emit: Callable[[str, dict[str, Any]], None]) -> None:
        """Runs a job of the native API, telling its progress through `emit`:
        scheduled, started, token..., then end (or the caller emits error)."""
        async def attempt(worker: Worker) -> None:
            emit("scheduled", {"worker_id": worker.id, "attempt": job.attempts})
            started = time.perf_counter()
            upstream = await self._open(job, worker, payload)
            async with upstream:
                job.worker_id = worker.id
                if upstream.status != 200:
                    try:
                        text = (await upstream.read()).decode("utf-8", "replace")[:2000]
                    except UpstreamError as exc:
                        text = f"(the answer could not be read: {exc})"
                    raise JobError(upstream.status, "upstream_error",
                                   f"worker {worker.id} answered {upstream.status}: {text}",
                                   kind="upstream_error")
                if not job.stream:
                    try:
                        body = json.loads(await upstream.read())
                    except (UpstreamError, ValueError) as exc:
                        raise UpstreamFailed(f"reading the answer: {exc}") from None
                    emit("started", {"worker_id": worker.id})
                    usage = body.get("usage") if isinstance(body, dict) else None
                    self._learn(job, worker, started, None, 0,
                                usage if isinstance(usage, dict) else None)
                    emit("end", {"worker_id": worker.id, "result": body, "usage": job.usage})
                    return
                await self._native_stream(job, worker, upstream, started, emit)

        await self.run(job, attempt)

    async def _native_stream(self, job: Job, worker: Worker, upstream: UpstreamResponse,
                             started: float, emit: Callable[[str, dict[str, Any]], None]) -> None:
        ttft: float | None = None
        index = 0
        finish = None
        usage = None
        try:
            async for line in _sse_lines(upstream):
                if ttft is None:
                    ttft = time.perf_counter() - started
                    emit("started", {"worker_id": worker.id})
                if line == "[DONE]":
                    break
                try:
                    chunk = json.loads(line)
                except ValueError:
                    continue
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if text:
                        emit("token", {"index": index, "text": text})
                        index += 1
                    finish = choice.get("finish_reason") or finish
        except UpstreamError as exc:
            if ttft is None:
                raise UpstreamFailed(f"stream broke before the first byte: {exc}") from None
            self.queen.registry.mark_failed(worker, self.queen.config.health.failures_before_down)
            raise JobError(502, "upstream_failed_mid_stream",
                           f"worker {worker.id} failed mid-stream after {index} tokens",
                           kind="upstream_error") from None
        if ttft is None:
            raise UpstreamFailed("the stream ended before the first byte")
        self._learn(job, worker, started, ttft, index, usage)
        emit("end", {"worker_id": worker.id, "finish_reason": finish, "tokens": index,
                     "usage": job.usage})


async def _sse_lines(response: UpstreamResponse) -> AsyncIterator[str]:
    """The data of each `data:` line, however the chunks cut the lines."""
    pending = b""
    async for chunk in response.chunks():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("data:"):
                yield line[5:].strip()
    line = pending.decode("utf-8", "replace").strip()
    if line.startswith("data:"):
        yield line[5:].strip()
