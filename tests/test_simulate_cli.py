"""``rbee simulate`` and ``rbee simulate generate``, run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CLUSTER = ROOT / "examples" / "simulate" / "cluster.yaml"

CLUSTER = """
workers:
  - {id: cheap, models: [llama], slots: 2, ttft_ms: 300, tokens_per_sec: 30,
     cost_per_token: 0.0000001, geo: {region: EU, latitude: 50.1, longitude: 8.7}}
  - {id: fast, models: [llama], slots: 4, ttft_ms: 100, tokens_per_sec: 120,
     cost_per_token: 0.0000005, geo: {region: US, latitude: 39.0, longitude: -77.5}}
"""


def rbee(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rbee.cli", *args], capture_output=True,
                            text=True, input=stdin, timeout=240)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def files(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    trace = tmp_path / "trace.jsonl"
    result = rbee("simulate", "generate", "--jobs", "300", "--seed", "5", "--rate", "4",
                  "--models", "llama", "--deadline-share", "1", "--deadline-ms", "20000-40000",
                  "--tenants", "acme=2,globex=1", "--geo", "frankfurt,virginia",
                  "--out", str(trace))
    assert result.returncode == 0, result.stderr
    return cluster, trace


def test_generate_writes_jsonl_to_stdout_deterministically():
    args = ("simulate", "generate", "--jobs", "50", "--seed", "9",
            "--mix", "text-gen=0.7,embedding=0.2,image-gen=0.1")
    first, again = rbee(*args), rbee(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 50 and first.stdout == again.stdout
    assert json.loads(lines[0])["id"] == "job-01"
    assert rbee("simulate", "generate", "--jobs", "50", "--seed", "10").stdout != first.stdout


def test_generate_refuses_bad_options():
    result = rbee("simulate", "generate", "--jobs", "5", "--mix", "text-gen=lots")
    assert result.returncode == 2
    assert "--mix 'text-gen=lots': 'text-gen=lots' is not NAME=WEIGHT" in result.stderr
    result = rbee("simulate", "generate", "--jobs", "5", "--geo", "atlantis")
    assert result.returncode == 2 and "unknown location 'atlantis'" in result.stderr


def test_policies_side_by_side_with_json_and_png(files, tmp_path):
    cluster, trace = files
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace),
                  "--policy", "round-robin", "--policy", "cost-optimizer",
                  "--policy", "least-loaded", "--baseline", "round-robin",
                  "--json", str(out), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["round-robin", "cost-optimizer", "least-loaded"]
    for label in ("latency p99", "TTFT p95", "queue wait max", "utilisation", "share acme",
                  "cost / 1k completed", "deadline misses", "simulated jobs/s"):
        assert label in result.stdout
    document = json.loads(out.read_text())
    assert document["trace"]["jobs"] == 300 and document["cluster"]["slots"] == 6
    names = [p["policy"] for p in document["policies"]]
    assert names == ["round-robin", "cost-optimizer", "least-loaded"]
    for summary in document["policies"]:
        assert summary["jobs"] == 300
        assert summary["completed"] + summary["rejected"] + summary["expired"] == 300
        assert 0 < summary["utilisation"] <= 1
        assert set(summary["tenants"]) == {"acme", "globex"}
        assert len(summary["latency_quantiles_ms"]) == 101
        assert summary["vs_baseline"]["baseline"] == "round-robin"
    # The trace overloads the cluster. The cost optimizer refuses what no
    # worker's estimate (which assumes max_tokens) finishes in time, so what it
    # runs makes its deadline; the baselines run everything, many jobs late.
    rr, cost, _ = document["policies"]
    assert cost["rejected_by_reason"]["no_workers_meet_deadline"] == cost["rejected"] > 0
    assert cost["deadline_misses"] == 0 < rr["deadline_misses"]
    assert cost["total_cost"] < rr["total_cost"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in result.stderr


def test_the_same_inputs_give_the_same_json(files, tmp_path):
    cluster, trace = files
    documents = []
    for name in ("a.json", "b.json"):
        result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace),
                      "--policy", "power-of-two", "--json", str(tmp_path / name), "-q")
        assert result.returncode == 0, result.stderr
        document = json.loads((tmp_path / name).read_text())
        for summary in document["policies"]:
            summary.pop("speed")
        documents.append(document)
    assert documents[0] == documents[1]


def test_html_plot_is_self_contained(files, tmp_path):
    cluster, trace = files
    page = tmp_path / "report.html"
    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace),
                  "--policy", "least-loaded", "--policy", "latency-optimizer",
                  "--plot", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "</html>" in text
    assert "<th>latency-optimizer</th>" in text
    assert 'src="http' not in text and "<script" not in text and "<link" not in text


def test_json_to_stdout_moves_the_table_to_stderr(files):
    cluster, trace = files
    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace),
                  "--policy", "round-robin", "--json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["policies"][0]["jobs"] == 300
    assert "utilisation" in result.stderr


def test_a_policy_file_and_a_trace_on_stdin(files, tmp_path):
    cluster, trace = files
    policy = tmp_path / "cheapest.yaml"
    policy.write_text("rules:\n  - name: cheapest\n    condition: true\n"
                      "    action: {select: workers.min_by(cost_per_token)}\n")
    result = rbee("simulate", "--cluster", str(cluster), "--trace", "-",
                  "--policy", str(policy), "-q", stdin=trace.read_text())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["cheapest"]


def test_bad_inputs_are_reported_with_their_place(files, tmp_path):
    cluster, trace = files
    bad_trace = tmp_path / "bad.jsonl"
    bad_trace.write_text('{"at_ms": 0}\n{"at_ms": 5, "priority": 3}\n')
    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(bad_trace),
                  "--policy", "round-robin")
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bad_trace}:2: priority: Input should be a valid string")

    bad_cluster = tmp_path / "bad.yaml"
    bad_cluster.write_text("workers:\n  - id: a\n    ttft_ms: fast\n    tokens_per_sec: 3\n")
    result = rbee("simulate", "--cluster", str(bad_cluster), "--trace", str(trace),
                  "--policy", "round-robin")
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bad_cluster}:3:14: workers[0].ttft_ms (worker 'a'):")

    broken = tmp_path / "broken.rhai"
    broken.write_text("fn schedule_job(job, pools, workers) {\n  workers.first(\n}\n")
    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace),
                  "--policy", str(broken))
    assert result.returncode == 1 and result.stderr.startswith(f"{broken}:3:")

    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace),
                  "--policy", "nope")
    assert result.returncode == 1 and "no such file, baseline or template" in result.stderr

    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace))
    assert result.returncode == 2 and "missing --policy" in result.stderr

    result = rbee("simulate", "--cluster", str(cluster), "--trace", str(trace),
                  "--policy", "round-robin", "--plot", str(tmp_path / "out.gif"))
    assert result.returncode == 1 and "give a .png or .html file name" in result.stderr


def test_the_documented_scenario_runs(tmp_path):
    # docs/simulator.md: the seed's claims. A shorter trace, the same cluster.
    trace = tmp_path / "scenario.jsonl"
    result = rbee("simulate", "generate", "--jobs", "400", "--seed", "7", "--rate", "8",
                  "--deadline-share", "1", "--deadline-ms", "15000-60000",
                  "--geo", "amsterdam,new-york,tokyo", "--out", str(trace))
    assert result.returncode == 0, result.stderr
    result = rbee("simulate", "--cluster", str(EXAMPLE_CLUSTER), "--trace", str(trace),
                  "--policy", "round-robin", "--policy", "least-loaded",
                  "--policy", "cost-optimizer", "--policy", "latency-optimizer",
                  "--policy", str(EXAMPLE_CLUSTER.parent / "nearest-available.rhai"), "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[-1] == "nearest-available"
