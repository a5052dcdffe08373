"""
Tests for the gRPC transport, over a real grpc channel on loopback.

Client calls run in threads (grpc's client blocks), so the reactor keeps
running; nothing sleeps: every wait is on a Deferred with a bounded timeout,
and every client call carries a deadline.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredQueue,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from easybackend.observe import Observer
from easybackend.errors import (
    BadRequest,
    EasyBackendError,
    LockTimeout,
    NotFound,
    NoUpstream,
    PromptTooLong,
    RateLimited,
    RequestTooLarge,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    Unauthenticated,
)
from easybackend.model import (
    Answer,
    Conversation,
    ConversationView,
    Message,
    Usage,
)
from easybackend.proto import chat_pb2, chat_pb2_grpc
from easybackend.transports.grpc_server import (
    _ENDED,
    _PIECE,
    _RESULT,
    GrpcListenError,
    GrpcService,
    _ReactorCall,
    status_for,
)

#: how long any single wait may take before the test fails
WAIT = 10.0
#: the deadline of every client call
DEADLINE = 10.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def within(d: Deferred, seconds: float = WAIT) -> Deferred:
    """C{d}, failing with a TimeoutError after C{seconds}."""
    return d.addTimeout(seconds, reactor)


# --- a fake core --------------------------------------------------------------


class FakeAsk:
    """One ask the fake service received; the test drives it."""

    def __init__(self, request: Any, on_piece: Callable[[str], None]) -> None:
        self.request = request
        self.on_piece = on_piece
        #: fires when the transport cancels the ask
        self.cancelled: Deferred = Deferred()
        self.deferred: Deferred = Deferred(lambda d: self.cancelled.callback(None))

    def piece(self, text: str) -> None:
        self.on_piece(text)

    def finish(self, text: str = "Hello world", **kw: Any) -> Answer:
        fields = dict(
            conversation_id=(
                "c_made" if self.request.conversation_id == "new"
                else self.request.conversation_id
            ),
            message_id="m_answer",
            text=text,
            model="fake-model",
            usage=Usage(3, 2, 5),
            finish_reason="stop",
            prompt_message_id="m_prompt",
        )
        fields.update(kw)
        answer = Answer(**fields)
        self.deferred.callback(answer)
        return answer

    def fail(self, error: BaseException) -> None:
        self.deferred.errback(error)


class FakeService:
    observer = Observer()
    """The interface of L{easybackend.service.ConversationService}."""

    def __init__(self) -> None:
        self.asks: DeferredQueue = DeferredQueue()
        self.calls: list[tuple[Any, ...]] = []
        #: the exception check_ready fails with, or None when ready
        self.not_ready: BaseException | None = None
        #: method name -> function of the call's arguments
        self.results: dict[str, Callable[..., Any]] = {}

    def ask(self, request: Any, on_piece: Callable[[str], None]) -> Deferred:
        ask = FakeAsk(request, on_piece)
        self.asks.put(ask)
        return ask.deferred

    def _call(self, name: str, *args: Any) -> Any:
        self.calls.append((name,) + args)
        return self.results[name](*args)

    def list_conversations(self, limit: int = 20, offset: int = 0, owner: Any = None) -> Any:
        return self._call("list_conversations", limit, offset)

    def get_conversation(self, conversation_id: str, owner: Any = None) -> Any:
        return self._call("get_conversation", conversation_id)

    def delete_conversation(self, conversation_id: str, owner: Any = None) -> Any:
        return self._call("delete_conversation", conversation_id)

    def rollback(self, conversation_id: str, turns: int, owner: Any = None) -> Any:
        return self._call("rollback", conversation_id, turns)

    def check_ready(self) -> Deferred:
        if self.not_ready is not None:
            return fail(self.not_ready)
        return succeed(None)


CONVERSATION = Conversation(
    id="conv1", title="Hello", system_prompt=None, model="fake-model",
    created=1000.0, updated=1001.5, leaf_id="m2",
)
VIEW = ConversationView(CONVERSATION, [
    Message(id="m1", conversation_id="conv1", parent_id=None, role="user",
            content="Hi", tokens=4, created=1000.0),
    Message(id="m2", conversation_id="conv1", parent_id="m1",
            role="assistant", content="Hello!", tokens=5, created=1001.5,
            model="fake-model", finish_reason="stop", usage=Usage(4, 5, 9)),
])


# --- client helpers -------------------------------------------------------------


class Stream:
    """A server stream read in a thread; its messages come to the reactor."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.responses: DeferredQueue = DeferredQueue()
        #: fires with None when the stream ends well, else its RpcError
        self.ended: Deferred = deferToThread(self._read)

    def _read(self) -> grpc.RpcError | None:
        try:
            for response in self.call:
                reactor.callFromThread(self.responses.put, response)
        except grpc.RpcError as e:
            return e
        return None

    def next(self) -> Deferred:
        return within(self.responses.get())

    @inlineCallbacks
    def rest(self):
        """All the messages until the end, and the end."""
        error = yield within(self.ended)
        messages = []
        while self.responses.pending:
            messages.append((yield self.responses.get()))
        return messages, error


def old_messages() -> tuple[type, type]:
    """
    The older design's messages, in a pool of their own: request fields
    prompt = 1, conversation_id = 2, parent_id = 3; response = 1.
    """
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="old/chat.proto", package="chat", syntax="proto3"
    )
    request = proto.message_type.add(name="AskRequest")
    for number, name in enumerate(("prompt", "conversation_id", "parent_id"), 1):
        request.field.add(name=name, number=number, type=f.TYPE_STRING,
                          label=f.LABEL_OPTIONAL)
    response = proto.message_type.add(name="AskResponse")
    response.field.add(name="response", number=1, type=f.TYPE_STRING,
                       label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        GetMessageClass(pool.FindMessageTypeByName("chat.AskRequest")),
        GetMessageClass(pool.FindMessageTypeByName("chat.AskResponse")),
    )


class GrpcTestCase(TestCase):
    """A gRPC server on a free loopback port over a fake service."""

    timeout = 60
    workers = 4
    grace = 0.5
    max_message_size = 64 * 1024

    def setUp(self) -> None:
        self.service = FakeService()
        self.grpc = GrpcService(
            self.service, "127.0.0.1:0", workers=self.workers,
            grace=self.grace, health_interval=3600,
            max_message_size=self.max_message_size,
        )
        self.grpc.startService()
        self.addCleanup(self._stop)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.addCleanup(self.channel.close)
        self.stub = chat_pb2_grpc.ChatStub(self.channel)

    def _stop(self) -> Deferred | None:
        if self.grpc.running:
            return within(self.grpc.stopService(), 30)
        return None

    def ask(self, **fields: Any) -> Stream:
        fields.setdefault("prompt", "Hi")
        metadata = fields.pop("metadata", None)
        timeout = fields.pop("timeout", DEADLINE)
        call = self.stub.Ask(
            chat_pb2.AskRequest(**fields), timeout=timeout, metadata=metadata
        )
        return Stream(call)

    def unary(self, method: str, request: Any, **kw: Any) -> Deferred:
        kw.setdefault("timeout", DEADLINE)
        return deferToThread(getattr(self.stub, method), request, **kw)

    @inlineCallbacks
    def assertRpcError(self, d: Deferred, code: grpc.StatusCode):
        try:
            result = yield within(d)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), code, e.details())
            return e
        self.fail(f"expected {code}, got {result!r}")

    def assertPieces(self, texts: list[str], pieces: list[str]) -> None:
        """
        C{texts}, the text of each message of a stream, are C{pieces} and
        then the final message's empty text.  Pieces the core passed on
        while the handler was busy may have come joined in one message, so
        only their text and order count, and no message is empty.
        """
        *sent, last = texts
        self.assertEqual("".join(sent), "".join(pieces))
        self.assertTrue(all(sent), texts)
        self.assertLessEqual(len(sent), len(pieces))
        self.assertEqual(last, "")

    def assertEnded(self, error: grpc.RpcError | None, code: grpc.StatusCode):
        self.assertIsNotNone(error, f"expected {code}, the stream ended well")
        self.assertEqual(error.code(), code, error.details())

    def next_ask(self) -> Deferred:
        return within(self.service.asks.get())


# --- Ask ------------------------------------------------------------------------------


class AskTests(GrpcTestCase):

    @inlineCallbacks
    def test_streams_pieces_then_a_final_message(self):
        """
        Each piece reaches the client as soon as the core passes it on,
        before the answer is complete; the last message has no text,
        C{done}, the ids, model, usage and finish reason.
        """
        stream = self.ask(prompt="Hello there", conversation_id="conv1")
        ask = yield self.next_ask()
        ask.piece("Hello")
        first = yield stream.next()
        self.assertEqual(first.response, "Hello")
        self.assertFalse(first.done)
        ask.piece(" world")
        second = yield stream.next()
        self.assertEqual(second.response, " world")
        ask.finish()
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        [last] = messages
        self.assertEqual(last.response, "")
        self.assertTrue(last.done)
        self.assertEqual(last.conversation_id, "conv1")
        self.assertEqual(last.message_id, "m_answer")
        self.assertEqual(last.prompt_message_id, "m_prompt")
        self.assertEqual(last.model, "fake-model")
        self.assertEqual(last.finish_reason, "stop")
        self.assertEqual(
            (last.usage.prompt_tokens, last.usage.completion_tokens,
             last.usage.total_tokens), (3, 2, 5),
        )

    @inlineCallbacks
    def test_request_fields(self):
        """Every field reaches the core; an empty id means C{new}; unset
        optional fields stay unset."""
        stream = self.ask(
            prompt="Hi", system_prompt="Be brief", model="m1",
            temperature=0.0, max_tokens=50, parent_id="m7",
            metadata=(("x-request-id", "req-42"),),
        )
        ask = yield self.next_ask()
        r = ask.request
        self.assertEqual(
            (r.conversation_id, r.prompt, r.system_prompt, r.model,
             r.temperature, r.max_tokens, r.parent_id, r.request_id),
            ("new", "Hi", "Be brief", "m1", 0.0, 50, "m7", "req-42"),
        )
        ask.finish()
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        self.assertEqual(messages[-1].conversation_id, "c_made")

        stream = self.ask(prompt="Hi again", conversation_id="new")
        ask = yield self.next_ask()
        r = ask.request
        self.assertEqual(
            (r.conversation_id, r.system_prompt, r.model, r.temperature,
             r.max_tokens, r.parent_id),
            ("new", None, None, None, None, None),
        )
        self.assertTrue(r.request_id)
        self.assertEqual(r.transport, "grpc")
        ask.finish(usage=None, finish_reason=None)
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        self.assertFalse(messages[-1].HasField("usage"))
        self.assertEqual(messages[-1].finish_reason, "")

    @inlineCallbacks
    def test_two_concurrent_streams(self):
        """Two streams are open at once, each with its own pieces."""
        one = self.ask(prompt="one", conversation_id="a")
        two = self.ask(prompt="two", conversation_id="b")
        asks = {}
        for _ in range(2):
            ask = yield self.next_ask()
            asks[ask.request.conversation_id] = ask
        asks["b"].piece("B1")
        self.assertEqual((yield two.next()).response, "B1")
        asks["a"].piece("A1")
        self.assertEqual((yield one.next()).response, "A1")
        asks["b"].piece("B2")
        self.assertEqual((yield two.next()).response, "B2")
        asks["b"].finish("B1B2")
        asks["a"].finish("A1")
        for stream, cid in ((one, "a"), (two, "b")):
            messages, error = yield stream.rest()
            self.assertIsNone(error)
            self.assertEqual(messages[-1].conversation_id, cid)

    @inlineCallbacks
    def test_old_client(self):
        """
        A client generated from the older design's proto sends only prompt
        and conversation_id and reads only C{response}: it gets the pieces
        and nothing else it would print.
        """
        OldRequest, OldResponse = old_messages()
        ask_old = self.channel.unary_stream(
            "/chat.Chat/Ask",
            request_serializer=OldRequest.SerializeToString,
            response_deserializer=OldResponse.FromString,
        )
        stream = Stream(ask_old(
            OldRequest(prompt="Hello", conversation_id="legacy"),
            timeout=DEADLINE,
        ))
        ask = yield self.next_ask()
        self.assertEqual(
            (ask.request.prompt, ask.request.conversation_id), ("Hello", "legacy")
        )
        ask.piece("Hi ")
        ask.piece("there")
        ask.finish("Hi there")
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        self.assertPieces([m.response for m in messages], ["Hi ", "there"])

    @inlineCallbacks
    def test_cancel_mid_stream(self):
        """A client that cancels after a piece cancels the ask on the core."""
        stream = self.ask(prompt="long", conversation_id="conv1")
        ask = yield self.next_ask()
        ask.piece("partial")
        yield stream.next()
        stream.call.cancel()
        yield within(ask.cancelled)
        error = yield within(stream.ended)
        self.assertEnded(error, grpc.StatusCode.CANCELLED)

    @inlineCallbacks
    def test_deadline(self):
        """A deadline that passes cancels the ask; the client gets
        DEADLINE_EXCEEDED."""
        stream = self.ask(prompt="slow", timeout=0.5)
        ask = yield self.next_ask()
        yield within(ask.cancelled)
        error = yield within(stream.ended)
        self.assertEnded(error, grpc.StatusCode.DEADLINE_EXCEEDED)

    @inlineCallbacks
    def test_core_errors(self):
        """Each core error becomes its status, with the core's message and
        its code in the trailing metadata; before or after a piece."""
        I, C = grpc.StatusCode, None
        cases = [
            (BadRequest("bad id"), I.INVALID_ARGUMENT, "bad id"),
            (NotFound("message 'x' not found"), I.NOT_FOUND, "message 'x' not found"),
            (PromptTooLong("the prompt is too long"), I.INVALID_ARGUMENT,
             "the prompt is too long"),
            (RequestTooLarge("too large"), I.INVALID_ARGUMENT, "too large"),
            (NoUpstream(), I.UNAVAILABLE, "no upstream configured"),
            (UpstreamUnavailable("unreachable", status=503), I.UNAVAILABLE,
             "unreachable"),
            (UpstreamError("upstream answered 500", status=500), I.UNAVAILABLE,
             "upstream answered 500"),
            (UpstreamError("stream broke", status=None), I.UNAVAILABLE,
             "stream broke"),
            (UpstreamError("invalid api key", status=401), I.INTERNAL,
             "upstream status 401: invalid api key"),
            (UpstreamRateLimited("slow down", status=429, retry_after=1.2),
             I.RESOURCE_EXHAUSTED, "slow down"),
            (UpstreamTimeout("no answer in 30s"), I.DEADLINE_EXCEEDED,
             "no answer in 30s"),
        ]
        for index, (exception, code, details) in enumerate(cases):
            stream = self.ask(prompt="Hi", conversation_id="conv1")
            ask = yield self.next_ask()
            if index % 2:
                ask.piece("some")
                yield stream.next()
            ask.fail(exception)
            messages, error = yield stream.rest()
            self.assertEnded(error, code)
            self.assertIn(details, error.details())
            metadata = dict(error.trailing_metadata())
            self.assertEqual(metadata["error-code"], exception.code)
            if getattr(exception, "status", None) is not None:
                self.assertEqual(metadata["upstream-status"], str(exception.status))
            else:
                self.assertNotIn("upstream-status", metadata)

    @inlineCallbacks
    def test_rate_limited_retry_after(self):
        stream = self.ask()
        ask = yield self.next_ask()
        ask.fail(UpstreamRateLimited("slow down", status=429, retry_after=1.2))
        _, error = yield stream.rest()
        self.assertEnded(error, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(dict(error.trailing_metadata())["retry-after"], "2")

    @inlineCallbacks
    def test_invalid_requests(self):
        """Bad input gets INVALID_ARGUMENT naming the field; no ask starts."""
        cases = [
            (dict(prompt=""), "prompt"),
            (dict(prompt="   "), "prompt"),
            (dict(conversation_id="../etc"), "conversation id"),
            (dict(conversation_id="x" * 129), "conversation id"),
            (dict(temperature=2.5), "temperature"),
            (dict(temperature=float("nan")), "temperature"),
            (dict(max_tokens=0), "max_tokens"),
        ]
        for fields, word in cases:
            _, error = yield self.ask(**fields).rest()
            self.assertEnded(error, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn(word, error.details())
            self.assertEqual(dict(error.trailing_metadata())["error-code"],
                             "bad_request")
        self.assertEqual(self.service.asks.pending, [])

    @inlineCallbacks
    def test_message_too_large(self):
        """A request over max_message_size is refused before the core."""
        _, error = yield self.ask(prompt="x" * (self.max_message_size + 1)).rest()
        self.assertEnded(error, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(self.service.asks.pending, [])

    @inlineCallbacks
    def test_unexpected_failure(self):
        """An unexpected exception is logged and becomes INTERNAL."""
        stream = self.ask()
        ask = yield self.next_ask()
        ask.fail(ZeroDivisionError("oops"))
        _, error = yield stream.rest()
        self.assertEnded(error, grpc.StatusCode.INTERNAL)
        self.assertIn("internal server error", error.details())
        self.assertNotIn("oops", error.details())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @inlineCallbacks
    def test_unexpected_synchronous_exception(self):
        """A service method that raises instead of failing its Deferred."""
        def broken(*args):
            raise KeyError("nope")
        self.service.ask = broken
        _, error = yield self.ask().rest()
        self.assertEnded(error, grpc.StatusCode.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    @inlineCallbacks
    def test_cancelled_by_the_core(self):
        """An ask cancelled on the server's side ends as CANCELLED."""
        stream = self.ask()
        ask = yield self.next_ask()
        ask.deferred.cancel()
        _, error = yield stream.rest()
        self.assertEnded(error, grpc.StatusCode.CANCELLED)

    @inlineCallbacks
    def test_burst_of_pieces(self):
        """
        When the core passes on many pieces at once, then the client gets
        all their text, in order, in at most as many messages (pieces
        queued behind one another go joined), then the final message.
        """
        stream = self.ask(prompt="Hi", conversation_id="burst")
        ask = yield self.next_ask()
        pieces = [f"<{i}>" for i in range(50)]
        for piece in pieces:
            ask.piece(piece)
        ask.finish("".join(pieces))
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        self.assertPieces([m.response for m in messages], pieces)
        self.assertTrue(messages[-1].done)
        self.assertFalse(any(m.done for m in messages[:-1]))


class SynchronousReactor:
    """Runs C{callFromThread} calls at once, and counts them."""

    def __init__(self) -> None:
        self.calls = 0

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls += 1
        f(*args)


class FakeContext:
    """The part of C{grpc.ServicerContext} that L{_ReactorCall} uses."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        # A read that finds nothing queued ends (after one poll) instead of
        # hanging the test.
        return False


class ReactorCallTests(SynchronousTestCase):
    """
    L{_ReactorCall}, the bridge between a handler thread and the reactor,
    driven from one thread: every queue read here finds what it needs
    already queued.
    """

    def setUp(self) -> None:
        self.reactor = SynchronousReactor()
        self.context = FakeContext()
        self.call = _ReactorCall(self.reactor, self.context)
        self.answer: Deferred = Deferred()
        self.call.start(lambda on_piece: self.answer, self.call.put_piece)

    def test_queued_pieces_are_joined(self):
        """
        When several pieces were queued while the handler thread was busy
        (sending the last message), then it takes them all at once as one
        piece, the text intact and in order; what follows them (here the
        result) comes next.
        """
        for piece in ("Hel", "lo", " wor", "ld"):
            self.call.put_piece(piece)
        self.answer.callback("the answer")
        self.assertEqual(self.call.get_pieces(), (_PIECE, "Hello world"))
        self.assertEqual(self.call.get_pieces(), (_RESULT, "the answer"))

    def test_a_piece_does_not_wait_for_more(self):
        """
        When one piece is queued, then the handler thread takes it alone at
        once; a piece queued later comes in the next message.
        """
        self.call.put_piece("Hello")
        self.assertEqual(self.call.get_pieces(), (_PIECE, "Hello"))
        self.call.put_piece(" world")
        self.assertEqual(self.call.get_pieces(), (_PIECE, " world"))

    def test_pieces_before_the_end(self):
        """
        When the call is cancelled after pieces were queued, then the
        pieces come first, joined, then the end.
        """
        self.call.put_piece("a")
        self.call.put_piece("b")
        self.call.cancel()
        self.assertEqual(self.call.get_pieces(), (_PIECE, "ab"))
        self.assertEqual(self.call.get_pieces(), (_ENDED, None))

    def test_no_reactor_call_after_the_result(self):
        """
        When the result is there, then cancelling (as the handler does when
        it returns, and grpcio when the RPC ends) does not bother the
        reactor, and queues nothing more.
        """
        self.answer.callback("the answer")
        calls = self.reactor.calls
        self.call.cancel()
        for callback in self.context.callbacks:
            callback()
        self.assertEqual(self.reactor.calls, calls)
        self.assertEqual(self.call.get_pieces(), (_RESULT, "the answer"))
        self.assertTrue(self.call._queue.empty())

    def test_cancel_before_the_result(self):
        """
        When the call is cancelled before its result, then the service's
        Deferred is cancelled, and the handler thread is woken with the
        end, once however often it is cancelled.
        """
        cancelled = []
        call = _ReactorCall(self.reactor, self.context)
        call.start(lambda: Deferred(cancelled.append))
        call.cancel()
        call.cancel()
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(call.get_pieces(), (_ENDED, None))


# --- the unary RPCs ---------------------------------------------------------------


class ConversationTests(GrpcTestCase):

    @inlineCallbacks
    def test_list(self):
        self.service.results["list_conversations"] = lambda limit, offset: succeed(
            [CONVERSATION]
        )
        response = yield self.unary(
            "ListConversations", chat_pb2.ListConversationsRequest()
        )
        [c] = response.conversations
        self.assertEqual(
            (c.id, c.title, c.model, c.created, c.updated, c.current_message_id),
            ("conv1", "Hello", "fake-model", 1000.0, 1001.5, "m2"),
        )
        self.assertFalse(c.HasField("system_prompt"))
        yield self.unary(
            "ListConversations",
            chat_pb2.ListConversationsRequest(limit=5, offset=10),
        )
        self.assertEqual(self.service.calls, [
            ("list_conversations", 20, 0), ("list_conversations", 5, 10),
        ])

    @inlineCallbacks
    def test_list_bad_request(self):
        def check(limit, offset):
            raise BadRequest('"limit" must be between 1 and 100')
        self.service.results["list_conversations"] = check
        e = yield self.assertRpcError(
            self.unary("ListConversations",
                       chat_pb2.ListConversationsRequest(limit=1000)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        self.assertIn("limit", e.details())

    @inlineCallbacks
    def test_get(self):
        self.service.results["get_conversation"] = lambda cid: succeed(VIEW)
        view = yield self.unary(
            "GetConversation", chat_pb2.GetConversationRequest(conversation_id="conv1")
        )
        self.assertEqual(view.conversation.id, "conv1")
        first, second = view.messages
        self.assertEqual((first.id, first.role, first.content, first.tokens),
                         ("m1", "user", "Hi", 4))
        self.assertFalse(first.HasField("parent_id"))
        self.assertFalse(first.HasField("usage"))
        self.assertEqual((second.parent_id, second.model, second.finish_reason,
                          second.usage.total_tokens),
                         ("m1", "fake-model", "stop", 9))
        self.assertEqual(self.service.calls, [("get_conversation", "conv1")])

    @inlineCallbacks
    def test_get_not_found(self):
        self.service.results["get_conversation"] = lambda cid: fail(
            NotFound(f"conversation {cid!r} not found")
        )
        e = yield self.assertRpcError(
            self.unary("GetConversation",
                       chat_pb2.GetConversationRequest(conversation_id="nope")),
            grpc.StatusCode.NOT_FOUND,
        )
        self.assertEqual(e.details(), "conversation 'nope' not found")

    @inlineCallbacks
    def test_delete(self):
        self.service.results["delete_conversation"] = lambda cid: succeed(None)
        response = yield self.unary(
            "DeleteConversation",
            chat_pb2.DeleteConversationRequest(conversation_id="conv1"),
        )
        self.assertEqual(response, chat_pb2.DeleteConversationResponse())
        self.service.results["delete_conversation"] = lambda cid: fail(
            NotFound("gone")
        )
        yield self.assertRpcError(
            self.unary("DeleteConversation",
                       chat_pb2.DeleteConversationRequest(conversation_id="conv1")),
            grpc.StatusCode.NOT_FOUND,
        )

    @inlineCallbacks
    def test_rollback(self):
        self.service.results["rollback"] = lambda cid, turns: succeed(VIEW)
        view = yield self.unary(
            "Rollback", chat_pb2.RollbackRequest(conversation_id="conv1")
        )
        self.assertEqual(len(view.messages), 2)
        yield self.unary(
            "Rollback", chat_pb2.RollbackRequest(conversation_id="conv1", turns=3)
        )
        self.assertEqual(self.service.calls,
                         [("rollback", "conv1", 1), ("rollback", "conv1", 3)])
        self.service.results["rollback"] = lambda cid, turns: fail(
            BadRequest('"turns" must be an integer of at least 1')
        )
        yield self.assertRpcError(
            self.unary("Rollback",
                       chat_pb2.RollbackRequest(conversation_id="conv1", turns=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )

    @inlineCallbacks
    def test_unary_deadline_cancels(self):
        """A unary call whose deadline passes cancels the core's work."""
        cancelled = Deferred()
        self.service.results["get_conversation"] = lambda cid: Deferred(
            lambda d: cancelled.callback(None)
        )
        yield self.assertRpcError(
            self.unary("GetConversation",
                       chat_pb2.GetConversationRequest(conversation_id="c"),
                       timeout=0.5),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        yield within(cancelled)

    @inlineCallbacks
    def test_unary_unexpected(self):
        self.service.results["get_conversation"] = lambda cid: fail(
            RuntimeError("db exploded")
        )
        e = yield self.assertRpcError(
            self.unary("GetConversation",
                       chat_pb2.GetConversationRequest(conversation_id="c")),
            grpc.StatusCode.INTERNAL,
        )
        self.assertIn("internal server error", e.details())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


# --- health, reflection, lifecycle ----------------------------------------------


class HealthAndReflectionTests(GrpcTestCase):

    def check(self, service: str = "") -> Deferred:
        stub = health_pb2_grpc.HealthStub(self.channel)
        d = deferToThread(
            stub.Check, health_pb2.HealthCheckRequest(service=service),
            timeout=DEADLINE,
        )
        return within(d.addCallback(lambda r: r.status))

    @inlineCallbacks
    def test_health_follows_readiness(self):
        self.assertEqual((yield self.check()), SERVING)
        self.assertEqual((yield self.check("chat.Chat")), SERVING)
        self.service.not_ready = NoUpstream()
        yield self.grpc.check_health()
        self.assertEqual((yield self.check()), NOT_SERVING)
        self.assertEqual((yield self.check("chat.Chat")), NOT_SERVING)
        self.service.not_ready = None
        yield self.grpc.check_health()
        self.assertEqual((yield self.check("chat.Chat")), SERVING)

    @inlineCallbacks
    def test_health_unexpected_failure(self):
        self.service.not_ready = OSError("disk gone")
        yield self.grpc.check_health()
        self.assertEqual((yield self.check()), NOT_SERVING)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    @inlineCallbacks
    def test_reflection(self):
        """Generic tools can list the services and read their schema."""
        def reflect():
            db = ProtoReflectionDescriptorDatabase(self.channel)
            services = set(db.get_services())
            pool = descriptor_pool.DescriptorPool(db)
            chat = pool.FindServiceByName("chat.Chat")
            ask = chat.methods_by_name["Ask"]
            request = pool.FindMessageTypeByName("chat.AskRequest")
            return services, sorted(chat.methods_by_name), ask, request
        services, methods, ask, request = yield within(deferToThread(reflect))
        self.assertEqual(services, {
            "chat.Chat", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        })
        self.assertEqual(methods, [
            "Ask", "DeleteConversation", "GetConversation",
            "ListConversations", "Rollback",
        ])
        self.assertTrue(ask.server_streaming)
        self.assertEqual(request.fields_by_name["prompt"].number, 1)


class LifecycleTests(GrpcTestCase):

    @inlineCallbacks
    def test_shutdown_with_a_stream_open(self):
        """
        Stopping with a stream open: health turns NOT_SERVING at once, the
        stream is cancelled after the grace period (and so is its ask), and
        stopService fires.
        """
        watch = Stream(health_pb2_grpc.HealthStub(self.channel).Watch(
            health_pb2.HealthCheckRequest(service="chat.Chat"), timeout=DEADLINE,
        ))
        self.assertEqual((yield watch.next()).status, SERVING)
        stream = self.ask(conversation_id="conv1")
        ask = yield self.next_ask()
        ask.piece("partial")
        yield stream.next()
        stopped = self.grpc.stopService()
        self.assertEqual((yield watch.next()).status, NOT_SERVING)
        yield within(ask.cancelled)
        yield within(stopped)
        error = yield within(stream.ended)
        self.assertIsNotNone(error)
        self.assertIn(error.code(), (grpc.StatusCode.CANCELLED,
                                     grpc.StatusCode.UNAVAILABLE))
        self.assertEqual(self.grpc.servicer.tracker.running, 0)

    @inlineCallbacks
    def test_shutdown_lets_a_stream_finish_within_grace(self):
        self.grpc.grace = 30
        stream = self.ask(conversation_id="conv1")
        ask = yield self.next_ask()
        stopped = self.grpc.stopService()
        ask.piece("all ")
        ask.piece("done")
        ask.finish("all done")
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        self.assertPieces([m.response for m in messages], ["all ", "done"])
        yield within(stopped)

    @inlineCallbacks
    def test_restart(self):
        """The service can be stopped and started again."""
        yield within(self.grpc.stopService())
        self.grpc.address = f"127.0.0.1:{self.grpc.port}"
        self.grpc.startService()
        stream = self.ask(conversation_id="again")
        ask = yield self.next_ask()
        ask.finish()
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = yield within(deferToThread(
            stub.Check, health_pb2.HealthCheckRequest(), timeout=DEADLINE
        ))
        self.assertEqual(response.status, SERVING)


class FullPoolTests(GrpcTestCase):

    workers = 2

    @inlineCallbacks
    def test_full_pool(self):
        """Once every worker holds a stream, a new call is refused at once."""
        streams = [self.ask(conversation_id=f"c{i}") for i in range(2)]
        asks = []
        for _ in streams:
            asks.append((yield self.next_ask()))
        e = yield self.assertRpcError(
            self.unary("ListConversations", chat_pb2.ListConversationsRequest()),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        _, error = yield self.ask(conversation_id="c3").rest()
        self.assertEnded(error, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(self.service.asks.pending, [])
        for ask in asks:
            ask.finish()
        for stream in streams:
            _, error = yield stream.rest()
            self.assertIsNone(error)


class ListenTests(TestCase):

    def test_bind_failure_names_the_address(self):
        """A port in use stops startup with an error naming the address."""
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        service = GrpcService(FakeService(), address)
        e = self.assertRaises(GrpcListenError, service.startService)
        self.assertIn(address, str(e))
        self.assertIn("--grpc", str(e))
        self.assertFalse(service.running)
        self.assertIsNone(service.port)

    def test_bad_address(self):
        service = GrpcService(FakeService(), "not an address")
        e = self.assertRaises(GrpcListenError, service.startService)
        self.assertIn("not an address", str(e))

    def test_workers(self):
        self.assertRaises(ValueError, GrpcService, FakeService(), workers=0)


class StatusTests(SynchronousTestCase):
    """L{status_for}, the mapping of core errors to gRPC statuses."""

    def test_table(self):
        S = grpc.StatusCode
        for error, code in [
            (BadRequest("x"), S.INVALID_ARGUMENT),
            (NotFound("x"), S.NOT_FOUND),
            (PromptTooLong("x"), S.INVALID_ARGUMENT),
            (RequestTooLarge("x"), S.INVALID_ARGUMENT),
            (NoUpstream(), S.UNAVAILABLE),
            (UpstreamUnavailable("x"), S.UNAVAILABLE),
            (UpstreamRateLimited("x", 429), S.RESOURCE_EXHAUSTED),
            (UpstreamTimeout("x"), S.DEADLINE_EXCEEDED),
            (UpstreamError("x", 502), S.UNAVAILABLE),
            (UpstreamError("x", None), S.UNAVAILABLE),
            (UpstreamError("x", 400), S.INTERNAL),
            (Unauthenticated("x"), S.UNAUTHENTICATED),
            (RateLimited("x"), S.RESOURCE_EXHAUSTED),
            (LockTimeout("x"), S.ABORTED),
            (EasyBackendError("x"), S.INTERNAL),
        ]:
            self.assertEqual(status_for(error)[0], code, error.code)

    def test_upstream_status_in_message(self):
        code, details, metadata = status_for(UpstreamError("bad key", 401))
        self.assertEqual(details, "upstream status 401: bad key")
        self.assertIn(("upstream-status", "401"), metadata)
        _, details, _ = status_for(UpstreamError("upstream answered 503", 503))
        self.assertEqual(details, "upstream answered 503")


# --- end to end: the real core on a temporary SQLite file ------------------------


class EndToEndTests(TestCase):
    """The gRPC transport over the real core and a real store."""

    timeout = 60

    @inlineCallbacks
    def serve(self, upstream: Any):
        from easybackend.testing.fixtures import make_core

        self.core = yield Deferred.fromCoroutine(make_core(self, upstream))
        self.grpc = GrpcService(
            self.core, "127.0.0.1:0", workers=4, grace=0.5, health_interval=3600
        )
        self.grpc.startService()
        self.addCleanup(lambda: within(self.grpc.stopService(), 30))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.addCleanup(self.channel.close)
        self.stub = chat_pb2_grpc.ChatStub(self.channel)

    def offline(self) -> Any:
        from easybackend.offline import OfflineUpstream

        return OfflineUpstream(reactor, interval=0.001)

    def ask(self, **fields: Any) -> Stream:
        return Stream(self.stub.Ask(chat_pb2.AskRequest(**fields), timeout=DEADLINE))

    def unary(self, method: str, request: Any) -> Deferred:
        return within(deferToThread(getattr(self.stub, method), request,
                                    timeout=DEADLINE))

    @inlineCallbacks
    def test_conversation(self):
        """
        Ask on a new conversation, ask again on the id it got (the core
        remembers), then read, list, roll back and delete it.
        """
        yield self.serve(self.offline())
        messages, error = yield self.ask(prompt="Hello").rest()
        self.assertIsNone(error)
        *pieces, last = messages
        self.assertGreater(len(pieces), 1)
        first_text = "".join(m.response for m in pieces)
        self.assertIn("Hello", first_text)
        self.assertTrue(last.done)
        self.assertEqual(last.model, "offline")
        self.assertEqual(last.finish_reason, "stop")
        self.assertGreater(last.usage.total_tokens, 0)
        cid = last.conversation_id
        self.assertTrue(cid.startswith("c_"), cid)

        messages, error = yield self.ask(prompt="Again", conversation_id=cid).rest()
        self.assertIsNone(error)
        text = "".join(m.response for m in messages)
        self.assertIn("I see 1 earlier turn", text)
        self.assertIn("Hello", text)
        self.assertEqual(messages[-1].conversation_id, cid)

        view = yield self.unary(
            "GetConversation", chat_pb2.GetConversationRequest(conversation_id=cid)
        )
        self.assertEqual(
            [(m.role, m.content) for m in view.messages],
            [("user", "Hello"), ("assistant", first_text),
             ("user", "Again"), ("assistant", text)],
        )
        self.assertEqual(view.conversation.current_message_id,
                         messages[-1].message_id)
        listing = yield self.unary(
            "ListConversations", chat_pb2.ListConversationsRequest()
        )
        self.assertEqual([c.id for c in listing.conversations], [cid])
        view = yield self.unary(
            "Rollback", chat_pb2.RollbackRequest(conversation_id=cid)
        )
        self.assertEqual(len(view.messages), 2)
        yield self.unary(
            "DeleteConversation",
            chat_pb2.DeleteConversationRequest(conversation_id=cid),
        )
        e = yield self.assertFailure(
            self.unary("GetConversation",
                       chat_pb2.GetConversationRequest(conversation_id=cid)),
            grpc.RpcError,
        )
        self.assertEqual(e.code(), grpc.StatusCode.NOT_FOUND)

    @inlineCallbacks
    def test_old_client(self):
        """The older design's client, unchanged, on the real core."""
        yield self.serve(self.offline())
        OldRequest, OldResponse = old_messages()
        ask_old = self.channel.unary_stream(
            "/chat.Chat/Ask",
            request_serializer=OldRequest.SerializeToString,
            response_deserializer=OldResponse.FromString,
        )
        for turn in ("first", "second"):
            stream = Stream(ask_old(
                OldRequest(prompt=turn, conversation_id="legacy-1"),
                timeout=DEADLINE,
            ))
            messages, error = yield stream.rest()
            self.assertIsNone(error)
        text = "".join(m.response for m in messages)
        self.assertIn("I see 1 earlier turn", text)
        self.assertIn("first", text)

    @inlineCallbacks
    def test_errors(self):
        yield self.serve(self.offline())
        _, error = yield self.ask(prompt="Hi", parent_id="m_nope").rest()
        self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
        _, error = yield self.ask(prompt="", conversation_id="c1").rest()
        self.assertEqual(error.code(), grpc.StatusCode.INVALID_ARGUMENT)
        e = yield self.assertFailure(
            self.unary("ListConversations",
                       chat_pb2.ListConversationsRequest(limit=1000)),
            grpc.RpcError,
        )
        self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT)
        e = yield self.assertFailure(
            self.unary("Rollback", chat_pb2.RollbackRequest(
                conversation_id="missing")),
            grpc.RpcError,
        )
        self.assertEqual(e.code(), grpc.StatusCode.NOT_FOUND)
        e = yield self.assertFailure(
            self.unary("GetConversation", chat_pb2.GetConversationRequest(
                conversation_id="../../etc/passwd")),
            grpc.RpcError,
        )
        self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT)

    @inlineCallbacks
    def test_no_upstream(self):
        """Without an upstream: UNAVAILABLE with the reason, and health
        NOT_SERVING."""
        yield self.serve(None)
        _, error = yield self.ask(prompt="Hi").rest()
        self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("no upstream configured", error.details())
        status = yield within(deferToThread(
            health_pb2_grpc.HealthStub(self.channel).Check,
            health_pb2.HealthCheckRequest(service="chat.Chat"), timeout=DEADLINE,
        ))
        self.assertEqual(status.status, NOT_SERVING)

    @inlineCallbacks
    def test_example_client(self):
        """examples/grpc_client.py streams answers and keeps the id it got."""
        import importlib.util
        import io
        from pathlib import Path

        yield self.serve(self.offline())
        path = Path(__file__).resolve().parents[1] / "examples" / "grpc_client.py"
        spec = importlib.util.spec_from_file_location("grpc_client_example", path)
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        out = io.StringIO()
        stdin = io.StringIO("Hello\n\nHow are you\n")
        self.patch(example.sys, "stderr", io.StringIO())
        status = yield within(deferToThread(
            example.main, ["--url", f"127.0.0.1:{self.grpc.port}"], stdin, out
        ))
        self.assertEqual(status, 0)
        first, second = out.getvalue().splitlines()
        self.assertIn("You said: \u201cHello\u201d", first)
        self.assertIn("I see 1 earlier turn", second)
        listing = yield self.unary(
            "ListConversations", chat_pb2.ListConversationsRequest()
        )
        self.assertEqual(len(listing.conversations), 1)


class FakeUpstreamTests(TestCase):
    """
    End to end down to the wire: gRPC, the real core and treq client, and
    the fake OpenAI upstream, which tells when its connection closes.
    """

    timeout = 60

    @inlineCallbacks
    def serve(self, idle_timeout: float = 30.0):
        from easybackend.testing.fake_upstream import FakeUpstream
        from easybackend.testing.fixtures import make_core
        from easybackend.upstream import OpenAIUpstream

        self.fake = FakeUpstream(reactor)
        yield self.fake.listen(0)
        self.addCleanup(self.fake.stop)
        upstream = OpenAIUpstream(
            reactor, base_url=self.fake.base_url, api_key="sk-test",
            max_retries=0, idle_timeout=idle_timeout,
        )
        self.addCleanup(upstream.close)
        self.core = yield Deferred.fromCoroutine(make_core(self, upstream))
        self.grpc = GrpcService(
            self.core, "127.0.0.1:0", workers=4, grace=0.2, health_interval=3600
        )
        self.grpc.startService()
        self.addCleanup(
            lambda: within(self.grpc.stopService(), 30) if self.grpc.running
            else None
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.addCleanup(self.channel.close)
        self.stub = chat_pb2_grpc.ChatStub(self.channel)

    def ask(self, timeout: float = DEADLINE, **fields: Any) -> Stream:
        return Stream(self.stub.Ask(chat_pb2.AskRequest(**fields), timeout=timeout))

    @inlineCallbacks
    def assertNotStored(self, cid: str):
        yield self.assertFailure(within(self.core.get_conversation(cid)), NotFound)

    @inlineCallbacks
    def test_streams_the_upstream_answer(self):
        from easybackend.testing.fake_upstream import Stream as Answer_

        yield self.serve()
        self.fake.script(Answer_(pieces=4))
        messages, error = yield self.ask(prompt="hello", conversation_id="wire-1").rest()
        self.assertIsNone(error)
        *pieces, last = messages
        text = "".join(m.response for m in pieces)
        # four pieces, some perhaps joined (see test_queued_pieces_are_joined)
        self.assertTrue(1 <= len(pieces) <= 4, len(pieces))
        self.assertTrue(all(m.response for m in pieces))
        self.assertEqual(text, "You said: hello (1 message received)")
        self.assertEqual((last.done, last.conversation_id, last.finish_reason),
                         (True, "wire-1", "stop"))
        self.assertGreater(last.usage.total_tokens, 0)
        view = yield within(self.core.get_conversation("wire-1"))
        self.assertEqual(view.messages[-1].content, text)

    @inlineCallbacks
    def hanging_answer(self, cid: str, timeout: float = DEADLINE):
        """Start an ask whose answer hangs after one piece."""
        from easybackend.testing.fake_upstream import Stream as Answer_

        yield self.serve()
        self.fake.script(Answer_(pieces=5, fault="hang", fault_after=1))
        stream = self.ask(prompt="tell me a long story", conversation_id=cid,
                          timeout=timeout)
        first = yield stream.next()
        self.assertTrue(first.response)
        received = yield within(self.fake.wait_for_request(0))
        self.assertFalse(received.connection_lost.called)
        return stream, received

    @inlineCallbacks
    def test_cancel_closes_the_upstream_connection(self):
        stream, received = yield self.hanging_answer("wire-cancel")
        stream.call.cancel()
        yield within(received.connection_lost)
        error = yield within(stream.ended)
        self.assertEqual(error.code(), grpc.StatusCode.CANCELLED)
        yield self.assertNotStored("wire-cancel")

    @inlineCallbacks
    def test_deadline_closes_the_upstream_connection(self):
        stream, received = yield self.hanging_answer("wire-deadline", timeout=1.0)
        yield within(received.connection_lost)
        error = yield within(stream.ended)
        self.assertEqual(error.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        yield self.assertNotStored("wire-deadline")

    @inlineCallbacks
    def test_shutdown_closes_the_upstream_connection(self):
        """Stopping with a stream open: after the grace period the ask is
        cancelled, the upstream connection closes, nothing is stored, and
        stopService fires."""
        stream, received = yield self.hanging_answer("wire-stop")
        yield within(self.grpc.stopService())
        yield within(received.connection_lost)
        error = yield within(stream.ended)
        self.assertIn(error.code(), (grpc.StatusCode.CANCELLED,
                                     grpc.StatusCode.UNAVAILABLE))
        yield self.assertNotStored("wire-stop")

    @inlineCallbacks
    def test_upstream_errors(self):
        from easybackend.testing.fake_upstream import Reset, Status
        from easybackend.testing.fake_upstream import Stream as Answer_

        yield self.serve(idle_timeout=0.3)
        S = grpc.StatusCode
        cases = [
            (Status(429, retry_after="1"), S.RESOURCE_EXHAUSTED,
             "upstream_rate_limited"),
            (Status(500), S.UNAVAILABLE, "upstream_unavailable"),
            (Status(400), S.INTERNAL, "upstream_error"),
            (Status(401), S.INTERNAL, "upstream_error"),
            (Reset(), S.UNAVAILABLE, None),
            (Answer_(pieces=3, fault="error", fault_after=1), S.UNAVAILABLE,
             "upstream_error"),
            (Answer_(pieces=3, fault="hang", fault_after=1), S.DEADLINE_EXCEEDED,
             "upstream_timeout"),
        ]
        for index, (scenario, code, core_code) in enumerate(cases):
            self.fake.script(scenario)
            _, error = yield self.ask(
                prompt="x", conversation_id=f"err-{index}"
            ).rest()
            self.assertIsNotNone(error, scenario)
            self.assertEqual(error.code(), code, (scenario, error.details()))
            metadata = dict(error.trailing_metadata())
            if core_code is not None:
                self.assertEqual(metadata["error-code"], core_code, scenario)
            if isinstance(scenario, Status):
                self.assertIn(str(scenario.code), error.details())
                self.assertEqual(metadata["upstream-status"], str(scenario.code))
            yield self.assertNotStored(f"err-{index}")


def self_signed() -> tuple[bytes, bytes]:
    """A throwaway certificate for localhost and 127.0.0.1, and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class TLSTests(TestCase):

    @inlineCallbacks
    def test_tls(self):
        """With server credentials the listener speaks TLS only."""
        cert, key = self_signed()
        service = FakeService()
        server = GrpcService(
            service, "127.0.0.1:0", workers=2, grace=0.2, health_interval=3600,
            server_credentials=grpc.ssl_server_credentials([(key, cert)]),
        )
        server.startService()
        self.addCleanup(lambda: within(server.stopService(), 30))
        channel = grpc.secure_channel(
            f"localhost:{server.port}",
            grpc.ssl_channel_credentials(root_certificates=cert),
        )
        self.addCleanup(channel.close)
        stream = Stream(chat_pb2_grpc.ChatStub(channel).Ask(
            chat_pb2.AskRequest(prompt="Hi"), timeout=DEADLINE
        ))
        ask = yield within(service.asks.get())
        ask.piece("secure")
        ask.finish("secure")
        messages, error = yield stream.rest()
        self.assertIsNone(error)
        self.assertEqual(messages[0].response, "secure")

        plain = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.addCleanup(plain.close)
        e = yield self.assertFailure(
            within(deferToThread(
                chat_pb2_grpc.ChatStub(plain).ListConversations,
                chat_pb2.ListConversationsRequest(), timeout=DEADLINE,
            )),
            grpc.RpcError,
        )
        self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE)


class KeysTests(TestCase):
    """API keys, per-key isolation and limits over gRPC."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        from twisted.internet.task import Clock

        from easybackend.auth import KeyRing
        from easybackend.limits import Limiter
        from easybackend.offline import OfflineUpstream
        from easybackend.testing.fixtures import make_core

        self.events: list = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock = Clock()
        self.core = yield Deferred.fromCoroutine(make_core(
            self, OfflineUpstream(reactor, interval=0.001),
            limiter=Limiter(self.clock, asks_per_minute=2)))
        self.grpc = GrpcService(
            self.core, "127.0.0.1:0", workers=4, grace=0.5, health_interval=3600,
            keys=KeyRing.parse(["alice:sk-alice", "bob:sk-bob"], "test"))
        self.grpc.startService()
        self.addCleanup(lambda: within(self.grpc.stopService(), 30))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.addCleanup(self.channel.close)
        self.stub = chat_pb2_grpc.ChatStub(self.channel)

    def ask(self, key: str | None, **fields: Any) -> Stream:
        metadata = [("authorization", f"Bearer {key}")] if key else None
        return Stream(self.stub.Ask(chat_pb2.AskRequest(**fields), timeout=DEADLINE,
                                    metadata=metadata))

    def unary(self, key: str | None, method: str, request: Any) -> Deferred:
        metadata = [("authorization", f"Bearer {key}")] if key else None
        return within(deferToThread(getattr(self.stub, method), request,
                                    timeout=DEADLINE, metadata=metadata))

    @inlineCallbacks
    def test_key_required(self):
        """
        When keys are configured, then a call without a key or with a wrong
        one gets UNAUTHENTICATED, streaming or unary, and the refusal is
        logged without the key.
        """
        for key in [None, "sk-wrong"]:
            _, error = yield self.ask(key, prompt="x").rest()
            self.assertEqual(error.code(), grpc.StatusCode.UNAUTHENTICATED)
            with self.assertRaises(grpc.RpcError) as e:
                yield self.unary(key, "ListConversations", chat_pb2.ListConversationsRequest())
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertNotIn("sk-wrong", repr(self.events))

    @inlineCallbacks
    def test_isolation(self):
        """
        When alice made a conversation, then for bob it is NOT_FOUND on
        ask, get, rollback and delete, and his listing is empty.
        """
        messages, error = yield self.ask("sk-alice", prompt="mine",
                                         conversation_id="g-shared").rest()
        self.assertIsNone(error)
        _, error = yield self.ask("sk-bob", prompt="x", conversation_id="g-shared").rest()
        self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
        for method, request in [
            ("GetConversation", chat_pb2.GetConversationRequest(conversation_id="g-shared")),
            ("Rollback", chat_pb2.RollbackRequest(conversation_id="g-shared", turns=1)),
            ("DeleteConversation", chat_pb2.DeleteConversationRequest(conversation_id="g-shared")),
        ]:
            with self.assertRaises(grpc.RpcError) as e:
                yield self.unary("sk-bob", method, request)
            self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND, method)
        listed = yield self.unary("sk-bob", "ListConversations",
                                  chat_pb2.ListConversationsRequest())
        self.assertEqual(list(listed.conversations), [])
        view = yield self.unary("sk-alice", "GetConversation",
                                chat_pb2.GetConversationRequest(conversation_id="g-shared"))
        self.assertEqual(len(view.messages), 2)

    @inlineCallbacks
    def test_rate_limited(self):
        """
        When a key is over its asks per minute, then its next ask gets
        RESOURCE_EXHAUSTED with a retry-after in the trailing metadata.
        """
        for _ in range(2):
            _, error = yield self.ask("sk-alice", prompt="x").rest()
            self.assertIsNone(error)
        _, error = yield self.ask("sk-alice", prompt="x").rest()
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        trailing = dict(error.trailing_metadata() or ())
        self.assertEqual(trailing.get("error-code"), "rate_limited")
        self.assertIn("retry-after", trailing)
        _, error = yield self.ask("sk-bob", prompt="x").rest()
        self.assertIsNone(error)
