"""The synthetic trace generator: its distributions, its seed, and that what
it writes is a valid trace."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from rbee.simulate.generate import (
    GeneratorError, GeneratorSpec, dumps, generate, parse_geo, parse_models, parse_weights,
)
from rbee.simulate.trace import parse_trace

N = 20_000


def trace(**options) -> list[dict]:
    return list(generate(GeneratorSpec(**{"jobs": N, "seed": 11, **options})))


def test_the_mix_of_task_types_is_kept():
    jobs = trace(mix={"text-gen": 0.7, "embedding": 0.2, "image-gen": 0.1})
    share = {t: c / N for t, c in Counter(j["type"] for j in jobs).items()}
    # Binomial standard deviation at N=20,000 is at most 0.0035: 4 sigma.
    assert share["text-gen"] == pytest.approx(0.7, abs=0.014)
    assert share["embedding"] == pytest.approx(0.2, abs=0.014)
    assert share["image-gen"] == pytest.approx(0.1, abs=0.014)
    by_type = {j["type"]: j for j in jobs}
    assert by_type["embedding"]["endpoint"] == "embeddings"
    assert by_type["embedding"]["model"] == "nomic-embed-text"
    assert by_type["embedding"]["output_tokens"] == 0
    assert by_type["image-gen"]["max_tokens"] == 1


def test_arrivals_are_poisson_at_the_rate():
    jobs = trace(rate=25.0)
    times = [j["at_ms"] for j in jobs]
    assert times == sorted(times)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1000 / 25, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, abs=0.05)
    # Counts per second are Poisson: variance equals the mean.
    per_second = Counter(int(t // 1000) for t in times)
    counts = [per_second.get(s, 0) for s in range(int(times[-1] // 1000))]
    assert statistics.pvariance(counts) / statistics.fmean(counts) == pytest.approx(1.0,
                                                                                    abs=0.15)


def test_a_diurnal_swing_fills_the_first_half_of_the_period_more():
    jobs = trace(rate=10.0, diurnal=0.5, period_s=600.0)
    whole = jobs[-1]["at_ms"] // 600_000 * 600_000  # complete periods only
    halves = Counter(int(j["at_ms"] / 1000 % 600 // 300) for j in jobs if j["at_ms"] < whole)
    # Expected ratio (1 + 2A/pi) / (1 - 2A/pi) = 1.93 for A = 0.5.
    assert 1.7 < halves[0] / halves[1] < 2.2
    assert statistics.fmean([b["at_ms"] - a["at_ms"] for a, b in zip(jobs, jobs[1:])]) == \
        pytest.approx(100, rel=0.05)


def test_priorities_deadlines_tenants_and_places():
    jobs = trace(priorities={"interactive": 1, "batch": 3}, deadline_share=0.25,
                 deadline_ms=(2000, 4000), tenants={"acme": 3, "globex": 1},
                 geo={"tokyo": 1, "48.14:11.58": 1}, users=400)
    batch = sum(j["priority"] == "batch" for j in jobs) / N
    assert batch == pytest.approx(0.75, abs=0.014)
    deadlines = [j["deadline_ms"] for j in jobs if "deadline_ms" in j]
    assert len(deadlines) / N == pytest.approx(0.25, abs=0.014)
    assert min(deadlines) >= 2000 and max(deadlines) <= 4000
    # Tenants and places are drawn per user (400 of them), so the tolerance is wider.
    acme = sum(j["tenant_id"] == "acme" for j in jobs) / N
    assert acme == pytest.approx(0.75, abs=0.08)
    tokyo = [j["user"]["geo"] for j in jobs if j["user"]["geo"].get("country") == "JP"]
    munich = [j["user"]["geo"] for j in jobs if "country" not in j["user"]["geo"]]
    assert len(tokyo) / N == pytest.approx(0.5, abs=0.08)
    assert all(abs(g["latitude"] - 35.68) <= 0.3 for g in tokyo)
    assert all(abs(g["longitude"] - 11.58) <= 0.3 for g in munich)
    users = {j["user"]["id"]: j["tenant_id"] for j in jobs}
    assert all(users[j["user"]["id"]] == j["tenant_id"] for j in jobs)  # one tenant each


def test_token_counts_stay_within_the_budget():
    jobs = trace(max_tokens=300)
    assert all(1 <= j["output_tokens"] <= 300 == j["max_tokens"] for j in jobs)
    mean = statistics.fmean(j["output_tokens"] for j in jobs)
    assert mean == pytest.approx(0.55 * 300, rel=0.03)  # uniform 10%-100%


def test_the_same_seed_gives_the_same_trace_and_others_differ():
    first = [dumps(j) for j in generate(GeneratorSpec(jobs=500, seed=3))]
    assert first == [dumps(j) for j in generate(GeneratorSpec(jobs=500, seed=3))]
    assert first != [dumps(j) for j in generate(GeneratorSpec(jobs=500, seed=4))]


def test_changing_the_mix_keeps_the_arrivals():
    a = [j["at_ms"] for j in generate(GeneratorSpec(jobs=300, seed=5))]
    b = [j["at_ms"] for j in generate(GeneratorSpec(jobs=300, seed=5,
                                                    mix={"embedding": 1.0}))]
    assert a == b


def test_what_it_writes_is_a_valid_trace():
    lines = [dumps(j) for j in generate(GeneratorSpec(
        jobs=2000, seed=1, mix={"text-gen": 1, "audio": 1, "image-gen": 1, "embedding": 1},
        deadline_share=0.5, tenants={"a": 1}))]
    jobs = parse_trace(lines, "generated.jsonl")
    assert len(jobs) == 2000 and len({j.id for j in jobs}) == 2000


def test_option_parsing_and_errors():
    assert parse_weights("a=0.7, b=0.3,c", "--mix") == {"a": 0.7, "b": 0.3, "c": 1.0}
    assert parse_models("llama=3,embedding:bge") == {"text-gen": {"llama": 3.0},
                                                     "embedding": {"bge": 1.0}}
    assert parse_geo("tokyo,1.5:2.5=2") == {"tokyo": 1.0, "1.5:2.5": 2.0}
    with pytest.raises(GeneratorError, match=r"--mix 'a=x': 'a=x' is not NAME=WEIGHT"):
        parse_weights("a=x", "--mix")
    with pytest.raises(GeneratorError, match="'a' is given twice"):
        parse_weights("a=1,a=2", "--tenants")
    with pytest.raises(GeneratorError, match="unknown task type 'video'"):
        parse_models("video:sora")
    with pytest.raises(GeneratorError, match="unknown location 'atlantis'"):
        parse_geo("atlantis")
    with pytest.raises(GeneratorError, match="unknown task type 'speech'"):
        list(generate(GeneratorSpec(jobs=1, mix={"speech": 1.0})))
    with pytest.raises(GeneratorError, match="--rate must be a positive"):
        list(generate(GeneratorSpec(jobs=1, rate=0.0)))
    with pytest.raises(GeneratorError, match="--deadline-share"):
        list(generate(GeneratorSpec(jobs=1, deadline_share=1.5)))
