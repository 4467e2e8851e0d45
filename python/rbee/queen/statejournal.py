"""The recent history of the scheduler's state, so that a recorded decision
can be replayed on the state it was made on.

Copying the state into every decision record would cost O(workers) per
request. Instead every change to the state goes through the journal, which
applies it and keeps it as one small entry; every `checkpoint_every`
changes it keeps a full copy of the state as well. The state as it was
after change number `seq` is the last checkpoint at or before `seq` with the
entries after it applied again. Old checkpoints and the entries before them
are dropped, so the journal covers the last few thousand changes; a
decision older than that (or recorded before a restart) is replayed on the
live state instead, and the replay says so.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

from rbee.scheduler import State

__all__ = ["JournalWindow", "StateJournal"]

# An entry: ("slots", worker id, active, status, last_used_at, latency_ms,
# tokens_per_sec), ("update", worker id, ((field, value), ...)), ("upsert",
# worker), ("remove", worker id) or ("replace", section, items). Slot
# changes, the entries of every request, are tuples of plain values: the
# garbage collector stops tracking those, where it would walk dicts on every
# full collection.
Entry = tuple


class StateJournal:
    def __init__(self, state: State, *, checkpoint_every: int = 2048,
                 checkpoints: int = 3) -> None:
        self.state = state
        self.seq = 0
        self.checkpoint_every = checkpoint_every
        # (seq, the state's dict after that many changes), oldest first.
        self._checkpoints: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(
            [(0, state.to_dict())], maxlen=checkpoints)
        # The entries after the oldest checkpoint; entry i is change number
        # `_first + i + 1`.
        self._entries: collections.deque[Entry] = collections.deque()
        self._first = 0

    # -- changes (each applied first, so a refused one is not recorded) -------

    def upsert_worker(self, worker: dict[str, Any]) -> None:
        self.state.upsert_worker(worker)
        self._record(("upsert", worker))

    def update_worker(self, worker_id: str, fields: dict[str, Any]) -> None:
        self.state.update_worker(worker_id, fields)
        self._record(("update", worker_id, tuple(fields.items())))

    def update_slots(self, worker_id: str, active: int, status: str,
                     last_used_at: int | None, latency_ms: float | None,
                     tokens_per_sec: float | None) -> None:
        """`update_worker` of the fields that change with every job (None:
        unchanged), without a dict on the way."""
        self.state.update_slots(worker_id, active, status, last_used_at, latency_ms,
                                tokens_per_sec)
        self._record(("slots", worker_id, active, status, last_used_at, latency_ms,
                      tokens_per_sec))

    def remove_worker(self, worker_id: str) -> None:
        self.state.remove_worker(worker_id)
        self._record(("remove", worker_id))

    def replace(self, section: str, items: list[dict[str, Any]]) -> None:
        self.state.replace(section, items)
        self._record(("replace", section, items))

    def _record(self, entry: Entry) -> None:
        self._entries.append(entry)
        self.seq += 1
        if self.seq - self._checkpoints[-1][0] >= self.checkpoint_every:
            if len(self._checkpoints) == self._checkpoints.maxlen:
                # The oldest checkpoint goes, and the entries only it needed.
                dropped = self._checkpoints[1][0] - self._checkpoints[0][0]
                for _ in range(dropped):
                    self._entries.popleft()
                self._first += dropped
            self._checkpoints.append((self.seq, self.state.to_dict()))

    # -- reading the past ------------------------------------------------------

    def window(self) -> JournalWindow:
        """A copy of what the journal holds now, to read from another thread
        while changes go on."""
        return JournalWindow(list(self._checkpoints), list(self._entries), self._first)


class JournalWindow:
    def __init__(self, checkpoints: list[tuple[int, dict[str, Any]]], entries: list[Entry],
                 first: int) -> None:
        self._checkpoints = checkpoints
        self._entries = entries
        self._first = first
        self.last = first + len(entries)

    def covers(self, seq: int) -> bool:
        return self._checkpoints[0][0] <= seq <= self.last

    def states(self, seqs: Iterable[int | None]) -> Iterator[State | None]:
        """The state after each of `seqs` changes, in order (None for one the
        window does not cover). Consecutive seqs that do not go backwards
        reuse one state, moved forward by the entries between them."""
        state: State | None = None
        at = -1
        for seq in seqs:
            if seq is None or not self.covers(seq):
                yield None
                continue
            if state is None or seq < at:
                base, snapshot = max((c for c in self._checkpoints if c[0] <= seq),
                                     key=lambda c: c[0])
                state, at = State(snapshot), base
            for entry in self._entries[at - self._first:seq - self._first]:
                _apply(state, entry)
            at = seq
            yield state


def _apply(state: State, entry: Entry) -> None:
    kind = entry[0]
    if kind == "slots":
        state.update_slots(*entry[1:])
    elif kind == "update":
        state.update_worker(entry[1], dict(entry[2]))
    elif kind == "upsert":
        state.upsert_worker(entry[1])
    elif kind == "remove":
        state.remove_worker(entry[1])
    else:
        state.replace(entry[1], entry[2])
