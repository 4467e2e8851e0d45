"""Rhai's own language inside the sandbox, determinism, and incremental State updates."""

from __future__ import annotations

import pytest

from conftest import ELIGIBLE, GIB, cluster_snapshot, make_job, policy_of, probe, run
from rbee.errors import (
    DataTooLarge, PolicyCompileError, PolicyLimitError, StackOverflow, TooManyOperations,
)
from rbee.rhai import evaluate
from rbee.scheduler import Policy, State

# --- closures -----------------------------------------------------------------------------


def test_closures_capture_curry_and_are_values() -> None:
    assert evaluate("let add = |a, b| a + b; add.call(40, 2)") == 42
    assert evaluate("let add = |a, b| a + b; let inc = add.curry(1); inc.call(41)") == 42
    assert evaluate("let fs = [|x| x + 1, |x| x * 2]; fs.map(|f| f.call(10))") == [11, 20]
    # Captured variables are shared: the closure sees the latest value.
    assert evaluate("let k = 3; let f = |x| x * k; k = 4; f.call(2)") == 8
    assert evaluate("fn twice(f, x) { f.call(f.call(x)) } twice(|n| n * 3, 2)") == 18


def test_closures_over_the_job_select_workers() -> None:
    body = """
    let wanted = job.model;
    let serves = |w| w.model == wanted || wanted in w.models;
    let pick = |ws| ws.filter(serves).least_loaded();
    pick.call(workers)
    """
    assert run(body).worker_id == "ams-4090"
    assert run(body, job=make_job(model="nomic-embed-text")).worker_id == "sfo-cpu"


def test_named_functions_as_keys() -> None:
    extra = "fn price(w) { w.cost_per_token * 1000000.0 }"
    assert run('workers.min_by(Fn("price"))', extra=extra).worker_id == "sfo-cpu"
    assert probe("workers.map(|w| price(w)).len()", extra=extra) == 5


# --- switch, if, loops and ranges ---------------------------------------------------------


def test_switch_on_values_and_ranges() -> None:
    body = """
    let tier = switch job.priority {
        "interactive" | "high" => "fast",
        "batch" | "low" => "cheap",
        _ => "any",
    };
    let size = switch job.max_tokens { 0..=256 => "s", 257..4096 => "m", _ => "l" };
    `${tier}/${size}`
    """
    assert probe(body) == "fast/s"
    assert probe(body, job=make_job(priority="batch", max_tokens=1000)) == "cheap/m"
    assert probe(body, job=make_job(priority="normal", max_tokens=9000)) == "any/l"


def test_switch_chooses_the_policy_branch() -> None:
    body = """
    switch job.type {
        "image-gen" => workers.with_capability("image-gen").least_loaded(),
        "embedding" => workers.with_model(job.model).min_by(|w| w.cost_per_token),
        _ => workers.with_model(job.model).available().least_loaded(),
    }
    """
    assert run(body, job=make_job(type="image-gen", model="sdxl")).worker_id == "ams-sdxl"
    assert run(body, job=make_job(type="embedding", model="nomic")).worker_id == "sfo-cpu"
    assert run(body).worker_id == "par-mac"


def test_loops() -> None:
    assert evaluate("let s = 0; for i in 0..10 { if i % 2 == 0 { continue; } s += i; } s") == 25
    assert evaluate("let n = 0; loop { n += 1; if n == 5 { break; } } n") == 5
    assert evaluate("let n = 0; while n < 7 { n += 3; } n") == 9
    assert evaluate("let n = 0; do { n += 2; } while n < 7; n") == 8
    assert evaluate("let n = 10; do { n += 1; } until n > 5; n") == 11
    got = evaluate('let out = []; for (x, i) in ["a", "b"] { out.push(`${i}:${x}`); } out')
    assert got == ["0:a", "1:b"]
    assert evaluate("let x = 0; for i in 0..100 { x = i; if i == 41 { break; } } x") == 41


def test_loops_over_the_state() -> None:
    body = """
    let best = (); let best_free = -1;
    for w in workers {
        if w.vram_free > best_free { best = w; best_free = w.vram_free; }
    }
    best
    """
    assert run(body).worker_id == "nyc-70b"
    total = "let t = 0; for g in gpus { t += g.vram_total; } t"
    assert probe(total) == (24 + 24 + 64 + 64 + 64) * GIB


def test_ranges() -> None:
    assert evaluate("let r = []; for i in range(10, 0, -3) { r.push(i); } r") == [10, 7, 4, 1]
    assert evaluate("let r = []; for i in range(0, 10, 4) { r.push(i); } r") == [0, 4, 8]
    assert evaluate("[(0..5).contains(3), (0..5).contains(5), (0..=5).contains(5)]") == [
        True, False, True]
    assert evaluate("let s = 0; for i in 1..=4 { s += i; } s") == 10
    assert evaluate("[1, 2, 3, 4, 5].extract(1..3)") == [2, 3]
    assert evaluate('"scheduler".sub_string(0..5)') == "sched"


# --- try / catch --------------------------------------------------------------------------


def test_try_catch_catches_thrown_values_and_runtime_errors() -> None:
    assert evaluate(
        'let r = (); try { throw "boom"; } catch (e) { r = `caught ${e}`; } r') == "caught boom"
    assert evaluate("let r = (); try { throw #{code: 7}; } catch (e) { r = e.code; } r") == 7
    msg = evaluate("let r = (); try { let z = 0; r = 1 / z; } catch (e) { r = e.message; } r")
    assert "Division by zero" in msg
    assert evaluate("let r = 0; try { r = 1; } catch { r = 2; } r") == 1


def test_try_catch_catches_helper_errors_in_a_policy() -> None:
    body = """
    let d = ();
    try { d = reject("bad", 999); } catch (e) { log(`fallback: ${e}`); d = reject("bad"); }
    try { workers.push(#{id: "x"}); } catch { log("state is read-only"); }
    d
    """
    decision = run(body)
    assert (decision.kind, decision.status) == ("reject", 503)
    assert decision.logs[0].startswith("fallback: reject(\"bad\", 999)")
    assert decision.logs[1] == "state is read-only"


@pytest.mark.parametrize("script, limits, error", [
    ("let r = 0; try { loop { r += 1; } } catch { r = -1; } r",
     {"max_operations": 5_000}, TooManyOperations),
    ('let r = ""; try { let s = "xxxxxxxx"; loop { s += s; } } catch { r = "caught"; } r',
     None, DataTooLarge),
    ("fn f(n) { f(n + 1) } let r = 0; try { f(0); } catch { r = 1; } r", None, StackOverflow),
])
def test_limit_errors_cannot_be_caught(script: str, limits: dict | None, error: type) -> None:
    with pytest.raises(error) as info:
        evaluate(script, limits)
    assert isinstance(info.value, PolicyLimitError)


def test_limit_errors_cannot_be_caught_inside_a_decision() -> None:
    policy = Policy.from_source(
        "fn schedule_job(job, pools, workers) {\n"
        "  let n = 0;\n"
        "  try { loop { n += 1; } } catch { return workers.first(); }\n"
        "  workers.first()\n"
        "}", limits={"max_operations": 10_000})
    with pytest.raises(TooManyOperations):
        policy.decide(make_job(), cluster_snapshot())


# --- strings, maps and methods ------------------------------------------------------------


def test_string_interpolation_and_string_methods() -> None:
    assert probe("`${job.model} for ${job.tenant_id} (${job.max_tokens} tokens)`") == (
        "llama-3.1-8b-instruct for acme (256 tokens)")
    assert probe("`${job.user.geo.country}-${job.tags.team}`") == "NL-research"
    assert probe('job.model.contains("8b") && !job.model.contains("70b")') is True
    assert probe('"Llama-3.1-70B".to_lower().contains("70b")') is True
    assert probe('let s = "a,b,c"; s.split(",")') == ["a", "b", "c"]
    assert probe('`${workers.len()} of ${all_workers.len()} ready`') == "5 of 8 ready"


def test_maps_literals_access_and_copies() -> None:
    assert evaluate('let m = #{a: 1}; m.b = 2; m["c d"] = 3; m') == {"a": 1, "b": 2, "c d": 3}
    assert evaluate('let m = #{a: 1}; ["a" in m, "z" in m, m.keys().len(), m?.z ?? 5]') == [
        True, False, 1, 5]
    assert evaluate("let m = #{n: #{deep: [1, 2]}}; m.n.deep[1]") == 2
    assert evaluate("let m = #{a: 1}; let c = m; c.a = 9; m.a") == 1


def test_worker_records_read_like_maps() -> None:
    body = """
    let w = workers.by_id("par-mac");
    [w.id, w["pool"], w.get("backend"), "gpus" in w, "nope" in w, w.nope,
     w.geo.country, w.labels.len(), w.keys().contains("load"), type_of(w.keys()[0])]
    """
    assert probe(body) == ["par-mac", "par", "metal", True, False, None, "FR", 0, True,
                           "string"]
    keys = probe('let k = workers.by_id("sfo-cpu").keys(); k.sort(); k')
    assert keys[:3] == ["active", "backend", "capability"] and "estimated_time" in keys
    values = probe('let w = workers.by_id("sfo-cpu"); let out = [];'
                   " for k in w.keys() { out.push(w[k] == w.get(k)); } out")
    assert len(values) == len(keys) and all(values)
    assert probe('workers.by_id("sfo-cpu").values().len()') == len(keys)
    assert "cpu" in probe('workers.by_id("sfo-cpu").values()')
    assert probe('let m = workers.by_id("sfo-cpu").to_map(); m.load = 1.0; m.load') == 1.0


def test_method_style_functions_with_this() -> None:
    extra = """
fn is_big() { this.gpus > 1 }
fn label() { `${this.id}@${this.pool}` }
fn cheapest() { this.min_by(|w| w.cost_per_token) }
fn double() { this * 2 }
"""
    assert probe("workers.filter(|w| w.is_big()).map(|w| w.id)", extra=extra) == ["nyc-70b"]
    assert probe("workers.map(|w| w.label())", extra=extra)[0] == "ams-4090@ams"
    assert run("workers.with_backend(\"cuda\").cheapest()", extra=extra).worker_id == "ams-4090"
    assert probe("let x = 21; x.double()", extra=extra) == 42


def test_array_methods_on_workers() -> None:
    assert probe('workers.some(|w| w.backend == "cpu")') is True
    assert probe("workers.all(|w| w.slots >= 2)") is True
    assert probe('workers.find(|w| w.backend == "metal").id') == "par-mac"
    assert probe("workers.reduce(|s, w| s + w.slots, 0)") == 20
    assert probe("let ws = workers; ws.sort(|a, b| b.slots - a.slots); ws.map(|w| w.id)") == [
        "nyc-70b", "ams-4090", "sfo-cpu", "ams-sdxl", "par-mac"]
    assert probe("workers.map(|w| w.id).index_of(\"par-mac\")") == 3
    assert probe("workers.len() + workers.filter(|w| w.idle).len()") == 5


def test_constants_and_if_expressions() -> None:
    assert evaluate("const LIMIT = 3; LIMIT * 2") == 6
    assert probe('let x = if job.stream { "s" } else { "b" }; x') == "s"
    with pytest.raises(PolicyCompileError, match="constant"):
        evaluate("const LIMIT = 3; LIMIT = 4; LIMIT")


# --- determinism --------------------------------------------------------------------------

DETERMINISTIC = """
fn schedule_job(job, pools, workers) {
    let pool = workers.with_model(job.model);
    let a = workers.random();
    let b = workers.weighted_random(|w| w.slots);
    let c = workers.power_of_two_choices();
    let d = workers.sticky(job.session_id);
    log(`${a.id} ${b.id} ${c.id} ${d.id} ${hash(job.id)} ${now()} ${queue_depth()}`);
    if tenant_over_quota(job.tenant_id) { return reject("quota_exceeded"); }
    [evict_least_recently_used(), pool.least_loaded()]
}
"""


def stable(decision) -> dict:
    d = decision.to_dict()
    for key in ("elapsed_us", "memory_peak_bytes"):
        d.pop(key)
    return d


@pytest.mark.parametrize("job_id", ["job-1", "job-2", "abc"])
def test_same_inputs_give_the_same_decision(job_id: str) -> None:
    state = State(cluster_snapshot())
    job = make_job(id=job_id)
    first = stable(Policy.from_source(DETERMINISTIC).decide(job, state))
    policy = Policy.from_source(DETERMINISTIC)
    for _ in range(50):
        assert stable(policy.decide(job, state)) == first
        assert stable(policy.decide(job, cluster_snapshot())) == first
    assert first["worker_id"] == "ams-4090" and first["actions"][0]["worker_id"] == "sfo-cpu"


def test_different_job_ids_may_decide_differently() -> None:
    policy = Policy.from_source(DETERMINISTIC)
    state = State(cluster_snapshot())
    traces = {policy.decide(make_job(id=f"job-{i}"), state).logs[0] for i in range(20)}
    assert len(traces) == 20


# --- incremental State updates ------------------------------------------------------------


def test_upsert_worker_adds_and_replaces(state: State) -> None:
    policy = policy_of("workers.least_loaded()")
    assert policy.decide(make_job(), state).worker_id == "ams-sdxl"
    state.upsert_worker({"id": "big-idle", "status": "ready", "slots": 2,
                         "vram_free": 80 * GIB})
    assert len(state) == 9
    assert policy.decide(make_job(), state).worker_id == "big-idle"
    state.upsert_worker({"id": "big-idle", "status": "down"})
    assert len(state) == 9
    assert policy.decide(make_job(), state).worker_id == "ams-sdxl"
    state.upsert_worker({"id": "ams-sdxl", "status": "busy", "slots": 2, "active": 2,
                         "vram_free": 0})
    assert policy.decide(make_job(), state).worker_id == "sfo-cpu"


def test_remove_worker_changes_decisions(state: State) -> None:
    policy = policy_of("workers.least_loaded()")
    state.remove_worker("ams-sdxl")
    assert policy.decide(make_job(), state).worker_id == "sfo-cpu"
    state.remove_worker("sfo-cpu")
    assert probe("workers.map(|w| w.id)", state) == ["ams-4090", "nyc-70b", "par-mac"]
    for wid in ["ams-4090", "nyc-70b", "par-mac"]:
        state.remove_worker(wid)
    assert policy.decide(make_job(), state).reason == "no_worker"
    assert len(state) == 3  # the starting, down and draining workers


def test_replace_tenants_flips_quota_decisions(state: State) -> None:
    policy = policy_of(
        'if tenant_over_quota(job.tenant_id) { reject("quota_exceeded") }'
        " else { workers.least_loaded() }")
    assert policy.decide(make_job(), state).kind == "dispatch"
    state.replace("tenants", [{"id": "acme", "quota": {"tokens_per_day": 10},
                               "usage": {"tokens_today": 10}}])
    assert policy.decide(make_job(), state).status == 429
    assert probe('tenant_weight("globex")', state) is None


def test_replace_models_changes_aliases(state: State) -> None:
    assert probe('workers.with_model("llama3-8b").len()', state) == 2
    state.replace("models", [{"id": "llama-3.1-8b-instruct", "aliases": ["tiny-llama"],
                              "vram_required": 20 * GIB}])
    assert probe('workers.with_model("llama3-8b").len()', state) == 0
    assert probe('workers.with_model("tiny-llama").len()', state) == 2
    assert probe('workers.can_fit("tiny-llama").map(|w| w.id)', state) == [
        "nyc-70b", "par-mac"]


def test_replace_queue_pools_and_gpus(state: State) -> None:
    state.replace("queue", [])
    assert probe("queue_depth()", state) == 0
    state.replace("queue", [{"id": f"q{i}"} for i in range(7)])
    assert probe("queue_depth()", state) == 7
    state.replace("pools", [{"id": "solo", "gpus": [{"index": 0, "name": "RTX 5090"}]}])
    assert probe("[pools.len(), gpus.map(|g| g.id)]", state) == [1, ["solo/0"]]
    state.replace("gpus", [{"id": "extra/0", "name": "L40S", "vram_total": 48 * GIB}])
    assert probe("gpus.map(|g| g.id)", state) == ["extra/0", "solo/0"]
    assert probe('gpu_device_name("solo/0")', state) == "RTX 5090"
    # Workers are untouched by section replacements.
    assert probe("workers.map(|w| w.id)", state) == ELIGIBLE


def test_a_plain_dict_and_a_state_decide_alike() -> None:
    snap = cluster_snapshot()
    state = State(snap)
    for body in ["workers.least_loaded()", "workers.min_by(|w| w.cost_per_token)",
                 'reject("x")', "workers.most_vram_free()"]:
        policy = policy_of(body)
        assert stable(policy.decide(make_job(), state)) == stable(
            policy.decide(make_job(), snap))
    snap["workers"].clear()  # the State converted its own copy
    assert len(state) == 8
