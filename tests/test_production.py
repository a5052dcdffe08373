"""
The server as it is deployed: a real C{twistd easybackend} process with
API keys and C{--tls-cert}/C{--tls-key}, reached over HTTPS, WSS (and gRPC
over TLS) by real clients that trust only the certificate the test made.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, race
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent

from easybackend.testing.fixtures import within
from easybackend.testing.process import ServerProcess, kill, spawn
from easybackend.testing.tls import TrustingPolicy, client_tls, self_signed
from easybackend.transports.websocket import CLOSE_UNAUTHENTICATED, KEY_REQUIRED
from tests.test_websocket import Client, ask, collect

ALICE_KEY = "sk-prod-alice-5f1c2d"
BOB_KEY = "sk-prod-bob-8e7a90"
#: Text that must never reach the server's log.
SECRETS = (ALICE_KEY, BOB_KEY, "sk-prod-wrong-31", "PROMPT-https-plan", "PROMPT-wss-plan")

#: With TLS the ports log as C{"QuietSite (TLS) starting on N"}, which
#: L{easybackend.testing.process.LISTENING} does not match; the gRPC line,
#: logged after both, tells when to read them with these.
TLS_PORTS = {
    "http": re.compile(rb"Site(?: \(TLS\))? starting on (\d+)"),
    "websocket": re.compile(rb"ChatServerFactory(?: \(TLS\))? starting on (\d+)"),
}


class TLSProcessTests(TestCase):
    """C{twistd -n easybackend --tls-cert ... --tls-key ...} with keys."""

    timeout = 60

    async def start(self) -> dict[str, int]:
        """Start the server; its ports by listener name."""
        folder = os.path.abspath(self.mktemp())
        self.cert, key = self_signed(folder)
        self.server: ServerProcess = spawn(
            "--offline", "--db", os.path.join(folder, "easy.sqlite3"),
            "--tls-cert", self.cert, "--tls-key", key,
            "--http", "tcp:0:interface=127.0.0.1",
            "--websocket", "tcp:0:interface=127.0.0.1", "--grpc", "127.0.0.1:0",
            env={"EASYBACKEND_API_KEYS": f"alice:{ALICE_KEY},bob:{BOB_KEY}"},
            wait_for=("grpc",),
        )
        self.addCleanup(lambda: kill(self.server))
        ports = dict(await within(self.server.started, 30))
        for name, pattern in TLS_PORTS.items():
            match = pattern.search(self.server.output)
            assert match, self.server.output.decode("utf-8", "replace")
            ports[name] = int(match.group(1))
        self.http = HTTPClient(Agent(reactor, contextFactory=TrustingPolicy(self.cert)))
        return ports

    async def stop(self) -> bytes:
        """SIGTERM the server; its whole log once it exited cleanly."""
        self.server.signal("TERM")
        await within(self.server.ended, 30)
        self.assertTrue(self.server.clean_exit, self.server.output.decode("utf-8", "replace"))
        return self.server.output

    def assert_no_secrets(self, output: bytes) -> None:
        for secret in SECRETS:
            self.assertNotIn(secret.encode(), output)

    async def https_ask(self, port: int, prompt: str,
                        key: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = await within(self.http.post(
            f"https://localhost:{port}/ask/new", json.dumps({"prompt": prompt}).encode(),
            headers=headers))
        return response.code, json.loads(await within(treq.content(response)))

    async def connect_wss(self, port: int, path: str) -> Client:
        """A WebSocket client over TLS, trusting only the test's certificate."""
        factory = WebSocketClientFactory(f"wss://localhost:{port}{path}")
        factory.protocol = Client
        factory.opened = Deferred()
        endpoint = wrapClientTLS(client_tls(self.cert),
                                 clientFromString(reactor, f"tcp:127.0.0.1:{port}"))
        await within(endpoint.connect(factory))
        return await within(factory.opened)

    async def test_https(self) -> None:
        """
        When a client asks over HTTPS with a key, then it gets the answer;
        without a key, then 401; and the log holds neither keys nor prompts.
        """
        ports = await self.start()
        code, body = await self.https_ask(ports["http"], "PROMPT-https-plan", ALICE_KEY)
        self.assertEqual((code, body["model"]), (200, "offline"), body)
        self.assertIn("PROMPT-https-plan", body["response"])
        code, body = await self.https_ask(ports["http"], "PROMPT-https-plan", None)
        self.assertEqual(code, 401, body)
        self.assert_no_secrets(await self.stop())

    async def test_wss(self) -> None:
        """
        When a client connects over WSS with C{?api_key=}, on the WebSocket
        port and at C{/ws} on the HTTPS port, then it gets streamed answers;
        the log holds neither keys nor prompts.
        """
        ports = await self.start()
        for port, path in [(ports["websocket"], "/"), (ports["http"], "/ws")]:
            client = await self.connect_wss(port, f"{path}?api_key={BOB_KEY}")
            client.send_json(ask("w", "new", "PROMPT-wss-plan"))
            text, done = await collect(self, client, "w")
            self.assertEqual(done["type"], "done", done)
            self.assertIn("PROMPT-wss-plan", text)
            client.sendClose()
            await within(client.closed)
        self.assert_no_secrets(await self.stop())

    async def test_wss_refuses_without_key(self) -> None:
        """
        When a WSS client shows no key or a wrong one, on either port, then
        it hears 4401 and the reason, not an answer.
        """
        ports = await self.start()
        for port, path, reason in [
            (ports["websocket"], "/", KEY_REQUIRED),
            (ports["websocket"], "/?api_key=sk-prod-wrong-31", "the API key is not valid"),
            (ports["http"], "/ws", KEY_REQUIRED),
        ]:
            client = await self.connect_wss(port, path)
            client.send_json(ask("x", "new", "PROMPT-wss-plan"))
            closed: Deferred = Deferred()
            client.closed.addCallback(lambda r, d=closed: (d.callback(r), r)[1])
            index, result = await within(race([closed, client.messages.get()]))
            self.assertEqual(index, 0, f"answered without a key: {result}")
            self.assertEqual(result[1:], (CLOSE_UNAUTHENTICATED, reason))
        self.assert_no_secrets(await self.stop())

    async def test_grpc_over_tls(self) -> None:
        """
        When a gRPC client trusting the certificate calls with a key, then
        it gets the streamed answer; without a key, UNAUTHENTICATED; and
        neither the keys nor the prompt reach the log.
        """
        import grpc
        from twisted.internet.threads import deferToThread

        from easybackend.proto import chat_pb2, chat_pb2_grpc

        ports = await self.start()
        with open(self.cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(f.read())

        def call(key: str | None) -> tuple[list[Any], Any]:
            with grpc.secure_channel(f"localhost:{ports['grpc']}", credentials) as channel:
                metadata = [("authorization", f"Bearer {key}")] if key else None
                stream = chat_pb2_grpc.ChatStub(channel).Ask(
                    chat_pb2.AskRequest(prompt="PROMPT-grpc-plan"), timeout=20,
                    metadata=metadata)
                messages = []
                try:
                    for m in stream:
                        messages.append(m)
                except grpc.RpcError as e:
                    return messages, e.code()
                return messages, None

        messages, code = await within(deferToThread(call, ALICE_KEY), 30)
        self.assertIsNone(code)
        self.assertTrue(messages[-1].done)
        self.assertIn("PROMPT-grpc-plan", "".join(m.response for m in messages))
        _, code = await within(deferToThread(call, None), 30)
        self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED)
        output = await self.stop()
        self.assert_no_secrets(output)
        self.assertNotIn(b"PROMPT-grpc-plan", output)
