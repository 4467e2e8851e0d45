"""The queen's SQLite store and its in-memory decision log."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from rbee.queen.decisionlog import DecisionLog
from rbee.queen.store import Store


def _job(job_id: str, status: str = "done") -> dict:
    return {"id": job_id, "object": "job", "status": status, "created_at": 1}


def _decision(job_id: str, n: int) -> dict:
    return {"job_id": job_id, "at": n, "kind": "dispatch", "worker_id": f"w{n}"}


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "queen.db", decision_log_size=300)
    yield store
    store.close()


def test_writes_are_readable_after_a_flush_in_the_order_made(store: Store) -> None:
    for n in range(50):
        store.add_decision(_decision("job-a" if n % 2 else "job-b", n))
    store.save_job(_job("job-a", "running"))
    store.save_job(_job("job-a", "done"))
    assert store.flush(10)
    assert [d["at"] for d in store.decisions(limit=3)] == [49, 48, 47]
    assert [d["at"] for d in store.decisions(limit=100, job_id="job-a")][:3] == [49, 47, 45]
    assert store.job("job-a")["status"] == "done"


def test_a_pre_encoded_decision_is_stored_as_given(store: Store) -> None:
    log = DecisionLog(10)
    record = _decision("job-x", 7)
    store.add_decision(record, log.append(record))
    store.flush(10)
    assert store.decisions(limit=1) == [record]


def test_writes_from_many_threads_all_land(store: Store) -> None:
    def write(t: int) -> None:
        for n in range(100):
            store.save_job(_job(f"job-{t}-{n}"))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.flush(10)
    count = store._read.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert count == 400


def test_close_commits_what_was_handed_over(tmp_path: Path) -> None:
    store = Store(tmp_path / "queen.db")
    for n in range(20):
        store.add_decision(_decision("job", n))
    store.close()
    again = Store(tmp_path / "queen.db")
    try:
        assert len(again.decisions(limit=100)) == 20
    finally:
        again.close()


def test_the_decision_log_is_trimmed_to_its_size(store: Store) -> None:
    for n in range(1000):
        store.add_decision(_decision("job", n))
    store.flush(10)
    kept = store.decisions(limit=5000)
    # Trimmed every 256 inserts: never fewer than the size, never far above it.
    assert 300 <= len(kept) < 300 + 256
    assert kept[0]["at"] == 999


def test_job_records_are_trimmed_to_their_size_oldest_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "queen.db", job_log_size=100)
    try:
        for n in range(600):
            store.save_job(_job(f"job-{n}"))
        store.save_job(_job("job-599", "failed"))  # saved again: still the newest
        store.flush(10)
        kept = store._read.execute("SELECT id FROM jobs ORDER BY rowid").fetchall()
        assert 100 <= len(kept) < 100 + 256
        assert kept[-1] == ("job-599",) and store.job("job-599")["status"] == "failed"
        assert store.job("job-0") is None
    finally:
        store.close()


def test_a_failed_batch_is_logged_and_flush_still_returns(store: Store, caplog) -> None:
    store._submit("INSERT INTO no_such_table VALUES (?)", (1,))
    with caplog.at_level(logging.ERROR, logger="rbee.queen.store"):
        assert store.flush(10)
    assert "a batch of 1 writes failed" in caplog.text
    store.add_decision(_decision("job", 1))
    assert store.flush(10)
    assert len(store.decisions()) == 1


def test_a_database_made_with_autoincrement_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE decisions (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "job_id TEXT NOT NULL, at REAL NOT NULL, record TEXT NOT NULL)")
    conn.execute("INSERT INTO decisions (job_id, at, record) VALUES ('old', 0, '{\"at\": 0}')")
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        store.add_decision(_decision("new", 1))
        store.flush(10)
        assert [d["at"] for d in store.decisions()] == [1, 0]
    finally:
        store.close()


# -- the in-memory log --------------------------------------------------------


def test_the_decision_log_reads_like_a_bounded_sequence() -> None:
    log = DecisionLog(3)
    for n in range(5):
        log.append(_decision(f"job-{n % 2}", n))
    assert log.maxlen == 3 and len(log) == 3
    assert [d["at"] for d in log] == [2, 3, 4]
    assert log[-1]["worker_id"] == "w4" and log[0]["at"] == 2
    assert [d["at"] for d in log.last(2)] == [3, 4]
    assert log.last(0) == []
    assert [d["at"] for d in log.newest(10)] == [4, 3, 2]
    assert [d["at"] for d in log.newest(1, job_id="job-1")] == [3]
    assert log.newest(10, job_id="nobody") == []


def test_each_read_is_a_fresh_copy() -> None:
    log = DecisionLog(2)
    log.append(_decision("job", 1))
    log[0]["kind"] = "changed"
    assert log[0]["kind"] == "dispatch"


def test_values_json_has_no_type_for_are_kept_as_text() -> None:
    log = DecisionLog(2)
    data = log.append({"job_id": "job", "logs": [{"value": {1, 2}.__class__}], 3: "three"})
    assert b'"3":"three"' in data
    assert log[0]["logs"][0]["value"] == "<class 'set'>"
