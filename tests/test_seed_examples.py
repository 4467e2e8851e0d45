"""The six example policies of the product brief, shipped verbatim as templates,
against the realistic cluster of ``cluster_fixtures`` (see its worker table).

Every expected worker is worked out by hand in the comments. Workers that are
down, starting or draining are never candidates, whatever their cost or load.
"""

from __future__ import annotations

from importlib import resources

import pytest

import rbee.templates
from cluster_fixtures import (
    BERLIN,
    BOSTON,
    BRUSSELS,
    LLAMA_70B,
    LLAMA_8B,
    LONDON,
    LOS_ANGELES,
    SDXL,
    cluster,
    cluster_with,
    make_job,
    user_at,
)
from rbee.scheduler import Policy, State

SEED_TEMPLATES = ["cost-optimizer", "eu-compliance", "home", "latency-optimizer",
                  "multi-modal-router", "platform-scheduler"]


def template(name: str) -> Policy:
    return Policy.from_source(rbee.templates.source(name), name=f"{name}.rhai")


def picks(name: str, state=None, **job) -> str | None:
    """The worker the template dispatches ``make_job(**job)`` to (None when the
    job waits); fails on a reject."""
    decision = template(name).decide(make_job(**job), cluster() if state is None else state)
    assert decision.kind in ("dispatch", "wait"), decision
    return decision.worker_id


def rejects(name: str, state=None, **job) -> tuple[str, int]:
    decision = template(name).decide(make_job(**job), cluster() if state is None else state)
    assert decision.kind == "reject", decision
    return decision.reason, decision.status


# --- the library ---------------------------------------------------------------------


def test_the_six_seed_templates_ship_with_rbee():
    assert set(SEED_TEMPLATES) <= set(rbee.templates.names())
    for name in SEED_TEMPLATES:
        packaged = resources.files("rbee.templates").joinpath(f"{name}.rhai")
        text = packaged.read_text(encoding="utf-8")
        assert rbee.templates.source(name) == text
        assert "fn schedule_job(job, pools, workers)" in text
        assert rbee.templates.description(name) == text.splitlines()[0].lstrip("/ ").strip()
        template(name)  # compiles


def test_unknown_template_names_the_known_ones():
    with pytest.raises(KeyError, match="platform-scheduler"):
        rbee.templates.source("no-such-template")


def test_template_descriptions():
    assert rbee.templates.description("platform-scheduler") == "Platform scheduler (immutable)"
    assert rbee.templates.description("eu-compliance") == (
        "Route only to EU providers for GDPR compliance")


# --- platform-scheduler --------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["globex", "hooli", "initech"])
def test_platform_rejects_tenants_over_quota(tenant):
    # globex: 120,000 of 100,000 tokens today; hooli: 4 of 4 concurrent jobs;
    # initech: over_quota set by the queen.
    for priority in ("interactive", "batch"):
        assert rejects("platform-scheduler", tenant_id=tenant, priority=priority) == (
            "quota_exceeded", 429)


def test_platform_interactive_goes_to_the_least_loaded_worker():
    # Load 0: par-mac (40 GiB free), par-rocm-sd (12 GiB), sfo-cpu (0): most
    # free VRAM breaks the tie. ams-h100x8 (down) and nyc-spare (starting)
    # are idle too but cannot take work.
    assert picks("platform-scheduler", priority="interactive") == "par-mac"


def test_platform_interactive_follows_load_changes():
    state = State(cluster())
    p = template("platform-scheduler")
    job = make_job(priority="interactive")
    assert p.decide(job, state).worker_id == "par-mac"
    mac = next(w for w in cluster()["workers"] if w["id"] == "par-mac")
    state.upsert_worker({**mac, "active": 2})  # load 1.0
    assert p.decide(job, state).worker_id == "par-rocm-sd"
    state.remove_worker("par-rocm-sd")
    assert p.decide(job, state).worker_id == "sfo-cpu"


@pytest.mark.parametrize("priority", ["batch", "normal", "low"])
def test_platform_other_priorities_go_to_the_cheapest_worker(priority):
    # sfo-cpu at 5e-8 per token; the free (0.0) workers are down or starting.
    assert picks("platform-scheduler", priority=priority) == "sfo-cpu"
    # Without it, par-mac at 1e-7 is next.
    assert picks("platform-scheduler", cluster_with(sfo_cpu=None), priority=priority) == (
        "par-mac")


@pytest.mark.parametrize("tenant", ["acme", "umbrella", "not-a-tenant", None])
def test_platform_tenants_within_quota_are_scheduled(tenant):
    # acme is within every quota, umbrella has none, unknown tenants are not
    # over quota.
    assert picks("platform-scheduler", tenant_id=tenant, priority="interactive") == "par-mac"
    assert picks("platform-scheduler", tenant_id=tenant, priority="batch") == "sfo-cpu"


def test_platform_quota_follows_the_state():
    state = State(cluster())
    p = template("platform-scheduler")
    assert p.decide(make_job(tenant_id="acme"), state).worker_id == "sfo-cpu"
    tenants = cluster()["tenants"]
    tenants[0]["usage"]["tokens_today"] = 1_000_000  # acme used its whole day
    state.replace("tenants", tenants)
    decision = p.decide(make_job(tenant_id="acme"), state)
    assert (decision.kind, decision.reason, decision.status) == ("reject", "quota_exceeded", 429)


def test_platform_without_eligible_workers_waits():
    state = cluster()
    state["workers"] = [w for w in state["workers"] if w["status"] not in ("ready", "busy")]
    decision = template("platform-scheduler").decide(make_job(priority="interactive"), state)
    assert (decision.kind, decision.reason) == ("wait", "no_worker")


# --- home ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [LLAMA_70B, "llama3-70b"])
def test_home_sends_70b_models_to_the_first_multi_gpu_worker(model):
    # gpus > 1 among eligible workers, in id order: fra-a100x4 (4), nyc-mi210x2
    # (2). ams-h100x8 (8 GPUs) comes first by id but is down.
    assert picks("home", model=model) == "fra-a100x4"


def test_home_70b_falls_to_the_next_multi_gpu_worker():
    assert picks("home", cluster_with(fra_a100x4=None), model=LLAMA_70B) == "nyc-mi210x2"
    state = cluster_with(fra_a100x4=None, nyc_mi210x2={"status": "down"})
    decision = template("home").decide(make_job(model=LLAMA_70B), state)
    assert (decision.kind, decision.reason) == ("wait", "no_worker")


def test_home_sends_image_generation_to_the_least_loaded_cuda_image_worker():
    # cuda image-gen: ams-sdxl (load .5), fra-sdxl (.25). par-rocm-sd is idle
    # but rocm.
    assert picks("home", type="image-gen", model=SDXL) == "fra-sdxl"
    busier = cluster_with(fra_sdxl={"active": 3})  # load .75
    assert picks("home", busier, type="image-gen", model=SDXL) == "ams-sdxl"


def test_home_image_generation_waits_without_cuda_image_workers():
    state = cluster_with(ams_sdxl=None, fra_sdxl={"status": "draining"})
    decision = template("home").decide(make_job(type="image-gen", model=SDXL), state)
    assert (decision.kind, decision.reason) == ("wait", "no_worker")


@pytest.mark.parametrize("model", [LLAMA_8B, "llama3-8b", "mistral-7b"])
def test_home_sends_everything_else_to_the_cheapest_worker(model):
    assert picks("home", model=model) == "sfo-cpu"


def test_home_cheapest_ignores_workers_that_cannot_take_work():
    # The free (0.0) workers are down or starting; with sfo-cpu as dear as
    # ams-4090, par-mac (1e-7) is the cheapest worker that can take work.
    state = cluster_with(sfo_cpu={"cost_per_token": 2e-7})
    assert picks("home", state) == "par-mac"


# --- cost-optimizer ------------------------------------------------------------------
# estimated_time = latency_ms + max_tokens / tokens_per_sec * 1000 (+ queue wait
# when every slot is busy). With max_tokens 256:
#   ams-4090 60 + 2327.3 = 2387.3     fra-a100x4 200 + 6400 = 6600
#   par-mac 150 + 7314.3 = 7464.3     nyc-mi210x2 250 + 8533.3 = 8783.3
#   sfo-cpu 900 + 32000 = 32900       fra-sdxl 102650, ams-sdxl 128300,
#   par-rocm-sd 171066.7


@pytest.mark.parametrize("deadline, expected", [
    (10_000, "par-mac"),     # ams-4090, fra-a100x4, par-mac, nyc: par-mac cheapest
    (7_000, "ams-4090"),     # ams-4090 and fra-a100x4 make it
    (2_400, "ams-4090"),     # only ams-4090
    (40_000, "sfo-cpu"),     # the cheap CPU box makes it too
    (10**9, "sfo-cpu"),
])
def test_cost_optimizer_picks_the_cheapest_worker_meeting_the_deadline(deadline, expected):
    assert picks("cost-optimizer", deadline=deadline) == expected


@pytest.mark.parametrize("deadline", [2_000, 2_387, 1])
def test_cost_optimizer_rejects_when_no_worker_meets_the_deadline(deadline):
    assert rejects("cost-optimizer", deadline=deadline) == ("no_workers_meet_deadline", 503)


def test_cost_optimizer_counts_fewer_tokens():
    # max_tokens 64: ams-4090 641.8, fra-a100x4 1800, par-mac 1978.6,
    # nyc-mi210x2 2383.3: under 2,000 ms par-mac is the cheapest.
    assert picks("cost-optimizer", deadline=2_000, max_tokens=64) == "par-mac"


def test_cost_optimizer_counts_the_queue_wait():
    # par-mac with both slots busy: one job ahead per slot, half a service time
    # of wait: 7464.3 / 2 + 7464.3 = 11196.4 > 10,000, so ams-4090 (2e-7) wins
    # over fra-a100x4 (1.5e-6) and nyc-mi210x2 (9e-7).
    full = cluster_with(par_mac={"active": 2})
    assert picks("cost-optimizer", full, deadline=10_000) == "ams-4090"
    assert picks("cost-optimizer", full, deadline=12_000) == "par-mac"


def test_cost_optimizer_estimates_per_job_on_a_shared_state():
    state = State(cluster())
    p = template("cost-optimizer")
    assert p.decide(make_job(deadline=2_400), state).worker_id == "ams-4090"
    assert p.decide(make_job(deadline=2_400, max_tokens=64), state).worker_id == "par-mac"
    assert p.decide(make_job(deadline=2_400), state).worker_id == "ams-4090"


# --- latency-optimizer ---------------------------------------------------------------
# Great-circle distances (km) from the users to the pools:
#   London: Paris 343.6, Amsterdam 357.9, Frankfurt 637.8
#   Berlin: Frankfurt 423.5, Amsterdam 576.1, Paris 877.5
#   Brussels: Amsterdam 173.0, Paris 264.0, Frankfurt 317.2
#   Boston: New York 306.1, San Francisco 4333.7
#   Los Angeles: San Francisco 559.1, New York 3935.8


@pytest.mark.parametrize("where, expected", [
    (LONDON, "par-mac"),        # Paris; par-mac and par-rocm-sd tie, smallest id
    (BERLIN, "fra-a100x4"),     # Frankfurt; fra-a100x4 before fra-sdxl
    (BRUSSELS, "ams-4090"),     # Amsterdam; ams-h100x8 is down
    (BOSTON, "nyc-mi210x2"),    # New York; nyc-spare is starting
    (LOS_ANGELES, "sfo-cpu"),
])
def test_latency_optimizer_picks_the_nearest_worker(where, expected):
    assert picks("latency-optimizer", user=user_at(where)) == expected


def test_latency_optimizer_falls_back_to_the_next_nearest_pool():
    state = cluster_with(fra_a100x4=None, fra_sdxl=None)
    assert picks("latency-optimizer", state, user=user_at(BERLIN)) == "ams-4090"
    state = cluster_with(par_mac=None, par_rocm_sd={"status": "down"})
    assert picks("latency-optimizer", state, user=user_at(LONDON)) == "ams-4090"


# --- multi-modal-router --------------------------------------------------------------


def test_multi_modal_high_priority_images_go_to_cuda():
    assert picks("multi-modal-router", type="image-gen", model=SDXL, priority="high") == (
        "fra-sdxl")


def test_multi_modal_other_images_go_to_the_cheapest_worker():
    # Only "high" image jobs take the CUDA branch; the rest fall to cheapest.
    assert picks("multi-modal-router", type="image-gen", model=SDXL, priority="normal") == (
        "sfo-cpu")


def test_multi_modal_large_text_models_go_to_multi_gpu():
    assert picks("multi-modal-router", model=LLAMA_70B) == "fra-a100x4"
    assert picks("multi-modal-router", cluster_with(fra_a100x4={"status": "down"}),
                 model="llama3-70b") == "nyc-mi210x2"


@pytest.mark.parametrize("job", [
    {"model": LLAMA_8B},
    {"model": LLAMA_70B, "type": "embedding"},   # 70b only counts for text-gen
    {"type": "audio", "model": None},
])
def test_multi_modal_everything_else_goes_to_the_cheapest_worker(job):
    assert picks("multi-modal-router", **job) == "sfo-cpu"


# --- eu-compliance -------------------------------------------------------------------


def test_eu_compliance_picks_the_least_loaded_eu_worker():
    # EU and eligible: ams-4090 .25, ams-sdxl .5, fra-a100x4 .5, fra-sdxl .25,
    # par-mac 0 (40 GiB), par-rocm-sd 0 (12 GiB).
    assert picks("eu-compliance", user=user_at(BOSTON, "US")) == "par-mac"
    busy = cluster_with(par_mac={"active": 2})
    assert picks("eu-compliance", busy) == "par-rocm-sd"
    # Without the Paris pool: ams-4090 (.25, 14 GiB) beats fra-sdxl (.25, 9 GiB).
    no_paris = cluster_with(par_mac=None, par_rocm_sd=None)
    assert picks("eu-compliance", no_paris) == "ams-4090"


def test_eu_compliance_never_picks_a_us_worker():
    # The US workers are idle (sfo-cpu) or cheap; the EU ones all busy.
    state = cluster()
    for w in state["workers"]:
        if w["geo"]["region"] == "EU":
            w["active"] = w["slots"]
    decision = template("eu-compliance").decide(make_job(), state)
    assert decision.worker_id in {"ams-4090", "ams-sdxl", "fra-a100x4", "fra-sdxl",
                                  "par-mac", "par-rocm-sd"}
    # All at load 1.0: most free VRAM, fra-a100x4 (120 GiB).
    assert decision.worker_id == "fra-a100x4"


def test_eu_compliance_rejects_without_eu_workers():
    state = cluster()
    for w in state["workers"]:
        if w["geo"]["region"] == "EU":
            w["status"] = "down"
    assert rejects("eu-compliance", state) == ("no_eu_workers_available", 503)
