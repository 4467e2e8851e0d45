"""The load client of bench/bench_proxy.py, run as a process of its own.

It takes one JSON spec on the command line (the target URL, phases, the pids
whose CPU to account), sends the requests with a pooled aiohttp session on
uvloop, bounded in count and time, and prints the results as one JSON line.
CPU accounting reads /proc, so the proxy's time and other processes' load
can be told apart.

    python bench/proxy_load.py '{"url": ..., "phases": [...], ...}'
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "bench-model"
REQUEST_BODY = {
    "model": MODEL,
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Say something about bees, briefly."}],
    "max_tokens": 16,
}

# ---------------------------------------------------------------------------
# CPU accounting from /proc


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime in seconds) of a process, threads included."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; fields follow it.
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and its live descendants (a proxy may fork
    workers)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents[int(entry)], cpu[int(entry)] = stat
    total, todo, seen = 0.0, [root], set()
    children = collections.defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (the `cpu` line of
    /proc/stat, idle and iowait left out)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------
# The load client


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    # Nearest rank: the p99 of 3000 samples is the 30th slowest, a real sample.
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": _percentile(ordered, 50), "p90": _percentile(ordered, 90),
            "p99": _percentile(ordered, 99),
            "mean": statistics.fmean(ordered) if ordered else float("nan")}


def _first_content(buffer: bytes) -> bool:
    """True once an SSE event in `buffer` carries non-empty delta content; a
    proxy that sends an empty role chunk first does not get to look fast."""
    for event in buffer.split(b"\n\n"):
        event = event.strip()
        if not event.startswith(b"data:") or event.endswith(b"[DONE]"):
            continue
        try:
            chunk = json.loads(event[5:])
        except ValueError:
            continue
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                return True
    return False


async def _one(session: Any, url: str, body: bytes, headers: dict[str, str],
               stream: bool) -> tuple[float, float | None]:
    """One request; answers (total seconds, seconds to first token or None)."""
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            text = (await response.read())[:300]
            raise RuntimeError(f"HTTP {response.status}: {text!r}")
        if stream:
            seen = b""
            async for chunk in response.content.iter_any():
                if first is None:
                    seen += chunk
                    if _first_content(seen):
                        first = time.perf_counter() - started
                        seen = seen[-16:]
                else:
                    # Only the tail matters now: it must end with [DONE].
                    seen = (seen + chunk)[-32:]
            if first is None or b"[DONE]" not in seen:
                raise RuntimeError("the stream ended without content or [DONE]")
        else:
            data = await response.read()
            if b'"choices"' not in data:
                raise RuntimeError(f"no choices in the answer: {data[:200]!r}")
    return time.perf_counter() - started, first


async def _phase(session: Any, spec: dict[str, Any], name: str, concurrency: int,
                 stream: bool, count: int, max_s: float) -> dict[str, Any]:
    body = json.dumps({**REQUEST_BODY, "stream": stream}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer unused"}
    latencies: list[float] = []
    ttfts: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    issued = 0
    deadline = time.perf_counter() + max_s

    async def loop() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            try:
                total, first = await _one(session, spec["url"], body, headers, stream)
            except Exception as exc:  # counted and shown, never fatal for the run
                errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                continue
            latencies.append(total)
            if first is not None:
                ttfts.append(first)

    proxy_before = tree_cpu_s(spec["proxy_pid"]) if spec.get("proxy_pid") else None
    upstream_before = tree_cpu_s(spec["upstream_pid"])
    client_before = self_cpu_s()
    busy_before = machine_busy_s()
    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    client_cpu = self_cpu_s() - client_before
    busy = machine_busy_s() - busy_before
    upstream_cpu = tree_cpu_s(spec["upstream_pid"]) - upstream_before
    proxy_cpu = tree_cpu_s(spec["proxy_pid"]) - proxy_before if proxy_before is not None \
        else None
    done = len(latencies)
    # Cores used by processes other than the three of the benchmark (other
    # jobs on a shared machine): when it is high, the figures are not clean.
    ours = client_cpu + upstream_cpu + (proxy_cpu or 0.0)
    other_cores = max(0.0, busy - ours) / elapsed if elapsed > 0 else 0.0
    per_req = (lambda s: s / done * 1000 if done and s is not None else None)
    return {
        "name": name, "concurrency": concurrency, "stream": stream, "requested": count,
        "completed": done, "errors": dict(errors), "elapsed_s": elapsed,
        "time_capped": done + sum(errors.values()) < count,
        "rps": done / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {k: v * 1000 for k, v in _summary(latencies).items()},
        "ttft_ms": {k: v * 1000 for k, v in _summary(ttfts).items()} if stream else None,
        "proxy_cpu_ms_per_req": per_req(proxy_cpu),
        "upstream_cpu_ms_per_req": per_req(upstream_cpu),
        "client_cpu_ms_per_req": per_req(client_cpu),
        "other_cores": other_cores,
    }


async def run_client(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    results = []
    # One pool per phase size: keep-alive connections, at most `concurrency`
    # of them, as a real gateway client would hold.
    for name, concurrency, stream, count, max_s in spec["phases"]:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            results.append(await _phase(session, spec, name, concurrency, stream,
                                        count, max_s))
    return {"phases": results}


def client_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(run_client(spec))), flush=True)


# ---------------------------------------------------------------------------


if __name__ == "__main__":
    client_main(sys.argv[1])
