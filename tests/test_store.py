"""Tests for L{easybackend.store}."""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

import easybackend
from easybackend.errors import BadRequest, NotFound
from easybackend.model import Turn, Usage
from easybackend.store import SQLITE, Store, StoreError, title_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(easybackend.__file__)))


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


def raw(path: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run C{sql} on a separate plain connection, as another process would."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


class StoreTestCase(TestCase):
    """Opens stores on SQLite files in the test's temporary folder."""

    async def open(self, path: str | None = None, **kw: Any) -> Store:
        self.path = path or self.mktemp()
        store = await Store.open(self.path, **kw)
        self.addCleanup(store.close)
        return store

    async def chain(self, store: Store, turns: int, cid: str = "c1") -> list[str]:
        """Commit C{turns} turns, each after the last; the answers' ids."""
        leaf, answers = None, []
        for n in range(turns):
            _, leaf = await store.commit_turn(
                turn(cid, leaf, f"prompt {n}", f"answer {n}"), 100.0 + n
            )
            answers.append(leaf)
        return answers


class OpenTests(StoreTestCase):
    """Opening a database: migrations, connection settings, clear errors."""

    async def test_empty_file_is_migrated(self) -> None:
        """
        When a new file is opened, then every migration is applied and
        C{user_version} records the last one.
        """
        await self.open()
        version = raw(self.path, "PRAGMA user_version")[0][0]
        self.assertEqual(version, len(SQLITE.migrations))
        tables = {r[0] for r in raw(self.path, "SELECT name FROM sqlite_master")}
        self.assertTrue({"conversations", "messages"} <= tables)

    async def test_reopen_is_idempotent(self) -> None:
        """
        When a migrated database is opened again, then nothing is applied
        twice and the data is kept.
        """
        store = await self.open()
        await store.commit_turn(turn(), 1.0)
        store.close()
        store = await self.open(self.path)
        await self.open(self.path)
        self.assertEqual(
            raw(self.path, "PRAGMA user_version")[0][0], len(SQLITE.migrations)
        )
        self.assertIsNotNone(await store.get_conversation("c1"))

    async def test_connection_settings(self) -> None:
        """
        When a store is open, then its connection writes ahead, enforces
        foreign keys, waits for locks and syncs at checkpoints only.
        """
        store = await self.open()
        pool = store._pool
        self.assertEqual(raw(self.path, "PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(await pool.runQuery("PRAGMA foreign_keys"), [(1,)])
        self.assertEqual(await pool.runQuery("PRAGMA synchronous"), [(1,)])
        [(timeout,)] = await pool.runQuery("PRAGMA busy_timeout")
        self.assertGreater(timeout, 0)

    async def test_one_connection(self) -> None:
        """
        When many calls run at once, then they share the pool's one
        connection.
        """
        store = await self.open()
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
        path = self.mktemp()
        junk = b"this is not a database\n" * 100
        with open(path, "wb") as f:
            f.write(junk)
        error = await self.assertFailure(Store.open(path), StoreError)
        self.assertIn(path, str(error))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), junk)

    async def test_newer_schema(self) -> None:
        """
        When the database's schema is newer than this program's, then
        opening fails with a L{StoreError} saying so, naming the path.
        """
        path = self.mktemp()
        raw(path, "PRAGMA user_version = 999")
        error = await self.assertFailure(Store.open(path), StoreError)
        self.assertIn(path, str(error))
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


class CommitTurnTests(StoreTestCase):
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
            raw(self.path, "SELECT system_tokens FROM conversations"), [(7,)]
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
        await self.assertFailure(
            store.commit_turn(turn(), 1.0), sqlite3.IntegrityError
        )
        self.assertIsNone(await store.get_conversation("c1"))
        self.assertEqual(raw(self.path, "SELECT count(*) FROM messages"), [(0,)])
        self.assertEqual(raw(self.path, "PRAGMA integrity_check"), [("ok",)])

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
            store.commit_turn(turn(parent_id="msg_2"), 2.0),
            sqlite3.IntegrityError,
        )
        self.assertEqual(await store.get_conversation("c1"), before)
        self.assertEqual(raw(self.path, "SELECT count(*) FROM messages"), [(2,)])

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
        self.assertEqual(raw(self.path, "SELECT count(*) FROM messages"), [(2,)])

    async def test_ids_are_unique(self) -> None:
        """When many turns are committed, then all message ids differ."""
        store = await self.open()
        await self.chain(store, 20)
        self.assertEqual(
            raw(self.path, "SELECT count(DISTINCT id) FROM messages"), [(40,)]
        )


class ReadTests(StoreTestCase):
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
        whole and in order by primary-key lookups, never by scanning the
        messages table.
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
        from easybackend.store import _PATH

        plan = raw(
            self.path,
            "EXPLAIN QUERY PLAN " + _PATH
            + "SELECT m.* FROM path JOIN messages AS m ON m.id = path.id"
            " ORDER BY path.depth DESC",
            (answers[-1], "c1"),
        )
        details = [row[-1] for row in plan]
        self.assertFalse(
            [d for d in details if d.startswith("SCAN") and d != "SCAN path"],
            details,
        )
        conversation = await store.rollback("c1", 250)
        self.assertEqual(conversation.leaf_id, answers[249])
        self.assertTrue(await store.delete_conversation("c1"))
        self.assertEqual(raw(self.path, "SELECT count(*) FROM messages"), [(0,)])


class RollbackTests(StoreTestCase):
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


class ListAndDeleteTests(StoreTestCase):
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
        conversations stay, and deleting it again reports it was not there.
        """
        store = await self.open()
        answers = await self.chain(store, 3)
        await store.commit_turn(turn(parent_id=answers[0]), 9.0)
        await self.chain(store, 2, "keep")
        self.assertTrue(await store.delete_conversation("c1"))
        self.assertIsNone(await store.get_conversation("c1"))
        self.assertIsNone(await store.get_message("c1", answers[0]))
        self.assertEqual(raw(self.path, "SELECT count(*) FROM messages"), [(4,)])
        self.assertFalse(await store.delete_conversation("c1"))
        self.assertIsNotNone(await store.get_conversation("keep"))
        self.assertEqual(raw(self.path, "PRAGMA foreign_key_check"), [])


class ImportConversationTests(StoreTestCase):
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
        self.assertEqual(raw(self.path, "SELECT count(*) FROM messages"), [(2,)])

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

async def main(reactor, path):
    store = await Store.open(path, reactor, new_id=new_id)
    await store.commit_turn(Turn("c1", None, "one", 1, "answer one", 1,
                                 "m", "stop", None), 1.0)
    await store.commit_turn(Turn("c1", "msg_2", "two", 1, "answer two", 1,
                                 "m", "stop", None), 2.0)

task.react(main, [sys.argv[1]])
"""


class CrashTests(StoreTestCase):
    """What a crash leaves behind."""

    async def test_crash_mid_turn(self) -> None:
        """
        When the process dies in the middle of a turn's transaction, then
        the database passes its integrity check and holds the earlier turn
        whole and nothing of the interrupted one.
        """
        path = os.path.abspath(self.mktemp())
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", CRASHING_CHILD, path],
            env={**os.environ, "PYTHONPATH": ROOT},
            path=ROOT,
            reactor=reactor,
        )
        self.assertEqual(code, 3, err)
        self.assertTrue(os.path.exists(path + "-wal"))
        store = await self.open(path)
        conversation = await store.get_conversation("c1")
        assert conversation is not None
        self.assertEqual(conversation.leaf_id, "msg_2")
        self.assertEqual(
            [m.id for m in await store.branch("c1", "msg_2")], ["msg_1", "msg_2"]
        )
        self.assertIsNone(await store.get_message("c1", "msg_3"))
        self.assertEqual(
            await store._pool.runQuery("PRAGMA integrity_check"), [("ok",)]
        )
