"""queen-rbee over real HTTP: fake OpenAI-compatible workers on loopback and
the official openai SDK as the client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rbee import templates
from queen_harness import QueenHarness, eventually, new_event

EU = {"region": "EU", "country": "NL", "latitude": 52.37, "longitude": 4.90}
US = {"region": "US", "country": "US", "latitude": 40.71, "longitude": -74.0}

# Declared in the configuration, served by no worker: a job for it waits.
WAITING_MODEL = "declared-but-unserved"

WORKERS = [
    {"id": "big-box", "models": ["llama-3.1-70b-instruct"], "gpus": 2, "slots": 2,
     "backend": "cuda", "cost_per_token": 9e-7, "tokens_per_sec": 30, "latency_ms": 300,
     "geo": EU},
    {"id": "cheap-eu", "models": ["llama-3.1-8b-instruct"], "gpus": 1, "slots": 2,
     "backend": "rocm", "cost_per_token": 1e-7, "tokens_per_sec": 60, "latency_ms": 100,
     "geo": EU},
    {"id": "fast-us", "models": ["llama-3.1-8b-instruct"], "gpus": 1, "slots": 4,
     "backend": "cuda", "cost_per_token": 5e-7, "tokens_per_sec": 150, "latency_ms": 50,
     "geo": US},
    {"id": "painter", "models": ["sdxl-turbo"], "capability": "image-gen", "gpus": 1,
     "slots": 1, "backend": "cuda", "cost_per_token": 4e-7, "geo": US},
    {"id": "embedder", "models": ["bge-small"], "capability": "embedding", "gpus": 0,
     "slots": 4, "backend": "cpu", "cost_per_token": 1e-8, "geo": EU},
]

PICK_BY_ID = 'fn schedule_job(job, pools, workers) {{ workers.by_id("{id}") }}'


@pytest.fixture
def harness(tmp_path):
    h = QueenHarness(tmp_path, WORKERS, config={"models": [{"id": WAITING_MODEL}]}).start()
    yield h
    h.close()


def chat(client: openai.OpenAI, model: str = "llama-3.1-8b-instruct", **headers: str):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        extra_headers=headers or None)
    return raw.headers["x-rbee-worker"], raw.parse()


def put_policy(h: QueenHarness, source: str, token: str | None = None):
    with h.http(token) as http:
        return http.put("/v1/scheduler", json={"source": source})


def test_openai_sdk_chat_completions_embeddings_images_models(harness):
    client = harness.openai()
    worker, reply = chat(client)
    assert worker in ("cheap-eu", "fast-us")
    assert worker in reply.choices[0].message.content or reply.system_fingerprint == worker
    completion = client.completions.create(model="llama-3.1-8b-instruct", prompt="hi",
                                           max_tokens=3)
    assert completion.choices[0].text
    vectors = client.embeddings.create(model="bge-small", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8
    image = client.images.generate(model="sdxl-turbo", prompt="a bee")
    assert image.data[0].b64_json
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"llama-3.1-70b-instruct", "llama-3.1-8b-instruct", "sdxl-turbo",
                           "bge-small"}


def test_streaming_relays_tokens_in_order(harness):
    client = harness.openai()
    stream = client.chat.completions.create(
        model="llama-3.1-8b-instruct", messages=[{"role": "user", "content": "count"}],
        max_tokens=6, stream=True)
    pieces = [c.choices[0].delta.content for c in stream
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 6
    direct = openai.OpenAI(base_url=harness.fakes["cheap-eu"].url, api_key="x")
    again = direct.chat.completions.create(
        model="llama-3.1-8b-instruct", messages=[{"role": "user", "content": "count"}],
        max_tokens=6, stream=True)
    expected = [c.choices[0].delta.content for c in again
                if c.choices and c.choices[0].delta.content]
    # The default policy chose one of the two 8b workers; its words come back as sent.
    worker = harness.queen.decisions[-1]["worker_id"]
    if worker == "cheap-eu":
        assert pieces == expected


@pytest.mark.parametrize(
    "template, model, headers, expected",
    [
        ("home", "llama-3.1-70b-instruct", {}, "big-box"),
        ("home", "llama-3.1-8b-instruct", {}, "embedder"),
        ("multi-modal-router", "llama-3.1-70b-instruct", {}, "big-box"),
        ("platform-scheduler", "llama-3.1-8b-instruct", {"X-Rbee-Priority": "interactive"},
         "big-box"),
        ("platform-scheduler", "llama-3.1-8b-instruct", {"X-Rbee-Priority": "batch"},
         "embedder"),
        # Workers that report no speed have no estimated_time and cannot promise
        # the deadline, so the cheapest of the others wins.
        ("cost-optimizer", "llama-3.1-8b-instruct", {"X-Rbee-Deadline-Ms": "60000"},
         "cheap-eu"),
        ("latency-optimizer", "llama-3.1-8b-instruct", {"X-Rbee-User-Geo": "40.7,-74.0"},
         "fast-us"),
        ("eu-compliance", "llama-3.1-8b-instruct", {}, "big-box"),
    ],
)
def test_routing_follows_each_seed_policy(harness, template, model, headers, expected):
    assert put_policy(harness, templates.source(template)).status_code == 200
    with harness.http() as http:
        # The seed policies do not look at the model, so the chosen worker may
        # not serve it and answer 404; the routing is what is checked here.
        http.post("/v1/chat/completions", headers=headers, json={
            "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    assert harness.queen.decisions[-1]["worker_id"] == expected


def test_seed_policy_refusal_answers_the_error_shape(harness):
    source = templates.source("eu-compliance")
    assert put_policy(harness, source).status_code == 200
    with harness.http() as http:
        http.delete("/v1/workers/big-box")
        http.delete("/v1/workers/cheap-eu")
        http.delete("/v1/workers/embedder")
        response = http.post("/v1/chat/completions", json={
            "model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_eu_workers_available"
    assert error["policy_version"] == 2


def test_hot_reload_through_the_api_and_a_bad_policy_is_refused(harness):
    client = harness.openai()
    assert put_policy(harness, PICK_BY_ID.format(id="cheap-eu")).status_code == 200
    assert chat(client)[0] == "cheap-eu"
    assert put_policy(harness, PICK_BY_ID.format(id="fast-us")).status_code == 200
    assert chat(client)[0] == "fast-us"
    bad = put_policy(harness, "fn schedule_job(job, pools, workers) {\n    workers.(\n}")
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["type"] == "policy_error" and error["line"] == 2 and error["column"]
    failing = put_policy(harness, 'fn schedule_job(job, pools, workers) { throw "no"; }')
    assert failing.status_code == 400 and failing.json()["error"]["code"] == "runtime_error"
    assert chat(client)[0] == "fast-us"
    with harness.http() as http:
        versions = http.get("/v1/scheduler/versions").json()["versions"]
        assert [v["version"] for v in versions] == [1, 2, 3]
        assert versions[-1]["active"]
        rolled = http.post("/v1/scheduler/rollback", json={}).json()
        assert rolled["version"] == 2
        assert http.get("/v1/scheduler").json()["version"] == 2
    assert chat(client)[0] == "cheap-eu"


def test_hot_reload_through_the_policy_file(tmp_path):
    policy = tmp_path / "scheduler.rhai"
    policy.write_text(PICK_BY_ID.format(id="cheap-eu"))
    h = QueenHarness(tmp_path, WORKERS, config={"scheduler": str(policy)}).start()
    try:
        client = h.openai()
        assert chat(client)[0] == "cheap-eu"
        time.sleep(0.05)  # a new mtime even on coarse clocks
        policy.write_text(PICK_BY_ID.format(id="fast-us"))
        assert eventually(lambda: chat(client)[0] == "fast-us")
        policy.write_text("fn schedule_job(job, pools, workers) { let = ; }")
        assert eventually(lambda: h.queen.policies.last_file_error is not None)
        assert chat(client)[0] == "fast-us"
    finally:
        h.close()


def test_hostile_policy_falls_back_and_the_queen_stays_responsive(harness):
    hostile = "fn schedule_job(job, pools, workers) { loop { } }"
    # Validation runs the policy on sample jobs, so a policy that never ends is
    # refused outright...
    assert put_policy(harness, hostile).status_code == 400
    # ...and one that only misbehaves on some jobs gets through and falls back.
    sly = ('fn schedule_job(job, pools, workers) {\n'
           '    if job.priority == "batch" { loop { } }\n'
           '    workers.by_id("cheap-eu")\n}')
    assert put_policy(harness, sly).status_code == 200
    client = harness.openai()
    worker, _ = chat(client, **{"X-Rbee-Priority": "batch"})
    assert worker in ("cheap-eu", "fast-us")
    last = harness.queen.decisions[-1]
    assert last["fallback"]["used"] == "last_good"
    assert last["fallback"]["failures"][0]["code"] in ("timeout", "too_many_operations")
    with harness.http() as http:
        assert http.get("/health").json()["status"] == "ok"
        metrics = http.get("/metrics").text
    assert "rbee_policy_fallbacks_total" in metrics


def test_a_queued_job_proceeds_when_a_worker_joins(harness):
    assert put_policy(harness, "fn schedule_job(job, pools, workers) {"
                               " workers.with_model(job.model).first() }").status_code == 200
    late = harness.fakes["fast-us"]
    result = {}

    def ask():
        result["reply"] = harness.openai().chat.completions.create(
            model="late-model", messages=[{"role": "user", "content": "x"}], max_tokens=2)

    thread = threading.Thread(target=ask)
    thread.start()
    assert eventually(lambda: len(harness.queen.queue) == 1)
    late.models.append("late-model")
    with harness.http() as http:
        added = http.post("/v1/workers", json={"id": "late", "url": late.url,
                                               "models": ["late-model"], "slots": 1})
    assert added.status_code == 201
    thread.join(timeout=30)
    assert result["reply"].choices[0].message.content
    assert harness.queen.decisions[-1]["worker_id"] == "late"


def test_retry_when_a_worker_dies_before_the_first_byte(harness):
    policy = ('fn schedule_job(job, pools, workers) {'
              ' let w = workers.by_id("cheap-eu");'
              ' if w != () { w } else { workers.by_id("fast-us") } }')
    assert put_policy(harness, policy).status_code == 200
    harness.fakes["cheap-eu"].fail_next = 1
    worker, reply = chat(harness.openai())
    assert worker == "fast-us"
    job_id = harness.queen.decisions[-1]["job_id"]
    with harness.http() as http:
        record = http.get(f"/v1/jobs/{job_id}").json()
    assert record["attempts"] == 2 and record["failed_workers"] == ["cheap-eu"]
    assert [d["worker_id"] for d in record["decisions"]] == ["cheap-eu", "fast-us"]


def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error(harness):
    assert put_policy(harness, PICK_BY_ID.format(id="cheap-eu")).status_code == 200
    harness.fakes["cheap-eu"].fail_mid_stream = 1
    stream = harness.openai().chat.completions.create(
        model="llama-3.1-8b-instruct", messages=[{"role": "user", "content": "x"}],
        max_tokens=10, stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert len(received) == 2
    assert "mid-stream" in str(caught.value)
    assert eventually(lambda: harness.queen.registry.workers["cheap-eu"].active == 0)


def test_client_disconnect_stops_upstream_and_frees_the_slot(harness):
    assert put_policy(harness, PICK_BY_ID.format(id="cheap-eu")).status_code == 200
    fake = harness.fakes["cheap-eu"]
    fake.hold = harness.call(new_event())
    body = json.dumps({"model": "llama-3.1-8b-instruct", "stream": True, "max_tokens": 5,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    # A raw socket, so the test controls exactly when the client goes away.
    client = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: queen\r\n"
                   b"Content-Type: application/json\r\nContent-Length: "
                   + str(len(body)).encode() + b"\r\n\r\n" + body)
    worker = harness.queen.registry.workers["cheap-eu"]
    assert eventually(lambda: worker.active == 1 and fake.active == 1)
    client.close()
    assert eventually(lambda: worker.active == 0)
    assert eventually(lambda: fake.cancelled == 1)
    harness.loop.call_soon_threadsafe(fake.hold.set)
    assert chat(harness.openai())[0] == "cheap-eu"


def test_native_job_api_events_and_cancel(harness):
    with harness.http() as http:
        submitted = http.post("/v1/jobs", json={
            "model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3})
        assert submitted.status_code == 202
        body = submitted.json()
        assert set(body) == {"job_id", "status", "queue_position", "events_url"}
        events = _read_events(http, body["events_url"])
        names = [name for name, _ in events]
        assert names[:3] == ["queued", "scheduled", "started"]
        assert names[3:-1] == ["token"] * 3 and names[-1] == "end"
        record = http.get(f"/v1/jobs/{body['job_id']}").json()
        assert record["status"] == "done" and record["worker_id"]

        assert put_policy(harness, PICK_BY_ID.format(id="cheap-eu")).status_code == 200
        harness.fakes["cheap-eu"].hold = harness.call(new_event())
        held = http.post("/v1/jobs", json={
            "model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}]}
        ).json()
        worker = harness.queen.registry.workers["cheap-eu"]
        assert eventually(lambda: worker.active == 1)
        assert http.delete(f"/v1/jobs/{held['job_id']}").status_code == 200
        events = _read_events(http, held["events_url"])
        assert events[-1][0] == "error" and events[-1][1]["code"] == "cancelled"
        assert eventually(lambda: worker.active == 0)
        assert http.get("/v1/jobs/nope").status_code == 404


def _read_events(http, url):
    events, name = [], None
    with http.stream("GET", url) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_restart_keeps_versions_and_decisions(harness):
    assert put_policy(harness, PICK_BY_ID.format(id="fast-us")).status_code == 200
    chat(harness.openai())
    job_id = harness.queen.decisions[-1]["job_id"]
    harness.restart()
    with harness.http() as http:
        versions = http.get("/v1/scheduler/versions").json()["versions"]
        assert [(v["version"], v["active"]) for v in versions] == [(1, False), (2, True)]
        decisions = http.get("/v1/decisions", params={"job_id": job_id}).json()["decisions"]
        assert decisions and decisions[0]["worker_id"] == "fast-us"
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "done"
    assert chat(harness.openai())[0] == "fast-us"


def test_admin_token_is_enforced(tmp_path):
    h = QueenHarness(tmp_path, WORKERS[:2], admin_token="s3cret").start()
    try:
        assert put_policy(h, PICK_BY_ID.format(id="big-box")).status_code == 401
        assert put_policy(h, PICK_BY_ID.format(id="big-box"), token="wrong").status_code == 401
        assert put_policy(h, PICK_BY_ID.format(id="big-box"), token="s3cret").status_code == 200
        with h.http() as http:
            assert http.get("/v1/decisions").status_code == 401
            assert http.post("/v1/workers", json={"id": "x", "url": "http://127.0.0.1:9"}
                             ).status_code == 401
            assert http.get("/v1/scheduler").status_code == 200
        # Inference needs no token.
        assert put_policy(h, PICK_BY_ID.format(id="cheap-eu"), token="s3cret").status_code == 200
        assert chat(h.openai())[0] == "cheap-eu"
    finally:
        h.close()


def test_bad_requests_name_the_field(harness):
    client = harness.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llama-3.1-8b-instruct", messages=[])
    assert caught.value.body["param"] == "messages"
    with harness.http() as http:
        response = http.post("/v1/chat/completions", content=b"{not json")
        assert response.status_code == 400
        assert "not valid JSON" in response.json()["error"]["message"]
        response = http.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}]},
            headers={"X-Rbee-User-Geo": "north"})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "X-Rbee-User-Geo"


def test_a_job_that_cannot_run_in_time_ends_with_a_clear_error(harness):
    with harness.http() as http:
        response = http.post("/v1/chat/completions", headers={"X-Rbee-Deadline-Ms": "300"},
                             json={"model": WAITING_MODEL,
                                   "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"


def test_a_model_nobody_knows_is_refused_at_once_by_the_default_policy(harness):
    with harness.openai() as api, pytest.raises(openai.NotFoundError) as refused:
        api.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert refused.value.code == "model_not_found"
    # A model only a down worker serves is waited for: the worker may come back.
    worker = harness.queen.registry.workers["fast-us"]
    with harness.http() as http:
        http.post("/v1/workers", json={**worker.attrs, "id": "gone", "url": "http://127.0.0.1:9",
                                       "models": ["offline-model"]})
        assert eventually(lambda: harness.queen.registry.workers["gone"].status == "down")
        response = http.post("/v1/chat/completions", headers={"X-Rbee-Deadline-Ms": "300"},
                             json={"model": "offline-model",
                                   "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 504


def test_the_pump_wakes_at_a_deadline_that_comes_before_the_retry_timer(tmp_path):
    # A job asked to be retried in 20 s but its deadline is in 300 ms: the
    # pump must plan to look again at the deadline, not at the timer.
    from rbee.queen.config import parse_config
    from rbee.queen.core import Queen
    from rbee.queen.jobs import Job, now_ms

    async def plan() -> tuple[int | None, int]:
        queen = Queen(parse_config({"state_path": str(tmp_path / "q.db")}))
        try:
            job = Job(endpoint="chat.completions", model="m", deadline_ms=300)
            job.waiter = asyncio.get_running_loop().create_future()
            job.wake_at = now_ms() + 20_000
            queen.queue.append(job)
            return queen._pump(), job.expires_at
        finally:
            queen.store.close()

    next_wake, expires_at = asyncio.run(plan())
    assert next_wake == expires_at


def test_latency_and_speed_are_learned_from_real_responses(harness):
    assert put_policy(harness, PICK_BY_ID.format(id="cheap-eu")).status_code == 200
    worker = harness.queen.registry.workers["cheap-eu"]
    before = (worker.latency_ms, worker.tokens_per_sec)
    assert before == (100, 60)
    stream = harness.openai().chat.completions.create(
        model="llama-3.1-8b-instruct", messages=[{"role": "user", "content": "x"}],
        max_tokens=20, stream=True)
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) == 20
    # The fake answers in ~5 ms at 2,000 tokens/s, far from the configured
    # 100 ms and 60 tokens/s, so one response moves both averages.
    # The queen learns after the last byte went out, so give it a moment.
    assert eventually(lambda: worker.latency_ms < 100 and worker.tokens_per_sec > 60)
    with harness.http() as http:
        seen = {w["id"]: w for w in http.get("/v1/state").json()["workers"]}
    assert seen["cheap-eu"]["latency_ms"] == pytest.approx(worker.latency_ms)


def test_metrics_cover_decisions_queue_workers_and_tokens(harness):
    client = harness.openai()
    for _ in range(3):
        chat(client)
    with harness.http() as http:
        text = http.get("/metrics").text
    for name in ("rbee_decisions_total{outcome=\"dispatch\"}", "rbee_decision_seconds_bucket",
                 "rbee_queue_depth", "rbee_worker_in_flight", "rbee_upstream_seconds_bucket",
                 "rbee_tokens_total", "rbee_requests_total"):
        assert name in text, name

    def samples() -> dict[str, list]:
        with harness.http() as http:
            families = text_string_to_metric_families(http.get("/metrics").text)
            found: dict[str, list] = {}
            for family in families:
                for sample in family.samples:
                    found.setdefault(sample.name, []).append(sample)
        return found

    def total(found: dict[str, list], name: str, **labels: str) -> float:
        return sum(s.value for s in found.get(name, [])
                   if all(s.labels.get(k) == v for k, v in labels.items()))

    # The answer goes out before the queen counts the upstream's time and
    # tokens, so the last request's figures may come a moment later.
    assert eventually(lambda: total(samples(), "rbee_upstream_seconds_count") == 3)
    found = samples()
    assert total(found, "rbee_requests_total", endpoint="chat.completions", status="200") == 3
    assert total(found, "rbee_decisions_total", outcome="dispatch") == 3
    assert total(found, "rbee_decision_seconds_count") == 3
    buckets = [s.value for s in found["rbee_decision_seconds_bucket"]]
    assert buckets == sorted(buckets) and buckets[-1] == 3  # cumulative, +Inf last
    assert total(found, "rbee_decision_seconds_sum") > 0
    assert all(s.value == 0 for s in found["rbee_worker_in_flight"])
    assert total(found, "rbee_tokens_total", kind="completion") > 0


def test_a_worker_that_stops_answering_is_down_until_it_answers(harness):
    fake = harness.fakes["cheap-eu"]
    worker = harness.queen.registry.workers["cheap-eu"]
    fake.down = True
    assert eventually(lambda: worker.status == "down")
    with harness.http() as http:
        state = {w["id"]: w for w in http.get("/v1/state").json()["workers"]}
    assert state["cheap-eu"]["status"] == "down"
    for _ in range(3):
        assert chat(harness.openai())[0] == "fast-us"
    fake.down = False
    assert eventually(lambda: worker.status == "ready")


def test_validate_and_preview_have_no_side_effects(harness):
    candidate = 'fn schedule_job(job, pools, workers) { workers.round_robin() }'
    jobs = [{"id": f"p{i}", "model": "llama-3.1-8b-instruct"} for i in range(3)]
    with harness.http() as http:
        valid = http.post("/v1/scheduler/validate", json={"source": candidate})
        assert valid.status_code == 200 and valid.json()["valid"] is True
        invalid = http.post("/v1/scheduler/validate", json={"source": "fn schedule_job(j) {"})
        assert invalid.status_code == 400 and invalid.json()["error"]["line"] == 1
        preview = http.post("/v1/scheduler/preview", json={"source": candidate, "jobs": jobs})
        picks = [d["worker_id"] for d in preview.json()["decisions"]]
        assert picks == ["big-box", "cheap-eu", "embedder"]
        again = http.post("/v1/scheduler/preview", json={"source": candidate, "jobs": jobs})
        assert [d["worker_id"] for d in again.json()["decisions"]] == picks
        state = {"workers": [{"id": "only", "slots": 1}]}
        given = http.post("/v1/scheduler/preview", json={"jobs": jobs[:1], "state": state})
        # The default refuses a model that neither the given state nor the
        # configuration knows.
        first = given.json()["decisions"][0]
        assert (first["kind"], first["reason"], first["status"]) == \
            ("reject", "model_not_found", 404)
        assert http.get("/v1/scheduler").json()["version"] == 1
        assert len(http.get("/v1/scheduler/versions").json()["versions"]) == 1
    assert harness.queen.decisions.maxlen and not list(harness.queen.decisions)


def test_pools_register_heartbeat_and_bring_workers(harness):
    fake = harness.fakes["fast-us"]
    with harness.http() as http:
        registered = http.post("/v1/pools/register", json={
            "id": "garage", "geo": {"region": "EU", "latitude": 51.0, "longitude": 4.0},
            "gpus": [{"name": "RTX 3060", "backend": "cuda", "vram_total": 12884901888,
                      "vram_free": 8589934592}],
            "workers": [{"id": "garage-8b", "url": fake.url,
                         "models": ["llama-3.1-8b-instruct"], "slots": 1}]})
        assert registered.status_code == 201
        assert http.post("/v1/pools/garage/heartbeat", json={}).json()["status"] == "healthy"
        assert http.post("/v1/pools/nowhere/heartbeat", json={}).status_code == 404
        state = http.get("/v1/state").json()
    pool = next(p for p in state["pools"] if p["id"] == "garage")
    assert pool["workers"] == ["garage-8b"] and pool["gpus"][0]["id"] == "garage/0"
    assert any(g["id"] == "garage/0" for g in state["gpus"])
    assert put_policy(harness, 'fn schedule_job(job, pools, workers) {'
                               ' workers.filter(|w| w.pool == "garage").first() }'
                      ).status_code == 200
    assert chat(harness.openai())[0] == "garage-8b"


@pytest.mark.parametrize("path, body, chars", [
    ("/v1/chat/completions",
     {"model": "llama-3.1-8b-instruct", "messages": [
         {"role": "system", "content": "a" * 40}, {"role": "user", "content": "b" * 20}]}, 60),
    # Content parts: the text counts, an image's URL does not.
    ("/v1/chat/completions",
     {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": [
         {"type": "text", "text": "c" * 80},
         {"type": "image_url", "image_url": {"url": "http://example.invalid/" + "x" * 500}}]}]},
     80),
    ("/v1/completions", {"model": "llama-3.1-8b-instruct", "prompt": ["d" * 32, "e" * 8]}, 40),
    ("/v1/embeddings", {"model": "bge-small", "input": "f" * 400}, 400),
])
def test_the_prompt_estimate_counts_the_text_of_each_request_shape(harness, path, body, chars):
    """A policy sees `job.prompt_tokens`: about four characters a token."""
    with harness.http() as http:
        answer = http.post(path, json=body)
        assert answer.status_code == 200, answer.text
        job_id = answer.headers["X-Rbee-Job"]
        decisions = http.get("/v1/decisions", params={"job_id": job_id}).json()["decisions"]
    assert decisions[0]["job"]["prompt_tokens"] == chars // 4
