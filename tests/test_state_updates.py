"""Incremental worker updates of `State` (src/state/): upsert_worker,
update_worker and remove_worker edit the worker arrays in place, and must
leave the state exactly as building it from scratch would."""

from __future__ import annotations

import json
import random
import threading
from typing import Any

import pytest

from conftest import GIB, cluster_snapshot, make_job
from rbee.errors import PolicyRuntimeError, ValueConversionError
from rbee.queen.registry import Registry
from rbee.scheduler import Policy, State

STATUSES = ["ready", "busy", "down", "draining", "starting"]
MODELS = ["m-small", "m-large", "m-embed"]

# Each logs the worker lists it saw, then decides; the logs make a wrong
# array visible even when the choice happens to agree.
POLICIES = [
    Policy.from_source(f"""
fn schedule_job(job, pools, workers) {{
    log(`${{workers.map(|w| w.id)}}`);
    log(`${{all_workers.map(|w| w.id)}}`);
    log(`${{workers.map(|w| w.load)}}`);
    {body}
}}""", name=f"policy-{i}")
    for i, body in enumerate([
        "workers.least_loaded()",
        "workers.available().least_loaded()",
        'workers.with_model("m-large").most_vram_free()',
        "workers.filter(|w| w.load < 0.5).min_by(|w| w.cost_per_token)",
        'all_workers.filter(|w| w.status == "ready" && !(w.id in job.failed_workers))'
        ".max_by(|w| w.vram_free)",
        'log(`${workers.map(|w| w.estimated_time)}`); '
        "workers.filter(|w| w.estimated_time != ()).min_by(|w| w.estimated_time)",
    ])
]


def random_worker(rng: random.Random, worker_id: str) -> dict[str, Any]:
    """A worker dict as a registration might send it, defaults left out at random."""
    w: dict[str, Any] = {"id": worker_id}
    roll = rng.random()
    if roll < 0.85:
        w["status"] = rng.choice(STATUSES)
    elif roll < 0.92:
        w["status"] = None  # not a string: defaults to ready
    if rng.random() < 0.8:
        w["slots"] = rng.choice([1, 2, 4, 4.0, 0])
    if rng.random() < 0.8:
        w["active"] = rng.choice([0, 1, 2, 3, 2.0])
    if rng.random() < 0.2:
        w["load"] = round(rng.random(), 3)
    w["vram_free"] = rng.randint(0, 80) * GIB
    w["model"] = rng.choice(MODELS)
    w["models"] = rng.sample(MODELS, rng.randint(1, 3))
    w["cost_per_token"] = rng.randint(1, 50) / 1e7
    w["tokens_per_sec"] = rng.randint(20, 150)
    if rng.random() < 0.5:
        w["geo"] = {"region": rng.choice(["EU", "US"]), "latitude": 50.0, "longitude": 8.0}
    if rng.random() < 0.3:
        w["labels"] = {"tier": rng.choice(["gold", "spot"])}
    return w


def random_fields(rng: random.Random) -> dict[str, Any]:
    """What update_worker might be sent: a few fields, mostly slot counts."""
    choices: dict[str, Any] = {
        "active": rng.choice([0, 1, 2, 3, 4, 1.0]),
        "status": rng.choice(STATUSES),
        "slots": rng.choice([1, 2, 4]),
        "load": round(rng.random(), 3),
        "vram_free": rng.randint(0, 80) * GIB,
        "last_used_at": rng.randint(0, 10**12),
        # What the queen learns from every answer: time to first token and
        # speed, which `estimated_time` reads.
        "latency_ms": rng.choice([rng.randint(20, 900), rng.random() * 500]),
        "tokens_per_sec": rng.choice([rng.randint(20, 150), rng.random() * 200, 0]),
        "model": rng.choice(MODELS),
        "labels": {"tier": rng.choice(["gold", "spot"]), "n": [1, 2.5, None]},
        "priority": None,
    }
    weights = {"active": 0.8, "status": 0.5, "slots": 0.1, "load": 0.1}
    return {k: v for k, v in choices.items() if rng.random() < weights.get(k, 0.15)}


def merged(current: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """What update_worker promises: the fields over the worker, with a load
    worked out again when active or slots change and no load is given."""
    out = {**current, **fields}
    if ("active" in fields or "slots" in fields) and "load" not in fields:
        out.pop("load", None)
    return out


def outcome(policy: Policy, job: dict[str, Any], state: State) -> tuple:
    d = policy.decide(job, state)
    return d.kind, d.worker_id, d.reason, d.logs


def assert_same(state: State, model: dict[str, dict[str, Any]], rng: random.Random,
                decide: bool) -> None:
    fresh = State({"workers": list(model.values())})
    assert state.to_dict() == fresh.to_dict()
    assert len(state) == len(fresh) == len(model)
    if not decide:
        return
    eligible = [w["id"] for w in fresh.to_dict()["workers"] if w["status"] in ("ready", "busy")]
    failed = rng.sample(eligible, min(len(eligible), rng.randint(0, 2)))
    job = make_job(id=f"job-{rng.randint(0, 999)}", failed_workers=failed)
    for policy in POLICIES:
        assert outcome(policy, job, state) == outcome(policy, job, fresh), policy.name


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_updates_match_a_state_built_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"w{i:02d}" for i in range(24)]
    model = {i: random_worker(rng, i) for i in rng.sample(ids, 10)}
    state = State({"workers": list(model.values())})
    counts = {"update": 0, "upsert": 0, "add": 0, "remove": 0, "moved": 0}
    for step in range(300):
        roll = rng.random()
        present = sorted(model)
        absent = sorted(set(ids) - set(model))
        if present and roll < 0.5:
            wid = rng.choice(present)
            fields = random_fields(rng)
            before = state.to_dict()["workers"]
            state.update_worker(wid, fields)
            model[wid] = merged(model[wid], fields)
            after = state.to_dict()["workers"]
            was = {w["id"]: w["status"] in ("ready", "busy") for w in before}
            now = {w["id"]: w["status"] in ("ready", "busy") for w in after}
            counts["moved"] += was[wid] != now[wid]
            counts["update"] += 1
        elif present and roll < 0.7:
            wid = rng.choice(present)
            model[wid] = random_worker(rng, wid)
            state.upsert_worker(model[wid])
            counts["upsert"] += 1
        elif absent and roll < 0.85:
            wid = rng.choice(absent)
            model[wid] = random_worker(rng, wid)
            state.upsert_worker(model[wid])
            counts["add"] += 1
        elif present:
            wid = rng.choice(present)
            state.remove_worker(wid)
            del model[wid]
            counts["remove"] += 1
        assert_same(state, model, rng, decide=step % 3 == 0)
    # The sequence went through every kind of change, eligibility flips included.
    assert all(n >= 10 for n in counts.values()), counts


@pytest.mark.parametrize("seed", [4, 5])
def test_update_slots_is_update_worker_without_the_dict(seed: int) -> None:
    """The queen's per-job update: the same state as `update_worker` of the
    same fields, None leaving a field as it is."""
    rng = random.Random(seed)
    workers = [random_worker(rng, f"w{i}") for i in range(6)]
    by_slots, by_dict = State({"workers": workers}), State({"workers": workers})
    for step in range(200):
        wid = rng.choice(workers)["id"]
        args = (wid, rng.randint(0, 5), rng.choice(STATUSES),
                rng.choice([None, rng.randint(0, 10**12)]),
                rng.choice([None, rng.randint(1, 900), rng.random() * 900]),
                rng.choice([None, rng.randint(1, 150), rng.random() * 150, 0.0]))
        names = ("active", "status", "last_used_at", "latency_ms", "tokens_per_sec")
        by_slots.update_slots(*args)
        by_dict.update_worker(wid, {k: v for k, v in zip(names, args[1:]) if v is not None})
        assert by_slots.to_dict() == by_dict.to_dict()
        if step % 10 == 0:
            job = make_job(id=f"job-{step}", failed_workers=[])
            for policy in POLICIES:
                assert outcome(policy, job, by_slots) == outcome(policy, job, by_dict)
    # An int stays an int, as through update_worker.
    by_slots.update_slots("w0", 1, "ready", None, 120, 30)
    assert worker_of(by_slots, "w0")["latency_ms"] == 120
    assert isinstance(worker_of(by_slots, "w0")["latency_ms"], int)


def test_update_slots_refuses_what_update_worker_refuses() -> None:
    state = State(cluster_snapshot())
    before = state.to_dict()
    with pytest.raises(ValueConversionError) as info:
        state.update_slots("ams-4090", -1, "ready")
    assert str(info.value) == \
        "worker['ams-4090'].active: expected a whole number, 0 or more, got -1 (int)"
    with pytest.raises(KeyError, match="no worker with id 'gpu-99'"):
        state.update_slots("gpu-99", 1, "ready")
    with pytest.raises(TypeError, match="latency_ms must be a number or None, not str"):
        state.update_slots("ams-4090", 1, "ready", None, "fast")
    with pytest.raises(TypeError, match="tokens_per_sec must be a number or None, not bool"):
        state.update_slots("ams-4090", 1, "ready", None, None, True)
    assert state.to_dict() == before


def test_updates_from_an_empty_state_to_empty_again() -> None:
    rng = random.Random(7)
    state = State()
    model: dict[str, dict[str, Any]] = {}
    for wid in ["m", "c", "x", "a", "q"]:
        model[wid] = random_worker(rng, wid)
        state.upsert_worker(model[wid])
        assert_same(state, model, rng, decide=True)
    for wid in ["c", "q", "a", "x", "m"]:
        state.remove_worker(wid)
        del model[wid]
        assert_same(state, model, rng, decide=True)
    assert state.to_dict()["workers"] == []


def ids_seen(state: State) -> tuple[list[str], list[str]]:
    logs = POLICIES[0].decide(make_job(), state).logs
    return json.loads(logs[0]), json.loads(logs[1])


def test_status_changes_move_workers_in_and_out_of_the_eligible_list() -> None:
    workers = [{"id": i, "status": "ready"} for i in ["a", "c", "e", "g"]]
    workers += [{"id": i, "status": "down"} for i in ["b", "d", "f"]]
    state = State({"workers": workers})
    everyone = ["a", "b", "c", "d", "e", "f", "g"]
    assert ids_seen(state) == (["a", "c", "e", "g"], everyone)
    state.update_worker("d", {"status": "busy"})  # joins in the middle
    assert ids_seen(state) == (["a", "c", "d", "e", "g"], everyone)
    state.update_worker("a", {"status": "draining"})  # leaves at the front
    state.update_worker("g", {"status": "starting"})  # and at the end
    assert ids_seen(state) == (["c", "d", "e"], everyone)
    state.update_worker("b", {"status": "ready"})
    state.upsert_worker({"id": "f", "status": "busy"})
    assert ids_seen(state) == (["b", "c", "d", "e", "f"], everyone)
    state.update_worker("c", {"status": "busy", "active": 1})  # stays, in place
    state.update_worker("e", {"status": "down"})
    state.update_worker("e", {"status": "down"})  # no change: still out
    assert ids_seen(state) == (["b", "c", "d", "f"], everyone)
    state.upsert_worker({"id": "0"})  # a new first worker, ready by default
    state.remove_worker("d")
    assert ids_seen(state) == (["0", "b", "c", "f"], ["0", "a", "b", "c", "e", "f", "g"])
    assert POLICIES[0].decide(make_job(), state).worker_id == "0"


def worker_of(state: State, wid: str) -> dict[str, Any]:
    return next(w for w in state.to_dict()["workers"] if w["id"] == wid)


def test_update_worker_merges_and_normalises_like_upsert() -> None:
    state = State({"workers": [{"id": "w", "slots": 4, "active": 1, "model": "m",
                                "labels": {"a": 1}}]})
    state.update_worker("w", {"active": 3})
    assert worker_of(state, "w") == {"id": "w", "slots": 4, "active": 3, "load": 0.75,
                                     "status": "ready", "model": "m", "labels": {"a": 1}}
    state.update_worker("w", {"slots": 2.0, "status": "busy", "labels": {"b": [1, None]}})
    assert worker_of(state, "w") == {"id": "w", "slots": 2, "active": 3, "load": 1.5,
                                     "status": "busy", "model": "m", "labels": {"b": [1, None]}}
    # A load that is given wins, and stays until active or slots change.
    state.update_worker("w", {"load": 0.1, "id": "w"})
    state.update_worker("w", {"status": "ready", "model": None})
    assert worker_of(state, "w")["load"] == 0.1
    assert worker_of(state, "w")["model"] is None
    state.update_worker("w", {"active": 1})
    assert worker_of(state, "w")["load"] == 0.5
    state.update_worker("w", {"slots": 0})
    assert worker_of(state, "w")["load"] == 1.0  # no slots: full, as upsert has it
    state.update_worker("w", {})
    assert worker_of(state, "w")["active"] == 1


def test_a_given_load_survives_updates_that_do_not_touch_the_counts() -> None:
    state = State({"workers": [{"id": "w", "slots": 2, "load": 0.9}]})
    state.update_worker("w", {"status": "busy", "vram_free": 3})
    assert worker_of(state, "w")["load"] == 0.9
    state.update_worker("w", {"active": 1})
    assert worker_of(state, "w")["load"] == 0.5


@pytest.mark.parametrize("fields, field, expected", [
    ({"active": "3"}, "active", 'expected a whole number, 0 or more, got "3" (str)'),
    ({"active": 1.5}, "active", "expected a whole number, 0 or more, got 1.5 (float)"),
    ({"active": True}, "active", "expected a whole number, 0 or more, got True (bool)"),
    ({"slots": None}, "slots", "expected a whole number, 0 or more, got None (NoneType)"),
    ({"slots": [2]}, "slots", "expected a whole number, 0 or more, got [...] (list)"),
    ({"active": -1}, "active", "expected a whole number, 0 or more, got -1 (int)"),
    ({"slots": -2.0}, "slots", "expected a whole number, 0 or more, got -2.0 (float)"),
    ({"status": 3}, "status", "expected a string, got 3 (int)"),
    ({"status": None}, "status", "expected a string, got None (NoneType)"),
    ({"load": "high"}, "load", 'expected a number, got "high" (str)'),
    ({"load": {"x": 1}}, "load", "expected a number, got {...} (dict)"),
    ({"id": "other"}, "id", "an id cannot change"),
    ({"active": 1, "labels": {"tags": {1, 2}}}, "labels.tags",
     "cannot convert a value of type 'set'"),
])
def test_update_worker_refuses_bad_fields_by_name(fields: dict, field: str, expected: str) -> None:
    state = State(cluster_snapshot())
    before = state.to_dict()
    with pytest.raises(ValueConversionError) as info:
        state.update_worker("ams-4090", fields)
    assert info.value.path == f"worker['ams-4090'].{field}"
    assert str(info.value).startswith(f"worker['ams-4090'].{field}: ")
    assert expected in str(info.value)
    assert isinstance(info.value, TypeError)
    assert state.to_dict() == before  # nothing of a refused update is kept


def test_update_worker_of_an_unknown_id_is_a_key_error() -> None:
    state = State(cluster_snapshot())
    before = state.to_dict()
    with pytest.raises(KeyError, match="no worker with id 'gpu-99'"):
        state.update_worker("gpu-99", {"active": 1})
    with pytest.raises(TypeError, match="fields must be a dict"):
        state.update_worker("ams-4090", [("active", 1)])
    assert state.to_dict() == before
    state.remove_worker("ams-4090")
    with pytest.raises(KeyError, match="ams-4090"):
        state.update_worker("ams-4090", {"active": 1})


@pytest.mark.parametrize("body", [
    'workers.push(#{id: "evil"}); ()',
    "workers.remove(0); ()",
    "workers.retain(|w| false); ()",
    "workers[0].load = 1; ()",
    "let w = workers[0]; w.status = \"down\"; ()",
    "all_workers.clear(); ()",
    "all_workers[0] = 1; ()",
    "all_workers[1].active = 5; ()",
])
def test_arrays_edited_in_place_stay_read_only(body: str) -> None:
    state = State(cluster_snapshot())
    state.update_worker("ams-4090", {"active": 1})  # replaced where it is
    state.update_worker("nyc-down", {"status": "ready"})  # moved into the eligible list
    state.upsert_worker({"id": "aaa-new"})  # inserted at the front
    state.remove_worker("sfo-cpu")
    before = state.to_dict()
    with pytest.raises(PolicyRuntimeError):
        Policy.from_source(f"fn schedule_job(job, pools, workers) {{ {body} }}").decide(
            make_job(), state)
    assert state.to_dict() == before


SLOW_POLICY = """
fn schedule_job(job, pools, workers) {
    let every = all_workers.map(|w| w.id + ":" + w.version + ":" + w.status);
    let seen = workers.map(|w| w.id + ":" + w.version);
    let n = 0;
    while n < 300000 { n += 1; }
    log(`${every}`);
    log(`${all_workers.map(|w| w.id + ":" + w.version + ":" + w.status)}`);
    log(`${seen}`);
    log(`${workers.map(|w| w.id + ":" + w.version)}`);
    workers.least_loaded()
}
"""


def test_a_running_decision_keeps_the_state_it_started_with() -> None:
    """Updates from another thread while a decision runs (the engine lets go
    of the GIL while it decides) change the next decision, not that one, and
    the decision sees the state as it was at one instant."""
    policy = Policy.from_source(SLOW_POLICY, limits={"timeout_ms": 30_000,
                                                     "max_operations": 10_000_000})

    def status(n: int) -> str:
        return "down" if n % 5 == 0 and n else "ready"

    overlapped = False
    for _ in range(5):
        state = State({"workers": [{"id": f"w{j}", "slots": 8, "version": 0}
                                   for j in range(6)]})
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(d=policy.decide(make_job(), state)))
        thread.start()
        n = 0
        while thread.is_alive():
            n += 1  # update n writes version n to worker n % 6
            state.update_worker(f"w{n % 6}", {"version": n, "active": n % 8,
                                              "status": status(n)})
        thread.join()
        every, every_after, seen, seen_after = (json.loads(x) for x in result["d"].logs)
        assert every == every_after
        assert seen == seen_after
        # The decision saw the state after some update k, all of it.
        k = max(int(e.split(":")[1]) for e in every)
        latest = [max((m for m in range(k + 1) if m % 6 == j), default=0) for j in range(6)]
        assert every == [f"w{j}:{latest[j]}:{status(latest[j])}" for j in range(6)]
        assert seen == [f"w{j}:{latest[j]}" for j in range(6) if status(latest[j]) == "ready"]
        # Updates well after the snapshot (each takes microseconds, the
        # decision milliseconds) show that they ran while it did.
        if n - k > 20:
            overlapped = True
            break
    assert overlapped, "no updates landed while a decision ran, in 5 tries"
    # The arrays those updates copied (the decision held the old ones) are
    # as read-only as the ones edited in place.
    before = state.to_dict()
    for body in ["all_workers[0] = 1; ()", "workers[0].version = 1; ()", "workers.clear(); ()"]:
        with pytest.raises(PolicyRuntimeError):
            Policy.from_source(f"fn schedule_job(job, pools, workers) {{ {body} }}").decide(
                make_job(), state)
    assert state.to_dict() == before


def test_the_registry_publishes_slot_changes_as_a_full_upsert_would() -> None:
    registry = Registry(models=[{"id": "m"}])
    a = registry.add_worker({"id": "a", "url": "http://a", "slots": 2, "model": "m",
                             "labels": {"x": "y"}, "latency_ms": 100})
    b = registry.add_worker({"id": "b", "url": "http://b"})

    def expected() -> list[dict[str, Any]]:
        return State({"workers": [a.snapshot(), b.snapshot()]}).to_dict()["workers"]

    registry.acquire(a)
    registry.acquire(a)
    registry.acquire(b)
    assert registry.state.to_dict()["workers"] == expected()
    assert [w["status"] for w in registry.state.to_dict()["workers"]] == ["busy", "busy"]
    registry.observe(a, 80.0, 100, 2.0)
    registry.release(a)
    assert registry.state.to_dict()["workers"] == expected()
    assert worker_of(registry.state, "a")["tokens_per_sec"] == 50.0
    registry.remove_worker("b")
    registry.release(b)  # no longer registered: not published again
    registry.state.remove_worker("a")
    registry.acquire(a)  # the state lost it: published whole again
    assert worker_of(registry.state, "a") == State(
        {"workers": [a.snapshot()]}).to_dict()["workers"][0]
    assert len(registry.state) == 1
