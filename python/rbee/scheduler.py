"""Policies, decisions and the fallback chain (DESIGN 2.5 and 4.1).

>>> from rbee.scheduler import Policy, State
>>> policy = Policy.from_source('fn schedule_job(job, pools, workers) { workers.least_loaded() }')
>>> state = State({"workers": [{"id": "w1", "slots": 2, "active": 1}, {"id": "w2", "slots": 2}]})
>>> policy.decide({"id": "job-1", "model": "m"}, state).worker_id
'w2'
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping

from rbee import _engine
from rbee.errors import PolicyCompileError, PolicyError

__all__ = [
    "DEFAULT_POLICY_SOURCE",
    "Decision",
    "Policy",
    "PolicyError",
    "Scheduler",
    "State",
]

log = logging.getLogger("rbee.scheduler")

State = _engine.State

#: The built-in default of DESIGN 2.5: the least loaded available worker that
#: serves the job's model (any available worker when the job names none).
DEFAULT_POLICY_SOURCE = """\
// rbee built-in default policy
fn schedule_job(job, pools, workers) {
    if job.model == () { return workers.available().least_loaded(); }
    let serving = workers.with_model(job.model);
    // A model no worker serves, whatever its status, and the configuration
    // does not name: waiting for it would only end in a timeout. (Looked
    // into only when no ready or busy worker serves it.)
    if serving.is_empty() && !model_exists(job.model)
            && all_workers.with_model(job.model).is_empty() {
        return reject("model_not_found", 404);
    }
    serving.available().least_loaded()
}
"""

_YAML_SUFFIXES = (".yaml", ".yml")


class Decision:
    """The outcome of one scheduling decision.

    ``kind`` is ``"dispatch"`` (``worker_id`` says where), ``"reject"``
    (``reason`` is the code, ``status`` the HTTP status) or ``"wait"`` (the job
    stays queued; ``reason`` says why, ``retry_after_ms`` when to look again).
    ``actions`` lists what the queen should do first (evictions, worker starts).
    ``fallback`` is None, or says which policy decided after which failures.
    """

    __slots__ = (
        "kind",
        "worker_id",
        "reason",
        "status",
        "retry_after_ms",
        "actions",
        "logs",
        "elapsed_us",
        "operations",
        "memory_peak_bytes",
        "policy",
        "fallback",
    )

    def __init__(self, raw: Mapping[str, Any], policy: str, fallback: dict | None = None):
        self.kind: str = raw["kind"]
        self.worker_id: str | None = raw["worker_id"]
        self.reason: str | None = raw["reason"]
        self.status: int | None = raw["status"]
        self.retry_after_ms: int | None = raw["retry_after_ms"]
        self.actions: list[dict] = raw["actions"]
        self.logs: list[str] = raw["logs"]
        self.elapsed_us: int = raw["elapsed_us"]
        self.operations: int = raw["operations"]
        self.memory_peak_bytes: int = raw["memory_peak_bytes"]
        self.policy = policy
        self.fallback = fallback

    def to_dict(self) -> dict[str, Any]:
        # Spelled out rather than read by name from __slots__: every decision
        # the queen records goes through here, and this is twice as fast.
        return {"kind": self.kind, "worker_id": self.worker_id, "reason": self.reason,
                "status": self.status, "retry_after_ms": self.retry_after_ms,
                "actions": self.actions, "logs": self.logs, "elapsed_us": self.elapsed_us,
                "operations": self.operations, "memory_peak_bytes": self.memory_peak_bytes,
                "policy": self.policy, "fallback": self.fallback}

    def __repr__(self) -> str:
        target = self.worker_id if self.kind == "dispatch" else self.reason
        return f"<Decision {self.kind} {target!r} by {self.policy}>"


class Policy:
    """A compiled, sandboxed scheduling policy.

    Compile errors raise :class:`PolicyCompileError` with line and column;
    decisions raise the :class:`PolicyError` subclass for what went wrong.
    """

    __slots__ = ("_compiled", "source", "name", "format", "rhai", "_translation")

    def __init__(self, compiled: Any, source: str, name: str, *, format: str = "rhai",
                 translation: Any = None) -> None:
        self._compiled = compiled
        self.source = source  # what was given: Rhai, or the YAML rules
        self.name = name
        self.format = format
        self._translation = translation
        # The Rhai that runs: the source itself, or what the YAML compiled to.
        self.rhai: str = translation.rhai if translation is not None else source

    @classmethod
    def from_source(
        cls,
        source: str,
        *,
        name: str = "<policy>",
        limits: Mapping[str, int] | None = None,
        format: str = "rhai",
        trace_rules: bool = False,
    ) -> "Policy":
        """Compiles a policy. ``format="yaml"`` takes declarative rules
        (DESIGN 3); with ``trace_rules`` each rule that decides logs
        ``rbee:rule:<index>`` into the decision trace."""
        if format == "yaml":
            from rbee.policy_yaml import translate

            translation = translate(source, name, trace=trace_rules)
            return cls(translation.compile(limits), source, name, format="yaml",
                       translation=translation)
        if format != "rhai":
            raise PolicyCompileError(f"unknown policy format {format!r} (rhai or yaml)",
                                     file=name)
        compiled = _engine.CompiledPolicy(source, name, dict(limits) if limits else None)
        return cls(compiled, source, name)

    @classmethod
    def from_file(
        cls, path: str | Path, *, limits: Mapping[str, int] | None = None,
        trace_rules: bool = False,
    ) -> "Policy":
        """Compiles a ``.rhai`` file, or a ``.yaml``/``.yml`` file of rules."""
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyCompileError("no such file", file=str(path)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyCompileError(f"cannot read the file ({exc})", file=str(path)) from None
        fmt = "yaml" if path.suffix.lower() in _YAML_SUFFIXES else "rhai"
        return cls.from_source(source, name=str(path), limits=limits, format=fmt,
                               trace_rules=trace_rules)

    @property
    def rules(self) -> list[str] | None:
        """A YAML policy's rules as ``rules[i] "name"``, by index (what
        ``trace_rules`` logs refer to); None for a Rhai policy."""
        return None if self._translation is None else list(self._translation.rules)

    @property
    def limits(self) -> dict[str, int]:
        return self._compiled.limits

    def decide(self, job: Mapping[str, Any], state: Any, *, now_ms: int | None = None,
               release_gil: bool = True) -> Decision:
        """Decides where ``job`` runs. ``state`` is a :class:`State` (converted
        once, the fast path) or a plain dict (converted on every call).

        With ``release_gil`` (the default) other Python threads run while the
        script does; a caller deciding on an event loop, with nothing to gain
        from that, passes False and saves a hand-over of the GIL."""
        if not isinstance(job, dict):
            job = dict(job)
        try:
            raw = self._compiled.decide(job, state, now_ms, release_gil)
        except PolicyError as exc:
            # Errors name the policy's file, as compile errors do, and for YAML
            # the rule and the position in the YAML rather than generated code.
            if exc.file is None:
                exc.file = self.name
            if self._translation is not None:
                self._translation.remap(exc)
            raise
        return Decision(raw, self.name)

    def __repr__(self) -> str:
        return f"<Policy {self.name}>"


class Scheduler:
    """Holds the active policy, the last policy that worked and the built-in
    default, and falls back along that chain when a decision fails.

    The fallback is recorded on the decision (``decision.fallback``), logged,
    and counted in ``fallbacks`` by error code.
    """

    def __init__(
        self, policy: Policy | None = None, *, limits: Mapping[str, int] | None = None
    ) -> None:
        self.default = Policy.from_source(
            DEFAULT_POLICY_SOURCE, name="<built-in default>", limits=limits
        )
        self._lock = threading.Lock()
        self._active = policy or self.default
        self._last_good: Policy | None = None
        self._active_worked = False
        # The chain as `_chain` answers it, until a change of the policies
        # in it (set and cleared under the lock, read without it).
        self._chain_now: tuple[tuple[str, Policy], ...] | None = None
        self.fallbacks: dict[str, int] = {}

    @property
    def active(self) -> Policy:
        return self._active

    @property
    def last_good(self) -> Policy | None:
        return self._last_good

    def set_policy(self, policy: Policy, *, validated: bool = False) -> None:
        """Makes ``policy`` active. The outgoing policy becomes the first
        fallback if it worked (decided successfully, or was validated when it
        was set); otherwise the last policy that worked stays in that place.
        """
        with self._lock:
            if self._active is not self.default and self._active_worked:
                self._last_good = self._active
            self._active = policy
            self._active_worked = validated
            self._chain_now = None

    def _chain(self) -> tuple[tuple[str, Policy], ...]:
        chain = self._chain_now
        if chain is None:
            with self._lock:
                links = [("active", self._active)]
                if self._last_good is not None and self._last_good is not self._active:
                    links.append(("last_good", self._last_good))
                if self._active is not self.default:
                    links.append(("default", self.default))
                chain = self._chain_now = tuple(links)
        return chain

    def decide(self, job: Mapping[str, Any], state: Any, *, now_ms: int | None = None,
               release_gil: bool = True) -> Decision:
        failures: list[dict[str, Any]] = []
        first_error: PolicyError | None = None
        for role, policy in self._chain():
            try:
                decision = policy.decide(job, state, now_ms=now_ms, release_gil=release_gil)
            except PolicyError as exc:
                first_error = first_error or exc
                failures.append(
                    {"role": role, "policy": policy.name, **exc.to_dict(), "logs": exc.logs}
                )
                with self._lock:
                    self.fallbacks[exc.code] = self.fallbacks.get(exc.code, 0) + 1
                log.warning(
                    "policy %s failed (%s) at %s: %s", policy.name, exc.code,
                    exc.location(), exc.message,
                )
                continue
            # Read without the lock first: nearly every decision finds
            # nothing to change, and at worst the lock is taken for nothing.
            if policy is not self.default and (
                    self._last_good is not policy
                    or (policy is self._active and not self._active_worked)):
                with self._lock:
                    if self._last_good is not policy:
                        self._last_good = policy
                        self._chain_now = None
                    if policy is self._active:
                        self._active_worked = True
            if failures:
                decision.fallback = {"used": role, "policy": policy.name, "failures": failures}
            return decision
        assert first_error is not None
        raise first_error
