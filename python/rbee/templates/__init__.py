"""The template library: policies that ship with rbee.

Each template is a ``.rhai`` file, or a ``.yaml`` file of declarative rules
(DESIGN 3), in this folder; its first comment line (``//`` or ``#``) is its
description. Names are file names without the extension and are unique. The
six examples of the product brief are here verbatim. ``tests/`` holds a
policy test file for every template (``rbee policy test``).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["names", "source", "description", "filename", "policy_format"]

_SUFFIXES = (".rhai", ".yaml", ".yml")


def _files() -> dict[str, resources.abc.Traversable]:
    folder = resources.files(__name__)
    return {
        entry.name.rsplit(".", 1)[0]: entry
        for entry in folder.iterdir()
        if entry.name.endswith(_SUFFIXES) and entry.is_file()
    }


def _entry(name: str) -> resources.abc.Traversable:
    files = _files()
    stem = name.rsplit(".", 1)[0] if name.endswith(_SUFFIXES) else name
    entry = files.get(stem)
    if entry is None or (stem != name and entry.name != name):
        raise KeyError(f"no template named {name!r} (known: {', '.join(sorted(files))})")
    return entry


def names() -> list[str]:
    return sorted(_files())


def filename(name: str) -> str:
    """The template's file name, e.g. ``home.rhai`` or ``home-rules.yaml``."""
    return _entry(name).name


def policy_format(name: str) -> str:
    """``"rhai"`` or ``"yaml"``."""
    return "rhai" if filename(name).endswith(".rhai") else "yaml"


def source(name: str) -> str:
    """The template's text (``name`` with or without its extension); KeyError
    naming the known templates otherwise."""
    return _entry(name).read_text(encoding="utf-8")


def description(name: str) -> str:
    marker = "//" if policy_format(name) == "rhai" else "#"
    for line in source(name).splitlines():
        line = line.strip()
        if line.startswith(marker):
            return line.lstrip(marker[0]).strip()
        if line:
            break
    return ""
