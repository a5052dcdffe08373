"""
The gRPC transport: a threaded grpcio server bridged to the reactor.

grpcio runs every call on a thread of its own pool.  Those threads never
touch reactor state: a handler starts its service call with
C{reactor.callFromThread} and waits on a thread-safe queue, into which the
reactor thread puts the answer's pieces, then the result or the failure.
When the call ends early (the client cancels, its deadline passes, the
server stops), grpcio runs the callback registered with
C{context.add_callback}: it cancels the service's Deferred on the reactor
(the upstream request is closed, nothing is stored) and puts a sentinel in
the queue, since a thread blocked on C{queue.get} would not notice the
cancel by itself.  Pieces that queued up while a handler was sending go
to the client joined in one C{AskResponse} (see L{_ReactorCall}).

The transport only translates: protobuf messages to L{AskRequest}s and
service calls, results to protobuf messages, and L{EasyBackendError}s to
gRPC status codes (see L{status_for}).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from easybackend.auth import KeyRing
from easybackend.errors import EasyBackendError, Unauthenticated, UpstreamError, retry_seconds
from easybackend.observe import AccessRecord
from easybackend.model import (
    NEW,
    Answer,
    AskRequest,
    Conversation,
    ConversationView,
    Message,
    Usage,
    request_id_or_new,
)
from easybackend.proto import chat_pb2, chat_pb2_grpc

log = Logger()

#: the gRPC service's full name, as health checks and reflection know it
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name
#: this transport's label in logs and metrics
TRANSPORT = "grpc"
#: the default listener, in grpcio's address form
DEFAULT_ADDRESS = "[::]:9000"
DEFAULT_WORKERS = 10
#: grpcio's own default receive limit
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024

#: The gRPC status for each core error code.  C{upstream_error} depends on
#: the upstream's status: see L{status_for}.
STATUS: dict[str, grpc.StatusCode] = {
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    # The request itself can never succeed as sent: INVALID_ARGUMENT, not
    # OUT_OF_RANGE (which is for reading past the end of something).
    "prompt_too_long": grpc.StatusCode.INVALID_ARGUMENT,
    "request_too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "no_upstream": grpc.StatusCode.UNAVAILABLE,
    "upstream_unavailable": grpc.StatusCode.UNAVAILABLE,
    "upstream_rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "upstream_timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    # API keys and per-key limits
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    # another turn held the conversation too long: a concurrency conflict,
    # worth retrying (gRPC's ABORTED)
    "conversation_busy": grpc.StatusCode.ABORTED,
    # the database went away; the replica recovers when it is back
    "store_unavailable": grpc.StatusCode.UNAVAILABLE,
}

#: trailing metadata keys that carry the core's error details
ERROR_CODE_KEY = "error-code"
UPSTREAM_STATUS_KEY = "upstream-status"
RETRY_AFTER_KEY = "retry-after"
#: the client's request id, read from the call's metadata when it sends one
REQUEST_ID_KEY = "x-request-id"


def status_for(
    error: EasyBackendError,
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """
    The gRPC status code, details and trailing metadata for a core error.

    C{upstream_error} becomes C{UNAVAILABLE} when the upstream's status was
    5xx or there was none (a reset connection, a broken stream: worth a
    retry), and C{INTERNAL} for any other status (a 4xx the upstream gave
    our request: a retry will not help).  Its details always name the
    upstream status.  The trailing metadata carries the core's stable code
    (C{error-code}), and for upstream errors C{upstream-status} and
    C{retry-after} when known.
    """
    code = STATUS.get(error.code, grpc.StatusCode.INTERNAL)
    message = error.message
    metadata = [(ERROR_CODE_KEY, error.code)]
    if isinstance(error, UpstreamError):
        status = error.status
        if error.code == "upstream_error":
            if status is None or status >= 500:
                code = grpc.StatusCode.UNAVAILABLE
            else:
                code = grpc.StatusCode.INTERNAL
        if status is not None:
            metadata.append((UPSTREAM_STATUS_KEY, str(status)))
            if str(status) not in message:
                message = f"upstream status {status}: {message}"
    retry_after = retry_seconds(error)
    if retry_after is not None:
        metadata.append((RETRY_AFTER_KEY, str(retry_after)))
    return code, message, tuple(metadata)


class GrpcListenError(Exception):
    """The gRPC server could not listen on its address."""

    def __init__(self, address: str) -> None:
        super().__init__(
            f"cannot listen for gRPC on {address!r}: the address is in use "
            f"or invalid (it is set with --grpc, in grpcio's form "
            f"host:port, e.g. [::]:9000 or 127.0.0.1:9000)"
        )
        self.address = address


def check_address(address: str) -> str:
    """
    Return C{address} when it looks like a grpcio listen address
    (C{host:port} with a port of 0 to 65535, C{[v6]:port}, or C{unix:path}),
    else raise L{ValueError} saying why; for checking C{--grpc} at startup.
    Whether the host resolves and the port is free shows only at bind time.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        if address.partition(":")[2]:
            return address
        raise ValueError(f"{address!r}: a unix address needs a path")
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{address!r}: expected host:port, e.g. [::]:9000")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: the port must be a number from 0 to 65535")
    if host.startswith("[") != host.endswith("]") or " " in host:
        raise ValueError(f"{address!r}: malformed host {host!r}")
    return address


# --- protobuf <-> core values ---------------------------------------------


def ask_request(
    message: chat_pb2.AskRequest, request_id: str | None = None, owner: str | None = None,
) -> AskRequest:
    """
    The core's request for a gRPC one, validated as HTTP validates its JSON
    body; raise L{easybackend.errors.BadRequest}.  An empty
    C{conversation_id} means C{"new"}; empty strings mean unset.
    """
    body: dict[str, Any] = {
        "prompt": message.prompt,
        "system_prompt": message.system_prompt or None,
        "model": message.model or None,
        "parent_id": message.parent_id or None,
    }
    if message.HasField("temperature"):
        body["temperature"] = message.temperature
    if message.HasField("max_tokens"):
        body["max_tokens"] = message.max_tokens
    return AskRequest.from_mapping(
        message.conversation_id or NEW, body, request_id=request_id,
        transport=TRANSPORT, owner=owner,
    )


def _usage(usage: Usage | None) -> chat_pb2.Usage | None:
    if usage is None:
        return None
    return chat_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _set(**fields: Any) -> dict[str, Any]:
    """The fields that have a value: C{None} leaves a field unset."""
    return {name: value for name, value in fields.items() if value is not None}


def final_response(answer: Answer) -> chat_pb2.AskResponse:
    """The last message of an C{Ask} stream: no text, C{done}, the ids."""
    return chat_pb2.AskResponse(**_set(
        done=True,
        conversation_id=answer.conversation_id,
        message_id=answer.message_id,
        prompt_message_id=answer.prompt_message_id or None,
        model=answer.model,
        usage=_usage(answer.usage),
        finish_reason=answer.finish_reason,
    ))


def conversation_message(c: Conversation) -> chat_pb2.Conversation:
    return chat_pb2.Conversation(**_set(
        id=c.id,
        title=c.title,
        system_prompt=c.system_prompt,
        model=c.model,
        created=c.created,
        updated=c.updated,
        current_message_id=c.leaf_id,
    ))


def message_message(m: Message) -> chat_pb2.Message:
    return chat_pb2.Message(**_set(
        id=m.id,
        parent_id=m.parent_id,
        role=m.role,
        content=m.content,
        tokens=m.tokens,
        created=m.created,
        model=m.model,
        finish_reason=m.finish_reason,
        usage=_usage(m.usage),
    ))


def view_message(view: ConversationView) -> chat_pb2.ConversationView:
    return chat_pb2.ConversationView(
        conversation=conversation_message(view.conversation),
        messages=[message_message(m) for m in view.messages],
    )


# --- the bridge to the reactor --------------------------------------------

_PIECE = "piece"
_RESULT = "result"
_FAILURE = "failure"
#: the call ended early: the client cancelled, its deadline passed, or the
#: server stopped
_ENDED = "ended"


class _Abort(Exception):
    """End the call with this status; raised inside handlers only."""

    def __init__(
        self, code: grpc.StatusCode, details: str,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.metadata = tuple(metadata)


class _ReactorCall:
    """
    One RPC's link to the reactor: a service call started on the reactor
    thread, whose pieces and outcome a handler thread reads from a queue.

    Every message a handler sends costs several thread wake-ups (grpcio's
    sync server waits for each send to complete, which its polling thread
    reports), each with a GIL hand-off; that, not the Python code, is most
    of the transport's cost.  So a handler that finds several pieces queued
    (they came while it was sending the last message) sends them as one
    message (L{get_pieces}): a stream that fell behind catches up at once,
    and costs less.  A piece never waits for more.  The queue is a
    C{queue.SimpleQueue} (one C call to put, one to take), and once the
    result is queued, cancelling is a no-op that does not wake the reactor.

    @ivar poll: how often, in seconds, a waiting handler thread checks that
        its RPC is still active, in case the wake-up was missed.
    """

    poll = 1.0

    def __init__(self, reactor: Any, context: grpc.ServicerContext) -> None:
        self._reactor = reactor
        self._context = context
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: the call is over: cancelled, or its result or failure was queued;
        #: set under C{_lock}
        self._ended = False
        #: what the handler thread took from the queue but has not used yet
        self._next: tuple[str, Any] | None = None
        # touched on the reactor thread only
        self._deferred: Deferred | None = None
        self._cancelled = False

    # handler thread

    def start(self, function: Callable[..., Any], *args: Any) -> None:
        """Call C{function(*args)} on the reactor; its result comes through
        the queue."""
        if not self._context.add_callback(self.cancel):
            # The RPC is already over: start nothing.
            self._ended = True
            self._queue.put((_ENDED, None))
            return
        self._reactor.callFromThread(self._start, function, args)

    def get(self) -> tuple[str, Any]:
        """The next piece, result, failure or end, blocking."""
        item, self._next = self._next, None
        if item is not None:
            return item
        get = self._queue.get
        while True:
            try:
                return get(timeout=self.poll)
            except queue.Empty:
                if not self._context.is_active():
                    return (_ENDED, None)

    def get_pieces(self) -> tuple[str, Any]:
        """
        Like L{get}, but a piece comes joined with the pieces queued right
        behind it: every piece already there, never waiting for more.
        """
        kind, value = self.get()
        if kind != _PIECE:
            return kind, value
        q = self._queue
        if q.empty():
            return kind, value
        pieces = [value]
        # Only this thread takes from the queue: what is there stays there.
        while not q.empty():
            item = q.get_nowait()
            if item[0] != _PIECE:
                self._next = item
                break
            pieces.append(item[1])
        return kind, "".join(pieces)

    def cancel(self) -> None:
        """
        Cancel the service call and wake the handler thread.  Safe from any
        thread, any number of times; a no-op once the call has finished.
        """
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._queue.put((_ENDED, None))
        self._reactor.callFromThread(self._cancel)

    # reactor thread

    def put_piece(self, text: str) -> None:
        self._queue.put((_PIECE, text))

    def _start(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._cancelled:
            return
        d = maybeDeferred(function, *args)
        self._deferred = d
        d.addCallbacks(self._done, self._failed)

    def _finish(self, item: tuple[str, Any]) -> None:
        self._deferred = None
        # Over: the handler's final cancel, and grpcio's callback at the
        # end of the RPC, have nothing left to cancel, and need not wake
        # the reactor for it.
        with self._lock:
            self._ended = True
        self._queue.put(item)

    def _done(self, result: Any) -> None:
        self._finish((_RESULT, result))

    def _failed(self, failure: Failure) -> None:
        self._finish((_FAILURE, failure))

    def _cancel(self) -> None:
        self._cancelled = True
        d, self._deferred = self._deferred, None
        if d is not None:
            d.cancel()


class _Tracker:
    """Counts the handlers running, so that stopping can wait for them."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._running = 0

    def __enter__(self) -> None:
        with self._condition:
            self._running += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._condition:
            self._running -= 1
            self._condition.notify_all()

    @property
    def running(self) -> int:
        with self._condition:
            return self._running

    def wait_idle(self, timeout: float) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: self._running == 0, timeout)


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return request_id_or_new(value)
    return request_id_or_new(None)


# --- the servicer ------------------------------------------------------------


class ChatServicer(chat_pb2_grpc.ChatServicer):
    """
    The C{chat.Chat} service over a L{ConversationService}.  Its methods
    run on grpcio's threads.
    """

    def __init__(self, service: Any, reactor: Any, keys: KeyRing = KeyRing()) -> None:
        self.service = service
        self.reactor = reactor
        self.keys = keys
        self.tracker = _Tracker()

    # The RPCs

    def Ask(
        self, request: chat_pb2.AskRequest, context: grpc.ServicerContext
    ) -> Iterator[chat_pb2.AskResponse]:
        return self._stream("Ask", self._ask, request, context)

    def ListConversations(
        self, request: chat_pb2.ListConversationsRequest,
        context: grpc.ServicerContext,
    ) -> chat_pb2.ListConversationsResponse:
        def list_conversations(request_id: str, owner: str | None) -> Any:
            conversations = self._call(
                context, self.service.list_conversations,
                request.limit or 20, request.offset, owner,
            )
            return chat_pb2.ListConversationsResponse(
                conversations=[conversation_message(c) for c in conversations]
            )
        return self._unary("ListConversations", list_conversations, context)

    def GetConversation(
        self, request: chat_pb2.GetConversationRequest,
        context: grpc.ServicerContext,
    ) -> chat_pb2.ConversationView:
        def get_conversation(request_id: str, owner: str | None) -> Any:
            return view_message(self._call(
                context, self.service.get_conversation, request.conversation_id, owner
            ))
        return self._unary("GetConversation", get_conversation, context)

    def DeleteConversation(
        self, request: chat_pb2.DeleteConversationRequest,
        context: grpc.ServicerContext,
    ) -> chat_pb2.DeleteConversationResponse:
        def delete_conversation(request_id: str, owner: str | None) -> Any:
            self._call(
                context, self.service.delete_conversation,
                request.conversation_id, owner,
            )
            return chat_pb2.DeleteConversationResponse()
        return self._unary("DeleteConversation", delete_conversation, context)

    def Rollback(
        self, request: chat_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> chat_pb2.ConversationView:
        def rollback(request_id: str, owner: str | None) -> Any:
            turns = request.turns if request.HasField("turns") else 1
            return view_message(self._call(
                context, self.service.rollback, request.conversation_id, turns, owner
            ))
        return self._unary("Rollback", rollback, context)

    # How they run

    def _ask(
        self, request: chat_pb2.AskRequest, context: grpc.ServicerContext,
        request_id: str, owner: str | None,
    ) -> Iterator[chat_pb2.AskResponse]:
        ask = ask_request(request, request_id, owner)
        call = _ReactorCall(self.reactor, context)
        call.start(self.service.ask, ask, call.put_piece)
        try:
            while True:
                # the pieces queued while the last message was sent go as one
                kind, value = call.get_pieces()
                if kind == _PIECE:
                    yield chat_pb2.AskResponse(response=value)
                elif kind == _RESULT:
                    yield final_response(value)
                    return
                elif kind == _FAILURE:
                    value.raiseException()
                else:
                    raise _ended(context)
        finally:
            # The generator may be closed before the end (the client went
            # away while a message was being sent): cancel, or do nothing
            # when the ask is over.
            call.cancel()

    def _call(
        self, context: grpc.ServicerContext, function: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """Call C{function} on the reactor and wait for its result."""
        call = _ReactorCall(self.reactor, context)
        call.start(function, *args)
        try:
            kind, value = call.get()
        finally:
            call.cancel()
        if kind == _RESULT:
            return value
        if kind == _FAILURE:
            value.raiseException()
        raise _ended(context)

    def _caller(self, context: grpc.ServicerContext) -> str | None:
        """The name of the caller's key from its C{authorization} metadata."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return self.keys.name_of_header(value)
        return self.keys.name_of_header(None)

    def _access(self, name: str, code: grpc.StatusCode, started: float,
                request_id: str, owner: str | None) -> None:
        """One access line for a call the core does not log itself."""
        record = AccessRecord(
            transport=TRANSPORT, kind=name, status=code.name.lower(),
            latency=time.monotonic() - started, request_id=request_id, key=owner)
        self.reactor.callFromThread(self.service.observer.record, record)

    def _unary(
        self, name: str, handler: Callable[[str, str | None], Any],
        context: grpc.ServicerContext,
    ) -> Any:
        request_id = _request_id(context)
        started, owner = time.monotonic(), None
        with self.tracker:
            try:
                owner = self._caller(context)
                result = handler(request_id, owner)
                self._access(name, grpc.StatusCode.OK, started, request_id, owner)
                return result
            except Exception as e:
                abort = self._abort_for(e, name, request_id)
        self._access(name, abort.code, started, request_id, owner)
        self._abort(context, abort)

    def _stream(
        self, name: str, handler: Callable[..., Iterator[Any]],
        request: Any, context: grpc.ServicerContext,
    ) -> Iterator[Any]:
        request_id = _request_id(context)
        started = time.monotonic()
        with self.tracker:
            try:
                owner = self._caller(context)
            except Unauthenticated as e:
                # Refused before the core saw it: log it here.
                abort = self._abort_for(e, name, request_id)
                self._access(name, abort.code, started, request_id, None)
            else:
                try:
                    yield from handler(request, context, request_id, owner)
                    return
                except Exception as e:
                    abort = self._abort_for(e, name, request_id)
        self._abort(context, abort)

    def _abort_for(self, error: Exception, method: str, request_id: str) -> _Abort:
        """
        The status for whatever a handler raised.  The unexpected is logged,
        on the reactor thread like everything else.
        """
        if isinstance(error, _Abort):
            return error
        if isinstance(error, EasyBackendError):
            return _Abort(*status_for(error))
        if isinstance(error, CancelledError):
            return _Abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
        failure = Failure(error, type(error), error.__traceback__)
        self.reactor.callFromThread(
            log.failure,
            "unexpected error in gRPC {method} (request id {request_id})",
            failure, method=method, request_id=request_id,
        )
        return _Abort(
            grpc.StatusCode.INTERNAL,
            f"internal server error (request id {request_id}); "
            f"the server log has the details",
        )

    @staticmethod
    def _abort(context: grpc.ServicerContext, abort: "_Abort") -> None:
        if abort.metadata:
            context.set_trailing_metadata(abort.metadata)
        # grpcio drops the trailers (and the status) of very long details
        context.abort(abort.code, abort.details[:1024])


def _ended(context: grpc.ServicerContext) -> _Abort:
    """The status for a call that ended before its result (nobody reads it,
    unless the server itself cancelled the work)."""
    if context.time_remaining() <= 0:
        return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    return _Abort(grpc.StatusCode.CANCELLED, "the call was cancelled")


# --- the Twisted service -----------------------------------------------------


class GrpcService(Service):
    """
    The gRPC listener as a Twisted service: C{chat.Chat}, the standard
    C{grpc.health.v1.Health} service (following L{ConversationService.check_ready}),
    and server reflection.

    @param service: the L{easybackend.service.ConversationService}.
    @param address: where to listen, in grpcio's form (C{"[::]:9000"},
        C{"127.0.0.1:0"} for any free port).
    @param workers: the handler threads; also the most calls served at once
        (each open stream holds a thread).  Calls beyond it get
        C{RESOURCE_EXHAUSTED} at once.
    @param grace: seconds calls in flight may take to finish when the
        service stops, before they are cancelled.
    @param server_credentials: C{grpc.ServerCredentials} for TLS, or
        C{None} for plain text.
    @param max_message_size: the largest request message accepted, in bytes.
    @param health_interval: seconds between readiness checks.
    @param interceptors: C{grpc.ServerInterceptor}s (authentication, access
        logs).

    @ivar port: the port bound, once started.
    @ivar health: the C{grpc_health} servicer, once started.
    """

    name = "grpc"

    def __init__(
        self,
        service: Any,
        address: str = DEFAULT_ADDRESS,
        workers: int = DEFAULT_WORKERS,
        reactor: Any = None,
        grace: float = 5.0,
        server_credentials: grpc.ServerCredentials | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        health_interval: float = 5.0,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        keys: KeyRing = KeyRing(),
    ) -> None:
        self.keys = keys
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.service = service
        self.address = address
        self.workers = workers
        self.reactor = reactor
        self.grace = grace
        self.server_credentials = server_credentials
        self.max_message_size = max_message_size
        self.health_interval = health_interval
        self.interceptors = tuple(interceptors)
        self.port: int | None = None
        self.health: health.HealthServicer | None = None
        self.servicer: ChatServicer | None = None
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._health_loop: LoopingCall | None = None
        self._health_check: Deferred | None = None
        self._serving: bool | None = None

    def startService(self) -> None:
        executor = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="grpc"
        )
        server = grpc.server(
            executor,
            maximum_concurrent_rpcs=self.workers,
            interceptors=self.interceptors,
            options=[
                ("grpc.max_receive_message_length", self.max_message_size),
                # Two servers on one port would share its calls silently.
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = ChatServicer(self.service, self.reactor, self.keys)
        chat_pb2_grpc.add_ChatServicer_to_server(servicer, server)
        health_servicer = health.HealthServicer()
        for name in (health.OVERALL_HEALTH, SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            if self.server_credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, self.server_credentials)
        except RuntimeError as e:
            server.stop(None)
            executor.shutdown(wait=False)
            raise GrpcListenError(self.address) from e
        if not port:  # grpcio before 1.50 returned 0 instead of raising
            server.stop(None)
            executor.shutdown(wait=False)
            raise GrpcListenError(self.address)
        server.start()
        self._server, self._executor = server, executor
        self.servicer, self.health, self.port = servicer, health_servicer, port
        self._serving = None
        Service.startService(self)
        log.info(
            "gRPC listening on {address} (port {port}, {workers} workers)",
            address=self.address, port=port, workers=self.workers,
        )
        self._health_loop = LoopingCall(self.check_health)
        self._health_loop.clock = self.reactor
        self._health_loop.start(self.health_interval, now=True)

    def stopService(self) -> Deferred:
        """
        Report NOT_SERVING, refuse new calls, let calls in flight finish for
        C{grace} seconds, cancel the rest, and fire once grpcio has stopped
        and the handlers have returned.
        """
        Service.stopService(self)
        if self._health_loop is not None and self._health_loop.running:
            self._health_loop.stop()
        self._health_loop = None
        if self._health_check is not None:
            self._health_check.cancel()
        server, executor, servicer = self._server, self._executor, self.servicer
        if server is None:
            return succeed(None)
        self._server = self._executor = None
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        grace = self.grace

        def stop() -> None:
            server.stop(grace).wait()
            executor.shutdown(wait=False, cancel_futures=True)
            # Cancelled handlers wake at once; allow for a slow one.
            if servicer is not None and not servicer.tracker.wait_idle(
                _ReactorCall.poll * 5
            ):
                log.warn(
                    "gRPC stopped with {n} handler(s) still running",
                    n=servicer.tracker.running,
                )

        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), stop)
        d.addCallback(lambda _: log.info("gRPC stopped"))
        return d

    # readiness

    def check_health(self) -> Deferred:
        """
        Check readiness now and report it to the health service: SERVING
        when C{service.check_ready()} succeeds, NOT_SERVING otherwise.  Runs
        every C{health_interval} seconds; fires when done, never fails.
        """
        d = maybeDeferred(self.service.check_ready)
        d.addTimeout(self.health_interval, self.reactor)
        d.addCallbacks(self._ready, self._not_ready)
        self._health_check = d
        d.addBoth(self._checked)
        return d

    def _checked(self, _: object) -> None:
        self._health_check = None

    def _ready(self, _: object) -> None:
        self._set_serving(True, None)

    def _not_ready(self, failure: Failure) -> None:
        if failure.check(CancelledError) and not self.running:
            return
        if failure.check(EasyBackendError):
            reason = failure.value.message
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            if self._serving is not False:
                log.failure("gRPC readiness check failed", failure)
        self._set_serving(False, reason)

    def _set_serving(self, serving: bool, reason: str | None) -> None:
        if not self.running or self.health is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (health.OVERALL_HEALTH, SERVICE_NAME):
            self.health.set(name, status)
        if serving != self._serving:
            if serving:
                log.info("gRPC health: SERVING")
            else:
                log.warn("gRPC health: NOT_SERVING ({reason})", reason=reason)
        self._serving = serving
