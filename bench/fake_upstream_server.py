"""A fake OpenAI-compatible upstream for bench/bench_proxy.py, in its own process.

It runs rbee's FakeWorker (instant first token, 100k tokens/s) on uvloop and
prints one line `READY <base url>` once it listens, then serves until killed.
Being a separate process keeps its CPU out of the accounting of the proxy under
test and lets the proxy and the upstream use both cores.

    python bench/fake_upstream_server.py --port 0 --model bench-model
"""

from __future__ import annotations

import argparse
import asyncio

from rbee.queen.fakeworker import FakeWorker
from rbee.queen.serve import until_signalled


async def serve(port: int, model: str, ttft_ms: float, tokens_per_sec: float) -> None:
    worker = FakeWorker("bench-upstream", [model], ttft_ms=ttft_ms,
                        tokens_per_sec=tokens_per_sec)
    url = await worker.start("127.0.0.1", port)
    print(f"READY {url}", flush=True)
    try:
        await until_signalled()
    finally:
        await worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-sec", type=float, default=100_000.0)
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # still works, only slower, so direct numbers drop
        run = asyncio.run
    run(serve(args.port, args.model, args.ttft_ms, args.tokens_per_sec))


if __name__ == "__main__":
    main()
