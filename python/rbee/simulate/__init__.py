"""The policy simulator (``rbee simulate``): a job trace replayed through a
discrete-event model of a cluster under one or more policies.

>>> from rbee.simulate import load_cluster, read_trace, load_policy, Simulation, summarize
>>> run = Simulation(load_cluster("cluster.yaml"), read_trace("trace.jsonl"),
...                  load_policy("cost-optimizer")).run()              # doctest: +SKIP
>>> summarize(run, "cost-optimizer")["latency_ms"]["p95"]              # doctest: +SKIP

See docs/simulator.md for the file formats and the model's assumptions.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use: `rbee simulate` lives in the `rbee`
# command, whose other subcommands should not pay for pydantic and friends.
_WHERE = {
    "Cluster": "cluster", "ClusterError": "cluster", "load_cluster": "cluster",
    "parse_cluster": "cluster", "GeneratorError": "generate", "GeneratorSpec": "generate",
    "generate": "generate", "RunResult": "model", "Simulation": "model",
    "PolicyNotFound": "policies", "load_policy": "policies", "render_table": "report",
    "summarize": "report", "TraceError": "trace", "TraceJob": "trace",
    "parse_trace": "trace", "read_trace": "trace",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rbee.simulate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rbee.simulate.{_WHERE[name]}"), name)
