"""The ``rbee`` command line (DESIGN 4.2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import click
import yaml

from rbee import __version__
from rbee.errors import PolicyError, RbeeError
from rbee.rhai import evaluate
from rbee.scheduler import Policy, Scheduler, State

__all__ = ["main"]


class Failure(click.ClickException):
    """An error already phrased for the user: printed as is, exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True)


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Failure(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Failure(f"{path}: is a directory, expected a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"{path}: cannot read ({exc})") from None


def _parse_document(path: str, text: str, line_offset: int = 0) -> Any:
    """Parses JSON (or YAML for .yaml/.yml files), naming file:line:col on error."""
    if path.endswith((".yaml", ".yml")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            raise Failure(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Failure(
            f"{path}:{exc.lineno + line_offset}:{exc.colno}: invalid JSON: {exc.msg}"
        ) from None


def _load_object(path: str, what: str) -> dict:
    value = _parse_document(path, _read_text(path))
    if not isinstance(value, dict):
        raise Failure(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def _iter_jobs(path: str) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        job = _parse_document(path, line, line_offset=number - 1)
        if not isinstance(job, dict):
            raise Failure(f"{path}:{number}: each line must be a JSON object (a job)")
        yield number, job


def _limits(pairs: tuple[str, ...]) -> dict[str, int] | None:
    limits: dict[str, int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.strip().isdigit():
            raise Failure(f"--limit {pair!r}: expected NAME=INTEGER, e.g. timeout_ms=100")
        limits[key.strip()] = int(value)
    return limits or None


def _compile(path: str, limits: dict[str, int] | None) -> Policy:
    try:
        return Policy.from_file(path, limits=limits)
    except PolicyError as exc:
        raise Failure(str(exc)) from None
    except ValueError as exc:  # an unknown or invalid limit
        raise Failure(f"--limit: {exc}") from None


def _emit(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, default=str))


limit_option = click.option(
    "--limit",
    "limit_pairs",
    multiple=True,
    metavar="NAME=N",
    help="Override a sandbox limit, e.g. --limit timeout_ms=100 (repeatable).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rbee")
def main() -> None:
    """rbee: a self-hosted AI orchestrator with a programmable scheduler."""


@main.group()
def policy() -> None:
    """Check policies and see what they decide."""


@policy.command("check")
@click.argument("file")
@limit_option
def policy_check(file: str, limit_pairs: tuple[str, ...]) -> None:
    """Compile FILE; print file:line:col: message and exit 1 if it is refused."""
    _compile(file, _limits(limit_pairs))
    click.echo(f"{file}: ok")


@policy.command("decide")
@click.argument("file")
@click.option("--state", "state_path", required=True, metavar="STATE.json",
              help="The cluster state (JSON, or YAML by extension).")
@click.option("--job", "job_path", metavar="JOB.json", help="One job.")
@click.option("--jobs", "jobs_path", metavar="FILE.jsonl", help="Many jobs, one JSON per line.")
@click.option("--now-ms", type=int, help="Fix now() for reproducible decisions.")
@click.option("--fallback", is_flag=True,
              help="Fall back to the built-in default on policy errors, as the queen does.")
@limit_option
def policy_decide(
    file: str,
    state_path: str,
    job_path: str | None,
    jobs_path: str | None,
    now_ms: int | None,
    fallback: bool,
    limit_pairs: tuple[str, ...],
) -> None:
    """Print the decision of FILE for a job (or each job of --jobs) as JSON."""
    if (job_path is None) == (jobs_path is None):
        raise click.UsageError("give exactly one of --job and --jobs")
    compiled = _compile(file, _limits(limit_pairs))
    decider: Policy | Scheduler = Scheduler(compiled) if fallback else compiled
    try:
        state = State(_load_object(state_path, "state"))
    except RbeeError as exc:
        raise Failure(f"{state_path}: {exc}") from None

    def decide(job: dict, where: str) -> bool:
        try:
            _emit(decider.decide(job, state, now_ms=now_ms).to_dict())
            return True
        except PolicyError as exc:
            _emit({"error": exc.to_dict(), "logs": exc.logs})
            click.echo(str(exc), err=True)
        except RbeeError as exc:
            _emit({"error": {"type": "invalid_job", "message": str(exc)}})
            click.echo(f"{where}: {exc}", err=True)
        return False

    if job_path is not None:
        ok = decide(_load_object(job_path, "job"), job_path)
    else:
        results = [decide(job, f"{jobs_path}:{n}") for n, job in _iter_jobs(jobs_path)]
        ok = all(results)
    if not ok:
        sys.exit(1)


@policy.command("compile")
@click.argument("file")
@click.option("--trace-rules", is_flag=True,
              help="Make each rule log rbee:rule:<index> when it decides.")
def policy_compile(file: str, trace_rules: bool) -> None:
    """Print the Rhai a YAML policy FILE compiles to (- reads stdin)."""
    if file != "-" and not file.endswith((".yaml", ".yml")):
        raise Failure(f"{file}: not a YAML policy (.yaml or .yml); Rhai policies need no "
                      "compiling (rbee policy check FILE checks them)")
    from rbee.policy_yaml import compile_yaml

    try:
        rhai = compile_yaml(_read_text(file), file if file != "-" else "<stdin>",
                            trace=trace_rules)
    except PolicyError as exc:
        raise Failure(str(exc)) from None
    click.echo(rhai, nl=False)


@policy.command("test")
@click.argument("path")
@click.option("--policy", "policy_path", metavar="FILE",
              help="Test this policy instead of the one each test file names.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (for CI).")
def policy_test(path: str, policy_path: str | None, as_json: bool) -> None:
    """Run policy test files: PATH is a *.test.yaml file or a folder of them.

    Exit status 1 when a case fails or a test file cannot run.
    """
    import time

    from rbee.policy_test import TestFileError, find_test_files, report, run_file

    if policy_path is not None and not Path(policy_path).is_file():
        raise Failure(f"--policy {policy_path}: no such file")
    started = time.perf_counter()
    try:
        files = find_test_files(path)
    except TestFileError as exc:
        raise Failure(str(exc)) from None
    results = [run_file(f, policy_path) for f in files]
    seconds = time.perf_counter() - started
    failed = sum(r.failed for r in results)
    if as_json:
        _emit({"passed": sum(r.passed for r in results), "failed": failed,
               "seconds": round(seconds, 4), "files": [r.to_dict() for r in results]})
        # Standard output is the JSON document; say what could not run on stderr.
        for result in results:
            if result.error:
                click.echo(result.error, err=True)
    else:
        click.echo(report(results, seconds))
    if failed:
        sys.exit(1)


class BadInput(Failure):
    """A file that cannot be used: exit status 2, as diff(1) does."""

    exit_code = 2


@policy.command("diff")
@click.argument("old")
@click.argument("new")
@click.option("--trace", "trace_path", required=True, metavar="FILE.jsonl",
              help="Jobs, or decision records of GET /v1/decisions, one JSON per line "
                   "(- reads stdin).")
@click.option("--state", "state_path", metavar="STATE.json",
              help="The cluster state (JSON, or YAML by extension) every job is decided on.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--max-changes", type=click.IntRange(min=0), metavar="N",
              help="List at most N changed jobs (the summary counts them all).")
@click.option("--now-ms", type=int,
              help="Fix now() for every job (default: a record's own time, else the start).")
@limit_option
def policy_diff(old: str, new: str, trace_path: str, state_path: str | None, as_json: bool,
                max_changes: int | None, now_ms: int | None,
                limit_pairs: tuple[str, ...]) -> None:
    """Replay a trace through OLD and NEW and list the jobs whose decision changes.

    OLD and NEW are policy files (.rhai, .yaml) or template names. Every job
    is decided on the same, unchanging state. Exit status: 0 when no
    decision changes, 1 when some do, 2 when an input cannot be used.
    """
    import time

    from rbee.policy_diff import TraceError, diff, load_policy, parse_entry

    try:
        limits = _limits(limit_pairs)
        policies = []
        for ref in (old, new):
            try:
                policies.append(load_policy(ref, limits))
            except PolicyError as exc:
                raise Failure(str(exc)) from None
            except ValueError as exc:  # an unknown or invalid limit
                raise Failure(f"--limit: {exc}") from None
        state = None
        if state_path is not None:
            try:
                state = State(_load_object(state_path, "state"))
            except RbeeError as exc:
                raise Failure(f"{state_path}: {exc}") from None
        entries = [parse_entry(value, n, f"{trace_path}:{n}")
                   for n, value in _iter_values(trace_path)]
        if not entries:
            raise Failure(f"{trace_path}: no jobs in the trace")
        report = diff(policies[0], policies[1], entries, state, trace=trace_path,
                      now_ms=now_ms, started_ms=int(time.time() * 1000))
    except Failure as exc:
        raise BadInput(exc.message) from None
    except TraceError as exc:
        raise BadInput(str(exc)) from None
    if as_json:
        _emit(report.to_dict(max_changes))
    else:
        click.echo(report.text(max_changes))
    sys.exit(1 if report.changes else 0)


def _iter_values(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line of a JSONL file."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise Failure(f"{path}:{number}:{exc.colno}: invalid JSON: {exc.msg}") from None


@main.group("templates")
def templates_group() -> None:
    """The template library: policies that ship with rbee."""


@templates_group.command("list")
def templates_list() -> None:
    """List the templates with their descriptions."""
    from rbee import templates

    names = templates.names()
    width = max(len(n) for n in names)
    for name in names:
        kind = templates.policy_format(name)
        click.echo(f"{name:<{width}}  {kind:<4}  {templates.description(name)}")


@templates_group.command("show")
@click.argument("name")
def templates_show(name: str) -> None:
    """Print the template NAME."""
    click.echo(_template_source(name), nl=False)


@templates_group.command("new")
@click.argument("name")
@click.argument("file")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def templates_new(name: str, file: str, force: bool) -> None:
    """Write a copy of the template NAME to FILE (a folder gets the template's
    file name) to start a policy from."""
    from rbee import templates

    text = _template_source(name)
    target = Path(file)
    if target.is_dir():
        target = target / templates.filename(name)
    yaml_template = templates.policy_format(name) == "yaml"
    if target.suffix.lower() not in ((".yaml", ".yml") if yaml_template else (".rhai",)):
        want = ".yaml or .yml" if yaml_template else ".rhai"
        raise Failure(f"{file}: {name} is a {'YAML' if yaml_template else 'Rhai'} template; "
                      f"give the file a {want} name so rbee reads it as such")
    if target.exists() and not force:
        raise Failure(f"{target}: already exists; use --force to overwrite it")
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise Failure(f"{target}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"{target}: written from template {name}")


def _template_source(name: str) -> str:
    from rbee import templates

    try:
        return templates.source(name)
    except KeyError as exc:
        raise Failure(exc.args[0]) from None


@main.command("queen")
@click.option("--config", "config_path", metavar="FILE", help="The queen's YAML configuration.")
@click.option("--mode", type=click.Choice(["home", "platform"]), help="Overrides mode:.")
@click.option("--listen", metavar="HOST:PORT", help="Overrides listen: (default 127.0.0.1:7833).")
@click.option("--state-path", metavar="FILE", help="Overrides state_path: (the SQLite file).")
@click.option("--demo", is_flag=True, help="Start a simulated cluster to try policies on.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              help="json: one JSON object per log line.")
def queen_command(config_path: str | None, mode: str | None, listen: str | None,
                  state_path: str | None, demo: bool, log_format: str) -> None:
    """Run queen-rbee, the orchestrator."""
    import asyncio

    from rbee.queen.config import ConfigError, load_config, parse_config
    from rbee.queen.logs import configure_logging
    from rbee.queen.serve import run_queen

    configure_logging(log_format)
    try:
        config = load_config(config_path)
        overrides = {k: v for k, v in (("mode", mode), ("listen", listen),
                                       ("state_path", state_path)) if v is not None}
        if overrides:
            config = parse_config(config.model_dump() | overrides, config_path or "<options>")
        try:
            import uvloop
        except ImportError:  # uvloop is optional: the standard loop works, slower
            uvloop = None
        runner = uvloop.run if uvloop is not None else asyncio.run
        runner(run_queen(config, demo=demo))
    except ConfigError as exc:
        raise Failure(str(exc)) from None
    except PolicyError as exc:
        raise Failure(f"the configured policy is refused: {exc}") from None
    except KeyboardInterrupt:
        pass


@main.group()
def rhai() -> None:
    """Run Rhai in the policy sandbox."""


@rhai.command("eval")
@click.argument("script")
@click.option("-e", "--expr", is_flag=True, help="SCRIPT is code, not a file name.")
@limit_option
def rhai_eval(script: str, expr: bool, limit_pairs: tuple[str, ...]) -> None:
    """Evaluate SCRIPT (a file, - for stdin) and print its value as JSON."""
    name = "<expr>" if expr else script
    source = script if expr else _read_text(script)
    try:
        value = evaluate(source, _limits(limit_pairs))
    except PolicyError as exc:
        exc.file = name if name != "-" else "<stdin>"
        raise Failure(str(exc)) from None
    except ValueError as exc:
        raise Failure(f"--limit: {exc}") from None
    _emit(value)


from rbee.tenants_cli import tenants as _tenants  # noqa: E402  (a group of its own module)

main.add_command(_tenants)

from rbee.simulate.cli import simulate as _simulate  # noqa: E402

main.add_command(_simulate)


if __name__ == "__main__":
    main()
