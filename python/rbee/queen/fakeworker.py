"""A simulated OpenAI-compatible inference server (the "fake worker").

`rbee queen --demo` runs a handful of these on loopback to stand in for real
GPU machines, and the tests use them as upstreams whose behaviour can be bent at
will: slow first tokens, dropped connections, error statuses, a worker that is
down, requests parked until the test lets them go.

Everything a worker produces is deterministic (derived from hashes of the worker
id, its seed and the input), so a test can tell which worker answered and can
compare a streamed answer with the non-streamed one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import itertools
import json
import math
import random
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

__all__ = ["FakeWorker", "DEFAULT_MAX_TOKENS", "MAX_TOKENS_CAP", "EMBEDDING_DIM"]

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 64
EMBEDDING_DIM = 8
# A stream that fail_mid_stream kills gets this many tokens out first.
_TOKENS_BEFORE_DEATH = 2
# json.loads never returns this, so it marks a body that is not JSON at all.
_INVALID: Any = object()

# Which capability an endpoint needs: a real embedding server refuses chat, and
# the queen must not send a job to a worker that cannot run it.
_ENDPOINT_CAPABILITY = {
    "/v1/chat/completions": "text-gen",
    "/v1/completions": "text-gen",
    "/v1/embeddings": "embedding",
    "/v1/images/generations": "image-gen",
}

# The error code of an answer aiohttp made before a handler ran.
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}

_VOCAB = (
    "amber bee bloom buzz clover colony comb dance drone field flight flower garden gold "
    "hive honey larva meadow nectar orchard petal pollen propolis queen royal scout sting "
    "summer swarm wax wing worker apiary blossom cell forager glade hum jelly linden "
    "lavender mead nest sun").split()

# Error type and code that OpenAI-compatible servers give with these statuses.
_STATUS_ERRORS = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"), 404: ("not_found_error", "not_found"),
    409: ("conflict_error", "conflict"), 422: ("invalid_request_error", "unprocessable_entity"),
    429: ("rate_limit_error", "rate_limit_exceeded"), 503: ("server_error", "service_unavailable"),
}


class _ApiError(Exception):
    """Raised while reading a request; its args are those of `_error` after the
    worker id: status, message, code, and optionally param and type."""


def _error(worker_id: str, status: int, message: str, code: str, param: str | None = None,
           kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers={"X-Fake-Worker": worker_id})


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return b"data: " + text.encode() + b"\n\n"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _text_of_content(content: Any) -> str:
    # Chat content is either a string or a list of typed parts; only text counts.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _text_of_input(value: Any, param: str) -> str:
    """A prompt or embedding input: a string, or token ids (rendered as text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return " ".join(map(str, value))
    raise _ApiError(400, f"'{param}' must be a string or an array of token ids",
                    "invalid_type", param)


def _word_count(text: str) -> int:
    return max(1, len(text.split()))


def _png(pixels: bytes, size: int) -> bytes:
    """A real (tiny) RGB PNG, so clients that decode images are satisfied."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    row = 3 * size
    raw = b"".join(b"\x00" + pixels[y * row:(y + 1) * row] for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class FakeWorker:
    """One simulated inference server; see the module docstring.

    `requests` counts every request to an inference endpoint (POST), whatever
    became of it; probes of /v1/models and /health are counted in `probes`, so
    a queen's health checks do not blur "which worker got the job" assertions.
    The fault knobs are plain attributes, read when a request arrives, so a
    test may change them at any time. An inference request meets them in this
    order: `down`, `hold` (then `down` again), `fail_next`, `status_next`, then
    validation (400/404); `fail_mid_stream` applies to valid streaming requests.
    `last_request` is {"method", "path", "headers" (case-insensitive), "json"
    (None if the body was not JSON)}.
    """

    def __init__(self, worker_id: str, models: list[str], *, capability: str = "text-gen",
                 ttft_ms: float = 20.0, tokens_per_sec: float = 200.0, seed: int = 0,
                 api_key: str | None = None) -> None:
        if not worker_id:
            raise ValueError("worker_id must not be empty")
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError("a worker serves at least one model, named by a non-empty string")
        if capability not in set(_ENDPOINT_CAPABILITY.values()):
            raise ValueError(f"unknown capability {capability!r}")
        if not ttft_ms >= 0:
            raise ValueError("ttft_ms must be >= 0")
        if not tokens_per_sec > 0:
            raise ValueError("tokens_per_sec must be > 0 (math.inf: no delay)")
        self.worker_id = worker_id
        self.models = list(models)
        self.capability = capability
        self.ttft_ms = float(ttft_ms)
        self.tokens_per_sec = float(tokens_per_sec)
        self.seed = seed
        # Like `vllm serve --api-key`: every /v1 route needs `Bearer <key>`.
        self.api_key = api_key
        self.url = ""
        self.requests = 0
        self.probes = 0
        self.active = 0
        self.max_active = 0
        self.cancelled = 0
        self.last_request: dict[str, Any] | None = None
        self.fail_next = 0
        self.fail_mid_stream = 0
        self.status_next: list[int] = []
        self.down = False
        self.hold: asyncio.Event | None = None
        self._created = int(time.time())
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def __repr__(self) -> str:
        return f"FakeWorker({self.worker_id!r}, url={self.url!r}, active={self.active})"

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listens on loopback (port 0: any free port) and returns the base URL."""
        if self._runner is not None:
            raise RuntimeError(f"{self.worker_id} is already running at {self.url}")
        if host == "localhost":
            # "localhost" may resolve to both ::1 and 127.0.0.1, which with port 0
            # would bind two different ports; one address keeps the URL exact.
            host = "127.0.0.1"
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"a fake worker only listens on loopback, not {host!r}")
        # handler_cancellation: when a client goes away mid-request, aiohttp
        # cancels the handler; that is how `cancelled` gets counted.
        runner = web.AppRunner(self._build_app(), handler_cancellation=True,
                               access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}/v1"
        self._runner = runner
        self._stopping = False
        return self.url

    async def stop(self) -> None:
        """Stops listening; requests still in flight (held ones too) are cut off."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        # Cancelling our own handlers first means held requests do not keep
        # the shutdown waiting; they are not counted as client cancellations.
        self._stopping = True
        for task in list(self._in_flight):
            task.cancel()
        await runner.cleanup()

    # -------------------------------------------------------------------- wiring

    def _build_app(self) -> web.Application:
        @web.middleware
        async def openai_errors(request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                ) -> web.StreamResponse:
            # A down worker refuses everything; inference endpoints check on
            # their own so that they can still count the request.
            if self.down and request.path not in _ENDPOINT_CAPABILITY:
                return self._down_response()
            if self.api_key and request.path.startswith("/v1/") and \
                    request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _error(self.worker_id, 401, "a valid API key is required",
                              "invalid_api_key")
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                # Unknown paths, wrong methods and oversized bodies answer in
                # the OpenAI shape too.
                code = _HTTP_ERROR_CODES.get(exc.status, "invalid_request")
                return _error(self.worker_id, exc.status,
                              f"{request.method} {request.path}: {exc.reason}", code)

        app = web.Application(middlewares=[openai_errors])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model:.+}", self._get_model)
        for path in _ENDPOINT_CAPABILITY:
            app.router.add_post(path, self._inference)
        return app

    def _json(self, body: dict[str, Any]) -> web.Response:
        return web.json_response(body, headers={"X-Fake-Worker": self.worker_id})

    def _down_response(self) -> web.Response:
        return _error(self.worker_id, 503, f"worker {self.worker_id} is down (simulated)",
                      "service_unavailable", kind="server_error")

    def _model_entry(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self._created,
                "owned_by": "rbee-simulated"}

    async def _health(self, request: web.Request) -> web.Response:
        self.probes += 1
        return self._json({"status": "ok", "worker": self.worker_id, "simulated": True})

    async def _list_models(self, request: web.Request) -> web.Response:
        self.probes += 1
        return self._json({"object": "list", "data": [self._model_entry(m) for m in self.models]})

    async def _get_model(self, request: web.Request) -> web.Response:
        self.probes += 1
        model = request.match_info["model"]
        if model not in self.models:
            return _error(self.worker_id, 404,
                          f"The model `{model}` does not exist on {self.worker_id}",
                          "model_not_found", "model")
        return self._json(self._model_entry(model))

    # ----------------------------------------------------------------- inference

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self.requests += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._in_flight.add(task)
        # Set when this worker drops the connection on purpose, so the
        # cancellation that follows is not mistaken for a client leaving.
        dropped: list[bool] = []
        try:
            raw = await request.read()
            body: Any = _INVALID
            try:
                body = json.loads(raw)
            except ValueError:
                pass
            self.last_request = {
                "method": request.method, "path": request.path,
                "headers": CIMultiDict(request.headers),
                "json": None if body is _INVALID else body}
            if self.down:
                return self._down_response()
            hold = self.hold
            if hold is not None and not hold.is_set():
                await hold.wait()
                if self.down:  # it may have gone down while the request waited
                    return self._down_response()
            if self.fail_next > 0:
                self.fail_next -= 1
                return self._drop(request, dropped)
            if self.status_next:
                return self._simulated_status(int(self.status_next.pop(0)))
            payload = self._validate(request.path, body)
            if request.path == "/v1/embeddings":
                return await self._embeddings(payload)
            if request.path == "/v1/images/generations":
                return await self._images(payload)
            return await self._generate(request, payload, dropped)
        except _ApiError as exc:
            return _error(self.worker_id, *exc.args)
        except asyncio.CancelledError:
            if not dropped and not self._stopping:
                self.cancelled += 1
            raise
        finally:
            self.active -= 1
            self._in_flight.discard(task)

    def _drop(self, request: web.Request, dropped: list[bool]) -> web.Response:
        dropped.append(True)
        if request.transport is not None:
            request.transport.close()
        # Never sent: aiohttp finds the transport closed and gives up quietly.
        return web.Response(status=500)

    def _simulated_status(self, status: int) -> web.Response:
        kind, code = _STATUS_ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error",
                     f"http_{status}"))
        return _error(self.worker_id, status,
                      f"simulated HTTP {status} from worker {self.worker_id}", code, kind=kind)

    def _validate(self, path: str, body: Any) -> dict[str, Any]:
        if body is _INVALID:
            raise _ApiError(400, "the request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object", "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "you must provide a model parameter",
                            "missing_required_parameter", "model")
        if model not in self.models:
            raise _ApiError(404, f"The model `{model}` does not exist on worker "
                            f"{self.worker_id} (serves: {', '.join(self.models)})",
                            "model_not_found", "model", "not_found_error")
        if _ENDPOINT_CAPABILITY[path] != self.capability:
            raise _ApiError(400, f"worker {self.worker_id} is {self.capability}; "
                            f"it does not serve {path}", "unsupported_endpoint")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _ApiError(400, "'stream' must be a boolean", "invalid_type", "stream")
        return body

    def _sleep_s(self, tokens: int) -> float:
        return self.ttft_ms / 1000.0 + tokens / self.tokens_per_sec

    def _tokens(self, prompt: str, count: int) -> list[str]:
        # The first token names the worker, so any answer shows where it ran.
        rng = random.Random(_seed_of(self.seed, self.worker_id, prompt))
        return [f"[{self.worker_id}]"] + [" " + rng.choice(_VOCAB) for _ in range(count - 1)]

    async def _generate(self, request: web.Request, body: dict[str, Any],
                        dropped: list[bool]) -> web.StreamResponse:
        chat = request.path == "/v1/chat/completions"
        prompt = self._chat_prompt(body) if chat else self._completion_prompt(body)
        limit = body.get("max_completion_tokens") if chat else None
        if limit is None:
            limit = body.get("max_tokens")
        if limit is not None and not _positive_int(limit):
            raise _ApiError(400, "max_tokens must be a positive integer", "invalid_value",
                            "max_tokens")
        if body.get("n") not in (None, 1) or body.get("n") is True:
            raise _ApiError(400, "the simulated worker only supports n=1", "invalid_value", "n")
        count = min(limit if limit is not None else DEFAULT_MAX_TOKENS, MAX_TOKENS_CAP)
        # Hitting the caller's limit is "length"; the cap and the default length
        # stand for the model finishing on its own.
        finish = "length" if limit is not None and limit <= MAX_TOKENS_CAP else "stop"
        tokens = self._tokens(prompt, count)
        prompt_tokens = _word_count(prompt)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                 "total_tokens": prompt_tokens + count}
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{self.worker_id}-{next(self._ids)}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body["model"],
                "system_fingerprint": self.worker_id}
        if body.get("stream"):
            options = body.get("stream_options")
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, chat, head, tokens, finish,
                                      usage if with_usage else None, dropped)
        await asyncio.sleep(self._sleep_s(count))
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._json({**head, "choices": [choice], "usage": usage})

    def _chat_prompt(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "'messages' must be a non-empty array",
                            "missing_required_parameter", "messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise _ApiError(400, "every message needs a 'role'", "invalid_value", "messages")
        return "\n".join(_text_of_content(m.get("content")) for m in messages)

    def _completion_prompt(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if prompt is None:
            raise _ApiError(400, "you must provide a prompt", "missing_required_parameter",
                            "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list))
                                                       for p in prompt):
            # Several prompts: one answer for all of them (n=1 only, see _generate).
            return "\n".join(_text_of_input(p, "prompt") for p in prompt)
        return _text_of_input(prompt, "prompt")

    async def _stream(self, request: web.Request, chat: bool, head: dict[str, Any],
                      tokens: list[str], finish: str, usage: dict[str, int] | None,
                      dropped: list[bool]) -> web.StreamResponse:
        die_after: int | None = None
        if self.fail_mid_stream > 0:
            self.fail_mid_stream -= 1
            die_after = _TOKENS_BEFORE_DEATH
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Fake-Worker": self.worker_id})
        # With include_usage every chunk carries "usage": null, as OpenAI's do.
        extra = {"usage": None} if usage is not None else {}
        if chat:
            extra["object"] = "chat.completion.chunk"
        try:
            await response.prepare(request)
            await asyncio.sleep(self.ttft_ms / 1000.0)
            for index, token in enumerate(tokens):
                if index == die_after:
                    dropped.append(True)
                    if request.transport is not None:
                        # close(), not abort(): the tokens already written reach
                        # the client, then the chunked body ends unfinished.
                        request.transport.close()
                    return response
                if index:
                    await asyncio.sleep(1.0 / self.tokens_per_sec)
                # One token per chunk; the last one carries the finish reason.
                choice: dict[str, Any] = {
                    "index": 0, "logprobs": None,
                    "finish_reason": finish if index == len(tokens) - 1 else None}
                if chat:
                    choice["delta"] = {"role": "assistant", "content": token} if index == 0 \
                        else {"content": token}
                else:
                    choice["text"] = token
                await response.write(_sse({**head, **extra, "choices": [choice]}))
            if usage is not None:
                await response.write(_sse({**head, **extra, "choices": [], "usage": usage}))
            await response.write(_sse("[DONE]"))
            await response.write_eof()
        except ConnectionResetError:
            # The client left between two tokens (the write noticed before the
            # cancellation did).
            if not dropped and not self._stopping:
                self.cancelled += 1
        return response

    async def _embeddings(self, body: dict[str, Any]) -> web.Response:
        value = body.get("input")
        if value is None:
            raise _ApiError(400, "you must provide an input", "missing_required_parameter",
                            "input")
        if isinstance(value, list) and value and all(isinstance(v, (str, list))
                                                     for v in value):
            texts = [_text_of_input(v, "input") for v in value]
        else:
            texts = [_text_of_input(value, "input")]
        if any(not t for t in texts):
            raise _ApiError(400, "input must not be empty", "invalid_value", "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _ApiError(400, "encoding_format must be 'float' or 'base64'",
                            "invalid_value", "encoding_format")
        await asyncio.sleep(self._sleep_s(0))
        data = []
        for index, text in enumerate(texts):
            vector = self.embedding(body["model"], text)
            embedding: Any = vector
            if encoding == "base64":
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_word_count(t) for t in texts)
        return self._json({"object": "list", "data": data, "model": body["model"],
                           "system_fingerprint": self.worker_id,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @staticmethod
    def embedding(model: str, text: str) -> list[float]:
        """The unit vector a worker returns for `text`; the same on every worker
        serving `model`, as with a real model, so answers do not depend on routing."""
        digest = hashlib.sha256(f"{model}\x00{text}".encode()).digest()
        raw = [b / 127.5 - 1.0 for b in digest[:EMBEDDING_DIM]]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        return [round(x / norm, 6) for x in raw]

    async def _images(self, body: dict[str, Any]) -> web.Response:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _ApiError(400, "you must provide a prompt", "missing_required_parameter",
                            "prompt")
        n = body.get("n") or 1
        if not _positive_int(n) or n > 10:
            raise _ApiError(400, "n must be an integer from 1 to 10", "invalid_value", "n")
        url_form = body.get("response_format") == "url"
        await asyncio.sleep(self._sleep_s(0))
        data = []
        for index in range(n):
            pixels = hashlib.shake_256(
                f"{self.seed}\x00{body['model']}\x00{prompt}\x00{index}".encode()).digest(192)
            encoded = base64.b64encode(_png(pixels, 8)).decode()
            image: dict[str, Any] = {"revised_prompt": f"{prompt} [{self.worker_id}]"}
            if url_form:
                # Nothing is hosted anywhere; a data URL keeps the answer usable.
                image["url"] = "data:image/png;base64," + encoded
            else:
                image["b64_json"] = encoded
            data.append(image)
        return self._json({"created": int(time.time()), "data": data,
                           "system_fingerprint": self.worker_id})
