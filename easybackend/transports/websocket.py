"""
The WebSocket transport: Autobahn on Twisted, over the conversation service.

One protocol, served on its own listener (C{--websocket}, default
C{tcp:9001}) and at C{/ws} on the HTTP site.  It only translates: frames in,
calls on L{easybackend.service.ConversationService}, frames out.

Two wire protocols share the socket:

  - JSON (what new clients speak).  Client messages::

        {"type": "ask", "id": ID, "conversation_id": "...", "prompt": "...",
         "system_prompt": ..., "model": ..., "temperature": ...,
         "max_tokens": ..., "parent_id": ...}
        {"type": "cancel", "id": ID}

    Server messages, for each accepted ask any number of C{delta} then
    exactly one of C{done}, C{error} or C{cancelled}::

        {"type": "delta", "id": ID, "text": "..."}
        {"type": "done", "id": ID, "conversation_id": "...",
         "message_id": "...", "model": "...", "usage": {...},
         "finish_reason": "...", "prompt_message_id": "..."}
        {"type": "error", "id": ID or null, "code": "...", "message": "..."}
        {"type": "cancelled", "id": ID}

    C{ID} is the client's: a non-empty string or an integer.  Several asks
    may be in flight at once, told apart by their ids.

  - The old text protocol, kept for existing clients:
    C{<|ask|>$<conversation_id>$<prompt>} gets the answer's pieces as text
    frames, then C{<|end|>}, or C{<|err|>$<message>}.  Text asks on one
    connection run one after the other, since their frames carry no id.

A text message is JSON when its first non-blank character is C{{} or C{[}, or
when it parses as JSON; anything else is the text protocol.

With API keys configured, a client shows its key in the handshake: the
C{Authorization: Bearer <key>} header, or C{?api_key=<key>} on the URL (a
browser cannot set headers on a WebSocket).  A missing or wrong key gets
the handshake accepted and the connection closed at once with code 4401 and
the reason (L{CLOSE_UNAUTHENTICATED}): a browser sees both in its
C{CloseEvent}, where a refused handshake would only show 1006.  The key's
name owns every ask of the connection; the key itself is never logged.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Callable, Iterable

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from easybackend import wire
from easybackend.auth import KeyRing
from easybackend.errors import (
    BadRequest,
    EasyBackendError,
    Unauthenticated,
    retry_seconds,
)
from easybackend.model import Answer, AskRequest
from easybackend.observe import AccessRecord

__all__ = [
    "ChatServerProtocol",
    "ChatServerFactory",
    "WebSocketFactoryService",
    "make_websocket_factory",
    "websocket_resource",
    "TEXT_ASK",
    "TEXT_END",
    "TEXT_ERR",
    "TEXT_USAGE",
    "CLOSE_UNAUTHENTICATED",
    "KEY_REQUIRED",
]

# Not "log" as a class attribute: Autobahn's protocol classes keep their own
# txaio logger there.
log = Logger(namespace="easybackend.transports.websocket")

#: The old text protocol's markers.
TEXT_ASK = "<|ask|>"
TEXT_END = "<|end|>"
TEXT_ERR = "<|err|>"
#: What any other text gets, after C{<|err|>$}.
TEXT_USAGE = (
    'usage: send <|ask|>$<conversation_id>$<prompt>, or JSON '
    '{"type": "ask", "id": "1", "conversation_id": "new", "prompt": "..."}'
)

#: The close code sent to every client when the factory stops.
CLOSE_GOING_AWAY = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY
#: The close code for a missing or wrong API key (HTTP's 401, in the
#: application range 4000-4999).
CLOSE_UNAUTHENTICATED = 4401
#: Seconds a peer has to answer our close frame (Autobahn's whole-second
#: timers make it 1 to 2); a peer stuck with unread data is reset as long after.
CLOSE_HANDSHAKE_TIMEOUT = 2
#: The reason sent with L{CLOSE_UNAUTHENTICATED} when no key was shown.
KEY_REQUIRED = (
    "an API key is required: send Authorization: Bearer <key> or ?api_key=<key>"
)


class _Ask:
    """One ask in flight on a connection."""

    def __init__(self, key: object) -> None:
        #: its key in L{ChatServerProtocol.in_flight}
        self.key = key
        #: False once the ask ended or was cancelled: no more frames for it
        self.active = True
        self.deferred: Deferred[Answer] | None = None


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and bool(value)


def _error_id(message: object) -> object:
    """The id to echo in an error about C{message}, when it has a usable one."""
    if isinstance(message, dict):
        ask_id = message.get("id")
        if _valid_id(ask_id):
            return ask_id
    return None


class ChatServerProtocol(WebSocketServerProtocol):
    """
    One WebSocket connection.  C{self.factory.service} answers the asks.

    @ivar in_flight: the asks running on this connection, by key: the
        client's id for JSON asks, C{("text", n)} for text asks.
    @ivar connection_id: this connection's id; each ask's request id (in
        the access log) is C{<connection_id>:<client id>}.
    @ivar owner: the name of the connection's API key (None when keys are
        off); the owner of its asks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: dict[object, _Ask] = {}
        self.connection_id = "ws_" + secrets.token_hex(6)
        self.owner: str | None = None
        #: why the connection is refused (sent as the close reason), if it is
        self._refusal: str | None = None
        self._connected_at = 0.0
        self._text_lock = DeferredLock()
        self._text_count = 0
        #: Deferreds of L{when_closed}; None once closed
        self._close_waiters: list[Deferred[None]] | None = []
        #: the reset of a connection whose orderly end is stuck, if pending
        self._abort_call: IDelayedCall | None = None

    # --- Autobahn's callbacks: nothing raises out of them -----------------

    def onConnect(self, request: ConnectionRequest) -> None:
        """Learn who connects; a refusal waits for L{onOpen}, to be heard."""
        self._connected_at = self.factory.reactor.seconds()
        try:
            self.owner = self._key_name(request)
        except Unauthenticated as e:
            self._refusal = e.message
        except Exception:
            log.failure("unexpected failure checking a WebSocket API key")
            self._refusal = "internal error"

    def _key_name(self, request: ConnectionRequest) -> str | None:
        """
        The name of the key in the handshake's header, else in its
        C{api_key} query parameter; None when keys are off.

        @raise Unauthenticated: keys are on and the key is missing or wrong.
        """
        keys: KeyRing = self.factory.keys
        if not keys.enabled:
            return None
        header = request.headers.get("authorization")
        if header is not None:
            return keys.name_of_header(header)
        given = request.params.get("api_key") or [""]
        if not given[0]:
            raise Unauthenticated(KEY_REQUIRED)
        return keys.name_of(given[0])

    def onOpen(self) -> None:
        try:
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            self.factory.connections.add(self)
        except Exception:
            log.failure("unexpected failure opening a WebSocket connection")

    def _refuse(self, reason: str) -> None:
        """Close with L{CLOSE_UNAUTHENTICATED} and C{reason}; log the refusal."""
        self.sendClose(CLOSE_UNAUTHENTICATED, reason)
        observer = getattr(self.factory.service, "observer", None)
        if observer is not None:
            observer.record(AccessRecord(
                transport="websocket", kind="connect", status="unauthenticated",
                latency=self.factory.reactor.seconds() - self._connected_at,
                request_id=self.connection_id,
            ))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._refusal is not None:
            return  # closing: nothing from this client is acted on
        reply_internal: Callable[[], None] = self._internal_json
        try:
            if isBinary:
                self._send_error(
                    None, "bad_request",
                    "binary messages are not supported: send JSON text",
                )
                return
            text = payload.decode("utf-8")
            try:
                message = self._parse(text)
            except ValueError as e:
                self._send_error(None, "bad_request", f"invalid JSON: {e}")
                return
            if message is _TEXT:
                reply_internal = self._internal_text
                self._on_text(text)
            else:
                self._on_json(message)
        except Exception:
            log.failure("unexpected failure handling a WebSocket message")
            reply_internal()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self.factory.connections.discard(self)
            self.cancel_all()
        except Exception:
            log.failure("unexpected failure closing a WebSocket connection")
        finally:
            if self._abort_call is not None:
                self._abort_call.cancel()
                self._abort_call = None
            waiters, self._close_waiters = self._close_waiters, None
            for d in waiters or ():
                d.callback(None)

    def onCloseHandshakeTimeout(self) -> None:
        """
        The peer did not answer our close frame in time: end the connection
        in order (the close frame, then a FIN), not with Autobahn's reset.

        A reset can reach a browser before it reads our close frame (for
        instance while it writes an ask), and the browser then reports 1006
        instead of our code and reason (4401 and why).  A peer that reads
        nothing, whose unread data keeps the FIN waiting, is aborted after
        one more close handshake timeout.
        """
        try:
            self.closeHandshakeTimeoutCall = None
            if self.state == WebSocketProtocol.STATE_CLOSED:
                return
            self.wasClean = False
            self.wasNotCleanReason = "the peer did not answer the close in time"
            self.wasCloseHandshakeTimeout = True
            self.dropConnection(abort=False)
            self._abort_call = self.factory.reactor.callLater(
                self.closeHandshakeTimeout, self._abort)
        except Exception:
            log.failure("unexpected failure closing a WebSocket connection")

    def _abort(self) -> None:
        """Reset a connection whose orderly end is stuck behind unread data."""
        self._abort_call = None
        self.transport.abortConnection()

    def when_closed(self) -> "Deferred[None]":
        """Fires once this connection is closed (at once if it is)."""
        if self._close_waiters is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    # --- parsing -----------------------------------------------------------

    def _parse(self, text: str) -> Any:
        """
        The decoded JSON message, or L{_TEXT} for the text protocol.  Raises
        L{ValueError} for a message meant as JSON that is not valid.
        """
        if text.startswith(TEXT_ASK):
            return _TEXT
        try:
            return wire.loads(text)
        except ValueError:
            if text.lstrip()[:1] in ("{", "["):
                raise
            return _TEXT

    # --- the JSON protocol -------------------------------------------------

    def _on_json(self, message: Any) -> None:
        if not isinstance(message, dict):
            self._send_error(
                None, "bad_request", "a message must be a JSON object"
            )
            return
        kind = message.get("type")
        if kind == "ask":
            self._json_ask(message)
        elif kind == "cancel":
            self._json_cancel(message)
        elif not isinstance(kind, str):
            self._send_error(
                _error_id(message), "bad_request",
                '"type" is required and must be "ask" or "cancel"',
            )
        else:
            self._send_error(
                _error_id(message), "bad_request",
                f'unknown "type" {kind!r}: expected "ask" or "cancel"',
            )

    def _json_ask(self, message: dict[str, Any]) -> None:
        ask_id = message.get("id")
        if not _valid_id(ask_id):
            self._send_error(
                None, "bad_request",
                '"id" is required and must be a non-empty string or an integer',
            )
            return
        if ask_id in self.in_flight:
            self._send_error(
                ask_id, "bad_request",
                f"an ask with id {ask_id!r} is already in flight "
                "(that ask goes on)",
            )
            return
        conversation_id = message.get("conversation_id")
        try:
            if not isinstance(conversation_id, str):
                raise BadRequest(
                    '"conversation_id" is required and must be a string '
                    '(an id, or "new")'
                )
            request = AskRequest.from_mapping(
                conversation_id, message,
                request_id=f"{self.connection_id}:{ask_id}",
                owner=self.owner, transport="websocket",
            )
        except EasyBackendError as e:
            self._send_error(ask_id, e.code, e.message)
            return
        ask = _Ask(ask_id)
        # {"type": "delta", "id": ask_id, "text": piece}, the head made once
        delta = '{"type": "delta", "id": %s, "text": ' % json.dumps(ask_id, ensure_ascii=False)

        def on_piece(piece: str) -> None:
            if ask.active:
                self._send(delta + wire.json_string(piece) + "}")

        def done(answer: Answer) -> None:
            reply = answer.to_dict()
            reply.pop("response", None)  # the deltas carried it already
            # as gRPC does: the id of the stored prompt
            reply["prompt_message_id"] = answer.prompt_message_id or None
            self._send_json({"type": "done", "id": ask_id, **reply})

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                self._send_json({"type": "cancelled", "id": ask_id})
            elif failure.check(EasyBackendError):
                error = failure.value
                self._send_error(ask_id, error.code, error.message,
                                 retry_after=retry_seconds(error))
            else:
                log.failure(
                    "unexpected failure answering WebSocket ask {ask_id!r}",
                    failure, ask_id=ask_id,
                )
                self._send_error(ask_id, "internal", "internal error")

        self._start(ask, lambda: self._service_ask(request, on_piece),
                    done, failed)

    def _json_cancel(self, message: dict[str, Any]) -> None:
        ask_id = message.get("id")
        if not _valid_id(ask_id):
            self._send_error(
                None, "bad_request",
                '"id" is required and must be a non-empty string or an integer',
            )
            return
        ask = self.in_flight.get(ask_id)
        # An ask that already ended got its done or error: nothing to say.
        if ask is not None and ask.deferred is not None:
            ask.deferred.cancel()

    # --- the old text protocol --------------------------------------------

    def _on_text(self, text: str) -> None:
        if not text.startswith(TEXT_ASK + "$") or "$" not in text[len(TEXT_ASK) + 1:]:
            self._send_text(f"{TEXT_ERR}${TEXT_USAGE}")
            return
        conversation_id, prompt = text[len(TEXT_ASK) + 1:].split("$", 1)
        self._text_count += 1
        key = ("text", self._text_count)
        try:
            request = AskRequest.from_mapping(
                conversation_id, {"prompt": prompt},
                request_id=f"{self.connection_id}:text-{self._text_count}",
                owner=self.owner, transport="websocket",
            )
        except EasyBackendError as e:
            self._send_text(f"{TEXT_ERR}${e.message}")
            return
        ask = _Ask(key)

        def on_piece(piece: str) -> None:
            if ask.active:
                self._send_text(piece)

        def done(answer: Answer) -> None:
            self._send_text(TEXT_END)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                self._send_text(f"{TEXT_ERR}$cancelled")
            elif failure.check(EasyBackendError):
                error = failure.value
                retry_after = retry_seconds(error)
                hint = "" if retry_after is None else f"; retry after {retry_after}s"
                self._send_text(f"{TEXT_ERR}${error.message}{hint}")
            else:
                log.failure(
                    "unexpected failure answering a WebSocket text ask",
                    failure,
                )
                self._send_text(f"{TEXT_ERR}$internal error")

        def run() -> "Deferred[Answer]":
            if not ask.active:  # cancelled while it waited for the lock
                raise CancelledError()
            return self._service_ask(request, on_piece)

        self._start(ask, lambda: self._text_lock.run(run), done, failed)

    # --- asks --------------------------------------------------------------

    def _service_ask(
        self, request: AskRequest, on_piece: Callable[[str], None]
    ) -> "Deferred[Answer]":
        return maybeDeferred(self.factory.service.ask, request, on_piece)

    def _start(
        self,
        ask: _Ask,
        call: Callable[[], "Deferred[Answer]"],
        done: Callable[[Answer], None],
        failed: Callable[[Failure], None],
    ) -> None:
        """
        Run C{call()} as the ask C{ask}; C{done} or C{failed} sends its one
        final frame.  The ask is in L{in_flight} until then.
        """
        self.in_flight[ask.key] = ask

        def finish() -> None:
            ask.active = False
            if self.in_flight.get(ask.key) is ask:
                del self.in_flight[ask.key]

        def ok(answer: Answer) -> None:
            finish()
            try:
                done(answer)
            except Exception:
                failed(Failure())  # logs it, tells the client "internal"

        def bad(failure: Failure) -> None:
            finish()
            failed(failure)

        try:
            d = call()
        except Exception:
            d = Deferred()
            d.errback()
        ask.deferred = d
        d.addCallbacks(ok, bad)
        d.addErrback(
            lambda f: log.failure(
                "unexpected failure ending a WebSocket ask", f
            )
        )

    def cancel_all(self) -> None:
        """
        Cancel every ask in flight on this connection, the newest first, so
        that a queued text ask never starts when the one before it ends.
        """
        asks = list(self.in_flight.values())
        self.in_flight.clear()
        for ask in asks:
            ask.active = False
        for ask in reversed(asks):
            if ask.deferred is not None:
                try:
                    ask.deferred.cancel()
                except Exception:
                    log.failure("unexpected failure cancelling a WebSocket ask")

    # --- sending -----------------------------------------------------------

    def _is_open(self) -> bool:
        return self.state == WebSocketProtocol.STATE_OPEN

    def _send_json(self, message: dict[str, Any]) -> None:
        self._send(json.dumps(message, ensure_ascii=False))

    def _send_text(self, text: str) -> None:
        self._send(text)

    def _send(self, text: str) -> None:
        """Send a text frame while the connection is open; never raise."""
        if self._is_open():
            try:
                self.sendMessage(text.encode("utf-8"), isBinary=False)
            except Exception:
                log.failure("could not send a WebSocket message")

    def _send_error(
        self, ask_id: object, code: str, message: str,
        retry_after: int | None = None,
    ) -> None:
        reply: dict[str, Any] = {
            "type": "error", "id": ask_id, "code": code, "message": message,
        }
        if retry_after is not None:
            reply["retry_after"] = retry_after
        self._send_json(reply)

    def _internal_json(self) -> None:
        self._send_error(None, "internal", "internal error")

    def _internal_text(self) -> None:
        self._send_text(f"{TEXT_ERR}$internal error")


#: L{ChatServerProtocol._parse}'s answer for a text-protocol message.
_TEXT = object()


class ChatServerFactory(WebSocketServerFactory):
    """
    The factory for L{ChatServerProtocol}; build it with
    L{make_websocket_factory}.

    @ivar service: the L{easybackend.service.ConversationService}.
    @ivar keys: the API keys clients must show; empty for an open server.
    @ivar connections: the open connections.
    """

    protocol = ChatServerProtocol

    def __init__(
        self, service: Any, *args: Any, keys: KeyRing = KeyRing(), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.service = service
        self.keys = keys
        self.connections: set[ChatServerProtocol] = set()

    def close_all(
        self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down"
    ) -> "Deferred[None]":
        """
        Cancel the asks still in flight (JSON clients hear C{cancelled},
        text clients C{<|err|>$cancelled}) and close every open connection
        with C{code} (default 1001, going away).  Fires once every
        connection is gone (a peer that does not answer the close within
        1 to 2 s is closed without its answer, and reset 2 s later if it
        reads nothing).

        For a graceful shutdown: stop listening, let the core drain its asks
        in flight, then call this.  Stopping the factory does not close
        connections by itself, so that a drain can let their asks finish.
        """
        waiting = []
        for protocol in list(self.connections):
            try:
                waiting.append(protocol.when_closed())
                protocol.cancel_all()
                if protocol.state == WebSocketProtocol.STATE_OPEN:
                    # sendClose() refuses 1001, which is the right code for
                    # a server going away; sendCloseFrame() does not.
                    protocol.sendCloseFrame(
                        code=code, reasonUtf8=reason.encode("utf-8")[:123],
                        isReply=False,
                    )
            except Exception:
                log.failure("unexpected failure closing a WebSocket connection")
        return gatherResults(waiting).addCallback(lambda _: None)


def make_websocket_factory(
    service: Any,
    *,
    url: str | None = None,
    max_message_size: int = 1024 * 1024,
    auto_ping_interval: float = 20.0,
    auto_ping_timeout: float = 10.0,
    allowed_origins: Iterable[str] | None = None,
    reactor: Any = None,
    keys: KeyRing = KeyRing(),
) -> ChatServerFactory:
    """
    The WebSocket factory, for a listening endpoint and for L{websocket_resource}
    alike (one factory can serve both).

    @param service: the L{easybackend.service.ConversationService}.
    @param url: the public C{ws://} or C{wss://} URL, if known (Autobahn
        only uses it for its status page and the handshake's C{Host} check
        when a port is given).
    @param max_message_size: the largest client message, in bytes (a frame
        is held to the same limit); a client that sends more is closed with
        code 1009.  0 turns the limit off.
    @param auto_ping_interval: seconds between the pings that keep the
        connection alive and detect dead peers; 0 turns pings off.
    @param auto_ping_timeout: seconds a peer has to answer a ping before the
        connection is dropped (which cancels its asks); 0 pings without
        ever dropping.  Autobahn rounds its timers down to whole seconds
        (a 1 s timeout lasts 0 to 1 s), so both must be 0 or at least 1:
        below that, pings would flood and live peers would be dropped.
    @param allowed_origins: the browser origins allowed to connect, as
        patterns (C{"*"}, C{"https://*.example.com"}); default all.
    @param reactor: the reactor; default the global one.
    @param keys: the API keys a client must show (header or C{?api_key=});
        empty, the default, lets everyone in.
    """
    if max_message_size < 0:
        raise ValueError("max_message_size must be >= 0")
    for name, value in [("auto_ping_interval", auto_ping_interval),
                        ("auto_ping_timeout", auto_ping_timeout)]:
        if value != 0 and not value >= 1:
            raise ValueError(
                f"{name} must be 0 (off) or at least 1 second, not {value!r}"
            )
    factory = ChatServerFactory(service, url, reactor=reactor, keys=keys)
    factory.setProtocolOptions(
        maxMessagePayloadSize=max_message_size,
        maxFramePayloadSize=max_message_size,
        autoPingInterval=auto_ping_interval,
        autoPingTimeout=auto_ping_timeout,
        # Autobahn's timers fire at whole seconds, so its default of 1 can
        # mean a few ms: then a live peer was closed without its answer.
        closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
        # Send the close frame (1009 for an oversize message, 1002 for a
        # protocol error) instead of dropping the TCP connection unexplained.
        failByDrop=False,
        allowedOrigins=list(allowed_origins) if allowed_origins else ["*"],
        # A plain GET gets a refusal, not Autobahn's HTML status page.
        webStatus=False,
    )
    return factory


def websocket_resource(factory: ChatServerFactory) -> WebSocketResource:
    """
    A C{twisted.web} resource serving C{factory}'s protocol, to mount at
    C{/ws} on the HTTP site.

    C{WebSocketResource} does not start or stop its factory: run a
    L{WebSocketFactoryService} for it next to the HTTP listener, and call
    L{ChatServerFactory.close_all} at shutdown.
    """
    return WebSocketResource(factory)


class WebSocketFactoryService(Service):
    """
    Starts and stops a factory that no listening port owns, such as the one
    behind L{websocket_resource}.  Uses C{doStart}/C{doStop}, which count
    users, so the same factory may also listen on its own port.  Stopping
    it leaves open connections alone: see L{ChatServerFactory.close_all}.
    """

    def __init__(self, factory: ChatServerFactory) -> None:
        self.factory = factory

    def startService(self) -> None:
        super().startService()
        self.factory.doStart()

    def stopService(self) -> None:
        super().stopService()
        self.factory.doStop()
