"""Exceptions raised by rbee.

The tree::

    RbeeError
    ├── ValueConversionError      a Python value has no Rhai equivalent (also a TypeError)
    └── PolicyError               anything wrong with a policy; has line, column, message
        ├── PolicyCompileError    the script does not compile, or uses eval/import
        ├── PolicyRuntimeError    the script raised or hit a type error while deciding
        ├── PolicyReturnError     schedule_job returned something that is not a decision
        └── PolicyLimitError      a sandbox limit stopped the decision
            ├── PolicyTimeout         wall clock (timeout_ms)
            ├── TooManyOperations     operation count (max_operations)
            ├── MemoryLimitExceeded   memory allocated by the script (memory_bytes)
            ├── DataTooLarge          a string, array or map over its size limit
            └── StackOverflow         call depth (max_call_levels)

Each PolicyError has a stable snake_case ``code`` for clients and tests to
match on, next to the human message.
"""

from __future__ import annotations

__all__ = [
    "RbeeError",
    "ValueConversionError",
    "PolicyError",
    "PolicyCompileError",
    "PolicyRuntimeError",
    "PolicyReturnError",
    "PolicyLimitError",
    "PolicyTimeout",
    "TooManyOperations",
    "MemoryLimitExceeded",
    "DataTooLarge",
    "StackOverflow",
]


class RbeeError(Exception):
    """Base class of every error rbee raises on purpose."""


class ValueConversionError(RbeeError, TypeError):
    """A value could not be converted to Rhai; ``path`` says where it was."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class PolicyError(RbeeError):
    """A policy failed to compile or to decide.

    ``line`` and ``column`` are 1-based positions in the script, or None when
    the error has no position (a bad return value, for instance).
    """

    code = "policy_error"

    def __init__(
        self,
        message: str,
        line: int | None = None,
        column: int | None = None,
        *,
        file: str | None = None,
        logs: list[str] | None = None,
        operations: int = 0,
        elapsed_us: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.file = file
        self.logs = list(logs or [])
        self.operations = operations
        self.elapsed_us = elapsed_us

    def location(self) -> str:
        """``file:line:col`` (or the parts of it that are known)."""
        parts = [self.file or "<policy>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def __str__(self) -> str:
        return f"{self.location()}: {self.message}"

    def to_dict(self) -> dict:
        return {
            "type": "policy_error",
            "code": self.code,
            "message": self.message,
            "line": self.line,
            "column": self.column,
        }


class PolicyCompileError(PolicyError):
    code = "compile_error"


class PolicyRuntimeError(PolicyError):
    code = "runtime_error"


class PolicyReturnError(PolicyError):
    code = "bad_return"


class PolicyLimitError(PolicyError):
    code = "limit"


class PolicyTimeout(PolicyLimitError):
    code = "timeout"


class TooManyOperations(PolicyLimitError):
    code = "too_many_operations"


class MemoryLimitExceeded(PolicyLimitError):
    code = "memory_limit"


class DataTooLarge(PolicyLimitError):
    code = "data_too_large"


class StackOverflow(PolicyLimitError):
    code = "stack_overflow"
