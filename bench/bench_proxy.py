"""Proxy overhead: queen-rbee against LiteLLM's proxy, over the same upstream.

One run measures three paths to one fake OpenAI-compatible upstream
(bench/fake_upstream_server.py, its own process):

    direct   client -> upstream
    queen    client -> `rbee queen` (default policy, one static worker) -> upstream
    litellm  client -> `litellm --config` (openai/<model> with api_base) -> upstream

For each: latency of non-streaming chat completions at concurrency 1 (p50,
p99), time to the first content token when streaming, CPU time of the proxy
process per request (from /proc/PID/stat, children included) and requests/s
at concurrency 32. The load client (bench/proxy_load.py) runs in its
own process on uvloop with a pooled aiohttp session; every loop is bounded in
count and time and talks to loopback only. After a warm-up, rounds alternate
the targets and the figures are medians over rounds. See docs/benchmarks.md.

    python bench/bench_proxy.py                          # table only
    python bench/bench_proxy.py --json out.json          # table and JSON
    python bench/bench_proxy.py --litellm /venv/bin/litellm --profile prof/
    python bench/bench_proxy.py --scale 0.3              # quicker, noisier
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from proxy_load import MODEL, REQUEST_BODY  # the client's request, shared

HERE = Path(__file__).resolve().parent

# Targets from the issue: added median latency, CPU per proxied request, and
# throughput at concurrency 32 as a share of going direct.
TARGET_ADDED_P50_MS = 0.5
TARGET_CPU_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.5

# Phases: (name, concurrency, stream, count, time cap in s). Counts are
# scaled by --scale; the caps keep a slow proxy (LiteLLM answers in tens of
# ms) from stretching the run: with three rounds and --profile the whole run
# takes about three and a half minutes on two cores.
WARMUP = (
    ("warmup-c1", 1, False, 300, 8.0),
    ("warmup-stream", 1, True, 100, 5.0),
    ("warmup-c32", 32, False, 1500, 8.0),
)
MEASURE = (
    ("latency", 1, False, 1500, 8.0),
    ("ttft", 1, True, 800, 6.0),
    ("throughput", 32, False, 5000, 7.0),
)
ROUNDS = 3



# Starting and stopping the processes under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A process this benchmark started, in its own session so that stopping
    it also stops any workers it forked, and nothing else."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self.log.close()


def _post_ok(url: str, timeout: float = 5.0) -> bool:
    body = json.dumps({**REQUEST_BODY, "max_tokens": 2}).encode()
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/json", "Authorization": "Bearer unused"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(service: Service, chat_url: str, timeout_s: float) -> None:
    """Until one chat completion goes through end to end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.proc.returncode}:\n"
                               f"{service.tail()}")
        if _post_ok(chat_url):
            return
        time.sleep(0.25)
    raise RuntimeError(f"{service.name} did not answer within {timeout_s:.0f} s:\n"
                       f"{service.tail()}")


def start_upstream(workdir: Path) -> tuple[Service, str]:
    service = Service("fake upstream", [sys.executable, str(HERE / "fake_upstream_server.py"),
                                        "--port", "0", "--model", MODEL],
                      workdir / "upstream.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in service.log_path.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                url = line.split()[1]
                wait_ready(service, url + "/chat/completions", 10)
                return service, url
        if service.proc.poll() is not None:
            break
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"the fake upstream did not start:\n{service.tail()}")


def start_queen(workdir: Path, upstream_url: str) -> tuple[Service, str]:
    port = free_port()
    config = workdir / "queen.yaml"
    # slots: a real inference server takes many requests at once; with the
    # default of 1 the default policy would queue at concurrency 32 and the
    # benchmark would measure queueing, not proxying.
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"workers:\n"
        f"  - id: bench-upstream\n"
        f"    url: {upstream_url}\n"
        f"    model: {MODEL}\n"
        f"    slots: 256\n")
    rbee = shutil.which("rbee", path=str(Path(sys.executable).parent)) or shutil.which("rbee")
    argv = [rbee] if rbee else [sys.executable, "-c", "from rbee.cli import main; main()"]
    service = Service("queen-rbee", argv + ["queen", "--config", str(config), "--state-path",
                                            str(workdir / "queen.db")],
                      workdir / "queen.log")
    base = f"http://127.0.0.1:{port}"
    wait_ready(service, base + "/v1/chat/completions", 60)
    return service, base


def find_litellm(given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() or shutil.which(given) else None
    return (os.environ.get("LITELLM_BIN")
            or shutil.which("litellm", path=str(Path(sys.executable).parent))
            or shutil.which("litellm"))


def start_litellm(workdir: Path, upstream_url: str, binary: str) -> tuple[Service, str]:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream_url}\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  set_verbose: false\n"
        "  json_logs: false\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
    env.update({
        # Offline: the model cost map ships inside the package.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "True",
        "NO_DOCS": "True",
        # Recent releases refuse to start without a master key; the queen in
        # home mode checks no key on inference either, so neither side pays
        # for authentication.
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    })
    service = Service("litellm", [binary, "--config", str(config), "--host", "127.0.0.1",
                                  "--port", str(port), "--num_workers", "1"],
                      workdir / "litellm.log", env=env, cwd=workdir)
    base = f"http://127.0.0.1:{port}"
    wait_ready(service, base + "/v1/chat/completions", 180)
    return service, base


# ---------------------------------------------------------------------------
# Running the phases and profiling


def scaled(phases: tuple, scale: float) -> list[list[Any]]:
    return [[name, c, stream, max(20, int(count * scale)), cap]
            for name, c, stream, count, cap in phases]


def run_load(url: str, upstream_pid: int, proxy_pid: int | None,
             phases: list[list[Any]]) -> list[dict[str, Any]]:
    spec = {"url": url, "upstream_pid": upstream_pid, "proxy_pid": proxy_pid,
            "phases": phases}
    budget = sum(p[4] for p in phases) + 60
    done = subprocess.run([sys.executable, str(HERE / "proxy_load.py"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=budget)
    if done.returncode != 0:
        raise RuntimeError(f"the load client failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)["phases"]


def warm_up(name: str, url: str, upstream_pid: int, proxy_pid: int | None,
            scale: float) -> None:
    print(f"  {name}: warming up", file=sys.stderr, flush=True)
    run_load(url, upstream_pid, proxy_pid, scaled(WARMUP, scale))


def measure_round(name: str, url: str, upstream_pid: int, proxy_pid: int | None,
                  scale: float) -> dict[str, Any]:
    phases = run_load(url, upstream_pid, proxy_pid, scaled(MEASURE, scale))
    return {p["name"]: p for p in phases}


def _perf_top(perf: str, data: Path, limit: int) -> list[dict[str, Any]]:
    """Top symbols by self time from `perf report`."""
    out = subprocess.run([perf, "report", "--stdio", "--no-children", "-i", str(data),
                          "--sort", "dso,symbol", "--percent-limit", "0.5", "-g", "none"],
                         capture_output=True, text=True, timeout=300).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        # Some perf versions pad each row with empty "-" columns; drop them.
        while parts and parts[-1] == "-":
            parts.pop()
        if len(parts) >= 4 and parts[0].endswith("%") and not line.startswith("#"):
            rows.append({"self_pct": float(parts[0].rstrip("%")), "dso": parts[1],
                         "symbol": " ".join(parts[3:])})
    return rows[:limit]


_LINE = re.compile(r":\d+\)$")


def _pyspy_top(raw: Path, limit: int) -> dict[str, list[dict[str, Any]]]:
    """Top Python functions by self and by inclusive samples from py-spy's
    collapsed stacks ("frame;frame;leaf count" per line)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # py-spy names the line being run; a function is what we rank.
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def top(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"pct": 100 * n / total, "frame": frame}
                for frame, n in counter.most_common(limit)] if total else []

    return {"self": top(own), "inclusive": top(inclusive), "samples": total}


def profile_queen(outdir: Path, url: str, upstream_pid: int, queen_pid: int,
                  scale: float) -> dict[str, Any]:
    """perf (native frames, kernel included) and, when installed, py-spy
    (Python frames: CPython 3.11 has no perf trampoline) during load at
    concurrency 32."""
    outdir.mkdir(parents=True, exist_ok=True)
    load = [["profile", 32, False, max(200, int(20000 * scale)), 12.0]]
    result: dict[str, Any] = {}
    perf = shutil.which("perf") or ("/usr/bin/perf" if Path("/usr/bin/perf").exists() else None)
    if perf:
        data = outdir / "queen.perf.data"
        recorder = subprocess.Popen(
            [perf, "record", "-F", "999", "-g", "-p", str(queen_pid), "-o", str(data),
             "--", "sleep", "10"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        run_load(url, upstream_pid, queen_pid, load)
        recorder.wait(timeout=60)
        result["perf"] = _perf_top(perf, data, 25) if data.exists() else \
            {"error": recorder.stderr.read().decode(errors="replace")[-500:]}
    else:
        result["perf"] = {"error": "perf not found"}
    pyspy = shutil.which("py-spy")
    if pyspy:
        raw = outdir / "queen.pyspy.txt"
        recorder = subprocess.Popen(
            [pyspy, "record", "--pid", str(queen_pid), "--duration", "10", "--rate", "250",
             "--format", "raw", "--nonblocking", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        run_load(url, upstream_pid, queen_pid, load)
        recorder.wait(timeout=60)
        result["py-spy"] = _pyspy_top(raw, 40) if raw.exists() else \
            {"error": recorder.stderr.read().decode(errors="replace")[-500:]}
    else:
        result["py-spy"] = {"error": "py-spy not installed (pip install py-spy)"}
    return result


# ---------------------------------------------------------------------------
# Reporting


def _version(package: str, python: str = sys.executable) -> str | None:
    done = subprocess.run([python, "-c", f"import importlib.metadata as m; "
                                         f"print(m.version({package!r}))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def _round_row(phases: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """The figures of one target in one round, against direct in that round
    (pairing within a round keeps slow drifts of the machine out)."""
    lat, ttft, thr = phases["latency"], phases["ttft"], phases["throughput"]
    d_lat, d_ttft = direct["latency"]["latency_ms"], direct["ttft"]["ttft_ms"]
    return {
        "p50_ms": lat["latency_ms"]["p50"], "p99_ms": lat["latency_ms"]["p99"],
        "added_p50_ms": lat["latency_ms"]["p50"] - d_lat["p50"],
        "added_p99_ms": lat["latency_ms"]["p99"] - d_lat["p99"],
        "ttft_p50_ms": ttft["ttft_ms"]["p50"], "ttft_p99_ms": ttft["ttft_ms"]["p99"],
        "added_ttft_p50_ms": ttft["ttft_ms"]["p50"] - d_ttft["p50"],
        "cpu_ms_per_req_c1": lat["proxy_cpu_ms_per_req"],
        "cpu_ms_per_req_c32": thr["proxy_cpu_ms_per_req"],
        "rps_c32": thr["rps"],
        "rps_vs_direct": thr["rps"] / direct["throughput"]["rps"],
        "errors": sum(sum(p["errors"].values()) for p in phases.values()),
        "requests": sum(p["completed"] for p in phases.values()),
        "other_cores_max": max(p["other_cores"] for p in phases.values()),
    }


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per target, the median over rounds of every figure (errors and
    requests are summed, the foreign load is the worst seen)."""
    rows = {}
    for name, per_round in rounds.items():
        cells = [_round_row(phases, direct)
                 for phases, direct in zip(per_round, rounds["direct"])]
        row: dict[str, Any] = {}
        for key in cells[0]:
            values = [c[key] for c in cells]
            if key in ("errors", "requests"):
                row[key] = sum(values)
            elif key == "other_cores_max":
                row[key] = max(values)
            elif None in values:
                row[key] = None
            else:
                row[key] = statistics.median(values)
        row["rounds"] = len(cells)
        rows[name] = row
    return rows


def verdicts(row: dict[str, Any]) -> list[dict[str, Any]]:
    cpu = max(v for v in (row["cpu_ms_per_req_c1"], row["cpu_ms_per_req_c32"]) if v is not None)
    checks = [
        ("added p50 latency", row["added_p50_ms"], TARGET_ADDED_P50_MS, "ms", True),
        ("CPU per request (worse of c=1, c=32)", cpu, TARGET_CPU_MS, "ms", True),
        ("throughput at c=32 vs direct", row["rps_vs_direct"], TARGET_THROUGHPUT_RATIO, "x",
         False),
    ]
    out = []
    for label, value, target, unit, lower_is_better in checks:
        ok = value <= target if lower_is_better else value >= target
        out.append({"target": label, "value": value, "limit": target, "unit": unit,
                    "pass": ok, "miss_by": None if ok else abs(value - target)})
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: dict[str, dict[str, Any]], notes: dict[str, str]) -> None:
    head = (f"{'path':<8} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>7} {'+p99':>7} {'ttft50':>7} "
            f"{'+ttft':>7} {'cpu/req c1':>10} {'cpu/req c32':>11} {'req/s c32':>9} "
            f"{'vs direct':>9} {'errors':>6}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<8} {_fmt(r['p50_ms'], 3):>7} {_fmt(r['p99_ms'], 3):>7} "
              f"{_fmt(r['added_p50_ms'], 3):>7} {_fmt(r['added_p99_ms'], 3):>7} "
              f"{_fmt(r['ttft_p50_ms'], 3):>7} {_fmt(r['added_ttft_p50_ms'], 3):>7} "
              f"{_fmt(r['cpu_ms_per_req_c1'], 3):>10} {_fmt(r['cpu_ms_per_req_c32'], 3):>11} "
              f"{r['rps_c32']:>9.0f} {100 * r['rps_vs_direct']:>8.1f}% {r['errors']:>6}")
    for name, why in notes.items():
        print(f"{name:<8} not measured: {why}")
    print("(ms; +: over direct; cpu/req: proxy process CPU per request; ttft: first content "
          "token, streaming; medians of rounds)")
    other = max(r["other_cores_max"] for r in rows.values())
    if other > 0.25:
        print(f"warning: other processes used up to {other:.2f} cores during a phase; "
              f"figures are noisy, run again on a quiet machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies request counts (time caps stay)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="measurement rounds; figures are medians over rounds")
    parser.add_argument("--litellm", metavar="BIN",
                        help="the litellm executable (default: $LITELLM_BIN or PATH)")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--profile", metavar="DIR",
                        help="after measuring, profile the queen under load (perf, py-spy)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep configs and logs here (default: a temporary folder)")
    args = parser.parse_args()

    started = time.monotonic()
    temp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="rbee-bench-proxy-")
        workdir = Path(temp.name)
    services: list[Service] = []
    results: dict[str, list[dict[str, Any]]] = {}
    notes: dict[str, str] = {}
    profile = None
    litellm_version = None
    try:
        print("starting the fake upstream and queen-rbee", file=sys.stderr, flush=True)
        upstream, upstream_url = start_upstream(workdir)
        services.append(upstream)
        queen, queen_url = start_queen(workdir, upstream_url)
        services.append(queen)
        litellm = litellm_url = None
        if args.no_litellm:
            notes["litellm"] = "skipped (--no-litellm)"
        else:
            binary = find_litellm(args.litellm)
            if binary is None:
                notes["litellm"] = ("litellm is not installed (pip install 'litellm[proxy]', "
                                    "then --litellm PATH or LITELLM_BIN)")
            else:
                print("starting LiteLLM", file=sys.stderr, flush=True)
                python = Path(binary).resolve().parent / "python"
                litellm_version = _version("litellm", str(python)) if python.exists() else None
                try:
                    litellm, litellm_url = start_litellm(workdir, upstream_url, binary)
                    services.append(litellm)
                except RuntimeError as exc:
                    notes["litellm"] = f"did not start: {exc}"
        targets = [("direct", upstream_url, None), ("queen", queen_url + "/v1", queen.pid)]
        if litellm is not None:
            targets.append(("litellm", litellm_url + "/v1", litellm.pid))
        targets = [(name, base + "/chat/completions", pid) for name, base, pid in targets]
        for name, url, pid in targets:
            warm_up(name, url, upstream.pid, pid, args.scale)
        # Rounds alternate the targets, so a burst of foreign load on a
        # shared machine spoils one round of each rather than one target.
        for number in range(1, args.rounds + 1):
            for name, url, pid in targets:
                print(f"  round {number}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                results.setdefault(name, []).append(
                    measure_round(name, url, upstream.pid, pid, args.scale))
        if args.profile:
            print("  queen: profiling", file=sys.stderr, flush=True)
            profile = profile_queen(Path(args.profile), queen_url + "/v1/chat/completions",
                                    upstream.pid, queen.pid, args.scale)
    finally:
        for service in reversed(services):
            service.stop()
        if temp is not None:
            temp.cleanup()

    rows = summarize(results)
    print_table(rows, notes)
    checks = verdicts(rows["queen"])
    for check in checks:
        verdict = "PASS" if check["pass"] else f"MISS by {check['miss_by']:.3f} {check['unit']}"
        print(f"queen {check['target']}: {check['value']:.3f} {check['unit']} "
              f"(target {'<=' if check['unit'] == 'ms' else '>='} {check['limit']}) {verdict}")
    if profile:
        perf = profile.get("perf")
        if isinstance(perf, list):
            print("queen perf, top self time:")
            for row in perf[:12]:
                print(f"  {row['self_pct']:5.1f}%  {row['dso']:<24} {row['symbol']}")
        spy = profile.get("py-spy")
        if isinstance(spy, dict) and spy.get("self"):
            print("queen py-spy, top Python frames by own samples:")
            for row in spy["self"][:10]:
                print(f"  {row['pct']:5.1f}%  {row['frame']}")
            # Frames every stack shares (the CLI, the loop runner, the thread
            # bootstrap) say nothing; start below them.
            shared = ("click/", "uvloop/__init__", "asyncio/runners", "threading.py",
                      "<module>", "rbee/cli.py")
            print("queen py-spy, top Python frames including callees:")
            frames = [r for r in spy["inclusive"] if not any(s in r["frame"] for s in shared)]
            for row in frames[:15]:
                print(f"  {row['pct']:5.1f}%  {row['frame']}")
    print(f"total {time.monotonic() - started:.0f} s", file=sys.stderr)

    if args.json:
        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(),
                        "aiohttp": _version("aiohttp"), "uvloop": _version("uvloop"),
                        "litellm": litellm_version},
            "phases": {"warmup": WARMUP, "measure": MEASURE, "scale": args.scale,
                       "rounds": args.rounds},
            "targets": {"added_p50_ms": TARGET_ADDED_P50_MS, "cpu_ms_per_req": TARGET_CPU_MS,
                        "throughput_ratio": TARGET_THROUGHPUT_RATIO},
            "summary": rows, "queen_checks": checks, "not_measured": notes,
            "raw": results, "profile": profile,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
