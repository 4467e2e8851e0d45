"""Declarative YAML policies (DESIGN 3), compiled to readable Rhai.

>>> rhai = compile_yaml('''
... rules:
...   - name: Large models to multi-GPU
...     condition: {model_contains: 70b}
...     action: {select: "workers.filter(gpus > 1).first()"}
... ''', "p.yaml")
>>> for line in rhai.splitlines():
...     if "rules[0]" in line or "(|w|" in line:
...         print(line)
    // rules[0] "Large models to multi-GPU"
        let r = workers.filter(|w| w.gpus > 1).first();

Rules become a flat sequence of ``if`` statements, one per rule, rather than
an ``else if`` chain: Rhai's expression depth limit inside functions (32 by
default) is reached by about 28 chained ``else if``s or 13 nested
parentheses. For the same reason a condition is written inline only while it
is small; a larger one is computed in a few flat statements (still
short-circuiting) before its rule's ``if``. Selections keep the closures
written as ``|w| w.field ...``, the form the engine evaluates natively, so a
YAML policy decides as fast as the same policy written by hand.

Errors are PolicyCompileError with the line and column in the YAML file and
a message naming the rule and the field: ``rules[1] "Image gen to CUDA":
action.select: ...``. Errors Rhai finds in the generated code (a typo in a
selection, a runtime error in an ``expr``) are mapped back the same way.
"""

from __future__ import annotations

from typing import Any, Mapping

from rbee import _engine
from rbee import yaml_nodes as yn
from rbee.errors import PolicyCompileError, PolicyError
from rbee.policy_yaml_gen import RULE_LOG_PREFIX, Generator, Line, scalar_position
from rbee.yaml_nodes import LocatedError

__all__ = ["compile_yaml", "translate", "Translation", "RULE_LOG_PREFIX"]


class Translation:
    """The generated Rhai of one YAML policy and the way back to the YAML."""

    def __init__(self, text: str, name: str) -> None:
        self.text = text
        self.name = name
        self.rhai = ""
        self.rules: list[str] = []  # labels, `rules[0] "name"`, by index
        self._lines: dict[int, Line] = {}
        self._yaml_lines = text.splitlines()

    def locate(self, line: int | None, column: int | None) -> tuple[str, int | None, int | None]:
        """The ``label: field`` and YAML line/column for a generated position."""
        info = self._lines.get(line or 0)
        if info is None:
            return "", None, None
        where = info.default
        for start, end, span in info.spans:
            if column is not None and start <= column < end:
                where = span
                if span.fragment is not None:
                    offset = span.fragment.original_offset(column - start)
                    yl, yc = scalar_position(span.node, offset, self._yaml_lines)
                    return f"{span.label}: {span.field}", yl, yc
        if where is None:
            return "", None, None
        yl, yc = yn.position(where.node)
        # Scaffolding (no rule) gets the place of `rules:` and no prefix: a
        # limit error, for one, is reported at the start of schedule_job.
        return (f"{where.label}: {where.field}" if where.label else ""), yl, yc

    def remap(self, exc: PolicyError) -> PolicyError:
        """Points ``exc`` (raised by the generated Rhai) into the YAML file."""
        prefix, line, column = self.locate(exc.line, exc.column)
        if line is None:
            return exc
        if "maximum complexity" in exc.message:
            exc.message += " (simplify this or split the rule into several rules)"
        if prefix:
            exc.message = f"{prefix}: {exc.message}"
        exc.line, exc.column = line, column
        exc.args = (exc.message,)
        if exc.file is None or exc.file == "<policy>":
            exc.file = self.name
        return exc

    def compile(self, limits: Mapping[str, int] | None = None) -> Any:
        """The engine's compiled policy; compile errors point into the YAML."""
        try:
            return _engine.CompiledPolicy(self.rhai, self.name, dict(limits) if limits else None)
        except PolicyCompileError as exc:
            raise self.remap(exc) from None


def compile_yaml(text: str, name: str = "<policy>", *, trace: bool = False,
                 limits: Mapping[str, int] | None = None) -> str:
    """The Rhai equivalent of a YAML policy, checked by compiling it.

    With ``trace``, each rule logs ``rbee:rule:<index>`` when it decides.
    """
    translation = translate(text, name, trace=trace)
    translation.compile(limits)
    return translation.rhai


def translate(text: str, name: str = "<policy>", *, trace: bool = False) -> Translation:
    """Parses and checks a YAML policy and generates its Rhai (not compiled)."""
    out = Translation(text, name)
    try:
        Generator(out, trace).run()
    except LocatedError as exc:
        raise PolicyCompileError(exc.message, exc.line, exc.column, file=name) from None
    return out
