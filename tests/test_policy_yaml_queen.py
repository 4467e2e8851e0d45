"""YAML policies in the queen: PUT /v1/scheduler, preview, versions and the
watched scheduler file (DESIGN 4.3: policies travel as {source, format})."""

from __future__ import annotations

import time

import pytest

from queen_harness import QueenHarness, eventually

EU = {"region": "EU", "country": "NL", "latitude": 52.37, "longitude": 4.90}

WORKERS = [
    {"id": "big-box", "models": ["llama-3.1-70b-instruct"], "gpus": 2, "slots": 2,
     "backend": "cuda", "cost_per_token": 9e-7, "geo": EU},
    {"id": "cheap", "models": ["llama-3.1-8b-instruct"], "gpus": 1, "slots": 2,
     "backend": "rocm", "cost_per_token": 1e-7, "geo": EU},
    {"id": "pricey", "models": ["llama-3.1-8b-instruct"], "gpus": 1, "slots": 4,
     "backend": "cuda", "cost_per_token": 5e-7, "geo": EU},
]

RULES = """\
rules:
  - name: CUDA for interactive work
    condition: {priority: interactive}
    action: {select: "workers.with_model(job.model).filter(backend == 'cuda').first()"}
  - name: Cheapest serving the model
    condition: true
    action: {select: workers.with_model(job.model).min_by(cost_per_token)}
"""


@pytest.fixture
def harness(tmp_path):
    h = QueenHarness(tmp_path, WORKERS).start()
    yield h
    h.close()


def chat(h: QueenHarness, **headers: str) -> str:
    with h.http() as http:
        response = http.post("/v1/chat/completions", headers=headers, json={
            "model": "llama-3.1-8b-instruct", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    return response.headers["x-rbee-worker"]


def test_put_yaml_with_its_format_and_detected(harness):
    with harness.http() as http:
        put = http.put("/v1/scheduler", json={"source": RULES, "format": "yaml"})
        assert put.status_code == 200, put.text
        current = http.get("/v1/scheduler").json()
        assert (current["format"], current["source"]) == ("yaml", RULES)
        versions = http.get("/v1/scheduler/versions").json()["versions"]
        assert versions[-1]["format"] == "yaml"
    assert chat(harness) == "cheap"
    assert chat(harness, **{"X-Rbee-Priority": "interactive"}) == "pricey"
    swapped = RULES.replace("backend == 'cuda'", "backend == 'rocm'")
    with harness.http() as http:
        assert http.put("/v1/scheduler", json={"source": swapped}).status_code == 200
        assert http.get("/v1/scheduler").json()["format"] == "yaml"
    assert chat(harness, **{"X-Rbee-Priority": "interactive"}) == "cheap"


def test_a_refused_yaml_policy_answers_400_with_its_place(harness):
    bad = RULES.replace("min_by(cost_per_token)", "min_by(cost_per_token")
    with harness.http() as http:
        response = http.put("/v1/scheduler", json={"source": bad, "format": "yaml"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "policy_error" and error["code"] == "compile_error"
        # `    action: {select: workers.with_model(job.model).min_by(cost_per_token}`
        assert (error["line"], error["column"]) == (7, 58)
        assert 'rules[1] "Cheapest serving the model": action.select:' in error["message"]
        typo = http.post("/v1/scheduler/validate", json={
            "source": "rules: [{name: x, condition: {prority: batch}, action: {reject: x}}]",
            "format": "yaml"})
        assert typo.status_code == 400
        assert "did you mean 'priority'?" in typo.json()["error"]["message"]
        assert http.get("/v1/scheduler").json()["format"] == "rhai"  # unchanged


def test_preview_of_a_yaml_policy(harness):
    with harness.http() as http:
        response = http.post("/v1/scheduler/preview", json={
            "source": RULES, "format": "yaml",
            "jobs": [{"id": "a", "model": "llama-3.1-8b-instruct", "priority": "interactive"},
                     {"id": "b", "model": "llama-3.1-70b-instruct"}]})
    assert response.status_code == 200, response.text
    assert [d["worker_id"] for d in response.json()["decisions"]] == ["pricey", "big-box"]


def test_a_watched_yaml_file_is_compiled_and_reloaded(tmp_path):
    path = tmp_path / "scheduler.yaml"
    path.write_text(RULES)
    h = QueenHarness(tmp_path, WORKERS, config={"scheduler": str(path)}).start()
    try:
        assert h.queen.policies.format == "yaml"
        assert chat(h) == "cheap"
        time.sleep(0.05)  # a new mtime even on coarse clocks
        path.write_text(RULES.replace("min_by(cost_per_token)", "max_by(cost_per_token)"))
        assert eventually(lambda: chat(h) == "pricey")
        path.write_text("rules: [{name: broken, condition: true}]\n")
        assert eventually(lambda: h.queen.policies.last_file_error is not None)
        assert "action: missing" in h.queen.policies.last_file_error.message
        assert chat(h) == "pricey"
    finally:
        h.close()
