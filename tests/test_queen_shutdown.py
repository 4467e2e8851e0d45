"""Stopping the queen: requests in flight finish within the grace period,
nothing new is accepted, and what outlives the grace period is cut."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from queen_harness import QueenHarness, eventually
from raw_http import RawClient, request

MODEL = "slow-model"


def _harness(tmp_path, tokens_per_sec: float, ttft_ms: float = 5.0,
             **config) -> QueenHarness:
    worker = {"id": "slow", "model": MODEL, "slots": 4, "ttft_ms": ttft_ms,
              "fake_tokens_per_sec": tokens_per_sec}
    return QueenHarness(tmp_path, [worker], config=config).start()


def _stream(max_tokens: int) -> bytes:
    return request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens, "stream": True})


def _stop_in_background(h: QueenHarness) -> threading.Thread:
    listening = h.runner
    stopper = threading.Thread(target=h.stop_queen, daemon=True)
    stopper.start()
    assert eventually(lambda: listening.wire.draining)
    return stopper


def _rest(client: RawClient, chunks) -> bytes:
    """What is left of a chunked stream, up to where it ends or breaks."""
    got = []
    try:
        for chunk in chunks:
            got.append(chunk)
    except (EOFError, AssertionError, ConnectionError, ValueError):
        pass
    return b"".join(got)


def test_a_stream_in_flight_finishes_and_no_new_connection_is_taken(tmp_path) -> None:
    h = _harness(tmp_path, tokens_per_sec=40)
    try:
        with RawClient(h.port) as client:
            client.send(_stream(12))
            _, status, headers = client.head()
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            chunks = client.chunks()
            next(chunks)
            stopper = _stop_in_background(h)
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", h.port), timeout=5).close()
            rest = _rest(client, chunks)
            assert b"data: [DONE]" in rest
            assert rest.count(b"data:") >= 12
            assert client.at_eof()
        stopper.join(timeout=30)
        assert not stopper.is_alive()
    finally:
        h.close()


def test_an_answer_that_starts_while_stopping_is_the_last_on_its_connection(tmp_path) -> None:
    h = _harness(tmp_path, tokens_per_sec=1000, ttft_ms=400)
    try:
        with RawClient(h.port) as client:
            client.send(request("POST", "/v1/chat/completions", {
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4}))
            worker = h.queen.registry.workers["slow"]
            assert eventually(lambda: worker.active == 1)
            stopper = _stop_in_background(h)
            reply = client.reply()
            assert reply.status == 200 and reply.json()["choices"]
            assert reply.headers["connection"] == "close"
            assert client.at_eof()
        stopper.join(timeout=30)
        assert not stopper.is_alive()
    finally:
        h.close()


def test_idle_connections_end_at_once(tmp_path) -> None:
    h = _harness(tmp_path, tokens_per_sec=1000)
    try:
        with RawClient(h.port, timeout=10) as client:
            assert client.ask("GET", "/v1/models").status == 200
            stopper = _stop_in_background(h)
            assert client.at_eof()
        stopper.join(timeout=30)
        assert not stopper.is_alive()
    finally:
        h.close()


def test_what_outlives_the_grace_period_is_cut(tmp_path) -> None:
    # Twenty tokens at two a second: ten seconds the queen does not wait for.
    h = _harness(tmp_path, tokens_per_sec=2, shutdown_grace_ms=200)
    try:
        with RawClient(h.port) as client:
            client.send(_stream(20))
            assert client.head()[1] == 200
            chunks = client.chunks()
            next(chunks)
            started = time.monotonic()
            stopper = _stop_in_background(h)
            stopper.join(timeout=9)
            assert not stopper.is_alive()
            assert b"[DONE]" not in _rest(client, chunks)
            assert time.monotonic() - started < 9
    finally:
        h.close()
