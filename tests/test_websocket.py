"""
Tests for L{easybackend.transports.websocket}: a real Autobahn client over
loopback sockets, against a fake conversation service (the transport alone)
and against the real core with the fake OpenAI upstream (end to end).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredQueue,
    gatherResults,
    inlineCallbacks,
)
from twisted.internet.endpoints import (
    clientFromString,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from easybackend.auth import KeyRing
from easybackend.errors import NotFound, RateLimited, UpstreamTimeout
from easybackend.model import Answer, AskRequest, Usage
from easybackend.transports.websocket import (
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_UNAUTHENTICATED,
    KEY_REQUIRED,
    TEXT_END,
    TEXT_USAGE,
    ChatServerFactory,
    ChatServerProtocol,
    WebSocketFactoryService,
    make_websocket_factory,
    websocket_resource,
)

#: Bound on every wait: a broken test fails, it does not hang.
TIMEOUT = 5


def timeout(d: Deferred) -> Deferred:
    return d.addTimeout(TIMEOUT, reactor)


# --- a fake conversation service ------------------------------------------


class FakeAsk:
    """One call to L{FakeService.ask}, answered by the test."""

    def __init__(self, request: AskRequest, on_piece: Callable[[str], None]):
        self.request = request
        self.on_piece = on_piece
        #: fires when the transport cancels the ask
        self.cancelled: Deferred[None] = Deferred()
        self.deferred: Deferred[Answer] = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        self.cancelled.callback(None)

    def answer(self, text: str = "", conversation_id: str | None = None) -> Answer:
        answer = Answer(
            conversation_id=conversation_id or self.request.conversation_id,
            # the client's part of the request id (after the connection id)
            message_id="m-" + (self.request.request_id or "x").rsplit(":", 1)[-1],
            text=text,
            model="fake-model",
            usage=Usage(3, 4, 7),
            finish_reason="stop",
        )
        self.deferred.callback(answer)
        return answer


class FakeService:
    """Records asks; the test plays the core's part."""

    def __init__(self) -> None:
        self.asks: DeferredQueue[FakeAsk] = DeferredQueue()
        self.all: list[FakeAsk] = []
        self.raise_on_ask: Exception | None = None

    def ask(self, request: AskRequest, on_piece: Callable[[str], None]) -> Deferred:
        if self.raise_on_ask is not None:
            raise self.raise_on_ask
        fake = FakeAsk(request, on_piece)
        self.all.append(fake)
        # Hand it to the test on the next turn of the reactor, not from
        # inside this call: a test that answers at once would otherwise run
        # before the transport has even got the Deferred back.
        reactor.callLater(0, self.asks.put, fake)
        return fake.deferred

    def next_ask(self) -> "Deferred[FakeAsk]":
        return timeout(self.asks.get())


# --- a real Autobahn client ------------------------------------------------


class Client(WebSocketClientProtocol):
    """Queues every message it gets; C{closed} fires with the close code."""

    answer_pings = True

    def __init__(self) -> None:
        super().__init__()
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        text = payload.decode("utf-8")
        try:
            self.messages.put(json.loads(text))
        except ValueError:
            self.messages.put(text)

    def connectionLost(self, reason: Failure) -> None:
        #: how the TCP connection ended (ConnectionDone: a FIN)
        self.lost_reason = reason
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        self.closed.callback((wasClean, code, reason))

    def onPing(self, payload: bytes) -> None:
        if self.answer_pings:
            super().onPing(payload)

    def send_json(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode("utf-8"))

    def send_text(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"))

    def next(self) -> Deferred:
        return timeout(self.messages.get())

    @inlineCallbacks
    def barrier(self):
        """
        Wait until the server handled every message sent before: its reply
        to a bad message comes after theirs, since it reads in order.
        """
        self.send_json({"type": "barrier"})
        message = yield self.next()
        assert message["type"] == "error" and "barrier" in message["message"], message
        return None


class ServerProtocol(ChatServerProtocol):
    """The server's protocol, telling the test when its connection is gone."""

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.lost.append(reason)
        self.factory.lost_events.put(self)


class WebSocketTestMixin:
    """Start a server on loopback; connect clients; clean up after."""

    service: Any

    def start_server(self, service: Any, **options: Any) -> ChatServerFactory:
        factory = make_websocket_factory(service, **options)
        self.use_server_factory(factory)
        return factory

    def use_server_factory(self, factory: ChatServerFactory) -> None:
        factory.protocol = ServerProtocol
        factory.lost = []
        factory.lost_events = DeferredQueue()
        self.server_factory = factory
        self.server_connections = 0
        self.clients: list[Client] = []

    @inlineCallbacks
    def listen(self, factory_or_site: Any,
               description: str = "tcp:0:interface=127.0.0.1"):
        port = yield serverFromString(reactor, description).listen(factory_or_site)
        self.port = port
        self.addCleanup(self._stop, port)
        return port.getHost().port

    @inlineCallbacks
    def _stop(self, port):
        closing = []
        for client in self.clients:
            if not client.closed.called:
                client.sendClose()
            closing.append(client.closed)
        if closing:
            yield timeout(gatherResults(closing))
        # Every server side connection must be gone too.
        while len(self.server_factory.lost) < len(self.clients):
            yield timeout(self.server_factory.lost_events.get())
        yield port.stopListening()

    @inlineCallbacks
    def connect(self, port: int, path: str = "", client_class=Client,
                headers: dict[str, str] | None = None, tls: Any = None):
        """
        A client connected to C{port}; over TLS (C{wss://localhost}) with
        C{tls}, client TLS options trusting the server's certificate.
        """
        scheme, host = ("wss", "localhost") if tls is not None else ("ws", "127.0.0.1")
        factory = WebSocketClientFactory(
            f"{scheme}://{host}:{port}{path}", headers=headers or {}
        )
        factory.protocol = client_class
        factory.opened = Deferred()
        endpoint = clientFromString(reactor, f"tcp:127.0.0.1:{port}")
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        yield endpoint.connect(factory)
        client = yield timeout(factory.opened)
        self.clients.append(client)
        return client

    @inlineCallbacks
    def server_and_client(self, **options: Any):
        self.service = FakeService()
        self.start_server(self.service, **options)
        port = yield self.listen(self.server_factory)
        client = yield self.connect(port)
        return client


def ask(ask_id: Any, conversation_id: str = "new", prompt: str = "hi", **more):
    return {
        "type": "ask", "id": ask_id, "conversation_id": conversation_id,
        "prompt": prompt, **more,
    }


# --- the transport alone, with a fake service --------------------------------


class JSONProtocolTests(WebSocketTestMixin, TestCase):
    @inlineCallbacks
    def test_ask_streams_deltas_then_done(self):
        client = yield self.server_and_client()
        client.send_json(ask("a1", "conv-1", "Hello $ there"))
        fake = yield self.service.next_ask()
        self.assertEqual(fake.request.conversation_id, "conv-1")
        self.assertEqual(fake.request.prompt, "Hello $ there")
        self.assertEqual(fake.request.request_id, f"{self._server_connection_id()}:a1")
        fake.on_piece("Hel")
        fake.on_piece("lo ✓")
        fake.answer("Hello ✓")
        self.assertEqual(
            (yield client.next()), {"type": "delta", "id": "a1", "text": "Hel"}
        )
        self.assertEqual(
            (yield client.next()), {"type": "delta", "id": "a1", "text": "lo ✓"}
        )
        self.assertEqual(
            (yield client.next()),
            {
                "type": "done", "id": "a1", "conversation_id": "conv-1",
                "message_id": "m-a1", "model": "fake-model",
                "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                          "total_tokens": 7},
                "finish_reason": "stop", "prompt_message_id": None,
            },
        )
        self.assertEqual(self._server_in_flight(), {})

    def _server_in_flight(self) -> dict:
        (protocol,) = self.server_factory.connections
        return protocol.in_flight

    def _server_connection_id(self) -> str:
        (protocol,) = self.server_factory.connections
        return protocol.connection_id

    @inlineCallbacks
    def test_ask_options(self):
        """The optional fields reach the core, like over HTTP."""
        client = yield self.server_and_client()
        client.send_json(ask(
            7, "new", "p", system_prompt="be brief", model="m1",
            temperature=0.5, max_tokens=10, parent_id="msg-3",
        ))
        fake = yield self.service.next_ask()
        self.assertEqual(
            fake.request,
            AskRequest(
                conversation_id="new", prompt="p", system_prompt="be brief",
                model="m1", temperature=0.5, max_tokens=10, parent_id="msg-3",
                request_id=f"{self._server_connection_id()}:7",
                transport="websocket",
            ),
        )
        fake.answer("x", conversation_id="c-new")
        done = yield client.next()
        self.assertEqual((done["type"], done["id"]), ("done", 7))
        self.assertEqual(done["conversation_id"], "c-new")

    @inlineCallbacks
    def test_several_asks_in_flight(self):
        """Asks run at once on one socket, told apart by id."""
        client = yield self.server_and_client()
        for i in range(3):
            client.send_json(ask(f"q{i}", f"c{i}", f"prompt {i}"))
        fakes = []
        for i in range(3):
            fakes.append((yield self.service.next_ask()))
        self.assertEqual(set(self._server_in_flight()), {"q0", "q1", "q2"})
        fakes[2].on_piece("two")
        fakes[0].on_piece("zero")
        fakes[1].on_piece("one")
        fakes[1].answer("one")
        fakes[2].answer("two")
        fakes[0].answer("zero")
        got = []
        for _ in range(6):
            got.append((yield client.next()))
        self.assertEqual(
            [(m["type"], m["id"]) for m in got],
            [("delta", "q2"), ("delta", "q0"), ("delta", "q1"),
             ("done", "q1"), ("done", "q2"), ("done", "q0")],
        )
        self.assertEqual([m["text"] for m in got[:3]], ["two", "zero", "one"])
        self.assertEqual(self._server_in_flight(), {})

    @inlineCallbacks
    def test_id_reusable_after_done(self):
        client = yield self.server_and_client()
        for round in range(2):
            client.send_json(ask("same"))
            fake = yield self.service.next_ask()
            fake.answer("ok")
            self.assertEqual((yield client.next())["type"], "done")

    @inlineCallbacks
    def test_cancel(self):
        """
        A cancel cancels that ask in the core, which answers C{cancelled};
        the other asks and the connection go on.
        """
        client = yield self.server_and_client()
        client.send_json(ask("keep", "c1"))
        client.send_json(ask("stop", "c2"))
        keep = yield self.service.next_ask()
        stop = yield self.service.next_ask()
        stop.on_piece("partial")
        self.assertEqual(
            (yield client.next()), {"type": "delta", "id": "stop", "text": "partial"}
        )
        client.send_json({"type": "cancel", "id": "stop"})
        yield timeout(stop.cancelled)
        self.assertEqual((yield client.next()), {"type": "cancelled", "id": "stop"})
        # A piece the core would still pass on is dropped.
        stop.on_piece("late")
        keep.on_piece("k")
        keep.answer("k")
        self.assertEqual((yield client.next())["id"], "keep")
        self.assertEqual((yield client.next())["type"], "done")
        self.assertFalse(keep.cancelled.called)

    @inlineCallbacks
    def test_cancel_unknown_id_is_ignored(self):
        """
        Cancelling an ask that already ended (or never was) is not an
        error: the ask already got its final message.
        """
        client = yield self.server_and_client()
        client.send_json(ask("a"))
        fake = yield self.service.next_ask()
        fake.answer("x")
        self.assertEqual((yield client.next())["type"], "done")
        client.send_json({"type": "cancel", "id": "a"})
        client.send_json({"type": "cancel", "id": "never"})
        yield client.barrier()
        self.assertEqual(client.messages.pending, [])

    @inlineCallbacks
    def test_core_errors_use_their_codes(self):
        client = yield self.server_and_client()
        client.send_json(ask("nf", parent_id="nope"))
        client.send_json(ask("slow", "c2"))
        nf = yield self.service.next_ask()
        slow = yield self.service.next_ask()
        nf.deferred.errback(NotFound("no message nope"))
        slow.deferred.errback(UpstreamTimeout("upstream took too long"))
        self.assertEqual(
            (yield client.next()),
            {"type": "error", "id": "nf", "code": "not_found",
             "message": "no message nope"},
        )
        self.assertEqual(
            (yield client.next()),
            {"type": "error", "id": "slow", "code": "upstream_timeout",
             "message": "upstream took too long"},
        )

    @inlineCallbacks
    def test_unexpected_failure_is_logged_and_reported(self):
        client = yield self.server_and_client()
        client.send_json(ask("boom"))
        fake = yield self.service.next_ask()
        fake.deferred.errback(ZeroDivisionError("oops"))
        self.assertEqual(
            (yield client.next()),
            {"type": "error", "id": "boom", "code": "internal",
             "message": "internal error"},
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        # A core that raises instead of failing its Deferred: the same.
        self.service.raise_on_ask = KeyError("k")
        client.send_json(ask("raise"))
        self.assertEqual(
            (yield client.next()),
            {"type": "error", "id": "raise", "code": "internal",
             "message": "internal error"},
        )
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(self._server_in_flight(), {})

    @inlineCallbacks
    def test_failure_in_the_protocol_is_logged_and_reported(self):
        """Even a bug in the transport itself gets the client an error."""
        client = yield self.server_and_client()
        (protocol,) = self.server_factory.connections

        def broken(message):
            raise RuntimeError("bug")

        protocol._on_json = broken
        client.send_json(ask("x"))
        self.assertEqual(
            (yield client.next()),
            {"type": "error", "id": None, "code": "internal",
             "message": "internal error"},
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        protocol._on_text = broken
        client.send_text("<|ask|>$c$p")
        self.assertEqual((yield client.next()), "<|err|>$internal error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class BadInputTests(WebSocketTestMixin, TestCase):
    """Each bad input gets an error, and the connection stays usable."""

    @inlineCallbacks
    def check(self, send: Callable[[Client], None], expected_id: Any,
              message_part: str):
        client = yield self.server_and_client()
        send(client)
        error = yield client.next()
        self.assertEqual(error["type"], "error", error)
        self.assertEqual(error["code"], "bad_request", error)
        self.assertEqual(error["id"], expected_id, error)
        self.assertIn(message_part, error["message"])
        # Still usable:
        client.send_json(ask("after"))
        fake = yield self.service.next_ask()
        fake.answer("fine")
        self.assertEqual((yield client.next())["type"], "done")
        self.assertEqual(self.server_factory.lost, [])
        return error

    def test_binary_frame(self):
        return self.check(
            lambda c: c.sendMessage(b"\x00\x01", isBinary=True), None, "binary"
        )

    def test_invalid_json(self):
        return self.check(
            lambda c: c.send_text('{"type": "ask", "id": '), None, "invalid JSON"
        )

    def test_json_not_an_object(self):
        return self.check(lambda c: c.send_text("[1, 2]"), None, "JSON object")

    def test_unknown_type(self):
        return self.check(
            lambda c: c.send_json({"type": "dance", "id": "d"}), "d", "dance"
        )

    def test_missing_type(self):
        return self.check(lambda c: c.send_json({"id": "t"}), "t", '"type"')

    def test_missing_id(self):
        m = ask(None)
        del m["id"]
        return self.check(lambda c: c.send_json(m), None, '"id"')

    def test_mistyped_id(self):
        return self.check(lambda c: c.send_json(ask(True)), None, '"id"')

    def test_empty_id(self):
        return self.check(lambda c: c.send_json(ask("")), None, '"id"')

    def test_cancel_without_id(self):
        return self.check(
            lambda c: c.send_json({"type": "cancel", "id": [1]}), None, '"id"'
        )

    def test_missing_conversation_id(self):
        m = ask("m")
        del m["conversation_id"]
        return self.check(lambda c: c.send_json(m), "m", '"conversation_id"')

    def test_bad_conversation_id(self):
        return self.check(
            lambda c: c.send_json(ask("m", "../etc")), "m", "conversation id"
        )

    def test_missing_prompt(self):
        m = ask("m")
        del m["prompt"]
        return self.check(lambda c: c.send_json(m), "m", '"prompt"')

    def test_mistyped_prompt(self):
        return self.check(
            lambda c: c.send_json(ask("m", prompt=42)), "m", '"prompt"'
        )

    def test_mistyped_temperature(self):
        return self.check(
            lambda c: c.send_json(ask("m", temperature="hot")), "m",
            '"temperature"',
        )

    def test_mistyped_max_tokens(self):
        return self.check(
            lambda c: c.send_json(ask("m", max_tokens=1.5)), "m", '"max_tokens"'
        )

    @inlineCallbacks
    def test_duplicate_id_in_flight(self):
        """
        A second ask with the id of one in flight is refused; the first
        goes on.
        """
        client = yield self.server_and_client()
        client.send_json(ask("dup", "c1"))
        first = yield self.service.next_ask()
        client.send_json(ask("dup", "c2"))
        error = yield client.next()
        self.assertEqual(
            (error["type"], error["id"], error["code"]),
            ("error", "dup", "bad_request"),
        )
        self.assertIn("already in flight", error["message"])
        self.assertEqual(len(self.service.all), 1)
        first.on_piece("still here")
        first.answer("still here")
        self.assertEqual((yield client.next())["text"], "still here")
        self.assertEqual((yield client.next())["type"], "done")

    @inlineCallbacks
    def test_message_over_the_limit_closes_1009(self):
        client = yield self.server_and_client(max_message_size=1000)
        client.send_json(ask("small", prompt="x" * 500))
        fake = yield self.service.next_ask()
        client.send_json(ask("big", prompt="x" * 2000))
        was_clean, code, reason = yield timeout(client.closed)
        self.assertEqual(code, 1009)
        # Closing cancelled the ask in flight.
        yield timeout(fake.cancelled)


class TextProtocolTests(WebSocketTestMixin, TestCase):
    @inlineCallbacks
    def test_ask(self):
        """
        C{<|ask|>$id$prompt} gets the pieces as text frames, then
        C{<|end|>}; the prompt keeps its C{$}.
        """
        client = yield self.server_and_client()
        client.send_text("<|ask|>$conv-9$what is $5 + $6?")
        fake = yield self.service.next_ask()
        self.assertEqual(fake.request.conversation_id, "conv-9")
        self.assertEqual(fake.request.prompt, "what is $5 + $6?")
        self.assertEqual(fake.request.transport, "websocket")
        fake.on_piece("eleven")
        fake.on_piece(" dollars")
        fake.answer("eleven dollars")
        self.assertEqual((yield client.next()), "eleven")
        self.assertEqual((yield client.next()), " dollars")
        self.assertEqual((yield client.next()), TEXT_END)

    @inlineCallbacks
    def test_failure(self):
        client = yield self.server_and_client()
        client.send_text("<|ask|>$c$p")
        fake = yield self.service.next_ask()
        fake.deferred.errback(UpstreamTimeout("upstream took too long"))
        self.assertEqual((yield client.next()), "<|err|>$upstream took too long")

    @inlineCallbacks
    def test_bad_fields(self):
        client = yield self.server_and_client()
        client.send_text("<|ask|>$../x$p")
        self.assertTrue((yield client.next()).startswith("<|err|>$conversation id"))
        client.send_text("<|ask|>$c$   ")
        self.assertEqual((yield client.next()), '<|err|>$"prompt" must not be empty')

    @inlineCallbacks
    def test_usage_hint(self):
        """Any other text gets C{<|err|>$} and a usage hint."""
        client = yield self.server_and_client()
        for text in ["hello", "<|ask|>", "<|ask|>$only-id", "<|ask|>no-dollar",
                     "<|end|>", ""]:
            client.send_text(text)
            self.assertEqual((yield client.next()), f"<|err|>${TEXT_USAGE}", text)
        self.assertEqual(self.service.all, [])

    @inlineCallbacks
    def test_text_asks_run_one_after_the_other(self):
        """
        Text frames carry no id: a second text ask on the connection waits
        for the first to end, so that their pieces do not interleave.
        """
        client = yield self.server_and_client()
        client.send_text("<|ask|>$c1$first")
        client.send_text("<|ask|>$c2$second")
        first = yield self.service.next_ask()
        yield client.barrier()
        self.assertEqual(len(self.service.all), 1)
        first.answer("1")
        self.assertEqual((yield client.next()), TEXT_END)
        second = yield self.service.next_ask()
        self.assertEqual(second.request.prompt, "second")
        second.answer("2")
        self.assertEqual((yield client.next()), TEXT_END)

    @inlineCallbacks
    def test_both_protocols_on_one_socket(self):
        client = yield self.server_and_client()
        client.send_text("<|ask|>$c1$text")
        client.send_json(ask("j", "c2"))
        text = yield self.service.next_ask()
        json_ask = yield self.service.next_ask()
        json_ask.on_piece("J")
        text.on_piece("T")
        self.assertEqual((yield client.next()), {"type": "delta", "id": "j", "text": "J"})
        self.assertEqual((yield client.next()), "T")


class DisconnectTests(WebSocketTestMixin, TestCase):
    @inlineCallbacks
    def test_abort_cancels_everything_in_flight(self):
        """
        A client that vanishes (TCP reset, no closing handshake) cancels
        its JSON asks, its running text ask and its queued text ask.
        """
        client = yield self.server_and_client()
        client.send_json(ask("a", "c1"))
        client.send_json(ask("b", "c2"))
        client.send_text("<|ask|>$c3$x")
        client.send_text("<|ask|>$c4$queued")
        fakes = []
        for _ in range(3):
            fakes.append((yield self.service.next_ask()))
        fakes[0].on_piece("piece")
        yield client.next()
        client.transport.abortConnection()
        yield timeout(gatherResults([f.cancelled for f in fakes]))
        yield timeout(self.server_factory.lost_events.get())
        self.assertEqual(len(self.service.all), 3)
        # Pieces after the close go nowhere, and raise nothing.
        fakes[1].on_piece("too late")
        self.assertEqual(self.server_factory.connections, set())

    @inlineCallbacks
    def test_clean_close_cancels(self):
        client = yield self.server_and_client()
        client.send_json(ask("a"))
        fake = yield self.service.next_ask()
        client.sendClose()
        yield timeout(fake.cancelled)
        yield timeout(client.closed)

    @inlineCallbacks
    def test_dead_peer_dropped_by_auto_ping(self):
        """
        A peer that stops answering pings is dropped after the timeout, and
        its asks cancelled.
        """

        self.service = FakeService()
        # Autobahn rounds its timers down to whole seconds: this drops the
        # peer 1 to 2 seconds after it stops answering.
        self.start_server(
            self.service, auto_ping_interval=1, auto_ping_timeout=1
        )
        port = yield self.listen(self.server_factory)
        client = yield self.connect(port)
        client.send_json(ask("a"))
        fake = yield self.service.next_ask()
        # From now on the client's side is dead: it no longer answers.
        client.answer_pings = False
        yield timeout(fake.cancelled)
        was_clean, code, reason = yield timeout(client.closed)
        self.assertFalse(was_clean)

    @inlineCallbacks
    def test_live_peer_kept_by_auto_ping(self):
        """A peer that answers pings stays, across pings."""
        self.service = FakeService()
        factory = self.start_server(
            self.service, auto_ping_interval=1, auto_ping_timeout=1
        )
        pongs: DeferredQueue = DeferredQueue()
        original = ServerProtocol.onPong

        def onPong(protocol, payload):
            pongs.put(payload)
            return original(protocol, payload)

        factory.protocol = type("P", (ServerProtocol,), {"onPong": onPong})
        port = yield self.listen(factory)
        client = yield self.connect(port)
        for _ in range(2):
            yield timeout(pongs.get())
        client.send_json(ask("a"))
        (yield self.service.next_ask()).answer("x")
        self.assertEqual((yield client.next())["type"], "done")

    @inlineCallbacks
    def test_stopping_the_port_leaves_connections(self):
        """
        Stopping the listener leaves open connections and their asks alone,
        so that a graceful shutdown can let them finish.
        """
        client = yield self.server_and_client()
        client.send_json(ask("a"))
        fake = yield self.service.next_ask()
        yield self.port.stopListening()
        fake.on_piece("still")
        fake.answer("still")
        self.assertEqual((yield client.next())["text"], "still")
        self.assertEqual((yield client.next())["type"], "done")
        self.assertFalse(fake.cancelled.called)

    @inlineCallbacks
    def test_close_all(self):
        """
        C{close_all} cancels the asks in flight (the client hears
        C{cancelled} first), closes with 1001 (going away), and fires once
        the connections are gone.
        """
        client = yield self.server_and_client()
        client.send_json(ask("a"))
        client.send_text("<|ask|>$c$x")
        json_ask = yield self.service.next_ask()
        text_ask = yield self.service.next_ask()
        yield timeout(self.server_factory.close_all())
        self.assertEqual(self.server_factory.connections, set())
        self.assertTrue(json_ask.cancelled.called)
        self.assertTrue(text_ask.cancelled.called)
        got = [(yield client.next()), (yield client.next())]
        self.assertEqual(
            sorted(map(str, got)),
            sorted(map(str, [{"type": "cancelled", "id": "a"},
                             "<|err|>$cancelled"])),
        )
        was_clean, code, reason = yield timeout(client.closed)
        self.assertEqual((was_clean, code, reason),
                         (True, 1001, "server shutting down"))
        # Nothing left to close:
        yield timeout(self.server_factory.close_all())

    @inlineCallbacks
    def test_close_all_with_a_peer_that_reads_nothing(self):
        """
        When a client has stopped reading and the server's writes to it are
        stuck, then C{close_all} still ends its connection (with a reset,
        after the close handshake timeout and as long again), so that a
        shutdown does not wait on it forever.
        """
        client = yield self.server_and_client()
        client.send_json(ask("a"))
        fake = yield self.service.next_ask()
        client.transport.pauseProducing()
        server = next(iter(self.server_factory.connections))
        piece = "x" * 65536
        for _ in range(1024):  # at most 64 MiB, far beyond loopback's buffers
            fake.on_piece(piece)
            # a turn of the reactor, in which the transport tries to send
            yield deferLater(reactor, 0.001, lambda: None)
            if len(server.transport.dataBuffer) > server.transport.offset:
                break  # the socket took not all: the writes are stuck
        else:
            self.fail("the client's socket never filled up")
        closing = self.server_factory.close_all()
        yield closing.addTimeout(3 * CLOSE_HANDSHAKE_TIMEOUT, reactor)
        self.assertEqual(self.server_factory.connections, set())
        self.assertTrue(server.wasCloseHandshakeTimeout)
        client.transport.resumeProducing()  # to see the reset
        yield timeout(client.closed)
        self.assertFalse(client.lost_reason.check(ConnectionDone), client.lost_reason)

    @inlineCallbacks
    def test_resource_factory_service(self):
        """
        A factory only mounted on the HTTP site, run by its service, is
        closed the same way.
        """
        from twisted.web.resource import Resource

        self.service = FakeService()
        factory = self.start_server(self.service)
        service = WebSocketFactoryService(factory)
        service.startService()
        self.assertEqual(factory.numPorts, 1)
        root = Resource()
        root.putChild(b"ws", websocket_resource(factory))
        port = yield self.listen(Site(root))
        client = yield self.connect(port, "/ws")
        client.send_text("<|ask|>$c$x")
        fake = yield self.service.next_ask()
        service.stopService()
        self.assertEqual(factory.numPorts, 0)
        yield timeout(factory.close_all())
        self.assertTrue(fake.cancelled.called)
        self.assertEqual((yield client.next()), "<|err|>$cancelled")
        was_clean, code, reason = yield timeout(client.closed)
        self.assertEqual(code, 1001)


class HTTPMountTests(WebSocketTestMixin, TestCase):
    @inlineCallbacks
    def check_site(self, site: Site):
        port = yield self.listen(site)
        client = yield self.connect(port, "/ws")
        client.send_json(ask("h", "c"))
        fake = yield self.service.next_ask()
        fake.on_piece("via http")
        fake.answer("via http")
        self.assertEqual((yield client.next())["text"], "via http")
        self.assertEqual((yield client.next())["type"], "done")
        client.send_text("<|ask|>$c$old")
        (yield self.service.next_ask()).answer("")
        self.assertEqual((yield client.next()), TEXT_END)

    def test_klein_branch_route(self):
        """Mounted as the lead's Klein app does: a route returning it."""
        self.service = FakeService()
        factory = self.start_server(self.service)
        resource = websocket_resource(factory)
        app = Klein()

        @app.route("/ws", branch=True)
        def ws(request):
            return resource

        @app.route("/healthz")
        def healthz(request):
            return "ok"

        return self.check_site(Site(app.resource()))

    def test_put_child(self):
        from twisted.web.resource import Resource

        self.service = FakeService()
        factory = self.start_server(self.service)
        root = Resource()
        root.putChild(b"ws", websocket_resource(factory))
        return self.check_site(Site(root))


class FactoryTests(SynchronousTestCase):
    def test_options(self):
        service = object()
        factory = make_websocket_factory(
            service, url="ws://example.com:9001", max_message_size=4096,
            auto_ping_interval=7, auto_ping_timeout=3,
            allowed_origins=["https://app.example.com"], reactor=reactor,
        )
        self.assertIsInstance(factory, ChatServerFactory)
        self.assertIs(factory.service, service)
        self.assertIs(factory.protocol, ChatServerProtocol)
        self.assertEqual(factory.maxMessagePayloadSize, 4096)
        self.assertEqual(factory.maxFramePayloadSize, 4096)
        self.assertEqual(factory.autoPingInterval, 7)
        self.assertEqual(factory.autoPingTimeout, 3)
        self.assertEqual(factory.allowedOrigins, ["https://app.example.com"])
        self.assertFalse(factory.failByDrop)

    def test_defaults(self):
        factory = make_websocket_factory(object())
        self.assertEqual(factory.maxMessagePayloadSize, 1024 * 1024)
        self.assertEqual(factory.autoPingInterval, 20)
        self.assertEqual(factory.autoPingTimeout, 10)
        self.assertEqual(factory.allowedOrigins, ["*"])

    def test_bad_options(self):
        self.assertRaises(
            ValueError, make_websocket_factory, object(), max_message_size=-1
        )
        for bad in [-1, 0.5, float("nan")]:
            self.assertRaises(
                ValueError, make_websocket_factory, object(),
                auto_ping_timeout=bad,
            )
            self.assertRaises(
                ValueError, make_websocket_factory, object(),
                auto_ping_interval=bad,
            )
        factory = make_websocket_factory(
            object(), auto_ping_interval=0, auto_ping_timeout=0
        )
        self.assertEqual(factory.autoPingInterval, 0)

    def test_factory_service_counts(self):
        """
        The service uses doStart/doStop: the factory stops only when its
        last user (a port, the resource's service) stops.
        """
        factory = make_websocket_factory(object())
        service = WebSocketFactoryService(factory)
        factory.doStart()  # a port
        service.startService()
        self.assertEqual(factory.numPorts, 2)
        service.stopService()
        self.assertEqual(factory.numPorts, 1)
        factory.doStop()
        self.assertEqual(factory.numPorts, 0)


# --- end to end: the real core, a real store ----------------------------------


class HangingUpstream:
    """
    An upstream that passes on one piece, then waits until cancelled;
    C{cancels} gets each request whose cancel reached it.
    """

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.cancels: DeferredQueue[Any] = DeferredQueue()
        self.started: DeferredQueue[Any] = DeferredQueue()

    def stream_chat(self, request: Any, on_piece: Callable[[str], None]) -> Deferred:
        self.requests.append(request)
        d: Deferred = Deferred(lambda d: self.cancels.put(request))
        on_piece("partial ")
        reactor.callLater(0, self.started.put, request)
        return d


class EndToEndTests(WebSocketTestMixin, TestCase):
    """The WebSocket transport over the real core, store and upstream."""

    @inlineCallbacks
    def serve(self, upstream: Any):
        from easybackend.testing.fixtures import make_core

        self.core = yield Deferred.fromCoroutine(make_core(self, upstream))
        self.start_server(self.core)
        self.ws_port = yield self.listen(self.server_factory)
        client = yield self.connect(self.ws_port)
        return client

    def offline(self) -> Any:
        from easybackend.offline import OfflineUpstream

        return OfflineUpstream(reactor, interval=0.001)

    @inlineCallbacks
    def collect(self, client: Client, ask_id: Any):
        """The deltas' text and the final message of C{ask_id}."""
        text = []
        while True:
            message = yield client.next()
            self.assertEqual(message["id"], ask_id, message)
            if message["type"] != "delta":
                return "".join(text), message
            text.append(message["text"])

    @inlineCallbacks
    def test_conversation(self):
        """
        Ask on C{new}; ask again on the id the first answer gave: the core
        remembers the first turn; both turns are stored.
        """
        client = yield self.serve(self.offline())
        client.send_json(ask("1", "new", "Hello"))
        first, done = yield self.collect(client, "1")
        self.assertEqual(done["type"], "done")
        self.assertIn("Hello", first)
        self.assertEqual(done["model"], "offline")
        self.assertEqual(done["finish_reason"], "stop")
        self.assertGreater(done["usage"]["total_tokens"], 0)
        cid = done["conversation_id"]
        client.send_json(ask("2", cid, "Again"))
        second, done2 = yield self.collect(client, "2")
        self.assertIn("I see 1 earlier turn", second)
        view = yield self.core.get_conversation(cid)
        self.assertEqual(
            [(m.role, m.content) for m in view.messages],
            [("user", "Hello"), ("assistant", first),
             ("user", "Again"), ("assistant", second)],
        )
        self.assertEqual(view.messages[-1].id, done2["message_id"])
        self.assertEqual(view.messages[-2].id, done2["prompt_message_id"])

    @inlineCallbacks
    def test_text_protocol(self):
        client = yield self.serve(self.offline())
        client.send_text("<|ask|>$notes-1$costs $5 or $6?")
        pieces = []
        while True:
            piece = yield client.next()
            if piece == TEXT_END:
                break
            pieces.append(piece)
        self.assertGreater(len(pieces), 1)
        view = yield self.core.get_conversation("notes-1")
        self.assertEqual(
            [(m.role, m.content) for m in view.messages],
            [("user", "costs $5 or $6?"), ("assistant", "".join(pieces))],
        )
        client.send_text("<|ask|>$notes-1$  ")
        self.assertEqual((yield client.next()), '<|err|>$"prompt" must not be empty')

    @inlineCallbacks
    def test_several_conversations_in_flight(self):
        client = yield self.serve(self.offline())
        for i in range(3):
            client.send_json(ask(i, f"conv-{i}", f"prompt number {i}"))
        texts: dict[int, list[str]] = {0: [], 1: [], 2: []}
        done = {}
        while len(done) < 3:
            message = yield client.next()
            if message["type"] == "delta":
                texts[message["id"]].append(message["text"])
            else:
                self.assertEqual(message["type"], "done", message)
                done[message["id"]] = message
        for i in range(3):
            self.assertEqual(done[i]["conversation_id"], f"conv-{i}")
            self.assertIn(f"prompt number {i}", "".join(texts[i]))

    @inlineCallbacks
    def test_core_error_codes(self):
        """The core's errors reach the client with their codes."""
        client = yield self.serve(self.offline())
        client.send_json(ask("p", "new", "x", parent_id="msg_nope"))
        _, error = yield self.collect(client, "p")
        self.assertEqual(
            (error["type"], error["code"]), ("error", "not_found"), error
        )

    @inlineCallbacks
    def test_no_upstream(self):
        client = yield self.serve(None)
        client.send_json(ask("n", "new", "x"))
        _, error = yield self.collect(client, "n")
        self.assertEqual(error["code"], "no_upstream")
        self.assertIn("--offline", error["message"])

    @inlineCallbacks
    def test_cancel_stores_nothing(self):
        """
        C{cancel} reaches the upstream, the client hears C{cancelled}, and
        the conversation stays as it was.
        """
        upstream = HangingUpstream()
        client = yield self.serve(upstream)
        client.send_json(ask("c", "kept-1", "hello"))
        self.assertEqual(
            (yield client.next()), {"type": "delta", "id": "c", "text": "partial "}
        )
        client.send_json({"type": "cancel", "id": "c"})
        yield timeout(upstream.cancels.get())
        self.assertEqual((yield client.next()), {"type": "cancelled", "id": "c"})
        e = yield self.assertFailure(
            self.core.get_conversation("kept-1"), NotFound
        )
        self.assertIn("kept-1", e.message)

    @inlineCallbacks
    def test_disconnect_stores_nothing(self):
        upstream = HangingUpstream()
        client = yield self.serve(upstream)
        client.send_json(ask("c", "kept-2", "hello"))
        yield client.next()
        client.transport.abortConnection()
        yield timeout(upstream.cancels.get())
        yield self.assertFailure(self.core.get_conversation("kept-2"), NotFound)

    @inlineCallbacks
    def test_same_conversation_waits(self):
        """
        Two asks on one conversation from one socket: the core runs the
        second after the first ended (here: was cancelled).
        """
        upstream = HangingUpstream()
        client = yield self.serve(upstream)
        client.send_json(ask("a", "shared", "first"))
        client.send_json(ask("b", "shared", "second"))
        yield timeout(upstream.started.get())
        self.assertEqual((yield client.next())["id"], "a")
        yield client.barrier()
        self.assertEqual(len(upstream.requests), 1)
        client.send_json({"type": "cancel", "id": "a"})
        self.assertEqual((yield client.next()), {"type": "cancelled", "id": "a"})
        request = yield timeout(upstream.started.get())
        self.assertEqual(request.messages[-1].content, "second")
        self.assertEqual((yield client.next()), {"type": "delta", "id": "b", "text": "partial "})

    @inlineCallbacks
    def test_ws_on_the_http_site(self):
        """
        C{/ws} on the HTTP transport (the lead's Klein app) speaks the same
        protocol, next to the HTTP routes.
        """
        from easybackend.testing.fixtures import serve_http

        yield self.serve(self.offline())
        base = yield Deferred.fromCoroutine(
            serve_http(self, self.core, websocket=websocket_resource(self.server_factory))
        )
        port = int(base.rsplit(":", 1)[1])
        client = yield self.connect(port, "/ws")
        client.send_json(ask("h", "via-http", "over the HTTP port"))
        text, done = yield self.collect(client, "h")
        self.assertEqual(done["conversation_id"], "via-http")
        self.assertIn("over the HTTP port", text)
        view = yield self.core.get_conversation("via-http")
        self.assertEqual(view.messages[0].content, "over the HTTP port")


class FakeUpstreamTests(WebSocketTestMixin, TestCase):
    """
    End to end down to the wire: the real core and treq client against the
    fake OpenAI upstream, which tells when its connection closes.
    """

    @inlineCallbacks
    def serve(self):
        from easybackend.testing.fake_upstream import FakeUpstream
        from easybackend.testing.fixtures import make_core
        from easybackend.upstream import OpenAIUpstream

        self.fake = FakeUpstream(reactor)
        yield self.fake.listen(0)
        self.addCleanup(self.fake.stop)
        upstream = OpenAIUpstream(
            reactor, base_url=self.fake.base_url, api_key="sk-test",
            max_retries=0,
        )
        self.addCleanup(upstream.close)
        self.core = yield Deferred.fromCoroutine(make_core(self, upstream))
        self.start_server(self.core)
        port = yield self.listen(self.server_factory)
        client = yield self.connect(port)
        return client

    @inlineCallbacks
    def test_streams_the_upstream_answer(self):
        from easybackend.testing.fake_upstream import Stream

        client = yield self.serve()
        self.fake.script(Stream(pieces=4))
        client.send_json(ask("s", "wire-1", "hello"))
        deltas = []
        while True:
            message = yield client.next()
            if message["type"] != "delta":
                break
            deltas.append(message["text"])
        self.assertEqual(message["type"], "done", message)
        self.assertEqual(len(deltas), 4)
        self.assertEqual("".join(deltas), "You said: hello (1 message received)")
        self.assertEqual(message["conversation_id"], "wire-1")
        self.assertEqual(message["finish_reason"], "stop")
        self.assertGreater(message["usage"]["total_tokens"], 0)
        view = yield self.core.get_conversation("wire-1")
        self.assertEqual(view.messages[-1].content, "".join(deltas))

    @inlineCallbacks
    def check_closed_upstream(self, stop: Callable[[Client], None],
                              cid: str):
        """
        Start an answer that hangs after one piece, C{stop} it from the
        client: the upstream connection closes and nothing is stored.
        """
        from easybackend.testing.fake_upstream import Stream

        client = yield self.serve()
        self.fake.script(Stream(pieces=5, fault="hang", fault_after=1))
        client.send_json(ask("x", cid, "tell me a long story"))
        first = yield client.next()
        self.assertEqual((first["type"], first["id"]), ("delta", "x"))
        received = yield timeout(self.fake.wait_for_request(0))
        self.assertFalse(received.connection_lost.called)
        stop(client)
        yield timeout(received.connection_lost)
        yield self.assertFailure(self.core.get_conversation(cid), NotFound)
        return client

    @inlineCallbacks
    def test_cancel_closes_the_upstream_connection(self):
        client = yield self.check_closed_upstream(
            lambda c: c.send_json({"type": "cancel", "id": "x"}), "wire-cancel"
        )
        self.assertEqual((yield client.next()), {"type": "cancelled", "id": "x"})
        # The socket goes on.
        client.send_json(ask("y", "wire-cancel", "short one"))
        message = yield client.next()
        self.assertEqual((message["type"], message["id"]), ("delta", "y"))

    def test_disconnect_closes_the_upstream_connection(self):
        return self.check_closed_upstream(
            lambda c: c.transport.abortConnection(), "wire-abort"
        )

    def test_clean_close_closes_the_upstream_connection(self):
        return self.check_closed_upstream(lambda c: c.sendClose(), "wire-close")

    @inlineCallbacks
    def test_upstream_errors(self):
        """
        When the upstream fails, then the client gets the matching error
        code, with C{retry_after} when the upstream said when to retry.
        """
        from easybackend.testing.fake_upstream import Status

        client = yield self.serve()
        self.fake.script(Status(429, retry_after="1"), Status(500), Status(400))
        expected = ["upstream_rate_limited", "upstream_unavailable",
                    "upstream_error"]
        for i, code in enumerate(expected):
            client.send_json(ask(i, f"err-{i}", "x"))
            message = yield client.next()
            self.assertEqual(
                (message["type"], message["id"], message["code"]),
                ("error", i, code), message,
            )
            self.assertEqual(message.get("retry_after"),
                             1 if code == "upstream_rate_limited" else None, message)


class SendFailureTests(WebSocketTestMixin, TestCase):
    @inlineCallbacks
    def test_bad_answer_gets_internal_error(self):
        """A failure turning the answer into its message is not silent."""
        client = yield self.server_and_client()
        client.send_json(ask("z"))
        fake = yield self.service.next_ask()
        fake.deferred.callback("not an Answer")
        self.assertEqual(
            (yield client.next()),
            {"type": "error", "id": "z", "code": "internal",
             "message": "internal error"},
        )
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)


# --- API keys, limits, TLS and logs (issue 5) ----------------------------------

#: Two clients' keys; the key strings must never reach a log.
KEYS = KeyRing.parse(
    ["alice:sk-alice-0123456789", "bob:sk-bob-9876543210"], "test keys"
)
ALICE = {"Authorization": "Bearer sk-alice-0123456789"}
BOB = {"Authorization": "Bearer sk-bob-9876543210"}


class EagerClient(Client):
    """Sends an ask the moment it is open, before any close can arrive."""

    def onOpen(self) -> None:
        self.send_json(ask("eager", "new", "sent at once"))
        self.send_text("<|ask|>$eager$sent at once")
        super().onOpen()


class SilentClient(EagerClient):
    """Asks at once, never answers a close frame."""

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
        if not isReply:
            super().sendCloseFrame(code, reasonUtf8, isReply)


@inlineCallbacks
def collect(testcase: TestCase, client: Client, ask_id: Any):
    """The deltas' text and the final message of C{ask_id}."""
    text = []
    while True:
        message = yield client.next()
        testcase.assertEqual(message["id"], ask_id, message)
        if message["type"] != "delta":
            return "".join(text), message
        text.append(message["text"])


class KeyTests(WebSocketTestMixin, TestCase):
    """With keys configured, the handshake must show one."""

    @inlineCallbacks
    def keyed(self, path: str = "", headers: dict[str, str] | None = None,
              client_class: Any = Client, **options: Any):
        self.service = FakeService()
        self.start_server(self.service, keys=KEYS, **options)
        port = yield self.listen(self.server_factory)
        client = yield self.connect(port, path, client_class, headers=headers)
        return client

    @inlineCallbacks
    def check_refused(self, reason: str, path: str = "",
                      headers: dict[str, str] | None = None):
        client = yield self.keyed(path, headers, client_class=EagerClient)
        was_clean, code, got_reason = yield timeout(client.closed)
        self.assertEqual((code, got_reason), (CLOSE_UNAUTHENTICATED, reason))
        self.assertTrue(was_clean)
        self.assertEqual(self.service.all, [])
        self.assertEqual(self.server_factory.connections, set())

    def test_no_key_refused(self):
        """
        When a client shows no key, then its connection closes with 4401
        and a reason naming both ways to send one, and its asks (sent at
        once) never reach the core.
        """
        return self.check_refused(KEY_REQUIRED)

    @inlineCallbacks
    def test_refused_peer_that_does_not_answer(self):
        """
        When a refused client does not answer the close frame in time, then
        its connection still ends in order, the close frame then a FIN, not
        a reset: a browser that writes before it reads (its first ask) would
        lose the 4401 and its reason to a reset and report 1006.
        """
        client = yield self.keyed(client_class=SilentClient)
        was_clean, code, reason = yield timeout(client.closed)
        self.assertEqual((code, reason), (CLOSE_UNAUTHENTICATED, KEY_REQUIRED))
        self.assertTrue(client.lost_reason.check(ConnectionDone), client.lost_reason)
        self.assertEqual(self.service.all, [])

    def test_wrong_header_key_refused(self):
        """When the header's key is wrong, then the connection closes with 4401."""
        return self.check_refused(
            "the API key is not valid",
            headers={"Authorization": "Bearer sk-alice-0123456789x"},
        )

    def test_wrong_query_key_refused(self):
        """When C{?api_key=} is wrong, then the connection closes with 4401."""
        return self.check_refused("the API key is not valid", "/?api_key=nope")

    def test_empty_query_key_refused(self):
        """When C{?api_key=} is empty, then it counts as no key."""
        return self.check_refused(KEY_REQUIRED, "/?api_key=")

    def test_not_bearer_refused(self):
        """When the header is not C{Bearer}, then the connection closes with 4401."""
        return self.check_refused(
            "an API key is required: send Authorization: Bearer <key>",
            headers={"Authorization": "Basic sk-alice-0123456789"},
        )

    def test_header_wins_over_query(self):
        """When both are sent, then the header decides (a wrong one refuses)."""
        return self.check_refused(
            "the API key is not valid", "/?api_key=sk-bob-9876543210",
            headers={"Authorization": "Bearer wrong"},
        )

    @inlineCallbacks
    def test_header_key(self):
        """
        When the header carries a known key, then every ask (JSON and text)
        is owned by the key's name and labelled C{websocket}.
        """
        client = yield self.keyed(headers=ALICE)
        client.send_json(ask("a"))
        fake = yield self.service.next_ask()
        self.assertEqual((fake.request.owner, fake.request.transport),
                         ("alice", "websocket"))
        client.send_text("<|ask|>$notes$hello")
        fake = yield self.service.next_ask()
        self.assertEqual((fake.request.owner, fake.request.transport),
                         ("alice", "websocket"))

    @inlineCallbacks
    def test_query_key(self):
        """When C{?api_key=} carries a known key, then its name owns the asks."""
        client = yield self.keyed("/?api_key=sk-bob-9876543210")
        client.send_json(ask("b"))
        fake = yield self.service.next_ask()
        self.assertEqual(fake.request.owner, "bob")
        client.send_text("<|ask|>$notes$hello")
        fake = yield self.service.next_ask()
        self.assertEqual(fake.request.owner, "bob")

    @inlineCallbacks
    def test_open_without_keys(self):
        """When no keys are configured, then anyone connects and asks unowned."""
        client = yield self.server_and_client()
        client.send_json(ask("o"))
        fake = yield self.service.next_ask()
        self.assertIsNone(fake.request.owner)

    @inlineCallbacks
    def test_request_ids_unique_per_connection(self):
        """
        When two connections use the same client id, then the core sees two
        request ids, each the connection's id and the client's.
        """
        first = yield self.keyed(headers=ALICE)
        second = yield self.connect(self.port.getHost().port, headers=ALICE)
        first.send_json(ask("same"))
        a = yield self.service.next_ask()
        second.send_json(ask("same"))
        b = yield self.service.next_ask()
        second.send_text("<|ask|>$notes$hello")
        c = yield self.service.next_ask()
        ids = {p.connection_id for p in self.server_factory.connections}
        self.assertEqual(len(ids), 2)
        self.assertNotEqual(a.request.request_id, b.request.request_id)
        for fake, suffix in [(a, ":same"), (b, ":same"), (c, ":text-1")]:
            connection_id, _, rest = fake.request.request_id.partition(":")
            self.assertIn(connection_id, ids)
            self.assertEqual(":" + rest, suffix)

    @inlineCallbacks
    def test_rate_limited(self):
        """
        When the core refuses an ask as over its key's limit, then a JSON
        client gets C{rate_limited} with C{retry_after} in whole seconds,
        and a text client the message and the wait.
        """
        client = yield self.keyed(headers=ALICE)
        client.send_json(ask("r"))
        fake = yield self.service.next_ask()
        fake.deferred.errback(RateLimited("too many asks (limit 1 a minute)", 59.2))
        self.assertEqual(
            (yield client.next()),
            {"type": "error", "id": "r", "code": "rate_limited",
             "message": "too many asks (limit 1 a minute)", "retry_after": 60},
        )
        client.send_text("<|ask|>$notes$hello")
        fake = yield self.service.next_ask()
        fake.deferred.errback(RateLimited("too many streams open at once", 0.2))
        self.assertEqual(
            (yield client.next()),
            "<|err|>$too many streams open at once; retry after 1s",
        )

    @inlineCallbacks
    def test_message_size_limit_with_keys(self):
        """When a keyed client sends a message over the limit, then it is closed with 1009."""
        client = yield self.keyed(headers=ALICE, max_message_size=100)
        client.send_json(ask("big", "new", "x" * 200))
        _, code, _ = yield timeout(client.closed)
        self.assertEqual(code, 1009)
        self.assertEqual(self.service.all, [])


class KeyEndToEndTests(WebSocketTestMixin, TestCase):
    """Keys, isolation, limits and the access log over the real core."""

    @inlineCallbacks
    def serve(self, upstream: Any = None, **services: Any):
        from easybackend.offline import OfflineUpstream
        from easybackend.testing.fixtures import make_core

        if upstream is None:
            upstream = OfflineUpstream(reactor, interval=0.001)
        self.core = yield Deferred.fromCoroutine(
            make_core(self, upstream, **services)
        )
        self.start_server(self.core, keys=KEYS)
        port = yield self.listen(self.server_factory)
        return port

    @inlineCallbacks
    def text_answer(self, client: Client):
        """The text protocol's pieces until C{<|end|>}, or its C{<|err|>}."""
        pieces = []
        while True:
            piece = yield client.next()
            if piece == TEXT_END or piece.startswith("<|err|>$"):
                return "".join(pieces), piece
            pieces.append(piece)

    @inlineCallbacks
    def test_other_key_sees_not_found(self):
        """
        When key A made a conversation, then key B's asks on its id (JSON
        and text) get C{not_found}, and A's history is untouched.
        """
        port = yield self.serve()
        alice = yield self.connect(port, headers=ALICE)
        bob = yield self.connect(port, "/?api_key=sk-bob-9876543210")
        alice.send_json(ask("1", "new", "Hello"))
        first, done = yield collect(self, alice, "1")
        self.assertEqual(done["type"], "done", done)
        cid = done["conversation_id"]
        bob.send_json(ask("2", cid, "let me in"))
        _, error = yield collect(self, bob, "2")
        self.assertEqual((error["type"], error["code"]), ("error", "not_found"))
        self.assertIn(cid, error["message"])
        bob.send_text(f"<|ask|>${cid}$let me in")
        _, end = yield self.text_answer(bob)
        self.assertTrue(end.startswith("<|err|>$"), end)
        self.assertIn(cid, end)
        view = yield self.core.get_conversation(cid, owner="alice")
        self.assertEqual(
            [(m.role, m.content) for m in view.messages],
            [("user", "Hello"), ("assistant", first)],
        )
        yield self.assertFailure(
            self.core.get_conversation(cid, owner="bob"), NotFound
        )
        # Alice goes on where she was.
        alice.send_json(ask("3", cid, "Again"))
        second, _ = yield collect(self, alice, "3")
        self.assertIn("I see 1 earlier turn", second)

    @inlineCallbacks
    def test_rate_limit(self):
        """
        When a key is over its asks per minute, then its asks get
        C{rate_limited} with C{retry_after} (JSON) or the wait (text),
        nothing is stored, and other keys go on.
        """
        from twisted.internet.task import Clock

        from easybackend.limits import Limiter

        port = yield self.serve(limiter=Limiter(Clock(), asks_per_minute=1))
        alice = yield self.connect(port, headers=ALICE)
        alice.send_json(ask("1", "limited", "first"))
        _, done = yield collect(self, alice, "1")
        self.assertEqual(done["type"], "done", done)
        alice.send_json(ask("2", "limited", "second"))
        _, error = yield collect(self, alice, "2")
        self.assertEqual(
            {k: error[k] for k in ("type", "code", "retry_after")},
            {"type": "error", "code": "rate_limited", "retry_after": 60},
        )
        alice.send_text("<|ask|>$limited$third")
        _, end = yield self.text_answer(alice)
        self.assertEqual(end, "<|err|>$too many asks (limit 1 a minute); retry after 60s")
        view = yield self.core.get_conversation("limited", owner="alice")
        self.assertEqual(len(view.messages), 2)
        bob = yield self.connect(port, headers=BOB)
        bob.send_json(ask("1", "new", "mine"))
        _, done = yield collect(self, bob, "1")
        self.assertEqual(done["type"], "done", done)

    @inlineCallbacks
    def test_access_log_without_secrets(self):
        """
        When keyed clients ask (JSON and text) and one is refused, then the
        access log has a C{websocket} line per ask with the key's name and
        the connection's request id, and one for the refusal; no event
        carries a client key, the upstream's key or a prompt.
        """
        from easybackend.testing.fake_upstream import FakeUpstream
        from easybackend.upstream import OpenAIUpstream

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fake = FakeUpstream(reactor, api_key="sk-upstream-secret-42")
        yield fake.listen(0)
        self.addCleanup(fake.stop)
        upstream = OpenAIUpstream(reactor, base_url=fake.base_url,
                                  api_key="sk-upstream-secret-42", max_retries=0)
        self.addCleanup(upstream.close)
        port = yield self.serve(upstream)

        alice = yield self.connect(port, headers=ALICE)
        alice.send_json(ask("j", "logged-1", "PROMPT-json-plan"))
        _, done = yield collect(self, alice, "j")
        self.assertEqual(done["type"], "done", done)
        bob = yield self.connect(port, "/?api_key=sk-bob-9876543210")
        bob.send_text("<|ask|>$logged-2$PROMPT-text-plan")
        _, end = yield self.text_answer(bob)
        self.assertEqual(end, TEXT_END)
        refused = yield self.connect(port, "/?api_key=sk-wrong-secret-7")
        yield timeout(refused.closed)

        access = [e["access"] for e in events if isinstance(e.get("access"), dict)]
        ws = {p.owner: p.connection_id for p in self.server_factory.connections}
        asks = [a for a in access if a["kind"] == "ask"]
        self.assertEqual(
            sorted((a["transport"], a["key"], a["request_id"], a["status"],
                    a["conversation_id"]) for a in asks),
            [("websocket", "alice", f"{ws['alice']}:j", "ok", "logged-1"),
             ("websocket", "bob", f"{ws['bob']}:text-1", "ok", "logged-2")],
        )
        (refusal,) = [a for a in access if a["kind"] == "connect"]
        self.assertEqual((refusal["transport"], refusal["status"]),
                         ("websocket", "unauthenticated"))
        self.assertNotIn("key", refusal)
        self.assertTrue(refusal["request_id"].startswith("ws_"))
        self.assertGreater(len(events), 3)
        for event in events:
            text = formatEvent(event) + repr(event)
            for secret in ["sk-alice-0123456789", "sk-bob-9876543210",
                           "sk-wrong-secret-7", "sk-upstream-secret-42",
                           "PROMPT-json-plan", "PROMPT-text-plan"]:
                self.assertNotIn(secret, text, event)


class TLSTests(WebSocketTestMixin, TestCase):
    """C{wss://}: the transport on an C{ssl:} endpoint, with a key."""

    @inlineCallbacks
    def serve(self):
        from easybackend.offline import OfflineUpstream
        from easybackend.testing.fixtures import make_core
        from easybackend.testing.tls import self_signed, server_endpoint

        self.cert, key = self_signed(self.mktemp())
        self.core = yield Deferred.fromCoroutine(
            make_core(self, OfflineUpstream(reactor, interval=0.001))
        )
        self.start_server(self.core, keys=KEYS)
        port = yield self.listen(self.server_factory,
                                 server_endpoint(self.cert, key))
        return port

    @inlineCallbacks
    def test_ask_over_tls(self):
        """
        When a client trusting the server's certificate connects over
        C{wss://} with a key, then it gets the streamed answer.
        """
        from easybackend.testing.tls import client_tls

        port = yield self.serve()
        client = yield self.connect(port, headers=ALICE, tls=client_tls(self.cert))
        client.send_json(ask("t", "over-tls", "Hello over TLS"))
        text, done = yield collect(self, client, "t")
        self.assertEqual(done["type"], "done", done)
        self.assertIn("Hello over TLS", text)
        view = yield self.core.get_conversation("over-tls", owner="alice")
        self.assertEqual(view.messages[-1].content, text)

    @inlineCallbacks
    def test_query_key_and_refusal_over_tls(self):
        """
        When a C{wss://} client shows its key as C{?api_key=}, then it is
        in; when the key is wrong, then it hears 4401 over TLS too.
        """
        from easybackend.testing.tls import client_tls

        port = yield self.serve()
        tls = client_tls(self.cert)
        bob = yield self.connect(port, "/?api_key=sk-bob-9876543210", tls=tls)
        bob.send_text("<|ask|>$tls-text$hi")
        self.assertTrue((yield bob.next()).startswith("(offline model)"))
        wrong = yield self.connect(port, "/?api_key=nope", tls=tls)
        _, code, reason = yield timeout(wrong.closed)
        self.assertEqual((code, reason), (CLOSE_UNAUTHENTICATED, "the API key is not valid"))

    @inlineCallbacks
    def test_untrusted_certificate_fails(self):
        """
        When the client trusts another certificate, then the TLS handshake
        fails and no WebSocket opens (the server really speaks TLS, and the
        helper trusts only the certificate it is given).
        """
        from easybackend.testing.tls import client_tls, self_signed

        port = yield self.serve()
        other, _ = self_signed(self.mktemp())
        yield self.assertFailure(
            self.connect(port, headers=ALICE, tls=client_tls(other)),
            ConnectionError,
        )
