"""A pass-through proxy with no queen in it, to measure HTTP stacks alone.

bench/bench_http_stacks.py runs it with each pairing of server and client:

    aiohttp server  aiohttp.web low-level Server, no router or middleware
    raw server      asyncio Protocol + httptools request parser (as wire.py)
    aiohttp client  a pooled ClientSession
    raw client      rbee.queen.upstream.UpstreamPool (what the queen uses)

Every request is forwarded to the one upstream and its answer sent back
with Content-Length, nothing else. What a pairing costs here is the floor
under any proxy built on it.

    python bench/passthrough.py --server raw --client raw --port 0 --upstream URL
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import httptools
from aiohttp import web

from rbee.queen.serve import until_signalled
from rbee.queen.upstream import UpstreamPool


def make_client(kind: str, upstream: str):
    """An async function (path, body) -> (status, body)."""
    if kind == "raw":
        pool = UpstreamPool()

        async def raw_call(path: bytes, body: bytes) -> tuple[int, bytes]:
            async with await pool.post(upstream, path.decode().removeprefix("/v1"), body,
                                       {"Content-Type": "application/json"}, 30.0) as answer:
                return answer.status, await answer.read()
        return raw_call
    session: aiohttp.ClientSession | None = None

    async def aiohttp_call(path: bytes, body: bytes) -> tuple[int, bytes]:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        async with session.post(upstream + path.decode().removeprefix("/v1"), data=body,
                                headers={"Content-Type": "application/json"}) as answer:
            return answer.status, await answer.read()
    return aiohttp_call


class RawServer(asyncio.Protocol):
    """The smallest HTTP/1.1 server on httptools: keep-alive, one request at a time."""

    def __init__(self, call) -> None:
        self.call = call
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self.answer(self.url, b"".join(self.body)))

    async def answer(self, url: bytes, body: bytes) -> None:
        status, payload = await self.call(url, body)
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (status, len(payload), payload))


async def serve(server: str, client: str, port: int, upstream: str) -> None:
    call = make_client(client, upstream)
    loop = asyncio.get_running_loop()
    if server == "raw":
        listener = await loop.create_server(lambda: RawServer(call), "127.0.0.1", port)
        bound = listener.sockets[0].getsockname()[1]
    else:
        async def handle(request: web.BaseRequest) -> web.Response:
            status, payload = await call(request.path.encode(), await request.read())
            return web.Response(body=payload, status=status, content_type="application/json")

        runner = web.ServerRunner(web.Server(handle), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = runner.addresses[0][1]
    print(f"READY http://127.0.0.1:{bound}/v1", flush=True)
    await until_signalled()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("raw", "aiohttp"), required=True)
    parser.add_argument("--client", choices=("raw", "aiohttp"), required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://h:p/v1")
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(serve(args.server, args.client, args.port, args.upstream))
    sys.exit(0)


if __name__ == "__main__":
    main()
