"""
Graceful shutdown, end to end: a real C{twistd easybackend} process with
streams open on HTTP, WebSocket and gRPC gets SIGTERM.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

import grpc
import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from easybackend.proto import chat_pb2, chat_pb2_grpc
from easybackend.testing.fixtures import within
from easybackend.testing.process import kill, spawn
from tests.test_websocket import Client


class GracefulShutdownTests(TestCase):
    """SIGTERM: stop accepting, finish or cancel what is in flight, close cleanly."""

    timeout = 120

    async def start(self, interval: str, grace: str) -> Any:
        self.db = os.path.join(os.path.abspath(self.mktemp()), "easy.sqlite3")
        server = spawn("--offline", "--offline-interval", interval, "--shutdown-grace", grace,
                       "--db", self.db, "--http", "tcp:0:interface=127.0.0.1",
                       "--websocket", "tcp:0:interface=127.0.0.1", "--grpc", "127.0.0.1:0",
                       wait_for=("http", "websocket", "grpc"))
        self.addCleanup(lambda: kill(server))
        await within(server.started, 30)
        return server

    async def open_streams(self, ports: dict[str, int]) -> dict[str, Deferred]:
        """One ask streaming on each transport; fires once each got a piece."""
        ended: dict[str, Deferred] = {}
        first: list[Deferred] = []

        # HTTP, as Server-Sent Events
        response = await within(treq.post(
            f"http://127.0.0.1:{ports['http']}/ask/http-conv",
            json.dumps({"prompt": "over http", "stream": True}).encode(),
            headers={"Accept": ["text/event-stream"]}, persistent=False))
        http_got = Deferred()
        http_body: list[bytes] = []

        def http_chunk(data: bytes) -> None:
            http_body.append(data)
            if b"event: delta" in data and not http_got.called:
                http_got.callback(None)

        ended["http"] = treq.collect(response, http_chunk).addBoth(
            lambda _: b"".join(http_body))
        first.append(http_got)

        # WebSocket, the JSON protocol
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{ports['websocket']}")
        factory.protocol = Client
        factory.opened = Deferred()
        await clientFromString(reactor, f"tcp:127.0.0.1:{ports['websocket']}").connect(factory)
        ws = await within(factory.opened)
        ws.send_json({"type": "ask", "id": "a1", "conversation_id": "ws-conv",
                      "prompt": "over websocket"})
        first.append(ws.next())

        async def ws_rest() -> list[Any]:
            messages = []
            while True:
                message = await ws.next()
                messages.append(message)
                if message["type"] in ("done", "error", "cancelled"):
                    return messages
        ended["websocket"] = Deferred.fromCoroutine(ws_rest())

        # gRPC, server streaming
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        self.addCleanup(channel.close)
        call = chat_pb2_grpc.ChatStub(channel).Ask(
            chat_pb2.AskRequest(prompt="over grpc", conversation_id="grpc-conv"), timeout=60)
        grpc_got = Deferred()

        def read() -> tuple[list[Any], Any]:
            messages = []
            try:
                for m in call:
                    messages.append(m)
                    if len(messages) == 1:
                        reactor.callFromThread(grpc_got.callback, None)
            except grpc.RpcError as e:
                return messages, e.code()
            return messages, None

        ended["grpc"] = deferToThread(read)
        first.append(grpc_got)
        for d in first:
            await within(d, 30)
        return ended

    def stored(self) -> dict[str, int]:
        with sqlite3.connect(self.db) as c:
            self.assertEqual(c.execute("PRAGMA integrity_check").fetchone(), ("ok",))
            return dict(c.execute(
                "SELECT conversation_id, count(*) FROM messages GROUP BY conversation_id"))

    async def test_in_flight_answers_finish(self) -> None:
        """
        When SIGTERM arrives while an answer streams on each transport and
        the grace period is long enough, then every client gets its whole
        answer, each turn is stored, and the process exits cleanly.
        """
        server = await self.start(interval="0.1", grace="20")
        ended = await self.open_streams(server.ports)
        server.signal("TERM")
        body = await within(ended["http"], 30)
        self.assertIn(b"event: done", body)
        ws_messages = await within(ended["websocket"], 30)
        self.assertEqual(ws_messages[-1]["type"], "done")
        messages, code = await within(ended["grpc"], 30)
        self.assertIsNone(code)
        self.assertTrue(messages[-1].done)
        await within(server.ended, 30)
        self.assertTrue(server.clean_exit, server.output.decode()[-2000:])
        self.assertEqual(self.stored(), {"http-conv": 2, "ws-conv": 2, "grpc-conv": 2})

    async def test_grace_over_cancels(self) -> None:
        """
        When the answers outlast the grace period, then they are cancelled:
        each client gets an error or a cut stream, nothing of theirs is
        stored, and the process still exits cleanly.
        """
        server = await self.start(interval="2", grace="0.5")
        ended = await self.open_streams(server.ports)
        server.signal("TERM")
        body = await within(ended["http"], 30)
        self.assertNotIn(b"event: done", body)
        ws_messages = await within(ended["websocket"], 30)
        self.assertNotEqual(ws_messages[-1]["type"], "done")
        messages, code = await within(ended["grpc"], 30)
        self.assertIsNotNone(code)
        self.assertFalse(any(m.done for m in messages))
        await within(server.ended, 30)
        self.assertTrue(server.clean_exit, server.output.decode()[-2000:])
        self.assertEqual(self.stored(), {})
