"""A blocking HTTP/1.x client on a raw socket, for tests that need to see
and control the bytes: pipelining, interim answers, chunk framing, when a
connection closes."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    version: str
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    # The payload of each chunk as framed on the wire; None when the body
    # was not chunked.
    chunks: list[bytes] | None = field(default=None)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The data of each server-sent event in the body."""
        return [line[5:].strip() for line in self.body.decode().split("\n")
                if line.startswith("data:")]


def request(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            version: str = "1.1") -> bytes:
    """The bytes of one request; a dict or list body is sent as JSON."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/{version}", "Host: queen"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and not any(n.lower() == "transfer-encoding" for n in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (body or b"")


class RawClient:
    """One connection; every read is bounded by the socket timeout."""

    def __init__(self, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Reply:
        self.send(request(method, path, body, **kwargs))
        return self.reply()

    def head(self) -> tuple[str, int, dict[str, str]]:
        """The status line and headers of the next answer, 1xx included."""
        line = self.file.readline()
        if not line:
            raise EOFError("the server closed the connection instead of answering")
        version, status, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return version, int(status), headers

    def reply(self, interim: bool = False) -> Reply:
        """The next answer; 1xx answers are skipped unless `interim`."""
        version, status, headers = self.head()
        if 100 <= status < 200 and status != 101:
            if interim:
                return Reply(version, status, headers, b"")
            return self.reply()
        if "content-length" in headers:
            return Reply(version, status, headers, self._exactly(int(headers["content-length"])))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = list(self.chunks())
            return Reply(version, status, headers, b"".join(chunks), chunks)
        return Reply(version, status, headers, self.file.read())

    def chunks(self):
        """The chunks of a chunked body as they arrive, checking the framing."""
        while True:
            size_line = self.file.readline()
            if not size_line.endswith(b"\r\n"):
                raise AssertionError(f"bad chunk size line {size_line!r}")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while self.file.readline() not in (b"\r\n", b""):
                    pass  # trailers
                return
            data = self._exactly(size)
            if self._exactly(2) != b"\r\n":
                raise AssertionError("a chunk does not end with CRLF")
            yield data

    def _exactly(self, size: int) -> bytes:
        data = self.file.read(size)
        if len(data) != size:
            raise EOFError(f"the body ended after {len(data)} of {size} bytes")
        return data

    def at_eof(self) -> bool:
        """True once the server has closed; a timeout if it keeps it open."""
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            # Closed with bytes of ours unread: the kernel resets instead.
            return True
