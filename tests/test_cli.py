"""The rbee command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEMPLATES = ROOT / "python" / "rbee" / "templates"


def rbee(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rbee.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def test_check_accepts_a_template():
    result = rbee("policy", "check", str(TEMPLATES / "home.rhai"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok")


def test_check_reports_file_line_column(tmp_path):
    bad = tmp_path / "bad.rhai"
    bad.write_text("fn schedule_job(job, pools, workers) {\n    let x = ;\n}\n")
    result = rbee("policy", "check", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}:2:13: Unexpected ';'"
    assert "Traceback" not in result.stderr


def test_check_refuses_eval_with_a_clear_message(tmp_path):
    bad = tmp_path / "eval.rhai"
    bad.write_text('fn schedule_job(job, pools, workers) { eval("workers.first()") }\n')
    result = rbee("policy", "check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:1:" in result.stderr
    assert "'eval' is not allowed" in result.stderr


def test_check_missing_file():
    result = rbee("policy", "check", "/nonexistent/policy.rhai")
    assert result.returncode == 1
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_without_schedule_job(tmp_path):
    bad = tmp_path / "empty.rhai"
    bad.write_text("fn helper() { 1 }\n")
    result = rbee("policy", "check", str(bad))
    assert result.returncode == 1
    assert "does not define fn schedule_job" in result.stderr


def test_decide_one_job_prints_the_decision():
    result = rbee(
        "policy", "decide", str(TEMPLATES / "home.rhai"),
        "--state", str(EXAMPLES / "state.json"), "--job", str(EXAMPLES / "job.json"),
    )
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["kind"] == "dispatch"
    assert decision["worker_id"] == "workstation-llama70b"
    for key in ("reason", "status", "retry_after_ms", "actions", "logs", "elapsed_us",
                "operations", "fallback"):
        assert key in decision


def test_decide_many_jobs_one_line_each():
    result = rbee(
        "policy", "decide", str(TEMPLATES / "home.rhai"),
        "--state", str(EXAMPLES / "state.json"), "--jobs", str(EXAMPLES / "jobs.jsonl"),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["worker_id"] for d in lines] == [
        "workstation-llama70b", "desktop-sdxl", "laptop-llama8b", "laptop-llama8b",
    ]


def test_decide_malformed_json_names_file_and_line(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "model": "m"}\n{"id": "b", "model": \n')
    result = rbee(
        "policy", "decide", str(TEMPLATES / "home.rhai"),
        "--state", str(EXAMPLES / "state.json"), "--jobs", str(jobs),
    )
    assert result.returncode == 1
    assert f"{jobs}:2:" in result.stderr
    assert "invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_decide_bad_state_names_the_path(tmp_path):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"workers": [{"id": "w1", "geo": {"lat": {1, 2}.__len__()}},
                                             {"model": "m"}]}))
    result = rbee(
        "policy", "decide", str(TEMPLATES / "home.rhai"),
        "--state", str(state), "--job", str(EXAMPLES / "job.json"),
    )
    assert result.returncode == 1
    assert "state.workers[1]" in result.stderr
    assert "'id'" in result.stderr


def test_decide_policy_error_is_reported_per_job(tmp_path):
    policy = tmp_path / "p.rhai"
    policy.write_text("fn schedule_job(job, pools, workers) {\n    loop { }\n}\n")
    result = rbee(
        "policy", "decide", str(policy), "--limit", "timeout_ms=20",
        "--state", str(EXAMPLES / "state.json"), "--job", str(EXAMPLES / "job.json"),
    )
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] in ("timeout", "too_many_operations")
    assert error["line"] is not None


def test_decide_with_fallback_uses_the_default(tmp_path):
    policy = tmp_path / "p.rhai"
    policy.write_text('fn schedule_job(job, pools, workers) { throw "broken"; }\n')
    result = rbee(
        "policy", "decide", str(policy), "--fallback",
        "--state", str(EXAMPLES / "state.json"), "--job", str(EXAMPLES / "job.json"),
    )
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["worker_id"] == "workstation-llama70b"
    assert decision["fallback"]["used"] == "default"
    assert decision["fallback"]["failures"][0]["code"] == "runtime_error"


def test_decide_needs_exactly_one_job_source():
    result = rbee(
        "policy", "decide", str(TEMPLATES / "home.rhai"), "--state", str(EXAMPLES / "state.json"),
    )
    assert result.returncode == 2
    assert "exactly one of --job and --jobs" in result.stderr


@pytest.mark.parametrize(
    "code, expected",
    [
        ("let x = [1, 2, 3]; x.len()", 3),
        ("#{a: 1, b: [true, ()]}", {"a": 1, "b": [True, None]}),
        ('`sum ${40 + 2}`', "sum 42"),
        ("2.5 * 2", 5.0),
    ],
)
def test_rhai_eval_prints_json(code, expected):
    result = rbee("rhai", "eval", "-e", code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


def test_rhai_eval_file_and_stdin(tmp_path):
    script = tmp_path / "s.rhai"
    script.write_text("fn twice(x) { x * 2 }\ntwice(21)\n")
    assert json.loads(rbee("rhai", "eval", str(script)).stdout) == 42
    assert json.loads(rbee("rhai", "eval", "-", stdin="[1, 2].len()").stdout) == 2


def test_rhai_eval_limit_error_has_position():
    result = rbee("rhai", "eval", "-e", "let x = 1;\nwhile true { x += 1; }", "--limit",
                  "max_operations=1000")
    assert result.returncode == 1
    assert result.stderr.startswith("<expr>:2:")
    assert "max_operations" in result.stderr


def test_unknown_limit_is_refused():
    result = rbee("rhai", "eval", "-e", "1", "--limit", "speed=3")
    assert result.returncode == 1
    assert "unknown limit 'speed'" in result.stderr
