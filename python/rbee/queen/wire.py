"""The queen's listening socket: its own HTTP/1.1 server for inference.

Inference requests are the queen's hot path, and serving one through
aiohttp, with its router and middleware, costs about twice the CPU of
parsing it here (docs/benchmarks.md, "Choosing the HTTP stack"). So the queen
parses requests itself with httptools on asyncio transports and serves
the OpenAI-compatible POST routes and `GET /v1/models` here, through the
same `Proxy.serve` the aiohttp application uses.

Any other request (administration, native jobs, health, metrics) hands its
connection to the aiohttp application for the rest of the connection's
life: the bytes read so far are given to an aiohttp protocol in this
connection's place. Clients that use the API and the admin routes on one
connection therefore keep working, just on the slower path. One case is
refused: a non-inference request pipelined behind another request in the
same read, whose start in the byte stream is unknown (answered with 400;
HTTP clients in use do not pipeline).

A request that asks to switch protocols (`Upgrade: h2c`, which `curl --http2`
sends on plain HTTP) is answered in HTTP/1.1 on the same connection, as a
server may do (RFC 9110, 7.8).
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
import logging
import time
from email.utils import formatdate
from typing import Any, Callable

import httptools
from multidict import CIMultiDict

from rbee.queen.core import Queen
from rbee.queen.frontdoor import BadRequest
from rbee.queen.jobs import ENDPOINTS, JobError
from rbee.queen.proxy import Proxy

__all__ = ["WireServer"]

log = logging.getLogger("rbee.queen.http")

_ROUTES = {("/v1/" + e.replace(".", "/")).encode(): e for e in ENDPOINTS}
_MODELS = b"/v1/models"
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # as the aiohttp application's client_max_size
KEEPALIVE_S = 75.0
REQUEST_STALL_S = 60.0  # a request whose bytes stop coming for this long gets 408
_PENDING_MAX = 16  # pipelined requests buffered before reading pauses
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class _HandOff(Exception):
    """Raised inside a parser callback to stop parsing: aiohttp takes over."""


class _Refuse(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Date:
    """The Date header, formatted at most once a second."""

    value = b""
    second = -1

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = formatdate(now, usegmt=True).encode()
        return cls.value


def _clean(value: str) -> bytes:
    return value.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace")


def head(status: int, headers: dict[str, str], length: int | None, keep_alive: bool,
         chunked: bool = False) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, _REASONS.get(status, b"Unknown"),
                                                  _Date.get())]
    for name, value in headers.items():
        parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), _clean(value)))
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class _Request:
    __slots__ = ("method", "path", "headers", "body", "keep_alive", "http11", "refused")

    def __init__(self, method: bytes, path: bytes, headers: CIMultiDict[str], body: bytes,
                 keep_alive: bool, http11: bool, refused: _Refuse | None) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.keep_alive, self.http11, self.refused = keep_alive, http11, refused


class WireDownstream:
    """A `Downstream` that writes to the connection: Content-Length for a
    whole answer, chunked encoding for a stream (close-delimited for
    HTTP/1.0 clients, which do not know chunks)."""

    def __init__(self, connection: Connection, request: _Request) -> None:
        self.connection = connection
        self.request = request
        self.started = False
        self._chunked = request.http11

    def _last_if_draining(self) -> None:
        # A queen that is stopping answers what it has, then closes.
        if self.connection.server.draining:
            self.request.keep_alive = False

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.started = True
        self._last_if_draining()
        if self.request.keep_alive and not self.request.http11:
            # An HTTP/1.0 client assumes the connection closes unless told.
            headers = {**headers, "Connection": "keep-alive"}
        self.connection.write(head(status, headers, len(body), self.request.keep_alive) + body)

    async def open_stream(self, status: int, headers: dict[str, str]) -> None:
        self.started = True
        self._last_if_draining()
        if not self._chunked:
            self.request.keep_alive = False
        self.connection.write(head(status, headers, None, self.request.keep_alive,
                                   chunked=self._chunked))

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._chunked:
            self.connection.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self.connection.write(chunk)
        await self.connection.drain()

    async def close_stream(self) -> None:
        if self._chunked:
            self.connection.write(b"0\r\n\r\n")


class Connection(asyncio.Protocol):
    """One client connection while it uses the inference routes."""

    def __init__(self, server: WireServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[_Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.last_active = time.monotonic()
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        # The request being parsed.
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._refused: _Refuse | None = None
        self._in_message = False
        self._in_head = False
        # Bytes of reads that held nothing but the head being parsed (a read
        # that began with it included); with `_size`, what bounds a head that
        # grows without end.
        self._head_bytes = 0
        # After a refusal the parser is spent: nothing more is read.
        self._broken = False
        # Where the current request started, while it may still be handed off.
        self._chunk = b""
        self._chunk_starts_message = True
        self._raw: bytearray | None = None
        self._handing_off = False
        # A refusal decided inside a parser callback, sent once parsing stops.
        self._stop: _Refuse | None = None
        # The body length the request's head gave (Content-Length).
        self._length = 0
        # A request whose Upgrade is ignored, while its body is read: the
        # parser stops at the head, so the body is counted out here.
        self._upgrade: _Request | None = None
        self._upgrade_left = 0
        self._upgrade_body: list[bytes] = []

    # -- asyncio -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        if self.server.draining:
            self.close()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._broken:
            return
        if self._handing_off:
            assert self._raw is not None
            self._raw += data
            return
        if self._upgrade is not None:
            self._take_upgrade_body(data)
            return
        if self._raw is not None:
            self._raw += data
        self._chunk = data
        self._chunk_starts_message = not self._in_message
        in_head = self._in_head
        try:
            self.parser.feed_data(data)
            if self._in_head:
                if in_head or self._raw is not None:  # all of `data` is head
                    self._head_bytes += len(data)
                if max(self._size, self._head_bytes) > MAX_HEADER_BYTES:
                    # Answered now: waiting for the end of the head would
                    # buffer whatever the client keeps sending.
                    self._refuse_now(431, f"the request head is larger than "
                                     f"{MAX_HEADER_BYTES} bytes", "headers_too_large")
        except httptools.HttpParserCallbackError:
            if self._stop is not None:
                refusal, self._stop = self._stop, None
                self._refuse_now(refusal.status, refusal.message, refusal.code)
                return
            if not self._handing_off:
                log.exception("the request parser failed")
                self._refuse_now(500, "the queen failed to read this request; see its log",
                                 "internal_error")
                return
            self._try_hand_off()
        except httptools.HttpParserUpgrade as exc:
            self._ignore_upgrade(data[exc.args[0]:] if exc.args else b"")
        except httptools.HttpParserError as exc:
            self._refuse_now(400, f"malformed HTTP request: {exc}", "bad_request")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.task is not None:
            # The client is gone: cancelling stops the upstream request and
            # frees the worker's slot.
            self.task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._head_bytes = 0
        self._url.clear()
        self._headers = []
        self._body = []
        self._size = 0
        self._refused = None
        if self._chunk_starts_message:
            self._raw = bytearray(self._chunk)
            self._chunk_starts_message = False
        else:
            self._raw = None

    def on_url(self, url: bytes) -> None:
        self._size += len(url)
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value)
        if self._size > MAX_HEADER_BYTES:
            self._refused = self._refused or _Refuse(
                431, f"the request head is larger than {MAX_HEADER_BYTES} bytes",
                "headers_too_large")
            return
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        path = b"".join(self._url).partition(b"?")[0]
        method = self.parser.get_method()
        fast = (method == b"POST" and path in _ROUTES) or (method == b"GET" and path == _MODELS)
        if not fast:
            if self._raw is not None:
                self._handing_off = True
                raise _HandOff()
            self._refused = self._refused or _Refuse(
                400, "a request for this route cannot be pipelined behind another one on "
                "this connection; send it on its own connection", "pipelined_request")
        self._raw = None
        self._size = 0
        self._length = length = next((int(v) for n, v in self._headers
                                      if n.lower() == "content-length" and v.strip().isdigit()),
                                     0)
        if length > MAX_BODY_BYTES and self._refused is None:
            # Said up front: answer now rather than read and drop the body.
            self._stop = _Refuse(413, f"the body is larger than {MAX_BODY_BYTES} bytes",
                                 "body_too_large")
            raise _HandOff()
        for name, value in self._headers:
            if name.lower() == "expect" and value.lower() == "100-continue" \
                    and self._refused is None and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY_BYTES:
            if self._refused is None:
                self._refused = _Refuse(413, f"the body is larger than {MAX_BODY_BYTES} bytes",
                                        "body_too_large")
            self._body = []
            return
        if self._refused is None:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        parser = self.parser
        request = _Request(parser.get_method(), b"".join(self._url).partition(b"?")[0],
                           CIMultiDict(self._headers),
                           self._body[0] if len(self._body) == 1 else b"".join(self._body),
                           parser.should_keep_alive() and self._refused is None,
                           parser.get_http_version() == "1.1", self._refused)
        if parser.should_upgrade():
            # The parser ended this request at its head: what follows would
            # be the new protocol. `_ignore_upgrade` reads the body instead.
            closing = "close" in request.headers.get("connection", "").lower()
            request.keep_alive = request.http11 and not closing and request.refused is None
            self._upgrade = request
            return
        self._enqueue(request)

    # -- a request asking for another protocol ---------------------------------

    def _ignore_upgrade(self, rest: bytes) -> None:
        """The parser stopped after the head of a request that asks to switch
        protocols; `rest` is what followed it in the last read."""
        upgrade = self._upgrade
        if upgrade is None:  # a head the parser did not finish (CONNECT)
            self._refuse_now(400, "this kind of request is not supported here", "bad_request")
            return
        if "chunked" in upgrade.headers.get("transfer-encoding", "").lower():
            self._upgrade = None
            self._refuse_now(400, "a request that asks for a protocol upgrade must give its "
                             "body's length (Content-Length), not send it in chunks",
                             "bad_request")
            return
        self.parser = httptools.HttpRequestParser(self)  # this one is spent
        self._upgrade_left = self._length
        self._upgrade_body = []
        self._in_message = True
        self._take_upgrade_body(rest)

    def _take_upgrade_body(self, data: bytes) -> None:
        take = data[:self._upgrade_left]
        if take:
            self._upgrade_body.append(take)
            self._upgrade_left -= len(take)
        if self._upgrade_left:
            return
        request, self._upgrade, self._in_message = self._upgrade, None, False
        assert request is not None
        request.body, self._upgrade_body = b"".join(self._upgrade_body), []
        self._enqueue(request)
        if len(data) > len(take):
            # The next request, to the fresh parser.
            self.data_received(data[len(take):])

    def _enqueue(self, request: _Request) -> None:
        self.pending.append(request)
        if len(self.pending) >= _PENDING_MAX and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve_pending())

    # -- serving ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client went away")
        if self._drain is not None:
            await self._drain

    async def _serve_pending(self) -> None:
        try:
            while self.pending and not self.closed:
                request = self.pending.popleft()
                if self._paused and len(self.pending) < _PENDING_MAX // 2 and self.transport:
                    self._paused = False
                    self.transport.resume_reading()
                await self._serve(request)
                self.last_active = time.monotonic()
                if not request.keep_alive or self.server.draining:
                    self.close()
                    return
        finally:
            self.task = None
        if self._handing_off:
            self._try_hand_off()

    async def _serve(self, request: _Request) -> None:
        downstream = WireDownstream(self, request)
        try:
            if request.refused is not None:
                raise request.refused
            await self.server.serve(request, downstream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer
            if downstream.started:
                # Half an answer was sent: all that is left is to end it.
                log.exception("inference request failed after its answer began")
                request.keep_alive = False
                return
            status, body, headers = _error_answer(exc)
            # A refusal, an expired deadline or a worker that failed is an
            # answer (a JobError, as on aiohttp's route), not the queen failing.
            if status >= 500 and not isinstance(exc, JobError):
                log.error("inference request failed", exc_info=exc)
            await downstream.send(status, headers, body)

    def _try_hand_off(self) -> None:
        """Gives the connection to aiohttp once this side has nothing left
        to answer (responses must go out in request order)."""
        if self.task is not None or self.pending or self.closed or self.transport is None:
            return
        raw, self._raw = bytes(self._raw or b""), None
        self.server.connections.discard(self)
        handler = self.server.aiohttp_protocol()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        handler.data_received(raw)
        self.closed = True

    def _refuse_now(self, status: int, message: str, code: str) -> None:
        """Answers and closes; after the answers still owed to the requests
        before this one, which go out first (in request order)."""
        self._broken = True
        if self.task is not None or self.pending:
            self.pending.append(_Request(b"", b"", CIMultiDict(), b"", False, True,
                                         _Refuse(status, message, code)))
            if self.transport is not None:
                self.transport.pause_reading()
            return
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "code": code}}).encode()
        self.write(head(status, {"Content-Type": "application/json"}, len(body), False) + body)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True


def _error_answer(exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    if isinstance(exc, JobError):
        return exc.status, json.dumps(exc.to_dict()).encode(), {
            "Content-Type": "application/json", **exc.headers()}
    if isinstance(exc, BadRequest):
        return 400, json.dumps(exc.to_dict()).encode(), {"Content-Type": "application/json"}
    if isinstance(exc, _Refuse):
        payload: dict[str, Any] = {"error": {"message": exc.message,
                                             "type": "invalid_request_error", "code": exc.code}}
        return exc.status, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    payload = {"error": {"message": "the queen failed to handle this request; see its log",
                         "type": "server_error", "code": "internal_error"}}
    return 500, json.dumps(payload).encode(), {"Content-Type": "application/json"}


class WireServer:
    """The listening socket; `aiohttp_protocol` makes the protocol that
    takes over connections for every other route."""

    def __init__(self, queen: Queen, proxy: Proxy,
                 aiohttp_protocol: Callable[[], asyncio.Protocol],
                 model_list: Callable[[Queen], dict[str, Any]]) -> None:
        self.queen = queen
        self.proxy = proxy
        self.aiohttp_protocol = aiohttp_protocol
        self.model_list = model_list
        self.connections: set[Connection] = set()
        # Set when the queen starts stopping: answers in flight are the last
        # on their connections.
        self.draining = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port,
                                                reuse_address=True)
        self._sweeper = loop.create_task(self._sweep_forever(), name="rbee-wire-sweep")
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def serve(self, request: _Request, downstream: WireDownstream) -> None:
        queen = self.queen
        tenant = None
        if queen.platform:
            tenant = queen.tenants.authenticate(request.headers.get("Authorization"))
        if request.method == b"GET":
            body = json.dumps(self.model_list(queen)).encode()
            await downstream.send(200, {"Content-Type": "application/json"}, body)
            return
        await self.proxy.serve(_ROUTES[request.path], request.body, request.headers, tenant,
                               downstream)

    async def _sweep_forever(self) -> None:
        """Closes keep-alive connections idle for KEEPALIVE_S and answers 408
        to requests stalled for REQUEST_STALL_S, without a timer per request."""
        while True:
            await asyncio.sleep(KEEPALIVE_S / 5)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.task is not None or connection.closed:
                    continue
                if not connection._in_message:
                    if connection.last_active < now - KEEPALIVE_S:
                        connection.close()
                elif connection.last_active < now - REQUEST_STALL_S:
                    # A request that stopped arriving half way holds a socket
                    # and its buffers for nothing.
                    connection._refuse_now(408, f"the request stopped arriving for "
                                           f"{REQUEST_STALL_S:.0f} s", "request_timeout")

    async def close(self, grace_s: float = 0.0) -> None:
        """Stops listening and ends every connection. Requests in flight get
        up to `grace_s` seconds to finish (each answer is the last on its
        connection); idle connections, and requests not fully received, end
        at once. What still runs after that is cancelled, which frees its
        slot, and a stream cut that way simply ends."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        self.draining = True
        for connection in list(self.connections):
            if connection.task is None:
                connection.close()
        busy = [c.task for c in self.connections if c.task is not None]
        if busy and grace_s > 0:
            await asyncio.wait(busy, timeout=grace_s)
        tasks = []
        for connection in list(self.connections):
            if connection.task is not None:
                tasks.append(connection.task)
                connection.task.cancel()
            connection.close()
        await asyncio.gather(*tasks, *([self._sweeper] if self._sweeper else []),
                             return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
