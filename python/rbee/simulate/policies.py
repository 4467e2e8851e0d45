"""What ``--policy`` names: a policy file, a baseline shipped with the
simulator (``round-robin``, ``least-loaded``), or a template
(``rbee templates list``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Mapping

from rbee import templates
from rbee.scheduler import Policy

__all__ = ["baseline_names", "load_policy", "PolicyNotFound"]


class PolicyNotFound(LookupError):
    """Neither a file, nor a baseline, nor a template."""


def _baselines() -> dict[str, resources.abc.Traversable]:
    folder = resources.files(__package__).joinpath("baselines")
    return {e.name.rsplit(".", 1)[0]: e for e in folder.iterdir() if e.name.endswith(".rhai")}


def baseline_names() -> list[str]:
    return sorted(_baselines())


def load_policy(spec: str, limits: Mapping[str, int] | None = None) -> Policy:
    """Compiles the policy ``spec`` names. An existing file wins over a
    baseline of the same name, and a baseline over a template. Compile errors
    raise :class:`rbee.errors.PolicyError` as usual."""
    if Path(spec).is_file():
        return Policy.from_file(spec, limits=limits)
    baselines = _baselines()
    if spec in baselines:
        source = baselines[spec].read_text(encoding="utf-8")
        return Policy.from_source(source, name=f"baseline:{spec}", limits=limits)
    try:
        source = templates.source(spec)
    except KeyError:
        raise PolicyNotFound(
            f"--policy {spec}: no such file, baseline or template (baselines: "
            f"{', '.join(sorted(baselines))}; templates: {', '.join(templates.names())})"
        ) from None
    fmt = templates.policy_format(spec)
    return Policy.from_source(source, name=f"template:{spec}", limits=limits, format=fmt)
