"""The queen's client for workers (rbee.queen.upstream.UpstreamPool) against
small scripted HTTP servers on loopback: keep-alive, stale pooled
connections, chunked and close-delimited bodies, timeouts and failures."""

from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable

import pytest

from queen_harness import LOOPS
from rbee.queen.upstream import UpstreamError, UpstreamPool

pytestmark = pytest.mark.timeout(60)

# A handler gets the server, the connection's number (from 1), the request's
# number on that connection (from 1), the request head and body, and the
# writer; it answers, or returns False to drop the connection unanswered.
Handler = Callable[["Scripted", int, int, bytes, bytes, asyncio.StreamWriter],
                   Awaitable[bool | None]]


class Scripted:
    """An HTTP/1.1 server whose answers a test writes byte by byte."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes]] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        # Set when the test is done with the server: handlers that stall wait for it.
        self.done = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Scripted":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.done.set()
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.append(writer)
        try:
            for index in range(1, 1000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((number, head, body))
                if await self.handler(self, number, index, head, body, writer) is False:
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client left, or the test ended
        finally:
            writer.close()


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def echo(server: Scripted, number: int, index: int, head: bytes, body: bytes,
               writer: asyncio.StreamWriter) -> None:
    path = head.split(b" ")[1]
    writer.write(answer(b"%s %d %d %s" % (path, number, index, body)))


@pytest.fixture(params=LOOPS)
def run(request) -> Callable[[Callable[[UpstreamPool], Awaitable[None]]], None]:
    """Runs a scenario with a fresh pool on a new event loop of each kind."""
    return lambda scenario: _run(scenario, request.param)


def _run(scenario: Callable[[UpstreamPool], Awaitable[None]],
         loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        pool = UpstreamPool()
        try:
            await asyncio.wait_for(scenario(pool), 30)
        finally:
            pool.close()
            # Handlers still parked in a scripted server end with the test.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    # Not asyncio.run: its loop_factory needs Python 3.12.
    loop = loop_factory()
    try:
        loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


async def fetch(pool: UpstreamPool, url: str, body: bytes = b"{}", timeout: float = 10.0,
                path: str = "/chat/completions") -> tuple[int, bytes]:
    async with await pool.post(url, path, body, {"X-Test": "yes"}, timeout) as response:
        return response.status, await response.read()


def test_keep_alive_reuses_one_connection(run):
    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(echo) as server:
            for index in range(1, 6):
                status, body = await fetch(pool, server.url, b'{"n": %d}' % index)
                assert status == 200
                assert body == b'/v1/chat/completions 1 %d {"n": %d}' % (index, index)
            assert server.connections == 1
            head = server.requests[0][1].decode()
            assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{server.port}\r\n" in head
            assert "Content-Length: 8\r\n" in head and "X-Test: yes\r\n" in head

    run(scenario)


def test_concurrent_requests_use_separate_connections_then_pool_them(run):
    async def slow_echo(server, number, index, head, body, writer) -> None:
        await asyncio.sleep(0.05)
        await echo(server, number, index, head, body, writer)

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(slow_echo) as server:
            results = await asyncio.gather(*(fetch(pool, server.url, b"%d" % i)
                                             for i in range(4)))
            assert sorted(body.split(b" ")[-1] for _, body in results) == [b"0", b"1", b"2",
                                                                          b"3"]
            assert server.connections == 4
            await asyncio.gather(*(fetch(pool, server.url) for _ in range(4)))
            assert server.connections == 4

    run(scenario)


def test_a_connection_closed_while_idle_is_not_reused(run):
    async def once(server, number, index, head, body, writer) -> bool:
        await echo(server, number, index, head, body, writer)
        return False  # answered, then closed

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(once) as server:
            assert (await fetch(pool, server.url))[0] == 200
            await asyncio.sleep(0.1)  # the close reaches the pool while it is idle
            status, body = await fetch(pool, server.url)
            assert status == 200 and body.split(b" ")[1:3] == [b"2", b"1"]
            assert len(server.requests) == 2

    run(scenario)


def test_a_pooled_connection_closed_as_it_is_reused_is_retried_on_a_new_one(run):
    async def one_per_connection(server, number, index, head, body, writer) -> bool | None:
        if index > 1:
            return False  # the worker's idle timeout struck as the request came in
        await echo(server, number, index, head, body, writer)
        return None

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(one_per_connection) as server:
            assert (await fetch(pool, server.url))[0] == 200
            status, body = await fetch(pool, server.url, b"again")
            assert status == 200 and body == b"/v1/chat/completions 2 1 again"
            # Sent on the stale connection first, then on a new one.
            assert [(n, b) for n, _, b in server.requests] == [(1, b"{}"), (1, b"again"),
                                                              (2, b"again")]

    run(scenario)


def test_a_new_connection_closed_unanswered_is_an_error_not_a_retry(run):
    async def drop(server, number, index, head, body, writer) -> bool:
        return False

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(drop) as server:
            with pytest.raises(UpstreamError, match="closed the connection"):
                await fetch(pool, server.url)
            assert server.connections == 1

    run(scenario)


def test_chunked_answers_arrive_as_they_are_sent(run):
    proceed: list[asyncio.Event] = []

    async def chunked(server, number, index, head, body, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await proceed[0].wait()  # the client has seen this part
            proceed[0].clear()
        writer.write(b"0\r\n\r\n")

    async def scenario(pool: UpstreamPool) -> None:
        proceed.append(asyncio.Event())
        async with Scripted(chunked) as server:
            for _ in range(2):
                async with await pool.post(server.url, "/x", b"{}", {}, 10) as response:
                    assert response.status == 200
                    assert response.headers["content-type"] == "text/event-stream"
                    seen = []
                    async for chunk in response.chunks():
                        seen.append(chunk)
                        proceed[0].set()
                    assert b"".join(seen) == b"data: one\n\ndata: two\n\n"
                    assert response.complete and response.keep_alive
            assert server.connections == 1  # a finished chunked answer keeps the connection

    run(scenario)


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK"])
def test_close_delimited_answers_are_read_to_the_end(status_line, run):
    async def until_close(server, number, index, head, body, writer) -> bool:
        writer.write(status_line + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        for part in (b"first ", b"second ", b"third"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)
        return False

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(until_close) as server:
            for _ in range(2):
                assert await fetch(pool, server.url) == (200, b"first second third")
            assert server.connections == 2  # not pooled: the body ended the connection

    run(scenario)


def test_interim_answers_are_skipped(run):
    async def early(server, number, index, head, body, writer) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        writer.write(answer(b"final %d" % index, "X-Final: yes"))

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(early) as server:
            for index in (1, 2):
                async with await pool.post(server.url, "/x", b"{}", {}, 10) as response:
                    assert response.status == 200
                    assert response.headers["x-final"] == "yes"
                    assert "link" not in response.headers
                    assert await response.read() == b"final %d" % index
            assert server.connections == 1

    run(scenario)


def test_large_bodies_both_ways(run):
    payload = bytes(range(256)) * 1024  # 256 kB: written apart from the head
    reply = b"z" * (3 << 20)  # 3 MB: more than the client buffers before it pauses

    async def big(server, number, index, head, body, writer) -> None:
        assert body == payload
        writer.write(answer(reply))

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(big) as server:
            for _ in range(2):
                assert await fetch(pool, server.url, payload) == (200, reply)
            assert server.connections == 1

    run(scenario)


def test_an_answer_left_unread_does_not_go_back_to_the_pool(run):
    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(echo) as server:
            async with await pool.post(server.url, "/x", b"{}", {}, 10) as response:
                assert response.status == 200
            assert await fetch(pool, server.url) == (200, b"/v1/chat/completions 2 1 {}")

    run(scenario)


def test_a_worker_that_does_not_answer_in_time(run):
    async def silent(server, number, index, head, body, writer) -> None:
        await server.done.wait()

    async def half(server, number, index, head, body, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()
        await server.done.wait()

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(silent) as server:
            with pytest.raises(UpstreamError, match="did not answer in time"):
                await fetch(pool, server.url, timeout=0.3)
        async with Scripted(half) as server:
            async with await pool.post(server.url, "/x", b"{}", {}, 0.3) as response:
                assert response.status == 200
                with pytest.raises(UpstreamError, match="did not answer in time"):
                    await response.read()

    run(scenario)


def test_connection_refused_names_the_address(run):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and nobody listens once closed

    async def scenario(pool: UpstreamPool) -> None:
        with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
            await fetch(pool, f"http://127.0.0.1:{port}/v1")

    run(scenario)


@pytest.mark.parametrize("reply", [
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n",
], ids=["not-http", "bad-status", "bad-length"])
def test_an_answer_that_is_not_http_is_an_error(reply, run):
    async def garbage(server, number, index, head, body, writer) -> None:
        writer.write(reply)
        await writer.drain()
        await server.done.wait()  # the client must not wait for more

    async def scenario(pool: UpstreamPool) -> None:
        async with Scripted(garbage) as server:
            with pytest.raises(UpstreamError, match="not valid HTTP"):
                await fetch(pool, server.url)

    run(scenario)


def test_a_body_cut_short_is_an_error(run):
    async def short(server, number, index, head, body, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        return False

    async def chunks_cut(server, number, index, head, body, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        return False

    async def scenario(pool: UpstreamPool) -> None:
        for handler in (short, chunks_cut):
            async with Scripted(handler) as server:
                async with await pool.post(server.url, "/x", b"{}", {}, 10) as response:
                    with pytest.raises(UpstreamError, match="closed the connection"):
                        await response.read()

    run(scenario)


def test_a_url_that_is_not_http_is_an_error(run):
    async def scenario(pool: UpstreamPool) -> None:
        with pytest.raises(UpstreamError, match="not an http"):
            await fetch(pool, "ftp://127.0.0.1/v1")

    run(scenario)
