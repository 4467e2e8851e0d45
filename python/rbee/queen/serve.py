"""Running the queen: `rbee queen`."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from typing import Any

from aiohttp import web

from rbee.queen.app import PROXY, QUEEN, build_app, model_list
from rbee.queen.config import ConfigError, QueenConfig, WorkerConfig, ModelConfig
from rbee.queen.core import Queen
from rbee.queen.wire import WireServer

__all__ = ["Listening", "run_queen", "start_queen", "stop_queen", "until_signalled"]

log = logging.getLogger("rbee.queen")


def admin_token(config: QueenConfig) -> str:
    """The admin token; a queen that listens beyond loopback needs one."""
    token = os.environ.get(config.admin_token_env, "").strip()
    if not config.loopback_only and not token:
        raise ConfigError(
            f"listen {config.listen} is reachable from other machines, so admin endpoints "
            f"need a token: set {config.admin_token_env} (admin_token_env) and restart"
        )
    return token


class Listening:
    """A running queen: the aiohttp application (which owns the queen's
    life cycle) behind the queen's own server (wire.py) on the socket."""

    def __init__(self, runner: web.AppRunner, wire: WireServer,
                 addresses: list[tuple[str, int]], grace_s: float = 0.0) -> None:
        self.runner = runner
        self.wire = wire
        self.addresses = addresses
        self.grace_s = grace_s

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def queen(self) -> Queen:
        return self.runner.app[QUEEN]

    async def close(self) -> None:
        # Inference connections first: their requests in flight finish (up to
        # the grace period) or are cancelled and release their slots before
        # the queen stops. The aiohttp routes get the same grace (the
        # runner's shutdown_timeout) in cleanup().
        await self.wire.close(self.grace_s)
        await self.runner.cleanup()


async def start_queen(config: QueenConfig, *, demo: bool = False) -> tuple[Listening, Any]:
    """Starts the queen (and the simulated cluster with `demo`); answers the
    server and the demo cluster, for `stop_queen`."""
    token = admin_token(config)
    if config.mode == "platform" and not token:
        raise ConfigError(f"platform mode manages tenants and keys through admin endpoints: "
                          f"set {config.admin_token_env} (admin_token_env) and restart")
    if config.mode == "platform" and config.scheduler:
        log.warning("platform mode ignores scheduler: %s; the built-in platform scheduler "
                    "runs", config.scheduler)
    cluster = None
    if demo:
        from rbee.queen.demo import start_demo_cluster

        cluster = await start_demo_cluster()
        config = config.model_copy(update={
            "workers": config.workers + [WorkerConfig.model_validate(w) for w in cluster.workers],
            "models": config.models + [ModelConfig.model_validate(m) for m in cluster.models],
        })
    queen = Queen(config)
    queen.demo = demo
    if cluster is not None:
        for pool in cluster.pools:
            queen.registry.register_pool({k: v for k, v in pool.items() if k != "workers"})
    app = build_app(queen, token)
    grace_s = config.shutdown_grace_ms / 1000
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=grace_s)
    await runner.setup()
    assert runner.server is not None
    wire = WireServer(queen, app[PROXY], runner.server, model_list)
    try:
        addresses = await wire.start(config.host, config.port)
    except OSError as exc:
        await wire.close()
        await runner.cleanup()
        if cluster is not None:
            await cluster.stop()
        raise ConfigError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
    return Listening(runner, wire, addresses, grace_s), cluster


async def stop_queen(server: Listening, cluster: Any) -> None:
    await server.close()
    if cluster is not None:
        await cluster.stop()


# The youngest generation is collected after this many more allocations than
# frees of tracked objects (CPython's default is 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Garbage collection for a long-running server, once it has started.

    What start-up made (modules, configuration, the compiled policy) lives
    as long as the process, so it is frozen out of every later collection.
    At CPython's default threshold a collection runs every few requests
    under load, while the objects of the 32 requests in flight are alive:
    each is walked, moved to an older generation and walked again there.
    With a higher threshold most of a request's objects are freed by their
    reference counts before a collection sees them. The price is up to that
    many objects in unreachable cycles waiting for collection: a few MB.
    docs/benchmarks.md ("Proxy overhead") has the figures.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def run_queen(config: QueenConfig, *, demo: bool = False) -> None:
    server, cluster = await start_queen(config, demo=demo)
    tune_gc()
    label = " with a SIMULATED demo cluster (no real GPUs)" if demo else ""
    log.info("queen-rbee listening on http://%s%s", config.listen, label)
    print(f"queen-rbee listening on http://{config.listen}{label}", flush=True)
    try:
        await until_signalled()
    finally:
        await stop_queen(server, cluster)


async def until_signalled() -> None:
    """Returns on SIGINT or SIGTERM, so the caller can shut down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
