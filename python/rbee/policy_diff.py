"""Replay diff (``rbee policy diff``): the jobs of a trace whose decision
changes from one policy to another, with both decisions.

A trace is JSONL, one job a line, in one of two forms:

- a job with the fields of DESIGN 2.2, or a line of an ``rbee simulate``
  trace: its ``deadline_ms`` (from arrival) is the job's ``deadline``, and
  ``at_ms``, ``output_tokens`` and ``timeout_ms``, which only the simulator
  uses, are dropped; a job without an ``id`` is ``job-<line>``, as there;
- a record of the queen's decision log, as ``GET /v1/decisions`` answers
  it: an object whose ``job`` is the job as the policy saw it, ``at`` the
  time it was decided, and the decision made then (kept for reference).
  Such a line may carry a ``state`` of its own.

Both policies decide every job against the same state, which does not
change during the replay: a diff compares decisions, and a job that one
policy places elsewhere must not shift every later decision, as the slots
it would take would in the real cluster. Each policy is compiled on its
own, so rotation state (``round_robin``) is not shared, and sees the jobs in
trace order: file order, or arrival (``at_ms``) order when every line has
one, as the simulator replays them. ``now()`` is the record's ``at`` for a
decision record, else one time fixed when the replay starts, so both
policies see the same clock.

A policy error is an outcome here (``error <code>``), not a failure of the
command: a new policy that fails where the old one decided is a change.
The same comparison (:func:`same`) decides what counts as a change for the
queen's preview replay (``PolicyManager.replay``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from rbee.errors import PolicyCompileError, PolicyError, RbeeError
from rbee.scheduler import Policy, State

__all__ = ["TraceError", "TraceEntry", "Change", "DiffReport", "TRACE_ONLY_FIELDS",
           "load_policy", "parse_entry", "decide", "summary", "same", "describe", "diff"]

#: Fields of a simulator trace line that are not inputs of a decision
#: (``deadline_ms`` becomes the job's ``deadline``).
TRACE_ONLY_FIELDS = ("at_ms", "output_tokens", "timeout_ms", "deadline_ms")
#: What a decision is, for comparing two of them; the rest (logs, timings,
#: the policy's name) may differ without the decision changing.
OUTCOME_FIELDS = ("kind", "worker_id", "reason", "status", "retry_after_ms", "actions")


class TraceError(RbeeError):
    """A trace line (or the state for it) that cannot be replayed; the
    message starts with ``file:line``."""


@dataclass(frozen=True)
class TraceEntry:
    line: int
    job: dict[str, Any]
    state: dict[str, Any] | None = None
    at: int | None = None
    recorded: dict[str, Any] | None = None  # the decision a decision record holds
    arrival_ms: float | None = None  # a simulator trace's at_ms


@dataclass(frozen=True)
class Change:
    line: int | None
    job_id: Any
    old: dict[str, Any]
    new: dict[str, Any]
    recorded: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"line": self.line, "job_id": self.job_id, "old": self.old, "new": self.new}
        if self.recorded is not None:
            out["recorded"] = self.recorded
        return out


def load_policy(ref: str, limits: Mapping[str, int] | None = None) -> Policy:
    """A policy file (``.rhai``, ``.yaml``/``.yml``) or, when no such file
    exists, a template of that name (``rbee templates list``)."""
    if Path(ref).exists():
        return Policy.from_file(ref, limits=limits)
    from rbee import templates

    try:
        source, fmt = templates.source(ref), templates.policy_format(ref)
    except KeyError:
        raise PolicyCompileError("no such file, and no template of that name "
                                 "(rbee templates list)", file=ref) from None
    return Policy.from_source(source, name=f"template {templates.filename(ref)}",
                              limits=limits, format=fmt)


def parse_entry(value: Any, line: int, where: str) -> TraceEntry:
    """One trace line (already parsed JSON); ``where`` is ``file:line``."""
    if not isinstance(value, dict):
        raise TraceError(f"{where}: expected a JSON object (a job or a decision record), "
                         f"got {type(value).__name__}")
    if "job" not in value:
        return _plain_job(value, line, where)
    job = value["job"]
    if not isinstance(job, dict):
        raise TraceError(f"{where}: 'job' must be an object (the job as the policy saw it), "
                         f"got {type(job).__name__}")
    state = value.get("state")
    if state is not None and not isinstance(state, dict):
        raise TraceError(f"{where}: 'state' must be an object, got {type(state).__name__}")
    at = value.get("at")
    if at is not None and (isinstance(at, bool) or not isinstance(at, int)):
        raise TraceError(f"{where}: 'at' must be the decision time in ms (an integer), "
                         f"got {at!r}")
    recorded = summary(value) if "kind" in value else None
    if recorded is not None and "policy_version" in value:
        recorded["policy_version"] = value["policy_version"]
    return TraceEntry(line, job, state, at, recorded)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain_job(value: dict[str, Any], line: int, where: str) -> TraceEntry:
    arrival, deadline = value.get("at_ms"), value.get("deadline_ms")
    if arrival is not None and not (_number(arrival) and arrival >= 0):
        raise TraceError(f"{where}: 'at_ms' must be the arrival in ms (a number >= 0), "
                         f"got {arrival!r}")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int)):
        raise TraceError(f"{where}: 'deadline_ms' must be ms from arrival (an integer), "
                         f"got {deadline!r}")
    job = {k: v for k, v in value.items() if k not in TRACE_ONLY_FIELDS}
    if deadline is not None:
        job.setdefault("deadline", deadline)  # all of it is left on arrival
    if job.get("id") is None:
        job["id"] = f"job-{line}"
    return TraceEntry(line, job, arrival_ms=arrival)


def decide(policy: Policy, job: Mapping[str, Any], state: Any,
           now_ms: int | None = None) -> dict[str, Any]:
    """The decision as a dict, or ``{"kind": "error", "error": {...}, "logs"}``
    when the policy fails (the shape the queen's preview answers)."""
    try:
        return policy.decide(job, state, now_ms=now_ms).to_dict()
    except PolicyError as exc:
        return {"kind": "error", "error": exc.to_dict(), "logs": exc.logs}


def summary(decision: Mapping[str, Any]) -> dict[str, Any]:
    """What was decided (and the script's log lines), without timings."""
    if decision.get("kind") == "error":
        return {"kind": "error", "error": decision.get("error"),
                "logs": list(decision.get("logs") or [])}
    out = {name: decision.get(name) for name in OUTCOME_FIELDS}
    out["actions"] = list(out["actions"] or [])
    out["logs"] = list(decision.get("logs") or [])
    return out


def _key(decision: Mapping[str, Any]) -> str:
    if decision.get("kind") == "error":
        return json.dumps(["error", (decision.get("error") or {}).get("code")])
    return json.dumps([decision.get(name) or None for name in OUTCOME_FIELDS],
                      sort_keys=True, default=str)


def same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two decisions (dicts) decide the same: kind, worker, reason,
    status, retry time and actions; two errors are the same with the same code."""
    return _key(a) == _key(b)


def describe(decision: Mapping[str, Any]) -> str:
    """A decision in a few words: ``worker w1``, ``reject capacity (503)``,
    ``wait night_only (60000 ms)``, ``error timeout``."""
    kind = decision.get("kind")
    if kind == "error":
        return f"error {(decision.get('error') or {}).get('code', 'policy_error')}"
    if kind == "dispatch":
        text = f"worker {decision.get('worker_id')}"
    elif kind == "reject":
        text = f"reject {decision.get('reason')} ({decision.get('status')})"
    else:
        text = "wait"
        if decision.get("reason"):
            text += f" {decision['reason']}"
        if decision.get("retry_after_ms"):
            text += f" ({decision['retry_after_ms']} ms)"
    actions = decision.get("actions") or []
    if actions:
        names = ", ".join(f"{a.get('action')} {a.get('worker_id') or a.get('model') or ''}"
                          .strip() for a in actions)
        text += f" after [{names}]"
    return text


@dataclass
class DiffReport:
    old: str
    new: str
    trace: str
    jobs: int
    changes: list[Change]

    def transitions(self) -> list[tuple[str, str, int]]:
        """(from, to, count) for every kind of change, most frequent first."""
        counts = Counter((describe(c.old), describe(c.new)) for c in self.changes)
        return sorted(((a, b, n) for (a, b), n in counts.items()),
                      key=lambda t: (-t[2], t[0], t[1]))

    def to_dict(self, max_changes: int | None = None) -> dict[str, Any]:
        listed = self.changes if max_changes is None else self.changes[:max_changes]
        return {
            "old": self.old, "new": self.new, "trace": self.trace,
            "jobs": self.jobs, "changed": len(self.changes),
            "transitions": [{"from": a, "to": b, "count": n}
                            for a, b, n in self.transitions()],
            "listed": len(listed),
            "changes": [c.to_dict() for c in listed],
        }

    def text(self, max_changes: int | None = None) -> str:
        listed = self.changes if max_changes is None else self.changes[:max_changes]
        lines = []
        for c in listed:
            job_id = c.job_id if c.job_id is not None else "(no id)"
            lines.append(f"{self.trace}:{c.line}  {job_id}  {describe(c.old)} -> "
                         f"{describe(c.new)}")
            # An error's message is too long for the summary line but is the
            # first thing the author needs.
            for name, decision in ((self.old, c.old), (self.new, c.new)):
                if decision["kind"] == "error":
                    error = decision["error"] or {}
                    where = ":".join(str(p) for p in (name, error.get("line"),
                                                      error.get("column")) if p is not None)
                    lines.append(f"    {where}: {error.get('message')}")
        hidden = len(self.changes) - len(listed)
        if hidden:
            lines.append(f"... and {hidden} more changed job{'s' if hidden > 1 else ''} "
                         "(not listed: --max-changes)")
        noun = "job" if self.jobs == 1 else "jobs"
        if not self.changes:
            lines.append(f"{self.jobs} {noun} replayed ({self.old} -> {self.new}): "
                         "no decision changed")
            return "\n".join(lines)
        share = 100.0 * len(self.changes) / self.jobs
        lines.append(f"{self.jobs} {noun} replayed ({self.old} -> {self.new}): "
                     f"{len(self.changes)} changed ({share:.1f}%)")
        lines.extend(f"  {a} -> {b}: {n}" for a, b, n in self.transitions())
        return "\n".join(lines)


def diff(
    old: Policy,
    new: Policy,
    entries: Iterable[TraceEntry],
    state: State | None,
    *,
    trace: str = "<trace>",
    now_ms: int | None = None,
    started_ms: int,
) -> DiffReport:
    """Replays ``entries`` through both policies, in trace order (file
    order, or ``at_ms`` order when every entry has one).

    ``state`` serves the entries without a state of their own (None: every
    entry must have one). ``now_ms`` fixes ``now()`` for every job;
    otherwise a decision record's ``at`` is used, else ``started_ms``.
    Raises :class:`TraceError` naming ``trace:line`` for an entry that
    cannot be decided (no state, a state or job that does not convert).
    """
    entries = list(entries)
    if all(e.arrival_ms is not None for e in entries):
        entries.sort(key=lambda e: e.arrival_ms)  # stable: file order among equal times
    if state is None:
        missing = next((e for e in entries if e.state is None), None)
        if missing is not None:
            raise TraceError(f"{trace}:{missing.line}: this job has no state: give --state "
                             "FILE (JSON or YAML), or a \"state\" on every line of the trace")
    changes: list[Change] = []
    for entry in entries:
        where = f"{trace}:{entry.line}"
        here = state
        if entry.state is not None:
            try:
                here = State(entry.state)
            except (RbeeError, TypeError, ValueError) as exc:
                raise TraceError(f"{where}: the line's state is invalid: {exc}") from None
        at = now_ms if now_ms is not None else entry.at if entry.at is not None else started_ms
        try:
            before = decide(old, entry.job, here, at)
            after = decide(new, entry.job, here, at)
        except RbeeError as exc:  # a job value with no Rhai equivalent
            raise TraceError(f"{where}: invalid job: {exc}") from None
        if not same(before, after):
            changes.append(Change(entry.line, entry.job.get("id"), summary(before),
                                  summary(after), entry.recorded))
    return DiffReport(old.name, new.name, trace, len(entries), changes)
