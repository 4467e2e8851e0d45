"""Generating Rhai from YAML rules: checking each rule as it is written out
(see ``rbee.policy_yaml`` for the language and the reasons behind its shape).

Every generated line records what produced it (a ``Where``: the rule, the
field, the YAML node, and for user-written code the rewritten fragment), so
``policy_yaml.Translation`` can map Rhai's positions back into the YAML.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any

from rbee import yaml_nodes as yn
from rbee.rhai_lex import KEYWORDS, Fragment, LexError, rewrite, tokenize
from rbee.yaml_nodes import LocatedError

__all__ = ["Generator", "Where", "Line", "scalar_position", "RULE_LOG_PREFIX"]

#: With ``trace``, a rule that decides logs ``rbee:rule:<index>`` first.
RULE_LOG_PREFIX = "rbee:rule:"

CONDITIONS = ("model", "model_contains", "task_type", "priority", "tenant", "region",
              "tags", "max_tokens_over", "expr", "all", "any", "not")
ACTIONS = ("select", "reject", "wait")
REJECT_STATUSES = (400, 403, 404, 409, 429, 503)  # as src/verdict.rs allows
_RULE_KEYS = ("name", "description", "condition", "action")
_TOP_KEYS = ("rules", "description")
# A condition weighing more is computed in statements, not inline (Rhai fails
# at about 26 chained `&&`, less with parentheses; 12 leaves ample room).
_INLINE_WEIGHT = 12
_WIDTH = 96  # generated lines are broken before this column when possible
_MAX_NESTING = 6  # all/any/not levels; each is a nested block when hoisted

# Field of the job each simple condition compares, as Rhai.
_JOB_FIELD = {
    "task_type": "job.type",
    "priority": "job.priority",
    "tenant": "job.tenant_id",
    "region": "job.user?.geo?.region",
}

# `model:` conditions compare against the names the job's model goes by,
# computed once, right before the first rule that needs them.
_MODEL_NAMES = "job_model_names"


@dataclass
class Where:
    """What produced a piece of generated code: a rule's field, its YAML node,
    and for user-written code the rewritten fragment."""

    label: str
    field: str
    node: Any
    fragment: Fragment | None = None


@dataclass
class Line:
    default: Where | None
    spans: list[tuple[int, int, Where]] = field(default_factory=list)  # 1-based columns


@dataclass
class _Cond:
    op: str  # "true", "false", "term", "all", "any", "not"
    parts: list = field(default_factory=list)  # a term: strings and (Fragment, Where)
    items: list["_Cond"] = field(default_factory=list)
    weight: int = 1


def _rhai_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 32:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def scalar_position(node: Any, offset: int, yaml_lines: list[str]) -> tuple[int, int]:
    """The YAML line and column of the character ``offset`` of a string node's
    value: exact for one-line plain or quoted scalars (escapes aside) and for
    literal blocks (``|``), the start of the value otherwise."""
    line, column = yn.position(node)
    style = getattr(node, "style", None) or None  # libyaml says "" for plain
    single_line = node.start_mark.line == node.end_mark.line
    if style in (None, "'", '"') and single_line:
        return line, column + (0 if style is None else 1) + offset
    if style == "|":
        before = node.value[:offset]
        k = before.count("\n")
        col = offset - (before.rfind("\n") + 1)
        content = yaml_lines[line:]  # the block starts on the line after `|`
        indent = next((len(x) - len(x.lstrip(" ")) for x in content if x.strip()), 0)
        return line + 1 + k, indent + col + 1
    return line, column


def _close(word: str, choices: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Generator:
    """Writes ``out.rhai`` (and ``out.rules``, ``out._lines``) for the YAML in
    ``out.text``; ``out`` is a ``policy_yaml.Translation``."""

    def __init__(self, out: Any, trace: bool) -> None:
        self.out = out
        self.trace = trace
        self.lines: list[str] = []
        self.label = ""
        self.counter = 0

    # -- output -------------------------------------------------------------

    def emit(self, indent: int, parts: list, default: Where | None = None) -> None:
        """Appends one generated line made of strings and (Fragment, Where)."""
        text = "    " * indent
        info = Line(default)
        for part in parts:
            if isinstance(part, str):
                text += part
                continue
            fragment, where = part
            start = len(text) + 1
            text += fragment.code
            info.spans.append((start, len(text) + 1, replace(where, fragment=fragment)))
        self.lines.append(text)
        self.out._lines[len(self.lines)] = info

    def emit_wrapped(self, indent: int, head: str, parts: list, tail: str,
                     where: Where) -> None:
        """Emits ``head + parts + tail``, breaking long conditions before their
        top-level `&&`/`||` so the generated code stays readable."""
        pieces: list[list] = [[]]  # split at top-level joiners, joiner kept in front
        depth = 0
        for part in parts:
            if isinstance(part, str):
                if depth == 0 and part in (" && ", " || "):
                    pieces.append([part.strip() + " "])
                    continue
                depth += part.count("(") - part.count(")")
            pieces[-1].append(part)

        def width(items: list) -> int:
            return sum(len(p) if isinstance(p, str) else len(p[0].code) for p in items)

        line: list = [head]
        base = len("    " * indent)
        for n, piece in enumerate(pieces):
            if n and base + width(line) + 1 + width(piece) + len(tail) > _WIDTH:
                self.emit(indent, line, where)
                line = ["    ", *piece]
            else:
                line.extend([" ", *piece] if n else piece)
        self.emit(indent, [*line, tail], where)

    def fail(self, node: Any, what: str, problem: str) -> LocatedError:
        prefix = f"{self.label}: " if self.label else ""
        return LocatedError(f"{prefix}{what}: {problem}", node)

    # -- the document -------------------------------------------------------

    def run(self) -> None:
        root = yn.compose(self.out.text)
        if root is None:
            raise LocatedError("the policy is empty: expected 'rules:' and a list of rules",
                               line=1, column=1)
        if not yn.is_mapping(root):
            raise LocatedError(f"expected a mapping with 'rules:', got {yn.kind_of(root)}", root)
        rules_node = None
        for key, key_node, value in yn.entries(root):
            if key == "rules":
                rules_node = value
            elif key == "description":
                self.text_of(value, key)
            elif not key.startswith("x-"):  # x-...: room for YAML anchors, as in Compose
                raise LocatedError(f"unknown key {key!r}{_close(key, _TOP_KEYS)}; a policy has "
                                   "'rules' (and optionally 'description' and x-... keys)",
                                   key_node)
        if rules_node is None:
            raise LocatedError("missing 'rules:' (a list of rules)", root)
        if not yn.is_sequence(rules_node) or not rules_node.value:
            raise LocatedError(f"rules: expected a non-empty list of rules, got "
                               f"{yn.kind_of(rules_node)}", rules_node)
        top = Where("", "rules", rules_node)
        source = self.out.name.rsplit("/", 1)[-1]
        source = "YAML rules" if source.startswith("<") else source
        for text in (f"// Generated by rbee from {source}: edit the YAML, not this file.",
                     "// Rules are tried in order; the first whose condition holds and whose",
                     "// action decides wins. A selection that finds no worker falls through."):
            self.emit(0, [text], top)
        self.emit(0, [""], top)
        self.emit(0, ["fn schedule_job(job, pools, workers) {"], top)
        names = [_model_names(rule) for rule in rules_node.value]
        for index, rule in enumerate(rules_node.value):
            if names[index] and not any(names[:index]):
                every = [n for rule_names in names for n in rule_names]
                self.model_names(list(dict.fromkeys(every)), Where(
                    f"rules[{index}]", "condition.model", rule))
            self.rule(index, rule)
        self.label = ""
        self.emit(0, [""], top)
        self.emit(1, ["// No rule decided: the job waits and is scheduled again on a change."],
                  top)
        self.emit(1, ["()"], top)
        self.emit(0, ["}"], top)
        self.out.rhai = "\n".join(self.lines) + "\n"

    def model_names(self, names: list[str], where: Where) -> None:
        """Which of the names `model:` rules mention the job's model goes by:
        one native with_model call per decision instead of one per condition."""
        self.emit(0, [""], where)
        self.emit(1, ["// The names `model:` rules use that the job's model goes by: its id"],
                  where)
        self.emit(1, ["// or an alias in the models catalogue (with_model resolves them)."],
                  where)
        self.emit(1, [f"let {_MODEL_NAMES} = ["], where)
        for name in names:
            literal = _rhai_string(name)
            self.emit(2, [f"#{{id: {literal}, model: {literal}}},"], where)
        self.emit(1, ["].with_model(job.model).map(|m| m.id);"], where)

    def text_of(self, node: Any, what: str, *, empty_ok: bool = False) -> str:
        data = yn.value(node) if yn.is_scalar(node) else None
        if not isinstance(data, str) or (not data.strip() and not empty_ok):
            raise self.fail(node, what, f"expected a non-empty string, got {yn.kind_of(node)}")
        return data

    def rule(self, index: int, node: Any) -> None:
        self.label = f"rules[{index}]"
        if not yn.is_mapping(node):
            raise self.fail(node, "rule", f"expected a mapping with 'condition' and 'action', "
                            f"got {yn.kind_of(node)}")
        items = yn.entries(node)
        fields = {key: value for key, _, value in items}
        if "name" in fields:
            name = self.text_of(fields["name"], "name")
            self.label = f"rules[{index}] {_quote(name)}"
        for key, key_node, _ in items:
            if key not in _RULE_KEYS:
                raise self.fail(key_node, key, f"unknown key{_close(key, _RULE_KEYS)}; a rule "
                                "has name, condition, action (and optionally description)")
        if "description" in fields:
            self.text_of(fields["description"], "description", empty_ok=True)
        for required in ("condition", "action"):
            if required not in fields:
                hint = " (use 'condition: true' for a rule that always applies)" \
                    if required == "condition" else ""
                raise self.fail(node, required, f"missing{hint}")
        self.out.rules.append(self.label)
        cond = self.condition(fields["condition"], "condition", 0)
        action = fields["action"]
        here = Where(self.label, "condition", fields["condition"])
        self.emit(0, [""], here)
        self.emit(1, [f"// {_comment(self.label)}"], here)
        if cond.op == "false":
            self.emit(1, ["if false { // disabled: the condition is false"], here)
            self.action(index, action, 2)
            self.emit(1, ["}"], here)
            return
        if cond.op == "true":
            self.action(index, action, 1)
            return
        if cond.weight <= _INLINE_WEIGHT:
            self.emit_wrapped(1, "if ", self.inline(cond, top=True), " {", here)
        else:
            var = f"c{index}"
            self.counter = 0
            self.statements(cond, var, 1, here, declare=True)
            self.emit(1, [f"if {var} {{"], here)
        self.action(index, action, 2)
        self.emit(1, ["}"], here)

    # -- conditions ---------------------------------------------------------

    def condition(self, node: Any, path: str, depth: int) -> _Cond:
        if depth > _MAX_NESTING:
            raise self.fail(node, path, f"conditions nest more than {_MAX_NESTING} levels "
                            "deep; split the rule into several rules or use expr")
        if yn.is_scalar(node):
            data = yn.value(node)
            if isinstance(data, bool):
                return _Cond("true" if data else "false", weight=0)
        if not yn.is_mapping(node):
            raise self.fail(node, path, "expected true, false or a mapping of conditions "
                            f"({', '.join(CONDITIONS)}), got {yn.kind_of(node)}")
        items = yn.entries(node)
        if not items:
            raise self.fail(node, path, "an empty condition; use 'true' for always")
        conds = [self.key(key, key_node, value, f"{path}.{key}", depth)
                 for key, key_node, value in items]
        return _combine("all", conds)

    def key(self, key: str, key_node: Any, node: Any, path: str, depth: int) -> _Cond:
        if key in ("all", "any"):
            if not yn.is_sequence(node) or not node.value:
                raise self.fail(node, path, f"expected a non-empty list of conditions, got "
                                f"{yn.kind_of(node)}")
            return _combine(key, [self.condition(item, f"{path}[{i}]", depth + 1)
                                  for i, item in enumerate(node.value)])
        if key == "not":
            inner = self.condition(node, path, depth + 1)
            if inner.op in ("true", "false"):
                return _Cond("false" if inner.op == "true" else "true", weight=0)
            return _Cond("not", items=[inner], weight=inner.weight + 3)
        if key == "expr":
            text = self.text_of(node, path)
            fragment = self.fragment(node, path, text, shorthand=True)
            weight = 1 + sum(t.kind == "op" for t in tokenize(fragment.code))
            return _Cond("term", parts=[(fragment, Where(self.label, path, node))],
                         weight=weight)
        if key == "tags":
            if not yn.is_mapping(node) or not node.value:
                raise self.fail(node, path, "expected a mapping of tag: value pairs, got "
                                f"{yn.kind_of(node)}")
            terms = []
            for tag, tag_node, value in yn.entries(node):
                data = yn.value(value) if yn.is_scalar(value) else None
                if isinstance(data, bool):
                    data = str(data).lower()
                if not isinstance(data, (str, int, float)):
                    raise self.fail(value, f"{path}.{tag}", "expected a string or a number "
                                    f"(tags are compared as text), got {yn.kind_of(value)}")
                access = f"job.tags?.{tag}" if _plain_name(tag) else \
                    f"job.tags?[{_rhai_string(tag)}]"
                terms.append(_Cond("term", parts=[f"{access} == {_rhai_string(str(data))}"]))
            return _combine("all", terms)
        if key == "max_tokens_over":
            data = yn.value(node) if yn.is_scalar(node) else None
            if isinstance(data, bool) or not isinstance(data, (int, float)) or data < 0:
                raise self.fail(node, path, f"expected a number of tokens, got "
                                f"{yn.kind_of(node)}")
            return _Cond("term", parts=[f"job.max_tokens > {data!r}"])
        if key in ("model", "model_contains", *_JOB_FIELD):
            values = self.names(node, path)
            if key == "model":
                terms = [f"{_rhai_string(v)} in {_MODEL_NAMES}" for v in values]
            elif key == "model_contains":
                # `?.` gives () for a job without a model; `== true` makes that false.
                terms = [f"job.model?.contains({_rhai_string(v)}) == true" for v in values]
            else:
                terms = [f"{_JOB_FIELD[key]} == {_rhai_string(v)}" for v in values]
            return _combine("any", [_Cond("term", parts=[t]) for t in terms])
        raise self.fail(key_node, path, f"unknown condition{_close(key, CONDITIONS)}; "
                        f"conditions are {', '.join(CONDITIONS)}")

    def names(self, node: Any, path: str) -> list[str]:
        """A string, or a non-empty list of strings (any of them matches)."""
        if yn.is_sequence(node) and node.value:
            return [self.text_of(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if yn.is_sequence(node):
            raise self.fail(node, path, "expected a string or a non-empty list of strings")
        return [self.text_of(node, path)]

    def fragment(self, node: Any, path: str, text: str, *, shorthand: bool) -> Fragment:
        try:
            return rewrite(text, shorthand=shorthand)
        except LexError as exc:
            line, column = scalar_position(node, exc.offset, self.out._yaml_lines)
            raise LocatedError(f"{self.label}: {path}: {exc.message}", line=line,
                               column=column) from None

    def inline(self, cond: _Cond, *, top: bool = False) -> list:
        """The condition as one Rhai expression (parts for `emit`)."""
        if cond.op == "term":
            user_code = any(not isinstance(p, str) for p in cond.parts)
            return cond.parts if top or not user_code else ["(", *cond.parts, ")"]
        if cond.op == "not":
            inner = self.inline(cond.items[0], top=True)
            return ["!(", *inner, ")"]
        joiner = " && " if cond.op == "all" else " || "
        parts: list = []
        for i, item in enumerate(cond.items):
            if i:
                parts.append(joiner)
            nested = item.op in ("all", "any") and item.op != cond.op
            parts.extend(["(", *self.inline(item, top=True), ")"] if nested
                         else self.inline(item))
        return parts

    def statements(self, cond: _Cond, var: str, indent: int, here: Where,
                   *, declare: bool) -> None:
        """Computes a large condition into ``var`` in flat statements; later
        parts run only when still needed, as `&&` and `||` would."""
        let = "let " if declare else ""
        if cond.weight <= _INLINE_WEIGHT or cond.op == "term":
            self.emit_wrapped(indent, f"{let}{var} = ", self.inline(cond, top=True), ";", here)
            return
        self.counter += 1
        sub = f"{var}_{self.counter}"
        if cond.op == "not":
            self.statements(cond.items[0], sub, indent, here, declare=True)
            self.emit(indent, [f"{let}{var} = !{sub};"], here)
            return
        # Consecutive small parts share a line; a large part gets its own block.
        groups: list[list[_Cond]] = []
        for item in cond.items:
            if groups and _combine(cond.op, [*groups[-1], item]).weight <= _INLINE_WEIGHT:
                groups[-1].append(item)
            else:
                groups.append([item])
        guard = var if cond.op == "all" else f"!{var}"
        for n, group in enumerate(groups):
            part = _combine(cond.op, group)
            if n == 0:
                self.statements(part, var, indent, here, declare=declare)
                continue
            self.emit(indent, [f"if {guard} {{"], here)
            self.statements(part, var, indent + 1, here, declare=False)
            self.emit(indent, ["}"], here)

    # -- actions ------------------------------------------------------------

    def action(self, index: int, node: Any, indent: int) -> None:
        if not yn.is_mapping(node):
            raise self.fail(node, "action", "expected a mapping with one of select, reject "
                            f"or wait, got {yn.kind_of(node)}")
        items = yn.entries(node)
        for key, key_node, _ in items:
            if key not in ACTIONS:
                raise self.fail(key_node, f"action.{key}", f"unknown action"
                                f"{_close(key, ACTIONS)}; actions are select, reject, wait")
        if len(items) != 1:
            given = " and ".join(k for k, _, _ in items) or "none"
            raise self.fail(node, "action", f"give exactly one of select, reject or wait "
                            f"(got {given})")
        key, _, value = items[0]
        where = Where(self.label, f"action.{key}", value)
        log = f'log("{RULE_LOG_PREFIX}{index}"); ' if self.trace else ""
        if key == "select":
            text = self.text_of(value, "action.select")
            fragment = self.fragment(value, "action.select", text, shorthand=True)
            self.emit(indent, ["let r = ", (fragment, where), ";"], where)
            self.emit(indent, [f"if r != () {{ {log}return r; }}"], where)
            return
        call = self.reject(value) if key == "reject" else self.wait(value)
        self.emit(indent, [f"{log}return {call};"], where)

    def reject(self, node: Any) -> str:
        code, status = self.call_args(node, "action.reject", "code", "status")
        if status is None:
            return f"reject({_rhai_string(code)})"
        data = yn.value(status) if yn.is_scalar(status) else None
        if isinstance(data, bool) or data not in REJECT_STATUSES:
            raise self.fail(status, "action.reject.status", "expected one of "
                            f"{', '.join(map(str, REJECT_STATUSES))}, got {yn.kind_of(status)}")
        return f"reject({_rhai_string(code)}, {data})"

    def wait(self, node: Any) -> str:
        reason, ms = self.call_args(node, "action.wait", "reason", "ms")
        if ms is None:
            return f"wait({_rhai_string(reason)})"
        data = yn.value(ms) if yn.is_scalar(ms) else None
        if isinstance(data, bool) or not isinstance(data, int) or data < 0:
            raise self.fail(ms, "action.wait.ms", "expected milliseconds (an integer, 0 or "
                            f"more), got {yn.kind_of(ms)}")
        return f"wait({_rhai_string(reason)}, {data})"

    def call_args(self, node: Any, path: str, first: str, second: str) -> tuple[str, Any]:
        """``CODE`` or ``{first: CODE, second: N}``: the text and the N node."""
        if not yn.is_mapping(node):
            return self.text_of(node, path), None
        fields = {}
        for key, key_node, value in yn.entries(node):
            if key not in (first, second):
                raise self.fail(key_node, f"{path}.{key}", f"unknown key"
                                f"{_close(key, (first, second))}; expected {first} and "
                                f"optionally {second}")
            fields[key] = value
        if first not in fields:
            raise self.fail(node, f"{path}.{first}", "missing")
        return self.text_of(fields[first], f"{path}.{first}"), fields.get(second)


def _combine(op: str, items: list[_Cond]) -> _Cond:
    """``all``/``any`` of conditions, flattened, with constants folded."""
    flat: list[_Cond] = []
    for item in items:
        if item.op == op:
            flat.extend(item.items)
        else:
            flat.append(item)
    neutral, absorbing = ("true", "false") if op == "all" else ("false", "true")
    if any(i.op == absorbing for i in flat):
        return _Cond(absorbing, weight=0)
    flat = [i for i in flat if i.op != neutral]
    if not flat:
        return _Cond(neutral, weight=0)
    if len(flat) == 1:
        return flat[0]
    weight = sum(i.weight + (3 if i.op in ("all", "any") else 0) for i in flat)
    return _Cond(op, items=flat, weight=weight)


def _model_names(rule: Any) -> list[str]:
    """The names a rule's `model:` conditions mention, found before the rule is
    checked (anything malformed is left to the check)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if not yn.is_mapping(node):
            return
        for key_node, value in node.value:
            key = key_node.value if yn.is_scalar(key_node) else None
            if key == "model":
                items = value.value if yn.is_sequence(value) else [value]
                found.extend(i.value for i in items if yn.is_scalar(i) and i.value)
            elif key in ("all", "any") and yn.is_sequence(value):
                for item in value.value:
                    walk(item)
            elif key == "not":
                walk(value)

    if yn.is_mapping(rule):
        for key_node, value in rule.value:
            if yn.is_scalar(key_node) and key_node.value == "condition":
                walk(value)
    return found


def _plain_name(key: str) -> bool:
    return key.isidentifier() and key.isascii() and key not in KEYWORDS


def _quote(name: str) -> str:
    return '"' + " ".join(name.split()).replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return " ".join(text.split())
