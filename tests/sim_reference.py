"""The simulator's event loop as it was written in Python before it moved to
the engine (src/simulate/model.rs), kept as the reference the engine's loop is
checked against (tests/test_simulate_reference.py). It makes the same
decisions through the same Python `Scheduler` a job at a time, so it is slow
but plain; change the model here and in src/simulate/model.rs together.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time

from rbee.errors import PolicyError
from rbee.queen.jobs import priority_class
from rbee.simulate import model
from rbee.simulate.model import RunResult, _Worker
from rbee.simulate.trace import TraceJob

__all__ = ["Simulation"]

_COMPLETE, _WAKE, _EXPIRE = 0, 1, 2
_QUEUED, _WAITING_LOCAL, _RUNNING, _DONE = 0, 1, 2, 3


class JobRecord:
    """What happened to one job (times in ms from the trace start)."""

    __slots__ = (
        "trace", "seq", "cls", "arrival", "expires", "deadline_at", "outcome", "reason",
        "worker", "dispatched", "start", "first_token", "end", "cost", "decisions",
        "state", "wake_at", "seen_version", "net_ms",
    )

    def __init__(self, trace: TraceJob, seq: int, expires: float) -> None:
        self.trace = trace
        self.seq = seq
        self.cls = priority_class(trace.priority)
        self.arrival = trace.at_ms
        self.expires = expires
        self.deadline_at = None if trace.deadline_ms is None else trace.at_ms + trace.deadline_ms
        self.outcome: str | None = None  # completed, rejected, expired
        self.reason: str | None = None
        self.worker: _Worker | None = None
        self.dispatched = self.start = self.first_token = self.end = None
        self.cost = 0.0
        self.decisions = 0
        self.state = _QUEUED
        self.wake_at: float | None = None
        self.seen_version = -1
        self.net_ms = 0.0

    # The same reading of the fields as the engine's records.
    deadline_missed = model.JobRecord.deadline_missed
    queue_wait = model.JobRecord.queue_wait


class _ClassQueue:
    """The jobs of one priority class in arrival order; finished entries are
    skipped and dropped lazily."""

    __slots__ = ("items", "head", "gone")

    def __init__(self) -> None:
        self.items: list[JobRecord] = []
        self.head = 0
        self.gone = 0

    def trim(self) -> None:
        items = self.items
        while self.head < len(items) and items[self.head].state != _QUEUED:
            self.head += 1
            self.gone -= 1
        if self.gone > 64 and self.gone * 2 > len(items) - self.head:
            self.items = [j for j in items[self.head:] if j.state == _QUEUED]
            self.head = self.gone = 0
        elif self.head > 1024 and self.head * 2 > len(items):
            del items[:self.head]
            self.head = 0


class Simulation(model.Simulation):
    """The engine's `Simulation` with the old loop in place of the engine's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: dict[str, collections.deque[JobRecord]] = {
            w.id: collections.deque() for w in self.workers}
        self.now = 0.0
        self.version = 0  # bumped whenever a worker's state changes
        self._dirty: dict[str, _Worker] = {}
        self._events: list[tuple[float, int, int, JobRecord]] = []
        self._event_seq = itertools.count()
        self._classes = [_ClassQueue() for _ in range(5)]
        self._queued = 0
        self._net_cache: dict[tuple[int, float | None, float | None], float] = {}
        self.records: list[JobRecord] = []
        self.decisions = 0
        self.unknown_worker = 0
        self.model_mismatch = 0
        self.actions = 0

    # -- the run -------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.perf_counter()
        queue = self.cluster.queue
        events = self._events
        pop = heapq.heappop
        trace = self.trace
        count = len(trace)
        i = 0
        tick = max(1, count // 200)
        while True:
            arrival = trace[i].at_ms if i < count else None
            if events and (arrival is None or events[0][0] <= arrival):
                at, _, kind, job = pop(events)
                self.now = at
                if kind == _COMPLETE:
                    self._complete(job)
                elif job.state == _QUEUED:
                    if kind == _EXPIRE:
                        self._expire(job)
                    elif job.wake_at is not None and job.wake_at <= at:
                        self._pump()
                continue
            if arrival is None:
                break
            item = trace[i]
            i += 1
            self.now = arrival
            timeout = item.timeout_ms or queue.default_timeout_ms
            expires = arrival + timeout
            if item.deadline_ms is not None:
                expires = min(expires, arrival + item.deadline_ms)
            job = JobRecord(item, i, expires)
            self.records.append(job)
            self._arrive(job)
            if self.progress is not None and i % tick == 0:
                self.progress(tick)
        if self.progress is not None and count % tick:
            self.progress(count % tick)
        end = max((j.end for j in self.records if j.end is not None), default=0.0)
        return RunResult(
            policy=self.policy.name, jobs=self.records, workers=self.workers,
            end_ms=max(end, trace[-1].at_ms if trace else 0.0),
            wall_s=time.perf_counter() - started, decisions=self.decisions,
            fallbacks=dict(self.scheduler.fallbacks), unknown_worker=self.unknown_worker,
            model_mismatch=self.model_mismatch, actions=self.actions,
        )

    def _arrive(self, job: JobRecord) -> None:
        if not self._queued:
            if self._try(job):
                return
        capacity = self.cluster.queue.capacity
        if capacity is not None and self._queued >= capacity:
            self._finish(job, "rejected", "queue_full")
            return
        self._enqueue(job)
        if self._queued > 1:
            self._pump()

    # -- deciding ------------------------------------------------------------

    def _try(self, job: JobRecord) -> bool:
        """One decision. True when the job left the queue's hands
        (dispatched, or ended), False when it waits."""
        if self._dirty:
            self._flush()
        now = self.now
        script = job.trace.fields
        script["created_at"] = self.epoch + int(job.arrival)
        script["wait_ms"] = int(now - job.arrival)
        script["deadline"] = None if job.deadline_at is None else int(job.deadline_at - now)
        self.decisions += 1
        job.decisions += 1
        try:
            # One thread: releasing the GIL per decision would buy nothing.
            decision = self.scheduler.decide(script, self.state, now_ms=self.epoch + int(now),
                                             release_gil=False)
        except PolicyError:
            # Even the built-in default failed: the queen answers 503.
            self._finish(job, "rejected", "scheduler_error")
            return True
        if decision.actions:
            self.actions += 1
        kind = decision.kind
        if kind == "dispatch":
            worker = self.by_id.get(decision.worker_id)
            if worker is not None:
                self._dispatch(job, worker)
                return True
            # The queen keeps a job whose worker it does not know queued.
            self.unknown_worker += 1
            job.wake_at = None
        elif kind == "reject":
            self._finish(job, "rejected", decision.reason or "rejected")
            return True
        else:
            ms = decision.retry_after_ms
            job.wake_at = now + ms if ms else None
            if job.wake_at is not None:
                heapq.heappush(self._events, (job.wake_at, next(self._event_seq), _WAKE, job))
        job.seen_version = self.version
        return False

    def _flush(self) -> None:
        """Publishes the workers that changed since the last decision, once
        each, however many times they changed. Only the fields a slot taken
        or freed changes are sent; the engine works out ``load`` from them."""
        update = self.state.update_worker
        for worker in self._dirty.values():
            snap = worker.snap
            active = snap["active"] = worker.active
            snap["load"] = active / worker.slots
            status = snap["status"] = "busy" if active >= worker.slots else "ready"
            # Every changed worker was dispatched to, so it has a last use.
            update(worker.id, {"active": active, "status": status,
                               "last_used_at": snap["last_used_at"]})
        self._dirty.clear()

    def _enqueue(self, job: JobRecord) -> None:
        self._classes[job.cls].items.append(job)
        self._queued += 1
        heapq.heappush(self._events, (job.expires, next(self._event_seq), _EXPIRE, job))

    def _leave_queue(self, job: JobRecord) -> None:
        queue = self._classes[job.cls]
        queue.gone += 1
        self._queued -= 1

    def _pump(self) -> None:
        """Looks at the queue in order, deciding each job that may have a new
        answer: its timer fired, or a worker changed since it last waited."""
        if not self._queued:
            return
        now = self.now
        aging = self.cluster.queue.aging_ms
        heads = []
        for queue in self._classes:
            queue.trim()
            if queue.head < len(queue.items):
                heads.append([queue, queue.head])
        in_a_row = 0
        while heads:
            # The next job is the head with the smallest (class after aging,
            # arrival); within one class that order is the list's order.
            best = None
            best_key = None
            for entry in heads:
                job = entry[0].items[entry[1]]
                key = (max(0, job.cls - int(now - job.arrival) // aging), job.seq)
                if best_key is None or key < best_key:
                    best, best_key = entry, key
            queue, index = best
            job = queue.items[index]
            index += 1
            while index < len(queue.items) and queue.items[index].state != _QUEUED:
                index += 1
            if index < len(queue.items):
                best[1] = index
            else:
                heads.remove(best)
            if now >= job.expires:
                self._expire(job)
                continue
            if job.wake_at is not None and now < job.wake_at:
                continue
            if job.wake_at is None and job.seen_version == self.version:
                continue
            if self._try(job):
                self._leave_queue(job)
                in_a_row = 0
            else:
                in_a_row += 1
                if self.lookahead and in_a_row >= self.lookahead:
                    break
        for queue in self._classes:
            queue.trim()

    # -- workers -------------------------------------------------------------

    def _network(self, worker: _Worker, job: JobRecord) -> float:
        key = (id(worker), job.trace.latitude, job.trace.longitude)
        ms = self._net_cache.get(key)
        if ms is None:
            ms = self.cluster.network_ms(worker.spec, key[1], key[2])
            if len(self._net_cache) < 1_000_000:
                self._net_cache[key] = ms
        return ms

    def _dispatch(self, job: JobRecord, worker: _Worker) -> None:
        model = job.trace.model
        if model is not None and worker.models and model not in worker.models:
            self.model_mismatch += 1
        job.worker = worker
        job.dispatched = self.now
        job.net_ms = self._network(worker, job)
        worker.active += 1
        worker.snap["last_used_at"] = self.epoch + int(self.now)
        self._dirty[worker.id] = worker
        self.version += 1
        if worker.running < worker.slots:
            self._start(job, worker)
        else:
            job.state = _WAITING_LOCAL
            self._waiting[worker.id].append(job)

    def _start(self, job: JobRecord, worker: _Worker) -> None:
        worker.running += 1
        now = self.now
        job.state = _RUNNING
        job.start = now
        job.first_token = now + job.net_ms + worker.ttft
        job.end = job.first_token + job.trace.output_tokens * 1000.0 / worker.tps
        heapq.heappush(self._events, (job.end, next(self._event_seq), _COMPLETE, job))

    def _complete(self, job: JobRecord) -> None:
        worker = job.worker
        worker.running -= 1
        worker.active -= 1
        worker.busy_ms += job.end - job.start
        worker.completed += 1
        trace = job.trace
        job.cost = (trace.prompt_tokens + trace.output_tokens) * worker.cost
        job.outcome = "completed"
        job.state = _DONE
        waiting = self._waiting[worker.id]
        if waiting:
            self._start(waiting.popleft(), worker)
        self._dirty[worker.id] = worker
        self.version += 1
        self._pump()

    def _expire(self, job: JobRecord) -> None:
        late = job.deadline_at is not None and job.expires >= job.deadline_at
        self._leave_queue(job)
        self._finish(job, "expired", "deadline_exceeded" if late else "timeout")
        job.end = job.expires

    def _finish(self, job: JobRecord, outcome: str, reason: str) -> None:
        job.outcome = outcome
        job.reason = reason
        job.state = _DONE
        job.end = self.now
