"""The queen's own work per inference request, without sockets.

`bench_proxy.py` measures the queen between a real client and a real
upstream, where three processes share two cores and a run moves by 10-20%
from one minute to the next. This benchmark keeps only the queen's Python:
`Proxy.serve` on a real `Queen` (default policy, store on disk, metrics,
journal, learning) with the upstream connection and the client connection
replaced by objects that answer at once. What it reports is the CPU the
queen spends per request beyond the sockets, which is what changes to the
hot path change; run it before and after such a change.

    python bench/bench_queen_path.py                 # 20,000 requests, 5 runs
    python bench/bench_queen_path.py --concurrency 32 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rbee.queen.config import QueenConfig
from rbee.queen.core import Queen
from rbee.queen.proxy import Proxy
from rbee.queen.serve import tune_gc
from rbee.queen.store import Store

from proxy_load import MODEL, REQUEST_BODY  # bench/, the script's own folder

# The request bench_proxy.py's client sends, so the two measure the same job.
REQUEST = json.dumps(REQUEST_BODY).encode()
ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Bees dance. " * 8}}],
    "usage": {"prompt_tokens": 21, "completion_tokens": 16, "total_tokens": 37},
}).encode()
HEADERS = {"content-type": "application/json", "authorization": "Bearer unused",
           "host": "127.0.0.1", "user-agent": "bench", "accept": "*/*",
           "content-length": str(len(REQUEST))}


class _Answer:
    """What `UpstreamPool.post` answers, already complete."""

    status = 200
    headers = {"content-type": "application/json", "content-length": str(len(ANSWER))}

    async def read(self) -> bytes:
        return ANSWER

    def release(self) -> None:
        pass

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class _Upstream:
    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str],
                   timeout_s: float) -> _Answer:
        return _Answer()


class _Client:
    """A `Downstream` that keeps nothing."""

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        if status != 200:
            raise RuntimeError(f"the queen answered {status}: {body[:300]!r}")

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        raise RuntimeError("no stream was asked for")

    async def write(self, chunk: bytes) -> None:
        pass

    async def close_stream(self) -> None:
        pass


async def _run(proxy: Proxy, requests: int, concurrency: int) -> float:
    """CPU seconds of this thread for `requests` requests, `concurrency` at
    a time (the store writer's thread is not counted)."""
    client = _Client()
    per_task = requests // concurrency

    async def one_client() -> None:
        for _ in range(per_task):
            await proxy.serve("chat.completions", REQUEST, HEADERS, None, client)

    started = time.thread_time()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return time.thread_time() - started


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="rbee-path-"))
    config = QueenConfig.model_validate({
        "workers": [{"id": "bench-upstream", "url": "http://127.0.0.1:9", "model": MODEL,
                     "slots": 256}]})
    queen = Queen(config, store=Store(workdir / "queen.db"))
    queen.policies.start(None)
    proxy = Proxy(queen, _Upstream())  # type: ignore[arg-type]
    tune_gc()
    requests = args.requests - args.requests % args.concurrency
    await _run(proxy, min(requests, 5_000), args.concurrency)  # warm-up
    runs = []
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(args.runs):
        gc.collect()
        if profiler is not None:
            profiler.enable()
        runs.append(await _run(proxy, requests, args.concurrency) / requests * 1e6)
        if profiler is not None:
            profiler.disable()
    queen.store.flush()
    queen.store.close()
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(30)
    return {"requests": requests, "concurrency": args.concurrency,
            "us_per_request": runs, "best": min(runs), "median": statistics.median(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile's top functions (figures then include its cost)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(f"{result['requests']} requests, concurrency {result['concurrency']}: "
          f"best {result['best']:.1f} us, median {result['median']:.1f} us of the queen's "
          f"thread per request (runs: {', '.join(f'{r:.1f}' for r in result['us_per_request'])})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
