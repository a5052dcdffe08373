"""
Tests for L{easybackend.store}.

The shared tests are mixins run twice, by an C{SQLite...} class on a fresh
file and by a C{Postgres...} class on a fresh database of the PostgreSQL
server at C{EASYBACKEND_TEST_POSTGRES} (default: the loopback one, trust
authentication).  Without that server the PostgreSQL tests fail: CI must
start it.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import sys
import threading
from types import FunctionType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import easybackend
from easybackend.errors import BadRequest, ConversationChanged, LockTimeout, NotFound
from easybackend.model import Turn, TurnContext, Usage
from easybackend.store import (
    POSTGRES,
    SQLITE,
    Dialect,
    Lease,
    Store,
    StoreError,
    StoreUnavailable,
    _walk,
    title_for,
)

from easybackend.testing.fixtures import eventually  # noqa: E402
from easybackend.testing.postgres import fresh_database, with_database  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(easybackend.__file__)))
T = TypeVar("T")


def turn(
    cid: str = "c1",
    parent_id: str | None = None,
    prompt: str = "hello",
    answer: str = "hi there",
    **kw: Any,
) -> Turn:
    """A finished turn with plausible defaults."""
    values: dict[str, Any] = dict(
        conversation_id=cid,
        parent_id=parent_id,
        prompt=prompt,
        prompt_tokens=len(prompt),
        answer=answer,
        answer_tokens=len(answer),
        model="gpt-test",
        finish_reason="stop",
        usage=Usage(10, 3, 13),
    )
    values.update(kw)
    return Turn(**values)


# --- the two databases ---------------------------------------------------------


class BackendCase(TestCase):
    """What the shared tests need of a database."""

    #: this test's database: a file path or a URL
    target: str
    dialect: Dialect
    IntegrityError: type[Exception]

    async def open(self, target: str | None = None, **kw: Any) -> Store:
        """A store on this test's database, closed when the test ends."""
        store = await Store.open(target or self.target, **kw)
        self.addCleanup(store.close)
        return store

    async def on_cursor(self, f: Callable[[Any], T]) -> T:
        """Run C{f(cursor)} on a connection of its own, as another process would."""
        raise NotImplementedError()

    async def raw(
        self, sql: str, params: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        """The rows of C{sql} (C{?} placeholders), run on a plain connection."""

        def query(cursor: Any) -> list[tuple[Any, ...]]:
            cursor.execute(self.dialect.sql(sql), params)
            return [tuple(row) for row in cursor.fetchall()]

        return await self.on_cursor(query)

    async def schema_version(self) -> int:
        return await self.on_cursor(self.dialect.schema_version)

    async def chain(self, store: Store, turns: int, cid: str = "c1") -> list[str]:
        """Commit C{turns} turns, each after the last; the answers' ids."""
        leaf, answers = None, []
        for n in range(turns):
            _, leaf = await store.commit_turn(
                turn(cid, leaf, f"prompt {n}", f"answer {n}"), 100.0 + n
            )
            answers.append(leaf)
        return answers


class SQLiteCase(BackendCase):
    """Each test on a new SQLite file in its temporary folder."""

    dialect = SQLITE
    IntegrityError = sqlite3.IntegrityError

    def setUp(self) -> None:
        self.target = os.path.abspath(self.mktemp())

    async def on_cursor(self, f: Callable[[Any], T]) -> T:
        connection = sqlite3.connect(self.target)
        try:
            result = f(connection.cursor())
            connection.commit()
            return result
        finally:
            connection.close()


class PostgresCase(BackendCase):
    """Each test on a new database of the test server, dropped at the end."""

    dialect = POSTGRES

    async def setUp(self) -> None:
        import psycopg

        self.target = await fresh_database(self)
        self.IntegrityError = psycopg.IntegrityError

    def connect(self) -> Any:
        """A plain blocking connection to this test's database."""
        import psycopg

        return psycopg.connect(self.target, application_name="test")

    async def on_cursor(self, f: Callable[[Any], T]) -> T:
        def run() -> T:
            with self.connect() as connection:  # commits on success
                return f(connection.cursor())

        return await deferToThread(run)

    async def waiting_locks(self) -> int:
        """How many advisory lock requests on this database wait."""
        [(n,)] = await self.raw(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND NOT granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return int(n)

    async def waiting_is(self, n: int) -> bool:
        return await self.waiting_locks() == n

    async def held_locks(self) -> int:
        """How many advisory locks on this database are held."""
        [(n,)] = await self.raw(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return int(n)

    async def terminate(self, application: str = "easybackend%") -> int:
        """Kill the store's server sessions on this database, as a restart would."""
        rows = await self.raw(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE ?",
            (application,),
        )
        return len(rows)


if TYPE_CHECKING:
    _Shared = BackendCase
else:
    _Shared = object


# --- the shared tests ------------------------------------------------------------


class OpenTests(_Shared):
    """Opening a database: migrations and the life of a store."""

    async def test_empty_database_is_migrated(self) -> None:
        """
        When a new database is opened, then every migration is applied and
        the schema's version records the last one.
        """
        await self.open()
        self.assertEqual(await self.schema_version(), len(self.dialect.migrations))
        self.assertEqual(await self.raw("SELECT count(*) FROM conversations"), [(0,)])
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(0,)])

    async def test_reopen_is_idempotent(self) -> None:
        """
        When a migrated database is opened again, then nothing is applied
        twice and the data is kept.
        """
        store = await self.open()
        await store.commit_turn(turn(), 1.0)
        store.close()
        store = await self.open()
        await self.open()
        self.assertEqual(await self.schema_version(), len(self.dialect.migrations))
        self.assertIsNotNone(await store.get_conversation("c1"))

    async def test_messages_of_version_one(self) -> None:
        """
        When a database of schema version 1 (before each message's JSON was
        stored) holds messages, then opening it fills in their JSON, and a
        turn's history sends them as they were, with new turns after them.
        """
        texts = ["plain", 'say "hi"\n', "é 日本 \u2028 \U0001f600", "tab\t\x1f\x7f", "\\"]

        def version_one(cursor: Any) -> None:
            self.dialect.schema_version(cursor)
            for statement in self.dialect.migrations[0]:
                cursor.execute(statement)
            self.dialect.set_schema_version(cursor, 1)
            cursor.execute(self.dialect.sql(
                "INSERT INTO conversations (id, created, updated, leaf_id)"
                " VALUES ('c1', 1, 1, ?)"), (f"m{len(texts) - 1}",))
            for n, text in enumerate(texts):
                cursor.execute(self.dialect.sql(
                    "INSERT INTO messages (id, conversation_id, parent_id, role,"
                    " content, tokens, created) VALUES (?, 'c1', ?, ?, ?, ?, ?)"),
                    (f"m{n}", f"m{n - 1}" if n else None,
                     "user" if n % 2 == 0 else "assistant", text, n, 1 + n))

        await self.on_cursor(version_one)
        store = await self.open()
        self.assertEqual(await self.schema_version(), len(self.dialect.migrations))
        context = await store.turn_context("c1", None)
        assert context.history is not None
        self.assertEqual([m.content for m in context.history], texts)
        self.assertEqual([json.loads(j)["content"] for j in context.history.jsons], texts)
        self.assertEqual(context.history.total, sum(range(len(texts))))
        await store.commit_turn(turn("c1", "m4", "next", "answer"), 10.0)
        after = await store.turn_context("c1", None)
        self.assertEqual([m.content for m in after.history or []], [*texts, "next", "answer"])

    async def test_newer_schema(self) -> None:
        """
        When the database's schema is newer than this program's, then
        opening fails with a L{StoreError} saying so, naming the database.
        """

        def newer(cursor: Any) -> None:
            self.dialect.schema_version(cursor)
            self.dialect.set_schema_version(cursor, 999)

        await self.on_cursor(newer)
        error = await self.assertFailure(Store.open(self.target), StoreError)
        self.assertIn(self.dialect.display(self.target), str(error))
        self.assertIn("newer", str(error))

    async def test_ping(self) -> None:
        """When the database answers, then C{ping} fires with None."""
        store = await self.open()
        self.assertIsNone(await store.ping())

    async def test_close_twice(self) -> None:
        """When C{close} is called twice, then the second call does nothing."""
        store = await self.open()
        store.close()
        store.close()

    async def test_lease(self) -> None:
        """
        When a conversation lock is taken, then its lease releases once,
        a second release doing nothing, and it can be used with C{async
        with}.
        """
        store = await self.open()
        lease = await store.lock_conversation("c1", 5.0)
        self.assertIsInstance(lease, Lease)
        self.assertEqual(lease.conversation_id, "c1")
        await lease.release()
        await lease.release()
        async with await store.lock_conversation("c1", 5.0):
            await store.commit_turn(turn(), 1.0)
        async with await store.lock_conversation("c1", 5.0):
            pass


class CommitTurnTests(_Shared):
    """Storing a finished turn."""

    async def test_first_turn_creates_conversation(self) -> None:
        """
        When the first turn of an unknown conversation is committed, then
        the conversation is created with the turn's settings, the prompt
        and the answer are stored, and the answer is the leaf.
        """
        store = await self.open()
        prompt_id, answer_id = await store.commit_turn(
            turn(system_prompt="Be brief.", owner="alice"), 42.0, system_tokens=7
        )
        self.assertTrue(prompt_id.startswith("msg_"))
        self.assertNotEqual(prompt_id, answer_id)
        conversation = await store.get_conversation("c1")
        assert conversation is not None
        self.assertEqual(
            (conversation.title, conversation.system_prompt, conversation.model,
             conversation.owner, conversation.created, conversation.updated,
             conversation.leaf_id),
            ("hello", "Be brief.", "gpt-test", "alice", 42.0, 42.0, answer_id),
        )
        self.assertEqual(
            await self.raw("SELECT system_tokens FROM conversations"), [(7,)]
        )
        prompt = await store.get_message("c1", prompt_id)
        answer = await store.get_message("c1", answer_id)
        assert prompt is not None and answer is not None
        self.assertEqual(
            (prompt.role, prompt.content, prompt.tokens, prompt.parent_id,
             prompt.usage),
            ("user", "hello", 5, None, None),
        )
        self.assertEqual(
            (answer.role, answer.content, answer.parent_id, answer.model,
             answer.finish_reason, answer.usage, answer.created),
            ("assistant", "hi there", prompt_id, "gpt-test", "stop",
             Usage(10, 3, 13), 42.0),
        )

    async def test_next_turn_updates_conversation(self) -> None:
        """
        When a turn continues a conversation, then its leaf and C{updated}
        move and its title, settings and C{created} stay.
        """
        store = await self.open()
        _, first = await store.commit_turn(turn(system_prompt="A"), 1.0)
        _, second = await store.commit_turn(
            turn(parent_id=first, prompt="again", system_prompt="B",
                 model="other", usage=None), 2.0
        )
        conversation = await store.get_conversation("c1")
        assert conversation is not None
        self.assertEqual(
            (conversation.title, conversation.system_prompt, conversation.model,
             conversation.created, conversation.updated, conversation.leaf_id),
            ("hello", "A", "gpt-test", 1.0, 2.0, second),
        )
        answer = await store.get_message("c1", second)
        assert answer is not None
        self.assertEqual((answer.model, answer.usage), ("other", None))

    def test_title(self) -> None:
        """
        When a prompt spans lines or is long, then its title is one line
        of at most 60 characters.
        """
        self.assertEqual(title_for("  What is\n\n  Twisted?\t"), "What is Twisted?")
        title = title_for("word " * 40)
        self.assertLessEqual(len(title), 60)
        self.assertTrue(title.startswith("word word"))
        self.assertTrue(title.endswith("\N{HORIZONTAL ELLIPSIS}"))

    async def test_failure_stores_nothing(self) -> None:
        """
        When a statement fails inside the turn's transaction, then neither
        the conversation nor any message is stored.
        """
        store = await self.open(new_id=lambda: "msg_same")
        await self.assertFailure(store.commit_turn(turn(), 1.0), self.IntegrityError)
        self.assertIsNone(await store.get_conversation("c1"))
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(0,)])

    async def test_failure_keeps_conversation(self) -> None:
        """
        When a turn on an existing conversation fails half-way, then the
        conversation's leaf, C{updated} and messages are as before.
        """
        ids = iter(["msg_1", "msg_2", "msg_3", "msg_3"])
        store = await self.open(new_id=lambda: next(ids))
        await store.commit_turn(turn(), 1.0)
        before = await store.get_conversation("c1")
        await self.assertFailure(
            store.commit_turn(turn(parent_id="msg_2"), 2.0), self.IntegrityError
        )
        self.assertEqual(await store.get_conversation("c1"), before)
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(2,)])

    async def test_unknown_parent(self) -> None:
        """
        When the parent is not a message of the conversation, then
        C{commit_turn} fails with L{NotFound} and stores nothing.
        """
        store = await self.open()
        _, other = await store.commit_turn(turn("c2"), 1.0)
        await self.assertFailure(
            store.commit_turn(turn(parent_id="msg_nope"), 2.0), NotFound
        )
        await self.assertFailure(
            store.commit_turn(turn(parent_id=other), 2.0), NotFound
        )
        self.assertIsNone(await store.get_conversation("c1"))
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(2,)])

    async def test_conversation_deleted_during_the_answer(self) -> None:
        """
        When the conversation is deleted while a turn continuing its leaf
        is being answered, then the commit fails with L{NotFound} (not "ask
        again") and nothing is stored.
        """
        store = await self.open()
        _, leaf = await store.commit_turn(turn(), 1.0)
        await store.delete_conversation("c1")
        await self.assertFailure(
            store.commit_turn(turn(parent_id=leaf, continues_leaf=True), 2.0), NotFound
        )
        self.assertIsNone(await store.get_conversation("c1"))
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(0,)])

    async def test_ids_are_unique(self) -> None:
        """When many turns are committed, then all message ids differ."""
        store = await self.open()
        await self.chain(store, 20)
        self.assertEqual(
            await self.raw("SELECT count(DISTINCT id) FROM messages"), [(40,)]
        )


class ReadTests(_Shared):
    """Reading messages and branches."""

    async def test_branch_root_first(self) -> None:
        """
        When a branch is read, then it runs from the root to the leaf, each
        message the child of the one before.
        """
        store = await self.open()
        answers = await self.chain(store, 3)
        messages = await store.branch("c1", answers[-1])
        self.assertEqual(
            [(m.role, m.content) for m in messages],
            [("user", "prompt 0"), ("assistant", "answer 0"),
             ("user", "prompt 1"), ("assistant", "answer 1"),
             ("user", "prompt 2"), ("assistant", "answer 2")],
        )
        self.assertIsNone(messages[0].parent_id)
        for parent, child in zip(messages, messages[1:]):
            self.assertEqual(child.parent_id, parent.id)

    async def test_branching(self) -> None:
        """
        When a turn continues an earlier answer, then it starts a new
        branch that becomes current, and the old branch stays readable.
        """
        store = await self.open()
        answers = await self.chain(store, 3)
        _, fork = await store.commit_turn(
            turn(parent_id=answers[0], prompt="instead"), 200.0
        )
        conversation = await store.get_conversation("c1")
        assert conversation is not None
        self.assertEqual(conversation.leaf_id, fork)
        self.assertEqual(
            [m.content for m in await store.branch("c1", fork)],
            ["prompt 0", "answer 0", "instead", "hi there"],
        )
        self.assertEqual(len(await store.branch("c1", answers[-1])), 6)

    async def test_no_cycles_left(self) -> None:
        """
        When turns are committed and read, then none of it is left for the
        garbage collector: no reference cycle from the store or its thread
        pool (the server collects its older generations rarely, so each
        such cycle would lengthen a pause that every answer in flight
        waits through).
        """
        store = await self.open()
        await self.chain(store, 1)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        await self.chain(store, 2, "c2")
        await store.turn_context("c2", None)
        await store.get_conversation("c2")
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            ours = [getattr(o, "__qualname__", "") for o in gc.garbage
                    if isinstance(o, FunctionType)
                    and o.__module__.startswith(("easybackend", "twisted.python.threadpool"))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        self.assertEqual(ours, [])

    async def test_turn_context(self) -> None:
        """
        When a turn's context is read, then it holds the conversation, the
        message the turn continues (the leaf, or the given parent) and the
        branch down to it as history with each message's stored tokens;
        the history is left out when the caller already has the
        conversation's current leaf, and a parent of another conversation
        is not found.
        """
        store = await self.open()
        answers = await self.chain(store, 3)
        [other] = await self.chain(store, 1, "c2")
        context = await store.turn_context("c1", None)
        assert context.conversation is not None and context.history is not None
        self.assertEqual(context.leaf, answers[-1])
        self.assertEqual(context.conversation.id, "c1")
        stored = await store.branch("c1", answers[-1])
        self.assertEqual([(m.role, m.content, m.tokens) for m in context.history],
                         [(m.role, m.content, m.tokens) for m in stored])
        self.assertEqual(context.ids, [m.id for m in stored])
        earlier = await store.turn_context("c1", answers[0])
        self.assertEqual(earlier.leaf, answers[0])
        self.assertEqual([m.content for m in earlier.history or []],
                         ["prompt 0", "answer 0"])
        known = await store.turn_context("c1", None, answers[-1])
        self.assertEqual((known.leaf, known.history), (answers[-1], None))
        known = await store.turn_context("c1", answers[-1], answers[-1])
        self.assertEqual((known.leaf, known.history), (answers[-1], None))
        moved = await store.turn_context("c1", None, answers[0])
        self.assertEqual(len(moved.history or []), 6)
        self.assertEqual(await store.turn_context("c3", None), TurnContext(None, None, []))
        for cid, parent in [("c1", other), ("c1", "msg_nope"), ("c3", answers[0])]:
            with self.assertRaises(NotFound):
                await store.turn_context(cid, parent)

    async def test_turn_context_any_text(self) -> None:
        """
        When messages hold control characters (the separators a read may
        join columns with), quotes or other text, then a turn's history
        reads them back unchanged, in order, with their tokens, on a
        chain and on a branch.
        """
        store = await self.open()
        texts = ["a\x1fb", "\x1e\x1f", "", "é 日本 \U0001f600", 'q"\\', "\x01\n\x7f"]
        leaf = None
        for n, text in enumerate(texts):
            _, leaf = await store.commit_turn(
                turn("c1", leaf, text, f"answer {n}\x1f", prompt_tokens=n), 100.0 + n)
        stored = await store.branch("c1", leaf)
        context = await store.turn_context("c1", None)
        assert context.history is not None
        self.assertEqual([(m.role, m.content, m.tokens) for m in context.history],
                         [(m.role, m.content, m.tokens) for m in stored])
        self.assertEqual([m.content for m in context.history][::2], texts)
        self.assertEqual(context.ids, [m.id for m in stored])
        _, fork = await store.commit_turn(
            turn("c1", stored[3].id, "fork\x1f", "x"), 200.0)
        forked = await store.turn_context("c1", None)
        self.assertEqual([m.content for m in forked.history or []],
                         [m.content for m in stored[:4]] + ["fork\x1f", "x"])
        self.assertEqual(forked.ids[-1], fork)

    async def test_turn_context_row_without_json(self) -> None:
        """
        When another program stored a message without its JSON (the
        column's empty default), then a turn's history still holds it,
        and sends it as JSON made from its role and content.
        """
        store = await self.open()
        [leaf] = await self.chain(store, 1)
        text = 'written by "another" tool\n'

        def insert(cursor: Any) -> None:
            cursor.execute(self.dialect.sql(
                "INSERT INTO messages (id, conversation_id, parent_id, role,"
                " content, tokens, created) VALUES ('other', 'c1', ?, 'user', ?, 3, 500)"),
                (leaf, text))
            cursor.execute(self.dialect.sql(
                "UPDATE conversations SET leaf_id = 'other' WHERE id = 'c1'"))

        await self.on_cursor(insert)
        self.assertEqual(await self.raw("SELECT json FROM messages WHERE id = 'other'"), [("",)])
        context = await store.turn_context("c1", None)
        assert context.history is not None
        self.assertEqual([(m.role, m.content) for m in context.history],
                         [("user", "prompt 0"), ("assistant", "answer 0"), ("user", text)])
        self.assertEqual(json.loads("[" + context.history.json() + "]")[-1],
                         {"role": "user", "content": text})
        self.assertEqual(context.history.tokens[-1], 3)

    async def test_branch_of_nothing(self) -> None:
        """
        When the leaf is None, unknown, or of another conversation, then the
        branch is empty.
        """
        store = await self.open()
        [answer] = await self.chain(store, 1, "c2")
        self.assertEqual(await store.branch("c1", None), [])
        self.assertEqual(await store.branch("c2", "msg_nope"), [])
        self.assertEqual(await store.branch("c1", answer), [])

    async def test_unknown_ids(self) -> None:
        """
        When a conversation or message is unknown, or the message is of
        another conversation, then reading it gives None.
        """
        store = await self.open()
        [answer] = await self.chain(store, 1, "c2")
        self.assertIsNone(await store.get_conversation("c1"))
        self.assertIsNone(await store.get_message("c2", "msg_nope"))
        self.assertIsNone(await store.get_message("c1", answer))
        self.assertIsNotNone(await store.get_message("c2", answer))

    async def test_long_branch(self) -> None:
        """
        When a conversation holds 1,000 messages, then its branch is read
        whole and in order, rolled back and deleted.
        """
        store = await self.open()
        answers = await self.chain(store, 500)
        messages = await store.branch("c1", answers[-1])
        self.assertEqual(len(messages), 1000)
        self.assertEqual(messages[0].content, "prompt 0")
        self.assertEqual(messages[-1].id, answers[-1])
        self.assertEqual(
            [m.role for m in messages[:4]], ["user", "assistant"] * 2
        )
        conversation = await store.rollback("c1", 250)
        self.assertEqual(conversation.leaf_id, answers[249])
        self.assertTrue(await store.delete_conversation("c1"))
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(0,)])


class WalkTests(SynchronousTestCase):
    """Finding a branch among a conversation's rows (id, parent id)."""

    chain = [("m1", None), ("m2", "m1"), ("m3", "m2"), ("m4", "m3")]

    def test_chain(self) -> None:
        """
        When the rows are one chain, oldest first, then the branch down to
        any of them is the rows up to it, and an unknown leaf has none.
        """
        self.assertEqual(_walk(self.chain, "m4", 1), self.chain)
        self.assertEqual(_walk(self.chain, "m2", 1), self.chain[:2])
        self.assertEqual(_walk(self.chain, "m1", 1), self.chain[:1])
        self.assertEqual(_walk(self.chain, "nope", 1), [])
        self.assertEqual(_walk([], "m1", 1), [])

    def test_not_in_order(self) -> None:
        """
        When a chain's rows do not come oldest first (the clock went
        back), then the branch is still walked from the root to the leaf.
        """
        rows = [self.chain[2], self.chain[0], self.chain[3], self.chain[1]]
        self.assertEqual(_walk(rows, "m4", 1), self.chain)
        self.assertEqual(_walk(rows, "m3", 1), self.chain[:3])

    def test_branched(self) -> None:
        """
        When a conversation was branched (an answer regenerated), then each
        leaf's branch holds only its own ancestors.
        """
        rows = [*self.chain, ("m5", "m2"), ("m6", "m5")]
        self.assertEqual(_walk(rows, "m6", 1), [*self.chain[:2], ("m5", "m2"), ("m6", "m5")])
        self.assertEqual(_walk(rows, "m4", 1), self.chain)

    def test_not_from_a_root(self) -> None:
        """
        When the rows are a chain whose first row has a parent (a broken
        database), then the walk stops where the parents end.
        """
        rows = [("m2", "m1"), ("m3", "m2")]
        self.assertEqual(_walk(rows, "m3", 1), rows)
        self.assertEqual(_walk([("a", "b"), ("b", "a")], "a", 1)[-1], ("a", "b"))


class RollbackTests(_Shared):
    """Moving the leaf back."""

    async def test_one_turn(self) -> None:
        """
        When one turn is rolled back, then the leaf is the answer before the
        last prompt, nothing is deleted, and C{updated} is unchanged.
        """
        store = await self.open()
        answers = await self.chain(store, 3)
        conversation = await store.rollback("c1", 1)
        self.assertEqual(conversation.leaf_id, answers[1])
        self.assertEqual(conversation.updated, 102.0)
        self.assertEqual(await store.get_conversation("c1"), conversation)
        self.assertEqual(len(await store.branch("c1", answers[2])), 6)
        self.assertIsNotNone(await store.get_message("c1", answers[2]))

    async def test_to_the_start(self) -> None:
        """
        When as many turns as the branch holds, or more, are rolled back,
        then the conversation has no leaf, and rolling back again keeps it
        so.
        """
        store = await self.open()
        answers = await self.chain(store, 2)
        self.assertIsNone((await store.rollback("c1", 2)).leaf_id)
        self.assertIsNone((await store.rollback("c1", 1)).leaf_id)
        await store.rollback("c1", 1)
        await store.commit_turn(turn(parent_id=answers[1]), 5.0)
        self.assertIsNone((await store.rollback("c1", 10)).leaf_id)

    async def test_after_branching(self) -> None:
        """
        When the current branch forked from an earlier answer, then rollback
        follows the current branch, not the old one.
        """
        store = await self.open()
        answers = await self.chain(store, 3)
        await store.commit_turn(turn(parent_id=answers[0]), 200.0)
        self.assertEqual((await store.rollback("c1", 1)).leaf_id, answers[0])

    async def test_new_root_after_start(self) -> None:
        """
        When a turn without a parent follows a rollback to the start, then
        it begins a new root and the old turns stay readable.
        """
        store = await self.open()
        answers = await self.chain(store, 2)
        await store.rollback("c1", 5)
        _, answer = await store.commit_turn(turn(prompt="fresh"), 9.0)
        self.assertEqual(
            [m.content for m in await store.branch("c1", answer)],
            ["fresh", "hi there"],
        )
        self.assertEqual(len(await store.branch("c1", answers[1])), 4)

    async def test_unknown_conversation(self) -> None:
        """When the conversation is unknown, then rollback fails with L{NotFound}."""
        store = await self.open()
        await self.assertFailure(store.rollback("nope", 1), NotFound)

    async def test_bad_turns(self) -> None:
        """When C{turns} is below 1, then rollback fails with L{BadRequest}."""
        store = await self.open()
        await self.chain(store, 1)
        await self.assertFailure(store.rollback("c1", 0), BadRequest)
        await self.assertFailure(store.rollback("c1", -3), BadRequest)


class ListAndDeleteTests(_Shared):
    """Listing and deleting conversations."""

    async def test_order_and_paging(self) -> None:
        """
        When conversations are listed, then the most recently updated come
        first, ties by id, a page at a time.
        """
        store = await self.open()
        for cid, now in [("a", 1.0), ("b", 3.0), ("c", 2.0), ("d", 3.0)]:
            await store.commit_turn(turn(cid), now)
        listed = await store.list_conversations(10, 0)
        self.assertEqual([c.id for c in listed], ["b", "d", "c", "a"])
        self.assertEqual(
            [c.id for c in await store.list_conversations(2, 1)], ["d", "c"]
        )
        self.assertEqual(await store.list_conversations(2, 4), [])

    async def test_update_moves_up(self) -> None:
        """When a conversation gets a new turn, then it is listed first."""
        store = await self.open()
        _, leaf = await store.commit_turn(turn("a"), 1.0)
        await store.commit_turn(turn("b"), 2.0)
        await store.commit_turn(turn("a", leaf), 3.0)
        self.assertEqual(
            [c.id for c in await store.list_conversations(10)], ["a", "b"]
        )

    async def test_owner(self) -> None:
        """When an owner is given, then only that owner's conversations are listed."""
        store = await self.open()
        await store.commit_turn(turn("a", owner="alice"), 1.0)
        await store.commit_turn(turn("b", owner="bob"), 2.0)
        await store.commit_turn(turn("c"), 3.0)
        self.assertEqual(
            [c.id for c in await store.list_conversations(10, 0, owner="alice")],
            ["a"],
        )
        self.assertEqual(len(await store.list_conversations(10)), 3)

    async def test_negative_paging(self) -> None:
        """When limit or offset is negative, then listing fails with L{BadRequest}."""
        store = await self.open()
        await self.assertFailure(store.list_conversations(-1, 0), BadRequest)
        await self.assertFailure(store.list_conversations(1, -1), BadRequest)

    async def test_delete_cascades(self) -> None:
        """
        When a conversation is deleted, then its messages go with it, other
        conversations stay, no message is left without its parent, and
        deleting it again reports it was not there.
        """
        store = await self.open()
        answers = await self.chain(store, 3)
        await store.commit_turn(turn(parent_id=answers[0]), 9.0)
        await self.chain(store, 2, "keep")
        self.assertTrue(await store.delete_conversation("c1"))
        self.assertIsNone(await store.get_conversation("c1"))
        self.assertIsNone(await store.get_message("c1", answers[0]))
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(4,)])
        self.assertFalse(await store.delete_conversation("c1"))
        self.assertIsNotNone(await store.get_conversation("keep"))
        self.assertEqual(
            await self.raw(
                "SELECT count(*) FROM messages AS m"
                " LEFT JOIN messages AS p ON p.id = m.parent_id"
                " LEFT JOIN conversations AS c ON c.id = m.conversation_id"
                " WHERE (m.parent_id IS NOT NULL AND p.id IS NULL) OR c.id IS NULL"
            ),
            [(0,)],
        )


class ImportConversationTests(_Shared):
    """Creating a whole conversation at once, for the importer."""

    async def test_chain(self) -> None:
        """
        When turns are imported, then they form one chain whose last answer
        is the leaf, with the given conversation model.
        """
        store = await self.open()
        turns = [turn("old", prompt=f"p{n}", model="") for n in range(3)]
        self.assertTrue(await store.import_conversation(turns, 5.0))
        conversation = await store.get_conversation("old")
        assert conversation is not None
        self.assertIsNone(conversation.model)
        messages = await store.branch("old", conversation.leaf_id)
        self.assertEqual(
            [m.content for m in messages if m.role == "user"], ["p0", "p1", "p2"]
        )
        self.assertIsNone(messages[-1].model)

    async def test_existing(self) -> None:
        """
        When the conversation already exists, then the import stores nothing
        and fires False.
        """
        store = await self.open()
        await self.chain(store, 1, "old")
        self.assertFalse(await store.import_conversation([turn("old")], 5.0))
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(2,)])

    async def test_bad_turns(self) -> None:
        """
        When there are no turns, or they name two conversations, then the
        import fails with L{BadRequest}.
        """
        store = await self.open()
        await self.assertFailure(store.import_conversation([], 1.0), BadRequest)
        await self.assertFailure(
            store.import_conversation([turn("a"), turn("b")], 1.0), BadRequest
        )


CRASHING_CHILD = """
import os, sys
from twisted.internet import task
from easybackend.model import Turn
from easybackend.store import Store

made = 0

def new_id():
    global made
    made += 1
    if made == 4:
        # the second turn's prompt is written, its transaction still open
        os._exit(3)
    return f"msg_{made}"

async def main(reactor, target):
    store = await Store.open(target, reactor, new_id=new_id)
    await store.commit_turn(Turn("c1", None, "one", 1, "answer one", 1,
                                 "m", "stop", None), 1.0)
    await store.commit_turn(Turn("c1", "msg_2", "two", 1, "answer two", 1,
                                 "m", "stop", None), 2.0)

task.react(main, [sys.argv[1]])
"""


class CrashTests(_Shared):
    """What a crash leaves behind."""

    async def check_after_crash(self, store: Store) -> None:
        """Checks of the database's own, after the crash."""

    async def test_crash_mid_turn(self) -> None:
        """
        When the process dies in the middle of a turn's transaction, then
        the database holds the earlier turn whole and nothing of the
        interrupted one.
        """
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", CRASHING_CHILD, self.target],
            env={**os.environ, "PYTHONPATH": ROOT},
            # no path: a fork in this many-threaded process (grpc) is risky;
            # without a cwd change Twisted uses posix_spawn
            reactor=reactor,
        )
        self.assertEqual(code, 3, err)
        store = await self.open()
        conversation = await store.get_conversation("c1")
        assert conversation is not None
        self.assertEqual(conversation.leaf_id, "msg_2")
        self.assertEqual(
            [m.id for m in await store.branch("c1", "msg_2")], ["msg_1", "msg_2"]
        )
        self.assertIsNone(await store.get_message("c1", "msg_3"))
        await self.check_after_crash(store)


class SQLiteOpenTests(OpenTests, SQLiteCase):
    """Opening an SQLite file: connection settings and clear file errors."""

    async def test_connection_settings(self) -> None:
        """
        When a store is open, then its connection writes ahead, enforces
        foreign keys, waits for locks and syncs at checkpoints only.
        """
        store = await self.open()
        pool = store._pool
        self.assertEqual(await self.raw("PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(await pool.runQuery("PRAGMA foreign_keys"), [(1,)])
        self.assertEqual(await pool.runQuery("PRAGMA synchronous"), [(1,)])
        [(timeout,)] = await pool.runQuery("PRAGMA busy_timeout")
        self.assertGreater(timeout, 0)

    async def test_one_connection(self) -> None:
        """
        When many calls run at once, then they share the pool's one
        connection, whatever pool size was asked for.
        """
        store = await self.open(pool_size=4)
        await self.chain(store, 3)
        self.assertEqual(len(store._pool.connections), 1)
        self.assertEqual(store._pool.threadpool.max, 1)

    async def test_missing_folder(self) -> None:
        """
        When the database's folder does not exist, then opening fails with a
        L{StoreError} naming the path, and the folder is not created.
        """
        path = os.path.join(self.mktemp(), "db.sqlite3")
        error = await self.assertFailure(Store.open(path), StoreError)
        self.assertIn(path, str(error))
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    async def test_folder_is_a_file(self) -> None:
        """
        When the database's "folder" is a file, then opening fails with a
        L{StoreError} naming the path.
        """
        folder = self.mktemp()
        with open(folder, "w"):
            pass
        path = os.path.join(folder, "db.sqlite3")
        error = await self.assertFailure(Store.open(path), StoreError)
        self.assertIn(path, str(error))

    async def test_unwritable_folder(self) -> None:
        """
        When the database's folder is not writable, then opening fails with
        a L{StoreError} naming the path.
        """
        if os.geteuid() == 0:
            raise self.skipTest("root can write to any folder")
        folder = self.mktemp()
        os.mkdir(folder, 0o500)
        self.addCleanup(os.chmod, folder, 0o700)
        path = os.path.join(folder, "db.sqlite3")
        error = await self.assertFailure(Store.open(path), StoreError)
        self.assertIn(path, str(error))

    async def test_not_a_database(self) -> None:
        """
        When the file is not an SQLite database, then opening fails with a
        L{StoreError} naming the path, and the file is left as it was.
        """
        junk = b"this is not a database\n" * 100
        with open(self.target, "wb") as f:
            f.write(junk)
        error = await self.assertFailure(Store.open(self.target), StoreError)
        self.assertIn(self.target, str(error))
        with open(self.target, "rb") as f:
            self.assertEqual(f.read(), junk)

    async def test_lock_is_a_no_op(self) -> None:
        """
        When two holders ask for one conversation's lock on SQLite, then
        both get it at once: one process uses the file, and its service
        serializes turns.
        """
        store = await self.open()
        first = await store.lock_conversation("c1", 0.0)
        second = await store.lock_conversation("c1", 0.0)
        await gatherResults([first.release(), second.release()])


class PostgresOpenTests(OpenTests, PostgresCase):
    """Opening PostgreSQL: the URL, the pool, errors, concurrent migrations."""

    async def test_postgres_scheme(self) -> None:
        """When the URL starts with C{postgres://}, then PostgreSQL is opened too."""
        store = await self.open(self.target.replace("postgresql://", "postgres://", 1))
        self.assertEqual(store._pool.dbapiName, "psycopg")
        self.assertEqual(await self.schema_version(), len(POSTGRES.migrations))

    async def test_pool_size(self) -> None:
        """
        When a pool size is given, then at most that many connections run
        queries, and conversation locks use connections of their own.
        """
        store = await self.open(pool_size=3, lock_pool_size=2)
        self.assertEqual(store._pool.threadpool.max, 3)
        await gatherResults([store.commit_turn(turn(f"c{n}"), 1.0) for n in range(12)])
        self.assertLessEqual(len(store._pool.connections), 3)
        async with await store.lock_conversation("c1", 5.0):
            rows = await self.raw(
                "SELECT application_name, count(*) FROM pg_stat_activity"
                " WHERE datname = current_database()"
                " AND application_name LIKE 'easybackend%'"
                " GROUP BY application_name"
            )
        counts = dict(rows)
        self.assertLessEqual(counts["easybackend"], 3)
        self.assertEqual(counts["easybackend-turn-lock"], 1)

    async def test_unreachable(self) -> None:
        """
        When the server cannot be reached, then opening fails with a
        L{StoreError} naming the URL with its password masked.
        """
        url = "postgresql://postgres:sekret@127.0.0.1:1/nothing"
        error = await self.assertFailure(Store.open(url), StoreError)
        self.assertIn("postgresql://postgres:***@127.0.0.1:1/nothing", str(error))
        self.assertNotIn("sekret", str(error))

    async def test_missing_database(self) -> None:
        """
        When the database does not exist, then opening fails with a
        L{StoreError} naming it.
        """
        url = with_database(self.target, "eb_test_missing")
        error = await self.assertFailure(Store.open(url), StoreError)
        self.assertIn(url, str(error))
        self.assertIn("does not exist", str(error))

    async def test_concurrent_migrations(self) -> None:
        """
        When two stores open one new database at the same moment, then
        both open, and each migration step is applied once.
        """
        stores = await gatherResults(
            [Store.open(self.target) for _ in range(2)], consumeErrors=True
        )
        for store in stores:
            self.addCleanup(store.close)
        self.assertEqual(await self.schema_version(), len(POSTGRES.migrations))
        await stores[0].commit_turn(turn(), 1.0)
        self.assertIsNotNone(await stores[1].get_conversation("c1"))

    async def test_migration_waits(self) -> None:
        """
        When another process holds the migration lock, then opening waits
        for it, and then sees the version that process recorded instead of
        migrating again.
        """
        connection = self.connect()
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        await deferToThread(POSTGRES.begin_migration, cursor)
        opening = Store.open(self.target)
        await eventually(
            lambda: self.waiting_is(1),
            "the opening store waits for the migration lock",
        )
        self.assertNoResult(opening)

        def migrate() -> None:
            POSTGRES.schema_version(cursor)
            for step in POSTGRES.migrations:
                for statement in step:
                    cursor.execute(statement)
            POSTGRES.set_schema_version(cursor, len(POSTGRES.migrations))
            connection.commit()

        await deferToThread(migrate)
        store = await opening
        self.addCleanup(store.close)
        self.assertIsNone(await store.ping())
        self.assertEqual(await self.schema_version(), len(POSTGRES.migrations))


class SQLiteCommitTurnTests(CommitTurnTests, SQLiteCase):
    """Storing a finished turn, on SQLite."""

    async def test_failure_leaves_file_intact(self) -> None:
        """
        When a statement fails inside the turn's transaction, then the file
        passes its integrity check.
        """
        store = await self.open(new_id=lambda: "msg_same")
        await self.assertFailure(store.commit_turn(turn(), 1.0), sqlite3.IntegrityError)
        self.assertEqual(await self.raw("PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(await self.raw("PRAGMA foreign_key_check"), [])


class SQLiteGroupCommitTests(SQLiteCase):
    """
    On SQLite one connection does every write: the turns that wait for it
    are committed together, each with its own outcome.
    """

    async def busy_writer(self, store: Store) -> tuple[threading.Event, Deferred[Any], list[str]]:
        """
        Hold the store's one connection until the returned event is set;
        the statements it runs from then on are listed.
        """
        release = threading.Event()
        statements: list[str] = []
        started = threading.Event()

        def hold(txn: Any) -> None:
            txn._connection._connection.set_trace_callback(statements.append)
            started.set()
            release.wait(30)

        held = store._pool.runInteraction(hold)
        self.addCleanup(release.set)
        await deferToThread(started.wait, 30)
        return release, held, statements

    async def test_waiting_turns_share_a_transaction(self) -> None:
        """
        When three answers end while the writer is busy, then they are
        stored in one transaction, each with its own ids.
        """
        store = await self.open()
        release, held, statements = await self.busy_writer(store)
        commits = [store.commit_turn(turn(f"c{n}", prompt=f"p{n}"), 1.0) for n in range(3)]
        release.set()
        await held
        ids = await gatherResults(commits)
        self.assertEqual(len({i for pair in ids for i in pair}), 6)
        self.assertEqual(
            [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")],
            ["BEGIN IMMEDIATE", "COMMIT"])
        for n, (prompt_id, answer_id) in enumerate(ids):
            conversation = await store.get_conversation(f"c{n}")
            assert conversation is not None
            self.assertEqual(conversation.leaf_id, answer_id)
            prompt = await store.get_message(f"c{n}", prompt_id)
            assert prompt is not None
            self.assertEqual(prompt.content, f"p{n}")

    async def test_refused_turn_among_others(self) -> None:
        """
        When one of the waiting turns is refused (its conversation changed
        meanwhile), then it fails with L{ConversationChanged} and stores
        nothing, and the others are stored.
        """
        store = await self.open()
        _, first = await store.commit_turn(turn("c1"), 1.0)
        await store.commit_turn(turn("c1", parent_id=first), 2.0)
        before = await self.raw("SELECT count(*) FROM messages")
        release, held, _ = await self.busy_writer(store)
        stale = store.commit_turn(turn("c1", parent_id=first, continues_leaf=True), 3.0)
        others = [store.commit_turn(turn(cid), 3.0) for cid in ("c2", "c3")]
        release.set()
        await held
        await self.assertFailure(stale, ConversationChanged)
        await gatherResults(others)
        self.assertEqual(
            await self.raw("SELECT count(*) FROM messages"), [(before[0][0] + 4,)])
        self.assertEqual(
            await self.raw("SELECT count(*) FROM messages WHERE conversation_id = 'c1'"),
            [(4,)])

    async def test_failed_transaction_retried_one_by_one(self) -> None:
        """
        When a statement of one waiting turn fails, then the shared
        transaction stores nothing, and each turn is committed again on its
        own: that turn fails, the others are stored.
        """
        ids = iter([
            "msg_dup", "msg_0",                      # stored first, in c0
            "msg_a1", "msg_a2", "msg_dup", "msg_b2",  # together, up to the failure
            "msg_a3", "msg_a4", "msg_dup", "msg_b4", "msg_c3", "msg_c4",  # one by one
        ])
        store = await self.open(new_id=lambda: next(ids))
        await store.commit_turn(turn("c0"), 1.0)
        release, held, statements = await self.busy_writer(store)
        commits = [store.commit_turn(turn(cid), 2.0) for cid in ("ca", "cb", "cc")]
        release.set()
        await held
        self.assertEqual(await commits[0], ("msg_a3", "msg_a4"))
        await self.assertFailure(commits[1], sqlite3.IntegrityError)
        self.assertEqual(await commits[2], ("msg_c3", "msg_c4"))
        self.assertIsNone(await store.get_conversation("cb"))
        self.assertEqual(
            await self.raw("SELECT id FROM messages ORDER BY id"),
            [("msg_0",), ("msg_a3",), ("msg_a4",), ("msg_c3",), ("msg_c4",), ("msg_dup",)])
        self.assertEqual(statements.count("BEGIN IMMEDIATE"), 4)


class PostgresCommitTurnTests(CommitTurnTests, PostgresCase):
    """Storing a finished turn, on PostgreSQL."""


class SQLiteReadTests(ReadTests, SQLiteCase):
    """Reading messages and branches, on SQLite."""

    async def test_branch_by_conversation_index(self) -> None:
        """
        When a branch is read, then only its conversation's messages are
        read, through the conversation index, never a scan of the
        messages table.
        """
        store = await self.open()
        await self.chain(store, 5)
        from easybackend.store import _CONVERSATION_MESSAGES

        plan = await self.raw(
            "EXPLAIN QUERY PLAN "
            + _CONVERSATION_MESSAGES.format(columns="id, parent_id, role, content"),
            ("c1",),
        )
        details = [row[-1] for row in plan]
        self.assertEqual(len(details), 1, details)
        self.assertIn("USING INDEX messages_by_conversation", details[0])
        from easybackend.store import _JOINED_HISTORY

        plan = await self.raw("EXPLAIN QUERY PLAN " + _JOINED_HISTORY, ("c1",))
        details = [row[-1] for row in plan]
        self.assertEqual(len(details), 1, details)
        self.assertIn("USING INDEX messages_by_conversation", details[0])


class PostgresReadTests(ReadTests, PostgresCase):
    """Reading messages and branches, on PostgreSQL."""


class SQLiteRollbackTests(RollbackTests, SQLiteCase):
    """Moving the leaf back, on SQLite."""


class PostgresRollbackTests(RollbackTests, PostgresCase):
    """Moving the leaf back, on PostgreSQL."""


class SQLiteListAndDeleteTests(ListAndDeleteTests, SQLiteCase):
    """Listing and deleting conversations, on SQLite."""


class PostgresListAndDeleteTests(ListAndDeleteTests, PostgresCase):
    """Listing and deleting conversations, on PostgreSQL."""


class SQLiteImportConversationTests(ImportConversationTests, SQLiteCase):
    """Creating a whole conversation at once, on SQLite."""


class PostgresImportConversationTests(ImportConversationTests, PostgresCase):
    """Creating a whole conversation at once, on PostgreSQL."""


class SQLiteCrashTests(CrashTests, SQLiteCase):
    """What a crash leaves in an SQLite file."""

    async def check_after_crash(self, store: Store) -> None:
        """The write-ahead log was left behind, and the file is sound."""
        self.assertTrue(os.path.exists(self.target + "-wal"))
        self.assertEqual(
            await store._pool.runQuery("PRAGMA integrity_check"), [("ok",)]
        )


class PostgresCrashTests(CrashTests, PostgresCase):
    """What a crash leaves in PostgreSQL."""


# --- PostgreSQL only ---------------------------------------------------------------


class ConversationLockTests(PostgresCase):
    """Conversation locks across processes (two stores stand for two replicas)."""

    async def test_serializes_two_holders(self) -> None:
        """
        When two stores ask for one conversation's lock, then the second
        gets it only once the first releases it.
        """
        one, two = await self.open(), await self.open()
        first = await one.lock_conversation("c1", 10.0)
        second = two.lock_conversation("c1", 10.0)
        await eventually(lambda: self.waiting_is(1), "the second holder waits")
        self.assertNoResult(second)
        await first.release()
        lease = await second
        self.assertEqual(await self.held_locks(), 1)
        await lease.release()
        self.assertEqual(await self.held_locks(), 0)

    async def test_timeout(self) -> None:
        """
        When the lock is held for longer than the wait allows, then the wait
        fails with L{LockTimeout} ("conversation_busy") after that time,
        and the lock can be had once released.
        """
        one, two = await self.open(), await self.open()
        first = await one.lock_conversation("c1", 10.0)
        started = reactor.seconds()
        error = await self.assertFailure(
            two.lock_conversation("c1", 0.2), LockTimeout
        )
        self.assertGreaterEqual(reactor.seconds() - started, 0.15)
        self.assertEqual(error.code, "conversation_busy")
        self.assertIn("'c1'", str(error))
        await first.release()
        await (await two.lock_conversation("c1", 5.0)).release()

    async def test_other_conversations(self) -> None:
        """When one conversation is locked, then another is not held up."""
        one, two = await self.open(), await self.open()
        first = await one.lock_conversation("c1", 10.0)
        await (await two.lock_conversation("c2", 0.5)).release()
        await first.release()

    async def test_cancel(self) -> None:
        """
        When a wait is cancelled, then it stops waiting, and does not take
        the lock once it is free.
        """
        one, two = await self.open(), await self.open()
        first = await one.lock_conversation("c1", 10.0)
        second = two.lock_conversation("c1", 30.0)
        await eventually(lambda: self.waiting_is(1), "the second holder waits")
        second.cancel()
        await self.assertFailure(second, CancelledError)
        await eventually(lambda: self.waiting_is(0), "the wait is given up")
        await first.release()
        third = await one.lock_conversation("c1", 5.0)
        self.assertEqual(await self.held_locks(), 1)
        await third.release()

    async def test_close(self) -> None:
        """
        When a store closes, then its waits fail with L{StoreError} and the
        locks it held are free for others.
        """
        one, two = await self.open(), await self.open()
        await one.lock_conversation("c1", 10.0)
        waiting = two.lock_conversation("c1", 30.0)
        await eventually(lambda: self.waiting_is(1), "the second holder waits")
        two.close()
        await self.assertFailure(waiting, StoreError)
        one.close()
        three = await self.open()
        await (await three.lock_conversation("c1", 5.0)).release()

    async def test_lock_pool_full(self) -> None:
        """
        When every lock connection is in use, then another wait fails with
        L{LockTimeout} after its timeout, and succeeds once one is freed.
        """
        store = await self.open(lock_pool_size=1)
        first = await store.lock_conversation("c1", 5.0)
        error = await self.assertFailure(
            store.lock_conversation("c2", 0.1), LockTimeout
        )
        self.assertIn("in use", str(error))
        await first.release()
        await (await store.lock_conversation("c2", 5.0)).release()

    async def test_queries_run_while_locks_are_held(self) -> None:
        """
        When as many turns as the query pool has connections hold locks,
        and another waits, then queries still run.
        """
        store = await self.open(pool_size=1, lock_pool_size=3)
        held = [await store.lock_conversation(f"c{n}", 5.0) for n in range(2)]
        waiting = store.lock_conversation("c0", 30.0)
        await eventually(lambda: self.waiting_is(1), "the third holder waits")
        await store.commit_turn(turn("c0"), 1.0)
        self.assertIsNotNone(await store.get_conversation("c0"))
        for lease in held:
            await lease.release()
        await (await waiting).release()

    async def test_turns_never_interleave(self) -> None:
        """
        When turns on one conversation run at once on two stores, each
        under the conversation's lock, then they form one chain: no turn is
        lost and none forks.
        """
        stores = [await self.open(), await self.open()]

        async def one_turn(n: int) -> None:
            store = stores[n % 2]
            async with await store.lock_conversation("c1", 30.0):
                conversation = await store.get_conversation("c1")
                leaf = conversation.leaf_id if conversation else None
                await store.commit_turn(turn(parent_id=leaf, prompt=f"p{n}"), 1.0)

        await gatherResults(
            [Deferred.fromCoroutine(one_turn(n)) for n in range(12)]
        )
        conversation = await stores[0].get_conversation("c1")
        assert conversation is not None
        branch = await stores[1].branch("c1", conversation.leaf_id)
        self.assertEqual(len(branch), 24)
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(24,)])


class RecoveryTests(PostgresCase):
    """Losing the database's connections, and coming back."""

    async def test_query_after_restart(self) -> None:
        """
        When the server drops the pool's connections while the database
        stays up, then the next calls run on new connections, reads and
        writes alike, with the data intact: no call fails for it.
        """
        # adbapi logs each dead connection's failed rollback, up to the end
        self.addCleanup(self.flushLoggedErrors)
        store = await self.open(pool_size=2)
        _, leaf = await store.commit_turn(turn(), 1.0)
        self.assertGreaterEqual(await self.terminate(), 1)
        await store.ping()
        self.assertGreaterEqual(await self.terminate(), 1)
        await store.commit_turn(turn(parent_id=leaf), 2.0)
        self.assertEqual(await self.raw("SELECT count(*) FROM messages"), [(4,)])
        # adbapi logs each dead connection's failed rollback
        self.flushLoggedErrors()

    async def test_lost_mid_call(self) -> None:
        """
        When the server drops the connection while a call waits on it, then
        that call fails with L{StoreUnavailable} and stores nothing, and the
        next call succeeds.
        """
        store = await self.open(pool_size=1)
        await self.chain(store, 2)
        blocker = self.connect()
        self.addCleanup(blocker.close)
        await deferToThread(
            blocker.execute, "SELECT 1 FROM conversations WHERE id = 'c1' FOR UPDATE"
        )
        rolling = store.rollback("c1", 1)

        async def blocked() -> bool:
            rows = await self.raw(
                "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                " current_database() AND application_name = 'easybackend'"
                " AND wait_event_type = 'Lock'"
            )
            return rows == [(1,)]

        await eventually(blocked, "the rollback waits for the row")
        await self.terminate("easybackend")
        await self.assertFailure(rolling, StoreUnavailable)
        self.flushLoggedErrors()
        await deferToThread(blocker.rollback)
        conversation = await store.get_conversation("c1")
        assert conversation is not None
        self.assertEqual(len(await store.branch("c1", conversation.leaf_id)), 4)

    async def test_lock_after_restart(self) -> None:
        """
        When the server drops the lock connections, idle or holding a lock,
        then releasing still succeeds and the next lock is had on a new
        connection.
        """
        store = await self.open()
        held = await store.lock_conversation("c2", 5.0)
        await (await store.lock_conversation("c1", 5.0)).release()
        self.assertEqual(await self.terminate("easybackend-turn-lock"), 2)
        await held.release()
        await (await store.lock_conversation("c1", 5.0)).release()
        await (await store.lock_conversation("c2", 5.0)).release()

    async def test_lost_while_waiting(self) -> None:
        """
        When the server drops the connection of a wait for a lock, then the
        wait fails with L{StoreUnavailable}.
        """
        one, two = await self.open(), await self.open()
        first = await one.lock_conversation("c1", 10.0)
        second = two.lock_conversation("c1", 30.0)
        await eventually(lambda: self.waiting_is(1), "the second holder waits")
        rows = await self.raw(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks AS l"
            " JOIN pg_database AS d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND NOT l.granted"
            " AND d.datname = current_database()"
        )
        self.assertEqual(rows, [(True,)])
        await self.assertFailure(second, StoreUnavailable)
        await first.release()
