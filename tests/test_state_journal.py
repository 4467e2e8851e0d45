"""The state journal: recent states rebuilt from checkpoints and changes."""

from __future__ import annotations

import pytest

from rbee.queen.statejournal import StateJournal
from rbee.scheduler import State


def _worker(worker_id: str, **fields) -> dict:
    return {"id": worker_id, "slots": 4, **fields}


def _changes(journal: StateJournal, count: int) -> list[dict]:
    """Makes `count` changes of every kind; answers the state's dict after
    each (index i: after i changes)."""
    seen = [journal.state.to_dict()]
    for n in range(count):
        match n % 6:
            case 0:
                journal.upsert_worker(_worker(f"w{n}", cost_per_token=n))
            case 1:
                journal.update_worker(f"w{n - 1}", {"active": n % 4, "status": "busy"})
            case 2:
                journal.replace("pools", [{"id": f"pool-{n}", "workers": [f"w{n - 2}"]}])
            case 3:
                journal.update_worker(f"w{n - 3}", {"latency_ms": float(n)})
            case 4:
                journal.update_slots(f"w{n - 4}", n % 3, "ready", n, None, float(n))
            case 5:
                journal.remove_worker(f"w{n - 5}")
        seen.append(journal.state.to_dict())
    return seen


def test_every_state_in_the_window_is_rebuilt_exactly() -> None:
    journal = StateJournal(State({"workers": [_worker("base")]}), checkpoint_every=7,
                           checkpoints=5)
    seen = _changes(journal, 30)
    window = journal.window()
    assert journal.seq == 30 and window.last == 30
    seqs = list(range(31))
    for seq, state in zip(seqs, window.states(seqs)):
        assert state is not None and state.to_dict() == seen[seq], seq


def test_old_states_leave_the_window_with_their_checkpoint() -> None:
    journal = StateJournal(State(), checkpoint_every=5, checkpoints=2)
    seen = _changes(journal, 23)
    window = journal.window()
    # Checkpoints at 15 and 20 remain: 15..23 are covered, nothing before.
    assert [window.covers(s) for s in (14, 15, 23, 24)] == [False, True, True, False]
    # One state object moves forward: each is read before the next is made.
    got = [s if s is None else s.to_dict() for s in window.states([3, 15, 19, None, 23])]
    assert got == [None, seen[15], seen[19], None, seen[23]]


def test_going_back_starts_again_from_a_checkpoint() -> None:
    journal = StateJournal(State(), checkpoint_every=4, checkpoints=4)
    seen = _changes(journal, 12)
    window = journal.window()
    got = [s.to_dict() for s in window.states([10, 2, 9, 9, 12])]
    assert got == [seen[10], seen[2], seen[9], seen[9], seen[12]]


def test_a_refused_change_is_not_recorded() -> None:
    journal = StateJournal(State())
    with pytest.raises(KeyError):
        journal.update_worker("nobody", {"active": 1})
    with pytest.raises(KeyError):
        journal.remove_worker("nobody")
    assert journal.seq == 0


def test_a_window_holds_still_while_changes_go_on() -> None:
    journal = StateJournal(State(), checkpoint_every=3, checkpoints=2)
    seen = _changes(journal, 6)
    window = journal.window()
    _changes(journal, 20)  # the journal moves on and drops what the window holds
    assert [s.to_dict() for s in window.states([4, 6])] == [seen[4], seen[6]]
