"""Plots of a run, drawn from the summaries alone: the latency distribution
of each policy, the total cost of each, and utilisation and queue wait over
time. ``.png`` writes an image; ``.html`` a self-contained page (the figure
as inline SVG, the table beside it, no external assets).

matplotlib is optional (``pip install 'rbee[sim]'``); it is only imported
here, and only its object API is used, so no global backend is switched.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from rbee.simulate.report import table_rows

__all__ = ["PlotError", "write_plot"]


class PlotError(RuntimeError):
    """The plot cannot be written; the message says why."""


def _figure(summaries: list[dict[str, Any]]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'rbee[sim]' "
                        "(or pip install matplotlib)") from None
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    cdf, cost, util, wait = fig.subplots(2, 2).flat
    fractions = [q / 100 for q in range(101)]
    for s in summaries:
        points = [(v, f) for v, f in zip(s["latency_quantiles_ms"], fractions) if v is not None]
        if points:
            cdf.plot([max(v, 0.1) / 1000 for v, _ in points], [f for _, f in points],
                     label=s["policy"], drawstyle="steps-post")
    cdf.set_xscale("log")
    cdf.set_xlabel("latency, arrival to last token (s, log scale)")
    cdf.set_ylabel("fraction of completed jobs")
    cdf.set_title("Latency distribution")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize="small")

    names = [s["policy"] for s in summaries]
    bars = cost.bar(range(len(names)), [s["total_cost"] for s in summaries],
                    color=[f"C{i}" for i in range(len(names))])
    cost.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize="small")
    cost.bar_label(bars, labels=[f"{s['total_cost']:.4g}" for s in summaries],
                   fontsize="small")
    cost.set_ylabel("total cost (cost_per_token units)")
    cost.set_title("Cost")
    cost.grid(True, axis="y", alpha=0.3)

    for i, s in enumerate(summaries):
        line = s["timeline"]
        util.plot(line["t_s"], [u * 100 for u in line["utilisation"]], label=s["policy"],
                  color=f"C{i}")
        wait.plot(line["t_s"], [w / 1000 for w in line["queue_wait_ms"]], label=s["policy"],
                  color=f"C{i}")
    util.set_xlabel("simulated time (s)")
    util.set_ylabel("busy slots (%)")
    util.set_title("Utilisation over time")
    util.grid(True, alpha=0.3)
    util.legend(fontsize="small")
    wait.set_xlabel("simulated time (s), by when work started")
    wait.set_ylabel("mean queue wait (s)")
    wait.set_title("Queue wait over time")
    wait.grid(True, alpha=0.3)
    wait.legend(fontsize="small")
    return fig


def _html(summaries: list[dict[str, Any]], svg: str, title: str) -> str:
    rows = table_rows(summaries)
    head = "".join(f"<th>{html.escape(s['policy'])}</th>" for s in summaries)
    body = "\n".join(
        "<tr><th>" + html.escape(name.strip()) + "</th>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for name, cells in rows
    )
    # The SVG's own XML declaration is not allowed inside HTML.
    svg = svg[svg.index("<svg"):]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }}
td {{ text-align: right; font-variant-numeric: tabular-nums; }}
tbody th {{ text-align: left; font-weight: normal; }}
svg {{ max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<table>
<thead><tr><th></th>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
{svg}
</body>
</html>
"""


def write_plot(path: str, summaries: list[dict[str, Any]], title: str) -> None:
    """Writes ``path`` (``.png`` or ``.html``)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise PlotError(f"--plot {path}: give a .png or .html file name")
    fig = _figure(summaries)
    fig.suptitle(title)
    try:
        if suffix == ".png":
            fig.savefig(path, format="png", dpi=110)
            return
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        Path(path).write_text(_html(summaries, buffer.getvalue(), title), encoding="utf-8")
    except OSError as exc:
        raise PlotError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None
