"""The durable job queue and history: one SQLite file in the data folder.

Why SQLite: it is embedded (nothing to install or start), a committed row survives
``kill -9`` (WAL mode; ``synchronous=NORMAL`` only risks the last commits on power
loss, not on a process crash), and a conditional ``UPDATE`` makes "claim the next
queued job" and "cancel this job if it is still queued" atomic against each other
without any lock of our own.

Every thread gets its own connection (sqlite3 connections must not be shared
across threads); the event loop, the worker thread and ``asyncio.to_thread`` helpers
each open one lazily.

Restart policy: a job found ``running`` when the store opens was cut off by a crash
or a ``kill -9``. It is marked **failed** with the reason "server restarted while
running" rather than re-queued, so that a job which itself crashes the process
(out of memory, a native fault) cannot crash the server again on every start.
Queued jobs stay queued and run in their original order.

Upgrades and damage: the file carries its schema version (``PRAGMA user_version``)
and :data:`MIGRATIONS` bring an older file up to date in one transaction when it
opens; a file from a newer Kiln is refused rather than guessed at. A file that is
not a database, fails SQLite's ``quick_check``, or is empty (zero bytes: something
truncated it; a new database is never created by an empty file) raises
:class:`StoreDamaged` naming the path and the choices, unless the caller chose to
move it aside and start empty.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

QUEUED, RUNNING, SUCCEEDED, FAILED, INTERRUPTED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "interrupted", "cancelled")
ACTIVE = (QUEUED, RUNNING)
TERMINAL = (SUCCEEDED, FAILED, INTERRUPTED, CANCELLED)
RESTART_REASON = "server restarted while running"

#: At most this many plans validated at submission are kept in memory for their queued jobs
#: (:meth:`JobStore.handed_plan`); a job beyond it is validated again when it runs, as after a restart.
HANDED_PLANS = 1024

#: The schema this code reads and writes; ``PRAGMA user_version`` of a current file.
SCHEMA_VERSION = 3

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    number REAL NOT NULL,
    status TEXT NOT NULL,
    client_id TEXT,
    source_format TEXT NOT NULL DEFAULT 'kiln',
    workflow TEXT NOT NULL,
    prompt TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    outputs_to_execute TEXT NOT NULL DEFAULT '[]',
    force INTEGER NOT NULL DEFAULT 0,
    extra_data TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    outputs TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    messages TEXT NOT NULL DEFAULT '[]',
    executed TEXT NOT NULL DEFAULT '[]',
    cached TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, number, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished);
"""

#: version -> the SQL that brings a file at version - 1 to it. Version 0 is a new file
#: or one written before files were versioned, whose jobs table is version 1's.
MIGRATIONS: dict[int, str] = {
    1: _SCHEMA_V1,
    # 2: the cluster worker that ran a job (kiln serve --cluster); null for the in-process worker
    2: "ALTER TABLE jobs ADD COLUMN worker TEXT",
    # 3: the job keeps going past a failing node (engine.executor, keep_going)
    3: "ALTER TABLE jobs ADD COLUMN keep_going INTEGER NOT NULL DEFAULT 0",
}


class StoreDamaged(Exception):
    """The job database cannot be used as it is; the message names the file and the choices."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(
            f"the job database {path} is damaged: {reason}.\n"
            f"Choose one:\n"
            f"  * keep it and stop (what happened now): repair it, e.g. "
            f"`sqlite3 {path} .recover | sqlite3 repaired.sqlite3`, and put the result in its place;\n"
            f"  * move it aside and start with an empty queue and history: "
            f"`kiln serve --move-damaged-db` (the file is kept as {path.name}.damaged-<time>).")


class StoreTooNew(StoreDamaged):
    """The file was written by a newer Kiln (a higher schema version)."""

    def __init__(self, path: Path, version: int) -> None:
        Exception.__init__(self, f"the job database {path} has schema version {version}, newer than this Kiln "
                                 f"understands ({SCHEMA_VERSION}); run the newer Kiln or use another --data folder")
        self.path, self.reason = path, f"schema version {version}"


@dataclass
class JobRecord:
    """One row of the jobs table, JSON columns decoded."""

    id: str
    seq: int
    number: float
    status: str
    client_id: str | None
    source_format: str
    workflow: dict[str, Any]
    prompt: dict[str, Any]
    params: dict[str, Any]
    outputs_to_execute: list[str]
    force: bool
    extra_data: dict[str, Any]
    created: float
    started: float | None = None
    finished: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    messages: list[Any] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    #: The cluster worker that ran (or runs) the job; None for the in-process worker.
    worker: str | None = None
    #: A failing node skips only what needs its result (engine.executor, keep_going).
    keep_going: bool = False
    #: Problems of nodes no output needs, found at submission (engine.validate.Plan.ignored): the reply
    #: reports them; they are not stored, since the job never runs those nodes.
    ignored: list[Any] = field(default_factory=list, compare=False)

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> "JobRecord":
        def j(name: str, default: Any) -> Any:
            raw = row[name]
            return json.loads(raw) if raw else default

        return cls(
            id=row["id"], seq=row["seq"], number=row["number"], status=row["status"],
            client_id=row["client_id"], source_format=row["source_format"],
            workflow=j("workflow", {}), prompt=j("prompt", {}), params=j("params", {}),
            outputs_to_execute=j("outputs_to_execute", []), force=bool(row["force"]),
            extra_data=j("extra_data", {}), created=row["created"], started=row["started"],
            finished=row["finished"], outputs=j("outputs", {}), error=j("error", None),
            messages=j("messages", []), executed=j("executed", []), cached=j("cached", []),
            worker=row["worker"] if "worker" in row.keys() else None,
            keep_going=bool(row["keep_going"]) if "keep_going" in row.keys() else False,
        )

    @property
    def comfy_number(self) -> int | float:
        return int(self.number) if float(self.number).is_integer() else self.number


class JobStore:
    def __init__(self, path: str | Path, *, move_damaged: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._counter_lock = threading.Lock()
        #: Where a damaged file was moved (``move_damaged``), else None.
        self.moved_aside: Path | None = None
        try:
            conn = self._open_checked()
        except StoreTooNew:
            raise
        except StoreDamaged:
            if not move_damaged:
                raise
            self.moved_aside = self._move_aside()
            conn = self._open_checked()
        row = conn.execute("SELECT COALESCE(MAX(ABS(number)), 0), COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        self._number = int(row[0])
        self._seq = int(row[1])
        #: Ids of jobs that were running when the previous process died.
        self.recovered: list[str] = self._recover()
        #: job id -> the plan its submission validated, in this process only (never written:
        #: a job restored from the file after a restart has none and is validated anew).
        self._plans: OrderedDict[str, Any] = OrderedDict()
        self._plans_lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------

    def _open_checked(self) -> sqlite3.Connection:
        """This thread's connection to a sound, current file (migrated if it was older)."""
        if self.path.exists() and self.path.stat().st_size == 0:
            raise StoreDamaged(self.path, "the file is empty (0 bytes), so its jobs are gone; it was truncated")
        try:
            conn = self._conn()
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise StoreDamaged(self.path, f"SQLite's check failed ({verdict})")
            self._migrate(conn)
        except sqlite3.OperationalError as exc:
            self.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise  # another process holds it: not damage, and nothing to move aside
            raise StoreDamaged(self.path, str(exc)) from None
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreDamaged(self.path, str(exc)) from None
        except StoreDamaged:
            self.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self.close()
            raise StoreTooNew(self.path, version)
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _move_aside(self) -> Path:
        target = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.rename(Path(str(target) + suffix))
        return target

    # -- connections ------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error:
                conn.close()
                raise
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (other threads close theirs on exit)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _recover(self) -> list[str]:
        conn = self._conn()
        ids = [r["id"] for r in conn.execute("SELECT id FROM jobs WHERE status = ?", (RUNNING,))]
        if ids:
            now = time.time()
            error = json.dumps({"node_id": None, "node_type": None, "input_name": None,
                                "message": RESTART_REASON, "exception_type": "ServerRestarted", "traceback": []})
            conn.execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE status = ?",
                         (FAILED, now, error, RUNNING))
            for job_id in ids:
                self.append_message(job_id, ["execution_error", {
                    "prompt_id": job_id, "node_id": None, "node_type": None, "executed": [],
                    "exception_message": RESTART_REASON, "exception_type": "ServerRestarted",
                    "traceback": [], "current_inputs": {}, "current_outputs": [], "timestamp": int(now * 1000)}])
        return ids

    # -- writing ----------------------------------------------------------------------

    def next_number(self, front: bool = False) -> int:
        """ComfyUI's queue number: increasing, negative to jump the queue."""
        with self._counter_lock:
            self._number += 1
            return -self._number if front else self._number

    def add(self, *, workflow: dict, prompt: dict, job_id: str | None = None, number: float | None = None,
            front: bool = False, client_id: str | None = None, source_format: str = "kiln",
            params: dict | None = None, outputs_to_execute: Iterable[str] = (), force: bool = False,
            extra_data: dict | None = None, plan: Any = None, start: bool = False,
            keep_going: bool = False) -> JobRecord:
        """Queue a job; the row is committed before this returns.

        ``plan`` is what validating the job at submission produced: kept in memory for
        the worker (:meth:`handed_plan`), which then need not validate the whole
        workflow again (engine.validate.still_valid says when it may reuse it).

        ``start``: the caller (an idle worker lane) will run the job itself at once, so it is
        written as running, in the same statement, when no queued job is waiting ahead of it
        (one commit instead of a queued row and then its claim); otherwise it is queued as
        usual. The returned record's status says which.
        """
        job_id = job_id or str(uuid.uuid4())
        if number is None:
            number = self.next_number(front)
        with self._counter_lock:
            self._seq += 1
            seq = self._seq
        now = time.time()
        row = {"id": job_id, "seq": seq, "number": float(number), "status": QUEUED, "client_id": client_id,
               "source_format": source_format, "workflow": json.dumps(workflow), "prompt": json.dumps(prompt),
               "params": json.dumps(params or {}), "outputs_to_execute": json.dumps(list(outputs_to_execute)),
               "force": int(force), "extra_data": json.dumps(extra_data or {}, default=str), "created": now,
               "keep_going": int(keep_going)}
        started = None
        if start and self.returning:
            # Running only if nothing is queued: the check and the write are one statement, so no
            # other lane or process can queue or claim in between.
            waiting = "EXISTS (SELECT 1 FROM jobs WHERE status = ?)"
            exprs = [f"CASE WHEN {waiting} THEN ? ELSE ? END" if col == "status" else "?" for col in row]
            values = [v for col, value in row.items() for v in ((QUEUED, QUEUED, RUNNING) if col == "status"
                                                                else (value,))]
            status, started = self._conn().execute(
                f"INSERT INTO jobs ({', '.join(row)}, started) SELECT {', '.join(exprs)}, "
                f"CASE WHEN {waiting} THEN NULL ELSE ? END RETURNING status, started",
                (*values, QUEUED, now)).fetchall()[0]  # all: run the statement to its end (commit)
            row["status"] = status
        else:
            self._conn().execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                 tuple(row.values()))
        # Only once the row is ours: a refused duplicate id must not replace another job's plan. A
        # worker that claims the job before this line (it is woken after add returns) validates it anew.
        if plan is not None:
            self._hand(job_id, plan)
        # The record as a read would give it (decoded from what was written), without reading it back.
        return JobRecord.from_row({**row, "started": started, "finished": None, "outputs": "{}", "error": None,
                                   "messages": "[]", "executed": "[]", "cached": "[]", "worker": None})

    def _hand(self, job_id: str, plan: Any) -> None:
        with self._plans_lock:
            self._plans[job_id] = plan
            while len(self._plans) > HANDED_PLANS:
                self._plans.popitem(last=False)

    def _drop_plan(self, job_id: str) -> None:
        with self._plans_lock:
            self._plans.pop(job_id, None)

    def handed_plan(self, job_id: str) -> Any:
        """The plan validated when job ``job_id`` was submitted to this process, or None.

        Kept until the job is finished or cancelled (a job put back in the queue keeps it).
        """
        with self._plans_lock:
            return self._plans.get(job_id)

    #: ``UPDATE ... RETURNING`` (SQLite 3.35+) claims a job in one statement: one round trip to
    #: the database instead of three on every job. Older SQLite takes the SELECT-then-UPDATE path.
    returning: bool = sqlite3.sqlite_version_info >= (3, 35, 0)

    def claim_next(self) -> JobRecord | None:
        """Atomically move the first queued job to running and return it."""
        conn = self._conn()
        if self.returning:
            # One write statement: SQLite takes the write lock before the subquery reads, so two
            # workers (or processes) never claim the same job, and it commits as a whole or not at all.
            rows = conn.execute(
                "UPDATE jobs SET status = ?, started = ? WHERE id = (SELECT id FROM jobs WHERE status = ?"
                " ORDER BY number, seq LIMIT 1) AND status = ? RETURNING *",
                (RUNNING, time.time(), QUEUED, QUEUED)).fetchall()  # all: run the statement to its end (commit)
            return JobRecord.from_row(rows[0]) if rows else None
        while True:
            row = conn.execute("SELECT id FROM jobs WHERE status = ? ORDER BY number, seq LIMIT 1",
                               (QUEUED,)).fetchone()
            if row is None:
                return None
            cur = conn.execute("UPDATE jobs SET status = ?, started = ? WHERE id = ? AND status = ?",
                               (RUNNING, time.time(), row["id"], QUEUED))
            if cur.rowcount == 1:
                return self.get(row["id"])
            # cancelled between the SELECT and the UPDATE: take the next one

    def claim(self, job_id: str) -> JobRecord | None:
        """Move one given queued job to running (the worker taking it into a batch); None if not queued."""
        conn = self._conn()
        if self.returning:
            rows = conn.execute("UPDATE jobs SET status = ?, started = ? WHERE id = ? AND status = ? RETURNING *",
                                (RUNNING, time.time(), job_id, QUEUED)).fetchall()
            return JobRecord.from_row(rows[0]) if rows else None
        cur = conn.execute("UPDATE jobs SET status = ?, started = ? WHERE id = ? AND status = ?",
                           (RUNNING, time.time(), job_id, QUEUED))
        return self.get(job_id) if cur.rowcount == 1 else None

    def queued(self, limit: int) -> list[JobRecord]:
        """The first ``limit`` queued jobs, in the order they will run."""
        rows = self._conn().execute("SELECT * FROM jobs WHERE status = ? ORDER BY number, seq LIMIT ?",
                                    (QUEUED, int(limit))).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def requeue(self, job_id: str) -> bool:
        """Put a running job back in the queue (its cluster was lost before it finished)."""
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, started = NULL, worker = NULL WHERE id = ? AND status = ?",
            (QUEUED, job_id, RUNNING))
        return cur.rowcount == 1

    def set_worker(self, job_id: str, worker: str) -> None:
        self._conn().execute("UPDATE jobs SET worker = ? WHERE id = ?", (worker, job_id))

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job only if it has not started; False when it is running or done."""
        cur = self._conn().execute("UPDATE jobs SET status = ?, finished = ? WHERE id = ? AND status = ?",
                                   (CANCELLED, time.time(), job_id, QUEUED))
        if cur.rowcount == 1:
            self._drop_plan(job_id)
        return cur.rowcount == 1

    def finish(self, job_id: str, status: str, *, outputs: dict | None = None, error: dict | None = None,
               messages: list | None = None, executed: list | None = None, cached: list | None = None) -> None:
        self._conn().execute(
            "UPDATE jobs SET status = ?, finished = ?, outputs = ?, error = ?, messages = ?, executed = ?,"
            " cached = ? WHERE id = ?",
            (status, time.time(), json.dumps(outputs or {}, default=str),
             json.dumps(error, default=str) if error is not None else None,
             json.dumps(messages or [], default=str), json.dumps(executed or []), json.dumps(cached or []), job_id))
        self._drop_plan(job_id)

    def append_message(self, job_id: str, message: list) -> None:
        conn = self._conn()
        row = conn.execute("SELECT messages FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return
        messages = json.loads(row["messages"] or "[]") + [message]
        conn.execute("UPDATE jobs SET messages = ? WHERE id = ?", (json.dumps(messages, default=str), job_id))

    def delete_finished(self, ids: Iterable[str] | None = None) -> int:
        """Remove finished jobs from history (all of them when ``ids`` is None)."""
        conn = self._conn()
        marks = ",".join("?" * len(TERMINAL))
        if ids is None:
            return conn.execute(f"DELETE FROM jobs WHERE status IN ({marks})", TERMINAL).rowcount
        total = 0
        for job_id in ids:
            total += conn.execute(f"DELETE FROM jobs WHERE id = ? AND status IN ({marks})",
                                  (str(job_id), *TERMINAL)).rowcount
        return total

    # -- reading ----------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_row(row) if row else None

    def active(self) -> list[JobRecord]:
        """Running first, then queued in the order they will run."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY status = 'queued', number, seq", ACTIVE).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def count(self, statuses: Iterable[str]) -> int:
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        return self._conn().execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    def history(self, limit: int | None = None, offset: int = 0, statuses: Iterable[str] = TERMINAL,
                newest_first: bool = True) -> list[JobRecord]:
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY finished {order}, seq {order} LIMIT ? OFFSET ?"
        rows = self._conn().execute(sql, (*statuses, -1 if limit is None else int(limit), int(offset))).fetchall()
        return [JobRecord.from_row(r) for r in rows]
