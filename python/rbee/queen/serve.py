"""Running the queen: `rbee queen`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from aiohttp import web

from rbee.queen.app import build_app
from rbee.queen.config import ConfigError, QueenConfig, WorkerConfig, ModelConfig
from rbee.queen.core import Queen

__all__ = ["run_queen", "start_queen", "stop_queen", "until_signalled"]

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


async def start_queen(config: QueenConfig, *, demo: bool = False) -> tuple[web.AppRunner, Any]:
    """Starts the queen (and the simulated cluster with `demo`); answers the
    runner and the demo cluster, for `stop_queen`."""
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
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if cluster is not None:
            await cluster.stop()
        raise ConfigError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
    return runner, cluster


async def stop_queen(runner: web.AppRunner, cluster: Any) -> None:
    await runner.cleanup()
    if cluster is not None:
        await cluster.stop()


async def run_queen(config: QueenConfig, *, demo: bool = False) -> None:
    runner, cluster = await start_queen(config, demo=demo)
    label = " with a SIMULATED demo cluster (no real GPUs)" if demo else ""
    log.info("queen-rbee listening on http://%s%s", config.listen, label)
    print(f"queen-rbee listening on http://{config.listen}{label}", flush=True)
    try:
        await until_signalled()
    finally:
        await stop_queen(runner, cluster)


async def until_signalled() -> None:
    """Returns on SIGINT or SIGTERM, so the caller can shut down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
