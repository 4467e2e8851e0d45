"""The engine's simulator loop (src/simulate/model.rs) against the Python loop it
replaced (tests/sim_reference.py): on generated traffic, with policies that
dispatch, wait with and without timers, reject, and fail into the fallback,
every job must end the same way at the same times.
"""

from __future__ import annotations

import pytest
from sim_reference import Simulation as Reference

from rbee.scheduler import Policy
from rbee.simulate.cluster import parse_cluster
from rbee.simulate.generate import GeneratorSpec, dumps, generate
from rbee.simulate.model import Simulation
from rbee.simulate.policies import load_policy
from rbee.simulate.trace import parse_trace

SITES = [("fra", 50.11, 8.68), ("iad", 39.04, -77.49), ("sin", 1.35, 103.82)]


def cluster(queue: str) -> str:
    lines = [queue, "models:", "  - {id: llama, aliases: [llama-8b]}", "workers:"]
    for i in range(12):
        site, lat, lon = SITES[i % 3]
        lines.append(
            f"  - {{id: {site}-{i}, models: [{'llama' if i % 4 else 'qwen'}], slots: {1 + i % 3}, "
            f"ttft_ms: {50 + 20 * i}, tokens_per_sec: {20 + 7 * i}, "
            f"cost_per_token: {(1 + i % 5) / 1e7}, geo: {{latitude: {lat}, longitude: {lon}}}}}")
    lines.append("  - {id: fixed, models: [llama], slots: 2, ttft_ms: 90, tokens_per_sec: 55, "
                 "network_latency_ms: 3}")
    return "\n".join(lines) + "\n"


# Every kind of answer, and errors (an unknown worker id, an index out of
# bounds) that fall back to the default.
MIXED = """fn schedule_job(job, pools, workers) {
    if job.priority == "batch" && job.wait_ms < 300 { return wait("later", 150); }
    if job.tenant_id == "initech" && job.max_tokens > 400 { return reject("too_big"); }
    if job.id.ends_with("7") && job.wait_ms == 0 { return "no-such-worker"; }
    if job.id.ends_with("3") { return workers[1000]; }
    workers.available().min_by(|w| w.cost_per_token)
}"""


def trace(load: float, seed: int):
    spec = GeneratorSpec(
        jobs=600, seed=seed, rate=12.0 * load, deadline_share=0.5, deadline_ms=(2_000, 20_000),
        models={"text-gen": {"llama": 0.7, "llama-8b": 0.2, "qwen": 0.1}},
        priorities={"interactive": 0.3, "normal": 0.4, "batch": 0.3},
        tenants={"acme": 0.5, "globex": 0.3, "initech": 0.2},
        geo={"amsterdam": 0.5, "new-york": 0.3, "singapore": 0.2},
    )
    return parse_trace([dumps(job) for job in generate(spec)], "<generated>")


def outcome(run) -> tuple:
    jobs = [(j.seq, j.outcome, j.reason, j.worker.id if j.worker else None, j.dispatched,
             j.start, j.first_token, j.end, j.cost, j.decisions, j.net_ms, j.expires,
             j.deadline_at, j.deadline_missed, j.queue_wait) for j in run.jobs]
    workers = [(w.id, w.busy_ms, w.completed) for w in run.workers]
    return (jobs, workers, run.end_ms, run.decisions, run.fallbacks, run.unknown_worker,
            run.model_mismatch, run.actions)


@pytest.mark.parametrize("policy", ["mixed", "cost-optimizer", "least-loaded", "power-of-two",
                                    "sticky-sessions"])
@pytest.mark.parametrize("load,queue", [
    (0.5, "queue: {aging_ms: 10000}"),
    (3.0, "queue: {aging_ms: 700, capacity: 40, default_timeout_ms: 4000}"),
])
def test_the_engine_loop_ends_every_job_as_the_python_loop_did(policy, load, queue):
    spec = parse_cluster(cluster(queue), "<cluster>")
    jobs = trace(load, seed=len(policy))

    def compiled() -> Policy:
        if policy == "mixed":
            return Policy.from_source(MIXED, name="mixed.rhai")
        return load_policy(policy)

    for lookahead in (32, 0):
        engine = Simulation(spec, jobs, compiled(), lookahead=lookahead).run()
        reference = Reference(spec, jobs, compiled(), lookahead=lookahead).run()
        assert outcome(engine) == outcome(reference)
    # The traffic exercised what it is meant to: the mixed policy makes jobs
    # wait (in the overload, until the queue fills or they expire), refuses,
    # and fails into the fallback (an unknown worker id is a failure too).
    if policy == "mixed":
        reasons = {j.reason for j in engine.jobs}
        assert engine.fallbacks["bad_return"] and engine.fallbacks["runtime_error"]
        assert "too_big" in reasons and max(j.decisions for j in engine.jobs) > 1
        if load > 1:
            assert {"queue_full", "timeout", "deadline_exceeded"} <= reasons, reasons
