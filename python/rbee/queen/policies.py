"""The policy life cycle: load, validate, swap, version, roll back, watch.

A candidate policy is compiled and then asked for a decision on sample jobs
against the live state; only if both succeed does it replace the active
policy, atomically (one assignment), and become a new stored version. A
refused policy changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

import yaml

from rbee.errors import PolicyCompileError, PolicyError
from rbee.policy_diff import decide, same, summary
from rbee.queen.statejournal import JournalWindow
from rbee.scheduler import DEFAULT_POLICY_SOURCE, Decision, Policy, Scheduler, State

__all__ = ["PolicyManager", "detect_format", "REPLAY_MAX"]

#: The most recorded decisions one preview may replay.
REPLAY_MAX = 1000

log = logging.getLogger("rbee.queen.policies")


def detect_format(source: str, declared: str | None = None, name: str = "") -> str:
    if declared is not None:
        if declared not in ("rhai", "yaml"):
            raise PolicyCompileError(f"unknown policy format {declared!r} (rhai or yaml)")
        return declared
    if name.endswith((".yaml", ".yml")):
        return "yaml"
    if "schedule_job" in source:
        return "rhai"
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError:
        return "rhai"
    return "yaml" if isinstance(data, dict) and "rules" in data else "rhai"


class PolicyManager:
    def __init__(
        self,
        store: Any,
        state: Callable[[], State],
        sample_jobs: Callable[[], list[dict[str, Any]]],
        limits: dict[str, int] | None = None,
        on_swap: Callable[[int], None] = lambda version: None,
    ) -> None:
        self.store = store
        self._state = state
        self._sample_jobs = sample_jobs
        self.limits = limits
        self.scheduler = Scheduler(limits=limits)
        self.version: int | None = None
        self.source = DEFAULT_POLICY_SOURCE
        self.format = "rhai"
        self.on_swap = on_swap
        self._watched: Path | None = None
        self._watched_mtime: float | None = None
        self.last_file_error: PolicyError | None = None

    # -- compiling and validating -------------------------------------------

    def compile(self, source: str, fmt: str | None = None, name: str = "<policy>") -> Policy:
        fmt = detect_format(source, fmt, name)
        # YAML rules compile to Rhai here; the store keeps the YAML and its format.
        return Policy.from_source(source, name=name, limits=self.limits, format=fmt)

    def validate(
        self, source: str, fmt: str | None = None, name: str = "<policy>"
    ) -> tuple[Policy, list[Decision]]:
        """Compiles and runs the sample jobs; raises PolicyError if either fails."""
        policy = self.compile(source, fmt, name)
        state = self._state()
        decisions = [policy.decide(job, state) for job in self._sample_jobs()]
        # A fresh compile goes live: the sample decisions must not leave
        # round-robin positions behind in the policy that will route traffic.
        return self.compile(source, fmt, name), decisions

    # -- changing the active policy -----------------------------------------

    def apply(self, source: str, fmt: str | None, origin: str, name: str = "<policy>") -> int:
        fmt = detect_format(source, fmt, name)
        policy, _ = self.validate(source, fmt, name)
        version = self.store.add_policy_version(source, fmt, origin)
        self._activate(policy, version, source, fmt)
        log.info("policy version %d active (%s)", version, origin)
        return version

    def _activate(self, policy: Policy, version: int, source: str, fmt: str) -> None:
        self.scheduler.set_policy(policy, validated=True)
        self.version, self.source, self.format = version, source, fmt
        self.on_swap(version)

    def rollback(self, version: int | None = None) -> int:
        """Makes `version` (default: the one before the active) active again,
        after validating it against the live state."""
        if version is None:
            older = [v["version"] for v in self.store.policy_versions()
                     if self.version is None or v["version"] < self.version]
            if not older:
                raise LookupError("there is no earlier policy version to roll back to")
            version = older[-1]
        stored = self.store.policy_version(version)
        if stored is None:
            raise LookupError(f"no policy version {version}")
        policy, _ = self.validate(stored["source"], stored["format"], f"<version {version}>")
        self.store.activate_policy_version(version)
        self._activate(policy, version, stored["source"], stored["format"])
        log.info("rolled back to policy version %d", version)
        return version

    def preview(
        self,
        jobs: list[dict[str, Any]],
        source: str | None = None,
        fmt: str | None = None,
        state: State | None = None,
    ) -> list[dict[str, Any]]:
        """Decisions for sample jobs, with no side effects: even the active
        policy is compiled afresh so its rotation state is left alone."""
        policy = self.compile(source if source is not None else self.source,
                              fmt if source is not None else self.format)
        state = state if state is not None else self._state()
        out = []
        for job in jobs:
            try:
                out.append(policy.decide(job, state).to_dict())
            except PolicyError as exc:
                out.append({"kind": "error", "error": exc.to_dict(), "logs": exc.logs})
        return out

    async def replay(
        self,
        records: list[tuple[dict[str, Any], int | None]],
        source: str,
        fmt: str | None = None,
        state: State | None = None,
        history: JournalWindow | None = None,
    ) -> dict[str, Any]:
        """Re-decides recorded decisions (oldest first, each with its state
        journal position) with the active policy and with the candidate
        ``source``; answers the candidate's decisions and the jobs whose
        decision changes between the two.

        Each job is decided as the policy saw it, at the time it was decided
        (``now()`` is that time again), on the state it was decided on when
        ``history`` still holds that state; otherwise (a decision older than
        the journal, or from before a restart) on the live state, copied
        once so that it holds still. A given ``state`` replaces both. No side
        effects: both policies are fresh compiled copies, so the live policy's
        rotation state is left alone.
        """
        # Read the active policy here, on the event loop, where swaps happen.
        active = self.compile(self.source, self.format, f"<version {self.version}>")
        candidate = self.compile(source, fmt, "<candidate>")
        snapshot = State((state if state is not None else self._state()).to_dict())
        if state is not None:
            history = None
        # A slow candidate may spend its whole time limit on every job; off the
        # event loop that costs this request time, not every other request's.
        return await asyncio.to_thread(_replay, active, candidate, records, snapshot, history)

    # -- start-up and the watched file --------------------------------------

    def start_fixed(self, source: str, origin: str) -> None:
        """Platform mode: one built-in policy, stored as a version when it is
        not already the active one; nothing may replace it afterwards."""
        active = self.store.active_policy_version()
        policy, _ = self.validate(source, "rhai", f"<{origin}>")
        if active is not None and active["source"] == source:
            version = active["version"]
        else:
            version = self.store.add_policy_version(source, "rhai", origin)
        self._activate(policy, version, source, "rhai")

    def start(self, path: str | None) -> None:
        """Chooses the first policy: the configured file (a refused file is an
        error at start), else the last active stored version, else the
        built-in default."""
        if path:
            self._watched = Path(path)
            source = self._read_watched()
            fmt = detect_format(source, None, path)
            active = self.store.active_policy_version()
            if active and active["source"] == source and active["origin"] == "file":
                policy, _ = self.validate(source, fmt, path)
                self._activate(policy, active["version"], source, fmt)
            else:
                self.apply(source, fmt, "file", name=path)
            return
        active = self.store.active_policy_version()
        if active is not None:
            try:
                policy, _ = self.validate(active["source"], active["format"],
                                          f"<version {active['version']}>")
                self._activate(policy, active["version"], active["source"], active["format"])
                return
            except PolicyError as exc:
                log.error("stored policy version %d no longer validates: %s",
                          active["version"], exc)
        self.apply(DEFAULT_POLICY_SOURCE, "rhai", "default", name="<built-in default>")

    def _read_watched(self) -> str:
        assert self._watched is not None
        try:
            stat = self._watched.stat()
            text = self._watched.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyCompileError(f"cannot read ({exc.strerror or exc})",
                                     file=str(self._watched)) from None
        self._watched_mtime = stat.st_mtime_ns
        return text

    def check_file(self) -> bool:
        """Reloads the watched file if it changed; answers whether it swapped."""
        if self._watched is None:
            return False
        try:
            mtime = self._watched.stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._watched_mtime:
            return False
        try:
            source = self._read_watched()
            if source == self.source:
                return False
            self.apply(source, None, "file", name=str(self._watched))
            self.last_file_error = None
            return True
        except PolicyError as exc:
            self.last_file_error = exc
            log.error("policy file change refused, the active policy stays: %s", exc)
            raise

    async def watch(self, interval_s: float = 0.5, on_result: Callable[..., None] = print) -> None:
        """Polls the watched file (a stat call; cheaper and more portable than
        an inotify dependency for one file)."""
        while True:
            await asyncio.sleep(interval_s)  # a plain sleep takes a cancel reliably
            try:
                if self.check_file():
                    on_result("ok")
            except PolicyError:
                on_result("refused")


def _replay(active: Policy, candidate: Policy,
            records: list[tuple[dict[str, Any], int | None]], live: State,
            history: JournalWindow | None) -> dict[str, Any]:
    decisions, changes = [], []
    seqs = [seq for _, seq in records] if history is not None else [None] * len(records)
    states = history.states(seqs) if history is not None else iter([None] * len(records))
    on_recorded = 0
    for (record, _), recorded_state in zip(records, states):
        state = recorded_state if recorded_state is not None else live
        on_recorded += recorded_state is not None
        job, at = record["job"], record.get("at")
        now = at if isinstance(at, int) and not isinstance(at, bool) else None
        before = decide(active, job, state, now)
        after = decide(candidate, job, state, now)
        decisions.append(after)
        if not same(before, after):
            recorded = summary(record) | {"policy_version": record.get("policy_version")}
            changes.append({"job_id": record.get("job_id", job.get("id")), "at": at,
                            "state": "recorded" if recorded_state is not None else "live",
                            "recorded": recorded, "active": summary(before),
                            "candidate": summary(after)})
    return {"decisions": decisions,
            "replay": {"jobs": len(records), "changed": len(changes),
                       "on_recorded_state": on_recorded,
                       "on_live_state": len(records) - on_recorded, "changes": changes}}
