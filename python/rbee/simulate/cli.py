"""``rbee simulate`` (DESIGN 4.2): replay a trace against a simulated cluster
under several policies side by side, and ``rbee simulate generate`` for
synthetic traces. Heavy modules are imported when a command runs, so the
rest of the ``rbee`` command does not pay for them."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable

import click

__all__ = ["simulate"]


class Failure(click.ClickException):
    """An error already phrased for the user: printed as is, exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True)


@click.group("simulate", invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cluster", "cluster_path", metavar="CLUSTER.yaml",
              help="The simulated workers (as in the queen's workers:, plus ttft_ms and "
                   "tokens_per_sec).")
@click.option("--trace", "trace_path", metavar="TRACE.jsonl",
              help="The jobs, one JSON object per line with at_ms (- reads stdin).")
@click.option("--policy", "policies", multiple=True, metavar="POLICY",
              help="A .rhai/.yaml file, a template name or a baseline (round-robin, "
                   "least-loaded); repeat to compare.")
@click.option("--json", "json_path", metavar="OUT.json",
              help="Write every figure as JSON (- for standard output).")
@click.option("--plot", "plot_path", metavar="OUT.png|OUT.html",
              help="Write plots: a PNG image or a self-contained HTML page.")
@click.option("--baseline", metavar="POLICY",
              help="Show cost and latency of each policy relative to this one.")
@click.option("--lookahead", type=click.IntRange(min=0), default=32, show_default=True,
              help="Queued jobs in a row that may keep waiting before a look at the queue "
                   "stops (0: all, as the queen does; slower when many jobs wait).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def simulate(ctx: click.Context, cluster_path: str | None, trace_path: str | None,
             policies: tuple[str, ...], json_path: str | None, plot_path: str | None,
             baseline: str | None, lookahead: int, quiet: bool) -> None:
    """Replay a job trace against a simulated cluster under one or more
    policies and compare cost, latency, queue wait, deadline misses,
    rejections, utilisation and tenant shares side by side."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--cluster", cluster_path), ("--trace", trace_path),
                                        ("--policy", policies)) if not value]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or run: rbee simulate "
                               "generate --jobs N --seed S > trace.jsonl)")
    labels = _labels(policies)
    if baseline is not None and baseline not in labels:
        raise click.UsageError(f"--baseline {baseline}: not one of the --policy values "
                               f"({', '.join(labels)})")
    summaries, document = _run(cluster_path, trace_path, policies, labels, lookahead, quiet)
    from rbee.simulate.report import compare, render_table

    if baseline is not None:
        compare(summaries, baseline)
    table_to_stderr = json_path == "-"
    click.echo(render_table(summaries), err=table_to_stderr)
    if json_path is not None:
        text = json.dumps(document, indent=2, ensure_ascii=False)
        if json_path == "-":
            click.echo(text)
        else:
            _write(json_path, text + "\n", "--json")
            click.echo(f"wrote {json_path}", err=True)
    if plot_path is not None:
        from rbee.simulate.plots import PlotError, write_plot

        try:
            write_plot(plot_path, summaries, f"rbee simulate: {trace_path} on {cluster_path}")
        except PlotError as exc:
            raise Failure(str(exc)) from None
        click.echo(f"wrote {plot_path}", err=True)


def _labels(policies: tuple[str, ...]) -> list[str]:
    """Column names: a file's stem when that is unambiguous, else what was given."""
    from pathlib import Path

    stems = [Path(spec).stem if Path(spec).is_file() else spec for spec in policies]
    labels: list[str] = []
    for spec, stem in zip(policies, stems):
        base = stem if stems.count(stem) == 1 else spec
        label, n = base, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.append(label)
    return labels


def _write(path: str, text: str, option: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise Failure(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


def _run(cluster_path: str, trace_path: str, policies: tuple[str, ...], labels: list[str],
         lookahead: int, quiet: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from rbee import __version__
    from rbee.errors import PolicyError
    from rbee.simulate.cluster import ClusterError, load_cluster
    from rbee.simulate.model import START_EPOCH_MS, Simulation
    from rbee.simulate.policies import PolicyNotFound, load_policy
    from rbee.simulate.report import summarize
    from rbee.simulate.trace import TraceError, read_trace

    try:
        cluster = load_cluster(cluster_path)
        jobs = read_trace(trace_path)
    except (ClusterError, TraceError) as exc:
        raise Failure(str(exc)) from None
    if not jobs:
        raise Failure(f"{trace_path}: the trace has no jobs")
    compiled = []
    for spec in policies:
        try:
            compiled.append(load_policy(spec))
        except (PolicyError, PolicyNotFound) as exc:
            raise Failure(str(exc)) from None
    # Fallbacks are counted and reported; a warning per failed decision
    # would bury the table.
    logging.getLogger("rbee.scheduler").setLevel(logging.ERROR)
    summaries = []
    show = not quiet and sys.stderr.isatty()
    with click.progressbar(length=len(jobs) * len(compiled), label="simulating",
                           file=sys.stderr, show_eta=True, show_percent=True) if show \
            else _NoBar() as bar:
        for label, policy in zip(labels, compiled):
            bar.label = f"simulating {label}"
            run = Simulation(cluster, jobs, policy, lookahead=lookahead,
                             progress=bar.update).run()
            summaries.append(summarize(run, label))
    document = {
        "rbee_version": __version__,
        "cluster": {"path": cluster_path, "workers": len(cluster.workers),
                    "slots": sum(w.slots for w in cluster.workers)},
        "trace": {"path": trace_path, "jobs": len(jobs), "last_arrival_ms": jobs[-1].at_ms},
        "start_epoch_ms": START_EPOCH_MS,
        "lookahead": lookahead,
        "policies": summaries,
    }
    return summaries, document


class _NoBar:
    label = ""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _parsed(parse: Callable[[str], Any], text: str | None, default: Any) -> Any:
    from rbee.simulate.generate import GeneratorError

    if text is None:
        return default
    try:
        return parse(text)
    except GeneratorError as exc:
        raise click.UsageError(str(exc)) from None


def _deadline_range(text: str) -> tuple[int, int]:
    from rbee.simulate.generate import GeneratorError

    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise GeneratorError(f"--deadline-ms {text!r}: give MS or MIN-MAX, e.g. "
                             "5000-30000") from None


@simulate.command("generate")
@click.option("--jobs", type=click.IntRange(min=0), required=True, help="How many jobs.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The same seed and options give the same trace.")
@click.option("--rate", type=float, default=10.0, show_default=True,
              help="Mean arrivals per second (Poisson).")
@click.option("--mix", metavar="TYPE=W,...", help="Task types, e.g. "
              "text-gen=0.7,embedding=0.2,image-gen=0.1 (default: text-gen).")
@click.option("--models", metavar="[TYPE:]MODEL=W,...", help="Models per type, e.g. "
              "llama-3.1-8b-instruct=0.8,llama-3.1-70b-instruct=0.2,embedding:bge-m3.")
@click.option("--priorities", metavar="NAME=W,...",
              help="e.g. interactive=0.3,normal=0.5,batch=0.2 (default: normal).")
@click.option("--tenants", metavar="ID=W,...", help="Tenants by share of users "
              "(default: no tenant_id).")
@click.option("--deadline-share", type=float, default=0.0, show_default=True,
              help="Fraction of jobs with a deadline_ms.")
@click.option("--deadline-ms", "deadline_text", metavar="MS|MIN-MAX", default="5000-30000",
              show_default=True, help="Deadlines, drawn uniformly.")
@click.option("--geo", metavar="PLACE=W,...", help="User locations: names such as "
              "amsterdam, new-york, tokyo, or LAT:LON (default: "
              "amsterdam=0.5,new-york=0.3,tokyo=0.2).")
@click.option("--users", type=int, default=200, show_default=True,
              help="Distinct users (each with one tenant and location).")
@click.option("--max-tokens", type=int, default=512, show_default=True,
              help="max_tokens of text jobs; each generates 10-100% of it.")
@click.option("--diurnal", type=float, default=0.0, show_default=True,
              help="Swing of the rate over --period-s, 0 to <1 (0.5: +-50%).")
@click.option("--period-s", type=float, default=86_400.0, show_default=True,
              help="Period of the --diurnal swing, in seconds.")
@click.option("--out", "out_path", metavar="FILE", help="Write here instead of stdout.")
def generate_command(jobs: int, seed: int, rate: float, mix: str | None, models: str | None,
                     priorities: str | None, tenants: str | None, deadline_share: float,
                     deadline_text: str, geo: str | None, users: int, max_tokens: int,
                     diurnal: float, period_s: float, out_path: str | None) -> None:
    """Write a synthetic trace (JSONL) for rbee simulate."""
    from rbee.simulate.generate import (
        GeneratorError, GeneratorSpec, dumps, generate, parse_geo, parse_models,
        parse_weights,
    )

    spec = GeneratorSpec(jobs=jobs, seed=seed, rate=rate, deadline_share=deadline_share,
                         users=users, max_tokens=max_tokens, diurnal=diurnal,
                         period_s=period_s)
    spec.mix = _parsed(lambda t: parse_weights(t, "--mix"), mix, spec.mix)
    spec.models = _parsed(parse_models, models, spec.models)
    spec.priorities = _parsed(lambda t: parse_weights(t, "--priorities"), priorities,
                              spec.priorities)
    spec.tenants = _parsed(lambda t: parse_weights(t, "--tenants"), tenants, spec.tenants)
    spec.geo = _parsed(parse_geo, geo, spec.geo)
    spec.deadline_ms = _parsed(_deadline_range, deadline_text, spec.deadline_ms)
    try:
        spec.check()
    except GeneratorError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        out = open(out_path, "w", encoding="utf-8") if out_path else sys.stdout
    except OSError as exc:
        raise Failure(f"--out {out_path}: cannot write ({exc.strerror or exc})") from None
    try:
        chunk: list[str] = []
        for job in generate(spec):
            chunk.append(dumps(job))
            if len(chunk) == 1000:
                out.write("\n".join(chunk) + "\n")
                chunk.clear()
        if chunk:
            out.write("\n".join(chunk) + "\n")
    except BrokenPipeError:
        # `| head`: the reader has what it wanted; keep the exit-time flush quiet.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if out is not sys.stdout:
            out.close()
