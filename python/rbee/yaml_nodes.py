"""YAML read as a tree of nodes that remember where they are.

The YAML policy compiler and the policy test runner both need to say
``file:line:col`` for a value that is wrong, which ``yaml.safe_load`` cannot
do: it forgets positions. Here the document is composed into PyYAML nodes
(which carry their marks) and values are constructed one node at a time.
Duplicate keys, which PyYAML silently resolves to the last one, are errors.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

__all__ = [
    "LocatedError",
    "compose",
    "position",
    "is_mapping",
    "is_sequence",
    "is_scalar",
    "value",
    "entries",
    "kind_of",
]

Node = yaml.Node
# libyaml's loader when PyYAML has it: the same nodes and marks, much faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LocatedError(Exception):
    """A problem with a value; ``node`` (or ``line``/``column``) says where."""

    def __init__(self, message: str, node: Node | None = None,
                 line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if node is not None and line is None:
            line, column = position(node)
        self.line = line
        self.column = column


def compose(text: str) -> Node | None:
    """The document's root node (None for an empty document).

    Raises LocatedError at the position PyYAML reports for invalid YAML.
    """
    try:
        return yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise LocatedError(f"invalid YAML: {problem}", line=line, column=column) from None
    except yaml.YAMLError as exc:  # errors without a position (rare: encoding)
        raise LocatedError(f"invalid YAML: {exc}") from None


def position(node: Node) -> tuple[int, int]:
    """1-based line and column where ``node`` starts."""
    return node.start_mark.line + 1, node.start_mark.column + 1


def is_mapping(node: Node) -> bool:
    return isinstance(node, yaml.MappingNode)


def is_sequence(node: Node) -> bool:
    return isinstance(node, yaml.SequenceNode)


def is_scalar(node: Node) -> bool:
    return isinstance(node, yaml.ScalarNode)


def kind_of(node: Node) -> str:
    """What the node holds, for messages: "a mapping", "a list", "a string"..."""
    if is_mapping(node):
        return "a mapping"
    if is_sequence(node):
        return "a list"
    data = value(node)
    if data is None:
        return "nothing (null)"
    if isinstance(data, bool):
        return f"a boolean ({str(data).lower()})"
    if isinstance(data, (int, float)):
        return f"a number ({data})"
    if isinstance(data, str):
        return f"a string ({data!r})"
    return type(data).__name__


def value(node: Node) -> Any:
    """The plain Python value of a node and everything under it."""
    constructor = SafeConstructor()
    try:
        return constructor.construct_object(node, deep=True)
    except ConstructorError as exc:
        mark = exc.problem_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else position(node)
        raise LocatedError(f"invalid YAML value: {exc.problem}", line=line,
                           column=column) from None


def entries(node: Node) -> list[tuple[str, Node, Node]]:
    """A mapping's ``(key, key_node, value_node)`` in document order.

    Keys must be strings and unique; ``<<`` merge keys are expanded first.
    """
    SafeConstructor().flatten_mapping(node)
    seen: dict[str, Node] = {}
    out = []
    for key_node, value_node in node.value:
        key = value(key_node) if is_scalar(key_node) else None
        if not isinstance(key, str):
            raise LocatedError(f"keys must be strings, got {kind_of(key_node)}", key_node)
        if key in seen:
            line, _ = position(seen[key])
            raise LocatedError(f"duplicate key {key!r} (first given on line {line})", key_node)
        seen[key] = key_node
        out.append((key, key_node, value_node))
    return out
