"""Carrying a job to its worker and the answer back.

A worker that fails before anything reached the client costs nothing but
time: it is marked suspect and the job is scheduled again without it, up to
`max_attempts`. A worker that fails mid-stream ends the stream with an error
event. Either way the slot is freed, and so it is when the client goes away
(aiohttp cancels the handler, which closes the upstream request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from rbee.queen.core import Queen
from rbee.queen.jobs import Job, JobError, now_ms
from rbee.queen.registry import Worker

__all__ = ["Proxy", "UpstreamFailed"]

log = logging.getLogger("rbee.queen.proxy")

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}


class UpstreamFailed(Exception):
    """The worker failed before anything was sent to the client."""


def sse_error(message: str, code: str) -> bytes:
    payload = {"error": {"message": message, "type": "upstream_error", "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class Proxy:
    def __init__(self, queen: Queen, session: aiohttp.ClientSession) -> None:
        self.queen = queen
        self.session = session

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

    async def _open(self, job: Job, worker: Worker, payload: bytes) -> aiohttp.ClientResponse:
        remaining = max(1.0, (job.created_at + job.timeout_ms - now_ms()) / 1000)
        try:
            response = await self.session.post(
                worker.url + job.path, data=payload,
                # identity: the body is relayed as is, without its encoding headers.
                headers={"Content-Type": "application/json", "Accept-Encoding": "identity",
                         "X-Rbee-Job": job.id},
                timeout=aiohttp.ClientTimeout(total=remaining, sock_connect=5),
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from None
        if response.status >= 500:
            response.release()
            raise UpstreamFailed(f"HTTP {response.status}")
        return response

    def _learn(self, job: Job, worker: Worker, started: float, ttft: float | None,
               tokens: int, usage: dict[str, Any] | None) -> None:
        elapsed = time.perf_counter() - started
        metrics = self.queen.metrics
        metrics.upstream_seconds.labels(worker.id).observe(elapsed)
        if ttft is not None:
            metrics.upstream_ttft_seconds.labels(worker.id).observe(ttft)
        if not usage and tokens:
            # No usage from the worker: count what was streamed, and the
            # prompt by its estimate, so quotas still see the job.
            usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": tokens,
                     "total_tokens": job.prompt_tokens + tokens, "estimated": 1}
        if usage:
            job.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
            tokens = usage.get("completion_tokens", tokens) or tokens
            if usage.get("prompt_tokens"):
                metrics.tokens.labels(worker.id, "prompt").inc(usage["prompt_tokens"])
        if tokens:
            metrics.tokens.labels(worker.id, "completion").inc(tokens)
        generation = elapsed - (ttft or 0.0)
        self.queen.registry.observe(
            worker, ttft * 1000 if ttft is not None else None, tokens, generation)

    # -- the OpenAI-compatible front door ------------------------------------

    async def forward(self, request: web.Request, job: Job, payload: bytes) -> web.StreamResponse:
        async def attempt(worker: Worker) -> web.StreamResponse:
            started = time.perf_counter()
            upstream = await self._open(job, worker, payload)
            async with upstream:
                job.worker_id = worker.id
                streaming = job.stream and upstream.status == 200 and \
                    upstream.headers.get("Content-Type", "").startswith("text/event-stream")
                if streaming:
                    return await self._relay_stream(request, job, worker, upstream, started)
                try:
                    body = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise UpstreamFailed(f"reading the answer: {exc}") from None
                ttft = time.perf_counter() - started
                usage = None
                if upstream.status == 200:
                    try:
                        usage = json.loads(body).get("usage")
                    except (ValueError, AttributeError):
                        usage = None
                self._learn(job, worker, started, None if not job.stream else ttft, 0,
                            usage if isinstance(usage, dict) else None)
                return web.Response(
                    body=body, status=upstream.status,
                    headers={"Content-Type": upstream.headers.get("Content-Type",
                                                                  "application/json"),
                             "X-Rbee-Worker": worker.id, "X-Rbee-Job": job.id})

        return await self.run(job, attempt)

    async def _relay_stream(self, request: web.Request, job: Job, worker: Worker,
                            upstream: aiohttp.ClientResponse,
                            started: float) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={**_SSE_HEADERS, "X-Rbee-Worker": worker.id,
                                 "X-Rbee-Job": job.id})
        ttft: float | None = None
        tokens = 0
        try:
            async for chunk in upstream.content.iter_any():
                if ttft is None:
                    ttft = time.perf_counter() - started
                    await response.prepare(request)
                tokens += chunk.count(b"data:")
                await response.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if ttft is None:
                raise UpstreamFailed(f"stream broke before the first byte: {exc}") from None
            self.queen.metrics.upstream_failures.labels(worker.id, "mid_stream").inc()
            self.queen.registry.mark_failed(worker, self.queen.config.health.failures_before_down)
            log.warning("job %s: worker %s failed mid-stream: %s", job.id, worker.id, exc,
                        extra={"job_id": job.id, "worker_id": worker.id})
            job.error = {"message": f"worker {worker.id} failed mid-stream",
                         "code": "upstream_failed_mid_stream"}
            await response.write(sse_error(job.error["message"], job.error["code"]))
            await response.write_eof()
            return response
        if ttft is None:
            raise UpstreamFailed("the stream ended before the first byte")
        await response.write_eof()
        # `data: [DONE]` is not a token.
        self._learn(job, worker, started, ttft, max(0, tokens - 1), None)
        return response

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
                    text = (await upstream.read()).decode("utf-8", "replace")[:2000]
                    raise JobError(upstream.status, "upstream_error",
                                   f"worker {worker.id} answered {upstream.status}: {text}",
                                   kind="upstream_error")
                if not job.stream:
                    try:
                        body = await upstream.json(content_type=None)
                    except (aiohttp.ClientError, ValueError) as exc:
                        raise UpstreamFailed(f"reading the answer: {exc}") from None
                    emit("started", {"worker_id": worker.id})
                    usage = body.get("usage") if isinstance(body, dict) else None
                    self._learn(job, worker, started, None, 0,
                                usage if isinstance(usage, dict) else None)
                    emit("end", {"worker_id": worker.id, "result": body, "usage": job.usage})
                    return
                await self._native_stream(job, worker, upstream, started, emit)

        await self.run(job, attempt)

    async def _native_stream(self, job: Job, worker: Worker, upstream: aiohttp.ClientResponse,
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
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
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


async def _sse_lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").strip()
        if line.startswith("data:"):
            yield line[5:].strip()
