"""The queen's queue: priority classes, FIFO within a class, aging so low
classes are not starved, capacity, over real HTTP."""

from __future__ import annotations

import time

import pytest

from queen_harness import QueenHarness, copy_of, eventually, new_event

ONE_SLOT = [{"id": "solo", "models": ["m"], "slots": 1, "cost_per_token": 1e-7}]
ONLY_FREE = "fn schedule_job(job, pools, workers) { workers.available().first() }"


def _submit(http, priority: str) -> str:
    response = http.post("/v1/jobs", headers={"X-Rbee-Priority": priority}, json={
        "model": "m", "messages": [{"role": "user", "content": priority}], "max_tokens": 1})
    assert response.status_code == 202
    return response.json()["job_id"]


def _dispatch_order(h: QueenHarness, job_ids: list[str]) -> list[str]:
    # Copied on the queen's loop: the log changes while jobs are dispatched.
    decisions = h.call(copy_of(h.queen.decisions))
    dispatched = [d["job_id"] for d in decisions if d["kind"] == "dispatch"]
    return [j for j in dispatched if j in job_ids]


def _fill_the_slot(h: QueenHarness, http) -> str:
    fake = h.fakes["solo"]
    fake.hold = h.call(new_event())
    first = _submit(http, "normal")
    assert eventually(lambda: h.queen.registry.workers["solo"].active == 1)
    return first


def test_priority_classes_first_then_fifo(tmp_path):
    h = QueenHarness(tmp_path, ONE_SLOT).start()
    try:
        with h.http() as http:
            assert http.put("/v1/scheduler", json={"source": ONLY_FREE}).status_code == 200
            _fill_the_slot(h, http)
            order = [_submit(http, p) for p in ("batch", "normal", "interactive", "low",
                                                "normal", "high")]
            assert eventually(lambda: len(h.queen.queue) == 6)
            h.loop.call_soon_threadsafe(h.fakes["solo"].hold.set)
            assert eventually(lambda: len(_dispatch_order(h, order)) == 6)
        expected = [order[2], order[5], order[1], order[4], order[0], order[3]]
        assert _dispatch_order(h, order) == expected
    finally:
        h.close()


def test_aging_keeps_low_classes_from_starving(tmp_path):
    h = QueenHarness(tmp_path, ONE_SLOT, config={"queue": {"aging_ms": 100}}).start()
    try:
        with h.http() as http:
            assert http.put("/v1/scheduler", json={"source": ONLY_FREE}).status_code == 200
            _fill_the_slot(h, http)
            old_low = _submit(http, "low")
            time.sleep(0.6)  # four classes of aging: "low" now ranks with "interactive"
            new_urgent = _submit(http, "interactive")
            assert eventually(lambda: len(h.queen.queue) == 2)
            h.loop.call_soon_threadsafe(h.fakes["solo"].hold.set)
            assert eventually(lambda: len(_dispatch_order(h, [old_low, new_urgent])) == 2)
        assert _dispatch_order(h, [old_low, new_urgent]) == [old_low, new_urgent]
    finally:
        h.close()


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    h = QueenHarness(tmp_path, ONE_SLOT, config={"queue": {"capacity": 1}}).start()
    try:
        with h.http() as http:
            assert http.put("/v1/scheduler", json={"source": ONLY_FREE}).status_code == 200
            _fill_the_slot(h, http)
            _submit(http, "normal")
            assert eventually(lambda: len(h.queen.queue) == 1)
            response = http.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 429
            assert response.headers["Retry-After"] == "1"
            error = response.json()["error"]
            assert error["code"] == "queue_full" and error["retry_after_ms"] == 1000
            h.loop.call_soon_threadsafe(h.fakes["solo"].hold.set)
    finally:
        h.close()


def test_wait_with_a_timer_is_looked_at_again(tmp_path):
    h = QueenHarness(tmp_path, ONE_SLOT).start()
    try:
        # The first look waits 150 ms; when the timer fires the job runs.
        policy = ('fn schedule_job(job, pools, workers) {\n'
                  '    if job.wait_ms < 150 { return wait("warming_up", 150); }\n'
                  '    workers.first()\n}')
        with h.http() as http:
            assert http.put("/v1/scheduler", json={"source": policy}).status_code == 200
            response = http.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 200
        kinds = [(d["kind"], d["reason"]) for d in h.queen.decisions
                 if d["job_id"] == response.headers["x-rbee-job"]]
        assert kinds[0] == ("wait", "warming_up") and kinds[-1] == ("dispatch", None)
    finally:
        h.close()


@pytest.mark.parametrize("status", [400, 403, 404, 409, 429, 503])
def test_reject_statuses_reach_the_client(tmp_path, status):
    h = QueenHarness(tmp_path, ONE_SLOT).start()
    try:
        policy = f'fn schedule_job(job, pools, workers) {{ reject("nope", {status}) }}'
        with h.http() as http:
            assert http.put("/v1/scheduler", json={"source": policy}).status_code == 200
            response = http.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == status
        assert response.json()["error"]["code"] == "nope"
        assert ("Retry-After" in response.headers) == (status == 429)
    finally:
        h.close()
