"""What schedule_job may return (DESIGN 2.1), what it sees (2.2) and the Decision (4.1)."""

from __future__ import annotations

import pytest

from conftest import ELIGIBLE, cluster_snapshot, ids, make_job, probe, run
from rbee.errors import PolicyError, PolicyReturnError, PolicyRuntimeError
from rbee.scheduler import Decision, State

# --- dispatch -----------------------------------------------------------------------------


def test_a_worker_map_dispatches() -> None:
    d = run('workers.by_id("par-mac")')
    assert (d.kind, d.worker_id, d.reason, d.status, d.retry_after_ms) == (
        "dispatch", "par-mac", None, None, None)
    assert d.actions == []


def test_a_worker_id_string_dispatches() -> None:
    d = run('"sfo-cpu"')
    assert (d.kind, d.worker_id) == ("dispatch", "sfo-cpu")


def test_dispatch_of_a_worker_or_an_id() -> None:
    assert run("dispatch(workers.least_loaded())").worker_id == "ams-sdxl"
    assert run('dispatch("nyc-70b")').worker_id == "nyc-70b"
    assert run('return dispatch("nyc-70b");').worker_id == "nyc-70b"


def test_a_plain_map_with_the_id_of_a_worker_dispatches() -> None:
    assert run('#{id: "par-mac", note: "hand made"}').worker_id == "par-mac"


# --- unit: the job waits ------------------------------------------------------------------


@pytest.mark.parametrize("body", ["()", "workers.filter(|w| w.gpus > 8).first()",
                                  "if false { workers.first() }", "return;"])
def test_unit_means_wait_no_worker(body: str) -> None:
    d = run(body)
    assert (d.kind, d.reason, d.worker_id, d.status, d.retry_after_ms) == (
        "wait", "no_worker", None, None, None)


# --- reject -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["no_workers_meet_deadline", "no_eu_workers_available",
                                  "model_not_found", "maintenance"])
def test_reject_defaults_to_503(code: str) -> None:
    d = run(f'reject("{code}")')
    assert (d.kind, d.reason, d.status, d.worker_id) == ("reject", code, 503, None)


@pytest.mark.parametrize("code", ["quota_exceeded", "rate_limited", "queue_full", "capacity"])
def test_retry_later_codes_give_429(code: str) -> None:
    d = run(f'reject("{code}")')
    assert (d.kind, d.reason, d.status) == ("reject", code, 429)


@pytest.mark.parametrize("status", [400, 403, 404, 409, 429, 503])
def test_reject_with_an_explicit_status(status: int) -> None:
    d = run(f'reject("policy_says_no", {status})')
    assert (d.kind, d.reason, d.status) == ("reject", "policy_says_no", status)
    assert run(f'reject("quota_exceeded", {status})').status == status


def test_platform_style_quota_check_rejects_over_quota_tenants() -> None:
    body = """
    if tenant_over_quota(job.tenant_id) { return reject("quota_exceeded"); }
    if job.priority == "interactive" { workers.least_loaded() }
    else { workers.min_by(|w| w.cost_per_token) }
    """
    assert run(body, job=make_job(tenant_id="globex")).status == 429
    assert run(body).worker_id == "ams-sdxl"
    assert run(body, job=make_job(priority="batch")).worker_id == "sfo-cpu"


# --- wait ---------------------------------------------------------------------------------


def test_wait_with_and_without_ms() -> None:
    d = run('wait("model_loading")')
    assert (d.kind, d.reason, d.retry_after_ms) == ("wait", "model_loading", None)
    d = run('wait("model_loading", 1500)')
    assert (d.kind, d.reason, d.retry_after_ms, d.status) == (
        "wait", "model_loading", 1500, None)
    assert run('wait("now", 0)').retry_after_ms == 0


# --- actions ------------------------------------------------------------------------------


def test_a_single_action_keeps_the_job_queued() -> None:
    d = run('start_worker("llama3-70b", "nyc", "nyc/1")')
    assert (d.kind, d.reason, d.worker_id) == ("wait", "actions_pending", None)
    assert d.actions == [{"action": "start_worker", "model": "llama3-70b", "pool": "nyc",
                          "gpu": "nyc/1"}]


def test_actions_then_a_worker() -> None:
    d = run('[evict("sfo-cpu"), start_worker("sdxl", "ams"), workers.by_id("par-mac")]')
    assert (d.kind, d.worker_id) == ("dispatch", "par-mac")
    assert [a["action"] for a in d.actions] == ["evict", "start_worker"]
    assert d.actions[0] == {"action": "evict", "worker_id": "sfo-cpu", "pool": "sfo",
                            "reason": "requested"}
    assert d.actions[1]["gpu"] is None


def test_actions_then_an_id_a_reject_or_a_wait() -> None:
    assert run('[evict_least_recently_used(), "nyc-70b"]').worker_id == "nyc-70b"
    d = run('[evict_least_recently_used(), reject("capacity")]')
    assert (d.kind, d.status, len(d.actions)) == ("reject", 429, 1)
    d = run('[start_worker("sdxl", "ams"), wait("warming", 2000)]')
    assert (d.kind, d.reason, d.retry_after_ms, len(d.actions)) == ("wait", "warming", 2000, 1)


def test_nested_action_arrays_are_flattened_and_units_skipped() -> None:
    d = run("[evict_idle_workers(), (), workers.first()]")
    assert d.worker_id == "ams-4090"
    assert [a["worker_id"] for a in d.actions] == ["ams-sdxl", "sfo-cpu"]
    d = run("[evict_idle_workers()]")
    assert (d.kind, d.reason, len(d.actions)) == ("wait", "actions_pending", 2)


def test_an_array_of_nothing_but_units_waits_for_a_worker() -> None:
    d = run('[evict("ams-4090"), workers.filter(|w| false).first()]')
    assert (d.kind, d.reason, d.actions) == ("wait", "no_worker", [])


# --- bad return values --------------------------------------------------------------------


@pytest.mark.parametrize("body, named", [
    ("42", "42"),
    ("-1", "-1"),
    ("3.5", "3.5"),
    ("true", "true"),
    ("false", "false"),
    ("'c'", "c"),
    ("[1, 2]", "1"),
    ('["par-mac", "sfo-cpu"]', "par-mac"),
    ('[workers.first(), evict("sfo-cpu")]', "ams-4090"),
    ("[]", "empty array"),
    ("#{a: 1}", '"a": 1'),
    ("#{id: 5}", '"id": 5'),
    ("#{}", "map"),
    ('"ghost"', "ghost"),
    ('""', "''"),
    ("0..3", "range"),
    ("|w| w.id", "Fn"),
])
def test_bad_returns_are_policy_return_errors(body: str, named: str) -> None:
    with pytest.raises(PolicyReturnError) as info:
        run(body)
    err = info.value
    assert named in err.message
    assert err.code == "bad_return"
    assert (err.line, err.column) == (None, None)
    assert err.to_dict()["code"] == "bad_return"
    assert isinstance(err, PolicyError)


@pytest.mark.parametrize("worker, status", [
    ("nyc-down", "down"), ("ams-starting", "starting"), ("par-draining", "draining")])
def test_a_worker_that_cannot_take_work_is_an_error(worker: str, status: str) -> None:
    for body in [f'"{worker}"', f'all_workers.by_id("{worker}")', f'dispatch("{worker}")',
                 f'[evict("sfo-cpu"), "{worker}"]']:
        with pytest.raises(PolicyReturnError) as info:
            run(body)
        assert worker in info.value.message and status in info.value.message


def test_a_worker_that_already_failed_this_job_is_excluded_and_refused() -> None:
    job = make_job(failed_workers=["par-mac", "ams-sdxl"])
    assert ids("workers", job=job) == ["ams-4090", "nyc-70b", "sfo-cpu"]
    assert ids("all_workers", job=job) == ids("all_workers")
    assert run("workers.least_loaded()", job=job).worker_id == "sfo-cpu"
    assert probe("n()", job=job, extra="fn n() { workers.len() }") == 3
    with pytest.raises(PolicyReturnError, match="par-mac.*already failed"):
        run('"par-mac"', job=job)
    with pytest.raises(PolicyReturnError, match="ams-sdxl"):
        run('all_workers.by_id("ams-sdxl")', job=job)


def test_the_error_message_names_what_was_returned() -> None:
    with pytest.raises(PolicyReturnError, match=r"returned bool \(true\)"):
        run("true")
    with pytest.raises(PolicyReturnError, match=r"returned 'gpt-box', which is not"):
        run('"gpt-box"')
    with pytest.raises(PolicyReturnError, match=r"element 0 is i64 \(7\)"):
        run("[7, workers.first()]")


def test_a_runtime_error_is_not_a_return_error() -> None:
    with pytest.raises(PolicyRuntimeError) as info:
        run("let x = 1;\nx.nope()")
    assert not isinstance(info.value, PolicyReturnError)
    assert info.value.line == 4


# --- what the script sees ------------------------------------------------------------------


def test_workers_holds_ready_and_busy_workers_all_workers_everything() -> None:
    assert ids("workers") == ELIGIBLE
    assert probe("workers.map(|w| w.status)") == ["busy", "ready", "busy", "ready", "ready"]
    assert ids("all_workers") == sorted(w for w in ids("all_workers"))
    assert probe("all_workers.map(|w| w.status)") == [
        "busy", "ready", "starting", "busy", "down", "draining", "ready", "ready"]
    assert probe("[workers.len(), all_workers.len()]") == [5, 8]


def test_the_workers_parameter_and_the_global_are_the_same() -> None:
    extra = "fn count_global() { workers.len() }"
    assert probe("[workers.len(), count_global()]", extra=extra) == [5, 5]


def test_worker_defaults_are_filled_in() -> None:
    snap = {"workers": [{"id": "bare"}, {"id": "half", "slots": 4, "active": 1},
                        {"id": "json", "slots": 4.0, "active": 2.0}]}
    got = probe("workers.map(|w| [w.status, w.active, w.slots, w.load])", snap)
    assert got == [["ready", 0, 1, 0.0], ["ready", 1, 4, 0.25], ["ready", 2, 4, 0.5]]
    assert probe("workers.idle().map(|w| w.id)", snap) == ["bare"]


GLOBALS_FN = """
fn sizes() {
    #{queue: queue.len(), pools: pools.len(), workers: workers.len(),
      gpus: gpus.len(), models: models.len(), tenants: tenants.len(),
      all: all_workers.len()}
}
fn deep() { sizes() }
"""


def test_global_names_resolve_inside_helper_functions() -> None:
    want = {"queue": 3, "pools": 4, "workers": 5, "gpus": 5, "models": 4, "tenants": 4,
            "all": 8}
    assert probe("sizes()", extra=GLOBALS_FN) == want
    assert probe("deep()", extra=GLOBALS_FN) == want
    assert probe("pools.map(|p| p.id)") == ["ams", "nyc", "par", "sfo"]
    assert probe("models.map(|m| m.id)")[0] == "llama-3.1-70b-instruct"
    assert probe("tenants.map(|t| t.id)") == ["acme", "globex", "initech", "umbrella"]
    assert probe("queue.map(|q| q.id)") == ["q-1", "q-2", "q-3"]


def test_parameters_and_locals_shadow_the_globals() -> None:
    extra = "fn n(workers) { workers.len() }\nfn m() { let pools = [1]; pools.len() }"
    assert probe("[n([1, 2]), m()]", extra=extra) == [2, 1]
    assert probe("let workers = [9]; workers") == [9]
    assert probe("let queue = 1; let gpus = 2; let models = 3; [queue, gpus, models]") == [
        1, 2, 3]
    assert probe("let s = 0; for workers in [[1], [1, 2]] { s += workers.len(); } s") == 3
    assert probe("pools.map(|workers| workers.id).len()") == 4


def test_a_captured_local_shadows_the_global_inside_a_closure() -> None:
    assert probe("let workers = [1]; let f = |x| workers.len() + x; f.call(10)") == 11
    assert probe("let tenants = #{a: 1}; let f = || tenants.a; f.call()") == 1
    # Without a local of that name, the closure sees the state.
    assert probe("let f = |x| workers.len() + x; f.call(10)") == 15


def test_the_policy_can_take_fewer_parameters() -> None:
    from rbee.scheduler import Policy
    one = Policy.from_source("fn schedule_job(job) { workers.least_loaded() }")
    assert one.decide(make_job(), cluster_snapshot()).worker_id == "ams-sdxl"
    two = Policy.from_source("fn schedule_job(job, pools) { pools.len() > 3; \"par-mac\" }")
    assert two.decide(make_job(), cluster_snapshot()).worker_id == "par-mac"


# --- the state is read-only ---------------------------------------------------------------


@pytest.mark.parametrize("body", [
    "workers.push(#{id: \"evil\"}); ()",
    "workers.clear(); ()",
    "workers.remove(0); ()",
    "workers.sort(|a, b| 0); ()",
    "workers.retain(|w| false); ()",
    "workers[0].load = 1; ()",
    "let w = workers[0]; w.load = 1; ()",
    "let w = workers[0]; w.status = \"down\"; ()",
    "all_workers.clear(); ()",
    "pools = []; ()",
    "fn_that_mutates()",
])
def test_scripts_cannot_modify_the_state(body: str, state: State) -> None:
    extra = "fn fn_that_mutates() { queue.clear(); () }"
    with pytest.raises(PolicyRuntimeError):
        run(body, state, extra=extra)
    # The next decision sees the state unchanged.
    assert ids("workers", state) == ELIGIBLE
    assert probe("[workers[0].load, workers[0].status, pools.len(), queue_depth()]",
                 state) == [0.25, "busy", 4, 3]


def test_changing_a_copy_leaves_the_state_alone(state: State) -> None:
    body = """
    let ws = workers; ws.push(#{id: "copy"});
    let m = workers[0].to_map(); m.load = 9.0;
    let g = pools[0].gpus; g.clear();
    pools[0].gpus.push(1);
    [ws.len(), m.load, g.len(), pools[0].gpus.len()]
    """
    assert probe(body, state) == [6, 9.0, 0, 2]
    assert probe("[workers.len(), workers[0].load, pools[0].gpus.len()]", state) == [
        5, 0.25, 2]


# --- estimated_time -------------------------------------------------------------------------


def test_estimated_time_is_wait_plus_ttft_plus_generation() -> None:
    got = probe("workers.map(|w| [w.id, w.estimated_time])", job=make_job(max_tokens=600))
    est = dict(got)
    # No queue wait where a slot is free: latency + max_tokens / tokens_per_sec.
    assert est["ams-4090"] == pytest.approx(80 + 600 / 120 * 1000)
    assert est["ams-sdxl"] == pytest.approx(400 + 600 / 2 * 1000)
    assert est["nyc-70b"] == pytest.approx(250 + 600 / 30 * 1000)
    assert est["par-mac"] == pytest.approx(120 + 600 / 45 * 1000)
    assert est["sfo-cpu"] == pytest.approx(30 + 600 / 500 * 1000)


def test_estimated_time_changes_per_job_and_adds_queue_wait() -> None:
    snap = {"workers": [
        {"id": "free", "slots": 2, "active": 1, "latency_ms": 100, "tokens_per_sec": 50},
        {"id": "full", "slots": 2, "active": 2, "latency_ms": 100, "tokens_per_sec": 50},
        {"id": "over", "slots": 2, "active": 5, "latency_ms": 100, "tokens_per_sec": 50},
        {"id": "blind", "slots": 2, "active": 0},
    ]}
    state = State(snap)
    expr = 'workers.map(|w| w.estimated_time)'  # in id order: blind, free, full, over
    blind, free, full, over = probe(expr, state, job=make_job(max_tokens=100))
    assert free == pytest.approx(100 + 2000)
    assert free < full < over
    assert blind is None
    assert probe(expr, state, job=make_job(max_tokens=200))[1] == pytest.approx(100 + 4000)
    # A job without max_tokens is estimated with 256 tokens.
    job = make_job()
    del job["max_tokens"]
    assert probe(expr, state, job=job)[1] == pytest.approx(100 + 256 / 50 * 1000)


def test_deadline_policy_uses_estimated_time() -> None:
    body = """
    let ok = workers.filter(|w| w.estimated_time < job.deadline);
    if ok.is_empty() { return reject("no_workers_meet_deadline"); }
    ok.min_by(|w| w.cost_per_token)
    """
    assert run(body, job=make_job(deadline=5_000)).worker_id == "sfo-cpu"
    assert run(body, job=make_job(deadline=5_000, model="x",
                                  failed_workers=["sfo-cpu"])).worker_id == "ams-4090"
    d = run(body, job=make_job(deadline=100))
    assert (d.kind, d.reason, d.status) == ("reject", "no_workers_meet_deadline", 503)


# --- the Decision object ------------------------------------------------------------------


def test_decision_has_every_attribute_of_the_contract() -> None:
    d = run('log("picked"); [evict("sfo-cpu"), workers.by_id("par-mac")]')
    assert isinstance(d, Decision)
    assert d.kind == "dispatch" and d.worker_id == "par-mac"
    assert d.reason is None and d.status is None and d.retry_after_ms is None
    assert d.actions == [{"action": "evict", "worker_id": "sfo-cpu", "pool": "sfo",
                          "reason": "requested"}]
    assert d.logs == ["picked"]
    assert isinstance(d.elapsed_us, int) and d.elapsed_us >= 0
    assert isinstance(d.operations, int) and d.operations > 0
    as_dict = d.to_dict()
    for key in ["kind", "worker_id", "reason", "status", "retry_after_ms", "actions", "logs",
                "elapsed_us", "operations"]:
        assert as_dict[key] == getattr(d, key), key
    assert as_dict["kind"] == "dispatch" and as_dict["actions"][0]["worker_id"] == "sfo-cpu"
    assert "par-mac" in repr(d)


def test_decision_to_dict_for_reject_and_wait() -> None:
    r = run('reject("queue_full")').to_dict()
    assert (r["kind"], r["reason"], r["status"], r["worker_id"]) == (
        "reject", "queue_full", 429, None)
    w = run('wait("cold", 750)').to_dict()
    assert (w["kind"], w["reason"], w["retry_after_ms"], w["status"]) == (
        "wait", "cold", 750, None)


def test_operations_grow_with_the_work_done() -> None:
    small = run("let s = 0; for i in 0..10 { s += i; } ()").operations
    large = run("let s = 0; for i in 0..1000 { s += i; } ()").operations
    assert large > small * 10
