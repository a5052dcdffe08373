"""Tests for L{easybackend.importer}."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import easybackend
from easybackend.importer import (
    DEFAULT_DB,
    InvalidFile,
    OldTurn,
    Report,
    conversation_id_for,
    import_directory,
    parse_args,
    parse_entry,
    parse_file,
)
from easybackend.model import Turn
from easybackend.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(easybackend.__file__)))


def entry(prompt: str, answer: str) -> str:
    """One entry as the old design wrote it."""
    return f"User: {prompt}\n\n\nChatGPT: {answer}<|im_end|>\n"


class ParseTests(SynchronousTestCase):
    """Reading the old design's entries and files."""

    def test_entry(self) -> None:
        """When an entry is well formed, then it splits into prompt and answer."""
        self.assertEqual(
            parse_entry(entry("What is 2+2?", "4.\n\nSurely."), 1),
            OldTurn("What is 2+2?", "4.\n\nSurely."),
        )

    def test_crlf(self) -> None:
        """When an entry has CRLF line ends, then it splits the same."""
        text = entry("line one\nline two", "yes\nno").replace("\n", "\r\n")
        self.assertEqual(
            parse_entry(text, 1), OldTurn("line one\nline two", "yes\nno")
        )

    def test_no_end_marker(self) -> None:
        """When C{<|im_end|>} is missing, then the answer is all that follows."""
        self.assertEqual(
            parse_entry("User: hi\n\n\nChatGPT: hello", 1), OldTurn("hi", "hello")
        )

    def test_no_answer(self) -> None:
        """When the C{ChatGPT:} part is missing, then the answer is empty."""
        self.assertEqual(
            parse_entry("User: hi there<|im_end|>\n", 1), OldTurn("hi there", "")
        )

    def test_prompt_mentions_chatgpt(self) -> None:
        """
        When the prompt says C{ChatGPT:} within a line, then only the
        separator on its own line splits it.
        """
        self.assertEqual(
            parse_entry(entry("Dear ChatGPT: help", "ok"), 1),
            OldTurn("Dear ChatGPT: help", "ok"),
        )

    def test_not_user(self) -> None:
        """
        When an entry is not a string starting with C{User:}, then it is
        invalid, and the reason names the entry.
        """
        error = self.assertRaises(InvalidFile, parse_entry, "ChatGPT: hi", 3)
        self.assertIn("entry 3", str(error))
        self.assertRaises(InvalidFile, parse_entry, 42, 1)
        self.assertRaises(InvalidFile, parse_entry, None, 1)

    def test_nul(self) -> None:
        """
        When an entry holds the NUL character (which PostgreSQL cannot
        store, and the server refuses in prompts), then it is invalid, and
        the reason names the entry and the character.
        """
        error = self.assertRaises(InvalidFile, parse_entry, entry("a\x00b", "c"), 2)
        self.assertIn("entry 2 holds the NUL character", str(error))
        error = self.assertRaises(InvalidFile, parse_entry, entry("a", "b\x00"), 5)
        self.assertIn("entry 5", str(error))

    def test_bad_files(self) -> None:
        """
        When a file is not a non-empty JSON list of entries in UTF-8, then
        it is invalid, with a reason.
        """
        for data in [b"", b"{not json", b'{"a": 1}', b'"User: x"', b"[]",
                     b'["User: a", 3]', b"\xff\xfe\x00"]:
            self.assertRaises(InvalidFile, parse_file, data)

    def test_bom(self) -> None:
        """When a file starts with a UTF-8 byte order mark, then it is read."""
        data = b"\xef\xbb\xbf" + json.dumps([entry("a", "b")]).encode()
        self.assertEqual(parse_file(data), [OldTurn("a", "b")])

    def test_names(self) -> None:
        """
        When a file's stem is not a valid conversation id, then it is
        invalid; when it is, then it is the id.
        """
        for name in ["../x", "a/b", "a b", "caf\N{LATIN SMALL LETTER E WITH ACUTE}",
                     "", "x" * 129, "a\\b", "a\nb"]:
            self.assertRaises(InvalidFile, conversation_id_for, name)
        self.assertEqual(conversation_id_for("chat-1_2.3:4"), "chat-1_2.3:4")


class ParseArgsTests(SynchronousTestCase):
    """The command line."""

    def test_default_db(self) -> None:
        """When neither --db nor EASYBACKEND_DB is given, then the default is used."""
        self.assertEqual(parse_args(["old"], {}).db, DEFAULT_DB)
        self.assertEqual(DEFAULT_DB, os.path.join("conversations", "easybackend.sqlite3"))

    def test_environment(self) -> None:
        """When EASYBACKEND_DB is set, then it is the default, and --db wins."""
        env = {"EASYBACKEND_DB": "/data/x.sqlite3"}
        self.assertEqual(parse_args(["old"], env).db, "/data/x.sqlite3")
        self.assertEqual(parse_args(["old", "--db", "y"], env).db, "y")


class ImportTests(TestCase):
    """Importing a folder of old files."""

    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.mkdir(self.folder)
        self.db = self.mktemp()

    def write(self, name: str, content: Any, mtime: float = 1_600_000_000.0) -> None:
        path = os.path.join(self.folder, name)
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (mtime, mtime))

    async def store(self) -> Store:
        store = await Store.open(self.db)
        self.addCleanup(store.close)
        return store

    async def run_import(self, store: Store, **kw: Any) -> tuple[Report, list[str]]:
        out = io.StringIO()
        report = await import_directory(store, self.folder, out=out, **kw)
        return report, out.getvalue().splitlines()

    def count(self, table: str) -> int:
        connection = sqlite3.connect(self.db)
        try:
            return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        finally:
            connection.close()

    async def test_imports(self) -> None:
        """
        When a folder holds old files, then each becomes a conversation
        named by its stem, its entries a chain of turns, timed by the file,
        and one line is printed per file, then a summary.
        """
        self.write("chat1.json", [entry("First question\nmore", "First answer"),
                                  entry("Second", "Second answer")], 1000.0)
        self.write("chat2.json", [entry("Only", "One")])
        store = await self.store()
        report, lines = await self.run_import(store)
        self.assertEqual(report.imported, ["chat1.json", "chat2.json"])
        self.assertEqual(
            lines,
            ["imported chat1.json: 2 turns", "imported chat2.json: 1 turns",
             "2 imported, 0 skipped (0 already there)"],
        )
        conversation = await store.get_conversation("chat1")
        assert conversation is not None
        self.assertEqual(
            (conversation.title, conversation.created, conversation.updated,
             conversation.model, conversation.system_prompt),
            ("First question more", 1000.0, 1000.0, None, None),
        )
        messages = await store.branch("chat1", conversation.leaf_id)
        self.assertEqual(
            [(m.role, m.content) for m in messages],
            [("user", "First question\nmore"), ("assistant", "First answer"),
             ("user", "Second"), ("assistant", "Second answer")],
        )
        self.assertEqual(messages[0].tokens, len("First question\nmore") // 4 + 1)

    async def test_options(self) -> None:
        """
        When a token counter, model and owner are given, then the imports
        use them.
        """
        self.write("c.json", [entry("abc", "de")])
        store = await self.store()
        await self.run_import(store, count_tokens=len, model="gpt-old", owner="bob")
        conversation = await store.get_conversation("c")
        assert conversation is not None
        self.assertEqual((conversation.model, conversation.owner), ("gpt-old", "bob"))
        messages = await store.branch("c", conversation.leaf_id)
        self.assertEqual([m.tokens for m in messages], [3, 2])
        self.assertEqual(messages[1].model, "gpt-old")

    async def test_twice(self) -> None:
        """
        When the same folder is imported twice, then the second run imports
        nothing and says the conversations are already there.
        """
        self.write("a.json", [entry("x", "y")])
        self.write("b.json", [entry("x", "y"), entry("z", "w")])
        store = await self.store()
        await self.run_import(store)
        report, lines = await self.run_import(store)
        self.assertEqual(report.imported, [])
        self.assertEqual(report.existing, 2)
        self.assertEqual(lines[-1], "0 imported, 2 skipped (2 already there)")
        self.assertIn("already exists", lines[0])
        self.assertEqual(self.count("conversations"), 2)
        self.assertEqual(self.count("messages"), 6)

    async def test_existing_conversation(self) -> None:
        """
        When a conversation of that id was made by the server, then its file
        is skipped and the conversation is untouched.
        """
        store = await self.store()
        await store.commit_turn(
            Turn("a", None, "new", 1, "newer", 1, "m", "stop", None), 5.0
        )
        self.write("a.json", [entry("x", "y")])
        report, _ = await self.run_import(store)
        self.assertEqual(report.existing, 1)
        self.assertEqual(self.count("messages"), 2)

    async def test_skips(self) -> None:
        """
        When files are not valid old conversations, or their names are not
        valid ids, then each is skipped with its reason and the rest are
        imported.
        """
        good = [entry("x", "y")]
        self.write("bad name.json", good)
        self.write("x$.json", good)
        self.write("broken.json", b"[\"User: x")
        self.write("dict.json", {"User": "x"})
        self.write("empty.json", [])
        self.write("mixed.json", [entry("x", "y"), 7])
        self.write("latin1.json", b'["User: caf\xe9"]')
        self.write("ok.json", good)
        self.write("notes.txt", good)
        os.mkdir(os.path.join(self.folder, "folder.json"))
        store = await self.store()
        report, lines = await self.run_import(store)
        self.assertEqual(report.imported, ["ok.json"])
        self.assertEqual(
            sorted(name for name, _ in report.skipped),
            sorted(["bad name.json", "x$.json", "broken.json", "dict.json",
                    "empty.json", "mixed.json", "latin1.json", "folder.json"]),
        )
        self.assertEqual(report.existing, 0)
        reasons = dict(report.skipped)
        self.assertIn("not a valid conversation id", reasons["bad name.json"])
        self.assertIn("JSON", reasons["broken.json"])
        self.assertIn("entry 2", reasons["mixed.json"])
        self.assertEqual(len(lines), 10)
        self.assertEqual(lines[-1], "1 imported, 8 skipped (0 already there)")
        self.assertEqual(self.count("conversations"), 1)

    async def test_odd_entries(self) -> None:
        """
        When entries have CRLF, no end marker or no answer, then the file is
        imported with what each holds.
        """
        self.write("odd.json", ["User: a\r\n\r\n\r\nChatGPT: b<|im_end|>\r\n",
                                "User: c\n\n\nChatGPT: d",
                                "User: e"])
        store = await self.store()
        report, _ = await self.run_import(store)
        self.assertEqual(report.imported, ["odd.json"])
        conversation = await store.get_conversation("odd")
        assert conversation is not None
        self.assertEqual(
            [m.content for m in await store.branch("odd", conversation.leaf_id)],
            ["a", "b", "c", "d", "e", ""],
        )


class CommandTests(TestCase):
    """The console command, run as a process."""

    async def command(self, *args: str) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "easybackend.importer", *args],
            env={**os.environ, "PYTHONPATH": ROOT},
            # no path: a fork in this many-threaded process (grpc) is risky;
            # without a cwd change Twisted uses posix_spawn
            reactor=reactor,
        )
        return out.decode(), err.decode(), code

    async def test_run(self) -> None:
        """
        When the command is run on a folder, then it imports into the given
        database, prints a summary and exits 0.
        """
        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder)
        with open(os.path.join(folder, "a.json"), "w") as f:
            json.dump([entry("x", "y")], f)
        db = os.path.abspath(self.mktemp())
        out, err, code = await self.command(folder, "--db", db)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[-1], "1 imported, 0 skipped (0 already there)")
        out, err, code = await self.command(folder, "--db", db)
        self.assertEqual(code, 0)
        self.assertIn("0 imported, 1 skipped (1 already there)", out)

    async def test_missing_db_folder(self) -> None:
        """
        When the database's folder does not exist, then the command exits 1
        with one line naming the path, not a traceback.
        """
        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder)
        db = os.path.join(os.path.abspath(self.mktemp()), "x.sqlite3")
        out, err, code = await self.command(folder, "--db", db)
        self.assertEqual(code, 1)
        self.assertIn(db, err)
        self.assertNotIn("Traceback", err)

    async def test_missing_folder(self) -> None:
        """When DIR is not a folder, then the command exits 1 saying so."""
        missing = os.path.abspath(self.mktemp())
        out, err, code = await self.command(missing, "--db", self.mktemp())
        self.assertEqual(code, 1)
        self.assertIn(missing, err)
