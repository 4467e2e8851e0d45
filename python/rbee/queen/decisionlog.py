"""The recent decisions, in memory, for `GET /v1/decisions`, the job view
and the preview's replay.

Each decision is kept as the JSON the store writes, not as a dict: a record
with its job, logs and fallback is a dozen Python objects, and ten thousand
of them cost several times the memory of their JSON and a long walk for
every full garbage collection while the queen is under load. The record is
encoded once, on the way in; readers decode what they return.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

import orjson

__all__ = ["DecisionLog", "encode"]


def encode(record: dict[str, Any]) -> bytes:
    # default=str: a value a policy logged that JSON has no type for is kept
    # as its text rather than losing the record.
    return orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)


class DecisionLog:
    """The last `maxlen` decisions, oldest first; reads like a sequence of
    dicts (each read decodes a fresh copy)."""

    def __init__(self, maxlen: int) -> None:
        # (job id, encoded record, the state journal's position when it was
        # decided or None): the id filters without decoding.
        self._items: collections.deque[tuple[str, bytes, int | None]] = collections.deque(
            maxlen=maxlen)

    @property
    def maxlen(self) -> int | None:
        return self._items.maxlen

    def append(self, record: dict[str, Any], state_seq: int | None = None) -> bytes:
        """Keeps `record`, decided on the state after `state_seq` changes
        (`StateJournal.seq`); answers its JSON, for the store."""
        data = encode(record)
        self._items.append((record.get("job_id", ""), data, state_seq))
        return data

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.append(record)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return orjson.loads(self._items[index][1])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _, data, _ in list(self._items):
            yield orjson.loads(data)

    def last(self, count: int) -> list[dict[str, Any]]:
        """The newest `count` decisions, oldest first."""
        return [record for record, _ in self.last_with_state(count)]

    def last_with_state(self, count: int) -> list[tuple[dict[str, Any], int | None]]:
        """The newest `count` decisions, oldest first, each with the state
        journal's position when it was made (None: not known)."""
        items = list(self._items)[-count:] if count > 0 else []
        return [(orjson.loads(data), seq) for _, data, seq in items]

    def newest(self, limit: int, job_id: str | None = None) -> list[dict[str, Any]]:
        """Up to `limit` decisions, newest first, of one job or of all."""
        found = []
        for jid, data, _ in reversed(self._items):
            if len(found) >= limit:
                break
            if job_id is None or jid == job_id:
                found.append(orjson.loads(data))
        return found
