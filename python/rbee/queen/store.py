"""Embedded SQLite store: policy versions, job records and the bounded
decision log, kept across restarts.

Writes are handed to one writer thread and committed in batches, so the
request path never waits for the disk; ``flush()`` waits for what was handed
over (the queen calls it on shutdown). Reads use their own connection, which
WAL mode lets run beside the writer.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import orjson

__all__ = ["Store"]

log = logging.getLogger("rbee.queen.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy_versions (
    version     INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    format      TEXT NOT NULL,
    origin      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    active      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    status      TEXT NOT NULL,
    record      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    -- Not AUTOINCREMENT: the newest row is never deleted, so a seq is never
    -- reused, and AUTOINCREMENT costs a write of sqlite_sequence per row.
    seq         INTEGER PRIMARY KEY,
    job_id      TEXT NOT NULL,
    at          REAL NOT NULL,
    record      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_job ON decisions (job_id);
CREATE TABLE IF NOT EXISTS tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    weight      REAL NOT NULL,
    quota       TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS usage (
    tenant_id   TEXT NOT NULL,
    day         TEXT NOT NULL,
    tokens      INTEGER NOT NULL DEFAULT 0,
    requests    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day)
);
"""

_INSERT_DECISION = "INSERT INTO decisions (job_id, at, record) VALUES (?, ?, ?)"
_SAVE_JOB = (
    "INSERT INTO jobs (id, created_at, updated_at, status, record) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at, "
    "status = excluded.status, record = excluded.record")
# How long the writer waits after the first write of a batch for more.
_BATCH_WINDOW_S = 0.02


def _dumps(value: Any) -> str:
    # orjson: a job and a decision record are written per request, and the
    # standard library's encoder costs several times as much CPU.
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class Store:
    def __init__(self, path: str | Path, decision_log_size: int = 10_000,
                 job_log_size: int = 100_000) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.decision_log_size = decision_log_size
        self.job_log_size = job_log_size
        # Rows written since each table was last trimmed to its size.
        self._untrimmed = {"decisions": 0, "jobs": 0}
        self._read = self._connect()
        self._read.executescript(_SCHEMA)
        # Writes wait in a list until the writer takes the whole list. A
        # write costs the request path an append under an uncontended lock;
        # only the first write of a batch wakes the writer thread.
        self._lock = threading.Lock()
        self._buffer: list[tuple[str, tuple]] = []
        self._wake = threading.Event()
        self._submitted = 0
        self._written = 0
        self._written_changed = threading.Condition()
        self._hurry = False
        self._stopping = False
        self._thread = threading.Thread(target=self._writer, name="rbee-store", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    # -- writing -------------------------------------------------------------

    def _submit(self, sql: str, params: tuple) -> None:
        with self._lock:
            first = not self._buffer
            self._buffer.append((sql, params))
            self._submitted += 1
        if first:
            self._wake.set()

    def _writer(self) -> None:
        conn = self._connect()
        while True:
            if not self._stopping:
                self._wake.wait()
            # Gather what arrives in the next moment into the same transaction:
            # a commit per request would wake this thread (and take the GIL
            # from the event loop) for every request.
            if not (self._hurry or self._stopping):
                time.sleep(_BATCH_WINDOW_S)
            with self._lock:
                work, self._buffer = self._buffer, []
                self._wake.clear()
                stop = self._stopping and not work
            if stop:
                conn.close()
                return
            if work:
                self._write(conn, work)
            with self._written_changed:
                self._written += len(work)
                self._written_changed.notify_all()

    def _write(self, conn: sqlite3.Connection, work: list[tuple[str, tuple]]) -> None:
        """One transaction."""
        try:
            conn.execute("BEGIN")
            # Every row of one statement goes in one executemany, in the
            # order written: a request's job row and decision row arrive
            # interleaved with other requests' rows, and an executemany for
            # each short run cost about a tenth more (docs/benchmarks.md).
            # Each statement writes its own table and the batch commits as a
            # whole, so only the order within a statement can show.
            runs: dict[str, list[tuple]] = {}
            for sql, params in work:
                runs.setdefault(sql, []).append(params)
            for sql, rows in runs.items():
                conn.executemany(sql, rows)
                if sql == _INSERT_DECISION:
                    self._untrimmed["decisions"] += len(rows)
                elif sql == _SAVE_JOB:
                    self._untrimmed["jobs"] += len(rows)
            # Both logs are trimmed now and then, not on every insert. Rows
            # are numbered in the order written (a job saved again keeps its
            # number), so the oldest go first.
            for table, key, size in (("decisions", "seq", self.decision_log_size),
                                     ("jobs", "rowid", self.job_log_size)):
                if self._untrimmed[table] >= 256:
                    self._untrimmed[table] = 0
                    conn.execute(f"DELETE FROM {table} WHERE {key} <= "
                                 f"(SELECT MAX({key}) FROM {table}) - ?", (size,))
            conn.execute("COMMIT")
        except sqlite3.Error:
            log.exception("store: a batch of %d writes failed", len(work))
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until every write handed over so far is committed (or
        failed and logged); False when that took longer than `timeout`."""
        with self._lock:
            target = self._submitted
        with self._written_changed:
            if self._written >= target:
                return True
            self._hurry = True
            self._wake.set()
            try:
                return self._written_changed.wait_for(
                    lambda: self._written >= target, timeout)
            finally:
                self._hurry = False

    def close(self) -> None:
        self.flush()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._read.close()

    # -- policy versions -----------------------------------------------------

    def add_policy_version(self, source: str, fmt: str, origin: str) -> int:
        """Stores a version and makes it the active one; answers its number.

        Synchronous: versions are rare and callers need the number."""
        self.flush()
        with self._lock:
            cur = self._read.execute(
                "INSERT INTO policy_versions (source, format, origin, created_at, active) "
                "VALUES (?, ?, ?, ?, 0)",
                (source, fmt, origin, time.time()),
            )
            version = int(cur.lastrowid)
        self.activate_policy_version(version)
        return version

    def activate_policy_version(self, version: int) -> None:
        with self._lock:
            self._read.execute("BEGIN")
            self._read.execute("UPDATE policy_versions SET active = 0 WHERE active = 1")
            self._read.execute(
                "UPDATE policy_versions SET active = 1 WHERE version = ?", (version,)
            )
            self._read.execute("COMMIT")

    def policy_versions(self) -> list[dict[str, Any]]:
        rows = self._read.execute(
            "SELECT version, format, origin, created_at, active, length(source) "
            "FROM policy_versions ORDER BY version"
        ).fetchall()
        return [
            {"version": v, "format": f, "origin": o, "created_at": c, "active": bool(a),
             "size": n}
            for v, f, o, c, a, n in rows
        ]

    def policy_version(self, version: int) -> dict[str, Any] | None:
        row = self._read.execute(
            "SELECT version, source, format, origin, created_at, active "
            "FROM policy_versions WHERE version = ?",
            (version,),
        ).fetchone()
        if row is None:
            return None
        v, s, f, o, c, a = row
        return {"version": v, "source": s, "format": f, "origin": o, "created_at": c,
                "active": bool(a)}

    def active_policy_version(self) -> dict[str, Any] | None:
        row = self._read.execute(
            "SELECT version FROM policy_versions WHERE active = 1"
        ).fetchone()
        return self.policy_version(row[0]) if row else None

    # -- jobs and decisions --------------------------------------------------

    def save_job(self, record: dict[str, Any]) -> None:
        now = time.time()
        self._submit(
            _SAVE_JOB,
            (record["id"], record.get("created_at", now), now, record.get("status", ""),
             _dumps(record)),
        )

    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self._read.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def add_decision(self, record: dict[str, Any], encoded: bytes | None = None) -> None:
        """Logs a decision; `encoded` is its JSON when the caller has it."""
        text = encoded.decode() if encoded is not None else _dumps(record)
        self._submit(
            _INSERT_DECISION,
            (record.get("job_id", ""), record.get("at", time.time()), text),
        )

    def decisions(self, limit: int = 100, job_id: str | None = None) -> list[dict[str, Any]]:
        """The newest decisions first."""
        if job_id is None:
            rows = self._read.execute(
                "SELECT record FROM decisions ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        else:
            rows = self._read.execute(
                "SELECT record FROM decisions WHERE job_id = ? ORDER BY seq DESC LIMIT ?",
                (job_id, limit),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- tenants, keys and usage (platform mode) -------------------------------
    # Tenants and keys are written at once (rare, and a key must work as soon
    # as it is shown); usage goes through the writer thread like job records.

    def _write_now(self, sql: str, params: tuple) -> int:
        self.flush()
        with self._lock:
            return self._read.execute(sql, params).rowcount

    def save_tenant(self, row: dict[str, Any]) -> None:
        self._write_now(
            "INSERT INTO tenants (id, name, weight, quota, created_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET name = excluded.name, weight = excluded.weight, "
            "quota = excluded.quota",
            (row["id"], row["name"], float(row["weight"]), _dumps(row["quota"]), time.time()),
        )

    def tenants(self) -> list[dict[str, Any]]:
        rows = self._read.execute("SELECT id, name, weight, quota FROM tenants ORDER BY id")
        return [{"id": i, "name": n, "weight": w, "quota": json.loads(q)} for i, n, w, q in rows]

    def save_key(self, key_id: str, tenant_id: str, digest: str) -> None:
        self._write_now(
            "INSERT INTO api_keys (key_id, tenant_id, hash, created_at) VALUES (?, ?, ?, ?)",
            (key_id, tenant_id, digest, time.time()),
        )

    def key(self, key_id: str) -> dict[str, Any] | None:
        row = self._read.execute(
            "SELECT tenant_id, hash, revoked_at FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        return None if row is None else {"tenant_id": row[0], "hash": row[1],
                                         "revoked_at": row[2]}

    def keys(self, tenant_id: str) -> list[dict[str, Any]]:
        rows = self._read.execute(
            "SELECT key_id, created_at, revoked_at FROM api_keys WHERE tenant_id = ? "
            "ORDER BY created_at", (tenant_id,))
        return [{"key_id": k, "created_at": c, "revoked": r is not None} for k, c, r in rows]

    def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        return self._write_now(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND tenant_id = ? "
            "AND revoked_at IS NULL", (time.time(), key_id, tenant_id)) > 0

    def add_usage(self, tenant_id: str, day: str, tokens: int, requests: int = 1) -> None:
        self._submit(
            "INSERT INTO usage (tenant_id, day, tokens, requests) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(tenant_id, day) DO UPDATE SET tokens = tokens + excluded.tokens, "
            "requests = requests + excluded.requests",
            (tenant_id, day, tokens, requests),
        )

    def tokens_used(self, tenant_id: str, day: str) -> int:
        self.flush()
        row = self._read.execute(
            "SELECT tokens FROM usage WHERE tenant_id = ? AND day = ?", (tenant_id, day)
        ).fetchone()
        return int(row[0]) if row else 0

    def usage_history(self, tenant_id: str, days: int) -> list[dict[str, Any]]:
        self.flush()
        rows = self._read.execute(
            "SELECT day, tokens, requests FROM usage WHERE tenant_id = ? "
            "ORDER BY day DESC LIMIT ?", (tenant_id, days))
        return [{"day": d, "tokens": t, "requests": r} for d, t, r in rows]
