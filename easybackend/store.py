"""
Conversations and their message trees, kept in SQLite through
L{twisted.enterprise.adbapi}.

The pool holds exactly one connection, on one thread: SQLite allows one
writer at a time, so one connection that does everything never waits on
itself, and every call is a short transaction queued on that thread.

Messages form a tree through C{parent_id}; a conversation's C{leaf_id}
names the end of its current branch.  Branching and rollback only move the
leaf: nothing is ever rewritten, so older branches stay readable by id.

Everything database-specific (connection arguments, per-connection
settings, how a write transaction begins, the parameter style, the schema
and how its version is kept) lives in one L{Dialect}; the queries in
L{Store} are written in portable SQL with C{?} placeholders that the
dialect rewrites.  Only SQLite is implemented.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, ClassVar, Sequence

from attrs import define, evolve, field, frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from easybackend.errors import BadRequest, NotFound
from easybackend.model import Conversation, Message, Turn, Usage

__all__ = ["Store", "StoreError", "SQLiteDialect", "SQLITE", "title_for"]

_log = Logger()

#: How long a statement waits for another process's lock before failing.
BUSY_TIMEOUT_MS = 5000
#: The longest title made from a first prompt.
TITLE_LENGTH = 60


class StoreError(Exception):
    """The database cannot be opened or migrated; the message names it."""


# --- the dialect seam --------------------------------------------------------


@frozen
class SQLiteDialect:
    """
    What is specific to SQLite.  A PostgreSQL dialect would offer the same
    attributes: its own DB-API module and connection arguments, its own
    migrations (and a version table instead of C{PRAGMA user_version}), and
    a L{sql} that turns C{?} into C{%s}.
    """

    #: the DB-API module adbapi imports
    module: ClassVar[str] = "sqlite3"
    #: run first in every write transaction; SQLite takes the write lock at
    #: once, so a transaction never fails half-way for want of it
    begin_write: ClassVar[str | None] = "BEGIN IMMEDIATE"

    #: forward migrations: step N (1-based) brings the schema to version N.
    #: Append new steps; never edit a released one.
    migrations: ClassVar[tuple[tuple[str, ...], ...]] = (
        (
            """
            CREATE TABLE conversations (
                id            TEXT PRIMARY KEY,
                title         TEXT NOT NULL DEFAULT '',
                system_prompt TEXT,
                system_tokens INTEGER NOT NULL DEFAULT 0,
                model         TEXT,
                owner         TEXT,
                created       REAL NOT NULL,
                updated       REAL NOT NULL,
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
                created           REAL NOT NULL,
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
    )

    def pool_arguments(self, path: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """
        The arguments for L{adbapi.ConnectionPool}: one connection, usable
        from the pool's thread, in autocommit mode so that transactions
        begin only where L{Store} says (adbapi commits or rolls back).
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
        consistency).  Closes the connection if that fails, so that a file
        that is not a database leaves nothing open.
        """
        try:
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

    def schema_version(self, cursor: Any) -> int:
        """The version of the schema the database holds (0: empty)."""
        cursor.execute("PRAGMA user_version")
        return int(cursor.fetchone()[0])

    def set_schema_version(self, cursor: Any, version: int) -> None:
        """Record the schema's version, inside the migration's transaction."""
        cursor.execute(f"PRAGMA user_version = {int(version)}")

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


#: The only dialect so far.
SQLITE = SQLiteDialect()


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
_PATH_MESSAGE_COLUMNS = ", ".join(
    "m." + name.strip() for name in _MESSAGE_COLUMNS.split(",")
)
#: The path from a message up to its root, with each message's depth
#: (0: the leaf).  One primary-key lookup per step.
_PATH = """
    WITH RECURSIVE path (id, parent_id, depth) AS (
        SELECT id, parent_id, 0 FROM messages
        WHERE id = ? AND conversation_id = ?
      UNION ALL
        SELECT m.id, m.parent_id, path.depth + 1
        FROM messages AS m JOIN path ON m.id = path.parent_id
    )
"""


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


@define
class Store:
    """
    The conversations database.  Every query returns a L{Deferred} that
    fires on the reactor thread; the work runs on the pool's one thread,
    one short transaction per call.  Build it with L{Store.open}.
    """

    _pool: adbapi.ConnectionPool
    _dialect: SQLiteDialect = SQLITE
    #: makes message ids; replaceable for tests
    _new_id: Callable[[], str] = _message_id
    _closed: bool = field(default=False, init=False)

    # -- opening and closing ------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        reactor: Any = None,
        *,
        new_id: Callable[[], str] = _message_id,
    ) -> "Deferred[Store]":
        """
        Open the SQLite database at C{path}, creating the file (not its
        folder) if needed, and bring its schema up to date.  Fails with
        L{StoreError} naming C{path} when the folder is missing or
        unwritable, the file is not a database, or its schema is newer than
        this program.
        """
        return Deferred.fromCoroutine(cls._open(os.fspath(path), reactor, new_id))

    @classmethod
    async def _open(
        cls, path: str, reactor: Any, new_id: Callable[[], str]
    ) -> "Store":
        dialect = SQLITE
        dialect.check_path(path)
        args, kwargs = dialect.pool_arguments(path)
        if reactor is not None:
            kwargs["cp_reactor"] = reactor
        store = cls(adbapi.ConnectionPool(dialect.module, *args, **kwargs),
                    dialect, new_id)
        try:
            await store._migrate()
        except BaseException as e:
            store.close()
            if isinstance(e, (StoreError, store._pool.dbapi.Error)):
                raise StoreError(f"cannot open the database {path}: {e}") from e
            raise
        return store

    async def _migrate(self) -> None:
        """Apply the missing migration steps, each in its own transaction."""
        known = len(self._dialect.migrations)
        for version in range(1, known + 1):
            await self._pool.runInteraction(self._apply, version)

    def _apply(self, txn: Any, version: int) -> None:
        # Read the version inside the write transaction, so that two
        # processes opening the same new file apply each step once.
        self._begin_write(txn)
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
        """Close the connection; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    def ping(self) -> "Deferred[None]":
        """Fire once the database answers a trivial query (readiness)."""
        return self._pool.runInteraction(self._ping)

    def _ping(self, txn: Any) -> None:
        txn.execute("SELECT 1")
        txn.fetchall()

    # -- helpers run on the pool's thread ------------------------------------

    def _begin_write(self, txn: Any) -> None:
        if self._dialect.begin_write:
            txn.execute(self._dialect.begin_write)

    def _execute(self, txn: Any, sql: str, params: Sequence[Any] = ()) -> None:
        txn.execute(self._dialect.sql(sql), tuple(params))

    def _fetch_conversation(self, txn: Any, cid: str) -> Conversation | None:
        self._execute(
            txn,
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?",
            (cid,),
        )
        row = txn.fetchone()
        return None if row is None else _conversation(row)

    # -- reading --------------------------------------------------------------

    def get_conversation(self, cid: str) -> "Deferred[Conversation | None]":
        """The conversation C{cid}, or C{None} if there is none."""
        return self._pool.runInteraction(self._fetch_conversation, cid)

    def get_message(
        self, cid: str, message_id: str
    ) -> "Deferred[Message | None]":
        """
        The message C{message_id} if it belongs to conversation C{cid}, else
        C{None}.
        """
        return self._pool.runInteraction(self._get_message, cid, message_id)

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
        return self._pool.runInteraction(self._branch, cid, leaf_id)

    def _branch(self, txn: Any, cid: str, leaf_id: str | None) -> list[Message]:
        if leaf_id is None:
            return []
        self._execute(
            txn,
            _PATH + f"SELECT {_PATH_MESSAGE_COLUMNS} FROM path"
            " JOIN messages AS m ON m.id = path.id ORDER BY path.depth DESC",
            (leaf_id, cid),
        )
        return [_message(row) for row in txn.fetchall()]

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
        return self._pool.runInteraction(
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
        return self._pool.runInteraction(
            self._commit_turn, turn, now, system_tokens
        )

    def _commit_turn(
        self, txn: Any, turn: Turn, now: float, system_tokens: int
    ) -> tuple[str, str]:
        self._begin_write(txn)
        cid = turn.conversation_id
        if turn.parent_id is not None:
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
        return self._pool.runInteraction(
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
        insert = (
            f"INSERT INTO messages ({_MESSAGE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        cid = turn.conversation_id
        prompt_id = self._new_id()
        self._execute(
            txn,
            insert,
            (prompt_id, cid, parent_id, "user", turn.prompt,
             turn.prompt_tokens, now, None, None, None, None, None),
        )
        answer_id = self._new_id()
        usage = turn.usage
        self._execute(
            txn,
            insert,
            (answer_id, cid, prompt_id, "assistant", turn.answer,
             turn.answer_tokens, now, turn.model or None, turn.finish_reason,
             usage and usage.prompt_tokens, usage and usage.completion_tokens,
             usage and usage.total_tokens),
        )
        return prompt_id, answer_id

    def delete_conversation(self, cid: str) -> "Deferred[bool]":
        """Delete a conversation and all its messages; True if it existed."""
        return self._pool.runInteraction(self._delete, cid)

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
        return self._pool.runInteraction(self._rollback, cid, turns)

    def _rollback(self, txn: Any, cid: str, turns: int) -> Conversation:
        self._begin_write(txn)
        conversation = self._fetch_conversation(txn, cid)
        if conversation is None:
            raise NotFound(f"conversation {cid!r} not found")
        leaf = None
        if conversation.leaf_id is not None:
            self._execute(
                txn,
                _PATH + "SELECT path.parent_id, m.role FROM path"
                " JOIN messages AS m ON m.id = path.id ORDER BY path.depth",
                (conversation.leaf_id, cid),
            )
            left = turns
            for parent_id, role in txn.fetchall():
                if role == "user":
                    left -= 1
                    if left == 0:
                        leaf = parent_id
                        break
        self._execute(
            txn, "UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, cid)
        )
        return evolve(conversation, leaf_id=leaf)
