"""The state store: SQLite, keyed by EventId (lower-cased), shared safely with ``status``.

Invariants (README, What the agent does):
- Every step is written *before* it is carried out (a hook run's row before the hook starts, an
  approval's row before the POST), and its end after, so after ``kill -9`` the store tells
  exactly what finished: a hook run without an end was cut short and runs again; an approval
  without an end may have landed and is never sent again.
- Every state change goes through ``lifecycle.transition``: the table decides, the store records.
- WAL journal and ``synchronous=FULL``: a reader (``status``) never blocks the daemon, and a
  committed step survives a crash or a power cut.
- One connection, used under a lock: the daemon's threads share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import stat
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from agent.errors import AgentError, StateError
from agent.events import ScheduledEvent, parse_document
from agent.hooks import HookResult
from agent.lifecycle import ACTIVE, DONE, IGNORED, transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_key TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    first_status TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    decision TEXT,
    raw TEXT NOT NULL,
    document_incarnation INTEGER NOT NULL,
    first_seen TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    gone_at TEXT,
    occurrence INTEGER NOT NULL DEFAULT 1,
    announced_not_before TEXT
);
CREATE TABLE IF NOT EXISTS hook_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key TEXT NOT NULL REFERENCES events(event_key),
    phase TEXT NOT NULL,
    hook TEXT NOT NULL,
    started_at TEXT NOT NULL,
    deadline TEXT NOT NULL,
    ended_at TEXT,
    outcome TEXT,
    exit_status INTEGER,
    attempts INTEGER,
    output_tail TEXT,
    pid INTEGER,
    process_start TEXT
);
CREATE INDEX IF NOT EXISTS hook_runs_by_event ON hook_runs(event_key, phase);
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key TEXT NOT NULL REFERENCES events(event_key),
    source TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    outcome TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS approvals_by_event ON approvals(event_key);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# The source of an approval row for an event that started early without our POST (approved
# by ``az maintenance scheduledevents acknowledge``, a scheduledEventsPolicy, or another VM of a
# shared event): what was seen, never something this agent sent.
ELSEWHERE = "elsewhere"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class EventRecord:
    key: str
    event_id: str
    event_type: str
    first_status: str
    state: str
    reason: str
    decision: str | None
    event: ScheduledEvent
    document_incarnation: int
    first_seen: str
    updated_at: str
    gone_at: str | None
    occurrence: int = 1
    # The latest NotBefore the document announced: IMDS shows "" once the event has started.
    announced_not_before: str | None = None

    @property
    def ending(self) -> str | None:
        """How the event left the document: ``completed`` after it was seen Started,
        ``cancelled`` while still Scheduled; None while it is there."""
        if self.gone_at is None or self.key.startswith("self-service:"):
            return None
        return "completed" if self.event.status == "Started" else "cancelled"


@dataclass(frozen=True)
class HookRun:
    id: int
    phase: str
    hook: str
    started_at: str
    deadline: str
    ended_at: str | None
    outcome: str | None
    exit_status: int | None
    attempts: int | None
    output_tail: str | None


@dataclass(frozen=True)
class ApprovalRecord:
    id: int
    source: str
    started_at: str
    ended_at: str | None
    outcome: str | None
    error: str | None


class Store:
    """The agent's memory. ``read_only`` opens an existing store for ``status`` and ``history``."""

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        # The unfinished events' states, kept in memory once read: the planner asks for them on
        # every changed document, and this process is their only writer.
        self._unfinished: dict[str, tuple[str, ScheduledEvent | None]] | None = None
        # Why the store works in memory only (the file cannot be opened or written), or None.
        self.degraded: str | None = None
        # (where the damaged file went, what was wrong with it) when it was moved aside.
        self.moved_aside: tuple[str, str] | None = None
        self._read_only = False
        unusable = _not_a_file(self.path)
        try:
            if read_only:
                if unusable is not None:
                    raise StateError(f"state store {self.path} {unusable}", path=self.path)
                if not Path(self.path).exists():
                    raise StateError(
                        f"state store {self.path} does not exist yet (has the agent run?)",
                        path=self.path,
                    )
                uri = _uri(self.path, "mode=ro")
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
                self._db.row_factory = sqlite3.Row
                self._read_only = True
                return
        except (sqlite3.Error, OSError) as error:
            raise StateError(
                f"state store {self.path} cannot be opened: {error} "
                "(check state.path and its directory's permissions)",
                path=self.path,
            ) from None
        if unusable is not None:
            # Never opened, not even to read: a FIFO would block the agent for good.
            self._db = self._memory_copy(None)
            self.degraded = unusable
            return
        try:
            self._db = self._open_file()
            damage = _damage(self._db)
        except sqlite3.Error as error:
            damage = None if _inaccessible(error) else f"{error}"
            if damage is None:
                # Keep handling events: in memory, with whatever the file still lets us read.
                self._db = self._memory_copy(self._readable_copy())
                self.degraded = f"cannot be opened: {error}"
        except OSError as error:
            self._db = self._memory_copy(self._readable_copy())
            self.degraded = f"cannot be opened: {error}"
            damage = None
        if damage is not None:
            self._start_afresh(damage, now())
        self._db.row_factory = sqlite3.Row

    def _open_file(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # In one transaction: a reader (status) sees all the tables or none of them.
            db.executescript(f"BEGIN;\n{SCHEMA}COMMIT;\n")
            self._migrate(db)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            raise
        return db

    def _start_afresh(self, damage: str, now: datetime) -> None:
        """The file cannot be read back: move it aside (never delete it) with its journal,
        and start a fresh one. When even that fails, work in memory."""
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self._db.close()
        aside = f"{self.path}.corrupt-{now.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"
        try:
            for suffix in ("-wal", "-shm", ""):  # the main file last: it decides what was kept
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            self.moved_aside = (aside, damage[:300])
            self._db = self._open_file()
        except (OSError, sqlite3.Error) as error:
            self._db = self._memory_copy(None)
            self.degraded = f"is damaged ({damage[:200]}) and cannot be replaced: {error}"

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a file written by an earlier version up to this schema."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
        if "occurrence" not in columns:
            with db:
                db.execute("ALTER TABLE events ADD COLUMN occurrence INTEGER NOT NULL DEFAULT 1")
        if "announced_not_before" not in columns:
            with db:
                db.execute("ALTER TABLE events ADD COLUMN announced_not_before TEXT")

    def changes(self) -> int:
        """Rows written through this connection so far (to check that idle polls write none)."""
        with self._lock:
            return self._db.total_changes

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, parameters: Any, *, many: bool = False) -> int | None:
        """Run one writing statement in its own transaction; its row id, if any."""
        return self._write_all([(sql, parameters)], many=many)

    def _write_all(self, statements: list[tuple[str, Any]], *, many: bool = False) -> int | None:
        """Run writing statements in one transaction: all of them land, or none; the last
        one's row id, if any.

        When the file refuses the write (disk full, read-only, I/O error), the store copies
        what it holds into memory and carries on there: ``degraded`` says why. Nothing already
        on disk is touched, and the agent keeps handling events.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._db:  # one transaction, committed on success
                        for sql, parameters in statements:
                            if many:
                                cursor = self._db.executemany(sql, parameters)
                            else:
                                cursor = self._db.execute(sql, parameters)
                    return cursor.lastrowid
                except sqlite3.Error as error:
                    if attempt == 2 or self.degraded is not None:
                        raise StateError(
                            f"state store {self.path} cannot be written: {error}", path=self.path
                        ) from None
                    self._fall_back_to_memory(self._memory_copy, f"cannot be written: {error}")
            return None  # not reached: the second attempt returns or raises

    def _readable_copy(self) -> sqlite3.Connection | None:
        """The file opened read-only, if it still can be (read-only directory, say)."""
        for query in ("mode=ro", "immutable=1"):
            try:
                reader = sqlite3.connect(_uri(self.path, query), uri=True, timeout=10)
                reader.execute("SELECT count(*) FROM events").fetchone()
                return reader
            except sqlite3.Error:
                continue
        return None

    def _memory_copy(self, source: sqlite3.Connection | None) -> sqlite3.Connection:
        memory = sqlite3.connect(":memory:", check_same_thread=False)
        if source is not None:
            try:
                source.backup(memory)
            except sqlite3.Error:
                memory.close()
                memory = sqlite3.connect(":memory:", check_same_thread=False)
        memory.executescript(SCHEMA)
        self._migrate(memory)
        memory.row_factory = sqlite3.Row
        return memory

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run one query. When the file fails a read, the store carries on in memory with
        whatever it could still read from it, as after a failed write (``degraded``)."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    return self._db.execute(sql, parameters).fetchall()
                except sqlite3.Error as error:
                    if attempt == 2 or self.degraded is not None or self._read_only:
                        raise StateError(
                            f"state store {self.path} cannot be read: {error}", path=self.path
                        ) from None
                    self._fall_back_to_memory(self._salvage, f"cannot be read: {error}")
            return []  # not reached: the second attempt returns or raises

    def _fall_back_to_memory(
        self, copy: Callable[[sqlite3.Connection], sqlite3.Connection], why: str
    ) -> None:
        """Go on in memory with ``copy`` of the file's connection, which is closed; the file
        itself is left as it is."""
        old = self._db
        self._db = copy(old)
        self.degraded = why
        with contextlib.suppress(sqlite3.Error):
            old.close()

    def _salvage(self, source: sqlite3.Connection) -> sqlite3.Connection:
        """A memory copy of every row ``source`` still gives, table by table, up to the first
        it cannot read."""
        memory = self._memory_copy(None)
        for table in ("events", "hook_runs", "approvals", "meta"):
            try:
                cursor = source.execute(f"SELECT * FROM {table}")  # noqa: S608
                while row := cursor.fetchone():
                    marks = ", ".join("?" * len(row))
                    memory.execute(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", tuple(row))  # noqa: S608
            except sqlite3.Error:
                continue
        memory.commit()
        return memory

    # Events --------------------------------------------------------------------------------

    def discover(
        self,
        event: ScheduledEvent,
        *,
        relevant: bool,
        reason: str,
        document_incarnation: int,
        now: datetime,
        occurrence: int = 1,
        before: tuple[tuple[str, Any], ...] = (),
    ) -> EventRecord:
        state = transition(event.event_id, None, "discovered" if relevant else "discovered_ignored")
        with self._lock:
            self._write_all(
                [
                    *before,
                    _insert_event(
                        event,
                        state,
                        reason=reason,
                        document_incarnation=document_incarnation,
                        now=now,
                        occurrence=occurrence,
                    ),
                ]
            )
        record = self.get(event.key)
        assert record is not None
        with self._lock:
            if self._unfinished is not None:
                self._unfinished[event.key] = (state, event)
        return record

    def discover_ignored(
        self, found: list[tuple[ScheduledEvent, str]], *, document_incarnation: int, now: datetime
    ) -> None:
        """Record new events that are not this VM's, each with why, in one transaction: a
        document can carry thousands of them, and one commit each would be one fsync each."""
        if not found:
            return
        state = transition(found[0][0].event_id, None, "discovered_ignored")
        inserts = [
            _insert_event(
                event,
                state,
                reason=reason,
                document_incarnation=document_incarnation,
                now=now,
                occurrence=1,
            )
            for event, reason in found
        ]
        with self._lock:
            self._write_all([(inserts[0][0], [values for _, values in inserts])], many=True)
            if self._unfinished is not None:
                for event, _ in found:
                    self._unfinished[event.key] = (state, event)

    def recorded(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` the store has a record under (done ones included)."""
        found: set[str] = set()
        for start in range(0, len(keys), 500):  # SQLite allows 999 parameters at most
            chunk = keys[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(
                f"SELECT event_key FROM events WHERE event_key IN ({marks})",  # noqa: S608
                tuple(chunk),
            )
            found.update(row["event_key"] for row in rows)
        return found

    def update_event(self, event: ScheduledEvent, document_incarnation: int, now: datetime) -> None:
        """Keep the latest form of an event (Scheduled to Started, a new type, say)."""
        self.update_events([event], document_incarnation, now)

    def update_events(
        self, events: list[ScheduledEvent], document_incarnation: int, now: datetime
    ) -> None:
        """Keep the latest forms of events, in one transaction."""
        if not events:
            return
        with self._lock:
            self._write(
                "UPDATE events SET raw = ?, event_type = ?, document_incarnation = ?,"
                " updated_at = ?, announced_not_before = COALESCE(?, announced_not_before)"
                " WHERE event_key = ?",
                [
                    (
                        json.dumps(event.to_wire()),
                        event.event_type,
                        document_incarnation,
                        _iso(now),
                        _not_before(event),
                        event.key,
                    )
                    for event in events
                ],
                many=True,
            )
            if self._unfinished is not None:
                for event in events:
                    if event.key in self._unfinished:
                        self._unfinished[event.key] = (self._unfinished[event.key][0], event)

    def new_occurrence(
        self,
        event: ScheduledEvent,
        *,
        relevant: bool,
        reason: str,
        document_incarnation: int,
        now: datetime,
    ) -> EventRecord:
        """The EventId came back after its record was done: keep that record (and its hook
        runs and approvals) under ``<key>#<n>``, and start a new one under the key."""
        with self._lock:
            old = self.get(event.key)
            if old is None:
                raise StateError(f"no event {event.key} in the state store", path=self.path)
            if old.state != DONE:
                raise StateError(
                    f"event {event.key} is {old.state}, not done: no new occurrence yet",
                    path=self.path,
                )
            kept = occurrence_key(old.key, old.occurrence)
            # One transaction with the new record: a crash leaves the old one or both.
            renames = tuple(
                (f"UPDATE {table} SET event_key = ? WHERE event_key = ?", (kept, old.key))  # noqa: S608
                for table in ("events", "hook_runs", "approvals")
            )
            return self.discover(
                event,
                relevant=relevant,
                reason=reason,
                document_incarnation=document_incarnation,
                now=now,
                occurrence=old.occurrence + 1,
                before=renames,
            )

    def move(
        self,
        key: str,
        trigger: str,
        now: datetime,
        *,
        decision: str | None = None,
        reason: str | None = None,
    ) -> str:
        """Apply ``trigger`` to the event's state through the transition table; ``reason``
        replaces why the event is (or is not) ours, when given."""
        key = key.lower()
        with self._lock:
            record = self.get(key)
            if record is None:
                raise StateError(f"no event {key} in the state store", path=self.path)
            state = transition(record.event_id, record.state, trigger)
            self._write(
                "UPDATE events SET state = ?, updated_at = ?, decision = COALESCE(?, decision),"
                " reason = COALESCE(?, reason),"
                " gone_at = CASE WHEN ? THEN ? ELSE gone_at END WHERE event_key = ?",
                (
                    state,
                    _iso(now),
                    decision,
                    reason,
                    trigger.startswith("gone"),
                    _iso(now),
                    key,
                ),
            )
            if self._unfinished is not None:
                if state == DONE:
                    self._unfinished.pop(key, None)
                else:
                    self._unfinished[key] = (state, record.event)
            return state

    def get(self, key: str) -> EventRecord | None:
        rows = self._read("SELECT * FROM events WHERE event_key = ?", (key.lower(),))
        return self._record(rows[0]) if rows else None

    def _record(self, row: sqlite3.Row) -> EventRecord:
        try:
            return _event_record(row)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError, AgentError) as error:
            raise StateError(
                f"state store {self.path} holds a damaged record ({error}); the agent moves the "
                "file aside at its next start",
                path=self.path,
            ) from None

    def events(
        self, *, states: frozenset[str] | None = None, limit: int | None = None
    ) -> list[EventRecord]:
        rows = self._read("SELECT * FROM events ORDER BY first_seen DESC, event_key")
        records = [self._record(row) for row in rows]
        if states is not None:
            records = [record for record in records if record.state in states]
        return records[:limit] if limit is not None else records

    def known_unfinished(self) -> dict[str, tuple[str, ScheduledEvent | None]]:
        """The state and last seen form of every event not done yet, for the planner."""
        with self._lock:
            if self._unfinished is None:
                rows = self._read("SELECT * FROM events WHERE state != 'done'")
                self._unfinished = {
                    row["event_key"]: (row["state"], self._record(row).event) for row in rows
                }
            return dict(self._unfinished)

    # Hook runs -----------------------------------------------------------------------------

    def hook_started(
        self, key: str, phase: str, hook: str, started_at: datetime, deadline: datetime
    ) -> int:
        key = key.lower()
        row_id = self._write(
            "INSERT INTO hook_runs (event_key, phase, hook, started_at, deadline)"
            " VALUES (?, ?, ?, ?, ?)",
            (key, phase, hook, _iso(started_at), _iso(deadline)),
        )
        assert row_id is not None
        return row_id

    def hook_process(self, run_id: int, pid: int, started: str | None) -> None:
        """The process (group) a hook run started: stopped after a crash if still there."""
        self._write(
            "UPDATE hook_runs SET pid = ?, process_start = ? WHERE id = ?", (pid, started, run_id)
        )

    def orphaned_processes(self) -> list[tuple[int, int, str | None]]:
        """(run id, pid, start) of every hook run never recorded back that started a process."""
        rows = self._read(
            "SELECT id, pid, process_start FROM hook_runs"
            " WHERE ended_at IS NULL AND pid IS NOT NULL"
        )
        return [(row["id"], row["pid"], row["process_start"]) for row in rows]

    def hook_finished(self, run_id: int, result: HookResult) -> None:
        self._write(
            "UPDATE hook_runs SET ended_at = ?, outcome = ?, exit_status = ?, attempts = ?,"
            " output_tail = ? WHERE id = ?",
            (
                _iso(result.ended_at),
                result.outcome,
                result.exit_status,
                result.attempts,
                result.output_tail,
                run_id,
            ),
        )

    def hook_runs(self, key: str, phase: str | None = None) -> list[HookRun]:
        key = key.lower()
        sql = "SELECT * FROM hook_runs WHERE event_key = ?"
        parameters: tuple[Any, ...] = (key,)
        if phase is not None:
            sql += " AND phase = ?"
            parameters += (phase,)
        rows = self._read(sql + " ORDER BY id", parameters)
        return [HookRun(**_columns(row, HookRun)) for row in rows]

    def succeeded_hooks(self, key: str, phase: str) -> set[str]:
        return {run.hook for run in self.hook_runs(key, phase) if run.outcome == "succeeded"}

    # Approvals -----------------------------------------------------------------------------

    def approval_started(self, key: str, source: str, now: datetime) -> int:
        key = key.lower()
        row_id = self._write(
            "INSERT INTO approvals (event_key, source, started_at) VALUES (?, ?, ?)",
            (key, source, _iso(now)),
        )
        assert row_id is not None
        return row_id

    def approval_finished(
        self, approval_id: int, outcome: str, now: datetime, error: str | None = None
    ) -> None:
        self._write(
            "UPDATE approvals SET ended_at = ?, outcome = ?, error = ? WHERE id = ?",
            (_iso(now), outcome, error, approval_id),
        )

    def approvals(self, key: str) -> list[ApprovalRecord]:
        key = key.lower()
        rows = self._read("SELECT * FROM approvals WHERE event_key = ? ORDER BY id", (key,))
        return [ApprovalRecord(**_columns(row, ApprovalRecord)) for row in rows]

    def approval_may_have_landed(self, key: str) -> bool:
        """True once a POST succeeded, or was sent and never recorded back (a crash)."""
        return any(
            record.outcome in ("succeeded", None) and record.source != ELSEWHERE
            for record in self.approvals(key)
        )

    def approved_elsewhere(self, key: str, now: datetime) -> None:
        """Record that the event started early without an approval of ours."""
        self._write(
            "INSERT INTO approvals (event_key, source, started_at, ended_at, outcome)"
            " VALUES (?, ?, ?, ?, 'observed')",
            (key.lower(), ELSEWHERE, _iso(now), _iso(now)),
        )

    # Meta ----------------------------------------------------------------------------------

    def set_meta(self, **values: str) -> None:
        self._write(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            list(values.items()),
            many=True,
        )

    def meta(self) -> dict[str, str]:
        return {row["key"]: row["value"] for row in self._read("SELECT key, value FROM meta")}


def occurrence_key(key: str, occurrence: int) -> str:
    """Where an earlier occurrence of ``key`` is kept. No EventId of a document can take it:
    the parser refuses EventIds that hold a NUL."""
    return f"{key}\x00{occurrence}"


def _insert_event(
    event: ScheduledEvent,
    state: str,
    *,
    reason: str,
    document_incarnation: int,
    now: datetime,
    occurrence: int,
) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO events (event_key, event_id, event_type, first_status, state, reason,"
        " raw, document_incarnation, first_seen, updated_at, occurrence, announced_not_before)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.key,
            event.event_id,
            event.event_type,
            event.status,
            state,
            reason,
            json.dumps(event.to_wire()),
            document_incarnation,
            _iso(now),
            _iso(now),
            occurrence,
            _not_before(event),
        ),
    )


def _not_before(event: ScheduledEvent) -> str | None:
    return _iso(event.not_before) if event.not_before is not None else None


def _columns(row: sqlite3.Row, record: type[Any]) -> dict[str, Any]:
    """The row's columns that ``record`` (a dataclass) has fields for."""
    names = {field.name for field in dataclasses.fields(record)}
    # sqlite3.Row iterates over values, not names: keys() is needed here.
    return {name: row[name] for name in row.keys() if name in names}  # noqa: SIM118


def _event_record(row: sqlite3.Row) -> EventRecord:
    raw = json.loads(row["raw"])
    event = parse_document(
        {"DocumentIncarnation": row["document_incarnation"], "Events": [raw]}
    ).events[0]
    return EventRecord(
        key=row["event_key"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        first_status=row["first_status"],
        state=row["state"],
        reason=row["reason"],
        decision=row["decision"],
        event=event,
        document_incarnation=row["document_incarnation"],
        first_seen=row["first_seen"],
        updated_at=row["updated_at"],
        gone_at=row["gone_at"],
        # A file from before occurrences were counted, opened read-only, lacks the column.
        occurrence=row["occurrence"] if "occurrence" in row.keys() else 1,  # noqa: SIM118
        announced_not_before=(
            row["announced_not_before"] if "announced_not_before" in row.keys() else None  # noqa: SIM118
        ),
    )


_STATES = frozenset({*ACTIVE, IGNORED, DONE})
# Errors that say the file cannot be reached (permissions, a full or failing disk, a lock), not
# that what it holds is damaged.
# SQLite's own messages, matched at their start: a message may quote the file's content.
_INACCESSIBLE = (
    "unable to open",
    "attempt to write a readonly",
    "disk i/o error",
    "database is locked",
    "database table is locked",
    "database or disk is full",
)


def _not_a_file(path: str) -> str | None:
    """Why ``path``, or a file SQLite opens beside it (its journal, WAL or shared memory),
    cannot be used (a FIFO, a directory, a symlink loop); None when each is a regular file or
    does not exist yet."""
    if path == ":memory:":
        return None
    for suffix in ("", "-journal", "-wal", "-shm"):
        try:
            mode = os.stat(path + suffix).st_mode
        except FileNotFoundError:
            continue
        except OSError as error:
            return f"cannot be opened: {path}{suffix}: {error.strerror}"
        if stat.S_ISREG(mode):
            continue
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}
        what = kind.get(stat.S_IFMT(mode), "a device or other special file")
        return f"cannot be opened: {path}{suffix} is {what}, not a regular file"
    return None


def _uri(path: str, query: str) -> str:
    """A SQLite URI for ``path``, whatever characters (``?``, ``#``, ``%``) its name holds."""
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?{query}"


def _inaccessible(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return isinstance(error, sqlite3.OperationalError) and text.startswith(_INACCESSIBLE)


def _damage(db: sqlite3.Connection) -> str | None:
    """What is wrong with the store's content, or None: SQLite's own check of the file, then
    every row read back as the agent reads it."""
    db.row_factory = sqlite3.Row
    verdict = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    if verdict != ["ok"]:
        return "; ".join(str(line) for line in verdict)[:300]
    try:
        for row in db.execute("SELECT * FROM events"):
            record = _event_record(row)
            if record.state not in _STATES:
                return f"event {record.key!r} is in an unknown state {record.state!r}"
        for row in db.execute("SELECT * FROM hook_runs"):
            HookRun(**_columns(row, HookRun))
        for row in db.execute("SELECT * FROM approvals"):
            ApprovalRecord(**_columns(row, ApprovalRecord))
        db.execute("SELECT key, value FROM meta").fetchall()
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, AgentError) as error:
        return f"a record cannot be read back: {error}"
    return None
