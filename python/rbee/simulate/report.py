"""Figures of a run: the summary of each policy (what ``--json`` writes),
and the side-by-side table printed in the terminal.

Percentiles are nearest-rank (each one is a value that occurred). Latency is
arrival to the last token; time to first token (TTFT) is arrival to the
first token, network included; queue wait is arrival to the start of work,
in the queen's queue and the worker's own. Utilisation is busy slot time
over ``slots x span``, the span running from 0 to the last arrival or
completion. Cost per 1k jobs is per 1,000 completed jobs.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from rbee.simulate.model import RunResult

__all__ = ["summarize", "percentile", "render_table", "table_rows", "timeline", "compare"]

TIMELINE_BINS = 100


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _spread(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, Any]:
    values.sort()
    out: dict[str, Any] = {f"p{p}": _ms(percentile(values, p)) for p in points}
    out["max"] = _ms(values[-1]) if values else None
    out["mean"] = _ms(sum(values) / len(values)) if values else None
    return out


def timeline(run: RunResult, bins: int = TIMELINE_BINS) -> dict[str, list]:
    """Utilisation and mean queue wait in ``bins`` equal slices of the span."""
    span = run.end_ms
    capacity = sum(w.slots for w in run.workers)
    if span <= 0 or capacity == 0:
        return {"t_s": [], "utilisation": [], "queue_wait_ms": []}
    width = span / bins
    busy = [0.0] * bins
    waits: list[list[float]] = [[] for _ in range(bins)]
    for job in run.jobs:
        if job.start is None:
            continue
        first = min(bins - 1, int(job.start / width))
        waits[first].append(job.start - job.arrival)
        if job.end is None or job.end <= job.start:
            continue
        last = min(bins - 1, int(job.end / width))
        for b in range(first, last + 1):
            lo, hi = max(job.start, b * width), min(job.end, (b + 1) * width)
            if hi > lo:
                busy[b] += hi - lo
    return {
        "t_s": [round((b + 0.5) * width / 1000.0, 3) for b in range(bins)],
        "utilisation": [round(x / (capacity * width), 4) for x in busy],
        "queue_wait_ms": [round(sum(w) / len(w), 3) if w else 0.0 for w in waits],
    }


def summarize(run: RunResult, label: str) -> dict[str, Any]:
    """Every figure of one policy's run, as plain JSON data."""
    jobs = run.jobs
    done = [j for j in jobs if j.outcome == "completed"]
    rejected = Counter(j.reason for j in jobs if j.outcome == "rejected")
    expired = Counter(j.reason for j in jobs if j.outcome == "expired")
    latencies = [j.end - j.arrival for j in done]
    cost = sum(j.cost for j in done)
    capacity = sum(w.slots for w in run.workers) * run.end_ms
    busy = sum(w.busy_ms for w in run.workers)
    with_deadline = [j for j in jobs if j.deadline_at is not None]
    by_tenant: dict[str, list] = defaultdict(list)
    for job in jobs:
        by_tenant[job.trace.tenant_id or "(none)"].append(job)
    done_tokens = sum(j.trace.prompt_tokens + j.trace.output_tokens for j in done)
    tenants = {}
    for tenant, items in sorted(by_tenant.items()):
        finished = [j for j in items if j.outcome == "completed"]
        tokens = sum(j.trace.prompt_tokens + j.trace.output_tokens for j in finished)
        slot_ms = sum(j.end - j.start for j in finished)
        tenants[tenant] = {
            "jobs": len(items),
            "completed": len(finished),
            "rejected": sum(1 for j in items if j.outcome == "rejected"),
            "deadline_misses": sum(1 for j in items if j.deadline_missed),
            "share_of_slot_time": round(slot_ms / busy, 4) if busy else 0.0,
            "share_of_tokens": round(tokens / done_tokens, 4) if done_tokens else 0.0,
            "cost": round(sum(j.cost for j in finished), 9),
            "latency_ms": _spread([j.end - j.arrival for j in finished], (50, 95)),
        }
    by_priority: dict[str, list[float]] = defaultdict(list)
    for job in done:
        by_priority[job.trace.priority].append(job.end - job.arrival)
    latencies.sort()
    quantiles = [_ms(percentile(latencies, q)) for q in range(101)]
    return {
        "policy": label,
        "source": run.policy,
        "jobs": len(jobs),
        "completed": len(done),
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "expired": sum(expired.values()),
        "expired_by_reason": dict(sorted(expired.items())),
        "deadline_misses": sum(1 for j in with_deadline if j.deadline_missed),
        "jobs_with_deadline": len(with_deadline),
        "total_cost": round(cost, 9),
        "cost_per_1k_jobs": round(cost / len(done) * 1000, 9) if done else None,
        "tokens_completed": done_tokens,
        "latency_ms": _spread(latencies),
        "latency_quantiles_ms": quantiles,
        "ttft_ms": _spread([j.first_token - j.arrival for j in done], (50, 95, 99)),
        "queue_wait_ms": _spread([j.start - j.arrival for j in jobs if j.start is not None],
                                 (50, 95, 99)),
        "latency_by_priority_ms": {p: _spread(v, (50, 95)) for p, v in
                                   sorted(by_priority.items())},
        "utilisation": round(busy / capacity, 4) if capacity else 0.0,
        "tenants": tenants,
        "workers": {
            w.id: {"completed": w.completed,
                   "utilisation": round(w.busy_ms / (w.slots * run.end_ms), 4)
                   if run.end_ms else 0.0}
            for w in run.workers
        },
        "decisions": run.decisions,
        "fallbacks": dict(sorted(run.fallbacks.items())),
        "unknown_worker_dispatches": run.unknown_worker,
        "model_mismatches": run.model_mismatch,
        "decisions_with_actions": run.actions,
        "span_ms": round(run.end_ms, 3),
        "timeline": timeline(run),
        "speed": {
            "wall_s": round(run.wall_s, 4),
            "jobs_per_s": round(len(jobs) / run.wall_s, 1) if run.wall_s > 0 else None,
        },
    }


def _change(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return round((new - old) / old, 4)


def compare(summaries: list[dict[str, Any]], baseline: str) -> None:
    """Adds ``vs_baseline`` (relative changes) to each summary."""
    base = next(s for s in summaries if s["policy"] == baseline)
    for s in summaries:
        s["vs_baseline"] = {
            "baseline": baseline,
            "total_cost": _change(s["total_cost"], base["total_cost"]),
            "cost_per_1k_jobs": _change(s["cost_per_1k_jobs"], base["cost_per_1k_jobs"]),
            "latency_p50": _change(s["latency_ms"]["p50"], base["latency_ms"]["p50"]),
            "latency_p95": _change(s["latency_ms"]["p95"], base["latency_ms"]["p95"]),
            "ttft_p50": _change(s["ttft_ms"]["p50"], base["ttft_ms"]["p50"]),
        }


# -- the terminal table --------------------------------------------------------


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _t(value: float | None) -> str:
    """Milliseconds, shown in the unit that keeps them readable."""
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:,.1f} s"
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.4f}" if value >= 0.01 or value == 0 else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def table_rows(summaries: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The table's rows: a label, then one cell per policy."""
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, fn: Any) -> None:
        rows.append((name, [fn(s) for s in summaries]))

    row("jobs", lambda s: _n(s["jobs"]))
    row("completed", lambda s: _n(s["completed"]))
    row("rejected", lambda s: _n(s["rejected"]))
    reasons = sorted({r for s in summaries for r in s["rejected_by_reason"]})
    for reason in reasons:
        row(f"  {reason}", lambda s, r=reason: _n(s["rejected_by_reason"].get(r, 0)))
    row("expired in queue", lambda s: _n(s["expired"]))
    row("deadline misses", lambda s: f"{s['deadline_misses']:,} of {s['jobs_with_deadline']:,}")
    row("total cost", lambda s: _money(s["total_cost"]))
    row("cost / 1k completed", lambda s: _money(s["cost_per_1k_jobs"]))
    for p in ("p50", "p95", "p99"):
        row(f"latency {p}", lambda s, p=p: _t(s["latency_ms"][p]))
    for p in ("p50", "p95"):
        row(f"TTFT {p}", lambda s, p=p: _t(s["ttft_ms"][p]))
    for p in ("p50", "p95", "max"):
        row(f"queue wait {p}", lambda s, p=p: _t(s["queue_wait_ms"][p]))
    row("utilisation", lambda s: _pct(s["utilisation"]))
    tenants = sorted({t for s in summaries for t in s["tenants"]})
    if tenants != ["(none)"]:
        for tenant in tenants:
            row(f"share {tenant}", lambda s, t=tenant: _pct(
                s["tenants"].get(t, {}).get("share_of_slot_time")))
    if any(s["fallbacks"] for s in summaries):
        row("policy fallbacks", lambda s: _n(sum(s["fallbacks"].values())))
    if any(s["model_mismatches"] for s in summaries):
        row("wrong-model dispatches", lambda s: _n(s["model_mismatches"]))
    if any(s["unknown_worker_dispatches"] for s in summaries):
        row("unknown-worker dispatches", lambda s: _n(s["unknown_worker_dispatches"]))
    if any("vs_baseline" in s for s in summaries):
        base = summaries[0].get("vs_baseline", {}).get("baseline")
        row(f"cost vs {base}", lambda s: _signed(s["vs_baseline"]["total_cost"]))
        row(f"latency p50 vs {base}", lambda s: _signed(s["vs_baseline"]["latency_p50"]))
        row(f"latency p95 vs {base}", lambda s: _signed(s["vs_baseline"]["latency_p95"]))
    row("simulated jobs/s", lambda s: _n(int(s["speed"]["jobs_per_s"] or 0)))
    return rows


def render_table(summaries: list[dict[str, Any]]) -> str:
    """The policies side by side, one column each."""
    rows = table_rows(summaries)
    header = ["", *[s["policy"] for s in summaries]]
    widths = [max(len(header[0]), *(len(name) for name, _ in rows))]
    for i in range(len(summaries)):
        widths.append(max(len(header[i + 1]), *(len(cells[i]) for _, cells in rows)))
    lines = ["  ".join([header[0].ljust(widths[0]),
                        *(h.rjust(w) for h, w in zip(header[1:], widths[1:]))])]
    lines.append("  ".join("-" * w for w in widths))
    for name, cells in rows:
        lines.append("  ".join([name.ljust(widths[0]),
                                *(c.rjust(w) for c, w in zip(cells, widths[1:]))]))
    return "\n".join(lines)
