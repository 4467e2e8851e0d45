"""Conversion between Python and Rhai values (DESIGN 4.1), both ways, with its errors."""

from __future__ import annotations

import collections
import enum
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cluster_snapshot, make_job, probe
from rbee.errors import RbeeError, ValueConversionError
from rbee.rhai import evaluate
from rbee.scheduler import Policy, State

I64 = st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
TEXT = st.text(max_size=20)
FINITE = st.floats(allow_nan=False, allow_infinity=False)

scalars = st.none() | st.booleans() | I64 | FINITE | TEXT
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=25,
)

FAST = settings(max_examples=150, deadline=None)


def same(a: Any, b: Any) -> bool:
    """Equality that also checks types (True is not 1) and treats NaN as equal."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def rhai_literal(value: Any) -> str:
    """Rhai source that evaluates to ``value``."""
    if value is None:
        return "()"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".e") else text + ".0"
    if isinstance(value, str):
        return '"' + "".join(
            c if c.isascii() and c.isalnum() else f"\\U{ord(c):08x}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(rhai_literal(v) for v in value) + "]"
    return "#{" + ", ".join(f"{rhai_literal(k)}: {rhai_literal(v)}"
                            for k, v in value.items()) + "}"


# --- Rhai -> Python -----------------------------------------------------------------------


def test_each_rhai_type_maps_to_its_python_type() -> None:
    assert evaluate("()") is None
    assert evaluate("true") is True and evaluate("1 > 2") is False
    assert evaluate("40 + 2") == 42 and type(evaluate("40 + 2")) is int
    assert evaluate("1.5 * 2") == 3.0 and type(evaluate("1.5 * 2")) is float
    assert evaluate('"rbee" + "!"') == "rbee!"
    assert evaluate("'x'") == "x"
    assert evaluate("[1, [2, 3], []]") == [1, [2, 3], []]
    assert evaluate('#{a: 1, "b c": #{d: [()]}}') == {"a": 1, "b c": {"d": [None]}}
    assert evaluate("-9223372036854775807 - 1") == -(2**63)
    assert evaluate("9223372036854775807") == 2**63 - 1


def test_other_rhai_values_come_back_as_their_display_form() -> None:
    assert evaluate("0..3") == "0..3"
    assert evaluate('Fn("f")') == "Fn(f)"


def test_decision_values_come_back_as_dicts() -> None:
    assert evaluate('reject("capacity")') == {
        "decision": "reject", "code": "capacity", "status": 429}
    assert evaluate('wait("cold", 5)') == {"decision": "wait", "reason": "cold", "ms": 5}
    assert evaluate('dispatch("w1")') == {"decision": "dispatch", "worker_id": "w1"}
    assert evaluate('start_worker("m", "p")') == {
        "action": "start_worker", "model": "m", "pool": "p", "gpu": None}


@FAST
@given(values)
def test_rhai_literals_round_trip_through_evaluate(value: Any) -> None:
    assert same(evaluate(rhai_literal(value)), value)


@FAST
@given(I64, I64)
def test_integer_arithmetic_matches_python_or_errors(a: int, b: int) -> None:
    total = a + b
    if -(2**63) <= total < 2**63:
        assert evaluate(f"{a} + {b}") == total
    else:
        with pytest.raises(RbeeError):
            evaluate(f"{a} + {b}")


# --- Python -> Rhai -> Python -------------------------------------------------------------


@FAST
@given(values)
def test_state_to_dict_round_trips_any_nested_value(value: Any) -> None:
    state = State({"workers": [{"id": "w", "extra": value, "labels": {"v": [value]}}],
                   "pools": [{"id": "p", "labels": {"v": value}}]})
    back = state.to_dict()
    assert same(back["workers"][0]["extra"], value)
    assert same(back["workers"][0]["labels"], {"v": [value]})
    assert same(back["pools"][0]["labels"], {"v": value})


@FAST
@given(st.dictionaries(TEXT, values, max_size=6))
def test_job_fields_reach_the_script_intact(tags: dict) -> None:
    policy = Policy.from_source(
        "fn schedule_job(job, pools, workers) { log(#{v: job.tags}.to_json()); () }",
        limits={"max_log_line_bytes": 1 << 20})
    decision = policy.decide({"id": "j", "tags": tags}, {"workers": []})
    assert same(json.loads(decision.logs[0])["v"], tags)


def test_special_floats_and_python_subtypes_convert() -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    worker = {"id": "w", "nan": float("nan"), "inf": float("-inf"), "level": Level.HIGH,
              "ordered": collections.OrderedDict(b=1, a=2), "pair": (1, "two"),
              "flag": True, "zero": 0, "neg0": -0.0}
    back = State({"workers": [worker]}).to_dict()["workers"][0]
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")
    assert back["level"] == 3 and type(back["level"]) is int
    assert back["ordered"] == {"a": 2, "b": 1}
    assert back["pair"] == [1, "two"]
    assert back["flag"] is True and back["zero"] == 0 and type(back["zero"]) is int
    assert same(back["neg0"], -0.0)


def test_values_keep_their_types_inside_the_script() -> None:
    labels = {"b": True, "i": 1, "f": 1.0, "s": "1", "n": None, "l": [1], "d": {"k": 1}}
    snap = {"workers": [{"id": "w", "labels": labels}]}
    types = probe('let l = workers[0].labels; [type_of(l.b), type_of(l.i), type_of(l.f),'
                  ' type_of(l.s), type_of(l.n), type_of(l.l), type_of(l.d)]', snap)
    assert types == ["bool", "i64", "f64", "string", "()", "array", "map"]


def test_worker_records_come_back_as_plain_dicts() -> None:
    back = State(cluster_snapshot()).to_dict()
    par = next(w for w in back["workers"] if w["id"] == "par-mac")
    assert par["geo"]["country"] == "FR" and par["load"] == 0.5
    assert [g["id"] for g in back["gpus"]][:2] == ["ams/0", "ams/1"]
    assert back["gpus"][0]["pool"] == "ams"
    assert [w["id"] for w in back["workers"]] == sorted(w["id"] for w in back["workers"])
    assert set(back) == {"workers", "pools", "gpus", "models", "tenants", "queue"}


# --- conversion errors --------------------------------------------------------------------


def conversion_error(snapshot: dict) -> ValueConversionError:
    with pytest.raises(ValueConversionError) as info:
        State(snapshot)
    return info.value


def four_workers_with(**fields: Any) -> dict:
    workers = [{"id": f"w{i}"} for i in range(4)]
    workers[3].update(fields)
    return {"workers": workers}


@pytest.mark.parametrize("bad, kind", [
    ({1, 2}, "set"), (frozenset(), "frozenset"), (b"bytes", "bytes"),
    (bytearray(b"x"), "bytearray"), (object(), "object"), (1 + 2j, "complex"),
    (range(3), "range"),
])
def test_unsupported_types_name_the_place(bad: Any, kind: str) -> None:
    err = conversion_error(four_workers_with(geo=bad))
    assert err.path == "state.workers[3].geo"
    assert "state.workers[3].geo" in str(err) and kind in str(err)
    assert isinstance(err, TypeError) and isinstance(err, RbeeError)


def test_the_path_goes_down_lists_and_dicts() -> None:
    err = conversion_error(four_workers_with(labels={"racks": [1, {"slot": {5}}]}))
    assert err.path == "state.workers[3].labels.racks[1].slot"
    err = conversion_error({"pools": [{"id": "p", "gpus": [{"index": 0, "x": b""}]}]})
    assert err.path == "state.pools[0].gpus[0].x"
    err = conversion_error({"tenants": [{"id": "t", "quota": {"vram_bytes": {1.5}}}]})
    assert err.path == "state.tenants[0].quota.vram_bytes"


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 10**30])
def test_integers_out_of_64_bits_are_refused(number: int) -> None:
    err = conversion_error(four_workers_with(vram_total=number))
    assert err.path == "state.workers[3].vram_total"
    assert str(number) in str(err) and "64 bits" in str(err)


def test_the_64_bit_bounds_themselves_convert() -> None:
    snap = four_workers_with(lo=-(2**63), hi=2**63 - 1)
    back = State(snap).to_dict()["workers"][3]
    assert (back["lo"], back["hi"]) == (-(2**63), 2**63 - 1)


@pytest.mark.parametrize("key", [1, None, 2.5, ("a",), True])
def test_dict_keys_must_be_strings(key: Any) -> None:
    err = conversion_error(four_workers_with(labels={key: "x"}))
    assert err.path == "state.workers[3].labels"
    assert "not a string" in str(err) and repr(key) in str(err) or str(key) in str(err)


def test_strings_that_are_not_utf8_are_refused() -> None:
    err = conversion_error(four_workers_with(name="bad \ud800 surrogate"))
    assert err.path == "state.workers[3].name"


def test_cycles_and_absurd_nesting_are_refused() -> None:
    cycle: dict = {}
    cycle["again"] = cycle
    err = conversion_error(four_workers_with(labels=cycle))
    assert "nested deeper than" in str(err)
    deep: Any = "bottom"
    for _ in range(200):
        deep = [deep]
    err = conversion_error(four_workers_with(labels=deep))
    assert err.path.startswith("state.workers[3].labels[0][0]")


@pytest.mark.parametrize("worker", [{"name": "no id"}, {"id": ""}, {"id": 7}, {"id": None}])
def test_a_worker_needs_a_string_id(worker: dict) -> None:
    err = conversion_error({"workers": [{"id": "ok"}, worker]})
    assert err.path == "state.workers[1]" and "'id'" in str(err)


def test_other_sections_need_ids_too() -> None:
    assert conversion_error({"models": [{"size_bytes": 1}]}).path == "state.models[0]"
    assert conversion_error({"tenants": [{"name": "x"}]}).path == "state.tenants[0]"
    assert conversion_error({"pools": [{"url": "x"}]}).path == "state.pools[0]"
    # A GPU without id gets "<pool>/<index>"; without either it is refused.
    assert conversion_error({"gpus": [{"name": "loose"}]}).path == "state.gpus"


def test_duplicate_worker_ids_are_refused() -> None:
    err = conversion_error({"workers": [{"id": "a"}, {"id": "b"}, {"id": "a"}]})
    assert "'a'" in str(err) and "twice" in str(err)


@pytest.mark.parametrize("key", ["worker", "nodes", "Workers", "job"])
def test_unknown_state_keys_are_refused(key: str) -> None:
    err = conversion_error({"workers": [], key: []})
    assert err.path == f"state.{key}"
    assert "unknown key" in str(err) and "workers" in str(err)


def test_section_shapes_are_checked() -> None:
    assert conversion_error({"workers": {"id": "w"}}).path == "state.workers"
    assert conversion_error({"queue": ["job-1"]}).path == "state.queue[0]"
    assert conversion_error({"now": "noon"}).path == "state.now"
    assert State({"workers": None}).to_dict()["workers"] == []


def test_conversion_errors_from_decide_name_the_job_or_state() -> None:
    policy = Policy.from_source("fn schedule_job(job, pools, workers) { () }")
    with pytest.raises(ValueConversionError) as info:
        policy.decide(make_job(tags={"when": {1}}), {"workers": []})
    assert info.value.path == "job.tags.when"
    with pytest.raises(ValueConversionError) as info:
        policy.decide(make_job(), four_workers_with(geo=b"x"))
    assert info.value.path == "state.workers[3].geo"
    with pytest.raises(TypeError, match="state"):
        policy.decide(make_job(), [])
    with pytest.raises(TypeError):
        State(["not", "a", "dict"])


def test_incremental_updates_check_their_values() -> None:
    state = State(cluster_snapshot())
    with pytest.raises(ValueConversionError) as info:
        state.upsert_worker({"id": "w", "labels": {"a": {3}}})
    assert info.value.path == "worker.labels.a"
    with pytest.raises(ValueConversionError) as info:
        state.upsert_worker({"labels": {}})
    assert info.value.path == "worker"
    with pytest.raises(ValueConversionError) as info:
        state.replace("models", [{"id": "m", "x": set()}])
    assert info.value.path == "state.models[0].x"
    with pytest.raises(KeyError, match="nope"):
        state.remove_worker("nope")
    with pytest.raises(KeyError):
        state.replace("workers", [])
    with pytest.raises(KeyError):
        state.replace("bogus", [])
    # Failed updates change nothing.
    assert len(state) == 8
    assert [m["id"] for m in state.to_dict()["models"]][0] == "llama-3.1-70b-instruct"
