"""Policy test files (DESIGN 4.2): ``rbee policy test PATH``.

A test file names a policy, a cluster state and cases, each a job and the
decision expected for it::

    policy: scheduler.rhai        # relative to the test file, or --policy
    state: state.json             # or an inline map as in DESIGN 2.2
    now: 2025-06-02T10:00:00Z     # optional: fixes now() (or now_ms: 1748858400000)
    job_defaults: {type: text-gen}   # optional: merged under every case's job
    cases:
      - name: big models go to the multi-GPU box
        job: {model: llama-3.1-70b-instruct}
        expect: {worker: big-box}     # or {reject: quota_exceeded, status: 429},
                                      # {wait: true}, {wait: REASON};
                                      # optionally actions: [evict, start_worker]

A case may also give its own ``state`` and ``now``/``now_ms``, and
``changes`` to the state for that case alone: per section (workers, pools,
models, tenants) records by id, whose fields are merged in (a new id adds a
record, ``null`` removes one), e.g. ``changes: {workers: {big-box: {active:
4}}}``; ``queue: [...]`` replaces the queue. YAML policies
are compiled with rule tracing, so the report says how often each rule
decided. Every problem in a test file is reported as ``file:line:col``.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rbee import yaml_nodes as yn
from rbee.errors import PolicyError, RbeeError
from rbee.policy_yaml import RULE_LOG_PREFIX
from rbee.scheduler import Decision, Policy, State
from rbee.yaml_nodes import LocatedError

__all__ = ["TestFileError", "CaseResult", "FileResult", "find_test_files", "run_file"]

_FILE_KEYS = ("policy", "state", "now", "now_ms", "job_defaults", "cases", "description")
_CASE_KEYS = ("name", "job", "expect", "state", "changes", "now", "now_ms")
_EXPECT_KEYS = ("worker", "reject", "wait", "status", "actions")
_RULE_LOG = re.compile(re.escape(RULE_LOG_PREFIX) + r"(\d+)$")


class TestFileError(RbeeError):
    """A test file (or a file it names) that cannot be used."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, path: Path | str, message: str, line: int | None = None,
                 column: int | None = None) -> None:
        where = ":".join(str(p) for p in (path, line, column) if p is not None)
        super().__init__(f"{where}: {message}")


@dataclass
class Case:
    name: str
    line: int
    job: dict
    expect: dict
    state: Any  # a State, shared by the cases that use the same state
    now_ms: int | None


@dataclass
class CaseResult:
    name: str
    line: int
    passed: bool
    expected: dict
    actual: dict | None = None
    error: str | None = None
    elapsed_us: int = 0
    rule: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class FileResult:
    path: str
    policy: str | None = None
    error: str | None = None
    cases: list[CaseResult] = field(default_factory=list)
    rules: list[dict] | None = None  # YAML policies: {index, rule, hits}
    undecided: int = 0  # YAML policies: decisions no rule made

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def failed(self) -> int:
        return sum(not c.passed for c in self.cases) + (1 if self.error else 0)

    def to_dict(self) -> dict:
        return {"file": self.path, "policy": self.policy, "error": self.error,
                "passed": self.passed, "failed": self.failed,
                "cases": [c.to_dict() for c in self.cases],
                "rules": self.rules, "undecided": self.undecided}


def find_test_files(path: str | Path) -> list[Path]:
    """PATH itself, or every ``*.test.yaml``/``*.test.yml`` under the folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for pattern in ("*.test.yaml", "*.test.yml")
                       for p in path.rglob(pattern))
        if not found:
            raise TestFileError(path, "no *.test.yaml files in this folder")
        return found
    if not path.exists():
        raise TestFileError(path, "no such file or folder")
    return [path]


def run_file(path: Path, policy_override: str | None = None) -> FileResult:
    """Runs one test file; problems with the file become ``result.error``."""
    result = FileResult(str(path))
    try:
        spec = _TestFile(path, policy_override)
        result.policy = str(spec.policy_path)
        policy = _compile(spec.policy_path)
        cases = spec.cases()
    except TestFileError as exc:
        result.error = str(exc)
        return result
    hits: dict[int, int] = {}
    for case in cases:
        outcome = _run_case(policy, case)
        result.cases.append(outcome)
        if outcome.rule is not None:
            hits[outcome.rule] = hits.get(outcome.rule, 0) + 1
        elif outcome.actual is not None:
            result.undecided += 1
    if policy.rules is not None:
        result.rules = [{"index": i, "rule": label, "hits": hits.get(i, 0)}
                        for i, label in enumerate(policy.rules)]
    return result


def _compile(path: Path) -> Policy:
    try:
        return Policy.from_file(path, trace_rules=True)
    except PolicyError as exc:
        raise TestFileError(exc.location(), f"the policy is refused: {exc.message}") from None
    except ValueError as exc:
        raise TestFileError(path, f"the policy is refused: {exc}") from None


def _run_case(policy: Policy, case: Case) -> CaseResult:
    out = CaseResult(case.name, case.line, False, case.expect)
    try:
        decision = policy.decide(case.job, case.state, now_ms=case.now_ms)
    except PolicyError as exc:
        out.error = str(exc)
        out.elapsed_us = exc.elapsed_us
        return out
    except RbeeError as exc:  # a job that does not convert to Rhai
        out.error = f"invalid job: {exc}"
        return out
    out.elapsed_us = decision.elapsed_us
    rules = [int(m.group(1)) for m in map(_RULE_LOG.match, decision.logs) if m]
    out.rule = rules[-1] if rules else None
    out.actual = _summary(decision)
    out.passed = _matches(case.expect, decision)
    return out


def _summary(decision: Decision) -> dict:
    summary: dict[str, Any] = {"kind": decision.kind}
    if decision.kind == "dispatch":
        summary["worker"] = decision.worker_id
    elif decision.kind == "reject":
        summary.update(reject=decision.reason, status=decision.status)
    else:
        summary.update(wait=decision.reason, retry_after_ms=decision.retry_after_ms)
    if decision.actions:
        summary["actions"] = decision.actions
    logs = [line for line in decision.logs if not _RULE_LOG.match(line)]
    if logs:
        summary["logs"] = logs
    return summary


def _matches(expect: dict, decision: Decision) -> bool:
    if "worker" in expect:
        ok = decision.kind == "dispatch" and decision.worker_id == expect["worker"]
    elif "reject" in expect:
        ok = decision.kind == "reject" and decision.reason == expect["reject"]
        ok = ok and expect.get("status") in (None, decision.status)
    else:
        wanted = expect["wait"]
        ok = decision.kind == "wait" and (wanted is True or decision.reason == wanted)
    if "actions" in expect:
        ok = ok and _actions_match(expect["actions"], decision.actions)
    return ok


def _actions_match(expected: list, actual: list[dict]) -> bool:
    """Kinds (``evict``) or partial maps (``{action: evict, worker_id: x}``), in order."""
    if len(expected) != len(actual):
        return False
    for want, got in zip(expected, actual):
        if isinstance(want, str):
            if got.get("action") != want:
                return False
        elif any(got.get(k) != v for k, v in want.items()):
            return False
    return True


def describe(summary: dict | None) -> str:
    """A decision summary in words, for the report."""
    if summary is None:
        return "no decision"
    kind = summary["kind"]
    if kind == "dispatch":
        text = f"dispatch to {summary['worker']}"
    elif kind == "reject":
        text = f"reject {summary['reject']} ({summary['status']})"
    else:
        retry = summary.get("retry_after_ms")
        text = f"wait ({summary['wait']}" + (f", look again in {retry} ms)" if retry else ")")
    if summary.get("actions"):
        acts = ", ".join(f"{a.get('action')} {a.get('worker_id') or a.get('model') or ''}".strip()
                         for a in summary["actions"])
        text += f" after [{acts}]"
    return text


def describe_expected(expect: dict) -> str:
    if "worker" in expect:
        text = f"worker {expect['worker']}"
    elif "reject" in expect:
        status = f" ({expect['status']})" if expect.get("status") else ""
        text = f"reject {expect['reject']}{status}"
    else:
        text = "wait" if expect["wait"] is True else f"wait ({expect['wait']})"
    if "actions" in expect:
        text += f" with actions {json.dumps(expect['actions'])}"
    return text


# -- reading test files ------------------------------------------------------------


class _TestFile:
    def __init__(self, path: Path, policy_override: str | None) -> None:
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TestFileError(path, f"cannot read ({exc})") from None
        self.states: dict[str, Any] = {}  # cache key -> State
        self.data: dict[str, dict] = {}  # state file -> its data
        try:
            root = yn.compose(text)
            if root is None or not yn.is_mapping(root):
                got = "an empty file" if root is None else yn.kind_of(root)
                raise LocatedError(f"expected a mapping with policy, state and cases, got {got}",
                                   root, line=None if root else 1, column=None if root else 1)
            self.fields = self._entries(root, _FILE_KEYS, "")
            self.root = root
            if policy_override is not None:
                self.policy_path = Path(policy_override)
            elif "policy" in self.fields:
                name = self._text(self.fields["policy"], "policy")
                self.policy_path = Path(os.path.normpath(path.parent / name))
                if not self.policy_path.is_file():
                    raise LocatedError(f"policy: {self.policy_path}: no such file",
                                       self.fields["policy"])
            else:
                raise LocatedError("missing 'policy:' (a file relative to this one; or give "
                                   "--policy)", root)
        except LocatedError as exc:
            raise TestFileError(path, exc.message, exc.line, exc.column) from None

    def cases(self) -> list[Case]:
        try:
            return self._cases()
        except LocatedError as exc:
            raise TestFileError(self.path, exc.message, exc.line, exc.column) from None

    def _cases(self) -> list[Case]:
        fields = self.fields
        node = fields.get("cases")
        if node is None or not yn.is_sequence(node) or not node.value:
            raise LocatedError("'cases:' must be a non-empty list of cases",
                               node if node is not None else self.root)
        default_state = self._state_data(fields["state"], "state") if "state" in fields \
            else None
        default_now = self._now(fields, "")
        defaults = self._map(fields["job_defaults"], "job_defaults") \
            if "job_defaults" in fields else {}
        cases = []
        for i, case_node in enumerate(node.value):
            where = f"cases[{i}]"
            if not yn.is_mapping(case_node):
                raise LocatedError(f"{where}: expected a mapping with name, job and expect, "
                                   f"got {yn.kind_of(case_node)}", case_node)
            f = self._entries(case_node, _CASE_KEYS, where)
            for required in ("name", "job", "expect"):
                if required not in f:
                    raise LocatedError(f"{where}: missing '{required}:'", case_node)
            name = self._text(f["name"], f"{where}.name")
            job = {**defaults, **self._map(f["job"], f"{where}.job")}
            job.setdefault("id", f"case-{i + 1}")
            source = self._state_data(f["state"], f"{where}.state") if "state" in f \
                else default_state
            if source is None:
                raise LocatedError(f"{where}: no state: give 'state:' in the file or the case",
                                   case_node)
            state = self._state(*source, f.get("state", fields.get("state")),
                                f"{where}.state" if "state" in f else "state",
                                f.get("changes"), f"{where}.changes")
            now = self._now(f, f"{where}.")
            cases.append(Case(name, yn.position(case_node)[0], job,
                              self._expect(f["expect"], f"{where}.expect"), state,
                              now if now is not None else default_now))
        return cases

    def _entries(self, node: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
        out = {}
        for key, key_node, value in yn.entries(node):
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LocatedError(f"{where + ': ' if where else ''}unknown key {key!r}{hint}; "
                                   f"expected {', '.join(allowed)}", key_node)
            out[key] = value
        return out

    def _text(self, node: Any, where: str) -> str:
        data = yn.value(node) if yn.is_scalar(node) else None
        if not isinstance(data, str) or not data.strip():
            raise LocatedError(f"{where}: expected a non-empty string, got {yn.kind_of(node)}",
                               node)
        return data

    def _map(self, node: Any, where: str) -> dict:
        if not yn.is_mapping(node):
            raise LocatedError(f"{where}: expected a mapping, got {yn.kind_of(node)}", node)
        return yn.value(node)

    def _now(self, fields: dict[str, Any], where: str) -> int | None:
        if "now_ms" in fields:
            data = yn.value(fields["now_ms"])
            if isinstance(data, bool) or not isinstance(data, int):
                raise LocatedError(f"{where}now_ms: expected milliseconds since the epoch, got "
                                   f"{yn.kind_of(fields['now_ms'])}", fields["now_ms"])
            return data
        if "now" not in fields:
            return None
        node = fields["now"]
        data = yn.value(node)
        if isinstance(data, str):
            try:
                data = datetime.fromisoformat(data.replace("Z", "+00:00"))
            except ValueError:
                data = None
        if isinstance(data, datetime):
            if data.tzinfo is None:
                data = data.replace(tzinfo=timezone.utc)
            return int(data.timestamp() * 1000)
        raise LocatedError(f"{where}now: expected a date and time such as "
                           f"2025-06-02T23:30:00Z, got {yn.kind_of(node)}", node)

    def _expect(self, node: Any, where: str) -> dict:
        if not yn.is_mapping(node):
            raise LocatedError(f"{where}: expected a mapping such as {{worker: ID}}, "
                               f"{{reject: CODE}} or {{wait: true}}", node)
        f = self._entries(node, _EXPECT_KEYS, where)
        given = [k for k in ("worker", "reject", "wait") if k in f]
        if len(given) != 1:
            raise LocatedError(f"{where}: give exactly one of worker, reject or wait "
                               f"(got {' and '.join(given) or 'none'})", node)
        expect = {}
        kind = given[0]
        value = yn.value(f[kind])
        if kind == "wait":
            if value is not True and not (isinstance(value, str) and value):
                raise LocatedError(f"{where}.wait: expected true or a reason, got "
                                   f"{yn.kind_of(f[kind])}", f[kind])
            expect["wait"] = value
        else:
            expect[kind] = self._text(f[kind], f"{where}.{kind}")
        if "status" in f:
            status = yn.value(f["status"])
            if kind != "reject" or isinstance(status, bool) or not isinstance(status, int):
                raise LocatedError(f"{where}.status: an HTTP status (an integer) goes with "
                                   "reject", f["status"])
            expect["status"] = status
        if "actions" in f:
            actions = yn.value(f["actions"])
            if not isinstance(actions, list) or not all(isinstance(a, (str, dict))
                                                        for a in actions):
                raise LocatedError(f"{where}.actions: expected a list of action kinds "
                                   "(evict, start_worker) or maps", f["actions"])
            expect["actions"] = actions
        return expect

    def _state_data(self, node: Any, where: str) -> tuple[str, dict]:
        """A state's raw data (inline, or a JSON/YAML file) and a cache key."""
        if yn.is_mapping(node):
            return f"{self.path}:{yn.position(node)[0]}", yn.value(node)
        name = self._text(node, where)
        key = str(self.path.parent / name)
        if key not in self.data:
            self.data[key] = _read_state(self.path.parent / name, node, where)
        return key, self.data[key]

    def _state(self, key: str, data: dict, node: Any, where: str,
               changes: Any = None, changes_where: str = "changes") -> Any:
        """The State for ``data``; built once per state unless ``changes``
        alter a copy of it for one case."""
        if changes is None and key in self.states:
            return self.states[key]
        if changes is not None:
            data = _apply_changes(data, changes, changes_where)
        try:
            state = State(data)
        except RbeeError as exc:
            raise LocatedError(f"{where}: the state ({key}) is invalid: {exc}", node) from None
        if changes is None:
            self.states[key] = state
        return state


_SECTIONS = ("workers", "pools", "models", "tenants")


def _apply_changes(data: dict, node: Any, where: str) -> dict:
    """A copy of ``data`` with a case's ``changes``: per section, records by id
    are merged with the given fields, added when new, removed when null;
    ``queue`` replaces the queue."""
    if not yn.is_mapping(node):
        raise LocatedError(f"{where}: expected a mapping of sections ({', '.join(_SECTIONS)}, "
                           f"queue), got {yn.kind_of(node)}", node)
    out = copy.deepcopy(data)
    for section, key_node, value in yn.entries(node):
        if section == "queue":
            queue = yn.value(value)
            if not isinstance(queue, list):
                raise LocatedError(f"{where}.queue: expected a list of jobs", value)
            out["queue"] = queue
            continue
        if section not in _SECTIONS:
            raise LocatedError(f"{where}: unknown section {section!r}; expected "
                               f"{', '.join(_SECTIONS)} or queue", key_node)
        if not yn.is_mapping(value):
            raise LocatedError(f"{where}.{section}: expected a mapping of id: fields", value)
        records = {r.get("id"): r for r in out.get(section) or [] if isinstance(r, dict)}
        for rid, _, fields_node in yn.entries(value):
            fields = yn.value(fields_node)
            if fields is None:
                records.pop(rid, None)
            elif isinstance(fields, dict):
                records[rid] = {**records.get(rid, {}), **fields, "id": rid}
            else:
                raise LocatedError(f"{where}.{section}.{rid}: expected a mapping of fields, or "
                                   f"null to remove it", fields_node)
        out[section] = list(records.values())
    return out


def _read_state(path: Path, node: Any, where: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LocatedError(f"{where}: {path}: no such file", node) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocatedError(f"{where}: cannot read {path} "
                           f"({getattr(exc, 'strerror', None) or exc})", node) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            root = yn.compose(text)
            data = yn.value(root) if root is not None else None
        except LocatedError as exc:
            raise TestFileError(path, exc.message, exc.line, exc.column) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TestFileError(path, f"invalid JSON: {exc.msg}", exc.lineno, exc.colno) from None
    if not isinstance(data, dict):
        raise TestFileError(path, f"the state must be a mapping, got {type(data).__name__}")
    return data



# -- the report --------------------------------------------------------------------


def report(results: list[FileResult], seconds: float) -> str:
    """The human-readable report of ``rbee policy test``."""
    lines: list[str] = []
    for result in results:
        policy = f" (policy {result.policy})" if result.policy else ""
        lines.append(f"{result.path}{policy}")
        if result.error:
            lines.append(f"  ERROR {result.error}")
        for case in result.cases:
            mark = "PASS" if case.passed else "FAIL"
            lines.append(f"  {mark}  {case.name}  ({case.elapsed_us} us)")
            if case.passed:
                continue
            lines.append(f"        line {case.line}: expected {describe_expected(case.expected)}")
            got = f"error: {case.error}" if case.error else describe(case.actual)
            lines.append(f"        got {got}")
            logs = (case.actual or {}).get("logs")
            if logs:
                lines.append(f"        logs: {' | '.join(logs)}")
        if result.rules is not None:
            lines.append("  rule hits:")
            for rule in result.rules:
                never = "  (never decided)" if rule["hits"] == 0 else ""
                lines.append(f"    {rule['hits']:>4}  {rule['rule']}{never}")
            if result.undecided:
                lines.append(f"    {result.undecided:>4}  (no rule decided)")
    passed = sum(r.passed for r in results)
    failed = sum(r.failed for r in results)
    errors = sum(1 for r in results if r.error)
    summary = f"{passed} passed, {failed} failed"
    if errors:
        summary += f" ({errors} file{'s' if errors > 1 else ''} could not run)"
    noun = "file" if len(results) == 1 else "files"
    lines.append(f"{summary} in {len(results)} {noun} ({seconds:.2f} s)")
    return "\n".join(lines)
