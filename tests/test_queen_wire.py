"""The queen's own HTTP/1.1 server (rbee.queen.wire) over real sockets:
hand-off to aiohttp, pipelining, Expect, malformed and oversized requests,
chunked and close-delimited streams, disconnects, keep-alive, and errors
in the OpenAI shape.

Which server answered is visible from outside: aiohttp sends a Server
header, wire.py sends none."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from queen_harness import LOOPS, QueenHarness, eventually
from raw_http import RawClient, Reply, request
from rbee.queen import wire

pytestmark = pytest.mark.timeout(90)

WORKERS = [
    {"id": "fast", "models": ["m"], "slots": 4, "cost_per_token": 1e-7},
    # 20 tokens a second: a long stream lasts seconds, time enough to act mid-way.
    {"id": "slow", "models": ["slow-m"], "slots": 2, "cost_per_token": 1e-7,
     "fake_tokens_per_sec": 20.0},
    {"id": "embedder", "models": ["e"], "capability": "embedding", "slots": 2,
     "cost_per_token": 1e-8},
]
ADMIN = "admin-secret"


def chat_body(model: str = "m", max_tokens: int = 3, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens, **extra}


def chat(max_tokens: int = 3, model: str = "m", headers=None, version="1.1", **extra) -> bytes:
    return request("POST", "/v1/chat/completions", chat_body(model, max_tokens, **extra),
                   headers=headers, version=version)


def assert_chat(reply: Reply, worker: str = "fast", tokens: int = 3) -> None:
    assert reply.status == 200, reply.body
    assert reply.headers["x-rbee-worker"] == worker
    answer = reply.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"].startswith(f"[{worker}]")
    assert answer["usage"]["completion_tokens"] == tokens


def by_wire(reply: Reply) -> bool:
    return "server" not in reply.headers


def assert_error(reply: Reply, status: int, code: str, kind: str | None = None) -> dict:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]
    if kind is not None:
        assert error["type"] == kind
    return error


@pytest.fixture(params=LOOPS)
def loop_factory(request):
    return request.param


@pytest.fixture
def harness(tmp_path, loop_factory):
    h = QueenHarness(tmp_path, WORKERS, config={"models": [{"id": "nobody-serves-this"}]},
                     loop_factory=loop_factory).start()
    yield h
    h.close()


# -- hand-off to aiohttp --------------------------------------------------------

def test_inference_then_admin_then_inference_on_one_connection(harness):
    with RawClient(harness.port) as client:
        client.send(chat())
        first = client.reply()
        assert_chat(first)
        assert by_wire(first)
        health = client.ask("GET", "/health")
        assert health.status == 200 and health.json()["status"] == "ok"
        assert not by_wire(health)  # the connection now belongs to aiohttp
        state = client.ask("GET", "/v1/state")
        assert {w["id"] for w in state.json()["workers"]} == {"fast", "slow", "embedder"}
        assert client.ask("GET", "/v1/scheduler").json()["version"] == 1
        client.send(chat(max_tokens=5))
        later = client.reply()
        assert_chat(later, tokens=5)
        assert not by_wire(later)
        # A stream on aiohttp's route, then the models list, still on this connection.
        client.send(chat(max_tokens=4, stream=True))
        stream = client.reply()
        assert stream.status == 200 and stream.events()[-1] == "[DONE]"
        assert len(stream.events()) == 5
        models = client.ask("GET", "/v1/models")
        assert {m["id"] for m in models.json()["data"]} == {"m", "slow-m", "e"}
    assert eventually(lambda: harness.queen.registry.workers["fast"].active == 0)


def test_a_connection_that_starts_with_another_route_is_handed_off(harness):
    with RawClient(harness.port) as client:
        scheduler = client.ask("GET", "/v1/scheduler")
        assert scheduler.status == 200 and not by_wire(scheduler)
        assert "schedule_job" in scheduler.json()["source"]
        client.send(chat())
        assert_chat(client.reply())


def test_hand_off_with_the_request_split_over_several_reads(harness):
    policy = json.dumps({"source": 'fn schedule_job(job, pools, workers) '
                                   '{ workers.by_id("fast") }'}).encode()
    data = request("PUT", "/v1/scheduler", policy, headers={"Content-Type": "application/json"})
    with RawClient(harness.port) as client:
        # The head ends in the middle of the second piece, the body in the last.
        for piece in (data[:7], data[7:40], data[40:-10], data[-10:]):
            client.send(piece)
            time.sleep(0.05)
        answer = client.reply()
        assert answer.status == 200, answer.body
        assert answer.json() == {"version": 2, "status": "active"}
        client.send(chat())
        assert_chat(client.reply())
    assert harness.queen.policies.version == 2


def test_admin_request_after_a_chunked_inference_request(harness):
    body = json.dumps(chat_body(max_tokens=2)).encode()
    framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    with RawClient(harness.port) as client:
        client.send(request("POST", "/v1/chat/completions", framed + b"0\r\n\r\n",
                            headers={"Transfer-Encoding": "chunked"}))
        assert_chat(client.reply(), tokens=2)
        assert client.ask("GET", "/health").status == 200


# -- pipelining -------------------------------------------------------------------

def test_pipelined_inference_requests_are_answered_in_order(harness):
    embed = request("POST", "/v1/embeddings", {"model": "e", "input": "bee"})
    models = request("GET", "/v1/models")
    with RawClient(harness.port) as client:
        # The slow worker's answer comes first even though the others are quicker.
        client.send(chat(model="slow-m", max_tokens=8) + chat(max_tokens=2) + embed + models)
        slow = client.reply()
        assert_chat(slow, worker="slow", tokens=8)
        assert_chat(client.reply(), tokens=2)
        vectors = client.reply()
        assert vectors.status == 200 and vectors.json()["object"] == "list"
        assert len(vectors.json()["data"][0]["embedding"]) == 8
        listed = client.reply()
        assert listed.status == 200 and len(listed.json()["data"]) == 3
        # The connection is still open and served by wire.py.
        client.send(chat())
        again = client.reply()
        assert_chat(again)
        assert by_wire(again)


def test_many_pipelined_requests_are_all_answered_in_order(harness):
    count = 3 * wire._PENDING_MAX  # past the point where the queen stops reading for a while
    with RawClient(harness.port) as client:
        client.send(b"".join(chat(max_tokens=1 + i % 40) for i in range(count)))
        for i in range(count):
            assert_chat(client.reply(), tokens=1 + i % 40)
        client.send(chat())
        assert_chat(client.reply())


def test_another_route_pipelined_behind_inference_is_refused(harness):
    with RawClient(harness.port) as client:
        client.send(chat() + request("GET", "/health"))
        assert_chat(client.reply())
        refused = client.reply()
        assert_error(refused, 400, "pipelined_request", "invalid_request_error")
        assert refused.headers["connection"] == "close"
        assert client.at_eof()


def test_another_route_sent_while_inference_runs_waits_its_turn(harness):
    # Sent in its own write once the first request is in flight: the queen
    # knows where it starts, so it is handed off after the first answer.
    with RawClient(harness.port) as client:
        client.send(chat(model="slow-m", max_tokens=10))
        assert eventually(lambda: harness.fakes["slow"].active == 1)
        client.send(request("GET", "/health"))
        assert_chat(client.reply(), worker="slow", tokens=10)
        health = client.reply()
        assert health.status == 200 and health.json()["status"] == "ok"


# -- Expect, malformed and oversized requests -------------------------------------

def test_expect_100_continue(harness):
    body = json.dumps(chat_body()).encode()
    data = request("POST", "/v1/chat/completions", body, headers={"Expect": "100-continue"})
    head, _, _ = data.partition(b"\r\n\r\n")
    with RawClient(harness.port) as client:
        client.send(head + b"\r\n\r\n")
        interim = client.reply(interim=True)
        assert (interim.version, interim.status) == ("HTTP/1.1", 100)
        client.send(body)
        assert_chat(client.reply())


@pytest.mark.parametrize("data", [
    b"THIS IS NOT HTTP\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: q\r\nno colon here\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: q\r\nContent-Length: ten\r\n\r\n",
    b"POST /v1/chat/completions HTTP/9.9\r\nHost: q\r\n\r\n",
    # Both framings, or two lengths: the way to smuggle a request past a proxy.
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: q\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: q\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
], ids=["request-line", "header-line", "content-length", "version", "cl-and-te", "two-cl"])
def test_malformed_requests_get_400_and_the_connection_closes(harness, data):
    with RawClient(harness.port) as client:
        client.send(data)
        reply = client.reply()
        error = assert_error(reply, 400, "bad_request", "invalid_request_error")
        assert "malformed HTTP request" in error["message"]
        assert reply.headers["connection"] == "close"
        assert client.at_eof()
    with RawClient(harness.port) as client:  # the server is fine
        client.send(chat())
        assert_chat(client.reply())


def test_a_malformed_request_behind_one_in_flight_is_refused_after_its_answer(harness):
    with RawClient(harness.port) as client:
        client.send(chat(model="slow-m", max_tokens=5) + b"GARBAGE\r\n\r\n")
        assert_chat(client.reply(), worker="slow", tokens=5)
        refused = client.reply()
        assert_error(refused, 400, "bad_request", "invalid_request_error")
        assert refused.headers["connection"] == "close"
        assert client.at_eof()


@pytest.mark.parametrize("header", [b"X-Endless: " + b"a" * 20_000, b"X-Many: b\r\n" * 2000],
                         ids=["one-endless-header", "many-headers"])
@pytest.mark.parametrize("behind", [False, True], ids=["alone", "behind-another"])
def test_a_head_that_keeps_growing_is_refused_with_431(harness, header, behind):
    before = chat(model="slow-m", max_tokens=4) if behind else b""
    piece = b"a" * 8192 if header.startswith(b"X-Endless") else header[:8192]
    replies: list = []

    def read() -> None:
        try:
            for _ in range(2 if behind else 1):
                replies.append(client.reply())
        except (OSError, EOFError) as exc:
            replies.append(exc)

    with RawClient(harness.port) as client:
        client.send(before + b"POST /v1/chat/completions HTTP/1.1\r\nHost: q\r\n" + header)
        reader = threading.Thread(target=read)
        reader.start()
        # The head never ends: the queen must answer without waiting for it.
        sent = len(header)
        while reader.is_alive() and sent < 50 * wire.MAX_HEADER_BYTES:
            try:
                client.send(piece)
            except OSError:
                break  # closed on its side
            sent += len(piece)
            time.sleep(0.005)
        reader.join(30)
        assert not reader.is_alive() and sent < 50 * wire.MAX_HEADER_BYTES
        if behind:
            assert_chat(replies.pop(0), worker="slow", tokens=4)
        reply = replies.pop(0)
        assert isinstance(reply, Reply), reply
        assert_error(reply, 431, "headers_too_large", "invalid_request_error")
        assert reply.headers["connection"] == "close"
        assert client.at_eof()
    assert eventually(lambda: not harness.runner.wire.connections)


H2C = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
       "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}


@pytest.mark.parametrize("behind", [False, True], ids=["alone", "behind-another"])
def test_an_upgrade_to_h2c_is_ignored_and_answered_in_http11(harness, behind):
    # What `curl --http2` sends on plain HTTP; the request after it on the
    # same connection goes to a fresh parser.
    upgrade = chat(max_tokens=2, headers=H2C)
    with RawClient(harness.port) as client:
        client.send((chat(model="slow-m", max_tokens=4) if behind else b"") + upgrade + chat())
        if behind:
            assert_chat(client.reply(), worker="slow", tokens=4)
        answered = client.reply()
        assert_chat(answered, tokens=2)
        assert "connection" not in answered.headers and "upgrade" not in answered.headers
        assert_chat(client.reply())
        assert_chat(client.ask("POST", "/v1/chat/completions", chat_body(max_tokens=1)),
                    tokens=1)
    assert harness.fakes["fast"].requests == 3


def test_an_upgrade_request_body_may_arrive_in_pieces(harness):
    upgrade = chat(headers=H2C)
    cut = upgrade.index(b"\r\n\r\n") + 10  # the head and a little of the body
    with RawClient(harness.port) as client:
        client.send(upgrade[:cut])
        time.sleep(0.2)
        client.send(upgrade[cut:-3])
        time.sleep(0.2)
        client.send(upgrade[-3:] + chat(max_tokens=1))
        assert_chat(client.reply())
        assert_chat(client.reply(), tokens=1)


def test_an_upgrade_request_with_a_chunked_body_is_refused(harness):
    body = json.dumps(chat_body()).encode()
    chunked = request("POST", "/v1/chat/completions",
                      b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
                      headers={**H2C, "Transfer-Encoding": "chunked"})
    with RawClient(harness.port) as client:
        client.send(chunked)
        refused = client.reply()
        error = assert_error(refused, 400, "bad_request", "invalid_request_error")
        assert "Content-Length" in error["message"]
        assert refused.headers["connection"] == "close"
        assert client.at_eof()
    assert harness.fakes["fast"].requests == 0


def test_a_body_over_the_limit_gets_413(harness, monkeypatch):
    monkeypatch.setattr(wire, "MAX_BODY_BYTES", 2000)
    small = chat_body()
    big = chat_body(user="x" * 3000)
    with RawClient(harness.port) as client:
        client.send(request("POST", "/v1/chat/completions", small))
        assert_chat(client.reply())
        client.send(request("POST", "/v1/chat/completions", big))
        reply = client.reply()
        error = assert_error(reply, 413, "body_too_large", "invalid_request_error")
        assert "2000 bytes" in error["message"]
        assert reply.headers["connection"] == "close"
        assert client.at_eof()
    assert harness.fakes["fast"].requests == 1


def test_a_declared_oversized_body_is_refused_before_it_is_sent(harness, monkeypatch):
    monkeypatch.setattr(wire, "MAX_BODY_BYTES", 2000)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: queen\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5000\r\n\r\n")
    with RawClient(harness.port) as client:
        client.send(head)  # and no body: the answer must not wait for one
        reply = client.reply(interim=True)
        assert_error(reply, 413, "body_too_large", "invalid_request_error")
        assert client.at_eof()
    assert harness.fakes["fast"].requests == 0


def test_a_request_that_stops_arriving_gets_408(tmp_path, monkeypatch, loop_factory):
    monkeypatch.setattr(wire, "KEEPALIVE_S", 0.5)
    monkeypatch.setattr(wire, "REQUEST_STALL_S", 0.3)
    h = QueenHarness(tmp_path, WORKERS[:2], loop_factory=loop_factory).start()
    try:
        with RawClient(h.port) as client:
            whole = chat()
            client.send(whole[:len(whole) - 5])  # the last bytes never come
            assert_error(client.reply(), 408, "request_timeout", "invalid_request_error")
            assert client.at_eof()
    finally:
        h.close()


def test_a_head_over_the_limit_gets_431(harness):
    padding = "y" * (wire.MAX_HEADER_BYTES + 1024)
    with RawClient(harness.port) as client:
        client.send(chat(headers={"X-Padding": padding}))
        reply = client.reply()
        assert_error(reply, 431, "headers_too_large", "invalid_request_error")
        assert reply.headers["connection"] == "close"
        assert client.at_eof()
    assert harness.fakes["fast"].requests == 0


def test_a_large_body_reaches_the_worker_intact(harness):
    # 840 kB: many reads here, and the upstream client's separate large-body
    # write (the fake worker itself takes at most 1 MB).
    text = "pollen " * 120_000
    with RawClient(harness.port) as client:
        client.send(request("POST", "/v1/chat/completions", {
            "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": text}]}))
        assert_chat(client.reply(), tokens=2)
    sent = harness.fakes["fast"].last_request["json"]
    assert sent["messages"][0]["content"] == text


# -- streaming --------------------------------------------------------------------

def test_a_stream_to_an_http11_client_is_chunked(harness):
    with RawClient(harness.port) as client:
        client.send(chat(max_tokens=6, stream=True))
        reply = client.reply()
        assert reply.status == 200
        assert reply.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in reply.headers and "connection" not in reply.headers
        assert reply.headers["content-type"] == "text/event-stream"
        assert reply.headers["x-fake-worker"] == "fast"  # the worker's own headers pass
        assert reply.chunks and all(reply.chunks)
        events = reply.events()
        assert events[-1] == "[DONE]"
        pieces = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
        assert len(pieces) == 6 and pieces[0] == "[fast]"
        # The chunked stream ended cleanly, so the connection serves on.
        client.send(chat())
        assert_chat(client.reply())
        assert client.ask("GET", "/health").json()["status"] == "ok"


def test_a_stream_to_an_http10_client_is_close_delimited(harness):
    with RawClient(harness.port) as client:
        client.send(chat(max_tokens=5, stream=True, version="1.0"))
        reply = client.reply()
        assert reply.status == 200 and reply.chunks is None
        assert "transfer-encoding" not in reply.headers
        assert "content-length" not in reply.headers
        assert reply.headers["connection"] == "close"
        # No chunk sizes between the events: the body is the events alone.
        assert reply.body.startswith(b"data: {")
        assert reply.body.endswith(b"data: [DONE]\n\n")
        assert len(reply.events()) == 6
        assert client.at_eof()


def test_http10_whole_answer_has_a_length_and_closes(harness):
    with RawClient(harness.port) as client:
        client.send(chat(version="1.0"))
        reply = client.reply()
        assert_chat(reply)
        assert reply.headers["connection"] == "close"
        assert int(reply.headers["content-length"]) == len(reply.body)
        assert client.at_eof()


def test_http10_keep_alive_is_confirmed_to_the_client(harness):
    keep = {"Connection": "keep-alive"}
    with RawClient(harness.port) as client:
        for tokens in (1, 2):
            client.send(chat(max_tokens=tokens, version="1.0", headers=keep))
            reply = client.reply()
            assert_chat(reply, tokens=tokens)
            assert reply.headers["connection"] == "keep-alive"
        # A stream has no length to end it for HTTP/1.0: it ends the connection.
        client.send(chat(max_tokens=2, stream=True, version="1.0", headers=keep))
        stream = client.reply()
        assert stream.headers["connection"] == "close" and stream.events()[-1] == "[DONE]"
        assert client.at_eof()


def test_client_leaving_mid_stream_frees_the_slot_and_cancels_upstream(harness):
    fake = harness.fakes["slow"]
    worker = harness.queen.registry.workers["slow"]
    client = RawClient(harness.port)
    try:
        client.send(chat(model="slow-m", max_tokens=60, stream=True))
        _, status, headers = client.head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        job_id = headers["x-rbee-job"]
        first = next(client.chunks())
        assert first.startswith(b"data: ")
        assert worker.active == 1 and fake.active == 1
    finally:
        client.close()
    assert eventually(lambda: worker.active == 0)
    assert eventually(lambda: fake.cancelled == 1 and fake.active == 0)
    assert eventually(lambda: harness.queen.jobs[job_id].status == "cancelled")
    with RawClient(harness.port) as again:
        again.send(chat(model="slow-m", max_tokens=2))
        assert_chat(again.reply(), worker="slow", tokens=2)


def test_client_leaving_while_queued_takes_the_job_off_the_queue(harness):
    client = RawClient(harness.port)
    try:
        client.send(chat(model="nobody-serves-this"))
        assert eventually(lambda: len(harness.queen.queue) == 1)
    finally:
        client.close()
    assert eventually(lambda: len(harness.queen.queue) == 0)


# -- keep-alive ---------------------------------------------------------------------

def test_the_workers_headers_reach_the_client_but_not_its_framing(harness):
    with RawClient(harness.port) as client:
        reply = client.ask("POST", "/v1/chat/completions", chat_body())
        assert_chat(reply)
        assert reply.headers["x-fake-worker"] == "fast"
        assert reply.headers["content-length"] == str(len(reply.body))
        assert "server" not in reply.headers and "transfer-encoding" not in reply.headers


def test_sequential_requests_reuse_one_connection(harness):
    wire_server = harness.runner.wire
    with RawClient(harness.port) as client:
        for tokens in (1, 2, 3):
            client.send(chat(max_tokens=tokens))
            reply = client.reply()
            assert_chat(reply, tokens=tokens)
            assert "connection" not in reply.headers and by_wire(reply)
        vectors = client.ask("POST", "/v1/embeddings", {"model": "e", "input": ["a", "b"]})
        assert len(vectors.json()["data"]) == 2
        assert client.ask("GET", "/v1/models?limit=9").status == 200
        assert len(wire_server.connections) == 1
        client.send(chat(headers={"Connection": "close"}))
        last = client.reply()
        assert_chat(last)
        assert last.headers["connection"] == "close"
        assert client.at_eof()
    assert eventually(lambda: not wire_server.connections)


def test_httpx_keeps_its_connection_across_requests(harness):
    seen: set[wire.Connection] = set()
    with httpx.Client(base_url=harness.url, timeout=30) as http:
        for tokens in (1, 2, 3, 4):
            response = http.post("/v1/chat/completions", json=chat_body(max_tokens=tokens))
            assert response.status_code == 200
            assert response.json()["usage"]["completion_tokens"] == tokens
            seen.update(list(harness.runner.wire.connections))
    assert len(seen) == 1


def test_idle_connections_are_closed_after_the_keepalive(tmp_path, monkeypatch, loop_factory):
    monkeypatch.setattr(wire, "KEEPALIVE_S", 0.5)
    h = QueenHarness(tmp_path, WORKERS[:2], loop_factory=loop_factory).start()
    try:
        with RawClient(h.port) as client:
            # A stream that outlasts the keep-alive is not cut: it is not idle.
            client.send(chat(model="slow-m", max_tokens=30, stream=True))
            stream = client.reply()
            assert stream.status == 200 and len(stream.events()) == 31
            client.send(chat())
            assert_chat(client.reply())
            assert client.at_eof()  # then, idle, it is closed
    finally:
        h.close()


# -- errors from the wire path --------------------------------------------------

def test_unknown_model_and_bad_json_answer_in_the_openai_shape(harness, caplog):
    with RawClient(harness.port) as client:
        client.send(chat(model="nobody-serves-this", headers={"X-Rbee-Deadline-Ms": "300"}))
        assert_error(client.reply(), 504, "deadline_exceeded", "scheduler_error")
        # An expired deadline is an answer, not a failure of the queen.
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        client.send(request("POST", "/v1/chat/completions", b"{not json"))
        error = assert_error(client.reply(), 400, "invalid_request", "invalid_request_error")
        assert "not valid JSON" in error["message"]
        client.send(request("POST", "/v1/chat/completions", {"model": "m", "messages": []}))
        assert client.reply().json()["error"]["param"] == "messages"
        # Errors keep the connection: the next request is answered.
        client.send(chat())
        assert_chat(client.reply())


@pytest.mark.parametrize("status", [429, 503])
def test_scheduler_refusals(harness, status):
    policy = f'fn schedule_job(job, pools, workers) {{ reject("too_busy", {status}) }}'
    with harness.http() as http:
        assert http.put("/v1/scheduler", json={"source": policy}).status_code == 200
    with RawClient(harness.port) as client:
        client.send(chat())
        reply = client.reply()
        assert by_wire(reply)
        error = assert_error(reply, status, "too_busy", "scheduler_error")
        assert error["policy_version"] == 2
        if status == 429:
            assert reply.headers["retry-after"] == "1" and error["retry_after_ms"] == 1000
        else:
            assert "retry-after" not in reply.headers


def _platform(tmp_path, loop_factory, quota=None) -> QueenHarness:
    tenant = {"id": "acme", **({"quota": quota} if quota else {})}
    return QueenHarness(tmp_path, WORKERS[:1], admin_token=ADMIN, loop_factory=loop_factory,
                        config={"mode": "platform", "tenants": [tenant]}).start()


def _key(h: QueenHarness) -> str:
    with h.http(ADMIN) as http:
        issued = http.post("/v1/tenants/acme/keys")
    assert issued.status_code == 201
    return issued.json()["key"]


def test_platform_mode_needs_a_tenant_key_on_the_wire_path(tmp_path, loop_factory):
    h = _platform(tmp_path, loop_factory)
    try:
        key = {"Authorization": f"Bearer {_key(h)}"}
        with RawClient(h.port) as client:
            client.send(chat())
            reply = client.reply()
            assert by_wire(reply)
            assert_error(reply, 401, "missing_api_key", "authentication_error")
            client.send(chat(headers={"Authorization": "Bearer rbee_nothere_secret"}))
            assert_error(client.reply(), 401, "invalid_api_key", "authentication_error")
            models = client.ask("GET", "/v1/models")
            assert_error(models, 401, "missing_api_key", "authentication_error")
            client.send(chat(headers=key))
            assert_chat(client.reply())
            listed = client.ask("GET", "/v1/models", headers=key)
            assert [m["id"] for m in listed.json()["data"]] == ["m"]
            # After a hand-off, aiohttp's route asks for the key just the same.
            assert client.ask("GET", "/health").status == 200
            client.send(chat())
            later = client.reply()
            assert not by_wire(later)
            assert_error(later, 401, "missing_api_key", "authentication_error")
            client.send(chat(headers=key))
            assert_chat(client.reply())
    finally:
        h.close()


def test_platform_quota_refusal_carries_retry_after(tmp_path, loop_factory):
    h = _platform(tmp_path, loop_factory, quota={"requests_per_minute": 1})
    try:
        key = {"Authorization": f"Bearer {_key(h)}"}
        with RawClient(h.port) as client:
            client.send(chat(headers=key))
            assert_chat(client.reply())
            client.send(chat(headers=key))
            reply = client.reply()
            assert by_wire(reply)
            error = assert_error(reply, 429, "quota_exceeded")
            assert 1 <= int(reply.headers["retry-after"]) <= 61
            assert error["retry_after_ms"] > 0
    finally:
        h.close()
