"""Every helper of DESIGN 2.3, run inside real decisions over the fixture cluster."""

from __future__ import annotations

import collections

import pytest

from conftest import (
    ELIGIBLE, GIB, NOW_MS, cluster_snapshot, ids, make_job, pick, policy_of, probe, run,
)
from rbee.errors import PolicyRuntimeError
from rbee.rhai import evaluate
from rbee.scheduler import Policy, State


def tie_state(*workers: dict) -> dict:
    return {"workers": [dict(w) for w in workers]}


# --- selections ---------------------------------------------------------------------------


def test_least_loaded_picks_the_lowest_load() -> None:
    # ams-sdxl and sfo-cpu are both idle; ams-sdxl has more free VRAM.
    assert pick("workers.least_loaded()") == "ams-sdxl"
    assert pick("workers.filter(|w| w.backend != \"cuda\").least_loaded()") == "sfo-cpu"
    assert pick("workers.with_model(\"llama3-8b\").least_loaded()") == "ams-4090"


def test_least_loaded_ties_break_by_vram_free_then_smallest_id() -> None:
    a = {"id": "w-a", "slots": 2, "active": 1, "vram_free": 10}
    b = {"id": "w-b", "slots": 4, "active": 2, "vram_free": 10}
    c = {"id": "w-c", "slots": 2, "active": 1, "vram_free": 20}
    assert pick("workers.least_loaded()", tie_state(b, c, a)) == "w-c"
    assert pick("workers.least_loaded()", tie_state(b, a)) == "w-a"
    # Array order does not matter.
    assert pick("let ws = workers; ws.reverse(); ws.least_loaded()", tie_state(a, b)) == "w-a"


def test_most_vram_free_then_least_load_then_id() -> None:
    assert pick("workers.most_vram_free()") == "nyc-70b"
    a = {"id": "w-a", "slots": 2, "active": 1, "vram_free": 30}
    b = {"id": "w-b", "slots": 2, "active": 0, "vram_free": 30}
    c = {"id": "w-c", "slots": 2, "active": 0, "vram_free": 30}
    assert pick("workers.most_vram_free()", tie_state(a, c, b)) == "w-b"
    assert pick("workers.most_vram_free()", tie_state(a)) == "w-a"


def test_round_robin_rotates_in_id_order_per_policy_and_per_set(state: State) -> None:
    policy = policy_of("workers.round_robin()")
    picks = [policy.decide(make_job(id=f"j{i}"), state).worker_id for i in range(7)]
    assert picks == ELIGIBLE + ELIGIBLE[:2]
    # Another policy (even with the same source) keeps its own rotation.
    other = policy_of("workers.round_robin()")
    assert other.decide(make_job(), state).worker_id == "ams-4090"
    assert policy.decide(make_job(), state).worker_id == ELIGIBLE[2]
    # The order of the array does not matter, only the set.
    rev = policy_of("let ws = workers; ws.reverse(); ws.round_robin()")
    assert [rev.decide(make_job(), state).worker_id for _ in range(3)] == ELIGIBLE[:3]


def test_round_robin_keeps_one_rotation_per_distinct_set(state: State) -> None:
    policy = policy_of(
        'if job.type == "image-gen" { workers.with_backend("cuda").round_robin() }'
        " else { workers.round_robin() }"
    )
    kinds = ["image-gen", "text-gen", "image-gen", "text-gen", "image-gen", "text-gen"]
    picks = [policy.decide(make_job(type=k), state).worker_id for k in kinds]
    assert picks == ["ams-4090", "ams-4090", "ams-sdxl", "ams-sdxl", "ams-4090", "nyc-70b"]


def test_random_is_seeded_by_the_job_id() -> None:
    same = {run("workers.random()", job=make_job(id="job-7")).worker_id for _ in range(10)}
    assert len(same) == 1
    spread = collections.Counter(
        run("workers.random()", job=make_job(id=f"job-{i}")).worker_id for i in range(60)
    )
    assert set(spread) == set(ELIGIBLE)
    # Independent of the order of the array.
    for i in range(10):
        j = make_job(id=f"order-{i}")
        assert run("workers.random()", job=j).worker_id == run(
            "let ws = workers; ws.reverse(); ws.random()", job=j).worker_id


def test_power_of_two_choices_never_picks_the_busiest_of_two() -> None:
    picks = collections.Counter(
        run("workers.power_of_two_choices()", job=make_job(id=f"p{i}")).worker_id
        for i in range(60)
    )
    # par-mac has the highest load (0.5): it loses every comparison.
    assert "par-mac" not in picks
    assert len(picks) >= 3
    again = run("workers.power_of_two_choices()", job=make_job(id="p3")).worker_id
    assert again == run("workers.power_of_two_choices()", job=make_job(id="p3")).worker_id
    one = {"workers": [{"id": "solo"}]}
    assert pick("workers.power_of_two_choices()", one) == "solo"


def test_weighted_random_follows_the_weights() -> None:
    only = 'workers.weighted_random(|w| if w.id == "par-mac" { 5 } else { 0 })'
    assert {run(only, job=make_job(id=f"w{i}")).worker_id for i in range(20)} == {"par-mac"}
    counts = collections.Counter(
        run("workers.weighted_random(|w| w.slots)", job=make_job(id=f"w{i}")).worker_id
        for i in range(200)
    )
    assert set(counts) == set(ELIGIBLE)
    assert counts["nyc-70b"] > counts["ams-sdxl"]  # weight 8 against 2
    # No positive weight at all: every worker is still possible, seeded by the job.
    zero = "workers.weighted_random(|w| w.missing)"
    assert run(zero, job=make_job(id="z")).worker_id == run(zero, job=make_job(id="z")).worker_id


def test_first_last_min_by_max_by() -> None:
    assert pick("workers.first()") == "ams-4090"
    assert pick("workers.last()") == "sfo-cpu"
    assert pick("workers.min_by(|w| w.cost_per_token)") == "sfo-cpu"
    assert pick("workers.max_by(|w| w.cost_per_token)") == "nyc-70b"
    assert pick("workers.max_by(|w| w.tokens_per_sec)") == "sfo-cpu"
    # Ties go to the smallest id, for min_by and max_by alike.
    assert pick("workers.min_by(|w| w.gpus)") == "sfo-cpu"
    assert pick("workers.max_by(|w| w.gpus == 1)") is None  # bools are not keys
    assert pick("workers.min_by(|w| w.slots)") == "ams-sdxl"
    assert pick("workers.max_by(|w| w.slots - 8)") == "nyc-70b"
    assert pick("workers.max_by(|w| w.slots > 0)") is None
    # Workers whose key is () are skipped.
    assert pick("all_workers.max_by(|w| w.tokens_per_sec)") == "sfo-cpu"


def test_selections_on_empty_input_give_unit() -> None:
    for sel in ["least_loaded()", "most_vram_free()", "round_robin()", "random()",
                "power_of_two_choices()", "weighted_random(|w| 1)", "first()", "last()",
                "min_by(|w| w.load)", "max_by(|w| w.load)", 'sticky("k")']:
        assert pick(f"workers.filter(|w| false).{sel}") is None, sel
        assert run(f"[].{sel}").reason == "no_worker", sel


def sticky_map(state: State, keys: list[str]) -> dict[str, str]:
    policy = policy_of("workers.sticky(job.session_id)")
    return {k: policy.decide(make_job(session_id=k), state).worker_id for k in keys}


def test_sticky_is_stable_and_only_moves_keys_of_a_removed_worker(state: State) -> None:
    keys = [f"session-{i}" for i in range(80)]
    before = sticky_map(state, keys)
    assert sticky_map(state, keys) == before
    assert len(set(before.values())) >= 4  # keys spread over the workers
    gone = collections.Counter(before.values()).most_common(1)[0][0]
    state.remove_worker(gone)
    after = sticky_map(state, keys)
    for k in keys:
        if before[k] == gone:
            assert after[k] != gone
        else:
            assert after[k] == before[k], k
    # A new worker takes keys only for itself; the others stay.
    state.upsert_worker({"id": "zz-new", "status": "ready", "slots": 2})
    grown = sticky_map(state, keys)
    assert all(grown[k] in (after[k], "zz-new") for k in keys)
    assert "zz-new" in grown.values()


def test_sticky_accepts_non_string_keys() -> None:
    assert pick("workers.sticky(42)") == pick('workers.sticky("42")')


# --- filters ------------------------------------------------------------------------------


def test_with_model_by_model_models_and_alias() -> None:
    assert ids('workers.with_model("llama-3.1-8b-instruct")') == ["ams-4090", "par-mac"]
    assert ids('workers.with_model("llama3-8b")') == ["ams-4090", "par-mac"]
    assert ids('workers.with_model("llama3.1:8b")') == ["ams-4090", "par-mac"]
    assert ids('workers.with_model("nomic-embed-text")') == ["par-mac", "sfo-cpu"]
    assert ids('workers.with_model("nomic")') == ["par-mac", "sfo-cpu"]
    assert ids('workers.with_model("stable-diffusion-xl")') == ["ams-sdxl"]
    assert ids('workers.with_model("gpt-4o")') == []
    assert ids('all_workers.with_model("llama3-8b")') == [
        "ams-4090", "ams-starting", "nyc-down", "par-draining", "par-mac"]


def test_with_model_matches_a_worker_that_names_its_model_by_alias() -> None:
    snap = cluster_snapshot()
    snap["workers"].append({"id": "alias-box", "model": "llama3-70b", "status": "ready"})
    assert ids('workers.with_model("llama-3.1-70b-instruct")', snap) == ["alias-box", "nyc-70b"]


def test_capability_backend_region_filters() -> None:
    assert ids('workers.with_capability("text-gen")') == ["ams-4090", "nyc-70b", "par-mac"]
    assert ids('workers.with_capability("image-gen")') == ["ams-sdxl"]
    assert ids('workers.with_capability("embedding")') == ["sfo-cpu"]
    assert ids('workers.with_backend("cuda")') == ["ams-4090", "ams-sdxl"]
    assert ids('workers.with_backend("rocm")') == ["nyc-70b"]
    assert ids('workers.with_backend("metal")') == ["par-mac"]
    assert ids('workers.with_backend("cpu")') == ["sfo-cpu"]
    assert ids('workers.with_backend("vulkan")') == []
    assert ids('workers.in_region("EU")') == ["ams-4090", "ams-sdxl", "par-mac"]
    assert ids('workers.in_region("US")') == ["nyc-70b", "sfo-cpu"]
    assert ids('workers.in_region("APAC")') == []


def test_idle_available_can_fit() -> None:
    assert ids("workers.idle()") == ["ams-sdxl", "sfo-cpu"]
    assert ids("workers.available()") == ["ams-sdxl", "par-mac", "sfo-cpu"]
    assert ids("all_workers.idle()") == [
        "ams-sdxl", "ams-starting", "nyc-down", "par-draining", "sfo-cpu"]
    assert ids('workers.can_fit("llama3-8b")') == ["ams-4090", "ams-sdxl", "nyc-70b", "par-mac"]
    assert ids('workers.can_fit("llama3-70b")') == []
    # sdxl has no vram_required: its size plus 20% (8.3 GB) still fits in 10 GiB.
    assert ids('workers.can_fit("sdxl")') == ["ams-4090", "ams-sdxl", "nyc-70b", "par-mac"]
    assert ids('workers.can_fit("nomic")') == ["ams-4090", "ams-sdxl", "nyc-70b", "par-mac"]
    assert ids('workers.can_fit("no-such-model")') == []


def test_available_needs_a_free_slot() -> None:
    snap = {"workers": [
        {"id": "full", "status": "ready", "slots": 2, "active": 2},
        {"id": "free", "status": "ready", "slots": 2, "active": 1},
        {"id": "busy", "status": "busy", "slots": 2, "active": 0},
    ]}
    assert ids("workers.available()", snap) == ["free"]


# --- aggregates ---------------------------------------------------------------------------


def test_aggregates() -> None:
    assert probe("workers.sum_by(|w| w.slots)") == 20
    assert probe("workers.sum_by(|w| w.gpus)") == 5
    assert probe("workers.sum_by(|w| w.load)") == pytest.approx(1.0)
    assert probe("workers.avg_by(|w| w.slots)") == pytest.approx(4.0)
    assert probe("workers.avg_by(|w| w.load)") == pytest.approx(0.2)
    # () keys are skipped by both.
    assert probe("all_workers.sum_by(|w| w.tokens_per_sec)") == pytest.approx(697.0)
    assert probe("all_workers.avg_by(|w| w.latency_ms)") == pytest.approx(176.0)
    assert probe('workers.count(|w| w.status == "ready")') == 3
    assert probe("workers.count(|w| w.gpus > 1)") == 1
    assert probe("[].sum_by(|w| w.slots)") == 0
    assert probe("[].avg_by(|w| w.slots)") is None
    assert probe("[].count(|w| true)") == 0


def test_by_id() -> None:
    assert pick('workers.by_id("par-mac")') == "par-mac"
    assert pick('workers.by_id("nyc-down")') is None
    assert pick('all_workers.by_id("nyc-down")') == "nyc-down"
    assert pick('workers.by_id("ghost")') is None


# --- GPU queries --------------------------------------------------------------------------


def test_gpu_queries() -> None:
    assert probe('gpu_vram_total("ams/0")') == 24 * GIB
    assert probe('gpu_vram_free("ams/0")') == 16 * GIB
    assert probe('gpu_vram_allocated("ams/0")') == 8 * GIB
    # ams/1 lists no vram_free: total minus allocated.
    assert probe('gpu_vram_free("ams/1")') == 10 * GIB
    assert probe('gpu_device_name("par/0")') == "Apple M2 Ultra"
    assert probe('gpu_device_name("nyc/1")') == "AMD Instinct MI210"
    assert probe('gpu_utilization("nyc/0")') == pytest.approx(0.8)
    assert probe('gpu_temperature("ams/0")') == 61
    assert probe("gpus.map(|g| g.id)") == ["ams/0", "ams/1", "nyc/0", "nyc/1", "par/0"]
    for fn in ["gpu_vram_total", "gpu_vram_free", "gpu_vram_allocated", "gpu_device_name",
               "gpu_utilization", "gpu_temperature"]:
        assert probe(f'{fn}("ams/9")') is None, fn


def test_gpus_of() -> None:
    assert probe('gpus_of(workers.by_id("nyc-70b")).map(|g| g.id)') == ["nyc/0", "nyc/1"]
    # gpu_ids may be indexes within the worker's pool.
    assert probe('gpus_of(workers.by_id("ams-sdxl")).map(|g| g.name)') == [
        "NVIDIA GeForce RTX 3090"]
    assert probe('gpus_of(workers.by_id("sfo-cpu"))') == []
    assert probe("gpus_of(#{id: \"x\"})") == []
    assert probe('gpus_of(workers.by_id("par-mac")).map(|g| g.vram_total)') == [64 * GIB]


def test_top_level_gpus_merge_with_pool_gpus() -> None:
    snap = cluster_snapshot()
    snap["gpus"] = [
        {"id": "lab/0", "name": "NVIDIA RTX A6000", "vram_total": 48 * GIB},
        {"id": "ams/0", "name": "duplicate of a pool GPU"},
    ]
    names = probe("gpus.map(|g| g.id)", snap)
    assert names == ["ams/0", "ams/1", "lab/0", "nyc/0", "nyc/1", "par/0"]
    assert probe('gpu_device_name("lab/0")', snap) == "NVIDIA RTX A6000"


# --- quotas -------------------------------------------------------------------------------


def test_tenant_quota_helpers() -> None:
    assert probe('tenant_over_quota("acme")') is False
    assert probe('tenant_over_quota("globex")') is True  # 120k of 100k tokens
    assert probe('tenant_over_quota("initech")') is True  # flagged by the state
    assert probe('tenant_over_quota("umbrella")') is False  # no quota
    assert probe('tenant_over_quota("nobody")') is False
    assert probe('tenant_remaining_quota("acme")') == 750_000
    assert probe('tenant_remaining_quota("globex")') == 0
    assert probe('tenant_remaining_quota("umbrella")') is None
    assert probe('tenant_remaining_quota("nobody")') is None
    assert probe('tenant_usage("acme")') == {
        "tokens_today": 250_000, "concurrent": 3, "requests_last_minute": 42}
    assert probe('tenant_usage("nobody")') is None
    assert probe('tenant_concurrent_jobs("acme")') == 3
    assert probe('tenant_concurrent_jobs("umbrella")') == 0
    assert probe('tenant_concurrent_jobs("nobody")') is None
    assert probe('tenant_weight("acme")') == 3
    assert probe('tenant_weight("umbrella")') == 1
    assert probe('tenant_weight("nobody")') is None


def test_tenant_at_its_concurrency_limit_is_over_quota() -> None:
    snap = cluster_snapshot()
    snap["tenants"] = [{"id": "t", "quota": {"max_concurrent": 2},
                        "usage": {"concurrent": 2}}]
    assert probe('tenant_over_quota("t")', snap) is True
    snap["tenants"][0]["usage"]["concurrent"] = 1
    assert probe('tenant_over_quota("t")', snap) is False


def test_quota_and_model_numbers_may_be_floats() -> None:
    snap = cluster_snapshot()
    snap["tenants"] = [{"id": "f", "quota": {"tokens_per_day": 1e6},
                        "usage": {"tokens_today": 2.5e5, "concurrent": 3.0}}]
    snap["models"] = [{"id": "m", "vram_required": 8e9}, {"id": "n", "size_bytes": 1e9}]
    got = probe('[tenant_remaining_quota("f"), tenant_concurrent_jobs("f"),'
                ' model_vram_required("m"), model_vram_required("n")]', snap)
    assert got == [750_000, 3, 8_000_000_000, 1_200_000_000]
    assert ids('workers.can_fit("m")', snap) == ["ams-4090", "ams-sdxl", "nyc-70b", "par-mac"]


# --- models -------------------------------------------------------------------------------


def test_model_helpers() -> None:
    assert probe('model_exists("llama-3.1-8b-instruct")') is True
    assert probe('model_exists("llama3-8b")') is True
    assert probe('model_exists("gpt-4o")') is False
    assert probe('model_size_bytes("nomic")') == 274_290_656
    assert probe('model_size_bytes("gpt-4o")') is None
    assert probe('model_vram_required("llama3-70b")') == 48 * GIB
    assert probe('model_vram_required("sdxl")') == 6_938_078_335 + 6_938_078_335 // 5
    assert probe('model_vram_required("gpt-4o")') is None
    assert probe('model_context_length("llama3.1:8b")') == 131_072
    assert probe('model_context_length("nomic-embed-text")') == 8192
    assert probe('model_context_length("sdxl")') is None
    assert probe('model_context_length("gpt-4o")') is None


def test_a_missing_id_is_an_unknown_id() -> None:
    job = make_job()
    del job["tenant_id"], job["model"]
    falses = ["tenant_over_quota(job.tenant_id)", "model_exists(job.model)"]
    units = [f"{fn}(job.tenant_id)" for fn in [
        "tenant_remaining_quota", "tenant_usage", "tenant_concurrent_jobs", "tenant_weight"]]
    units += [f"{fn}(job.model)" for fn in [
        "model_size_bytes", "model_vram_required", "model_context_length"]]
    units += [f"{fn}(())" for fn in [
        "gpu_vram_total", "gpu_vram_free", "gpu_vram_allocated", "gpu_device_name",
        "gpu_utilization", "gpu_temperature"]]
    assert probe(f"[{', '.join(falses)}]", job=job) == [False, False]
    assert probe(f"[{', '.join(units)}]", job=job) == [None] * len(units)
    assert probe("gpus_of(())") == []
    # The platform scheduler of the brief works for a job without a tenant.
    body = 'if tenant_over_quota(job.tenant_id) { return reject("quota_exceeded"); }' \
        " workers.least_loaded()"
    assert run(body, job=job).worker_id == "ams-sdxl"


# --- eviction -----------------------------------------------------------------------------


def action_of(expr: str, snap: dict | None = None) -> list[dict]:
    return run(expr, snap).actions


def test_eviction_helpers_choose_idle_workers() -> None:
    lru = action_of("evict_least_recently_used()")
    assert lru == [{"action": "evict", "worker_id": "sfo-cpu", "pool": "sfo",
                    "reason": "least_recently_used"}]
    assert action_of("evict_lowest_priority()")[0]["worker_id"] == "sfo-cpu"
    assert [a["worker_id"] for a in action_of("evict_idle_workers()")] == [
        "ams-sdxl", "sfo-cpu"]
    snap = cluster_snapshot()
    for w in snap["workers"]:
        if w["id"] == "ams-sdxl":
            w["priority"] = 0
    assert action_of("evict_lowest_priority()", snap)[0]["worker_id"] == "ams-sdxl"
    assert action_of("evict_least_recently_used()", snap)[0]["worker_id"] == "sfo-cpu"


def test_eviction_never_picks_a_worker_with_an_active_job() -> None:
    snap = cluster_snapshot()
    for w in snap["workers"]:
        w["active"] = 1
    for expr in ["evict_least_recently_used()", "evict_lowest_priority()",
                 "evict_idle_workers()"]:
        assert probe(f"type_of({expr})", snap) == "()", expr
        decision = run(expr, snap)
        assert (decision.kind, decision.reason, decision.actions) == ("wait", "no_worker", [])
    assert probe('type_of(evict("ams-4090"))') == "()"
    assert probe('type_of(evict(workers.by_id("par-mac")))') == "()"
    assert probe('type_of(evict("ghost"))') == "()"
    assert action_of('evict(workers.by_id("ams-sdxl"))') == [
        {"action": "evict", "worker_id": "ams-sdxl", "pool": "ams", "reason": "requested"}]
    assert action_of('evict("sfo-cpu")')[0]["worker_id"] == "sfo-cpu"


# --- decisions and actions as values --------------------------------------------------------


def test_decision_values_in_script() -> None:
    assert probe('let r = reject("capacity"); [r.code, r.status]') == ["capacity", 429]
    assert probe('let r = reject("nope"); [r.code, r.status]') == ["nope", 503]
    assert probe('reject("forbidden", 403).status') == 403
    assert probe('let w = wait("warming"); [w.reason, w.ms]') == ["warming", None]
    assert probe('wait("warming", 250).ms') == 250
    assert probe('dispatch(workers.by_id("par-mac")).worker_id') == "par-mac"
    assert probe('dispatch("sfo-cpu").worker_id') == "sfo-cpu"
    a = 'let a = start_worker("llama3-8b", "ams"); [a.action, a["model"], a["pool"], a["gpu"]]'
    assert probe(a) == ["start_worker", "llama3-8b", "ams", None]
    assert probe('start_worker("sdxl", "ams", "ams/1")["gpu"]') == "ams/1"


@pytest.mark.parametrize("status", [200, 418, 500, 0, -1])
def test_reject_with_an_invalid_status_is_an_error(status: int) -> None:
    with pytest.raises(PolicyRuntimeError, match="400, 403, 404, 409, 429, 503"):
        run(f'reject("nope", {status})')


def test_wait_with_negative_ms_and_dispatch_of_nothing_are_errors() -> None:
    with pytest.raises(PolicyRuntimeError, match="must not be negative"):
        run('wait("x", -5)')
    with pytest.raises(PolicyRuntimeError, match="dispatch"):
        run("dispatch(42)")


# --- utilities ----------------------------------------------------------------------------


def test_distance_is_great_circle_km() -> None:
    ams_par = probe("distance(52.3676, 4.9041, 48.8566, 2.3522)")
    assert 425 < ams_par < 435
    assert 4100 < probe("distance(40.7128, -74.0060, 37.7749, -122.4194)") < 4160
    assert probe("distance(10, 20, 10, 20)") == 0.0
    assert 20_000 < probe("distance(0, 0, 0, 180)") < 20_040
    assert probe("distance(48.8566, 2.3522, 52.3676, 4.9041)") == pytest.approx(ams_par)
    with pytest.raises(PolicyRuntimeError, match="must be a number"):
        run('distance("north", 0, 0, 0)')


def test_now_is_fixed_per_decision_and_settable() -> None:
    body = "let a = now(); let s = 0; for i in 0..2000 { s += i; } [a, now()]"
    a, b = probe(body, now_ms=1_234)
    assert a == b == 1_234
    assert probe("now()") == NOW_MS  # the state's "now"
    snap = cluster_snapshot()
    del snap["now"]
    first, second = probe(body, snap)
    assert first == second and first > 1_600_000_000_000


def test_log_goes_to_the_decision_trace() -> None:
    decision = run('log("first"); log(42); log(`cost ${workers.len()}`); ()')
    assert decision.logs == ["first", "42", "cost 5"]


def test_queue_depth_does_not_count_the_job_being_scheduled() -> None:
    assert probe("queue_depth()") == 3
    assert probe("queue_depth()", job=make_job(id="q-2")) == 2
    assert probe("queue_depth()", {"workers": []}) == 0


def reference_hash(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & (2**64 - 1)
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    h ^= h >> 31
    return h - 2**64 if h >= 2**63 else h


def test_hash_is_stable() -> None:
    values = probe('[hash("acme"), hash("acme"), hash("globex"), hash("")]')
    assert values[0] == values[1] != values[2]
    assert values[0] == reference_hash("acme")
    assert values[3] == reference_hash("")
    assert evaluate('hash("acme")') == values[0]
    assert probe('hash("sessión-ü")') == reference_hash("sessión-ü")


# --- closures run natively give exactly what Rhai gives ---------------------------------------

ODD_WORKERS = [
    {"id": "a", "gpus": 2, "cost_per_token": 1, "estimated_time": 100, "name": "x",
     "geo": {"latitude": 52.0, "longitude": 4}, "deadline": 10},
    {"id": "b", "gpus": 1.5, "cost_per_token": 0.5, "estimated_time": 100.0, "name": "y",
     "geo": {"latitude": "n/a", "longitude": 4.0}},
    {"id": "c", "gpus": "2", "cost_per_token": None, "geo": None, "estimated_time": None,
     "name": 3},
    {"id": "d", "cost_per_token": "cheap", "name": "x", "gpus": True,
     "geo": {"latitude": 40, "longitude": -74}},
    {"id": "e", "gpus": 0, "cost_per_token": 2.0, "geo": {}, "name": "",
     "estimated_time": 9_999_999_999_999},
    {"id": "f", "gpus": 2**63 - 1, "cost_per_token": -1, "name": "z", "estimated_time": 5000.5,
     "geo": {"latitude": 0.0, "longitude": 0.0}},
    {"id": "g", "tokens_per_sec": 50, "latency_ms": 100, "slots": 2, "active": 2, "gpus": 4,
     "cost_per_token": 0.25, "geo": {"latitude": 48.85, "longitude": 2.35}, "name": "w"},
]

CLOSURES = [
    "w.gpus > 1", "w.gpus >= 2", "w.gpus == 2", "w.gpus != 2", "w.gpus < 1.6",
    "w.cost_per_token", "w.cost_per_token * 2", "w.cost_per_token / 2", "w.gpus + 1",
    "-w.cost_per_token", "w.gpus / 0", "!(w.gpus > 1)", "w.gpus > 1 && w.cost_per_token < 1",
    "w.gpus > 1 || w.name == \"x\"", "w.name", "w.name < \"y\"", "w.name > 2",
    "w.estimated_time < job.deadline", "w.estimated_time <= limit",
    "distance(lat, lon, w.geo.latitude, w.geo.longitude)", "w.missing", "w.missing == ()",
    "w.geo.latitude", "w.nope.deeper", "w.gpus == true", "w.gpus * w.gpus",
    "w.cost_per_token == 1.0", "w.gpus * 2 > 3", "w.name + \"!\"", "w.id", "true", "()",
    # Captured records and paths that lead nowhere (the values are read once per pass).
    "w.gpus >= first.gpus", "w.estimated_time <= first.estimated_time",
    "w.cost_per_token < job.nothing.deeper", "first.missing == w.missing", "last.name == w.name",
]

HELPERS = ["filter", "min_by", "max_by", "count", "sum_by", "avg_by", "weighted_random",
           "map", "all", "find"]


def outcome(closure: str, helper: str) -> tuple:
    source = f"""
fn show(r) {{
    if type_of(r) == "array" {{ r.map(|x| show(x)) }}
    else if type_of(r) == "record" {{ r.id }} else {{ r }}
}}
fn schedule_job(job, pools, workers) {{
    let lat = 52.37; let lon = 4.9; let limit = 100;
    let first = workers[0]; let last = workers[-1];
    log(#{{v: show(workers.{helper}({closure}))}}.to_json());
    ()
}}"""
    policy = Policy.from_source(source)
    job = make_job(id="native", deadline=5000)
    try:
        result = ("ok", policy.decide(job, {"workers": ODD_WORKERS}).logs[-1])
    except PolicyRuntimeError as exc:
        result = ("error", exc.message)
    return result, policy._compiled.native_closures


@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("expr", CLOSURES)
def test_native_closures_agree_with_rhai(expr: str, helper: str) -> None:
    native, compiled = outcome(f"|w| {expr}", helper)
    plain, not_compiled = outcome(f"|w| {{ let unused = 0; {expr} }}", helper)
    assert compiled >= 1 and not_compiled == 0
    assert native == plain


def test_native_closure_reads_captured_locals_and_job() -> None:
    body = """
    let region = job.user.geo.region;
    let lat = job.user.geo.latitude; let lon = job.user.geo.longitude;
    let near = workers.min_by(|w| OPEN distance(lat, lon, w.geo.latitude, w.geo.longitude) CLOSE);
    let local = workers.filter(|w| OPEN w.geo.region == region CLOSE);
    let fast = workers.filter(|w| OPEN w.estimated_time < job.deadline CLOSE);
    #{near: near.id, local: local.map(|w| w.id), fast: fast.map(|w| w.id)}
    """
    expected = {"near": "ams-4090", "local": ["ams-4090", "ams-sdxl", "par-mac"],
                "fast": ["ams-4090", "sfo-cpu"]}
    native = body.replace("OPEN", "").replace("CLOSE", "")
    plain = body.replace("OPEN", "{ let u = 0;").replace("CLOSE", "}")
    assert policy_of(native)._compiled.native_closures >= 3
    assert policy_of(plain)._compiled.native_closures == 2  # the two `|w| w.id`
    assert probe(native) == probe(plain) == expected


def test_closure_with_an_index_parameter_is_not_taken_for_the_item() -> None:
    assert ids("workers.filter(|w, i| i < 2)") == ["ams-4090", "ams-sdxl"]
    with pytest.raises(PolicyRuntimeError, match="property 'id'"):
        run('workers.filter(|w, i| i.id == "sfo-cpu")')
