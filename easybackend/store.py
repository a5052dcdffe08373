"""
Conversations and their message trees, kept in SQLite or PostgreSQL
through L{twisted.enterprise.adbapi}.

L{Store.open} picks the database from its target: a C{postgresql://} (or
C{postgres://}) URL opens PostgreSQL over psycopg 3 with a pool of
connections; anything else is the path of an SQLite file, whose pool holds
exactly one connection on one thread (SQLite allows one writer at a time,
so one connection that does everything never waits on itself).  Every call
is one short transaction on a pool thread.

Messages form a tree through C{parent_id}; a conversation's C{leaf_id}
names the end of its current branch.  Branching and rollback only move the
leaf: nothing is ever rewritten, so older branches stay readable by id.

Everything database-specific (connection arguments, how a write or a
migration transaction begins, the parameter style, column types, how the
schema's version is kept, which errors mean the database is gone, and the
cross-process conversation locks) lives in one L{Dialect}: L{SQLITE} or
L{POSTGRES}.  The schema and the queries in L{Store} are shared, written in
portable SQL with C{?} placeholders that the dialect rewrites.
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from collections import deque
from operator import itemgetter
from typing import Any, Callable, ClassVar, Protocol, Sequence, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from attrs import define, evolve, field, frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from easybackend.errors import (
    BadRequest,
    ConversationChanged,
    EasyBackendError,
    LockTimeout,
    NotFound,
)
from easybackend.model import (
    Conversation,
    History,
    Message,
    Turn,
    TurnContext,
    Usage,
    message_json,
)
from easybackend.threads import ThreadPool

__all__ = [
    "Dialect",
    "Lease",
    "POSTGRES",
    "PostgresDialect",
    "SQLITE",
    "SQLiteDialect",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "conversation_key",
    "dialect_for",
    "title_for",
]

_log = Logger()

#: How long a statement waits for another process's lock before failing.
BUSY_TIMEOUT_MS = 5000
#: The longest title made from a first prompt.
TITLE_LENGTH = 60
#: PostgreSQL: query connections per process, unless told otherwise.
DEFAULT_POOL_SIZE = 5
#: PostgreSQL: conversation locks held or awaited at once per process (each
#: on its own connection), unless told otherwise.
DEFAULT_LOCK_POOL_SIZE = 10
#: PostgreSQL: seconds to wait for a new connection.
CONNECT_TIMEOUT = 10


class StoreError(Exception):
    """The database cannot be opened or migrated; the message names it."""


class StoreUnavailable(StoreError, EasyBackendError):
    """
    The database could not be reached, or the connection broke, during a
    call.  That call failed as a whole; the pool reconnects on the next.
    """

    code = "store_unavailable"


def _advisory_key(space: bytes, name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=space).digest()
    return int.from_bytes(digest, "big", signed=True)


def conversation_key(cid: str) -> int:
    """The signed 64-bit PostgreSQL advisory lock key of conversation C{cid}."""
    return _advisory_key(b"eb.turn", cid)


T = TypeVar("T")

#: The advisory lock key that migrations run under.
MIGRATION_KEY = _advisory_key(b"eb.migrate", "schema")


# --- the dialect seam --------------------------------------------------------

#: Forward migrations, shared by every dialect: step N (1-based) brings the
#: schema to version N; C{{real}} is the dialect's floating-point type and
#: C{{message_json}} its expression for a message row's L{message_json}.
#: Append new steps; never edit a released one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE conversations (
            id            TEXT PRIMARY KEY,
            title         TEXT NOT NULL DEFAULT '',
            system_prompt TEXT,
            system_tokens INTEGER NOT NULL DEFAULT 0,
            model         TEXT,
            owner         TEXT,
            created       {real} NOT NULL,
            updated       {real} NOT NULL,
            leaf_id       TEXT
        )
        """,
        """
        CREATE TABLE messages (
            id                TEXT PRIMARY KEY,
            conversation_id   TEXT NOT NULL
                REFERENCES conversations (id) ON DELETE CASCADE,
            parent_id         TEXT REFERENCES messages (id),
            role              TEXT NOT NULL,
            content           TEXT NOT NULL,
            tokens            INTEGER NOT NULL DEFAULT 0,
            created           {real} NOT NULL,
            model             TEXT,
            finish_reason     TEXT,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            total_tokens      INTEGER
        )
        """,
        "CREATE INDEX conversations_by_updated"
        " ON conversations (updated DESC, id)",
        "CREATE INDEX conversations_by_owner"
        " ON conversations (owner, updated DESC, id)",
        "CREATE INDEX messages_by_conversation"
        " ON messages (conversation_id, created)",
        "CREATE INDEX messages_by_parent ON messages (parent_id)",
    ),
    (
        # Each message's JSON as a request sends it, written with the
        # message: a history read from the store goes upstream as stored
        # (see Store.turn_context).
        "ALTER TABLE messages ADD COLUMN json TEXT NOT NULL DEFAULT ''",
        "UPDATE messages SET json = {message_json}",
    ),
)


#: L{message_json} as an SQLite function on the store's connection.
_SQLITE_MESSAGE_JSON = "easybackend_message_json"


def _migrations(**types: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(s.format(**types) for s in step) for step in _MIGRATIONS)


class Dialect(Protocol):
    """What L{Store} asks of a database."""

    #: the DB-API module adbapi imports
    module: ClassVar[str]
    #: run first in every write transaction, if anything
    begin_write: ClassVar[str | None]
    #: appended to a SELECT that is about to update the rows it reads
    for_update: ClassVar[str]
    #: check a pooled connection is alive before a write, so that a write
    #: on a dead one fails before anything is sent and can be retried
    probe_before_write: ClassVar[bool]
    one_writer: ClassVar[bool]
    migrations: ClassVar[tuple[tuple[str, ...], ...]]

    def check_path(self, target: str) -> None: ...
    def display(self, target: str) -> str: ...
    def pool_arguments(
        self, target: str, pool_size: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]: ...
    def sql(self, text: str) -> str: ...
    def begin_migration(self, cursor: Any) -> None: ...
    def schema_version(self, cursor: Any) -> int: ...
    def set_schema_version(self, cursor: Any, version: int) -> None: ...
    def unavailable(self, error: BaseException) -> bool: ...
    def turn_locks(
        self, target: str, size: int, reactor: Any
    ) -> "_AdvisoryLocks | None": ...
    def history(self, cursor: Any, cid: str) -> "MessageColumns": ...


@frozen
class SQLiteDialect:
    """What is specific to SQLite."""

    module: ClassVar[str] = "sqlite3"
    #: SQLite takes the write lock at once, so a transaction never fails
    #: half-way for want of it
    begin_write: ClassVar[str | None] = "BEGIN IMMEDIATE"
    #: the write lock already covers every row
    for_update: ClassVar[str] = ""
    probe_before_write: ClassVar[bool] = False
    #: one connection does every write: turns waiting for it are committed
    #: together (see L{Store.commit_turn})
    one_writer: ClassVar[bool] = True
    migrations: ClassVar[tuple[tuple[str, ...], ...]] = _migrations(
        real="REAL", message_json=f"{_SQLITE_MESSAGE_JSON}(role, content)"
    )

    def pool_arguments(
        self, path: str, pool_size: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """
        The arguments for L{adbapi.ConnectionPool}: one connection whatever
        C{pool_size} says, usable from the pool's thread, in autocommit mode
        so that transactions begin only where L{Store} says (adbapi commits
        or rolls back).
        """
        return (path,), {
            "check_same_thread": False,
            "isolation_level": None,
            "timeout": BUSY_TIMEOUT_MS / 1000,
            "cp_min": 1,
            "cp_max": 1,
            "cp_openfun": self.prepare,
        }

    def prepare(self, connection: Any) -> None:
        """
        Set up a new connection: wait for locks rather than fail, enforce
        foreign keys, write ahead (readers never block the writer), and
        sync at checkpoints only (a crash may lose the last commits, never
        consistency); L{message_json} for the migration that fills in each
        message's JSON.  Closes the connection if that fails, so that a
        file that is not a database leaves nothing open.
        """
        try:
            connection.create_function(
                _SQLITE_MESSAGE_JSON, 2, message_json, deterministic=True)
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA foreign_keys = ON")
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            connection.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            connection.close()
            raise
        if mode.lower() not in ("wal", "memory"):
            _log.warn("SQLite journal mode is {mode!r}, not WAL", mode=mode)

    def sql(self, text: str) -> str:
        """The query with this dialect's parameter style (SQLite: C{?})."""
        return text

    def begin_migration(self, cursor: Any) -> None:
        """Begin a migration step: take the write lock, so one process migrates."""
        cursor.execute(self.begin_write)

    def schema_version(self, cursor: Any) -> int:
        """The version of the schema the database holds (0: empty)."""
        cursor.execute("PRAGMA user_version")
        return int(cursor.fetchone()[0])

    def set_schema_version(self, cursor: Any, version: int) -> None:
        """Record the schema's version, inside the migration's transaction."""
        cursor.execute(f"PRAGMA user_version = {int(version)}")

    def unavailable(self, error: BaseException) -> bool:
        """
        Whether C{error} means the file cannot be used now (locked, I/O,
        full, unopenable), rather than that a query is wrong.
        """
        import sqlite3

        return isinstance(error, sqlite3.OperationalError) and getattr(
            error, "sqlite_errorname", "SQLITE_ERROR"
        ) != "SQLITE_ERROR"

    def turn_locks(self, path: str, size: int, reactor: Any) -> None:
        """None: one process per file, whose service already serializes turns."""
        return None

    def history(self, cursor: Any, cid: str) -> "MessageColumns":
        """
        The columns of conversation C{cid}'s messages, as one row of joined
        columns: Python's C{sqlite3} lets go of the GIL at every row it
        steps, and while the reactor thread is busy each of those is a
        thread switch (a 1,000-row read took twice as long, and twice the
        CPU, as the joined one).  When a field holds the separator, its
        column splits into too many parts: then the rows are read as rows
        (never for the JSON column, where U+001F is written escaped).
        """
        cursor.execute(_JOINED_HISTORY, (cid,))
        n, *joined = cursor.fetchone()
        if not n:
            return _NO_MESSAGES
        ids, parents, jsons, tokens = [c.split(_SEPARATOR) for c in joined]
        if all(len(c) == n for c in (ids, parents, jsons, tokens)):
            return MessageColumns(ids, parents, jsons, list(map(int, tokens)))
        return _history_rows(cursor, _HISTORY_ROWS, cid)

    def display(self, path: str) -> str:
        """How the database is named in messages."""
        return path

    def check_path(self, path: str) -> None:
        """
        Raise L{StoreError} when C{path} obviously cannot hold a database:
        its folder is missing or unwritable (WAL needs files beside it).
        """
        if path == ":memory:" or path.startswith("file:"):
            return
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise StoreError(
                f"cannot open the database {path}: "
                f"the folder {folder} does not exist"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(
                f"cannot open the database {path}: "
                f"the folder {folder} is not writable"
            )


@frozen
class PostgresDialect:
    """
    What is specific to PostgreSQL, over psycopg 3: C{%s} parameters, plain
    transactions (read committed), a C{schema_version} table, migrations
    under a transaction-level advisory lock, and conversation locks held as
    session-level advisory locks (see L{_AdvisoryLocks}).
    """

    module: ClassVar[str] = "psycopg"
    begin_write: ClassVar[str | None] = None
    for_update: ClassVar[str] = " FOR UPDATE"
    probe_before_write: ClassVar[bool] = True
    one_writer: ClassVar[bool] = False
    migrations: ClassVar[tuple[tuple[str, ...], ...]] = _migrations(
        real="DOUBLE PRECISION",
        message_json="json_build_object('role', role, 'content', content)::text",
    )

    def pool_arguments(
        self, url: str, pool_size: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """
        The arguments for L{adbapi.ConnectionPool}: up to C{pool_size}
        connections, one per pool thread, each in a transaction per call;
        a connection that broke is dropped at its failed call's rollback
        and opened anew on the next call (C{cp_reconnect}).
        """
        return (url,), {
            "autocommit": False,
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "easybackend",
            "cp_min": 1,
            "cp_max": pool_size,
            "cp_reconnect": True,
            "cp_good_sql": "SELECT 1",
        }

    def sql(self, text: str) -> str:
        """The query with psycopg's C{%s} placeholders."""
        return text.replace("%", "%%").replace("?", "%s")

    def begin_migration(self, cursor: Any) -> None:
        """
        Begin a migration step: wait for the migration lock, held until the
        step's transaction ends, so that of several processes starting at
        once one migrates and the others then see its version.
        """
        cursor.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (MIGRATION_KEY,))

    def schema_version(self, cursor: Any) -> int:
        """
        The version of the schema the database holds (0: empty); creates
        the one-row C{schema_version} table if missing, so call it under
        the migration lock.
        """
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " version INTEGER NOT NULL)"
        )
        cursor.execute("SELECT version FROM schema_version WHERE id = 1")
        row = cursor.fetchone()
        return 0 if row is None else int(row[0])

    def set_schema_version(self, cursor: Any, version: int) -> None:
        """Record the schema's version, inside the migration's transaction."""
        cursor.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, %s)"
            " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
            (int(version),),
        )

    def unavailable(self, error: BaseException) -> bool:
        """
        Whether C{error} means the server is gone or refuses work (a lost
        or refused connection, a shutdown, no resources left), rather than
        that a query is wrong.
        """
        import psycopg

        if isinstance(error, psycopg.InterfaceError):
            return True
        if not isinstance(error, psycopg.OperationalError):
            return False
        state = error.sqlstate
        return state is None or (state[:2] in ("08", "53", "57") and state != "57014")

    def history(self, cursor: Any, cid: str) -> "MessageColumns":
        """
        The columns of conversation C{cid}'s messages, from its rows
        (psycopg fetches them in one call).
        """
        return _history_rows(cursor, self.sql(_HISTORY_ROWS), cid)

    def turn_locks(self, url: str, size: int, reactor: Any) -> "_AdvisoryLocks":
        """Conversation locks on up to C{size} connections of their own."""
        import psycopg

        def connect() -> Any:
            return psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name="easybackend-turn-lock",
            )

        return _AdvisoryLocks(connect, size, reactor, self)

    def display(self, url: str) -> str:
        """The URL as named in messages: any password is masked."""
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = userinfo.partition(":")[0] + ":***@" + host
        query = parts.query
        if "password" in query:
            query = urlencode(
                [(k, "***" if k == "password" else v) for k, v in parse_qsl(query)]
            )
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def check_path(self, url: str) -> None:
        """Nothing to check before connecting."""


SQLITE = SQLiteDialect()
POSTGRES = PostgresDialect()

#: The URL schemes that select PostgreSQL.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def dialect_for(target: str) -> Dialect:
    """L{POSTGRES} for a C{postgresql://} or C{postgres://} URL, else L{SQLITE}."""
    return POSTGRES if target.startswith(POSTGRES_SCHEMES) else SQLITE


# --- conversation locks ----------------------------------------------------------


class _DeadConnection(Exception):
    """A pooled connection was found dead before a write was sent."""


@define
class Lease:
    """
    A held conversation lock.  Release it when the turn ends, however it
    ends: C{release} never fails, and calling it again does nothing.  Also
    an async context manager (C{async with lease:}).
    """

    conversation_id: str
    _release: Callable[[], "Deferred[None]"] | None = field(default=None, repr=False)

    def release(self) -> "Deferred[None]":
        """Let the next turn on the conversation have the lock."""
        release, self._release = self._release, None
        return succeed(None) if release is None else release()

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


@define(eq=False)
class _Attempt:
    """One wait for a lock: the connection it waits on, once it has one."""

    #: fires with the connection holding the lock
    result: "Deferred[Any]"
    connection: Any = None
    cancelled: bool = False
    #: fires once a cancel request for the wait has been sent
    interrupted: "Deferred[None] | None" = None


def _cancel_query(connection: Any) -> None:
    try:
        connection.cancel_safe(timeout=CONNECT_TIMEOUT)
    except Exception:
        pass


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:
        pass


class _AdvisoryLocks:
    """
    Conversation locks across processes: a PostgreSQL session-level
    advisory lock on L{conversation_key}, held on a connection of its own.

    These connections are not the query pool's: a turn holds its lock for
    as long as the model answers, and with the pool's N connections held by
    N turns no query could run.  Here at most C{size} locks are held or
    awaited at once, each on its own connection (opened on demand, kept
    idle after release) and blocking calls run on a thread pool of
    C{size} threads; a caller past C{size} waits for a slot, within its
    timeout.  So one process uses at most C{pool_size + size} connections.

    PostgreSQL does the waiting (C{pg_advisory_lock} under a
    C{lock_timeout} of the time left): a release wakes the next waiter at
    once, in arrival order.  Cancelling a wait cancels its query; should
    the lock have been granted just then, it is released.  A process that
    dies loses its session and so its locks.
    """

    def __init__(
        self, connect: Callable[[], Any], size: int, reactor: Any, dialect: Dialect
    ) -> None:
        self._connect = connect
        self._reactor = reactor
        self._dialect = dialect
        self._size = size
        self._slots = DeferredSemaphore(size)
        self._threads = ThreadPool(0, size, name="easybackend-turn-locks")
        self._threads.start()
        self._idle: list[Any] = []
        self._held: set[Any] = set()
        self._attempts: set[_Attempt] = set()
        self._closed = False
        self._shutdown: Any = reactor.addSystemEventTrigger(
            "during", "shutdown", self._close
        )

    async def lock(self, cid: str, timeout: float) -> Lease:
        """Hold C{cid}'s lock; L{LockTimeout} if not had within C{timeout}."""
        if self._closed:
            raise StoreError("the store is closed")
        started = self._reactor.seconds()

        def busy(result: object, _: float) -> Failure:
            return Failure(LockTimeout(
                f"conversation {cid!r} is busy: all {self._size} conversation"
                f" locks of this process are in use (waited {timeout:g}s)"
            ))

        await self._slots.acquire().addTimeout(
            max(timeout, 0.0), self._reactor, onTimeoutCancel=busy
        )
        key = conversation_key(cid)
        try:
            if self._closed:
                raise StoreError("the store is closed")
            left = timeout - (self._reactor.seconds() - started)
            connection = await self._acquire(cid, key, left, timeout)
        except BaseException:
            self._slots.release()
            raise
        self._held.add(connection)
        return Lease(cid, lambda: self._release(connection, key))

    def _acquire(
        self, cid: str, key: int, left: float, timeout: float
    ) -> "Deferred[Any]":
        attempt = _Attempt(Deferred(lambda _: self._interrupt(attempt)))
        if self._idle:
            attempt.connection = self._idle.pop()
        self._attempts.add(attempt)
        work = deferToThreadPool(
            self._reactor, self._threads, self._wait, attempt, key, left
        )
        work.addBoth(self._waited, attempt, cid, key, timeout)
        return attempt.result

    def _wait(self, attempt: _Attempt, key: int, seconds: float) -> None:
        """On a lock thread: take the lock, waiting at most C{seconds}."""
        if attempt.connection is not None:
            try:
                return self._lock_on(attempt, key, seconds)
            except Exception:
                if not attempt.connection.broken:
                    raise
                # An idle connection that died (say, the server restarted):
                # one try on a new one.
                _close_quietly(attempt.connection)
                attempt.connection = None
        attempt.connection = self._connect()
        self._lock_on(attempt, key, seconds)

    @staticmethod
    def _lock_on(attempt: _Attempt, key: int, seconds: float) -> None:
        if attempt.cancelled:
            raise StoreError("the wait was cancelled")
        connection = attempt.connection
        # lock_timeout = 0 would mean "wait for ever"
        ms = max(1, math.ceil(seconds * 1000))
        connection.execute(
            "SELECT set_config('lock_timeout', %s, false)", (f"{ms}ms",)
        )
        connection.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))

    def _interrupt(self, attempt: _Attempt) -> None:
        """The caller gave up: cancel the wait's query, if it is running."""
        attempt.cancelled = True
        if attempt.connection is not None:
            attempt.interrupted = deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(),
                _cancel_query, attempt.connection,
            )

    def _waited(
        self,
        outcome: object,
        attempt: _Attempt,
        cid: str,
        key: int,
        timeout: float,
    ) -> None:
        """Back on the reactor: hand over the connection, or clean up."""
        self._attempts.discard(attempt)
        connection = attempt.connection
        if attempt.cancelled or self._closed:
            # The caller is gone (its Deferred has failed already).  Once
            # any cancel request has landed, give back what was taken.
            after = attempt.interrupted or succeed(None)
            if isinstance(outcome, Failure):
                after.addBoth(lambda _: self._recycle(connection))
            else:
                after.addBoth(lambda _: self._unlock(connection, key))
            return
        if isinstance(outcome, Failure):
            self._recycle(connection)
            attempt.result.errback(self._translate(outcome, cid, timeout))
        else:
            attempt.result.callback(connection)

    def _translate(self, failure: Failure, cid: str, timeout: float) -> Failure:
        import psycopg.errors

        error = failure.value
        if isinstance(error, psycopg.errors.LockNotAvailable):
            return Failure(LockTimeout(
                f"conversation {cid!r} is busy: another turn holds it"
                f" (waited {timeout:g}s)"
            ))
        if isinstance(error, Exception) and self._dialect.unavailable(error):
            return Failure(StoreUnavailable(
                f"cannot lock conversation {cid!r}: the database is"
                f" unavailable: {error}"
            ))
        return failure

    def _release(self, connection: Any, key: int) -> "Deferred[None]":
        self._held.discard(connection)
        if self._closed:
            return succeed(None)  # closing the connection released the lock
        done: Deferred[None] = Deferred()
        self._unlock(connection, key).addBoth(
            lambda _: self._slots.release()
        ).chainDeferred(done)
        # The caller may cancel done; the unlock goes on regardless.
        return done

    def _unlock(self, connection: Any, key: int) -> "Deferred[None]":
        """Release the lock on C{connection}, then keep it idle or close it."""
        if self._closed:
            _close_quietly(connection)
            return succeed(None)

        def unlock() -> bool:
            row = connection.execute(
                "SELECT pg_advisory_unlock(%s::bigint)", (key,)
            ).fetchone()
            return bool(row[0])

        def unlocked(outcome: object) -> None:
            if isinstance(outcome, Failure):
                # Closing the session releases its locks.
                _log.warn(
                    "could not release a conversation lock ({error});"
                    " closing its connection",
                    error=outcome.getErrorMessage(),
                )
                _close_quietly(connection)
                return
            if not outcome:
                _log.warn(
                    "a conversation lock was lost while held"
                    " (its connection broke)"
                )
            self._recycle(connection)

        return deferToThreadPool(
            self._reactor, self._threads, unlock
        ).addBoth(unlocked)

    def _recycle(self, connection: Any) -> None:
        if connection is None:
            return
        if self._closed or connection.broken or connection.closed:
            _close_quietly(connection)
        else:
            self._idle.append(connection)

    def close(self) -> None:
        """Give up every wait and every held lock, and close the connections."""
        if self._shutdown is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown)
        self._close()

    def _close(self) -> None:
        self._shutdown = None
        if self._closed:
            return
        self._closed = True
        for attempt in list(self._attempts):
            attempt.cancelled = True
            if attempt.connection is not None:
                _cancel_query(attempt.connection)
            attempt.result.errback(StoreError("the store was closed"))
        self._threads.stop()
        for connection in [*self._idle, *self._held]:
            _close_quietly(connection)
        self._idle.clear()
        self._held.clear()


# --- the store -----------------------------------------------------------------


def _message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def title_for(prompt: str) -> str:
    """A conversation's title: its first prompt on one line, shortened."""
    line = " ".join(prompt.split())
    if len(line) <= TITLE_LENGTH:
        return line
    return line[: TITLE_LENGTH - 1].rstrip() + "\N{HORIZONTAL ELLIPSIS}"


_CONVERSATION_COLUMNS = (
    "id, title, system_prompt, model, created, updated, leaf_id, owner"
)
_MESSAGE_COLUMNS = (
    "id, conversation_id, parent_id, role, content, tokens, created, model,"
    " finish_reason, prompt_tokens, completion_tokens, total_tokens"
)
#: What a message's row holds beyond L{_MESSAGE_COLUMNS}: its L{message_json}.
_WRITTEN_COLUMNS = _MESSAGE_COLUMNS + ", json"

#: A turn's two messages, the prompt and the answer, in one statement.
_INSERT_TURN = (
    f"INSERT INTO messages ({_WRITTEN_COLUMNS}) VALUES "
    + ", ".join(["(" + ", ".join(["?"] * (_WRITTEN_COLUMNS.count(",") + 1)) + ")"] * 2)
)


@frozen
class _PendingTurn:
    """A turn waiting for the one writer, and whom to tell how it went."""

    turn: Turn
    now: float
    system_tokens: int
    result: "Deferred[tuple[str, str]]"


#: A conversation's messages, through its index, oldest first (so that a
#: conversation never branched comes as its branch: see L{_branch}).
_CONVERSATION_MESSAGES = (
    "SELECT {columns} FROM messages WHERE conversation_id = ? ORDER BY created"
)

#: What a turn reads of its conversation's messages, in L{MessageColumns}' order.
_HISTORY_ROWS = _CONVERSATION_MESSAGES.format(columns="id, parent_id, json, tokens")

#: Between the parts of a column of L{_JOINED_HISTORY}: rare in text.
_SEPARATOR = "\x1f"

#: L{_HISTORY_ROWS} as one row: the count, then each column joined in one
#: pass over the conversation's index (so all in the same order).
_JOINED_HISTORY = (
    "SELECT count(*), group_concat(id, char(31)),"
    " group_concat(ifnull(parent_id, ''), char(31)),"
    " group_concat(json, char(31)), group_concat(tokens, char(31))"
    " FROM messages WHERE conversation_id = ?"
)


@frozen
class MessageColumns:
    """
    A conversation's stored messages as columns, in the same order: ids,
    parent ids (empty or None at a root), each message's JSON as a request
    sends it (L{message_json}) and token counts.
    """

    ids: Sequence[str]
    parents: Sequence[str | None]
    jsons: Sequence[str]
    tokens: Sequence[int]


#: A conversation with no messages, or none read.
_NO_MESSAGES = MessageColumns((), (), (), ())


def _history_rows(cursor: Any, sql: str, cid: str) -> MessageColumns:
    """L{MessageColumns} from the rows of C{sql} (L{_HISTORY_ROWS} in a dialect)."""
    cursor.execute(sql, (cid,))
    rows = cursor.fetchall()
    if not rows:
        return _NO_MESSAGES
    return MessageColumns(*map(list, zip(*rows)))


#: Each message's role and content, for a JSON its row lacks (L{Store._with_json}).
_MESSAGE_TEXTS = "SELECT id, role, content FROM messages WHERE conversation_id = ?"


def _branch(
    ids: Sequence[str], parents: Sequence[str | None], leaf_id: str | None
) -> "range | list[int]":
    """
    The positions of the path from the root down to C{leaf_id}, among a
    conversation's messages C{ids} with their C{parents} (lists).  Empty
    when C{leaf_id} is not among them.

    Most conversations are one chain, read oldest first: then each
    message's parent is the one before it, and the path is the messages
    up to the leaf, found by C loops (list compare, C{index}) with no
    Python step per message.  Any other conversation is walked up from the
    leaf in a dict.  One indexed scan and this are about five times faster
    than a recursive query over 1,000 messages, and a conversation holds
    few messages off its current branch.
    """
    if ids and not parents[0] and ids[:-1] == parents[1:]:
        try:
            return range(ids.index(leaf_id) + 1)
        except ValueError:
            return []
    position = dict(zip(ids, range(len(ids))))
    path: list[int] = []
    at = position.get(leaf_id)  # type: ignore[arg-type]
    while at is not None and len(path) <= len(ids):
        path.append(at)
        at = position.get(parents[at])  # type: ignore[arg-type]
    path.reverse()
    return path


def _pick(items: Sequence[T], path: "range | list[int]") -> list[T]:
    """The items at L{_branch}'s C{path}."""
    if isinstance(path, range):
        return list(items[: len(path)])
    return [items[at] for at in path]


def _walk(
    rows: Sequence[Sequence[Any]], leaf_id: str | None, parent: int
) -> list[Sequence[Any]]:
    """
    L{_branch} among rows whose first column is the id and column
    C{parent} the parent id: the rows of the path, root first.
    """
    ids = list(map(itemgetter(0), rows))
    parents = list(map(itemgetter(parent), rows))
    return _pick(rows, _branch(ids, parents, leaf_id))


def _turn_context(
    found: "tuple[Conversation | None, str | None, MessageColumns | None]",
    cid: str, parent_id: str | None,
) -> TurnContext:
    """
    A L{TurnContext} from what L{Store._turn_rows} read: the branch down to
    the leaf among the conversation's messages, as history.  L{NotFound}
    when C{parent_id} is not among them.
    """
    conversation, leaf, history = found
    if history is None:
        return TurnContext(conversation, leaf, None)
    path = _branch(history.ids, history.parents, leaf)
    if parent_id is not None and not path:
        raise NotFound(f"message {parent_id!r} not found in conversation {cid!r}")
    if conversation is None:
        return TurnContext(None, None, History.stored([], []))
    return TurnContext(
        conversation, leaf,
        History.stored(_pick(history.jsons, path), _pick(history.tokens, path)),
        _pick(history.ids, path))


def _conversation(row: Sequence[Any]) -> Conversation:
    return Conversation(
        id=row[0],
        title=row[1],
        system_prompt=row[2],
        model=row[3],
        created=row[4],
        updated=row[5],
        leaf_id=row[6],
        owner=row[7],
    )


def _message(row: Sequence[Any]) -> Message:
    usage = None
    if row[9] is not None or row[10] is not None or row[11] is not None:
        usage = Usage(row[9] or 0, row[10] or 0, row[11] or 0)
    return Message(
        id=row[0],
        conversation_id=row[1],
        parent_id=row[2],
        role=row[3],
        content=row[4],
        tokens=row[5],
        created=row[6],
        model=row[7],
        finish_reason=row[8],
        usage=usage,
    )


class _ConnectionPool(adbapi.ConnectionPool):
    """adbapi's pool, running its queries in L{easybackend.threads.ThreadPool}."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # adbapi makes its thread pool in __init__ and starts it there when
        # the reactor runs (through start, below), else when it starts.
        super().__init__(*args, **kwargs)
        self._own_threads()

    def start(self) -> None:
        self._own_threads()
        super().start()

    def _own_threads(self) -> None:
        if not self.running and not isinstance(self.threadpool, ThreadPool):
            self.threadpool = ThreadPool(self.min, self.max, name="easybackend-db")


@define
class Store:
    """
    The conversations database.  Every query returns a L{Deferred} that
    fires on the reactor thread; the work runs on a pool thread, one short
    transaction per call.  A call that loses the database fails with
    L{StoreUnavailable}.  Build it with L{Store.open}.
    """

    _pool: adbapi.ConnectionPool
    _dialect: Dialect = SQLITE
    #: makes message ids; replaceable for tests
    _new_id: Callable[[], str] = _message_id
    #: the conversation locks; None where leases are no-ops (SQLite)
    _locks: _AdvisoryLocks | None = None
    _closed: bool = field(default=False, init=False)
    #: turns waiting to be committed (appended on the reactor thread,
    #: taken on the pool's), and those the running commit took
    _turns: deque[_PendingTurn] = field(factory=deque, init=False)
    _batch: list[_PendingTurn] = field(factory=list, init=False)
    _committing: bool = field(default=False, init=False)

    # -- opening and closing ------------------------------------------------

    @classmethod
    def open(
        cls,
        target: str | os.PathLike[str],
        reactor: Any = None,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        lock_pool_size: int = DEFAULT_LOCK_POOL_SIZE,
        new_id: Callable[[], str] = _message_id,
    ) -> "Deferred[Store]":
        """
        Open the database and bring its schema up to date.

        A C{postgresql://user@host:port/dbname} (or C{postgres://}) URL
        opens PostgreSQL with C{pool_size} query connections, plus up to
        C{lock_pool_size} more for L{lock_conversation}; the database must
        exist.  Anything else is the path of an SQLite file, created (not
        its folder) if needed, always on one connection.

        Fails with L{StoreError} naming the database (never its password)
        when it cannot be reached, the folder is missing or unwritable, the
        file is not a database, or its schema is newer than this program.
        """
        if pool_size < 1 or lock_pool_size < 1:
            raise ValueError("pool sizes must be at least 1")
        return Deferred.fromCoroutine(cls._open(
            os.fspath(target), reactor, pool_size, lock_pool_size, new_id
        ))

    @classmethod
    async def _open(
        cls,
        target: str,
        reactor: Any,
        pool_size: int,
        lock_pool_size: int,
        new_id: Callable[[], str],
    ) -> "Store":
        dialect = dialect_for(target)
        name = dialect.display(target)
        dialect.check_path(target)
        args, kwargs = dialect.pool_arguments(target, pool_size)
        if reactor is None:
            from twisted.internet import reactor
        kwargs["cp_reactor"] = reactor
        try:
            pool = _ConnectionPool(dialect.module, *args, **kwargs)
        except ImportError as e:
            raise StoreError(
                f"cannot open the database {name}: the {dialect.module}"
                f" module is missing ({e})"
            ) from e
        store = cls(pool, dialect, new_id)
        try:
            await store._migrate()
        except BaseException as e:
            store.close()
            if isinstance(e, (StoreError, adbapi.ConnectionLost, pool.dbapi.Error)):
                raise StoreError(f"cannot open the database {name}: {e}") from e
            raise
        store._locks = dialect.turn_locks(target, lock_pool_size, reactor)
        return store

    async def _migrate(self) -> None:
        """Apply the missing migration steps, each in its own transaction."""
        known = len(self._dialect.migrations)
        for version in range(1, known + 1):
            await self._pool.runInteraction(self._apply, version)

    def _apply(self, txn: Any, version: int) -> None:
        # Read the version under the migration lock, so that two processes
        # opening the same new database apply each step once.
        self._dialect.begin_migration(txn)
        current = self._dialect.schema_version(txn)
        known = len(self._dialect.migrations)
        if current > known:
            raise StoreError(
                f"the database's schema version {current} is newer than "
                f"this program's ({known})"
            )
        if current >= version:
            return
        for statement in self._dialect.migrations[version - 1]:
            txn.execute(statement)
        self._dialect.set_schema_version(txn, version)

    def close(self) -> None:
        """
        Close the connections, releasing any conversation locks held;
        calling it again does nothing.
        """
        if not self._closed:
            self._closed = True
            self._pool.close()
            if self._locks is not None:
                self._locks.close()

    @property
    def exclusive(self) -> bool:
        """
        Whether this process is the database's only writer (SQLite, one
        process a file), so that what it last wrote is still current; with
        PostgreSQL other replicas write too.
        """
        return self._locks is None

    def ping(self) -> "Deferred[None]":
        """Fire once the database answers a trivial query (readiness)."""
        return self._read(self._ping)

    def _ping(self, txn: Any) -> None:
        txn.execute("SELECT 1")
        txn.fetchall()

    def lock_conversation(self, cid: str, timeout: float) -> "Deferred[Lease]":
        """
        Hold conversation C{cid}'s turn lock, across processes, until the
        L{Lease} is released.  Fails with L{LockTimeout} when it cannot be
        had within C{timeout} seconds, L{StoreUnavailable} when the
        database is gone, L{StoreError} when the store is closed meanwhile;
        cancelling the wait gives up the lock.

        On PostgreSQL this is a session-level advisory lock on a connection
        of its own, outside the query pool (see L{_AdvisoryLocks}).  On
        SQLite the lease is granted at once and does nothing: one process
        uses a file, and its service already serializes turns.
        """
        if self._locks is None:
            return succeed(Lease(cid))
        return Deferred.fromCoroutine(self._locks.lock(cid, timeout))

    # -- running calls ------------------------------------------------------

    def _run(self, interaction: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """Run C{interaction} in one transaction on a pool thread."""
        return self._pool.runInteraction(interaction, *args).addErrback(
            self._lost
        )

    def _read(self, interaction: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """
        Run a read-only C{interaction}; when its connection turns out to be
        dead (the database restarted, or cut the session), run it again on
        another, up to the pool's size, so that dead pooled connections do
        not fail an ask while the database is back.
        Writes are not retried: a connection lost during COMMIT leaves it
        unknown whether the write happened.
        """
        return self._on_fresh_connections(
            lambda: self._run(interaction, *args), StoreUnavailable)

    def _on_fresh_connections(
        self, attempt: Callable[[], "Deferred[Any]"], dead: type[Exception]
    ) -> "Deferred[Any]":
        """
        C{attempt()}, and again while it fails with C{dead}, up to the
        pool's size more times: each pooled connection may be dead, so try
        until a fresh one answers.
        """
        return attempt().addErrback(self._again, attempt, dead, self._pool.max)

    def _again(self, failure: Failure, attempt: Callable[[], "Deferred[Any]"],
               dead: type[Exception], tries: int) -> Any:
        # A method, not a closure that refers to itself: a read leaves no
        # reference cycle behind.
        failure.trap(dead)
        if tries <= 0:
            return failure
        return attempt().addErrback(self._again, attempt, dead, tries - 1)

    def _lost(self, failure: Failure) -> Failure:
        """Turn the driver's errors for a lost database into L{StoreUnavailable}."""
        error = failure.value
        if isinstance(error, _DeadConnection):
            error = error.args[0]
        if isinstance(error, (adbapi.ConnectionLost, _DeadConnection)) or (
            isinstance(error, Exception) and self._dialect.unavailable(error)
        ):
            raise StoreUnavailable(f"the database is unavailable: {error}") from error
        return failure

    def _write(self, interaction: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """
        Run a writing C{interaction} in one transaction.  On a server
        database the connection is probed first: if it is dead, nothing was
        sent, so the write runs again on another connection (up to the
        pool's size).
        """
        if not self._dialect.probe_before_write:
            return self._run(interaction, *args)

        def probed(txn: Any, *a: Any) -> Any:
            try:
                txn.execute("SELECT 1")
                txn.fetchall()
            except Exception as e:
                if self._dialect.unavailable(e):
                    raise _DeadConnection(e) from e
                raise
            return interaction(txn, *a)

        return self._on_fresh_connections(
            lambda: self._pool.runInteraction(probed, *args), _DeadConnection
        ).addErrback(self._lost)

    # -- helpers run on the pool's thread ------------------------------------

    def _begin_write(self, txn: Any) -> None:
        if self._dialect.begin_write:
            txn.execute(self._dialect.begin_write)

    def _execute(self, txn: Any, sql: str, params: Sequence[Any] = ()) -> None:
        txn.execute(self._dialect.sql(sql), tuple(params))

    def _fetch_conversation(
        self, txn: Any, cid: str, for_update: bool = False
    ) -> Conversation | None:
        self._execute(
            txn,
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?"
            + (self._dialect.for_update if for_update else ""),
            (cid,),
        )
        row = txn.fetchone()
        return None if row is None else _conversation(row)

    # -- reading --------------------------------------------------------------

    def get_conversation(self, cid: str) -> "Deferred[Conversation | None]":
        """The conversation C{cid}, or C{None} if there is none."""
        return self._read(self._fetch_conversation, cid)

    def get_message(
        self, cid: str, message_id: str
    ) -> "Deferred[Message | None]":
        """
        The message C{message_id} if it belongs to conversation C{cid}, else
        C{None}.
        """
        return self._read(self._get_message, cid, message_id)

    def _get_message(self, txn: Any, cid: str, message_id: str) -> Message | None:
        self._execute(
            txn,
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE id = ? AND conversation_id = ?",
            (message_id, cid),
        )
        row = txn.fetchone()
        return None if row is None else _message(row)

    def branch(self, cid: str, leaf_id: str | None) -> "Deferred[list[Message]]":
        """
        The messages from the root down to C{leaf_id}, root first, read in
        one query.  Empty when C{leaf_id} is C{None} or is not a message of
        conversation C{cid}.
        """
        return self._read(self._branch, cid, leaf_id)

    def _branch(self, txn: Any, cid: str, leaf_id: str | None) -> list[Message]:
        return [_message(row) for row in self._path(txn, cid, leaf_id, _MESSAGE_COLUMNS)]

    def _path(
        self, txn: Any, cid: str, leaf_id: str | None, columns: str
    ) -> list[Sequence[Any]]:
        """
        The rows of L{_walk}'s path; C{columns} start with C{id} and name
        C{parent_id}.
        """
        if leaf_id is None:
            return []
        self._execute(txn, _CONVERSATION_MESSAGES.format(columns=columns), (cid,))
        parent = [c.strip() for c in columns.split(",")].index("parent_id")
        return _walk(txn.fetchall(), leaf_id, parent)

    def turn_context(
        self, cid: str, parent_id: str | None, known_leaf: str | None = None
    ) -> "Deferred[TurnContext]":
        """
        What a new turn on C{cid} continues, in one read: from C{parent_id}
        when given, else from the conversation's leaf.  The history is left
        out (C{None}) when that message is C{known_leaf}, whose branch the
        caller has.  L{NotFound} when C{parent_id} is not a message of the
        conversation.

        The pool thread only runs the queries (on SQLite, one row of joined
        columns); the branch is found back on the calling thread, so that a
        long history does not keep the reactor thread waiting for the GIL
        while a pool thread runs Python.  The history sends its messages'
        JSON as stored.
        """
        return self._read(self._turn_rows, cid, parent_id, known_leaf).addCallback(
            _turn_context, cid, parent_id)

    def _turn_rows(
        self, txn: Any, cid: str, parent_id: str | None, known_leaf: str | None
    ) -> "tuple[Conversation | None, str | None, MessageColumns | None]":
        """
        The conversation, the message a turn continues, and (unless the
        caller has its branch) the conversation's messages for L{_branch}.
        """
        conversation = self._fetch_conversation(txn, cid)
        if conversation is None:
            return None, None, _NO_MESSAGES
        leaf = conversation.leaf_id if parent_id is None else parent_id
        if leaf is None:
            return conversation, None, _NO_MESSAGES
        if leaf == known_leaf == conversation.leaf_id:
            return conversation, leaf, None
        return conversation, leaf, self._with_json(txn, cid, self._dialect.history(txn, cid))

    def _with_json(self, txn: Any, cid: str, columns: MessageColumns) -> MessageColumns:
        """
        C{columns}, where a message was stored without its JSON (a row another
        program wrote, leaving the column's empty default), with that JSON
        made from the message's role and content, so that its history still
        goes upstream whole.
        """
        if "" not in columns.jsons:
            return columns
        self._execute(txn, _MESSAGE_TEXTS, (cid,))
        made = {row[0]: message_json(row[1], row[2]) for row in txn.fetchall()}
        return evolve(columns, jsons=[
            stored or made[at] for at, stored in zip(columns.ids, columns.jsons)])

    def list_conversations(
        self, limit: int, offset: int = 0, owner: str | None = None
    ) -> "Deferred[list[Conversation]]":
        """
        A page of conversations, most recently updated first (then by id),
        only C{owner}'s when C{owner} is given.  L{BadRequest} when C{limit}
        or C{offset} is negative.
        """
        if limit < 0 or offset < 0:
            return fail(BadRequest("limit and offset must not be negative"))
        where, params = "", [limit, offset]
        if owner is not None:
            where, params = "WHERE owner = ? ", [owner, limit, offset]
        return self._read(
            self._list,
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations {where}"
            "ORDER BY updated DESC, id LIMIT ? OFFSET ?",
            params,
        )

    def _list(self, txn: Any, sql: str, params: list[Any]) -> list[Conversation]:
        self._execute(txn, sql, params)
        return [_conversation(row) for row in txn.fetchall()]

    # -- writing --------------------------------------------------------------

    def commit_turn(
        self, turn: Turn, now: float, *, system_tokens: int = 0
    ) -> "Deferred[tuple[str, str]]":
        """
        Store a finished turn in one transaction: create the conversation
        if it does not exist (its title from the prompt; its system prompt,
        C{system_tokens}, model and owner from C{turn}), add the prompt as a
        child of C{turn.parent_id} (C{None}: a new root) and the answer as
        the prompt's child, and make the answer the leaf.  Fires with the
        new (prompt, answer) message ids.  L{NotFound}, storing nothing,
        when C{turn.parent_id} is not a message of the conversation.
        """
        if not self._dialect.one_writer:
            return self._write(self._commit_turn, turn, now, system_tokens)
        result: Deferred[tuple[str, str]] = Deferred()
        self._turns.append(_PendingTurn(turn, now, system_tokens, result))
        if not self._committing:
            self._commit_waiting()
        return result

    # One writer (SQLite): every turn that waits for it goes into the next
    # transaction.  Under load that turns a queue of commits, each paying
    # a hand-over to the pool's thread, a BEGIN and a COMMIT, and the
    # thread's waits for the GIL at every statement, into one.

    def _commit_waiting(self) -> None:
        self._committing = True
        self._run(self._commit_batch).addCallbacks(
            self._batch_committed, self._batch_failed).addBoth(self._batch_ended)

    def _commit_batch(self, txn: Any) -> list[tuple[_PendingTurn, Any]]:
        """On the pool's thread: the turns waiting now, in one transaction."""
        batch = self._batch = []
        while self._turns:
            batch.append(self._turns.popleft())
        self._begin_write(txn)
        outcomes: list[tuple[_PendingTurn, Any]] = []
        for pending in batch:
            try:
                ids: Any = self._add_turn(
                    txn, pending.turn, pending.now, pending.system_tokens)
            except (NotFound, ConversationChanged) as e:
                ids = e  # refused before this turn wrote anything
            outcomes.append((pending, ids))
        return outcomes

    def _batch_committed(self, outcomes: list[tuple[_PendingTurn, Any]]) -> None:
        for pending, outcome in outcomes:
            if isinstance(outcome, Exception):
                pending.result.errback(outcome)
            else:
                pending.result.callback(outcome)

    def _batch_failed(self, failure: Failure) -> None:
        """
        The transaction failed, so none of its turns was stored.  One turn
        gets the failure; several are committed again one by one, so that
        each gets its own outcome.  A commit that never ran fails every
        waiting turn (the store is closed or lost).
        """
        batch = self._batch
        if not batch:
            while self._turns:
                self._turns.popleft().result.errback(failure)
        elif len(batch) == 1:
            batch[0].result.errback(failure)
        else:
            for pending in batch:
                self._write(
                    self._commit_turn, pending.turn, pending.now, pending.system_tokens
                ).chainDeferred(pending.result)

    def _batch_ended(self, _: object) -> None:
        """The next commit takes the turns that came meanwhile."""
        self._batch = []
        self._committing = False
        if self._turns:
            self._commit_waiting()

    def _commit_turn(
        self, txn: Any, turn: Turn, now: float, system_tokens: int
    ) -> tuple[str, str]:
        self._begin_write(txn)
        return self._add_turn(txn, turn, now, system_tokens)

    def _add_turn(
        self, txn: Any, turn: Turn, now: float, system_tokens: int
    ) -> tuple[str, str]:
        """Within a write transaction: C{turn}'s checks, then its rows."""
        cid = turn.conversation_id
        self._execute(
            txn,
            "SELECT leaf_id FROM conversations WHERE id = ?" + self._dialect.for_update,
            (cid,),
        )
        current = txn.fetchone()
        leaf = current[0] if current is not None else None
        if turn.parent_id is not None and turn.parent_id != leaf:
            # The leaf is always one of the conversation's messages; any
            # other parent is checked.
            self._execute(
                txn,
                "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?",
                (turn.parent_id, cid),
            )
            if txn.fetchone() is None:
                raise NotFound(
                    f"message {turn.parent_id!r} not found in "
                    f"conversation {cid!r}"
                )
        if turn.continues_leaf and leaf != turn.parent_id:
            raise ConversationChanged(
                f"conversation {cid!r} changed while this answer was "
                "written; nothing was stored: ask again")
        if current is None:
            self._create_conversation(
                txn, turn, now, system_tokens, turn.model or None
            )
        ids = self._insert_turn(txn, turn, turn.parent_id, now)
        self._execute(
            txn,
            "UPDATE conversations SET leaf_id = ?, updated = ? WHERE id = ?",
            (ids[1], now, cid),
        )
        return ids

    def import_conversation(
        self,
        turns: Sequence[Turn],
        now: float,
        *,
        model: str | None = None,
        system_tokens: int = 0,
    ) -> "Deferred[bool]":
        """
        Create a conversation from a chain of turns in one transaction,
        each turn continuing the previous one (their C{parent_id}s are
        ignored); for the importer.  The conversation's model is C{model}
        (C{None}: the server's default).  Fires C{False}, storing nothing,
        when the conversation already exists; L{BadRequest} when C{turns}
        is empty or names more than one conversation.
        """
        if not turns:
            return fail(BadRequest("a conversation needs at least one turn"))
        if len({t.conversation_id for t in turns}) != 1:
            return fail(BadRequest("the turns belong to more than one conversation"))
        return self._write(
            self._import, turns, now, model, system_tokens
        )

    def _import(
        self,
        txn: Any,
        turns: Sequence[Turn],
        now: float,
        model: str | None,
        system_tokens: int,
    ) -> bool:
        self._begin_write(txn)
        first = turns[0]
        if not self._create_conversation(txn, first, now, system_tokens, model):
            return False
        leaf = None
        for turn in turns:
            leaf = self._insert_turn(txn, turn, leaf, now)[1]
        self._execute(
            txn,
            "UPDATE conversations SET leaf_id = ? WHERE id = ?",
            (leaf, first.conversation_id),
        )
        return True

    def _create_conversation(
        self,
        txn: Any,
        turn: Turn,
        now: float,
        system_tokens: int,
        model: str | None,
    ) -> bool:
        """Create C{turn}'s conversation unless it exists; True if created."""
        self._execute(
            txn,
            "INSERT INTO conversations"
            " (id, title, system_prompt, system_tokens, model, owner,"
            " created, updated, leaf_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (id) DO NOTHING",
            (
                turn.conversation_id,
                title_for(turn.prompt),
                turn.system_prompt,
                system_tokens,
                model,
                turn.owner,
                now,
                now,
            ),
        )
        return txn.rowcount == 1

    def _insert_turn(
        self, txn: Any, turn: Turn, parent_id: str | None, now: float
    ) -> tuple[str, str]:
        """Insert the prompt under C{parent_id} and the answer under it."""
        cid = turn.conversation_id
        prompt_id = self._new_id()
        answer_id = self._new_id()
        usage = turn.usage
        # both rows in one statement: one step of SQLite (and one wait for
        # the GIL after it) instead of two
        self._execute(
            txn,
            _INSERT_TURN,
            (prompt_id, cid, parent_id, "user", turn.prompt,
             turn.prompt_tokens, now, None, None, None, None, None,
             message_json("user", turn.prompt),
             answer_id, cid, prompt_id, "assistant", turn.answer,
             turn.answer_tokens, now, turn.model or None, turn.finish_reason,
             usage and usage.prompt_tokens, usage and usage.completion_tokens,
             usage and usage.total_tokens, message_json("assistant", turn.answer)),
        )
        return prompt_id, answer_id

    def delete_conversation(self, cid: str) -> "Deferred[bool]":
        """Delete a conversation and all its messages; True if it existed."""
        return self._write(self._delete, cid)

    def _delete(self, txn: Any, cid: str) -> bool:
        self._begin_write(txn)
        self._execute(txn, "DELETE FROM conversations WHERE id = ?", (cid,))
        return txn.rowcount > 0

    def rollback(self, cid: str, turns: int) -> "Deferred[Conversation]":
        """
        Move the conversation's leaf back by C{turns} turns (a prompt and
        its answer), deleting nothing: the new leaf is the parent of the
        C{turns}-th prompt counted back from the leaf.  Rolling back as many
        turns as the branch holds, or more, leaves no leaf (the start).
        Fires with the updated conversation; L{NotFound} for an unknown
        conversation, L{BadRequest} when C{turns} < 1.  C{updated} is left
        alone: a rollback adds nothing.
        """
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
            return fail(BadRequest('"turns" must be an integer of at least 1'))
        return self._write(self._rollback, cid, turns)

    def _rollback(self, txn: Any, cid: str, turns: int) -> Conversation:
        self._begin_write(txn)
        conversation = self._fetch_conversation(txn, cid, for_update=True)
        if conversation is None:
            raise NotFound(f"conversation {cid!r} not found")
        leaf = None
        left = turns
        for _, parent_id, role in reversed(
                self._path(txn, cid, conversation.leaf_id, "id, parent_id, role")):
            if role == "user":
                left -= 1
                if left == 0:
                    leaf = parent_id
                    break
        self._execute(
            txn, "UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, cid)
        )
        return evolve(conversation, leaf_id=leaf)
