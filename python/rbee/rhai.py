"""Run a Rhai script in the policy sandbox."""

from __future__ import annotations

from typing import Any, Mapping

from rbee import _engine

__all__ = ["evaluate", "RHAI_VERSION"]

RHAI_VERSION: str = _engine.RHAI_VERSION


def evaluate(source: str, limits: Mapping[str, int] | None = None) -> Any:
    """Evaluates ``source`` with the sandbox limits of a policy and returns the
    value of its last expression as a Python value.

    >>> evaluate("let x = [1, 2, 3]; x.len()")
    3
    """
    return _engine.evaluate(source, dict(limits) if limits else None)
