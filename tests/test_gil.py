"""Whether other Python threads run while a policy decides (`release_gil`)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from rbee import Policy, State

# Busy for tens of milliseconds, well inside the limits given below.
SLOW = """
fn schedule_job(job, pools, workers) {
    let n = 0;
    for i in 0..300000 { n += i % 7; }
    if n < 0 { return (); }
    workers[0]
}
"""


@pytest.fixture
def ticker():
    """A thread that counts while it can get the GIL. The switch interval is
    raised so that the main thread gives the GIL up only when it blocks or
    releases it (the ticker lets go of it on every tick)."""
    count = [0]
    stop = threading.Event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)

    def tick() -> None:
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    yield count
    stop.set()
    thread.join()
    sys.setswitchinterval(interval)


def _decide(release_gil: bool, count: list[int]) -> tuple[str | None, int]:
    policy = Policy.from_source(SLOW, limits={"timeout_ms": 10_000,
                                              "max_operations": 50_000_000})
    state = State({"workers": [{"id": "w1", "slots": 1}]})
    before = count[0]
    decision = policy.decide({"id": "j", "model": "m"}, state, release_gil=release_gil)
    return decision.worker_id, count[0] - before


def test_other_threads_run_while_the_gil_is_released(ticker) -> None:
    worker, ticks = _decide(True, ticker)
    assert worker == "w1"
    assert ticks > 0


def test_keeping_the_gil_keeps_other_threads_waiting(ticker) -> None:
    worker, ticks = _decide(False, ticker)
    assert worker == "w1"
    assert ticks == 0
