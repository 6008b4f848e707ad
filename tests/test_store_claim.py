"""Claiming queued jobs: the one-statement claim and its fallback give the same records, in the same
order, and never hand one job to two workers (real SQLite file, one connection per thread)."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from engine.server.store import RUNNING, JobStore

PATHS = pytest.mark.parametrize("returning", [True, False], ids=["update-returning", "select-then-update"])


@PATHS
def test_a_claimed_record_is_the_stored_row_marked_running(tmp_path, returning):
    store = JobStore(tmp_path / "q.sqlite3")
    store.returning = returning
    added = store.add(workflow={"nodes": {"1": {"type": "Number"}}}, prompt={"1": {}}, params={"seed": 3},
                      outputs_to_execute=["1"], force=True, extra_data={"client": "x"})
    claimed = store.claim_next()
    assert claimed.id == added.id and claimed.status == RUNNING and claimed.started is not None
    assert (claimed.workflow, claimed.params, claimed.outputs_to_execute, claimed.force, claimed.extra_data) == (
        added.workflow, added.params, added.outputs_to_execute, True, added.extra_data)
    assert store.get(added.id) == claimed  # what it returned is what is stored
    second = store.add(workflow={}, prompt={})
    assert store.claim(second.id).status == RUNNING and store.get(second.id).status == RUNNING
    assert store.claim(second.id) is None  # already running: not claimed twice
    assert store.claim("no-such-job") is None and store.claim_next() is None


def test_the_one_statement_claim_is_used_and_commits_at_once(tmp_path):
    path = tmp_path / "q.sqlite3"
    store = JobStore(path)
    assert store.returning == (sqlite3.sqlite_version_info >= (3, 35, 0))
    job = store.add(workflow={}, prompt={})
    statements: list[str] = []
    store._conn().set_trace_callback(statements.append)
    assert store.claim_next().id == job.id
    if store.returning:
        assert len(statements) == 1 and "RETURNING" in statements[0]
    other = sqlite3.connect(path, timeout=0.5, isolation_level=None)  # another process's view
    assert other.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone() == (RUNNING,)
    other.execute("BEGIN IMMEDIATE")  # "database is locked" if the claim had left its write open
    other.execute("ROLLBACK")
    other.close()
    assert store.get(job.id).status == RUNNING and not store.queued(5)


@PATHS
def test_two_workers_on_two_connections_never_claim_the_same_job(tmp_path, returning):
    path = tmp_path / "q.sqlite3"
    store = JobStore(path)
    ids = {store.add(workflow={}, prompt={}).id for _ in range(60)}
    taken: list[list[str]] = [[], [], []]

    def work(i: int) -> None:
        mine = JobStore(path)  # another store and connection, as another worker thread or process
        mine.returning = returning
        while (job := mine.claim_next()) is not None:
            taken[i].append(job.id)
            mine.finish(job.id, "succeeded")
        mine.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [j for part in taken for j in part]
    assert sorted(claimed) == sorted(ids)  # every job once: none lost, none twice
    assert all(store.get(j).status == "succeeded" for j in ids)


@PATHS
def test_a_job_added_to_be_started_is_running_at_once_only_when_nothing_waits_ahead(tmp_path, returning):
    store = JobStore(tmp_path / "q.sqlite3")
    store.returning = returning
    first = store.add(workflow={"nodes": {}}, prompt={}, params={"seed": 1}, start=True)
    if not returning:  # the old-SQLite path never starts on add: the lane claims it as before
        assert first.status == "queued" and store.claim_next().id == first.id
        return
    assert first.status == RUNNING and first.started is not None
    assert store.get(first.id) == first  # committed, and what it returned is what is stored
    assert store.claim_next() is None  # nobody else can claim it
    waiting = store.add(workflow={}, prompt={})
    behind = store.add(workflow={}, prompt={}, start=True)
    assert behind.status == "queued" and behind.started is None  # a queued job is ahead: it waits its turn
    assert [store.claim_next().id, store.claim_next().id] == [waiting.id, behind.id]
    with pytest.raises(sqlite3.IntegrityError):
        store.add(workflow={"other": 1}, prompt={}, job_id=first.id, start=True)
    assert store.get(first.id) == first  # a refused duplicate replaced nothing
