"""The discrete-event model: a trace replayed through one policy on a
simulated cluster, in simulated time (milliseconds from the trace start).

What happens to a job follows the queen (``rbee.queen.core``):

- On arrival, with nothing queued, the policy decides at once; otherwise
  the job joins the queue and the queue is looked at.
- ``dispatch`` takes one of the worker's slots: the job starts if fewer
  than ``slots`` jobs run there, otherwise it waits in that worker's own
  queue (first come, first served), as a real inference server queues what
  the queen sends it. ``active`` and ``load`` count both, as the queen does.
- ``()`` and ``wait(..)`` keep the job in the queue, ordered by priority
  class (moving up one class every ``queue.aging_ms``), then arrival. It is
  looked at again when a worker's state changes or its ``wait(.., ms)``
  timer fires, and it ends when its deadline (a deadline miss) or
  ``queue.default_timeout_ms`` (or the job's ``timeout_ms``) passes.
- ``reject(..)`` ends the job with that reason; a full queue
  (``queue.capacity``) rejects with ``queue_full``.
- A policy that fails falls back along the queen's chain
  (:class:`rbee.scheduler.Scheduler`); each fallback is counted.

A running job holds its slot for ``network + ttft_ms + output_tokens /
tokens_per_sec``; its time to first token is ``network + ttft_ms`` after it
starts. Its cost is ``(prompt_tokens + output_tokens) * cost_per_token``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from rbee import _engine, errors
from rbee.queen.jobs import PRIORITY_CLASSES, priority_class
from rbee.scheduler import Policy, Scheduler, State
from rbee.simulate.cluster import Cluster, SimWorker
from rbee.simulate.trace import TraceJob

__all__ = ["Simulation", "RunResult", "JobRecord", "START_EPOCH_MS"]

#: Simulated time 0 is 2025-01-06T00:00:00Z (a Monday, midnight UTC), so
#: policies that read ``now()`` see a fixed, plausible clock.
START_EPOCH_MS = 1_736_121_600_000


class JobRecord(NamedTuple):
    """What happened to one job (times in ms from the trace start). The
    engine makes these fields, in this order (``src/simulate/``)."""

    trace: TraceJob
    seq: int
    cls: int
    arrival: float
    expires: float
    deadline_at: float | None
    outcome: str | None  # completed, rejected, expired
    reason: str | None
    worker: _Worker | None
    dispatched: float | None
    start: float | None
    first_token: float | None
    end: float | None
    cost: float
    decisions: int
    state: int  # 0 queued, 1 waiting at its worker, 2 running, 3 done
    wake_at: float | None
    seen_version: int
    net_ms: float

    @property
    def deadline_missed(self) -> bool:
        if self.deadline_at is None or self.outcome == "rejected":
            return False
        return self.outcome == "expired" or self.end > self.deadline_at

    @property
    def queue_wait(self) -> float | None:
        """Arrival to the start of work: the queen's queue and the worker's."""
        return None if self.start is None else self.start - self.arrival


class _Worker:
    __slots__ = ("spec", "id", "slots", "running", "active", "snap", "ttft",
                 "tps", "cost", "busy_ms", "completed", "models")

    def __init__(self, spec: SimWorker, snap: dict[str, Any], names: set[str]) -> None:
        self.spec = spec
        self.id = spec.id
        self.slots = spec.slots
        self.running = 0
        self.active = 0
        self.snap = snap
        self.ttft = spec.ttft_ms
        self.tps = spec.tokens_per_sec
        self.cost = spec.cost_per_token or 0.0
        self.busy_ms = 0.0
        self.completed = 0
        self.models = names


@dataclass
class RunResult:
    policy: str
    jobs: list[JobRecord]
    workers: list[_Worker]
    end_ms: float
    wall_s: float
    decisions: int
    fallbacks: dict[str, int] = field(default_factory=dict)
    unknown_worker: int = 0
    model_mismatch: int = 0
    actions: int = 0
    # Where the run's time went: the decisions (the fallback chain included)
    # and the worker updates, and how many updates were made.
    decide_s: float = 0.0
    update_s: float = 0.0
    updates: int = 0


class Simulation:
    """One policy over one trace on one cluster. ``lookahead`` bounds how
    many queued jobs in a row may keep waiting before a look at the queue
    stops (0: look at all of them, as the queen does).

    The event loop runs in the engine (``rbee._engine.simulate``, in
    ``src/simulate/``); this class prepares what it needs and turns its
    answer into :class:`JobRecord` objects."""

    def __init__(self, cluster: Cluster, jobs: list[TraceJob], policy: Policy, *,
                 lookahead: int = 32, start_epoch_ms: int = START_EPOCH_MS,
                 progress: Callable[[int], None] | None = None) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be 0 or more, got {lookahead}")
        self.cluster = cluster
        self.trace = jobs
        self.policy = policy
        self.lookahead = lookahead
        self.epoch = start_epoch_ms
        self.progress = progress
        self.scheduler = Scheduler(policy, limits=policy.limits)
        aliases: dict[str, set[str]] = {}
        for model in cluster.models:
            names = {model["id"], *model.get("aliases", ())}
            for name in names:
                aliases.setdefault(name, set()).update(names)
        self.workers: list[_Worker] = []
        snapshots = []
        for spec in cluster.workers:
            snap = cluster.snapshot(spec)
            names: set[str] = set()
            for name in snap["models"]:
                names |= aliases.get(name, {name})
            self.workers.append(_Worker(spec, snap, names))
            snapshots.append(snap)
        self.by_id = {w.id: w for w in self.workers}
        self.state = State({"workers": snapshots, "models": cluster.models,
                            "tenants": cluster.tenants, "now": start_epoch_ms})

    def _chain(self) -> list[Any]:
        """The compiled policies a decision falls back along, as the queen's
        :class:`Scheduler` does: the policy, then the built-in default. (The
        queen's "last good" policy is always the policy itself here: it
        never changes during a run.)"""
        chain = [self.policy._compiled]
        if self.policy is not self.scheduler.default:
            chain.append(self.scheduler.default._compiled)
        return chain

    def _worker_rows(self) -> list[tuple[Any, ...]]:
        rows = []
        for w in self.workers:
            geo = w.spec.geo
            rows.append((w, w.id, w.slots, w.ttft, w.tps, w.cost, sorted(w.models),
                         w.spec.network_latency_ms, geo.latitude if geo else None,
                         geo.longitude if geo else None))
        return rows

    def run(self) -> RunResult:
        started = time.perf_counter()
        cluster = self.cluster
        net = cluster.network
        with _collector_paused():
            out = _engine.simulate(
                self._chain(), self.state, self._worker_rows(), self.trace, _CLASSES,
                priority_class(""), (net.base_ms, net.ms_per_100km, net.unknown_ms),
                cluster.queue.aging_ms, cluster.queue.default_timeout_ms,
                cluster.queue.capacity, self.lookahead, self.epoch, self.progress,
                max(1, len(self.trace) // 200),
            )
            for worker, (busy_ms, completed, running, active, last_used_at) in zip(
                    self.workers, out["workers"]):
                worker.busy_ms, worker.completed = busy_ms, completed
                worker.running, worker.active = running, active
                snap = worker.snap
                snap["active"], snap["load"] = active, active / worker.slots
                snap["status"] = "busy" if active >= worker.slots else "ready"
                if last_used_at is not None:
                    snap["last_used_at"] = last_used_at
            records = list(map(_record, out["jobs"]))
        end = max((j.end for j in records if j.end is not None), default=0.0)
        fallbacks = {getattr(errors, name).code: n for name, n in out["fallbacks"].items()}
        return RunResult(
            policy=self.policy.name, jobs=records, workers=self.workers,
            end_ms=max(end, self.trace[-1].at_ms if self.trace else 0.0),
            wall_s=time.perf_counter() - started, decisions=out["decisions"],
            fallbacks=fallbacks, unknown_worker=out["unknown_worker"],
            model_mismatch=out["model_mismatch"], actions=out["actions"],
            decide_s=out["decide_s"], update_s=out["update_s"], updates=out["updates"],
        )


# The queue's class of each priority (others count as "normal"), for the engine.
_CLASSES = {name: priority_class(name) for name in PRIORITY_CLASSES}

# A record from the engine's row, without the named tuple's argument checks.
_record = functools.partial(tuple.__new__, JobRecord)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """A run makes a tuple and a record per job and nothing that refers back
    to itself; the cyclic collector, which would walk the whole trace again
    and again as they pile up, has nothing to find meanwhile."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
