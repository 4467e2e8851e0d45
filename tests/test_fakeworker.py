"""The fake worker and the demo cluster, driven through the official openai SDK.

Each test runs its own event loop (`asyncio.run`); workers are fast (no TTFT,
effectively unlimited tokens per second) unless a test needs them slow, and
waits poll a condition instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from rbee.queen.demo import DemoCluster, start_demo_cluster
from rbee.queen.fakeworker import EMBEDDING_DIM, MAX_TOKENS_CAP, FakeWorker

T = TypeVar("T")
CHAT = [{"role": "user", "content": "Tell me about bees"}]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def worker(worker_id: str = "w1", models: list[str] | None = None,
                 **options: Any) -> AsyncIterator[FakeWorker]:
    options.setdefault("ttft_ms", 0)
    options.setdefault("tokens_per_sec", math.inf)
    fake = FakeWorker(worker_id, models or ["m1", "m2"], **options)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def client(fake: FakeWorker) -> AsyncOpenAI:
    # No retries: a fault must reach the test exactly once.
    return AsyncOpenAI(base_url=fake.url, api_key="x", max_retries=0, timeout=30)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def raw_post(url: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data,
                                headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.json()


def assert_error_shape(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)
    assert body["error"]["code"] == code


# ------------------------------------------------------------------- answers

def test_models_list_and_retrieve() -> None:
    async def main() -> None:
        async with worker(models=["llama", "qwen"]) as fake, client(fake) as api:
            listed = await api.models.list()
            assert [m.id for m in listed.data] == ["llama", "qwen"]
            assert (await api.models.retrieve("qwen")).id == "qwen"
            with pytest.raises(openai.NotFoundError):
                await api.models.retrieve("nope")
            assert fake.probes == 3 and fake.requests == 0
    run(main())


def test_chat_completion_is_deterministic_and_names_the_worker() -> None:
    async def main() -> None:
        async with worker("alpha") as fake, client(fake) as api:
            first = await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=5)
            again = await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=5)
            other = await api.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "something else"}],
                max_tokens=5)
            text = first.choices[0].message.content
            assert text is not None and text.startswith("[alpha]")
            assert text == again.choices[0].message.content
            assert text != other.choices[0].message.content
            assert first.system_fingerprint == "alpha"
            assert first.choices[0].message.role == "assistant"
            assert first.choices[0].finish_reason == "length"
            assert first.usage is not None
            assert first.usage.completion_tokens == 5
            assert first.usage.prompt_tokens == 4
            assert first.usage.total_tokens == 9
            assert fake.requests == 3 and fake.active == 0
        async with worker("beta") as fake, client(fake) as api:
            answer = await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=5)
            assert answer.choices[0].message.content != text
    run(main())


def test_token_counts_default_and_cap() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            default = await api.chat.completions.create(model="m1", messages=CHAT)
            assert default.usage is not None and default.usage.completion_tokens == 16
            assert default.choices[0].finish_reason == "stop"
            huge = await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=900)
            assert huge.usage is not None and huge.usage.completion_tokens == MAX_TOKENS_CAP
            newer = await api.chat.completions.create(model="m1", messages=CHAT,
                                                      max_completion_tokens=3)
            assert newer.usage is not None and newer.usage.completion_tokens == 3
            one = await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=1)
            assert one.choices[0].message.content == "[w1]"
    run(main())


def test_legacy_completion() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            answer = await api.completions.create(model="m2", prompt="Once upon a time",
                                                  max_tokens=7)
            assert answer.object == "text_completion"
            assert answer.choices[0].text.startswith("[w1]")
            assert answer.system_fingerprint == "w1"
            assert answer.usage is not None
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 7)
            tokens = await api.completions.create(model="m2", prompt=[1, 2, 3], max_tokens=2)
            assert tokens.usage is not None and tokens.usage.prompt_tokens == 3
    run(main())


def test_chat_stream_tokens_in_order_with_usage() -> None:
    async def main() -> None:
        async with worker(ttft_ms=5, tokens_per_sec=2000) as fake, client(fake) as api:
            whole = await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=6)
            stream = await api.chat.completions.create(
                model="m1", messages=CHAT, max_tokens=6, stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            tokens = [c.choices[0].delta.content for c in chunks if c.choices]
            assert len(tokens) == 6
            assert "".join(t or "" for t in tokens) == whole.choices[0].message.content
            token_chunks = [c for c in chunks if c.choices]
            assert token_chunks[0].choices[0].delta.role == "assistant"
            assert token_chunks[-1].choices[0].finish_reason == "length"
            assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
            assert chunks[-1].choices == [] and chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == 6
            assert all(c.system_fingerprint == "w1" for c in chunks)
            plain = await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=2,
                                                      stream=True)
            plain_chunks = [c async for c in plain]
            assert len(plain_chunks) == 2
            assert all(c.usage is None and c.choices for c in plain_chunks)
    run(main())


def test_completion_stream_ends_with_done() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            stream = await api.completions.create(model="m1", prompt="hello", max_tokens=4,
                                                  stream=True)
            texts = [c.choices[0].text async for c in stream]
            whole = await api.completions.create(model="m1", prompt="hello", max_tokens=4)
            assert "".join(texts) == whole.choices[0].text and len(texts) == 4
            # The SDK hides the terminator; read the raw event stream for it.
            body = {"model": "m1", "prompt": "hello", "max_tokens": 4, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with aiohttp.ClientSession() as session:
                async with session.post(fake.url + "/completions", json=body) as response:
                    assert response.headers["Content-Type"].startswith("text/event-stream")
                    raw = (await response.read()).decode()
            events = [line[len("data: "):] for line in raw.split("\n\n") if line]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["usage"] == {
                "prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
            assert [json.loads(e)["choices"][0]["text"] for e in events[:-2]] == texts
    run(main())


def test_embeddings() -> None:
    async def main() -> None:
        async with worker(models=["embed"], capability="embedding") as fake, \
                client(fake) as api:
            one = await api.embeddings.create(model="embed", input="hello world")
            vector = one.data[0].embedding
            assert len(vector) == EMBEDDING_DIM
            assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-4)
            assert one.usage.prompt_tokens == 2 and one.model == "embed"
            many = await api.embeddings.create(model="embed", input=["hello world", "bees"])
            assert [d.index for d in many.data] == [0, 1]
            assert many.data[0].embedding == vector
            assert many.data[1].embedding != vector
            # The SDK may fetch base64 float32 and decode it: equal up to float32.
            assert vector == pytest.approx(FakeWorker.embedding("embed", "hello world"),
                                           abs=1e-6)
            status, body = await raw_post(fake.url + "/embeddings",
                                          {"model": "embed", "input": "hello world"})
            assert status == 200
            assert body["data"][0]["embedding"] == FakeWorker.embedding("embed", "hello world")
            packed = await api.embeddings.create(model="embed", input="hello world",
                                                 encoding_format="base64")
            value: Any = packed.data[0].embedding
            if isinstance(value, str):  # SDKs that leave base64 to the caller
                value = list(struct.unpack(f"<{EMBEDDING_DIM}f", base64.b64decode(value)))
            assert value == pytest.approx(vector, abs=1e-6)
            with pytest.raises(openai.BadRequestError):
                await api.embeddings.create(model="embed", input="")
    run(main())


def test_images() -> None:
    async def main() -> None:
        async with worker(models=["sdxl"], capability="image-gen") as fake, \
                client(fake) as api:
            first = await api.images.generate(model="sdxl", prompt="a bee", n=2,
                                              response_format="b64_json")
            assert first.data is not None and len(first.data) == 2
            images = [base64.b64decode(d.b64_json or "") for d in first.data]
            assert all(i.startswith(b"\x89PNG\r\n\x1a\n") for i in images)
            assert struct.unpack(">II", images[0][16:24]) == (8, 8)
            assert images[0] != images[1]
            again = await api.images.generate(model="sdxl", prompt="a bee", n=1)
            assert again.data is not None and again.data[0].b64_json == first.data[0].b64_json
    run(main())


def test_sync_client_in_a_thread() -> None:
    async def main() -> None:
        async with worker() as fake:
            def call() -> str | None:
                with openai.OpenAI(base_url=fake.url, api_key="x", max_retries=0) as api:
                    answer = api.chat.completions.create(model="m1", messages=CHAT,
                                                         max_tokens=2)
                    return answer.choices[0].message.content
            assert (await asyncio.to_thread(call) or "").startswith("[w1]")
    run(main())


def test_last_request_records_body_and_headers() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            assert fake.last_request is None
            await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=1,
                                              extra_headers={"X-Rbee-Priority": "batch"})
            last = fake.last_request
            assert last is not None and last["path"] == "/v1/chat/completions"
            assert last["json"]["messages"] == CHAT and last["json"]["max_tokens"] == 1
            assert last["headers"]["x-rbee-priority"] == "batch"
            assert last["headers"]["Authorization"] == "Bearer x"
    run(main())


# -------------------------------------------------------------------- errors

def test_bad_requests_get_openai_errors() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            chat = fake.url + "/chat/completions"
            status, body = await raw_post(chat, b"{not json")
            assert status == 400
            assert_error_shape(body, "invalid_json")
            status, body = await raw_post(chat, {"messages": CHAT})
            assert status == 400
            assert_error_shape(body, "missing_required_parameter")
            assert body["error"]["param"] == "model"
            status, body = await raw_post(chat, {"model": "m1"})
            assert status == 400 and body["error"]["param"] == "messages"
            status, body = await raw_post(chat, {"model": "m1", "messages": CHAT,
                                                 "max_tokens": 0})
            assert status == 400 and body["error"]["param"] == "max_tokens"
            status, body = await raw_post(fake.url + "/embeddings",
                                          {"model": "m1", "input": "x"})
            assert status == 400
            assert_error_shape(body, "unsupported_endpoint")
            status, body = await raw_post(fake.url + "/nowhere", {})
            assert status == 404
            assert_error_shape(body, "not_found")
            with pytest.raises(openai.NotFoundError) as caught:
                await api.chat.completions.create(model="gpt-9", messages=CHAT)
            assert caught.value.status_code == 404
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["code"] == "model_not_found"
            # The worker is none the worse for it.
            answer = await api.chat.completions.create(model="m1", messages=CHAT)
            assert answer.choices[0].message.content
    run(main())


def test_constructor_and_start_checks() -> None:
    with pytest.raises(ValueError):
        FakeWorker("w", [])
    with pytest.raises(ValueError):
        FakeWorker("w", ["m"], tokens_per_sec=0)
    with pytest.raises(ValueError):
        FakeWorker("w", ["m"], capability="telepathy")

    async def main() -> None:
        fake = FakeWorker("w", ["m"])
        with pytest.raises(ValueError, match="loopback"):
            await fake.start("0.0.0.0")
        url = await fake.start("localhost")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with pytest.raises(RuntimeError):
            await fake.start()
        await fake.stop()
        await fake.stop()  # stopping twice is harmless
    run(main())


# -------------------------------------------------------------------- faults

def test_fail_next_drops_connections() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            fake.fail_next = 2
            for _ in range(2):
                with pytest.raises(openai.APIConnectionError):
                    await api.chat.completions.create(model="m1", messages=CHAT)
            assert fake.fail_next == 0
            # Probes are not inference requests and do not use up the knob.
            assert (await api.models.list()).data
            answer = await api.completions.create(model="m1", prompt="x", max_tokens=2)
            assert answer.choices[0].text.startswith("[w1]")
            assert fake.requests == 3 and fake.cancelled == 0 and fake.active == 0
    run(main())


def test_fail_mid_stream_breaks_after_two_tokens() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            fake.fail_mid_stream = 1
            # A non-streaming request leaves the knob alone.
            await api.chat.completions.create(model="m1", messages=CHAT, max_tokens=4)
            assert fake.fail_mid_stream == 1
            stream = await api.chat.completions.create(model="m1", messages=CHAT,
                                                       max_tokens=8, stream=True)
            received: list[str | None] = []
            with pytest.raises(openai.APIConnectionError):
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content)
            assert len(received) == 2 and received[0] == "[w1]"
            assert fake.fail_mid_stream == 0
            intact = await api.chat.completions.create(model="m1", messages=CHAT,
                                                       max_tokens=8, stream=True)
            assert len([c async for c in intact]) == 8
            assert fake.cancelled == 0 and fake.active == 0
    run(main())


def test_status_next_answers_error_statuses() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            fake.status_next = [429, 500, 503]
            with pytest.raises(openai.RateLimitError) as limited:
                await api.chat.completions.create(model="m1", messages=CHAT)
            assert isinstance(limited.value.body, dict)
            assert limited.value.body["code"] == "rate_limit_exceeded"
            with pytest.raises(openai.InternalServerError) as failed:
                await api.completions.create(model="m1", prompt="x")
            assert failed.value.status_code == 500
            status, body = await raw_post(fake.url + "/chat/completions",
                                          {"model": "m1", "messages": CHAT})
            assert status == 503
            assert_error_shape(body, "service_unavailable")
            assert fake.status_next == []
            answer = await api.chat.completions.create(model="m1", messages=CHAT)
            assert answer.choices
    run(main())


def test_down_refuses_everything_until_up_again() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            fake.down = True
            with pytest.raises(openai.APIStatusError) as models:
                await api.models.list()
            assert models.value.status_code == 503
            with pytest.raises(openai.APIStatusError) as chat:
                await api.chat.completions.create(model="m1", messages=CHAT)
            assert chat.value.status_code == 503
            async with aiohttp.ClientSession() as session:
                async with session.get(fake.url.removesuffix("/v1") + "/health") as health:
                    assert health.status == 503
            fake.down = False
            assert [m.id for m in (await api.models.list()).data] == ["m1", "m2"]
            assert (await api.chat.completions.create(model="m1", messages=CHAT)).choices
    run(main())


def test_hold_parks_requests_and_tracks_concurrency() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            fake.hold = asyncio.Event()
            calls = [asyncio.create_task(api.chat.completions.create(
                model="m1", messages=CHAT, max_tokens=2)) for _ in range(3)]
            await until(lambda: fake.active == 3)
            assert not any(call.done() for call in calls)
            fake.hold.set()
            answers = await asyncio.gather(*calls)
            assert all(a.choices[0].message.content for a in answers)
            assert (fake.active, fake.max_active, fake.requests) == (0, 3, 3)
            assert fake.cancelled == 0
    run(main())


def test_client_going_away_counts_as_cancelled() -> None:
    async def main() -> None:
        async with worker() as fake, client(fake) as api:
            fake.hold = asyncio.Event()
            call = asyncio.create_task(api.chat.completions.create(model="m1", messages=CHAT))
            await until(lambda: fake.active == 1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await until(lambda: fake.cancelled == 1 and fake.active == 0)
            # A stream abandoned after its first token counts too.
            fake.hold = None
            fake.tokens_per_sec = 50
            stream = await api.chat.completions.create(model="m1", messages=CHAT,
                                                       max_tokens=64, stream=True)
            first = await stream.__anext__()
            assert first.choices[0].delta.content == "[w1]"
            await stream.close()
            await until(lambda: fake.cancelled == 2 and fake.active == 0)
    run(main())


def test_stop_cuts_held_requests_without_counting_them() -> None:
    async def main() -> None:
        fake = FakeWorker("w1", ["m1"], ttft_ms=0)
        await fake.start()
        async with client(fake) as api:
            fake.hold = asyncio.Event()
            call = asyncio.create_task(api.chat.completions.create(model="m1", messages=CHAT))
            await until(lambda: fake.active == 1)
            await asyncio.wait_for(fake.stop(), timeout=10)
            with pytest.raises(openai.APIConnectionError):
                await call
            assert fake.cancelled == 0 and fake.active == 0
    run(main())


# ---------------------------------------------------------------------- demo

def test_demo_cluster_starts_answers_and_stops() -> None:
    async def main() -> None:
        cluster: DemoCluster = await start_demo_cluster()
        try:
            assert len(cluster.workers) == 8 and len(cluster.pools) >= 5
            async with aiohttp.ClientSession() as session:
                for spec in cluster.workers:
                    assert spec["url"].startswith("http://127.0.0.1:")
                    async with session.get(spec["url"] + "/models") as response:
                        assert response.status == 200
                        served = [m["id"] for m in (await response.json())["data"]]
                    assert served == spec["models"]
            fast = next(w for w in cluster.workers if w["id"] == "gaming-pc-llama8b")
            async with AsyncOpenAI(base_url=fast["url"], api_key="x", max_retries=0) as api:
                answer = await api.chat.completions.create(
                    model=fast["model"], messages=CHAT, max_tokens=2)
                assert answer.system_fingerprint == "gaming-pc-llama8b"
            assert cluster.fakes["gaming-pc-llama8b"].requests == 1
        finally:
            await cluster.stop()
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(cluster.workers[0]["url"] + "/models")
    run(main())


def test_demo_cluster_shapes() -> None:
    async def main() -> None:
        cluster = await start_demo_cluster()
        try:
            check_demo_shapes(cluster)
        finally:
            await cluster.stop()
    run(main())


def check_demo_shapes(cluster: DemoCluster) -> None:
    from rbee.queen.config import parse_config

    # The workers and models are valid sections of a queen configuration.
    config = parse_config(cluster.config(), "<demo>")
    assert [w.id for w in config.workers] == [w["id"] for w in cluster.workers]

    gpus = {g["id"]: g for p in cluster.pools for g in p["gpus"]}
    models = {m["id"]: m for m in cluster.models}
    capabilities = {w["capability"] for w in cluster.workers}
    assert {"text-gen", "image-gen", "embedding"} <= capabilities
    assert {w["backend"] for w in cluster.workers} >= {"cuda", "metal", "cpu"}
    assert {w["geo"]["region"] for w in cluster.workers} == {"EU", "US"}
    assert len({w["latency_ms"] for w in cluster.workers}) == len(cluster.workers)
    for pool in cluster.pools:
        assert set(pool) == {"id", "geo", "gpus", "workers", "labels"}
        assert pool["labels"]["simulated"] == "true" and "simulated" in pool["labels"]["name"]
        for index, gpu in enumerate(pool["gpus"]):
            assert gpu["id"] == f"{pool['id']}/{index}" and "simulated" in gpu["name"]
            assert gpu["vram_free"] + gpu["vram_allocated"] == gpu["vram_total"]
            assert gpu["vram_free"] >= 0 and 0.0 <= gpu["utilization"] <= 1.0
    for spec in cluster.workers:
        assert spec["labels"]["simulated"] == "true"
        assert spec["id"] in next(p for p in cluster.pools if p["id"] == spec["pool"])["workers"]
        assert spec["gpus"] == len(spec["gpu_ids"])
        assert all(gpus[g]["backend"] == spec["backend"] for g in spec["gpu_ids"])
        assert spec["vram_total"] == sum(gpus[g]["vram_total"] for g in spec["gpu_ids"])
        for model in spec["models"]:
            assert models[model]["capability"] == spec["capability"]
    big = next(w for w in cluster.workers if w["id"] == "workstation-llama70b")
    assert big["gpus"] == 2 and "llama-3.1-70b-instruct" in big["models"]
    cheapest = min(cluster.workers, key=lambda w: w["cost_per_token"])
    dearest = max(cluster.workers, key=lambda w: w["cost_per_token"])
    assert cheapest["backend"] == "cpu" and dearest["pool"] == "cloud-a100"


def test_errors_made_before_a_handler_runs_have_the_openai_shape_and_their_own_code():
    async def body() -> None:
        async with worker() as fake, aiohttp.ClientSession() as http:
            cases = [
                ("GET", "/chat/completions", None, 405, "method_not_allowed"),
                ("POST", "/no/such/route", b"{}", 404, "not_found"),
                ("POST", "/chat/completions", io.BytesIO(b"x" * (3 * 1024 * 1024)), 413,
                 "body_too_large"),
            ]
            for method, path, data, status, code in cases:
                async with http.request(method, fake.url + path, data=data) as response:
                    assert response.status == status, path
                    error = (await response.json())["error"]
                    assert error["code"] == code
                    assert path in error["message"]

    run(body())
