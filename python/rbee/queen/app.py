"""The queen's HTTP interface (DESIGN 4.3), on aiohttp.

aiohttp serves and proxies in one library on one event loop.
docs/benchmarks.md measures what the queen adds per proxied request, against
LiteLLM and against a bare aiohttp pass-through (the floor of this stack).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web

from rbee.errors import PolicyError
from rbee.queen.core import Queen
from rbee.queen.frontdoor import BadRequest, decode_body, parse_job
from rbee.queen.jobs import ENDPOINTS, JobError, now_ms
from rbee.queen.metrics import CONTENT_TYPE_LATEST
from rbee.queen.policies import REPLAY_MAX
from rbee.queen.proxy import Proxy
from rbee.queen.upstream import UpstreamPool
from rbee.scheduler import State

__all__ = ["build_app", "model_list", "QUEEN", "ADMIN_TOKEN", "PROXY"]

log = logging.getLogger("rbee.queen.http")

QUEEN = web.AppKey("queen", Queen)
PROXY = web.AppKey("proxy", Proxy)
ADMIN_TOKEN = web.AppKey("admin_token", str)
EVENTS = web.AppKey("events", dict)
TASKS = web.AppKey("tasks", dict)  # native job id -> the task running it

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, code: str, kind: str = "invalid_request_error",
                   **extra: Any) -> web.Response:
    error = {"message": message, "type": kind, "code": code, **extra}
    return web.json_response({"error": error}, status=status)


def job_error_response(exc: JobError) -> web.Response:
    return web.json_response(exc.to_dict(), status=exc.status, headers=exc.headers())


def policy_error_response(exc: PolicyError) -> web.Response:
    return web.json_response({"error": {**exc.to_dict(), "message": str(exc),
                                        "logs": exc.logs}}, status=400)


async def read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


async def read_object(request: web.Request, what: str) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be {what}")
    return body


# -- middleware ----------------------------------------------------------------

_ADMIN_PREFIXES = ("/v1/scheduler", "/v1/workers", "/v1/pools", "/v1/decisions", "/v1/state",
                   "/v1/tenants")
# Routes anyone may call in platform mode; every other one needs a tenant key.
_OPEN = ("/health", "/metrics")
TENANT = web.RequestKey("tenant", object)


def _is_admin(request: web.Request) -> bool:
    if request.path == "/v1/scheduler" and request.method == "GET":
        return False
    return request.path.startswith(_ADMIN_PREFIXES)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin token for admin routes, and errors in the OpenAI shape."""
    token = request.app[ADMIN_TOKEN]
    queen = request.app[QUEEN]
    admin = _is_admin(request)
    if admin and (token or queen.platform):
        sent = request.headers.get("Authorization", "")
        if not token or not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return error_response(401, "this endpoint needs the admin token "
                                  "(Authorization: Bearer <token>)", "unauthorized",
                                  "authentication_error")
    elif queen.platform and not admin and request.path not in _OPEN:
        sent = request.headers.get("Authorization", "")
        # The operator may read the scheduler too; tenants read it with their key.
        if request.path == "/v1/scheduler" and token and hmac.compare_digest(
                sent.encode(), f"Bearer {token}".encode()):
            return await handler(request)
        try:
            request[TENANT] = queen.tenants.authenticate(request.headers.get("Authorization"))
        except JobError as exc:
            return job_error_response(exc)
    try:
        return await handler(request)
    except BadRequest as exc:
        return web.json_response(exc.to_dict(), status=400)
    except JobError as exc:
        return job_error_response(exc)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return error_response(exc.status, exc.reason, exc.reason.lower().replace(" ", "_"))
        raise


# -- the OpenAI-compatible front door -----------------------------------------

class AiohttpDownstream:
    """A `Downstream` for the aiohttp application: the handler returns
    `response` once the proxy is done with it."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.response = web.Response(body=body, status=status, headers=headers)

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        self.response = web.StreamResponse(status=status, headers=headers)
        await self.response.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def close_stream(self) -> None:
        assert self.response is not None
        await self.response.write_eof()


def inference(endpoint: str) -> Handler:
    """Inference on a connection the queen's own server handed to aiohttp
    (wire.py serves these routes itself on connections that only use them)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        downstream = AiohttpDownstream(request)
        await request.app[PROXY].serve(endpoint, await request.read(), request.headers,
                                       request.get(TENANT), downstream)
        assert downstream.response is not None
        return downstream.response

    return handle


def _model(model: str, workers: Iterable[str]) -> dict[str, Any]:
    """A model as the OpenAI API shows one, with the workers serving it."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "rbee",
            "rbee": {"workers": sorted(workers)}}


def model_list(queen: Queen) -> dict[str, Any]:
    """GET /v1/models: what the workers serve."""
    served = queen.registry.served_models()
    return {"object": "list",
            "data": [_model(model, workers) for model, workers in sorted(served.items())]}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(model_list(request.app[QUEEN]))


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model} (the SDKs' `models.retrieve`): the model as the
    list shows it, found by its id or, through `models:`, by an alias of a
    name a worker serves. Ids may hold slashes (`Qwen/Qwen2.5-7B`)."""
    queen = request.app[QUEEN]
    wanted = request.match_info["model"]
    served = queen.registry.served_models()
    workers = {w for name in {wanted} | queen.names_of(wanted) for w in served.get(name, ())}
    if not workers:
        return error_response(404, f"the model '{wanted}' does not exist or no worker that "
                              "is up serves it", "model_not_found")
    return web.json_response(_model(wanted, workers))


# -- native jobs -----------------------------------------------------------------

class JobEvents:
    """The event history of one native job, replayed to every reader."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Condition()
        self.closed = False

    def emit(self, event: str, data: dict[str, Any]) -> None:
        self.items.append((event, data))
        self.closed = event in ("end", "error")

        async def notify() -> None:
            async with self.changed:
                self.changed.notify_all()

        asyncio.get_running_loop().create_task(notify())


async def submit_job(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    body = await read_object(request, "a JSON object")
    endpoint = body.pop("endpoint", "chat.completions")
    if endpoint not in ENDPOINTS:
        raise BadRequest(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", "endpoint")
    body.setdefault("stream", endpoint in ("chat.completions", "completions"))
    job = parse_job(endpoint, body, request.headers,
                    default_timeout_ms=queen.config.queue.default_timeout_ms)
    if TENANT in request:
        job.tenant_id = request[TENANT].id
    started = time.perf_counter()
    events = JobEvents()
    request.app[EVENTS][job.id] = events
    queued = len(queen.queue)
    events.emit("queued", {"job_id": job.id, "queue_position": queued})
    payload = json.dumps(body).encode()

    async def run() -> None:
        try:
            await request.app[PROXY].run_native(job, payload, events.emit)
            job.status = "done"
        except JobError as exc:
            job.status, job.error = ("cancelled" if exc.code == "cancelled" else "failed",
                                     exc.to_dict()["error"])
            events.emit("error", job.error)
        except asyncio.CancelledError:
            job.status = "cancelled"
            job.error = {"message": "the job was cancelled", "type": "scheduler_error",
                         "code": "cancelled"}
            events.emit("error", job.error)
        finally:
            job.finished_at = now_ms()
            queen.finish(job, time.perf_counter() - started)
            queen.store.save_job(job.record())

    tasks = request.app[TASKS]
    tasks[job.id] = asyncio.get_running_loop().create_task(run(), name=job.id)
    tasks[job.id].add_done_callback(lambda _: tasks.pop(job.id, None))
    queen.jobs[job.id] = job
    return web.json_response({"job_id": job.id, "status": job.status,
                              "queue_position": queued,
                              "events_url": f"/v1/jobs/{job.id}/events"}, status=202)


def _find_job(request: web.Request) -> dict[str, Any]:
    queen = request.app[QUEEN]
    job_id = request.match_info["job_id"]
    job = queen.jobs.get(job_id)
    if job is not None:
        record = job.record()
    else:
        record = queen.store.job(job_id)
        if record is None:
            raise web.HTTPNotFound(reason=f"no job {job_id}")
    # A tenant sees only its own jobs; others' look like they do not exist.
    if TENANT in request and record.get("tenant_id") != request[TENANT].id:
        raise web.HTTPNotFound(reason=f"no job {job_id}")
    # Its newest decisions (a queued job is decided again on every look), oldest first.
    recent = queen.store.decisions(limit=20, job_id=job_id) if job is None else \
        queen.decisions.newest(20, job_id)
    record["decisions"] = recent[::-1]
    return record


async def get_job(request: web.Request) -> web.Response:
    return web.json_response(_find_job(request))


async def job_events(request: web.Request) -> web.StreamResponse:
    events = request.app[EVENTS].get(request.match_info["job_id"])
    if events is None:
        _find_job(request)  # 404 for unknown ids
        raise web.HTTPGone(reason="the events of this job are no longer kept")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    sent = 0
    while True:
        while sent < len(events.items):
            name, data = events.items[sent]
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            sent += 1
        if events.closed and sent >= len(events.items):
            break
        async with events.changed:
            await events.changed.wait_for(lambda: len(events.items) > sent)
    await response.write_eof()
    return response


async def cancel_job(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    record = _find_job(request)
    job_id = record["id"]
    job = queen.jobs.get(job_id)
    if job is not None and job.status not in ("done", "failed", "cancelled"):
        queen.cancel(job)
        task = request.app[TASKS].get(job_id)
        if task is not None:
            task.cancel()
        await asyncio.sleep(0)
    return web.json_response({"job_id": job_id, "status": "cancelled"
                              if job is not None and job.status != "done" else record["status"]})


# -- state, workers and pools ----------------------------------------------------

async def get_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[QUEEN].registry.state.to_dict()
                             | {"queue": [j.to_script(now_ms())
                                          for j in request.app[QUEEN].queue]})


async def list_workers(request: web.Request) -> web.Response:
    workers = request.app[QUEEN].registry.workers.values()
    return web.json_response({"workers": [w.snapshot() for w in workers]})


async def add_worker(request: web.Request) -> web.Response:
    spec = await read_object(request, "a worker object")
    try:
        worker = request.app[QUEEN].registry.add_worker(spec, source="api")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return web.json_response(worker.snapshot(), status=201)


async def remove_worker(request: web.Request) -> web.Response:
    worker_id = request.match_info["worker_id"]
    if not request.app[QUEEN].registry.remove_worker(worker_id):
        raise web.HTTPNotFound(reason=f"no worker {worker_id}")
    return web.json_response({"id": worker_id, "deleted": True})


async def register_pool(request: web.Request) -> web.Response:
    spec = await read_object(request, "a pool object")
    try:
        pool = request.app[QUEEN].registry.register_pool(spec)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return web.json_response({"id": pool.id, "status": pool.status}, status=201)


async def pool_heartbeat(request: web.Request) -> web.Response:
    spec = await read_json(request) if request.can_read_body else {}
    try:
        pool = request.app[QUEEN].registry.heartbeat(request.match_info["pool_id"], spec or {})
    except KeyError:
        raise web.HTTPNotFound(reason="unknown pool; register it first") from None
    return web.json_response({"id": pool.id, "status": pool.status})


# -- the scheduler ---------------------------------------------------------------

def _policy_body(body: Any) -> tuple[str, str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("source"), str):
        raise BadRequest("expected {\"source\": \"...\", \"format\": \"rhai\"|\"yaml\"}", "source")
    fmt = body.get("format")
    if fmt is not None and fmt not in ("rhai", "yaml"):
        raise BadRequest("'format' must be rhai or yaml", "format")
    return body["source"], fmt


async def get_scheduler(request: web.Request) -> web.Response:
    policies = request.app[QUEEN].policies
    return web.json_response({"version": policies.version, "format": policies.format,
                              "source": policies.source,
                              "mode": request.app[QUEEN].config.mode})


def _immutable(queen: Queen) -> web.Response | None:
    if queen.platform:
        return error_response(403, "platform mode runs the built-in platform scheduler, "
                              "which cannot be changed", "scheduler_immutable",
                              "permission_error")
    return None


async def put_scheduler(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    if (refused := _immutable(queen)) is not None:
        return refused
    source, fmt = _policy_body(await read_json(request))
    try:
        version = queen.policies.apply(source, fmt, "api")
    except PolicyError as exc:
        queen.metrics.policy_reloads.labels("api", "refused").inc()
        return policy_error_response(exc)
    queen.metrics.policy_reloads.labels("api", "ok").inc()
    queen.kick()
    return web.json_response({"version": version, "status": "active"})


async def validate_scheduler(request: web.Request) -> web.Response:
    source, fmt = _policy_body(await read_json(request))
    try:
        _, decisions = request.app[QUEEN].policies.validate(source, fmt)
    except PolicyError as exc:
        return policy_error_response(exc)
    return web.json_response({"valid": True, "decisions": [d.to_dict() for d in decisions]})


def _preview_state(body: dict[str, Any]) -> State | None:
    if body.get("state") is None:
        return None
    try:
        return State(body["state"])
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"'state': {exc}", "state") from None


async def preview_scheduler(request: web.Request) -> web.Response:
    body = await read_json(request)
    if isinstance(body, dict) and "replay" in body:
        return await _preview_replay(request, body)
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
        raise BadRequest("expected {\"jobs\": [...], \"source\"?, \"format\"?, \"state\"?}", "jobs")
    if not all(isinstance(j, dict) for j in body["jobs"]):
        raise BadRequest("each of 'jobs' must be an object", "jobs")
    state = _preview_state(body)
    try:
        decisions = request.app[QUEEN].policies.preview(
            body["jobs"], body.get("source"), body.get("format"), state)
    except PolicyError as exc:
        return policy_error_response(exc)
    return web.json_response({"decisions": decisions})


async def _preview_replay(request: web.Request, body: dict[str, Any]) -> web.Response:
    """``{"source", "format"?, "replay": N, "state"?}``: the last N recorded
    decisions, re-decided by the active policy and the candidate on the live
    state (the log does not keep the state of each decision)."""
    count = body["replay"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= REPLAY_MAX:
        raise BadRequest(f"'replay' must be the number of recorded decisions to replay, an "
                         f"integer from 1 to {REPLAY_MAX}, got {count!r}", "replay")
    if "jobs" in body:
        raise BadRequest("give either 'jobs' or 'replay', not both", "replay")
    source, fmt = _policy_body(body)
    state = _preview_state(body)
    queen = request.app[QUEEN]
    records = queen.decisions.last_with_state(count)
    try:
        answer = await queen.policies.replay(records, source, fmt, state,
                                             queen.registry.journal.window())
    except PolicyError as exc:
        return policy_error_response(exc)
    return web.json_response(answer)


async def list_versions(request: web.Request) -> web.Response:
    return web.json_response({"versions": request.app[QUEEN].store.policy_versions()})


async def rollback(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    if (refused := _immutable(queen)) is not None:
        return refused
    body = await read_json(request) if request.can_read_body else {}
    version = (body or {}).get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise BadRequest("'version' must be an integer", "version")
    try:
        active = queen.policies.rollback(version)
    except LookupError as exc:
        raise web.HTTPNotFound(reason=str(exc)) from None
    except PolicyError as exc:
        return policy_error_response(exc)
    queen.kick()
    return web.json_response({"version": active, "status": "active"})


async def list_decisions(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
    except ValueError:
        raise BadRequest("'limit' must be an integer", "limit") from None
    job_id = request.query.get("job_id")
    return web.json_response({"decisions": queen.decisions.newest(limit, job_id)})


# -- tenants (platform mode, admin) ---------------------------------------------

def _tenant_or_404(request: web.Request) -> Any:
    tenant = request.app[QUEEN].tenants.by_id.get(request.match_info["tenant_id"])
    if tenant is None:
        raise web.HTTPNotFound(reason=f"no tenant {request.match_info['tenant_id']}")
    return tenant


async def add_tenant(request: web.Request) -> web.Response:
    spec = await read_object(request, "a tenant object {id, name, weight, quota}")
    try:
        tenant = request.app[QUEEN].tenants.upsert(spec)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    request.app[QUEEN].kick()
    return web.json_response(tenant.public(), status=201)


async def list_tenants(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    return web.json_response({"tenants": [
        {**t.public(), "keys": queen.store.keys(t.id)} for t in queen.tenants.by_id.values()]})


async def issue_key(request: web.Request) -> web.Response:
    tenant = _tenant_or_404(request)
    return web.json_response(request.app[QUEEN].tenants.issue_key(tenant.id), status=201)


async def revoke_key(request: web.Request) -> web.Response:
    tenant = _tenant_or_404(request)
    key_id = request.match_info["key_id"]
    if not request.app[QUEEN].tenants.revoke_key(tenant.id, key_id):
        raise web.HTTPNotFound(reason=f"no active key {key_id} for tenant {tenant.id}")
    return web.json_response({"key_id": key_id, "revoked": True})


async def tenant_usage(request: web.Request) -> web.Response:
    tenant = _tenant_or_404(request)
    return web.json_response(request.app[QUEEN].tenants.usage_report(tenant))


# -- operations ----------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    workers = queen.registry.workers.values()
    return web.json_response({
        "status": "ok", "mode": queen.config.mode, "demo": queen.demo,
        "policy_version": queen.policies.version, "queue_depth": len(queen.queue),
        "workers": {"total": len(workers),
                    "up": sum(1 for w in workers if w.status != "down")},
    })


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[QUEEN].metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(queen: Queen, admin_token: str = "") -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024 * 1024)
    app[QUEEN] = queen
    app[ADMIN_TOKEN] = admin_token
    app[EVENTS] = {}
    app[TASKS] = {}
    for endpoint in ENDPOINTS:
        app.router.add_post("/v1/" + endpoint.replace(".", "/"), inference(endpoint))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/jobs", submit_job)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_get("/v1/jobs/{job_id}/events", job_events)
    app.router.add_delete("/v1/jobs/{job_id}", cancel_job)
    app.router.add_get("/v1/state", get_state)
    app.router.add_get("/v1/workers", list_workers)
    app.router.add_post("/v1/workers", add_worker)
    app.router.add_delete("/v1/workers/{worker_id}", remove_worker)
    app.router.add_post("/v1/pools/register", register_pool)
    app.router.add_post("/v1/pools/{pool_id}/heartbeat", pool_heartbeat)
    app.router.add_get("/v1/scheduler", get_scheduler)
    app.router.add_put("/v1/scheduler", put_scheduler)
    app.router.add_post("/v1/scheduler/validate", validate_scheduler)
    app.router.add_post("/v1/scheduler/preview", preview_scheduler)
    app.router.add_get("/v1/scheduler/versions", list_versions)
    app.router.add_post("/v1/scheduler/rollback", rollback)
    app.router.add_get("/v1/decisions", list_decisions)
    app.router.add_post("/v1/tenants", add_tenant)
    app.router.add_get("/v1/tenants", list_tenants)
    app.router.add_post("/v1/tenants/{tenant_id}/keys", issue_key)
    app.router.add_delete("/v1/tenants/{tenant_id}/keys/{key_id}", revoke_key)
    app.router.add_get("/v1/tenants/{tenant_id}/usage", tenant_usage)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def lifecycle(app: web.Application):
        # aiohttp's client probes health; inference goes through UpstreamPool.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,
        )
        upstream = UpstreamPool()
        app[PROXY] = Proxy(queen, upstream)
        await queen.start(session)
        yield
        running = list(app[TASKS].values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await queen.stop()
        upstream.close()
        await session.close()

    app.cleanup_ctx.append(lifecycle)
    return app
