"""The queen's core: every job asks the scheduler for a worker; jobs that
cannot run yet wait in a queue and are looked at again when the state
changes or their timer fires.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path
from typing import Any

from rbee.errors import PolicyError
from rbee.queen.config import QueenConfig
from rbee.queen.decisionlog import DecisionLog
from rbee.queen.jobs import Job, JobError, now_ms, priority_class
from rbee.queen.metrics import Metrics
from rbee.queen.policies import PolicyManager
from rbee.queen.registry import Registry, Worker
from rbee.queen.store import Store
from rbee.queen.tenants import Tenant, Tenants

__all__ = ["Queen"]

log = logging.getLogger("rbee.queen")

_TYPE_OF_CAPABILITY = {"text-gen": "text-gen", "image-gen": "image-gen",
                       "embedding": "embedding", "audio": "audio"}
_ENDPOINT_OF_TYPE = {"text-gen": "chat.completions", "image-gen": "images.generations",
                     "embedding": "embeddings", "audio": "chat.completions"}
#: The immutable scheduler of platform mode.
PLATFORM_SCHEDULER = (Path(__file__).parent / "platform-scheduler.rhai").read_text("utf-8")
# Platform mode's queue is bounded by default (home mode's is not).
_PLATFORM_QUEUE_CAPACITY = 100
# With nothing else to wake it, the queue is looked at this often, so that
# deadlines and timeouts end on time.
_IDLE_TICK_MS = 1000


class Queen:
    def __init__(self, config: QueenConfig, store: Store | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.demo = False
        self._wake = asyncio.Event()
        self._stopping = False
        self.queue: list[Job] = []
        self.store = store or Store(config.database, config.decision_log_size,
                                    config.job_log_size)
        self.platform = config.mode == "platform"
        self.tenants = Tenants(self.store)
        for tenant in config.tenants:
            self.tenants.upsert(tenant.model_dump(exclude_none=True))
        self._vram_of = {name: m.vram_required for m in config.models if m.vram_required
                         for name in [m.id, *m.aliases]}
        # Every name of a configured model (its id and aliases), by each name.
        self._names_of = {name: frozenset([m.id, *m.aliases]) for m in config.models
                          for name in [m.id, *m.aliases]}
        # Weighted fair queuing: the virtual time, and each tenant's last finish tag.
        self._vclock = 0.0
        self._last_finish: dict[str, float] = {}
        self._dispatched_at: collections.deque[float] = collections.deque(maxlen=64)
        self.registry = Registry(
            models=[m.model_dump(exclude_none=True) for m in config.models],
            tenants=[t.model_dump(exclude_none=True) for t in config.tenants],
            on_change=self.kick,
        )
        for worker in config.workers:
            self.registry.add_worker(worker.model_dump(exclude_none=True), source="config")
        self.policies = PolicyManager(
            self.store,
            state=lambda: self.registry.state,
            sample_jobs=self.sample_jobs,
            limits=config.limits.as_dict() or None,
        )
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.decisions = DecisionLog(config.decision_log_size)
        self._tasks: list[asyncio.Task] = []

    # -- life cycle ----------------------------------------------------------

    @property
    def queue_capacity(self) -> int | None:
        capacity = self.config.queue.capacity
        return _PLATFORM_QUEUE_CAPACITY if capacity is None and self.platform else capacity

    async def start(self, session: Any) -> None:
        if self.platform:
            self.policies.start_fixed(PLATFORM_SCHEDULER, "platform")
        else:
            self.policies.start(self.config.scheduler)
        self.decisions.extend(reversed(self.store.decisions(limit=self.config.decision_log_size)))
        self._tasks = [
            asyncio.create_task(self._pump_forever(), name="rbee-queue"),
            asyncio.create_task(self._probe_forever(session), name="rbee-health"),
        ]
        if self.config.scheduler and not self.platform:
            self._tasks.append(asyncio.create_task(
                self.policies.watch(on_result=lambda r: self.metrics.policy_reloads.labels(
                    "file", r).inc()),
                name="rbee-policy-watch"))

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in list(self.queue):
            self._finish_waiting(job, JobError(503, "shutting_down", "the queen is stopping"))
        self.store.close()

    def sample_jobs(self) -> list[dict[str, Any]]:
        """Jobs a new policy must decide before it goes live: one per model
        and capability the cluster serves, plus a generic one."""
        # Sample jobs carry every optional input (user location, deadline,
        # tenant, session), so a policy that reads them is judged on its logic.
        geo = next((w.attrs["geo"] for w in self.registry.workers.values()
                    if isinstance(w.attrs.get("geo"), dict)), None) or \
            {"region": "EU", "country": "NL", "latitude": 52.37, "longitude": 4.9}
        tenant = self.config.tenants[0].id if self.config.tenants else None
        common = dict(max_tokens=64, deadline_ms=60_000, tenant_id=tenant,
                      session_id="sample-session", user={"id": "sample-user", "geo": geo})
        jobs, seen = [], set()
        for worker in self.registry.workers.values():
            job_type = _TYPE_OF_CAPABILITY.get(worker.attrs.get("capability"), "text-gen")
            for model in worker.models[:3] or [None]:
                if (job_type, model) in seen:
                    continue
                seen.add((job_type, model))
                jobs.append(Job(endpoint=_ENDPOINT_OF_TYPE[job_type], model=model,
                                type=job_type, id=f"sample-{len(jobs)}", **common))
        jobs.append(Job(endpoint="chat.completions", model="sample-model", id="sample-generic",
                        **common))
        at = now_ms()
        return [j.to_script(at) for j in jobs]

    def names_of(self, model: str) -> frozenset[str]:
        """The id and aliases `models:` gives the model named `model` (by
        either); empty for a model the configuration does not declare."""
        return self._names_of.get(model, frozenset())

    def model_on(self, worker: Worker, model: str | None) -> str | None:
        """The name `worker` knows the job's model by, when it is not the one
        the client asked for: a job for an alias may go to a worker that
        serves the model under its id or another alias (policies match
        aliases), and a real server refuses names it does not serve."""
        if model is None:
            return None
        served = worker.models
        if model in served:
            return None
        names = self.names_of(model)
        return next((name for name in served if name in names), None)

    # -- deciding ------------------------------------------------------------

    def _decide(self, job: Job) -> Any:
        if self.platform:
            # Quota helpers read the tenants' live usage.
            self.registry.journal.replace(
                "tenants", [t.snapshot() for t in self.tenants.by_id.values()])
        at = now_ms()
        started = time.perf_counter()
        try:
            script_job = job.to_script(at)
            # The GIL is kept: only the store writer could use it meanwhile,
            # and getting it back from that thread would stall the loop.
            decision = self.policies.scheduler.decide(script_job, self.registry.state,
                                                      release_gil=False)
        except PolicyError as exc:
            # Even the built-in default failed: there is no answer to give.
            self.metrics.policy_errors.labels(exc.code).inc()
            raise JobError(503, "scheduler_error", f"no policy could decide: {exc}") from None
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        self.metrics.child(self.metrics.decisions, decision.kind).inc()
        if decision.fallback:
            for failure in decision.fallback["failures"]:
                self.metrics.policy_errors.labels(failure["code"]).inc()
                self.metrics.fallbacks.labels(failure["code"], decision.fallback["used"]).inc()
        record = {
            "at": at, "job_id": job.id, "policy_version": self.policies.version,
            **decision.to_dict(), "job": script_job,
        }
        # The journal's position: the state this decision saw, for replays.
        encoded = self.decisions.append(record, self.registry.journal.seq)
        self.store.add_decision(record, encoded)
        return decision

    def kick(self) -> None:
        """The state changed: queued jobs get another look. With nothing
        queued there is nothing to look at, and waking the pump on every slot
        taken or freed would cost each request a task switch."""
        if self.queue:
            self._wake.set()

    async def acquire(self, job: Job) -> Worker:
        """Answers the worker the job runs on, waiting in the queue if need be.

        Raises JobError when the job is refused, expires, or is cancelled."""
        self.jobs[job.id] = job
        while len(self.jobs) > 10_000:
            self.jobs.popitem(last=False)
        if not self.queue:
            worker = self._try(job)
            if worker is not None:
                return worker
        else:
            job.wake_at = None
        capacity = self.queue_capacity
        if capacity is not None and len(self.queue) >= capacity:
            self._count_rejection(job, "queue_full")
            raise JobError(429, "queue_full", f"the queue is full ({capacity} jobs)",
                           retry_after_ms=self._drain_estimate_ms(),
                           policy_version=self.policies.version)
        self._tag(job)
        loop = asyncio.get_running_loop()
        job.waiter = loop.create_future()
        job.status = "queued"
        self.queue.append(job)
        self.metrics.queue_depth.set(len(self.queue))
        # The pump task looks at the queue now and sets its timer from the
        # new job's deadline too (a direct call here would leave the task
        # asleep on a timer computed before this job arrived).
        self._wake.set()
        try:
            return await job.waiter
        except asyncio.CancelledError:
            self._drop(job)
            raise

    def _tenant(self, job: Job) -> Tenant | None:
        return self.tenants.by_id.get(job.tenant_id) if job.tenant_id else None

    def _count_rejection(self, job: Job, code: str) -> None:
        if job.tenant_id:
            self.metrics.tenant_rejections.labels(job.tenant_id, code).inc()

    def _drain_estimate_ms(self) -> int:
        """How long until the queue has room, from the recent dispatch rate."""
        times = self._dispatched_at
        if len(times) < 2 or times[-1] <= times[0]:
            return 1000
        per_job = (times[-1] - times[0]) / (len(times) - 1)
        return max(100, int(per_job * 1000))

    def _tag(self, job: Job) -> None:
        """Start and finish tags of weighted fair queuing: a tenant of weight
        w advances its own virtual clock by 1/w per job, so under saturation
        it gets w shares of the dispatches."""
        tenant = self._tenant(job)
        key = job.tenant_id or ""
        weight = tenant.weight if tenant is not None else 1.0
        job.vstart = max(self._vclock, self._last_finish.get(key, 0.0))
        job.vfinish = job.vstart + 1.0 / weight
        self._last_finish[key] = job.vfinish

    def _try(self, job: Job) -> Worker | None:
        """One decision; dispatches or refuses, or answers None to wait."""
        decision = self._decide(job)
        tenant = self._tenant(job)
        if tenant is not None and decision.kind != "reject" and not job.rate_counted:
            job.rate_counted = True
            tenant.recent.append(time.time())
        if decision.actions:
            # Actions need a hive agent on the pool; until one is connected
            # they are only recorded with the decision.
            log.info("job %s: policy asked for actions %s", job.id, decision.actions)
        if decision.kind == "dispatch":
            worker = self.registry.workers.get(decision.worker_id)
            if worker is None:
                return None
            job.status, job.worker_id = "scheduled", worker.id
            self.registry.acquire(worker)
            self.metrics.child(self.metrics.in_flight, worker.id).inc()
            self._dispatched_at.append(time.monotonic())
            self._vclock = max(self._vclock, job.vstart)
            if tenant is not None:
                tenant.concurrent += 1
                job.vram_bytes = self._vram_of.get(job.model or "", 0)
                tenant.vram_bytes += job.vram_bytes
            return worker
        if decision.kind == "reject":
            retry = None
            if decision.status == 429:
                retry = decision.retry_after_ms or 1000
                if decision.reason == "quota_exceeded" and tenant is not None:
                    retry = tenant.retry_after_ms()
            self._count_rejection(job, decision.reason or "rejected")
            raise JobError(
                decision.status or 503, decision.reason or "rejected",
                f"the scheduler refused the job ({decision.reason})",
                retry_after_ms=retry, policy_version=self.policies.version,
            )
        job.wait_reason = decision.reason
        job.wake_at = now_ms() + decision.retry_after_ms if decision.retry_after_ms else None
        return None

    def release(self, job: Job, worker: Worker) -> None:
        tenant = self._tenant(job)
        if tenant is not None:
            tenant.concurrent = max(0, tenant.concurrent - 1)
            tenant.vram_bytes = max(0, tenant.vram_bytes - job.vram_bytes)
        self.registry.release(worker)
        self.metrics.child(self.metrics.in_flight, worker.id).dec()

    def finish(self, job: Job, seconds: float) -> None:
        """Accounts a finished job to its tenant: tokens and latency."""
        tenant = self._tenant(job)
        if tenant is None:
            return
        usage = job.usage
        tokens = usage.get("total_tokens") or (
            usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        self.tenants.record_tokens(tenant, tokens)
        self.metrics.child(self.metrics.tenant_tokens, tenant.id).inc(tokens)
        self.metrics.child(self.metrics.tenant_seconds, tenant.id).observe(seconds)
        self.kick()  # freed quota may let queued jobs of this tenant run

    def _drop(self, job: Job) -> None:
        if job in self.queue:
            self.queue.remove(job)
            self.metrics.queue_depth.set(len(self.queue))

    def _finish_waiting(self, job: Job, error: JobError) -> None:
        self._drop(job)
        if job.waiter is not None and not job.waiter.done():
            job.waiter.set_exception(error)

    def cancel(self, job: Job) -> bool:
        if job in self.queue:
            self._finish_waiting(job, JobError(499, "cancelled", "the job was cancelled"))
            return True
        return False

    # -- the queue -----------------------------------------------------------

    def _order(self, at: int) -> list[Job]:
        aging = self.config.queue.aging_ms

        def key(job: Job) -> tuple[int, float, int]:
            waited = max(0, at - job.created_at)
            # In home mode every job counts as one tenant's, so the tags follow
            # arrival order: first come, first served within a class.
            return (max(0, priority_class(job.priority) - waited // aging), job.vfinish,
                    job.seq)

        return sorted(self.queue, key=key)

    def _pump(self) -> int | None:
        """Looks at every queued job in order; answers when to look again."""
        at = now_ms()
        next_wake: int | None = None
        for job in self._order(at):
            if job.waiter is None or job.waiter.done():
                self._drop(job)
                continue
            if at >= job.expires_at:
                reason = "deadline_exceeded" if job.deadline_ms is not None and \
                    at >= job.created_at + job.deadline_ms else "timeout"
                self._finish_waiting(job, JobError(
                    504, reason,
                    f"no worker could take the job in time (waited {at - job.created_at} ms; "
                    f"last reason: {job.wait_reason or 'none'})"))
                continue
            if job.wake_at is not None and at < job.wake_at:
                next_wake = _earliest(next_wake, job.wake_at, job.expires_at)
                continue
            try:
                worker = self._try(job)
            except JobError as exc:
                self._finish_waiting(job, exc)
                continue
            if worker is not None:
                self._drop(job)
                job.waiter.set_result(worker)
            else:
                next_wake = _earliest(next_wake, job.wake_at, job.expires_at)
        self.metrics.queue_depth.set(len(self.queue))
        return next_wake

    async def _pump_forever(self) -> None:
        # The flag, not only cancellation, ends the loop: on Python 3.11
        # `wait_for` can swallow a cancel that arrives as the event is set.
        while not self._stopping:
            next_wake = self._pump() if self.queue else None
            delay = _IDLE_TICK_MS if next_wake is None else max(1, next_wake - now_ms())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, _IDLE_TICK_MS) / 1000)
            except asyncio.TimeoutError:
                pass

    async def _probe_forever(self, session: Any) -> None:
        health = self.config.health
        while not self._stopping:
            try:
                await self.registry.probe_once(
                    session, health.timeout_ms / 1000, health.failures_before_down
                )
            except Exception:  # a probe must never end the loop
                log.exception("health probe round failed")
            await asyncio.sleep(health.interval_ms / 1000)


def _earliest(*times: int | None) -> int | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None
