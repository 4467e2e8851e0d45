"""What real inference servers insist on: an API key (`vllm serve
--api-key`, `llama-server --api-key`), sent from `api_key_env` on requests
and probes and never shown; and the model name they serve, sent in place of
an alias the client used. And what tools ask before they use a model:
`models.retrieve`, by id or alias."""

from __future__ import annotations

import httpx
import pytest

from queen_harness import QueenHarness, eventually

KEY = "sk-worker-7f3a9c"


@pytest.fixture
def harness(tmp_path, monkeypatch):
    monkeypatch.setenv("RBEE_TEST_WORKER_KEY", KEY)
    workers = [{"id": "locked", "model": "m", "slots": 2, "fake_api_key": KEY,
                "api_key_env": "RBEE_TEST_WORKER_KEY"}]
    h = QueenHarness(tmp_path, workers).start()
    yield h
    h.close()


def test_requests_and_probes_carry_the_key_and_it_is_never_shown(harness):
    fake = harness.fakes["locked"]
    answer = harness.openai().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.choices[0].message.content
    assert fake.last_request["headers"]["Authorization"] == f"Bearer {KEY}"
    # Probes run every 100 ms; a probe without the key would mark it down.
    probes = fake.probes
    assert eventually(lambda: fake.probes >= probes + 3)
    assert harness.queen.registry.workers["locked"].status == "ready"
    with harness.http() as http:
        for path in ("/v1/state", "/v1/workers", "/v1/decisions", "/metrics"):
            response = http.get(path)
            assert response.status_code == 200
            assert KEY not in response.text and "RBEE_TEST_WORKER_KEY" not in response.text


def test_the_worker_refuses_requests_without_the_key(harness):
    """The fake worker checks keys as a real one does, so the test above
    would fail if the queen did not send it."""
    fake = harness.fakes["locked"]
    response = httpx.post(fake.url + "/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_registered_worker_names_its_key_too(harness, monkeypatch):
    fake = harness.fakes["locked"]
    spec = {"id": "late", "url": fake.url, "model": "m", "api_key_env": "RBEE_TEST_NO_SUCH_KEY"}
    monkeypatch.delenv("RBEE_TEST_NO_SUCH_KEY", raising=False)
    with harness.http() as http:
        refused = http.post("/v1/workers", json=spec)
        assert refused.status_code == 400
        assert "RBEE_TEST_NO_SUCH_KEY" in refused.json()["error"]["message"]
        monkeypatch.setenv("RBEE_TEST_NO_SUCH_KEY", KEY)
        added = http.post("/v1/workers", json=spec)
        assert added.status_code == 201 and KEY not in added.text
        assert http.delete("/v1/workers/locked").status_code == 200
    raw = harness.openai().chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert raw.headers["x-rbee-worker"] == "late"
    assert fake.last_request["headers"]["Authorization"] == f"Bearer {KEY}"


def test_a_job_for_an_alias_reaches_the_worker_under_the_name_it_serves(tmp_path):
    """Policies match aliases (`with_model`), so a job for `llama3-8b` may go
    to a worker that serves `llama-3.1-8b-instruct`; a real server refuses a
    name it does not serve, so the queen sends the worker's."""
    workers = [{"id": "w", "models": ["llama-3.1-8b-instruct"], "slots": 2}]
    models = [{"id": "llama-3.1-8b-instruct", "aliases": ["llama3-8b", "llama3.1:8b"]}]
    h = QueenHarness(tmp_path, workers, config={"models": models}).start()
    try:
        fake = h.fakes["w"]
        api = h.openai()
        answer = api.chat.completions.create(
            model="llama3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.model == "llama-3.1-8b-instruct"
        assert fake.last_request["json"]["model"] == "llama-3.1-8b-instruct"
        assert fake.last_request["json"]["max_tokens"] == 3
        stream = api.chat.completions.create(
            model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert fake.last_request["json"]["model"] == "llama-3.1-8b-instruct"
        # The name the worker serves goes as it came.
        api.chat.completions.create(
            model="llama-3.1-8b-instruct", messages=[{"role": "user", "content": "x"}])
        assert fake.last_request["json"]["model"] == "llama-3.1-8b-instruct"
    finally:
        h.close()


def test_models_retrieve_finds_a_model_by_id_alias_or_slashed_name(tmp_path):
    """`client.models.retrieve` (GET /v1/models/{id}), which tools call to
    check a model before using it: what the list shows, by id or alias; a
    model no worker that is up serves is a 404 in the OpenAI shape."""
    import openai

    workers = [{"id": "w", "models": ["llama-3.1-8b-instruct", "Qwen/Qwen2.5-7B-Instruct"]},
               {"id": "gone", "models": ["old-model"]}]
    models = [{"id": "llama-3.1-8b-instruct", "aliases": ["llama3-8b"]},
              {"id": "declared-only"}]
    h = QueenHarness(tmp_path, workers, config={"models": models}).start()
    try:
        h.fakes["gone"].down = True
        assert eventually(lambda: h.queen.registry.workers["gone"].status == "down")
        with h.openai() as api:
            model = api.models.retrieve("llama-3.1-8b-instruct")
            assert (model.id, model.object, model.owned_by) == (
                "llama-3.1-8b-instruct", "model", "rbee")
            assert model.model_extra["rbee"] == {"workers": ["w"]}
            assert api.models.retrieve("llama3-8b").model_extra["rbee"] == {"workers": ["w"]}
            assert api.models.retrieve("Qwen/Qwen2.5-7B-Instruct").id == \
                "Qwen/Qwen2.5-7B-Instruct"
            listed = {m.id for m in api.models.list().data}
            assert listed == {"llama-3.1-8b-instruct", "Qwen/Qwen2.5-7B-Instruct"}
            for missing in ("no-such-model", "declared-only", "old-model"):
                with pytest.raises(openai.NotFoundError) as info:
                    api.models.retrieve(missing)
                assert info.value.body["code"] == "model_not_found"
                assert missing in info.value.body["message"]
    finally:
        h.close()
