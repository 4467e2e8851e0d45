"""Declarative YAML policies (DESIGN 3): what each condition and action means,
the generated Rhai, and equivalence with hand-written Rhai.

The cluster is conftest's: eligible workers ams-4090 (cuda, 1 GPU, 2e-7/token,
load .25), ams-sdxl (image-gen, cuda, 5e-7, idle), nyc-70b (rocm, 2 GPUs,
9e-7, load .25), par-mac (metal, 1e-7, load .5) and sfo-cpu (embedding, cpu,
5e-8, idle). The models catalogue knows llama-3.1-8b-instruct as llama3-8b and
llama3.1:8b too.
"""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cluster_snapshot, make_job
from rbee.policy_yaml import compile_yaml
from rbee.scheduler import Policy, State

STATE = State(cluster_snapshot())


def yaml_policy(text: str, **kw) -> Policy:
    return Policy.from_source(textwrap.dedent(text), format="yaml", name="p.yaml", **kw)


def rhai_policy(body: str) -> Policy:
    return Policy.from_source(f"fn schedule_job(job, pools, workers) {{\n{body}\n}}\n")


def holds(condition: str, **job) -> bool:
    """Whether a condition (YAML flow text) holds for ``make_job(**job)``."""
    policy = yaml_policy(f"""
        rules:
          - name: probe
            condition: {condition}
            action: {{reject: hit}}
          - name: otherwise
            condition: true
            action: {{reject: miss}}
    """)
    decision = policy.decide(make_job(**job), STATE)
    assert decision.kind == "reject", decision
    return decision.reason == "hit"


def select(pipeline: str, **job) -> str | None:
    policy = yaml_policy(f"""
        rules:
          - name: pick
            condition: true
            action: {{select: "{pipeline}"}}
    """)
    decision = policy.decide(make_job(**job), STATE)
    assert decision.kind in ("dispatch", "wait"), decision
    return decision.worker_id


# --- conditions ---------------------------------------------------------------------


@pytest.mark.parametrize("condition, job, expected", [
    ("true", {}, True),
    ("false", {}, False),
    # `model`: the id or an alias, exactly, in either direction.
    ("{model: llama-3.1-8b-instruct}", {}, True),
    ("{model: llama3-8b}", {}, True),
    ("{model: llama-3.1-8b-instruct}", {"model": "llama3.1:8b"}, True),
    ("{model: llama3-8b}", {"model": "llama3.1:8b"}, True),
    ("{model: llama-3.1-8b}", {}, False),
    ("{model: sdxl}", {}, False),
    ("{model: sdxl}", {"model": None}, False),
    ("{model: not-in-the-catalogue}", {"model": "not-in-the-catalogue"}, True),
    ("{model: [sdxl, llama3-8b]}", {}, True),
    # `model_contains`: a substring of the model the job names.
    ("{model_contains: 8b}", {}, True),
    ("{model_contains: 70b}", {}, False),
    ("{model_contains: 70b}", {"model": "llama3-70b"}, True),
    ("{model_contains: 70b}", {"model": None}, False),
    ("{task_type: text-gen}", {}, True),
    ("{task_type: image-gen}", {}, False),
    ("{task_type: [image-gen, text-gen]}", {}, True),
    ("{priority: interactive}", {}, True),
    ("{priority: batch}", {}, False),
    ("{tenant: acme}", {}, True),
    ("{tenant: globex}", {}, False),
    ("{tenant: acme}", {"tenant_id": None}, False),
    # `region` is the user's.
    ("{region: EU}", {}, True),
    ("{region: US}", {}, False),
    ("{region: EU}", {"user": None}, False),
    ("{region: EU}", {"user": {"id": "u"}}, False),
    # `tags`: every listed pair on the job, compared as text.
    ("{tags: {team: research}}", {}, True),
    ("{tags: {team: research, tier: gold}}", {}, False),
    ("{tags: {team: research, tier: gold}}", {"tags": {"team": "research", "tier": "gold"}},
     True),
    ("{tags: {team: ops}}", {}, False),
    ("{tags: {team: research}}", {"tags": None}, False),
    ("{tags: {cost-center: 42}}", {"tags": {"cost-center": "42"}}, True),
    ("{tags: {gpu: true}}", {"tags": {"gpu": "true"}}, True),
    ("{max_tokens_over: 200}", {}, True),
    ("{max_tokens_over: 256}", {}, False),
    ("{max_tokens_over: 1000}", {"max_tokens": None}, False),
    # `expr`: any Rhai expression over the job; single quotes are strings.
    ("{expr: 'job.deadline < 10000'}", {}, True),
    ("{expr: \"job.tags.team == 'research'\"}", {}, True),
    ("{expr: 'tenant_over_quota(job.tenant_id)'}", {"tenant_id": "initech"}, True),
    ("{expr: 'workers.count(gpus > 1) >= 1'}", {}, True),
    # Several keys are ANDed; all, any, not combine.
    ("{task_type: text-gen, priority: interactive}", {}, True),
    ("{task_type: text-gen, priority: batch}", {}, False),
    ("{all: [{task_type: text-gen}, {region: EU}]}", {}, True),
    ("{all: [{task_type: text-gen}, {region: US}]}", {}, False),
    ("{any: [{region: US}, {tenant: acme}]}", {}, True),
    ("{any: [{region: US}, {tenant: globex}]}", {}, False),
    ("{not: {region: US}}", {}, True),
    ("{not: {region: EU}}", {}, False),
    ("{not: true}", {}, False),
    ("{any: [{all: [{region: US}, {priority: batch}]}, {not: {any: [{tenant: x}, "
     "{model_contains: 70b}]}}]}", {}, True),
])
def test_each_condition(condition, job, expected):
    assert holds(condition, **job) is expected


def test_conditions_short_circuit_like_rhai():
    # The second part would fail on a job without tags: it must not run.
    assert not holds("{all: [{expr: 'job.tags != ()'}, {expr: 'job.tags.team == \"x\"'}]}",
                     tags=None)
    assert holds("{any: [{expr: 'job.tags == ()'}, {expr: 'job.tags.team == \"x\"'}]}",
                 tags=None)


def test_large_conditions_are_computed_in_flat_statements():
    """A condition past Rhai's expression depth inline still compiles and
    decides right: it is computed into a variable in short steps."""
    tags = {f"t{i}": f"v{i}" for i in range(40)}
    flow = ", ".join(f"{k}: {v}" for k, v in tags.items())
    models = ", ".join(f"m{i}" for i in range(30))
    condition = (f"{{all: [{{tags: {{{flow}}}}}, {{any: [{{model: [{models}]}}, "
                 f"{{not: {{priority: [a, b, c, d, e, f, g, h, i, j, k, l, m, n]}}}}]}}]}}")
    assert holds(condition, tags=tags)
    assert not holds(condition, tags={**tags, "t39": "other"})
    assert not holds(condition, tags=tags, model="zzz", priority="n")
    assert holds(condition, tags=tags, model="m29", priority="n")
    rhai = compile_yaml(f"rules: [{{name: big, condition: {condition}, action: {{wait: x}}}}]")
    assert "let c0 = " in rhai and "if c0 {" in rhai
    assert max(len(line) for line in rhai.splitlines()) <= 100


def test_many_rules_compile_as_a_flat_sequence():
    # About 28 chained `else if`s exceed Rhai's depth limit in a function.
    rules = "\n".join(
        f"  - {{name: rule {i}, condition: {{priority: p{i}}}, action: {{reject: r{i}}}}}"
        for i in range(120))
    policy = yaml_policy("rules:\n" + rules)
    assert "else" not in policy.rhai
    decision = policy.decide(make_job(priority="p117"), STATE)
    assert (decision.kind, decision.reason) == ("reject", "r117")


# --- actions ------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline, expected", [
    ("workers.filter(gpus > 1).first()", "nyc-70b"),
    ("workers.min_by(cost_per_token)", "sfo-cpu"),
    ("workers.max_by(cost_per_token)", "nyc-70b"),
    ("workers.filter(backend == 'cuda' && capability == 'image-gen').least_loaded()",
     "ams-sdxl"),
    ("workers.filter(geo.region == 'US' && labels.rack == 'b2').first()", "nyc-70b"),
    ("workers.filter(models.contains(job.model)).min_by(latency_ms)", "ams-4090"),
    ("workers.filter(|w| w.gpus > 1).first()", "nyc-70b"),
    ("workers.filter(estimated_time < job.deadline).min_by(cost_per_token)", "sfo-cpu"),
    ("workers.filter(distance(job.user.geo.latitude, job.user.geo.longitude, "
     "geo.latitude, geo.longitude) < 400.0).max_by(vram_free)", "ams-4090"),
    ("workers.with_model(job.model).can_fit(job.model).most_vram_free()", "par-mac"),
    ("workers.filter(gpus > 8).first()", None),
    ("'par-mac'", "par-mac"),
])
def test_select_pipelines(pipeline, expected):
    assert select(pipeline) == expected


def test_aggregates_take_the_shorthand_too():
    policy = yaml_policy("""
        rules:
          - name: busy cluster
            condition: {expr: 'workers.sum_by(active) > 4 && workers.avg_by(gpus) >= 1.0'}
            action: {reject: busy}
          - name: some idle
            condition: {expr: 'workers.count(active == 0) >= 2'}
            action: {select: workers.weighted_random(1.0 / (1.0 + load)).id}
    """)
    assert "workers.sum_by(|w| w.active)" in policy.rhai
    assert "weighted_random(|w| 1.0 / (1.0 + w.load))" in policy.rhai
    # 4 jobs running, 2 idle workers: the first rule does not hold, the second does.
    decision = policy.decide(make_job(), STATE)
    assert decision.kind == "dispatch"


def test_reject_and_wait_forms():
    def decide(action: str, **job):
        return yaml_policy(f"rules: [{{name: r, condition: true, action: {action}}}]").decide(
            make_job(**job), STATE)

    d = decide("{reject: no_capacity}")
    assert (d.kind, d.reason, d.status) == ("reject", "no_capacity", 503)
    d = decide("{reject: quota_exceeded}")
    assert (d.reason, d.status) == ("quota_exceeded", 429)
    d = decide("{reject: {code: not_allowed, status: 403}}")
    assert (d.reason, d.status) == ("not_allowed", 403)
    d = decide("{wait: warming_up}")
    assert (d.kind, d.reason, d.retry_after_ms) == ("wait", "warming_up", None)
    d = decide("{wait: {reason: warming_up, ms: 750}}")
    assert (d.kind, d.reason, d.retry_after_ms) == ("wait", "warming_up", 750)


def test_first_deciding_rule_wins_and_empty_selections_fall_through():
    policy = yaml_policy("""
        rules:
          - name: Nothing has 16 GPUs
            condition: true
            action: {select: workers.filter(gpus >= 16).first()}
          - name: Images elsewhere
            condition: {task_type: image-gen}
            action: {select: workers.with_capability('image-gen').first()}
          - name: Refuse batch
            condition: {priority: batch}
            action: {reject: no_batch}
          - name: Unreachable for batch
            condition: {priority: batch}
            action: {select: workers.first()}
          - name: Cheapest
            condition: true
            action: {select: workers.min_by(cost_per_token)}
    """, trace_rules=True)
    d = policy.decide(make_job(type="image-gen"), STATE)
    assert (d.worker_id, d.logs) == ("ams-sdxl", ["rbee:rule:1"])
    d = policy.decide(make_job(priority="batch"), STATE)
    assert (d.reason, d.logs) == ("no_batch", ["rbee:rule:2"])
    d = policy.decide(make_job(), STATE)
    assert (d.worker_id, d.logs) == ("sfo-cpu", ["rbee:rule:4"])


def test_no_rule_deciding_leaves_the_job_waiting():
    policy = yaml_policy("""
        rules:
          - {name: only images, condition: {task_type: image-gen}, action: {reject: x}}
          - {name: none fits, condition: true, action: {select: workers.filter(gpus > 99).first()}}
    """)
    d = policy.decide(make_job(), STATE)
    assert (d.kind, d.reason) == ("wait", "no_worker")


def test_anchors_can_live_under_x_keys():
    policy = yaml_policy("""
        x-cheapest: &cheapest {select: workers.min_by(cost_per_token)}
        rules:
          - {name: batch, condition: {priority: batch}, action: *cheapest}
          - {name: rest, condition: true, action: {select: workers.max_by(cost_per_token)}}
    """)
    assert policy.decide(make_job(priority="batch"), STATE).worker_id == "sfo-cpu"
    assert policy.decide(make_job(), STATE).worker_id == "nyc-70b"


def test_select_may_return_actions():
    policy = yaml_policy("""
        rules:
          - name: make room
            condition: true
            action: {select: "[evict_least_recently_used(), workers.by_id('par-mac')]"}
    """)
    d = policy.decide(make_job(), STATE)
    assert d.worker_id == "par-mac"
    assert [a["action"] for a in d.actions] == ["evict"]


def test_model_names_are_resolved_once_before_the_first_model_rule():
    policy = yaml_policy("""
        rules:
          - {name: quota, condition: {expr: 'tenant_over_quota(job.tenant_id)'},
             action: {reject: quota_exceeded}}
          - {name: small, condition: {model: [llama3-8b, mistral]}, action: {reject: small}}
          - {name: big, condition: {any: [{model: llama3-70b}, {not: {model: sdxl}}]},
             action: {reject: big}}
    """)
    rhai = policy.rhai
    assert rhai.count("with_model(job.model)") == 1
    assert rhai.index('rules[0] "quota"') < rhai.index("with_model") < rhai.index('rules[1]')
    assert policy.decide(make_job(model="llama3.1:8b"), STATE).reason == "small"
    assert policy.decide(make_job(model="llama-3.1-70b-instruct"), STATE).reason == "big"
    assert policy.decide(make_job(model="stable-diffusion-xl"), STATE).kind == "wait"
    assert policy.decide(make_job(model=None), STATE).reason == "big"


# --- the generated Rhai -------------------------------------------------------------

DESIGN_EXAMPLE = """\
rules:
  - name: "Large models to multi-GPU"
    condition:
      model_contains: "70b"
    action:
      select: "workers.filter(gpus > 1).first()"
  - name: "Default to cheapest"
    condition: true
    action:
      select: "workers.min_by(cost_per_token)"
"""


def test_generated_rhai_is_readable():
    rhai = compile_yaml(DESIGN_EXAMPLE, "example.yaml")
    assert "// Generated by rbee from example.yaml" in rhai
    assert '// rules[0] "Large models to multi-GPU"' in rhai
    assert '// rules[1] "Default to cheapest"' in rhai
    assert "workers.filter(|w| w.gpus > 1).first()" in rhai
    assert "workers.min_by(|w| w.cost_per_token)" in rhai
    assert "log(" not in rhai  # tracing is opt-in
    assert all(len(line) < 100 for line in rhai.splitlines())
    traced = compile_yaml(DESIGN_EXAMPLE, "example.yaml", trace=True)
    assert 'log("rbee:rule:0")' in traced and 'log("rbee:rule:1")' in traced


HAND_WRITTEN = """
    if job.model.contains("70b") {
        let big = workers.filter(|w| w.gpus > 1).first();
        if big != () { return big; }
    }
    workers.min_by(|w| w.cost_per_token)
"""


def test_design_example_decides_like_hand_written_rhai():
    from_yaml = Policy.from_source(DESIGN_EXAMPLE, format="yaml")
    generated = Policy.from_source(from_yaml.rhai)
    by_hand = rhai_policy(HAND_WRITTEN)
    snapshot = cluster_snapshot()
    without_multi_gpu = State({**snapshot, "workers": [
        w for w in snapshot["workers"] if w["id"] != "nyc-70b"]})
    for state in (STATE, without_multi_gpu):
        for model in ("llama-3.1-70b-instruct", "llama3-70b", "llama-3.1-8b-instruct", "sdxl"):
            job = make_job(model=model)
            expected = by_hand.decide(job, state).to_dict()
            for policy in (from_yaml, generated):
                got = policy.decide(job, state).to_dict()
                assert (got["kind"], got["worker_id"]) == (expected["kind"], expected["worker_id"])


def test_yaml_runs_at_the_speed_of_hand_written_rhai():
    """Same native closures, about the same operation count, comparable time."""
    from_yaml = Policy.from_source(DESIGN_EXAMPLE, format="yaml")
    by_hand = rhai_policy(HAND_WRITTEN)
    assert from_yaml._compiled.native_closures == by_hand._compiled.native_closures == 2
    workers = [{"id": f"w{i:04}", "gpus": i % 3, "cost_per_token": (i % 97) * 1e-8,
                "slots": 4, "active": i % 4} for i in range(1000)]
    big = State({"workers": workers})
    job = make_job(model="llama-3.1-8b-instruct")
    a, b = from_yaml.decide(job, big), by_hand.decide(job, big)
    assert a.worker_id == b.worker_id
    assert a.operations <= b.operations + 10

    def best_of(policy: Policy) -> int:
        return min(policy.decide(job, big).elapsed_us for _ in range(30))

    assert best_of(from_yaml) <= best_of(by_hand) * 1.5 + 30


# One rule set, in YAML and written by hand, compared on random jobs.
EQUIVALENT_YAML = """
rules:
  - name: Over quota
    condition: {expr: 'tenant_over_quota(job.tenant_id)'}
    action: {reject: quota_exceeded}
  - name: Urgent images to CUDA
    condition: {task_type: image-gen, priority: [high, interactive]}
    action: {select: workers.filter(capability == 'image-gen' && backend == 'cuda').least_loaded()}
  - name: Large models
    condition: {any: [{model_contains: 70b}, {max_tokens_over: 4000}]}
    action: {select: workers.filter(gpus > 1).first()}
  - name: Research team in the EU
    condition: {tags: {team: research}, region: EU, not: {priority: batch}}
    action: {select: workers.filter(geo.region == 'EU').min_by(latency_ms)}
  - name: Batch waits
    condition: {priority: [batch, low], model: llama3-8b}
    action: {wait: {reason: batch_window, ms: 1000}}
  - name: Cheapest serving the model
    condition: true
    action: {select: workers.with_model(job.model).min_by(cost_per_token)}
"""

EQUIVALENT_RHAI = """
    if tenant_over_quota(job.tenant_id) { return reject("quota_exceeded"); }
    if job.type == "image-gen" && (job.priority == "high" || job.priority == "interactive") {
        let w = workers.filter(|w| w.capability == "image-gen" && w.backend == "cuda")
            .least_loaded();
        if w != () { return w; }
    }
    let big = (job.model != () && job.model.contains("70b"))
        || (job.max_tokens != () && job.max_tokens > 4000);
    if big {
        let w = workers.filter(|w| w.gpus > 1).first();
        if w != () { return w; }
    }
    let user_region = if job.user == () || job.user.geo == () { () } else { job.user.geo.region };
    let team = if job.tags == () { () } else { job.tags.team };
    if team == "research" && user_region == "EU" && job.priority != "batch" {
        let w = workers.filter(|w| w.geo.region == "EU").min_by(|w| w.latency_ms);
        if w != () { return w; }
    }
    let llama8 = ["llama-3.1-8b-instruct", "llama3-8b", "llama3.1:8b"];
    if (job.priority == "batch" || job.priority == "low") && job.model in llama8 {
        return wait("batch_window", 1000);
    }
    workers.with_model(job.model).min_by(|w| w.cost_per_token)
"""

jobs = st.fixed_dictionaries({
    "id": st.text("abcdef0123", min_size=1, max_size=6),
    "type": st.sampled_from(["text-gen", "image-gen", "embedding"]),
    "model": st.sampled_from(["llama-3.1-8b-instruct", "llama3-8b", "llama3.1:8b", "sdxl",
                              "llama-3.1-70b-instruct", "llama3-70b", "nomic", None]),
    "priority": st.sampled_from(["interactive", "high", "normal", "batch", "low"]),
    "tenant_id": st.sampled_from(["acme", "acme", "acme", "umbrella", None, "globex",
                                  "initech"]),
    "max_tokens": st.one_of(st.none(), st.integers(0, 8000)),
    "tags": st.one_of(st.none(), st.fixed_dictionaries(
        {}, optional={"team": st.sampled_from(["research", "research", "ops"]),
                      "x": st.just("1")})),
    "user": st.one_of(st.none(), st.builds(
        lambda region: {"id": "u", "geo": {"region": region, "latitude": 50.0,
                                           "longitude": 5.0}},
        st.sampled_from(["EU", "US"]))),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs)
def test_yaml_and_generated_rhai_decide_like_hand_written_rhai(job):
    decisions = [p.decide(job, STATE).to_dict() for p in EQUIVALENT]
    summary = [(d["kind"], d["worker_id"], d["reason"], d["status"], d["retry_after_ms"])
               for d in decisions]
    assert summary[0] == summary[1] == summary[2], job


@pytest.mark.parametrize("rule, job", [
    (0, {"tenant_id": "globex"}),
    (1, {"type": "image-gen", "model": "sdxl", "priority": "high"}),
    (2, {"model": "llama3-70b"}),
    (2, {"max_tokens": 5000}),
    (3, {"priority": "normal"}),
    (4, {"priority": "batch", "model": "llama3.1:8b", "tags": None}),
    (5, {"priority": "normal", "tags": None}),
])
def test_every_rule_of_the_equivalence_set_is_reached(rule, job):
    traced = Policy.from_source(EQUIVALENT_YAML, format="yaml", trace_rules=True)
    assert traced.decide(make_job(**job), STATE).logs == [f"rbee:rule:{rule}"]
    results = {(d.kind, d.worker_id, d.reason) for d in
               (p.decide(make_job(**job), STATE) for p in EQUIVALENT)}
    assert len(results) == 1


EQUIVALENT = [
    Policy.from_source(EQUIVALENT_YAML, format="yaml"),
    Policy.from_source(compile_yaml(EQUIVALENT_YAML)),
    rhai_policy(EQUIVALENT_RHAI),
]
