"""Replay diff: `rbee policy diff` run as a real subprocess on recorded
traces (plain jobs and decision records), and the queen's preview replay of
its decision log over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rbee.queen.jobs import Job
from rbee.scheduler import Policy, State
from queen_harness import QueenHarness

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "python" / "rbee" / "templates"
EIGHT_B, SEVENTY_B = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"

STATE = {"workers": [
    {"id": "a-cheap", "models": [EIGHT_B], "cost_per_token": 1e-7, "latency_ms": 200,
     "tokens_per_sec": 40, "slots": 2, "status": "ready"},
    {"id": "b-fast", "models": [EIGHT_B], "cost_per_token": 5e-7, "latency_ms": 50,
     "tokens_per_sec": 120, "slots": 2, "status": "ready"},
    {"id": "big", "models": [SEVENTY_B], "gpus": 2, "cost_per_token": 9e-7, "latency_ms": 300,
     "tokens_per_sec": 20, "slots": 1, "status": "ready"},
]}

CHEAPEST = """\
fn schedule_job(job, pools, workers) {
    workers.with_model(job.model).min_by(|w| w.cost_per_token)
}
"""

RULES = """\
rules:
  - name: No 70b for now
    condition: {model_contains: 70b}
    action: {reject: capacity}
  - name: Interactive to the fastest
    condition: {priority: interactive}
    action: {select: workers.with_model(job.model).min_by(latency_ms)}
  - name: Cheapest
    condition: true
    action: {select: workers.with_model(job.model).min_by(cost_per_token)}
"""

ROUND_ROBIN = """\
fn schedule_job(job, pools, workers) { workers.with_model(job.model).round_robin() }
"""

# Waits while now() is before 1,000,000 ms: tells which clock a replay used.
CLOCKED = """\
fn schedule_job(job, pools, workers) {
    if now() < 1000000 { return wait("too_early", 500); }
    workers.with_model(job.model).min_by(|w| w.cost_per_token)
}
"""

JOBS = [
    {"id": "j1", "model": EIGHT_B, "priority": "normal", "at_ms": 0, "output_tokens": 30,
     "prompt_tokens": 12},
    {"id": "j2", "model": EIGHT_B, "priority": "interactive", "at_ms": 40},
    {"id": "j3", "model": SEVENTY_B, "priority": "normal", "at_ms": 90},
    {"id": "j4", "model": "no-such-model", "at_ms": 100},
    {"id": "j5", "model": EIGHT_B, "priority": "batch", "at_ms": 130},
]


def rbee(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rbee.cli", *args], capture_output=True,
                            text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    (tmp_path / "old.rhai").write_text(CHEAPEST)
    (tmp_path / "new.yaml").write_text(RULES)
    (tmp_path / "state.json").write_text(json.dumps(STATE))
    trace = tmp_path / "trace.jsonl"
    # A blank line is skipped but still counts for the line numbers.
    trace.write_text("".join(json.dumps(job) + "\n" + ("\n" if i == 1 else "")
                             for i, job in enumerate(JOBS)))
    return {name: tmp_path / name for name in ("old.rhai", "new.yaml", "state.json",
                                                "trace.jsonl")}


def diff(files: dict[str, Path], *extra: str, old: str | None = None,
         new: str | None = None) -> subprocess.CompletedProcess:
    return rbee("policy", "diff", old or str(files["old.rhai"]), new or str(files["new.yaml"]),
                "--trace", str(files["trace.jsonl"]), "--state", str(files["state.json"]),
                *extra)


# --- the command line ----------------------------------------------------------------


def test_lists_the_changed_jobs_with_both_decisions(files):
    result = diff(files)
    assert result.returncode == 1, result.stderr
    trace, old, new = files["trace.jsonl"], files["old.rhai"], files["new.yaml"]
    assert result.stdout.splitlines() == [
        f"{trace}:2  j2  worker a-cheap -> worker b-fast",
        f"{trace}:4  j3  worker big -> reject capacity (429)",
        f"5 jobs replayed ({old} -> {new}): 2 changed (40.0%)",
        "  worker a-cheap -> worker b-fast: 1",
        "  worker big -> reject capacity (429): 1",
    ]


def test_json_report_and_max_changes(files):
    result = diff(files, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert (report["jobs"], report["changed"], report["listed"]) == (5, 2, 2)
    assert [(c["line"], c["job_id"]) for c in report["changes"]] == [(2, "j2"), (4, "j3")]
    first, second = report["changes"]
    assert (first["old"]["kind"], first["old"]["worker_id"]) == ("dispatch", "a-cheap")
    assert (first["new"]["kind"], first["new"]["worker_id"]) == ("dispatch", "b-fast")
    assert (second["old"]["kind"], second["old"]["worker_id"]) == ("dispatch", "big")
    assert (second["new"]["kind"], second["new"]["reason"], second["new"]["status"]) == \
        ("reject", "capacity", 429)
    assert "recorded" not in first  # plain jobs carry no recorded decision
    assert report["transitions"] == [
        {"from": "worker a-cheap", "to": "worker b-fast", "count": 1},
        {"from": "worker big", "to": "reject capacity (429)", "count": 1}]

    capped = json.loads(diff(files, "--json", "--max-changes", "1").stdout)
    assert (capped["changed"], capped["listed"]) == (2, 1)
    assert [c["job_id"] for c in capped["changes"]] == ["j2"]
    text = diff(files, "--max-changes", "0").stdout.splitlines()
    assert text[0] == "... and 2 more changed jobs (not listed: --max-changes)"
    assert text[1].endswith("2 changed (40.0%)")


def test_no_change_exits_0_and_each_policy_keeps_its_own_rotation(files, tmp_path):
    same = diff(files, new=str(files["old.rhai"]))
    assert same.returncode == 0, same.stderr
    assert same.stdout.strip().endswith("5 jobs replayed "
                                        f"({files['old.rhai']} -> {files['old.rhai']}): "
                                        "no decision changed")
    # Were the rotation shared, the copy would see every other position.
    first, second = tmp_path / "rr.rhai", tmp_path / "rr-copy.rhai"
    first.write_text(ROUND_ROBIN)
    second.write_text(ROUND_ROBIN)
    trace = write_jsonl(tmp_path / "many.jsonl",
                        [{"id": f"r{i}", "model": EIGHT_B} for i in range(6)])
    result = rbee("policy", "diff", str(first), str(second), "--trace", str(trace),
                  "--state", str(files["state.json"]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changed"] == 0
    # The rotation does run: against the cheapest policy, every other job moves.
    against = rbee("policy", "diff", str(files["old.rhai"]), str(first), "--trace", str(trace),
                   "--state", str(files["state.json"]), "--json")
    assert [c["job_id"] for c in json.loads(against.stdout)["changes"]] == ["r1", "r3", "r5"]


DEADLINE_FIRST = """\
fn schedule_job(job, pools, workers) {
    if job.at_ms != () || job.output_tokens != () || job.timeout_ms != () {
        return reject("simulator_fields_leaked");
    }
    if job.deadline != () && job.deadline < 1000 { return reject("capacity"); }
    workers.with_model(job.model).min_by(|w| w.cost_per_token)
}
"""


def test_simulator_traces_replay_in_arrival_order(files, tmp_path):
    trace = write_jsonl(tmp_path / "sim.jsonl", [
        {"at_ms": 30, "model": EIGHT_B, "deadline_ms": 500},
        {"at_ms": 10.5, "id": "early", "model": EIGHT_B, "timeout_ms": 1000,
         "output_tokens": 5, "max_tokens": 8},
        {"at_ms": 20, "id": "mid", "model": EIGHT_B, "deadline_ms": 5000},
    ])
    (tmp_path / "rr.rhai").write_text(ROUND_ROBIN)
    (tmp_path / "deadline.rhai").write_text(DEADLINE_FIRST)
    result = rbee("policy", "diff", str(tmp_path / "rr.rhai"), str(tmp_path / "deadline.rhai"),
                  "--trace", str(trace), "--state", str(files["state.json"]))
    assert result.returncode == 1, result.stderr
    # Round robin ran early, mid, job-1 (in file order job-1 and early would change).
    assert result.stdout.splitlines()[:2] == [
        f"{trace}:3  mid  worker b-fast -> worker a-cheap",
        f"{trace}:1  job-1  worker a-cheap -> reject capacity (429)",
    ]


def record(job: Job, at: int, policy: Policy, state: State) -> dict:
    """A decision record as the queen logs it (core.Queen._decide)."""
    script_job = job.to_script(at)
    return {"at": at, "job_id": job.id, "policy_version": 7,
            **policy.decide(script_job, state, now_ms=at).to_dict(), "job": script_job}


def test_decision_records_replay_at_their_own_time(files, tmp_path):
    state = State(STATE)
    recorder = Policy.from_source(ROUND_ROBIN)
    jobs = [Job(endpoint="chat.completions", model=EIGHT_B, id=f"d{i}",
                created_at=900 + i, max_tokens=16) for i in range(3)]
    records = [record(job, 1000 + i, recorder, state) for i, job in enumerate(jobs)]
    trace = write_jsonl(tmp_path / "decisions.jsonl", records)
    clocked = tmp_path / "clocked.rhai"
    clocked.write_text(CLOCKED)

    result = rbee("policy", "diff", str(files["old.rhai"]), str(clocked), "--trace", str(trace),
                  "--state", str(files["state.json"]), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [c["job_id"] for c in report["changes"]] == ["d0", "d1", "d2"]
    change = report["changes"][1]
    assert change["old"]["worker_id"] == "a-cheap"
    assert (change["new"]["kind"], change["new"]["reason"],
            change["new"]["retry_after_ms"]) == ("wait", "too_early", 500)
    # The decision as it was recorded is shown for reference.
    assert (change["recorded"]["worker_id"], change["recorded"]["policy_version"]) == \
        ("b-fast", 7)
    assert report["transitions"] == [
        {"from": "worker a-cheap", "to": "wait too_early (500 ms)", "count": 3}]

    # Plain jobs have no time of their own: the replay's start is now().
    plain = rbee("policy", "diff", str(files["old.rhai"]), str(clocked), "--trace",
                 str(files["trace.jsonl"]), "--state", str(files["state.json"]))
    assert plain.returncode == 0, plain.stdout
    fixed = rbee("policy", "diff", str(files["old.rhai"]), str(clocked), "--trace",
                 str(files["trace.jsonl"]), "--state", str(files["state.json"]),
                 "--now-ms", "5", "--json")
    assert json.loads(fixed.stdout)["changed"] == len(JOBS)


def test_records_may_carry_their_own_state(files, tmp_path):
    small = {"workers": [STATE["workers"][1]]}
    lines = [{"job": {"id": "s1", "model": EIGHT_B}, "state": small},
             {"job": {"id": "s2", "model": EIGHT_B}, "state": STATE}]
    trace = write_jsonl(tmp_path / "own.jsonl", lines)
    result = rbee("policy", "diff", str(files["old.rhai"]), str(files["new.yaml"]),
                  "--trace", str(trace))
    assert result.returncode == 0, result.stderr + result.stdout
    flip = tmp_path / "dearest.rhai"
    flip.write_text(CHEAPEST.replace("min_by", "max_by"))
    flipped = rbee("policy", "diff", str(files["old.rhai"]), str(flip), "--trace", str(trace),
                   "--json")
    assert [c["job_id"] for c in json.loads(flipped.stdout)["changes"]] == ["s2"]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*lines, {"id": "s3", "model": EIGHT_B}])
    missing = rbee("policy", "diff", str(files["old.rhai"]), str(flip), "--trace", str(mixed))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"{mixed}:3: this job has no state: give --state FILE "
                                      "(JSON or YAML), or a \"state\" on every line of the trace")


def test_template_names_are_policies_too(files):
    result = diff(files, "--json", old="cost-optimizer", new="latency-optimizer.rhai")
    report = json.loads(result.stdout)
    assert report["old"] == "template cost-optimizer.rhai"
    cost = Policy.from_file(TEMPLATES / "cost-optimizer.rhai")
    latency = Policy.from_file(TEMPLATES / "latency-optimizer.rhai")
    state, now = State(STATE), 1_700_000_000_000
    expected = []
    for job in JOBS:
        job = {k: v for k, v in job.items() if k not in ("at_ms", "output_tokens")}
        try:
            before = cost.decide(job, state, now_ms=now).kind
        except Exception:
            before = "error"
        try:
            after = latency.decide(job, state, now_ms=now).kind
        except Exception:
            after = "error"
        expected.append((before, after))
    changed = [c["job_id"] for c in report["changes"]]
    assert changed == [j["id"] for j, (a, b) in zip(JOBS, expected) if a != b] and changed
    assert result.returncode == 1


@pytest.mark.parametrize("line, message", [
    ('{"id": "x", "model": ', "invalid JSON: Expecting value"),
    ('[1, 2]', "expected a JSON object (a job or a decision record), got list"),
    ('{"job": "x"}', "'job' must be an object (the job as the policy saw it), got str"),
    ('{"job": {"id": "x"}, "at": "noon"}', "'at' must be the decision time in ms"),
    ('{"job": {"id": "x"}, "state": [1]}', "'state' must be an object, got list"),
    ('{"job": {"id": "x"}, "state": {"workers": 3}}', "the line's state is invalid"),
    ('{"id": "x", "max_tokens": 100000000000000000000000}', "invalid job: job.max_tokens"),
    ('{"id": "x", "at_ms": -1}', "'at_ms' must be the arrival in ms (a number >= 0), got -1"),
    ('{"id": "x", "deadline_ms": "soon"}', "'deadline_ms' must be ms from arrival"),
])
def test_bad_trace_lines_name_file_and_line(files, line, message):
    trace = files["trace.jsonl"]
    trace.write_text(json.dumps(JOBS[0]) + "\n\n" + line + "\n")
    result = diff(files)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{trace}:3:"), result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_bad_inputs_exit_2(files, tmp_path):
    bad = tmp_path / "bad.rhai"
    bad.write_text("fn schedule_job(job, pools, workers) {\n    let x = ;\n}\n")
    result = diff(files, new=str(bad))
    assert (result.returncode, result.stderr.strip()) == (2, f"{bad}:2:13: Unexpected ';'")
    result = diff(files, old="no-such-policy")
    assert result.returncode == 2
    assert result.stderr.strip() == ("no-such-policy: no such file, and no template of that "
                                     "name (rbee templates list)")
    files["state.json"].write_text('{"workers": [}')
    result = diff(files)
    assert result.returncode == 2 and result.stderr.startswith(f"{files['state.json']}:1:")
    files["state.json"].write_text(json.dumps(STATE))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = rbee("policy", "diff", str(files["old.rhai"]), str(files["new.yaml"]), "--trace",
                  str(empty), "--state", str(files["state.json"]))
    assert (result.returncode, result.stderr.strip()) == (2, f"{empty}: no jobs in the trace")
    result = rbee("policy", "diff", str(files["old.rhai"]), str(files["new.yaml"]), "--trace",
                  str(tmp_path / "none.jsonl"), "--state", str(files["state.json"]))
    assert (result.returncode, result.stderr.strip()) == \
        (2, f"{tmp_path / 'none.jsonl'}: no such file")
    result = diff(files, "--limit", "nonsense=1")
    assert result.returncode == 2 and result.stderr.startswith("--limit")
    assert rbee("policy", "diff", str(files["old.rhai"])).returncode == 2  # click usage


def test_policy_errors_are_outcomes_with_their_place(files, tmp_path):
    failing = tmp_path / "failing.rhai"
    failing.write_text('fn schedule_job(job, pools, workers) {\n'
                       '    if job.priority == "batch" { throw "no batch" }\n'
                       '    workers.with_model(job.model).min_by(|w| w.cost_per_token)\n}\n')
    result = diff(files, new=str(failing))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"{files['trace.jsonl']}:6  j5  worker a-cheap -> error runtime_error"
    assert lines[1].startswith(f"    {failing}:2:") and "no batch" in lines[1]
    assert lines[-1] == "  worker a-cheap -> error runtime_error: 1"


# --- the queen: preview replay of the decision log --------------------------------------

QUEEN_WORKERS = [
    {"id": "big-box", "models": [SEVENTY_B], "gpus": 2, "slots": 2, "cost_per_token": 9e-7},
    {"id": "cheap", "models": [EIGHT_B], "gpus": 1, "slots": 2, "cost_per_token": 1e-7},
    {"id": "pricey", "models": [EIGHT_B], "gpus": 1, "slots": 4, "cost_per_token": 5e-7},
]

CANDIDATE = """\
fn schedule_job(job, pools, workers) {
    if job.model.contains("70b") { return reject("capacity"); }
    workers.with_model(job.model).min_by(|w| w.cost_per_token)
}
"""


@pytest.fixture
def harness(tmp_path):
    h = QueenHarness(tmp_path, QUEEN_WORKERS).start()
    yield h
    h.close()


def chat(h: QueenHarness, model: str) -> str:
    raw = h.openai().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    return raw.headers["x-rbee-worker"]


def recorded_traffic(h: QueenHarness) -> list[str]:
    with h.http() as http:
        assert http.put("/v1/scheduler", json={"source": ROUND_ROBIN}).status_code == 200
    return [chat(h, m) for m in (EIGHT_B, EIGHT_B, EIGHT_B, SEVENTY_B)]


def test_preview_replays_the_last_recorded_decisions(harness):
    assert recorded_traffic(harness) == ["cheap", "pricey", "cheap", "big-box"]
    job_ids = [d["job_id"] for d in harness.queen.decisions]
    with harness.http() as http:
        answer = http.post("/v1/scheduler/preview", json={"source": CANDIDATE, "replay": 4})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [(d["kind"], d["worker_id"] or d["reason"]) for d in body["decisions"]] == [
            ("dispatch", "cheap"), ("dispatch", "cheap"), ("dispatch", "cheap"),
            ("reject", "capacity")]
        replay = body["replay"]
        assert (replay["jobs"], replay["changed"]) == (4, 2)
        second, last = replay["changes"]
        assert second["job_id"] == job_ids[1]
        assert (second["recorded"]["worker_id"], second["active"]["worker_id"],
                second["candidate"]["worker_id"]) == ("pricey", "pricey", "cheap")
        assert second["recorded"]["policy_version"] == 2
        assert last["job_id"] == job_ids[3]
        assert (last["recorded"]["worker_id"], last["active"]["worker_id"]) == \
            ("big-box", "big-box")
        assert (last["candidate"]["kind"], last["candidate"]["reason"]) == ("reject", "capacity")

        # The last two only: the active policy's fresh rotation starts over.
        tail = http.post("/v1/scheduler/preview", json={"source": CANDIDATE, "replay": 2}).json()
        assert (tail["replay"]["jobs"], tail["replay"]["changed"]) == (2, 1)
        assert tail["replay"]["changes"][0]["job_id"] == job_ids[3]
        everything = http.post("/v1/scheduler/preview",
                               json={"source": CANDIDATE, "format": "rhai", "replay": 1000})
        assert everything.json()["replay"]["jobs"] == 4
        # A given state replaces the live one, as for sample jobs.
        state = http.get("/v1/state").json()
        state["workers"] = [w for w in state["workers"] if w["id"] != "cheap"]
        given = http.post("/v1/scheduler/preview",
                          json={"source": CANDIDATE, "replay": 4, "state": state}).json()
        # Both keep to the one 8b worker left: only the 70b job changes.
        assert [c["job_id"] for c in given["replay"]["changes"]] == [job_ids[3]]
        assert http.get("/v1/scheduler").json()["version"] == 2
    # The live policy's rotation went on as if no replay had happened (three
    # more 8b decisions in it would have made this one cheap), and nothing
    # was added to the log.
    assert len(harness.queen.decisions) == 4
    assert chat(harness, EIGHT_B) == "pricey"


FIRST_THAT_SERVES = """\
fn schedule_job(job, pools, workers) {
    let able = workers.filter(|w| w.models.contains(job.model));
    if able.is_empty() { return (); }
    able[0]
}
"""


def test_each_decision_is_replayed_on_the_state_it_saw(harness):
    """`cheap` leaves between the two requests and comes back: on the live
    state both jobs would go to `cheap`, on the recorded states the second
    goes to `pricey`, as it did."""
    with harness.http() as http:
        assert http.put("/v1/scheduler", json={"source": FIRST_THAT_SERVES}).status_code == 200
        assert chat(harness, EIGHT_B) == "cheap"
        assert http.delete("/v1/workers/cheap").status_code == 200
        assert chat(harness, EIGHT_B) == "pricey"
        spec = next(w for w in QUEEN_WORKERS if w["id"] == "cheap")
        back = http.post("/v1/workers", json={**spec, "url": harness.fakes["cheap"].url})
        assert back.status_code == 201, back.text

        body = http.post("/v1/scheduler/preview",
                         json={"source": FIRST_THAT_SERVES, "replay": 2}).json()
        assert [d["worker_id"] for d in body["decisions"]] == ["cheap", "pricey"]
        assert body["replay"] | {"changes": None} == {
            "jobs": 2, "changed": 0, "on_recorded_state": 2, "on_live_state": 0,
            "changes": None}

        # A candidate that prefers the last able worker differs on the first
        # job only (the second had one able worker), and the active policy's
        # side of the change is what was recorded.
        last = FIRST_THAT_SERVES.replace("able[0]", "able[-1]")
        changes = http.post("/v1/scheduler/preview",
                            json={"source": last, "replay": 2}).json()["replay"]["changes"]
        assert [(c["state"], c["recorded"]["worker_id"], c["active"]["worker_id"],
                 c["candidate"]["worker_id"]) for c in changes] == [
            ("recorded", "cheap", "cheap", "pricey")]

        # A given state replaces the recorded ones.
        state = http.get("/v1/state").json()
        given = http.post("/v1/scheduler/preview", json={
            "source": FIRST_THAT_SERVES, "replay": 2, "state": state}).json()
        assert [d["worker_id"] for d in given["decisions"]] == ["cheap", "cheap"]
        assert given["replay"]["on_live_state"] == 2

    # After a restart the log is read back from the store, without states.
    harness.restart()
    with harness.http() as http:
        again = http.post("/v1/scheduler/preview",
                          json={"source": FIRST_THAT_SERVES, "replay": 2}).json()
    assert [d["worker_id"] for d in again["decisions"]] == ["cheap", "cheap"]
    assert (again["replay"]["on_recorded_state"], again["replay"]["on_live_state"]) == (0, 2)


@pytest.mark.parametrize("body, param", [
    ({"source": CANDIDATE, "replay": 0}, "replay"),
    ({"source": CANDIDATE, "replay": -3}, "replay"),
    ({"source": CANDIDATE, "replay": 1001}, "replay"),
    ({"source": CANDIDATE, "replay": "5"}, "replay"),
    ({"source": CANDIDATE, "replay": True}, "replay"),
    ({"source": CANDIDATE, "replay": 2.5}, "replay"),
    ({"source": CANDIDATE, "replay": None}, "replay"),
    ({"source": CANDIDATE, "replay": 3, "jobs": []}, "replay"),
    ({"replay": 3}, "source"),
    ({"source": CANDIDATE, "replay": 3, "format": "lua"}, "format"),
    ({"source": CANDIDATE, "replay": 3, "state": {"workers": 5}}, "state"),
])
def test_bad_replay_requests_name_the_field(harness, body, param):
    with harness.http() as http:
        response = http.post("/v1/scheduler/preview", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_a_refused_candidate_and_the_jobs_form_still_work(harness):
    recorded_traffic(harness)
    with harness.http() as http:
        refused = http.post("/v1/scheduler/preview",
                            json={"source": "fn schedule_job(job, pools, workers) {\n  let = 1;\n}",
                                  "replay": 3})
        assert refused.status_code == 400
        assert (refused.json()["error"]["type"], refused.json()["error"]["line"]) == \
            ("policy_error", 2)
        jobs = [{"id": "p1", "model": SEVENTY_B}]
        sample = http.post("/v1/scheduler/preview", json={"source": CANDIDATE, "jobs": jobs})
        assert list(sample.json()) == ["decisions"]
        assert [d["reason"] for d in sample.json()["decisions"]] == ["capacity"]


def test_the_cli_diffs_the_exported_decision_log(harness, tmp_path):
    """The documented route: GET /v1/decisions (newest first) reversed into a
    trace, GET /v1/state as the state, and the policy files."""
    recorded_traffic(harness)
    with harness.http() as http:
        records = http.get("/v1/decisions").json()["decisions"]
        state = http.get("/v1/state").json()
        active = http.get("/v1/scheduler").json()["source"]
        preview = http.post("/v1/scheduler/preview",
                            json={"source": CANDIDATE, "replay": 4}).json()["replay"]
    trace = write_jsonl(tmp_path / "log.jsonl", list(reversed(records)))
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "active.rhai").write_text(active)
    (tmp_path / "candidate.rhai").write_text(CANDIDATE)
    result = rbee("policy", "diff", str(tmp_path / "active.rhai"),
                  str(tmp_path / "candidate.rhai"), "--trace", str(trace),
                  "--state", str(tmp_path / "state.json"), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [c["job_id"] for c in report["changes"]] == [c["job_id"] for c in preview["changes"]]
    assert [c["new"] for c in report["changes"]] == [c["candidate"] for c in preview["changes"]]
    assert [c["recorded"] for c in report["changes"]] == \
        [c["recorded"] for c in preview["changes"]]
