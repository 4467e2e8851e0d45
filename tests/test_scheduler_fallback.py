"""The fallback chain of rbee.scheduler.Scheduler (DESIGN 2.5) and how policy
files and compile errors are reported.

A decision that errors or hits a limit falls back to the last policy that
worked, then to the built-in default: the least loaded available worker that
serves the job's model. In the test cluster (see cluster_fixtures) that is:

- llama-3.1-8b-instruct (or its alias llama3-8b): ams-4090 (.25), par-mac (0,
  40 GiB), sfo-cpu (0, 0 GiB) are ready with a free slot: par-mac;
- sdxl: ams-sdxl is busy, fra-sdxl (.25) and par-rocm-sd (0): par-rocm-sd;
- llama-3.1-70b-instruct: only busy workers serve it, so the job waits.
"""

from __future__ import annotations

import logging

import pytest

from cluster_fixtures import LLAMA_70B, SDXL, cluster, cluster_with, make_job
from rbee.errors import (
    PolicyCompileError,
    PolicyError,
    PolicyReturnError,
    PolicyRuntimeError,
    PolicyTimeout,
    TooManyOperations,
    ValueConversionError,
)
from rbee.scheduler import DEFAULT_POLICY_SOURCE, Policy, Scheduler, State

#: Picks the cheapest worker: sfo-cpu in the test cluster.
CHEAPEST = "workers.min_by(|w| w.cost_per_token)"


def named(body: str, name: str, **kw) -> Policy:
    return Policy.from_source(f"fn schedule_job(job, pools, workers) {{\n{body}\n}}\n",
                              name=name, **kw)


def good() -> Policy:
    return named(CHEAPEST, "cheapest.rhai")


def failing() -> Policy:
    """Fails on line 3 for every job."""
    return named('    log("about to fail");\n    throw "no capacity model";', "broken.rhai")


def failing_for_batch(name: str = "batch-bug.rhai") -> Policy:
    """Works, except for batch jobs, where line 3 calls a missing function."""
    return named('    if job.priority == "batch" {\n        return no_such_helper(job);\n'
                 "    }\n    workers.max_by(|w| w.cost_per_token)", name)


# --- the built-in default ------------------------------------------------------------


def test_default_policy_alone():
    scheduler = Scheduler()
    assert scheduler.active is scheduler.default
    assert scheduler.active.name == "<built-in default>"
    decision = scheduler.decide(make_job(), cluster())
    assert (decision.kind, decision.worker_id) == ("dispatch", "par-mac")
    assert decision.fallback is None
    assert scheduler.fallbacks == {}


@pytest.mark.parametrize("model, expected", [
    ("llama-3.1-8b-instruct", "par-mac"),
    ("llama3-8b", "par-mac"),        # an alias
    (SDXL, "par-rocm-sd"),
    (None, "par-mac"),               # no model: any available worker
])
def test_default_picks_the_least_loaded_available_worker_for_the_model(model, expected):
    default = Policy.from_source(DEFAULT_POLICY_SOURCE)
    assert default.decide(make_job(model=model), cluster()).worker_id == expected


def test_default_skips_full_and_busy_workers():
    # par-mac full (2 of 2): ams-4090 (.25) and sfo-cpu (0): sfo-cpu.
    state = cluster_with(par_mac={"active": 2})
    assert Scheduler().decide(make_job(), state).worker_id == "sfo-cpu"
    # Only busy workers serve the 70b model: wait.
    decision = Scheduler().decide(make_job(model=LLAMA_70B), cluster())
    assert (decision.kind, decision.reason) == ("wait", "no_worker")


# --- falling back ----------------------------------------------------------------------


def test_failing_policy_without_history_falls_back_to_the_default():
    scheduler = Scheduler(failing())
    decision = scheduler.decide(make_job(), cluster())
    assert (decision.kind, decision.worker_id) == ("dispatch", "par-mac")
    assert decision.policy == "<built-in default>"
    fallback = decision.fallback
    assert fallback["used"] == "default"
    assert fallback["policy"] == "<built-in default>"
    [failure] = fallback["failures"]
    assert failure["role"] == "active"
    assert failure["policy"] == "broken.rhai"
    assert failure["code"] == "runtime_error"
    assert failure["line"] == 3
    assert "no capacity model" in failure["message"]
    assert failure["logs"] == ["about to fail"]
    assert scheduler.fallbacks == {"runtime_error": 1}
    # The failing policy stays active and never becomes the last good one.
    assert scheduler.active.name == "broken.rhai"
    assert scheduler.last_good is None


def test_failing_policy_falls_back_to_the_last_policy_that_worked():
    scheduler = Scheduler(good())
    first = scheduler.decide(make_job(), cluster())
    assert (first.worker_id, first.fallback) == ("sfo-cpu", None)
    assert scheduler.last_good.name == "cheapest.rhai"

    scheduler.set_policy(failing())
    decision = scheduler.decide(make_job(), cluster())
    # The last good policy (cheapest: sfo-cpu) decided, not the default (par-mac).
    assert decision.worker_id == "sfo-cpu"
    assert decision.policy == "cheapest.rhai"
    assert decision.fallback["used"] == "last_good"
    assert decision.fallback["policy"] == "cheapest.rhai"
    assert [f["policy"] for f in decision.fallback["failures"]] == ["broken.rhai"]
    assert scheduler.fallbacks == {"runtime_error": 1}
    assert scheduler.active.name == "broken.rhai"
    assert scheduler.last_good.name == "cheapest.rhai"


def test_both_failing_falls_back_to_the_default():
    scheduler = Scheduler(failing_for_batch())
    assert scheduler.decide(make_job(priority="normal"), cluster()).worker_id == "fra-a100x4"
    assert scheduler.last_good.name == "batch-bug.rhai"

    scheduler.set_policy(failing())
    decision = scheduler.decide(make_job(priority="batch"), cluster())
    assert decision.worker_id == "par-mac"
    assert decision.fallback["used"] == "default"
    failures = decision.fallback["failures"]
    assert [(f["role"], f["policy"], f["code"]) for f in failures] == [
        ("active", "broken.rhai", "runtime_error"),
        ("last_good", "batch-bug.rhai", "runtime_error"),
    ]
    assert "no_such_helper" in failures[1]["message"]
    assert failures[1]["line"] == 3
    assert scheduler.fallbacks == {"runtime_error": 2}

    # For other jobs the last good policy still works.
    decision = scheduler.decide(make_job(priority="normal"), cluster())
    assert decision.worker_id == "fra-a100x4"
    assert decision.fallback["used"] == "last_good"
    assert scheduler.fallbacks == {"runtime_error": 3}


def test_fallbacks_are_counted_by_code():
    scheduler = Scheduler(good())
    scheduler.decide(make_job(), cluster())
    policies = [
        named("    loop {}", "spin.rhai", limits={"timeout_ms": 60_000}),
        named("    loop {}", "slow.rhai", limits={"max_operations": 10**12}),
        named("    42", "number.rhai"),
        named('    "no-such-worker"', "ghost.rhai"),
        named("    nope()", "typo.rhai"),
    ]
    for p in policies:
        scheduler.set_policy(p)
        decision = scheduler.decide(make_job(), cluster())
        assert decision.worker_id == "sfo-cpu"
        assert decision.fallback["used"] == "last_good"
    assert scheduler.fallbacks == {
        "too_many_operations": 1, "timeout": 1, "bad_return": 2, "runtime_error": 1,
    }


def test_limit_failures_are_described_in_the_fallback():
    scheduler = Scheduler(named("    loop {}", "spin.rhai", limits={"timeout_ms": 60_000}))
    decision = scheduler.decide(make_job(), cluster())
    assert decision.worker_id == "par-mac"
    [failure] = decision.fallback["failures"]
    assert failure["code"] == "too_many_operations"
    assert failure["message"] == "decision ran more than 1000000 operations (max_operations)"
    assert failure["line"] is not None and failure["column"] is not None


def test_a_timed_out_policy_does_not_hold_the_decision_for_long():
    scheduler = Scheduler(named("    loop {}", "slow.rhai", limits={"max_operations": 10**12}))
    decision = scheduler.decide(make_job(), cluster())
    assert decision.worker_id == "par-mac"
    assert decision.fallback["failures"][0]["code"] == "timeout"
    assert scheduler.fallbacks == {"timeout": 1}


def test_wrong_return_values_fall_back():
    scheduler = Scheduler(named('    all_workers.by_id("ams-h100x8")', "down.rhai"))
    decision = scheduler.decide(make_job(), cluster())
    assert decision.worker_id == "par-mac"
    [failure] = decision.fallback["failures"]
    assert failure["code"] == "bad_return"
    assert "ams-h100x8" in failure["message"]
    assert failure["line"] is None


def test_a_policy_that_recovers_becomes_the_last_good_one():
    scheduler = Scheduler(good())
    scheduler.decide(make_job(), cluster())
    flaky = failing_for_batch("flaky.rhai")
    scheduler.set_policy(flaky)
    # Batch: flaky fails, cheapest (last good) decides.
    assert scheduler.decide(make_job(priority="batch"), cluster()).worker_id == "sfo-cpu"
    assert scheduler.last_good.name == "cheapest.rhai"
    # Normal: flaky works and becomes the last good policy.
    decision = scheduler.decide(make_job(priority="normal"), cluster())
    assert (decision.worker_id, decision.fallback) == ("fra-a100x4", None)
    assert scheduler.last_good is flaky
    # Batch again: flaky is both active and last good, so the default decides.
    decision = scheduler.decide(make_job(priority="batch"), cluster())
    assert decision.worker_id == "par-mac"
    assert [f["role"] for f in decision.fallback["failures"]] == ["active"]


def test_the_default_is_never_the_last_good_policy():
    scheduler = Scheduler(failing())
    for _ in range(3):
        assert scheduler.decide(make_job(), cluster()).worker_id == "par-mac"
    assert scheduler.last_good is None
    assert scheduler.fallbacks == {"runtime_error": 3}


def test_rejects_and_waits_are_decisions_not_failures():
    scheduler = Scheduler(named('    reject("capacity")', "full.rhai"))
    decision = scheduler.decide(make_job(), cluster())
    assert (decision.kind, decision.reason, decision.status) == ("reject", "capacity", 429)
    assert decision.fallback is None
    scheduler.set_policy(named("    ()", "idle.rhai"))
    decision = scheduler.decide(make_job(), cluster())
    assert (decision.kind, decision.reason) == ("wait", "no_worker")
    assert decision.fallback is None
    assert scheduler.fallbacks == {}
    assert scheduler.last_good.name == "idle.rhai"


def test_fallback_works_with_a_converted_state():
    state = State(cluster())
    scheduler = Scheduler(failing())
    assert scheduler.decide(make_job(), state).worker_id == "par-mac"
    state.remove_worker("par-mac")
    assert scheduler.decide(make_job(), state).worker_id == "sfo-cpu"
    assert scheduler.fallbacks == {"runtime_error": 2}


def test_bad_state_is_not_a_policy_failure():
    scheduler = Scheduler(good())
    with pytest.raises(ValueConversionError):
        scheduler.decide(make_job(), {"workers": [{"id": "w1"}], "clusters": []})
    assert scheduler.fallbacks == {}


def test_fallback_is_logged(caplog):
    scheduler = Scheduler(failing())
    with caplog.at_level(logging.WARNING, logger="rbee.scheduler"):
        scheduler.decide(make_job(), cluster())
    [record] = [r for r in caplog.records if r.name == "rbee.scheduler"]
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "broken.rhai" in text and "runtime_error" in text and "broken.rhai:3:" in text


def test_scheduler_limits_apply_to_the_default():
    scheduler = Scheduler(limits={"max_operations": 1})
    assert scheduler.default.limits["max_operations"] == 1
    with pytest.raises(TooManyOperations):
        scheduler.decide(make_job(), cluster())


def test_to_dict_carries_the_fallback():
    decision = Scheduler(failing()).decide(make_job(), cluster())
    d = decision.to_dict()
    assert d["kind"] == "dispatch" and d["worker_id"] == "par-mac"
    assert d["policy"] == "<built-in default>"
    assert d["fallback"]["used"] == "default"
    assert d["fallback"]["failures"][0]["code"] == "runtime_error"


# --- compile errors never replace the active policy ----------------------------------


BROKEN_SOURCES = [
    ("fn schedule_job(job, pools, workers) {\n    let x = ;\n}\n", 2, 13),
    ("fn schedule_job(job, pools, workers) {\n    workers.first(\n}\n", 3, 1),
    ("fn schedule_job(job, pools, workers) {\n    eval(\"1\")\n}\n", 2, 5),
    ("fn pick(w) { w }\n", 1, 1),
    ("fn schedule_job(a, b, c, d) { a }\n", 1, 1),
]


@pytest.mark.parametrize("source, line, column", BROKEN_SOURCES)
def test_compile_error_never_replaces_the_active_policy(source, line, column):
    scheduler = Scheduler(good())
    scheduler.decide(make_job(), cluster())
    with pytest.raises(PolicyCompileError) as info:
        scheduler.set_policy(Policy.from_source(source, name="new.rhai"))
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert err.file == "new.rhai"
    assert str(err) == f"new.rhai:{line}:{column}: {err.message}"
    assert err.to_dict() == {"type": "policy_error", "code": "compile_error",
                             "message": err.message, "line": line, "column": column}
    assert scheduler.active.name == "cheapest.rhai"
    decision = scheduler.decide(make_job(), cluster())
    assert (decision.worker_id, decision.fallback) == ("sfo-cpu", None)


def test_compile_error_messages():
    cases = {
        "fn pick(w) { w }\n": "does not define fn schedule_job(job, pools, workers)",
        "fn schedule_job(a, b, c, d) { a }\n": "schedule_job takes 4 parameters",
    }
    for source, text in cases.items():
        with pytest.raises(PolicyCompileError, match=r"\(job, pools, workers\)") as info:
            Policy.from_source(source)
        assert text in info.value.message
        assert str(info.value).startswith("<policy>:1:1: ")


def test_compile_errors_are_policy_errors_not_runtime_errors():
    with pytest.raises(PolicyError) as info:
        Policy.from_source("fn schedule_job(job, pools, workers) { }}")
    assert type(info.value) is PolicyCompileError
    assert not isinstance(info.value, PolicyRuntimeError)
    assert info.value.code == "compile_error"


# --- policy files --------------------------------------------------------------------


def test_from_file_names_errors_after_the_file(tmp_path):
    path = tmp_path / "scheduler.rhai"
    path.write_text("// my policy\nfn schedule_job(job, pools, workers) {\n"
                    "    workers.least_loaded(\n}\n", encoding="utf-8")
    with pytest.raises(PolicyCompileError) as info:
        Policy.from_file(path)
    err = info.value
    assert err.file == str(path)
    assert (err.line, err.column) == (4, 1)
    assert str(err) == f"{path}:4:1: {err.message}"


def test_from_file_loads_a_working_policy(tmp_path):
    path = tmp_path / "cheap.rhai"
    path.write_text(f"fn schedule_job(job, pools, workers) {{ {CHEAPEST} }}\n",
                    encoding="utf-8")
    loaded = Policy.from_file(path, limits={"timeout_ms": 20})
    assert loaded.name == str(path)
    assert loaded.limits["timeout_ms"] == 20
    decision = loaded.decide(make_job(), cluster())
    assert (decision.worker_id, decision.policy) == ("sfo-cpu", str(path))


def test_runtime_errors_name_the_policy_file(tmp_path):
    path = tmp_path / "oops.rhai"
    path.write_text("fn schedule_job(job, pools, workers) {\n    nope(job)\n}\n",
                    encoding="utf-8")
    with pytest.raises(PolicyRuntimeError) as info:
        Policy.from_file(path).decide(make_job(), cluster())
    assert info.value.line == 2
    assert str(info.value).startswith(f"{path}:2:")


def test_from_file_with_a_missing_file(tmp_path):
    path = tmp_path / "missing.rhai"
    with pytest.raises(PolicyCompileError) as info:
        Policy.from_file(path)
    err = info.value
    assert err.file == str(path)
    assert err.message == "no such file"
    assert (err.line, err.column) == (None, None)
    assert str(err) == f"{path}: no such file"


def test_from_file_with_a_directory_or_binary_file(tmp_path):
    with pytest.raises(PolicyCompileError, match="cannot read the file") as info:
        Policy.from_file(tmp_path)
    assert info.value.file == str(tmp_path)
    binary = tmp_path / "blob.rhai"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PolicyCompileError, match="cannot read the file"):
        Policy.from_file(binary)


def test_a_missing_file_never_replaces_the_active_policy(tmp_path):
    scheduler = Scheduler(good())
    with pytest.raises(PolicyCompileError):
        scheduler.set_policy(Policy.from_file(tmp_path / "typo.rhai"))
    assert scheduler.active.name == "cheapest.rhai"


def test_runtime_error_classes():
    with pytest.raises(PolicyReturnError):
        named("    42", "n.rhai").decide(make_job(), cluster())
    with pytest.raises(PolicyTimeout):
        named("    loop {}", "t.rhai", limits={"max_operations": 10**12}).decide(
            make_job(), cluster())
