"""A real queen on a loopback port, with fake OpenAI-compatible workers,
running on an event loop in a background thread so tests can use blocking
clients (the official openai SDK, httpx)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine

import httpx
import openai
import pytest

from rbee.queen.app import QUEEN
from rbee.queen.config import parse_config
from rbee.queen.fakeworker import FakeWorker
from rbee.queen.serve import start_queen, stop_queen

# Keys of a worker spec that configure the fake server, not the queen.
FAKE_ONLY = ("ttft_ms", "fake_tokens_per_sec", "fake_api_key")

try:
    import uvloop
except ImportError:  # not on Windows
    uvloop = None

#: Event loops to run a queen on, for tests parametrized over them.
LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(getattr(uvloop, "new_event_loop", None), id="uvloop",
                 marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")),
]


class QueenHarness:
    def __init__(
        self,
        tmp_path: Path,
        workers: list[dict[str, Any]],
        config: dict[str, Any] | None = None,
        admin_token: str | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.tmp_path = tmp_path
        self.worker_specs = workers
        self.extra_config = dict(config or {})
        self.admin_token = admin_token
        # `rbee queen` runs on uvloop when it is installed; tests may pick either.
        self.loop = loop_factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fakes: dict[str, FakeWorker] = {}
        self.runner: Any = None
        self.port = 0

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- life cycle ----------------------------------------------------------

    async def _start_fakes(self) -> None:
        for spec in self.worker_specs:
            fake = FakeWorker(spec["id"], spec.get("models") or [spec["model"]],
                              capability=spec.get("capability", "text-gen"),
                              ttft_ms=spec.get("ttft_ms", 5.0),
                              tokens_per_sec=spec.get("fake_tokens_per_sec", 2000.0),
                              api_key=spec.get("fake_api_key"))
            await fake.start()
            self.fakes[spec["id"]] = fake

    def config_dict(self) -> dict[str, Any]:
        workers = []
        for spec in self.worker_specs:
            entry = {k: v for k, v in spec.items() if k not in FAKE_ONLY}
            entry["url"] = self.fakes[spec["id"]].url
            workers.append(entry)
        data = {
            "listen": f"127.0.0.1:{self.port}",
            "state_path": str(self.tmp_path / "queen.db"),
            "health": {"interval_ms": 100, "timeout_ms": 500, "failures_before_down": 1},
            "workers": workers,
        }
        data.update(self.extra_config)
        return data

    def start(self) -> "QueenHarness":
        if not self.fakes:
            self.call(self._start_fakes())
        if self.admin_token is not None:
            os.environ["RBEE_TEST_ADMIN_TOKEN"] = self.admin_token
            self.extra_config.setdefault("admin_token_env", "RBEE_TEST_ADMIN_TOKEN")
        config = parse_config(self.config_dict())
        self.runner, _ = self.call(start_queen(config))
        self.port = self.runner.addresses[0][1]
        self.queen = self.runner.app[QUEEN]
        return self

    def stop_queen(self) -> None:
        if self.runner is not None:
            self.call(stop_queen(self.runner, None))
            self.runner = None

    def restart(self) -> None:
        self.stop_queen()
        self.start()

    def close(self) -> None:
        self.stop_queen()
        for fake in self.fakes.values():
            self.call(fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    # -- clients -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=30, **kwargs)

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Polls `check` until it holds or `timeout` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return False


async def new_event() -> asyncio.Event:
    """An event made on the queen's loop (pass to `QueenHarness.call`)."""
    return asyncio.Event()


async def copy_of(items: Any) -> list[Any]:
    """A copy taken on the queen's loop, for logs that change while it runs."""
    return list(items)
