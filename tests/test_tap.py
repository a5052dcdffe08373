"""
Tests for L{easybackend.tap} and L{easybackend.config}: options, the
environment, clear startup errors, plugin discovery, and the server run as
a real C{twistd} process.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3

import treq
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from easybackend.config import ConfigError, settings_from
from easybackend.tap import Options, settle_collector
from easybackend.testing.fixtures import within
from easybackend.testing.process import kill, spawn


class SettingsTests(SynchronousTestCase):
    """Options, variables and their validation."""

    def test_defaults(self) -> None:
        """When nothing is set, then the documented defaults apply."""
        s = settings_from({}, {})
        self.assertEqual((s.model, s.http, s.websocket, s.grpc, s.db),
                         ("gpt-4o-mini", "tcp:8000", "tcp:9001", "[::]:9000",
                          os.path.join("conversations", "easybackend.sqlite3")))
        self.assertIsNone(s.upstream_url)

    def test_option_wins_over_environment(self) -> None:
        """When both an option and its variable are set, then the option wins."""
        env = {"GPT_ENGINE": "from-env", "OPENAI_BASE_URL": "http://env/v1",
               "FIRST_PROMPT": "Be kind.", "ENCODING_NAME": "cl100k_base"}
        s = settings_from({"model": "from-option"}, env)
        self.assertEqual(s.model, "from-option")
        self.assertEqual(s.upstream_url, "http://env/v1")
        self.assertEqual((s.first_prompt, s.encoding), ("Be kind.", "cl100k_base"))

    def test_key_selects_openai(self) -> None:
        """When only OPENAI_API_KEY is set, then the upstream is OpenAI's API."""
        s = settings_from({}, {"OPENAI_API_KEY": "sk-x"})
        self.assertEqual(s.upstream_url, "https://api.openai.com/v1")
        self.assertIsNone(settings_from({"offline": True}, {"OPENAI_API_KEY": "x"}).upstream_url)

    def test_bad_values_name_the_setting(self) -> None:
        """When a value is bad, then the error names the option or variable."""
        for options, env, name in [
            ({"retries": "many"}, {}, "--retries"),
            ({"context-tokens": "0"}, {}, "--context-tokens"),
            ({"temperature": "5"}, {}, "--temperature"),
            ({}, {"OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL"),
            ({}, {"EASYBACKEND_DB": "/dev/null/x.db"}, "--db"),
            ({"answer-tokens": "5000", "context-tokens": "4000"}, {}, "--answer-tokens"),
        ]:
            with self.assertRaises(ConfigError) as e:
                settings_from(options, env)
            self.assertIn(name, str(e.exception))

    def test_not_a_database(self) -> None:
        """When the database file is not SQLite, then startup refuses it by name."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a database" * 100)
        with self.assertRaises(ConfigError) as e:
            settings_from({"db": path}, {})
        self.assertIn(path, str(e.exception))

    def test_options_exit_with_one_line(self) -> None:
        """When twistd parses a bad endpoint, then it exits with one line naming it."""
        options = Options()
        db = os.path.join(self.mktemp(), "x.db")
        with self.assertRaises(SystemExit) as e:
            options.parseOptions(["--http", "bogus:1", "--db", db])
        self.assertEqual(str(e.exception),
                         "easybackend: --http: invalid endpoint 'bogus:1': "
                         "Unknown endpoint type: 'bogus'")

    def test_plugin_discovered(self) -> None:
        """When Twisted scans its plugins, then it finds C{easybackend}."""
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("easybackend", names)


class ListenerTests(SynchronousTestCase):
    """How the service listens."""

    def test_tcp_listeners_write_through(self) -> None:
        """
        When the HTTP or WebSocket listener is plain TCP, then its
        connections send each write at once (L{easybackend.writethrough});
        a UNIX socket listens as Twisted does.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import UNIXServerEndpoint
        from twisted.internet.protocol import Factory

        from easybackend.tap import _listen
        from easybackend.writethrough import WriteThroughTCPEndpoint

        tcp = _listen(reactor, "tcp:0:interface=127.0.0.1", Factory())
        self.assertIsInstance(tcp.endpoint, WriteThroughTCPEndpoint)
        unix = _listen(reactor, "unix:/tmp/eb-listener.sock", Factory())
        self.assertIsInstance(unix.endpoint, UNIXServerEndpoint)


class ProcessTests(TestCase):
    """The server as a user runs it: C{twistd -n easybackend}."""

    timeout = 60

    async def _ask(self, port: int, cid: str, prompt: str) -> tuple[int, dict]:
        response = await within(treq.post(
            f"http://127.0.0.1:{port}/ask/{cid}", json.dumps({"prompt": prompt}).encode(),
            persistent=False))
        return response.code, json.loads(await within(treq.content(response)))

    async def _start(self, *options: str):
        process = spawn(*options, "--http", "tcp:0:interface=127.0.0.1",
                        "--websocket", "tcp:0:interface=127.0.0.1", "--grpc", "127.0.0.1:0")
        self.addCleanup(lambda: kill(process))
        await within(process.started, 30)
        return process

    async def test_memory_survives_restart(self) -> None:
        """
        When a user asks the offline model, asks again on the id it got,
        and restarts the server, then the second answer saw the first turn
        and the conversation is still there after the restart.
        """
        db = os.path.join(os.path.abspath(self.mktemp()), "easy.sqlite3")
        server = await self._start("--offline", "--db", db)
        code, first = await self._ask(server.ports["http"], "new", "Hello")
        self.assertEqual((code, first["model"]), (200, "offline"))
        cid = first["conversation_id"]
        code, second = await self._ask(server.ports["http"], cid, "Again")
        self.assertIn("1 earlier turn", second["response"])
        server.signal("TERM")
        await within(server.ended, 30)
        self.assertTrue(server.clean_exit)
        server = await self._start("--offline", "--db", db)
        response = await within(treq.get(
            f"http://127.0.0.1:{server.ports['http']}/conversations/{cid}", persistent=False))
        view = json.loads(await within(treq.content(response)))
        self.assertEqual(len(view["messages"]), 4)
        code, third = await self._ask(server.ports["http"], cid, "Third")
        self.assertIn("2 earlier turns", third["response"])
        with sqlite3.connect(db) as c:
            self.assertEqual(c.execute("PRAGMA integrity_check").fetchone(), ("ok",))

    async def test_no_upstream_is_503(self) -> None:
        """
        When the server starts with no key, no base URL and no --offline,
        then it starts, and an ask gets a clear 503.
        """
        db = os.path.join(os.path.abspath(self.mktemp()), "easy.sqlite3")
        server = await self._start("--db", db)
        code, body = await self._ask(server.ports["http"], "new", "Hello")
        self.assertEqual(code, 503)
        self.assertEqual(body["error"]["message"],
                         "no upstream configured: set OPENAI_API_KEY or "
                         "OPENAI_BASE_URL, or start with --offline")


class CollectorTests(SynchronousTestCase):
    """L{settle_collector}: the garbage collector set up for serving."""

    def collections(self, keep: int) -> set[int]:
        """The generations collected while C{keep} new lists stay alive."""
        seen: set[int] = set()

        def watch(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                seen.add(info["generation"])

        gc.callbacks.append(watch)
        try:
            kept = [[] for _ in range(keep)]
        finally:
            gc.callbacks.remove(watch)
        del kept
        return seen

    def test_older_generations_rare(self) -> None:
        """
        When the server has settled the collector, then what stays alive
        for a while (an answer in flight) is walked by young collections
        only, where Python's thresholds would walk it again in a collection
        of an older generation, a pause every answer waits through; and
        what start-up made is frozen out of the collector's way.
        """
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        gc.set_threshold(700, 10, 10)
        self.assertIn(1, self.collections(100_000))
        settle_collector()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(self.collections(100_000), {0})
