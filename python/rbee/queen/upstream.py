"""The queen's HTTP/1.1 client for inference requests to workers.

Every proxied request pays for its client twice (sending and reading), so
this path is kept to asyncio transports and httptools' parser (llhttp, the
parser Node.js uses) with keep-alive connections pooled per worker.
docs/benchmarks.md ("Choosing the HTTP stack") has the measurements that
put this in place of aiohttp's client, which stays in use for health probes.

A response is read either whole (`read`) or as it arrives (`chunks`); while
nobody reads, the socket stops being read once a megabyte is buffered, so a
slow client slows its worker instead of filling the queen's memory.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

__all__ = ["UpstreamError", "UpstreamPool", "UpstreamResponse"]

_BUFFER_HIGH = 1 << 20
_IDLE_PER_HOST = 64
_CONNECT_TIMEOUT_S = 5.0


class UpstreamError(Exception):
    """The worker could not be reached, broke the connection, answered
    something that is not HTTP, or ran past the request's time."""


class _Target:
    """A worker's base URL, split once."""

    __slots__ = ("key", "host", "port", "ssl", "prefix", "host_header")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"worker URL {base_url!r} is not an http(s) URL")
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/").encode()
        self.host_header = parts.netloc.rpartition("@")[2].encode()
        self.key = (self.host, self.port, self.ssl)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses the response it is waiting for."""

    def __init__(self, pool: UpstreamPool, target: _Target) -> None:
        self.pool = pool
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False

    # -- asyncio -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the worker's answer is not valid HTTP: {exc}")
            self.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and response.status and not response.complete and \
                "content-length" not in response.headers and \
                "chunked" not in response.headers.get("transfer-encoding", "").lower():
            # A body without a length ends when the connection does.
            response.complete = True
            response._wake()
        if response is not None and not response.complete:
            self._fail(f"the worker closed the connection ({exc or 'EOF'})")

    # -- httptools callbacks -------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self.response
        if response is not None:
            status = self.parser.get_status_code()
            if 100 <= status < 200 and status != 101:
                # An interim answer (100 Continue, 103 Early Hints): the final
                # one follows on the same connection.
                response.headers.clear()
                return
            response.status = status
            response._wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response._chunks.append(body)
            response._buffered += len(body)
            if response._buffered > _BUFFER_HIGH and self.transport is not None:
                self.transport.pause_reading()
            response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and response.status:  # not the end of an interim answer
            response.complete = True
            response.keep_alive = self.parser.should_keep_alive()
            response._wake()

    # -- ours ----------------------------------------------------------------

    def _fail(self, message: str) -> None:
        if self.response is not None and self.response.error is None:
            self.response.error = UpstreamError(message)
            self.response._wake()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """The answer of one worker: status and headers (names in lower case)
    first, the body read whole or chunk by chunk. Use as an async context
    manager: leaving it returns a fully read connection to the pool and
    closes any other."""

    def __init__(self, connection: _Connection, deadline: float) -> None:
        self._connection = connection
        # One timer for the whole exchange, cancelled on release.
        self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)
        self.timed_out = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expire(self) -> None:
        if not self.complete and self.error is None:
            self.error = UpstreamError("the worker did not answer in time")
            self.timed_out = True
            self._wake()

    async def _wait(self) -> None:
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def _headers(self) -> None:
        while not self.status and self.error is None:
            await self._wait()
        if self.error is not None:
            raise self.error

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        async for chunk in self.chunks():
            parts.append(chunk)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked encoding already removed)."""
        connection = self._connection
        while True:
            if self._chunks:
                data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
                self._chunks.clear()
                if self._buffered > _BUFFER_HIGH and connection.transport is not None:
                    connection.transport.resume_reading()
                self._buffered = 0
                yield data
                continue
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait()

    def release(self) -> None:
        self._timer.cancel()
        connection = self._connection
        connection.response = None
        if self.complete and self.keep_alive and not connection.closed and not self._chunks:
            connection.pool._put(connection)
        else:
            connection.abort()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class UpstreamPool:
    """Keep-alive connections to the workers, by host and port."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._ssl: ssl.SSLContext | None = None

    def _target(self, base_url: str) -> _Target:
        target = self._targets.get(base_url)
        if target is None:
            if len(self._targets) > 4096:  # workers come and go; keep the cache bounded
                self._targets.clear()
            target = self._targets[base_url] = _Target(base_url)
        return target

    def _put(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.target.key, [])
        if len(idle) < _IDLE_PER_HOST:
            idle.append(connection)
        else:
            connection.abort()

    async def _connect(self, target: _Target, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        if target.ssl and self._ssl is None:
            self._ssl = ssl.create_default_context()
        timeout = max(0.001, min(_CONNECT_TIMEOUT_S, deadline - loop.time()))
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(self, target), target.host, target.port,
                ssl=self._ssl if target.ssl else None), timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(f"connecting to {target.host}:{target.port} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {target.host}:{target.port}: "
                                f"{exc.strerror or exc}") from None
        return connection

    async def post(self, base_url: str, path: str, body: bytes,
                   headers: dict[str, str], timeout_s: float) -> UpstreamResponse:
        """Sends POST base_url+path and answers once the status and headers
        are in. A pooled connection that the worker closed while it was idle
        is detected here and the request is sent again on a new one, which
        is safe because nothing of it was answered."""
        target = self._target(base_url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        head = b"".join((b"POST ", target.prefix, path.encode(), b" HTTP/1.1\r\nHost: ",
                         target.host_header, b"\r\nContent-Length: ",
                         str(len(body)).encode(), b"\r\n",
                         *(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                           for k, v in headers.items()),
                         b"\r\n"))
        idle = self._idle.get(target.key)
        while True:
            reused = False
            connection = None
            while idle:
                candidate = idle.pop()
                if not candidate.closed and candidate.transport is not None \
                        and not candidate.transport.is_closing():
                    connection, reused = candidate, True
                    break
            if connection is None:
                connection = await self._connect(target, deadline)
            response = UpstreamResponse(connection, deadline)
            connection.response = response
            connection.parser = httptools.HttpResponseParser(connection)
            assert connection.transport is not None
            connection.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                connection.transport.write(body)
            try:
                await response._headers()
            except UpstreamError:
                stale = reused and connection.closed and not response.timed_out
                response.release()
                if stale:
                    continue
                raise
            except BaseException:
                response.release()
                raise
            return response

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.abort()
        self._idle.clear()
