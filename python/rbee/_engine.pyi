"""Typed surface of the Rust extension. Use rbee.scheduler and rbee.rhai instead
of importing this module directly."""

from typing import Any

RHAI_VERSION: str

class State:
    """A cluster snapshot converted to Rhai values once (DESIGN 2.2).

    ``snapshot`` holds ``workers``, ``pools``, ``gpus``, ``models``, ``tenants``
    and ``queue`` lists (each optional) and optionally ``now`` (ms). Workers
    get defaults: ``status`` "ready", ``active`` 0, ``slots`` 1, and ``load``
    = active / slots.
    """

    def __init__(self, snapshot: dict[str, Any] | None = None) -> None: ...
    def upsert_worker(self, worker: dict[str, Any]) -> None:
        """Adds a worker or replaces the one with the same id."""
    def update_worker(self, worker_id: str, fields: dict[str, Any]) -> None:
        """Merges ``fields`` into the worker ``worker_id``, without sending
        the whole worker again: the result is what ``upsert_worker`` of the
        merged dict gives, except that a change of ``active`` or ``slots``
        without a ``load`` recomputes ``load`` = active / slots.

        KeyError when no worker has that id. ``ValueConversionError`` (a
        ``TypeError``), naming the field, when a value cannot be converted or
        ``status`` is not a string, ``active``/``slots`` not whole numbers of 0 or more,
        ``load`` not a number, or ``id`` differs from ``worker_id``.
        """
    def remove_worker(self, worker_id: str) -> None:
        """Removes a worker; KeyError when there is none with that id."""
    def replace(self, section: str, items: list[dict[str, Any]]) -> None:
        """Replaces pools, gpus, models, tenants or queue."""
    def to_dict(self) -> dict[str, Any]:
        """The state as scripts see it, as plain Python data."""
    def __len__(self) -> int: ...

class CompiledPolicy:
    def __init__(
        self, source: str, name: str | None = None, limits: dict[str, int] | None = None
    ) -> None: ...
    @property
    def limits(self) -> dict[str, int]: ...
    @property
    def native_closures(self) -> int:
        """How many of the policy's closures are evaluated natively."""
    def decide(
        self, job: dict[str, Any], state: State | dict[str, Any], now_ms: int | None = None,
        release_gil: bool = True,
    ) -> dict[str, Any]:
        """One decision. ``release_gil``: other threads run during the script."""

def evaluate(source: str, limits: dict[str, int] | None = None) -> Any: ...
