"""The template library: policies that ship with rbee.

Each template is a ``.rhai`` file in this folder; its first comment line is its
description. The six examples of the product brief are here verbatim.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["names", "source", "description"]

_SUFFIXES = (".rhai",)


def _files() -> dict[str, resources.abc.Traversable]:
    folder = resources.files(__name__)
    return {
        entry.name.rsplit(".", 1)[0]: entry
        for entry in folder.iterdir()
        if entry.name.endswith(_SUFFIXES)
    }


def names() -> list[str]:
    return sorted(_files())


def source(name: str) -> str:
    """The template's text; KeyError naming the known templates otherwise."""
    files = _files()
    if name not in files:
        raise KeyError(f"no template named {name!r} (known: {', '.join(sorted(files))})")
    return files[name].read_text(encoding="utf-8")


def description(name: str) -> str:
    for line in source(name).splitlines():
        line = line.strip()
        if line.startswith("//"):
            return line.lstrip("/").strip()
    return ""
