"""The simulator's model on scenarios small enough to work out by hand.

Times are milliseconds from the start of the trace. A job holds its slot for
network + ttft_ms + output_tokens / tokens_per_sec; its cost is
(prompt_tokens + output_tokens) * cost_per_token.
"""

from __future__ import annotations

import json

import pytest

from rbee.scheduler import Policy
from rbee.simulate.cluster import ClusterError, great_circle_km, parse_cluster
from rbee.simulate.model import START_EPOCH_MS, Simulation
from rbee.simulate.policies import PolicyNotFound, baseline_names, load_policy
from rbee.simulate.report import render_table, summarize
from rbee.simulate.trace import TraceError, parse_trace

TWO_WORKERS = """
workers:
  - {id: a, slots: 1, ttft_ms: 100, tokens_per_sec: 10, cost_per_token: 0.001,
     network_latency_ms: 10}
  - {id: b, slots: 1, ttft_ms: 50, tokens_per_sec: 20, cost_per_token: 0.002,
     network_latency_ms: 0}
"""

ONE_WORKER = """
queue: {aging_ms: %d}
workers:
  - {id: a, slots: 1, ttft_ms: 0, tokens_per_sec: 10, network_latency_ms: 0}
"""

WAIT_FOR_A_FREE_SLOT = "fn schedule_job(job, pools, workers) { workers.available().first() }"


def simulate(cluster: str, jobs: list[dict], policy: Policy | str, **kw):
    if isinstance(policy, str):
        policy = Policy.from_source(policy, name="test.rhai")
    trace = parse_trace([json.dumps(j) for j in jobs], "trace.jsonl")
    run = Simulation(parse_cluster(cluster, "cluster.yaml"), trace, policy, **kw).run()
    return run, summarize(run, "p")


def by_id(run):
    return {j.trace.id: j for j in run.jobs}


# --- worked out by hand ------------------------------------------------------------


def test_round_robin_on_two_workers_by_hand():
    # Round robin sends j1, j3 to a and j2, j4 to b.
    #   j1 on a: starts 0, first token 0+10+100 = 110, ends 110 + 10/10 s = 1110
    #   j2 on b: starts 100, first token 150, ends 150 + 20/20 s = 1150
    #   j3 on a: a is busy until 1110, so it waits there: first token 1220, ends 1720
    #   j4 on b: waits until 1150: first token 1200, ends 1700, past its deadline 1300
    run, s = simulate(TWO_WORKERS, [
        {"at_ms": 0, "id": "j1", "output_tokens": 10, "prompt_tokens": 5},
        {"at_ms": 100, "id": "j2", "output_tokens": 20},
        {"at_ms": 200, "id": "j3", "output_tokens": 5},
        {"at_ms": 300, "id": "j4", "output_tokens": 10, "deadline_ms": 1000},
    ], load_policy("round-robin"))
    jobs = by_id(run)
    assert [(j.worker.id, j.start, j.first_token, j.end) for j in jobs.values()] == [
        ("a", 0, 110, 1110), ("b", 100, 150, 1150), ("a", 1110, 1220, 1720),
        ("b", 1150, 1200, 1700)]
    assert s["completed"] == 4 and s["rejected"] == 0
    assert s["deadline_misses"] == 1 and s["jobs_with_deadline"] == 1
    # Costs: 15 * 0.001 + 20 * 0.002 + 5 * 0.001 + 10 * 0.002
    assert s["total_cost"] == pytest.approx(0.08)
    assert s["cost_per_1k_jobs"] == pytest.approx(20.0)
    # Latencies 1110, 1050, 1520, 1400; nearest rank: p50 is the 2nd of 4.
    assert s["latency_ms"] == {"p50": 1110, "p95": 1520, "p99": 1520, "max": 1520,
                               "mean": 1270}
    assert (s["ttft_ms"]["p50"], s["ttft_ms"]["max"]) == (110, 1020)
    assert s["queue_wait_ms"] == {"p50": 0, "p95": 910, "p99": 910, "max": 910, "mean": 440}
    # Busy: a 1110 + 610, b 1050 + 550 = 3320 of 2 slots x 1720.
    assert s["utilisation"] == round(3320 / 3440, 4)
    assert s["workers"]["b"] == {"completed": 2, "utilisation": round(1600 / 1720, 4)}
    assert s["span_ms"] == 1720
    assert s["decisions"] == 4 and not s["fallbacks"]


def test_the_queue_goes_by_priority_class_then_arrival():
    # One slot. j1 runs 0-1000; j2 (batch) and j3 (interactive) wait in the queue;
    # j3 goes first when the slot frees although it came later.
    jobs = [
        {"at_ms": 0, "id": "j1", "output_tokens": 10},
        {"at_ms": 10, "id": "j2", "output_tokens": 10, "priority": "batch"},
        {"at_ms": 20, "id": "j3", "output_tokens": 10, "priority": "interactive"},
    ]
    run, s = simulate(ONE_WORKER % 10_000, jobs, WAIT_FOR_A_FREE_SLOT)
    got = by_id(run)
    assert (got["j3"].start, got["j2"].start) == (1000, 2000)
    assert s["queue_wait_ms"]["max"] == 1990
    # With aging every 300 ms, by t=1000 j2 (waited 990 ms) has climbed three
    # classes to interactive, and came first.
    run, _ = simulate(ONE_WORKER % 300, jobs, WAIT_FOR_A_FREE_SLOT)
    got = by_id(run)
    assert (got["j2"].start, got["j3"].start) == (1000, 2000)


def test_a_job_whose_deadline_passes_in_the_queue_expires():
    run, s = simulate(ONE_WORKER % 10_000, [
        {"at_ms": 0, "id": "j1", "output_tokens": 10},
        {"at_ms": 50, "id": "late", "output_tokens": 10, "deadline_ms": 500},
        {"at_ms": 60, "id": "patient", "output_tokens": 10, "timeout_ms": 700},
    ], WAIT_FOR_A_FREE_SLOT)
    got = by_id(run)
    assert (got["late"].outcome, got["late"].reason, got["late"].end) == (
        "expired", "deadline_exceeded", 550)
    assert (got["patient"].reason, got["patient"].end) == ("timeout", 760)
    assert s["expired_by_reason"] == {"deadline_exceeded": 1, "timeout": 1}
    assert s["deadline_misses"] == 1 and s["completed"] == 1


def test_rejections_are_counted_by_reason_and_cost_nothing():
    policy = """fn schedule_job(job, pools, workers) {
        if job.tenant_id == "mallory" { return reject("quota_exceeded"); }
        workers.first()
    }"""
    run, s = simulate(ONE_WORKER % 10_000, [
        {"at_ms": 0, "output_tokens": 10, "prompt_tokens": 3, "tenant_id": "alice"},
        {"at_ms": 5, "output_tokens": 10, "tenant_id": "mallory"},
        {"at_ms": 6, "output_tokens": 10, "tenant_id": "mallory"},
    ], policy)
    assert s["rejected_by_reason"] == {"quota_exceeded": 2}
    assert s["tenants"]["mallory"] == {
        "jobs": 2, "completed": 0, "rejected": 2, "deadline_misses": 0,
        "share_of_slot_time": 0.0, "share_of_tokens": 0.0, "cost": 0.0,
        "latency_ms": {"p50": None, "p95": None, "max": None, "mean": None}}
    assert s["tenants"]["alice"]["share_of_slot_time"] == 1.0


def test_wait_with_a_timer_looks_again_when_it_fires():
    policy = """fn schedule_job(job, pools, workers) {
        if job.wait_ms < 400 { return wait("later", 400); }
        workers.first()
    }"""
    run, s = simulate(ONE_WORKER % 10_000, [{"at_ms": 100, "output_tokens": 1}], policy)
    (job,) = run.jobs
    assert (job.start, job.end, job.decisions) == (500, 600, 2)


def test_a_full_queue_rejects_with_queue_full():
    cluster = ONE_WORKER.replace("queue: {aging_ms: %d}", "queue: {capacity: 1}")
    run, s = simulate(cluster, [{"at_ms": t, "output_tokens": 10} for t in (0, 1, 2)],
                      WAIT_FOR_A_FREE_SLOT)
    assert s["rejected_by_reason"] == {"queue_full": 1}
    assert s["completed"] == 2


def test_policy_errors_fall_back_to_the_default_and_are_counted():
    policy = """fn schedule_job(job, pools, workers) {
        if job.priority == "batch" { return workers[99]; }   // out of bounds
        workers.first()
    }"""
    run, s = simulate(TWO_WORKERS, [
        {"at_ms": 0, "output_tokens": 1, "priority": "batch"},
        {"at_ms": 1, "output_tokens": 1},
    ], policy)
    assert s["completed"] == 2
    assert sum(s["fallbacks"].values()) == 1


def test_the_policy_sees_simulated_time_and_the_remaining_deadline():
    # The first decision waits 250 ms; the second dispatches only if the
    # clock, the remaining deadline, the wait and the arrival are what a job
    # that arrived at 1000 with a 2000 ms deadline sees at 1250, and rejects
    # with what it saw otherwise.
    policy = """fn schedule_job(job, pools, workers) {
        let seen = `${now()} ${job.deadline} ${job.wait_ms} ${job.created_at}`;
        if job.wait_ms == 0 {
            if seen != "%d 2000 0 %d" { return reject(seen); }
            return wait("once", 250);
        }
        if seen != "%d 1750 250 %d" { return reject(seen); }
        workers.first()
    }""" % (START_EPOCH_MS + 1000, START_EPOCH_MS + 1000, START_EPOCH_MS + 1250,
            START_EPOCH_MS + 1000)
    run, s = simulate(ONE_WORKER % 10_000, [
        {"at_ms": 1000, "id": "first", "deadline_ms": 2000, "output_tokens": 1}], policy)
    job = by_id(run)["first"]
    assert (job.outcome, job.reason, job.decisions, job.start) == ("completed", None, 2, 1250)


def test_a_dispatch_to_a_worker_not_serving_the_model_is_counted():
    cluster = """
workers:
  - {id: a, models: [llama], slots: 1, ttft_ms: 0, tokens_per_sec: 10}
  - {id: b, models: [qwen], slots: 1, ttft_ms: 0, tokens_per_sec: 10}
"""
    policy = "fn schedule_job(job, pools, workers) { workers.by_id(\"b\") }"
    _, s = simulate(cluster, [{"at_ms": 0, "model": "llama", "output_tokens": 1}], policy)
    assert s["model_mismatches"] == 1


def test_network_latency_comes_from_the_distance():
    cluster = parse_cluster("""
network: {base_ms: 5, ms_per_100km: 2, unknown_ms: 30}
workers:
  - {id: ams, slots: 1, ttft_ms: 0, tokens_per_sec: 1,
     geo: {latitude: 52.37, longitude: 4.90}}
  - {id: fixed, slots: 1, ttft_ms: 0, tokens_per_sec: 1, network_latency_ms: 7}
  - {id: nowhere, slots: 1, ttft_ms: 0, tokens_per_sec: 1}
""")
    ams, fixed, nowhere = cluster.workers
    km = great_circle_km(48.86, 2.35, 52.37, 4.90)
    assert 425 < km < 435  # Paris - Amsterdam
    assert cluster.network_ms(ams, 48.86, 2.35) == pytest.approx(5 + 2 * km / 100)
    assert cluster.network_ms(fixed, 48.86, 2.35) == 7
    assert cluster.network_ms(nowhere, 48.86, 2.35) == 30
    assert cluster.network_ms(ams, None, None) == 30


def test_replicas_expand_into_numbered_workers():
    cluster = parse_cluster("workers: [{id: gpu, replicas: 12, ttft_ms: 1, tokens_per_sec: 1}]")
    ids = [w.id for w in cluster.workers]
    assert ids[:2] == ["gpu-01", "gpu-02"] and ids[-1] == "gpu-12"


def test_runs_are_deterministic():
    jobs = [{"at_ms": i * 37.5, "output_tokens": 5 + i % 7, "prompt_tokens": i,
             "user": {"geo": {"latitude": 50.0 + i % 3, "longitude": 4.0}}}
            for i in range(200)]
    first = simulate(TWO_WORKERS, jobs, load_policy("power-of-two"))[1]
    again = simulate(TWO_WORKERS, jobs, load_policy("power-of-two"))[1]
    first.pop("speed"), again.pop("speed")
    assert first == again


def test_the_state_ends_as_the_cluster_does_and_updates_are_counted():
    # One worker, two jobs one after the other: j1 runs 0-100 ms, j2 arrives
    # at 500 and runs until 600. The worker is published before j2's decision
    # (j1 took and freed a slot) and once more at the end (j2 freed it).
    run, _ = simulate(ONE_WORKER % 10_000, [
        {"at_ms": 0, "id": "j1", "output_tokens": 1},
        {"at_ms": 500, "id": "j2", "output_tokens": 1},
    ], WAIT_FOR_A_FREE_SLOT)
    assert [(j.trace.id, j.start, j.end) for j in run.jobs] == [("j1", 0, 100), ("j2", 500, 600)]
    assert (run.decisions, run.updates) == (2, 2)
    assert run.decide_s > 0 and run.update_s > 0
    (worker,) = run.workers
    assert (worker.active, worker.running, worker.completed, worker.busy_ms) == (0, 0, 2, 200)


def test_the_engine_state_is_left_as_the_run_ends():
    cluster = parse_cluster(ONE_WORKER % 10_000)
    trace = parse_trace([json.dumps({"at_ms": 0, "output_tokens": 1}),
                         json.dumps({"at_ms": 10, "output_tokens": 1_000_000})])
    policy = Policy.from_source(WAIT_FOR_A_FREE_SLOT.replace(".available()", ""), name="p")
    sim = Simulation(cluster, trace, policy)
    run = sim.run()
    # The second job was sent at 10 ms to the busy worker, waited there and
    # ran last; the last decision saw two jobs on the worker, but what is
    # left in the state is the end of the run: an idle worker.
    assert [j.dispatched for j in run.jobs] == [0, 10]
    (worker,) = sim.state.to_dict()["workers"]
    assert (worker["active"], worker["load"], worker["status"]) == (0, 0.0, "ready")
    assert worker["last_used_at"] == START_EPOCH_MS + 10
    assert (sim.workers[0].snap["active"], sim.workers[0].snap["status"]) == (0, "ready")


def test_a_progress_callback_that_fails_stops_the_run():
    class Stop(Exception):
        pass

    def progress(n: int) -> None:
        raise Stop(n)

    cluster = parse_cluster(ONE_WORKER % 10_000)
    trace = parse_trace([json.dumps({"at_ms": i, "output_tokens": 1}) for i in range(10)])
    policy = Policy.from_source(WAIT_FOR_A_FREE_SLOT, name="p")
    with pytest.raises(Stop):
        Simulation(cluster, trace, policy, progress=progress).run()


def test_a_negative_lookahead_is_refused():
    cluster = parse_cluster(ONE_WORKER % 10_000)
    with pytest.raises(ValueError, match="lookahead"):
        Simulation(cluster, [], Policy.from_source(WAIT_FOR_A_FREE_SLOT, name="p"), lookahead=-1)


def test_table_lists_the_policies_side_by_side():
    _, a = simulate(TWO_WORKERS, [{"at_ms": 0, "output_tokens": 10}], load_policy("round-robin"))
    _, b = simulate(TWO_WORKERS, [{"at_ms": 0, "output_tokens": 10}],
                    load_policy("least-loaded"))
    a["policy"], b["policy"] = "round-robin", "least-loaded"
    lines = render_table([a, b]).splitlines()
    assert lines[0].split() == ["round-robin", "least-loaded"]
    assert any(line.split()[:2] == ["completed", "1"] for line in lines)


# --- inputs ---------------------------------------------------------------------------


def test_bad_trace_lines_name_the_line_and_field():
    with pytest.raises(TraceError, match=r"^t.jsonl:2: max_tokens: .*greater than or equal"):
        parse_trace(['{"at_ms": 0}', '{"at_ms": 1, "max_tokens": -5}'], "t.jsonl")
    with pytest.raises(TraceError, match=r"^t.jsonl:1: deadline: unknown field \(did you mean "
                                         r"deadline_ms\?\)"):
        parse_trace(['{"at_ms": 0, "deadline": 5}'], "t.jsonl")
    with pytest.raises(TraceError, match=r"^t.jsonl:3:10: invalid JSON"):
        parse_trace(['{"at_ms": 0}', "", '{"at_ms" 1}'], "t.jsonl")
    with pytest.raises(TraceError, match=r"^t.jsonl:1: at_ms: required"):
        parse_trace(['{"id": "x"}'], "t.jsonl")
    with pytest.raises(TraceError, match=r"^t.jsonl:2: id: 'x' is already the id of line 1"):
        parse_trace(['{"at_ms": 0, "id": "x"}', '{"at_ms": 1, "id": "x"}'], "t.jsonl")
    with pytest.raises(TraceError, match=r"output_tokens: 9 is more than max_tokens \(8\)"):
        parse_trace(['{"at_ms": 0, "max_tokens": 8, "output_tokens": 9}'], "t.jsonl")
    with pytest.raises(TraceError, match=r"^t.jsonl:1: user.geo.latitude: "):
        parse_trace(['{"at_ms": 0, "user": {"geo": {"latitude": 95}}}'], "t.jsonl")
    with pytest.raises(TraceError, match=r"^t.jsonl:1: each line must be a JSON object"):
        parse_trace(["[1, 2]"], "t.jsonl")


def test_trace_defaults_and_order():
    jobs = parse_trace(['{"at_ms": 20, "max_tokens": 64}', '{"at_ms": 10, "type": "embedding"}'])
    assert [(j.id, j.at_ms, j.output_tokens) for j in jobs] == [("job-2", 10, 0),
                                                                 ("job-1", 20, 64)]
    assert jobs[0].fields["endpoint"] == "embeddings"


def test_bad_cluster_files_name_the_line_and_field():
    with pytest.raises(ClusterError, match=r"^c.yaml:3:5: workers\[1\].ttft_ms \(worker 'b'\): "
                                           r"required$"):
        parse_cluster("workers:\n  - {id: a, ttft_ms: 1, tokens_per_sec: 1}\n"
                      "  - {id: b, tokens_per_sec: 1}\n", "c.yaml")
    with pytest.raises(ClusterError, match=r"^c.yaml:4:5: workers\[0\].sloots \(worker 'a'\): "
                                           r"unknown key$"):
        parse_cluster("workers:\n  - id: a\n    ttft_ms: 1\n    sloots: 2\n"
                      "    tokens_per_sec: 1\n", "c.yaml")
    with pytest.raises(ClusterError, match=r"^c.yaml:2:41: workers\[0\].tokens_per_sec "
                                           r"\(worker 'a'\): Input should be greater than 0"):
        parse_cluster("workers:\n  - {id: a, ttft_ms: 1, tokens_per_sec: 0}\n", "c.yaml")
    with pytest.raises(ClusterError, match=r"the id 'a' is given twice"):
        parse_cluster("workers:\n  - {id: a, ttft_ms: 1, tokens_per_sec: 1}\n"
                      "  - {id: a, ttft_ms: 1, tokens_per_sec: 1}\n", "c.yaml")
    with pytest.raises(ClusterError, match=r"^c.yaml:1:1: workers: required"):
        parse_cluster("network: {}\n", "c.yaml")
    with pytest.raises(ClusterError, match=r"^c.yaml:3:1: invalid YAML"):
        parse_cluster("workers:\n  - {id: a\n", "c.yaml")


def test_policies_by_file_baseline_or_template(tmp_path):
    assert baseline_names() == ["least-loaded", "round-robin"]
    assert load_policy("round-robin").name == "baseline:round-robin"
    assert load_policy("cost-optimizer").name == "template:cost-optimizer"
    assert load_policy("home-rules").format == "yaml"
    mine = tmp_path / "round-robin"
    mine.write_text("fn schedule_job(job, pools, workers) { workers.last() }")
    assert load_policy(str(mine)).name == str(mine)
    with pytest.raises(PolicyNotFound, match="baselines: least-loaded, round-robin"):
        load_policy("no-such-policy")
