"""The job database survives upgrades and damage: real SQLite files, a real server, a real `kiln serve`."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.server.store import SCHEMA_VERSION, StoreDamaged, StoreTooNew, JobStore
from server_helpers import make_registry, show_workflow

# The jobs table as Kiln wrote it before files carried a schema version (user_version 0).
PREVIOUS_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, number REAL NOT NULL, status TEXT NOT NULL, client_id TEXT,
    source_format TEXT NOT NULL DEFAULT 'kiln', workflow TEXT NOT NULL, prompt TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}', outputs_to_execute TEXT NOT NULL DEFAULT '[]',
    force INTEGER NOT NULL DEFAULT 0, extra_data TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL,
    started REAL, finished REAL, outputs TEXT NOT NULL DEFAULT '{}', error TEXT,
    messages TEXT NOT NULL DEFAULT '[]', executed TEXT NOT NULL DEFAULT '[]', cached TEXT NOT NULL DEFAULT '[]');
CREATE INDEX jobs_queue ON jobs(status, number, seq);
CREATE INDEX jobs_finished ON jobs(finished);
"""


def write_previous_version(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(PREVIOUS_SCHEMA)
    conn.execute("INSERT INTO jobs (id, seq, number, status, workflow, prompt, created, finished, outputs)"
                 " VALUES ('old-done', 1, 1, 'succeeded', ?, '{}', 1.0, 2.0, ?)",
                 (json.dumps(show_workflow(4.0)), json.dumps({"3": {"text": ["4"]}})))
    conn.execute("INSERT INTO jobs (id, seq, number, status, workflow, prompt, created)"
                 " VALUES ('old-queued', 2, 2, 'queued', ?, '{}', 3.0)", (json.dumps(show_workflow(5.0)),))
    conn.commit()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    conn.close()


async def test_a_database_written_by_the_previous_version_opens_and_its_jobs_run(aiohttp_client, tmp_path):
    from engine.server.app import make_app
    from server_helpers import wait_status

    db = tmp_path / "data" / "kiln.sqlite3"
    write_previous_version(db)
    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=make_registry())
    client = await aiohttp_client(app)
    done = await (await client.get("/api/jobs/old-done")).json()
    assert done["status"] == "succeeded" and done["outputs"] == {"3": {"text": ["4"]}}
    queued = await wait_status(client, "old-queued")  # the old queue still runs
    assert queued["status"] == "succeeded" and queued["outputs"]["3"]["text"] == ["5"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_database_from_a_newer_kiln_is_refused_not_guessed_at(tmp_path):
    db = tmp_path / "kiln.sqlite3"
    JobStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreTooNew, match="newer than this Kiln"):
        JobStore(db, move_damaged=True)  # never moved aside: it is not damaged
    assert db.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_or_empty_file_is_reported_with_its_path_and_choices(tmp_path, damage):
    db = tmp_path / "kiln.sqlite3"
    store = JobStore(db)
    for i in range(200):
        store.add(workflow={"pad": "x" * 2000, "i": i}, prompt={})
    store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 1000)
    elif damage == "truncated":
        db.write_bytes(data[: len(data) // 3])
    else:
        db.write_bytes(b"")
    with pytest.raises(StoreDamaged) as info:
        JobStore(db)
    text = str(info.value)
    assert str(db) in text and "--move-damaged-db" in text and "keep it and stop" in text
    assert db.exists() and db.stat().st_size == {"garbage": 22000, "truncated": len(data) // 3, "empty": 0}[damage]
    # the other choice: moved aside, an empty store starts, the damaged bytes are kept
    store = JobStore(db, move_damaged=True)
    assert store.moved_aside is not None and store.moved_aside.exists()
    assert store.count(("queued",)) == 0
    store.close()


def test_kiln_serve_stops_on_a_damaged_database_saying_what_to_do(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "kiln.sqlite3").write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--port", "1", "--data", str(data)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "is damaged" in proc.stderr and "0 bytes" in proc.stderr and "Traceback" not in proc.stderr


async def test_a_damaged_page_answers_503_and_the_server_keeps_serving(aiohttp_client, tmp_path):
    from engine.server.app import make_app

    db = tmp_path / "data" / "kiln.sqlite3"
    store = JobStore(db)
    ids = [store.add(workflow={"pad": "y" * 3000, "i": i}, prompt={}).id for i in range(100)]
    for job_id in ids:
        store.finish(job_id, "succeeded")
    store.close()
    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=make_registry())
    client = await aiohttp_client(app)
    assert (await client.get("/api/jobs?limit=5")).status == 200
    # Damage every page but the header while the server runs, then commit a change to the
    # header from another connection, so the server's connections drop their cached pages.
    other = sqlite3.connect(db)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = other.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:
        f.seek(page)
        size = db.stat().st_size
        f.write(os.urandom(size - page))
    other.execute("PRAGMA user_version = 1")
    other.close()
    for path in ("/api/jobs", f"/api/jobs/{ids[0]}", "/api/history", "/queue"):
        r = await client.get(path)
        body = await r.json()
        assert r.status == 503, (path, r.status, body)
        assert body["error"]["type"] == "database_unavailable" and str(db) not in json.dumps(body)
    assert (await client.get("/api/nodes")).status == 200
    from engine.server.state import STATE

    assert app[STATE].worker.lanes[0].thread.is_alive()  # its failed polls are logged, never fatal
