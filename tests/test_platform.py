"""Platform mode over real HTTP: tenants, keys, quotas, fairness, the bounded
queue and the immutable scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest

from queen_harness import QueenHarness, copy_of, eventually, new_event
from rbee.queen.tenants import ms_until_utc_midnight

ADMIN = "admin-secret"
WORKERS = [
    {"id": "gpu-a", "models": ["m"], "slots": 1, "cost_per_token": 1e-7,
     "tokens_per_sec": 100, "latency_ms": 10},
    {"id": "gpu-b", "models": ["m"], "slots": 1, "cost_per_token": 5e-7,
     "tokens_per_sec": 100, "latency_ms": 10},
]
MODELS = [{"id": "m", "vram_required": 8_000_000_000}]


def platform(tmp_path, tenants, workers=WORKERS, **config) -> QueenHarness:
    return QueenHarness(tmp_path, workers, admin_token=ADMIN, config={
        "mode": "platform", "tenants": tenants, "models": MODELS, **config}).start()


def key_for(h: QueenHarness, tenant: str) -> str:
    with h.http(ADMIN) as http:
        issued = http.post(f"/v1/tenants/{tenant}/keys")
    assert issued.status_code == 201
    return issued.json()["key"]


def ask(h: QueenHarness, key: str | None, **extra):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with h.http() as http:
        return http.post("/v1/chat/completions", headers=headers, json={
            "model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            **extra})


@pytest.fixture
def queen(tmp_path):
    h = platform(tmp_path, [{"id": "acme", "weight": 1}, {"id": "globex", "weight": 1}])
    yield h
    h.close()


def test_keys_issued_by_the_cli_work_until_revoked(queen):
    env = {**os.environ, "RBEE_ADMIN_TOKEN": ADMIN}
    cli = [sys.executable, "-m", "rbee.cli", "tenants", "--queen", queen.url]
    added = subprocess.run(cli + ["add", "initech", "--weight", "2", "--tokens-per-day", "500"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    issued = subprocess.run(cli + ["issue-key", "initech"], env=env, capture_output=True,
                            text=True, timeout=60)
    key = json.loads(issued.stdout)
    assert key["key"].startswith("rbee_") and key["tenant_id"] == "initech"
    client = openai.OpenAI(base_url=queen.url + "/v1", api_key=key["key"], max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content
    listed = json.loads(subprocess.run(cli + ["list"], env=env, capture_output=True,
                                       text=True, timeout=60).stdout)
    initech = next(t for t in listed["tenants"] if t["id"] == "initech")
    assert initech["weight"] == 2 and initech["keys"][0]["key_id"] == key["key_id"]
    assert key["key"] not in json.dumps(listed)  # only hashes are kept
    usage = json.loads(subprocess.run(cli + ["usage", "initech"], env=env,
                                      capture_output=True, text=True, timeout=60).stdout)
    assert usage["usage"]["tokens_today"] > 0
    revoked = subprocess.run(cli + ["revoke-key", "initech", key["key_id"]], env=env,
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    refused = subprocess.run(cli + ["list"], env={**env, "RBEE_ADMIN_TOKEN": "wrong"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "401" in refused.stderr


def test_missing_and_wrong_keys_get_401(queen):
    assert ask(queen, None).status_code == 401
    assert ask(queen, "rbee_nothere_secret").status_code == 401
    real = key_for(queen, "acme")
    assert ask(queen, real[:-1] + ("A" if real[-1] != "A" else "B")).status_code == 401
    assert ask(queen, real).status_code == 200
    with queen.http() as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200


def test_tenants_see_and_cancel_only_their_own_jobs(queen):
    acme, globex = key_for(queen, "acme"), key_for(queen, "globex")
    with queen.http() as http:
        submitted = http.post("/v1/jobs", headers={"Authorization": f"Bearer {acme}"},
                              json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        job_id = submitted.json()["job_id"]
        mine = http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {acme}"})
        theirs = http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {globex}"})
        cancel = http.delete(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {globex}"})
    assert mine.status_code == 200 and mine.json()["tenant_id"] == "acme"
    assert theirs.status_code == 404 and cancel.status_code == 404


def _quota_refusal(response) -> tuple[str, int]:
    assert response.status_code == 429, response.text
    return response.json()["error"]["code"], int(response.headers["Retry-After"])


def test_requests_per_minute(tmp_path):
    h = platform(tmp_path, [{"id": "acme", "quota": {"requests_per_minute": 2}}])
    try:
        key = key_for(h, "acme")
        assert ask(h, key).status_code == 200 and ask(h, key).status_code == 200
        code, retry = _quota_refusal(ask(h, key))
        assert code == "quota_exceeded" and 1 <= retry <= 61
        # A minute later the window is empty again.
        tenant = h.queen.tenants.by_id["acme"]
        tenant.recent = type(tenant.recent)(t - 61 for t in tenant.recent)
        assert ask(h, key).status_code == 200
    finally:
        h.close()


def test_tokens_per_day_and_its_retry_after(tmp_path):
    h = platform(tmp_path, [{"id": "acme", "quota": {"tokens_per_day": 5}}])
    try:
        key = key_for(h, "acme")
        assert ask(h, key).status_code == 200  # uses more than 5 tokens
        code, retry = _quota_refusal(ask(h, key))
        assert code == "quota_exceeded"
        assert abs(retry - ms_until_utc_midnight() / 1000) < 5
        tenant = h.queen.tenants.by_id["acme"]
        tenant.day = "2000-01-01"  # the next UTC day: the daily quota resets
        assert ask(h, key).status_code == 200
    finally:
        h.close()


@pytest.mark.parametrize("quota", [{"max_concurrent": 1}, {"vram_bytes": 8_000_000_000}])
def test_concurrency_and_vram(tmp_path, quota):
    h = platform(tmp_path, [{"id": "acme", "quota": quota}])
    try:
        key = key_for(h, "acme")
        fake = h.fakes["gpu-a"]
        fake.hold = h.call(new_event())
        with h.http() as http:
            held = http.post("/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert held.status_code == 202
            assert eventually(lambda: h.queen.tenants.by_id["acme"].concurrent == 1)
            code, retry = _quota_refusal(ask(h, key))
            assert code == "quota_exceeded" and retry == 1
        h.loop.call_soon_threadsafe(fake.hold.set)
        assert eventually(lambda: h.queen.tenants.by_id["acme"].concurrent == 0)
        assert ask(h, key).status_code == 200
    finally:
        h.close()


def test_fair_sharing_follows_the_weights(tmp_path):
    solo = [{"id": "solo", "models": ["m"], "slots": 1, "cost_per_token": 1e-7}]
    h = platform(tmp_path, [{"id": "heavy", "weight": 3}, {"id": "light", "weight": 1}],
                 workers=solo, queue={"capacity": 200})
    try:
        keys = {t: key_for(h, t) for t in ("heavy", "light")}
        fake = h.fakes["solo"]
        fake.hold = h.call(new_event())
        ids: dict[str, str] = {}
        with h.http() as http:
            def submit(tenant: str) -> None:
                r = http.post("/v1/jobs", headers={"Authorization": f"Bearer {keys[tenant]}"},
                              json={"model": "m", "max_tokens": 1,
                                    "messages": [{"role": "user", "content": "x"}]})
                ids[r.json()["job_id"]] = tenant

            submit("light")  # takes the slot and holds it
            assert eventually(lambda: fake.active == 1)
            for _ in range(60):
                submit("light")
                submit("heavy")
            assert eventually(lambda: len(h.queen.queue) == 120)
        h.loop.call_soon_threadsafe(fake.hold.set)

        def dispatched() -> list[str]:
            # Copied on the queen's loop: the log changes while it runs.
            decisions = h.call(copy_of(h.queen.decisions))
            return [ids[d["job_id"]] for d in decisions if d["kind"] == "dispatch"]

        assert eventually(lambda: len(dispatched()) >= 61, timeout=30)
        window = dispatched()[1:61]  # both tenants have work waiting throughout
        share = window.count("heavy") / len(window)
        assert abs(share - 0.75) <= 0.075, (share, window)
    finally:
        h.close()


def test_a_full_queue_answers_429_with_the_error_shape(tmp_path):
    h = platform(tmp_path, [{"id": "acme"}], workers=WORKERS[:1], queue={"capacity": 2})
    try:
        key = key_for(h, "acme")
        fake = h.fakes["gpu-a"]
        fake.hold = h.call(new_event())
        with h.http() as http:
            for _ in range(3):
                http.post("/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert eventually(lambda: len(h.queen.queue) == 2)
        response = ask(h, key)
        code, retry = _quota_refusal(response)
        error = response.json()["error"]
        assert code == "queue_full" and retry >= 1
        assert error["type"] == "scheduler_error" and error["retry_after_ms"] >= 100
        assert error["policy_version"] == 1
        h.loop.call_soon_threadsafe(fake.hold.set)
    finally:
        h.close()


def test_the_platform_scheduler_cannot_be_changed(tmp_path):
    policy = tmp_path / "mine.rhai"
    policy.write_text('fn schedule_job(job, pools, workers) { reject("nope") }')
    h = platform(tmp_path, [{"id": "acme"}], scheduler=str(policy))
    try:
        with h.http(ADMIN) as http:
            source = http.get("/v1/scheduler").json()["source"]
            assert "platform scheduler" in source and "quota_exceeded" in source
            put = http.put("/v1/scheduler", json={"source": "fn schedule_job(j) { () }"})
            assert put.status_code == 403
            assert put.json()["error"]["code"] == "scheduler_immutable"
            assert http.post("/v1/scheduler/rollback", json={}).status_code == 403
            assert http.post("/v1/scheduler/rollback", json={"version": 1}).status_code == 403
        assert ask(h, key_for(h, "acme")).status_code == 200  # the file was ignored
        with h.http(ADMIN) as http:
            assert http.get("/v1/scheduler/versions").json()["versions"][0]["origin"] == \
                "platform"
    finally:
        h.close()


def test_usage_survives_a_restart(tmp_path):
    h = platform(tmp_path, [{"id": "acme", "quota": {"tokens_per_day": 100000}}])
    try:
        key = key_for(h, "acme")
        for _ in range(3):
            assert ask(h, key).status_code == 200
        with h.http(ADMIN) as http:
            before = http.get("/v1/tenants/acme/usage").json()
        assert before["usage"]["tokens_today"] > 0
        h.restart()
        with h.http(ADMIN) as http:
            after = http.get("/v1/tenants/acme/usage").json()
        assert after["usage"]["tokens_today"] == before["usage"]["tokens_today"]
        assert after["history"][0]["requests"] == 3
        assert ask(h, key).status_code == 200  # keys survive too
        with h.http() as http:
            metrics = http.get("/metrics").text
        assert 'rbee_tenant_request_seconds_count{tenant="acme"}' in metrics
    finally:
        h.close()
