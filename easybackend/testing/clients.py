"""
One ask over each transport, for end-to-end and reliability tests: HTTP
(a JSON answer or Server-Sent Events), WebSocket (the JSON protocol, several
asks in flight on one socket) and gRPC (server streaming, read in threads
of a pool of its own).  Each ask ends in an L{Outcome} of the same shape,
whatever the transport, so that tests can be written once for all of them.

Also: L{LogCapture} (what the server logged, in process) and L{raw_grpc}
(a gRPC call over a bare HTTP/2 connection, for metadata that grpcio's own
client refuses to send).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Callable

import grpc
import treq
from attrs import define, field
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from easybackend.proto import chat_pb2, chat_pb2_grpc
from easybackend.testing.fixtures import within

__all__ = [
    "GrpcClient",
    "LogCapture",
    "Outcome",
    "WSClient",
    "ask_http",
    "connect_ws",
    "raw_grpc",
]

#: how an ask ended, in L{Outcome.ended}
DONE, ERROR, CANCELLED, LOST = "done", "error", "cancelled", "lost"


@define
class Outcome:
    """
    How one ask ended, as its client saw it.

    @ivar transport: C{"http"}, C{"sse"}, C{"websocket"} or C{"grpc"}.
    @ivar ended: C{"done"} (a whole answer), C{"error"} (a clear error),
        C{"cancelled"}, or C{"lost"} (the connection broke, no final word).
    @ivar text: the answer's text as the client got it (the deltas joined).
    @ivar pieces: how many pieces (deltas) came before the end.
    @ivar code: the core's error code (HTTP's C{error.code}, the WebSocket
        C{error}'s C{code}, gRPC's C{error-code} trailing metadata).
    @ivar status: the HTTP status, or the gRPC status code's name.
    @ivar final: the final message's fields (C{done}: conversation_id,
        message_id, ...; C{error}: code, message, ...).
    @ivar message: the error's message, or what broke.
    """

    transport: str
    ended: str
    text: str = ""
    pieces: int = 0
    code: str | None = None
    status: Any = None
    final: dict[str, Any] = field(factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.ended == DONE


# --- HTTP ----------------------------------------------------------------------


class _EventParser:
    """Splits a Server-Sent Events body into (event, decoded data)."""

    def __init__(self, on_event: Callable[[str, Any], None] | None = None) -> None:
        self._buffer = b""
        self.events: list[tuple[str, Any]] = []
        self._on_event = on_event

    def feed(self, data: bytes) -> None:
        self._buffer += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            if not block or block.startswith(b":"):
                continue
            fields = {}
            for line in block.decode("utf-8").split("\n"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
            event = (fields.get("event", "message"), json.loads(fields.get("data", "null")))
            self.events.append(event)
            if self._on_event is not None:
                self._on_event(*event)


async def ask_http(
    base_url: str,
    conversation_id: str,
    prompt: str,
    *,
    stream: bool = False,
    timeout: float = 30.0,
    headers: dict[str, list[str]] | None = None,
    on_piece: Callable[[str], None] | None = None,
    **fields: Any,
) -> Outcome:
    """
    C{POST /ask/{conversation_id}}: the JSON answer, or with C{stream}
    Server-Sent Events.  A failure to connect or a connection broken before
    the final event is an outcome (C{lost}), not an exception; a client
    that waits longer than C{timeout} seconds fails with a timeout.
    """
    transport = "sse" if stream else "http"
    body = {"prompt": prompt, **fields}
    if stream:
        body["stream"] = True
    all_headers = {"Content-Type": ["application/json"], **(headers or {})}
    try:
        response = await within(treq.post(
            f"{base_url}/ask/{conversation_id}", json.dumps(body).encode(),
            headers=all_headers, persistent=False), timeout)
    except Exception as e:
        if _is_timeout(e):
            raise
        return Outcome(transport, LOST, message=repr(e))
    content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
    if not stream or "event-stream" not in content_type:
        try:
            content = await within(treq.content(response), timeout)
        except Exception as e:
            if _is_timeout(e):
                raise
            return Outcome(transport, LOST, status=response.code, message=repr(e))
        data = json.loads(content)
        if response.code == 200:
            return Outcome(transport, DONE, text=data["response"], status=200, final=data)
        error = data["error"]
        return Outcome(transport, ERROR, code=error["code"], status=response.code,
                       final=error, message=error["message"])

    pieces: list[str] = []

    def on_event(name: str, data: Any) -> None:
        if name == "delta":
            pieces.append(data["text"])
            if on_piece is not None:
                on_piece(data["text"])

    parser = _EventParser(on_event)
    broken = ""
    try:
        await within(treq.collect(response, parser.feed), timeout)
    except Exception as e:
        if _is_timeout(e):
            raise
        broken = repr(e)
    text = "".join(pieces)
    last = parser.events[-1] if parser.events else None
    if last is not None and last[0] == "done":
        return Outcome(transport, DONE, text=text, pieces=len(pieces), status=200,
                       final=last[1])
    if last is not None and last[0] == "error":
        return Outcome(transport, ERROR, text=text, pieces=len(pieces), status=200,
                       code=last[1]["code"], final=last[1], message=last[1]["message"])
    return Outcome(transport, LOST, text=text, pieces=len(pieces), status=200,
                   message=broken or "the stream ended with no final event")


def _is_timeout(error: Exception) -> bool:
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    return isinstance(error, DeferredTimeout)


# --- WebSocket ---------------------------------------------------------------


class _WSAsk:
    def __init__(self, on_piece: Callable[[str], None] | None) -> None:
        self.pieces: list[str] = []
        self.on_piece = on_piece
        self.result: Deferred[Outcome] = Deferred()

    def end(self, outcome: Outcome) -> None:
        if not self.result.called:
            self.result.callback(outcome)


class WSClient(WebSocketClientProtocol):
    """
    A WebSocket client of the JSON protocol that runs several asks at once
    on one socket, telling their messages apart by id.  Messages with an
    id it does not know (or none) go to L{stray}.  When the connection
    closes, every ask still open ends as C{lost}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.asks: dict[Any, _WSAsk] = {}
        self.stray: list[Any] = []
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self._next_id = 0

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = json.loads(payload.decode("utf-8"))
        except ValueError:
            self.stray.append(payload)
            return
        ask = self.asks.get(message.get("id")) if isinstance(message, dict) else None
        if ask is None:
            self.stray.append(message)
            return
        kind = message.get("type")
        if kind == "delta":
            ask.pieces.append(message["text"])
            if ask.on_piece is not None:
                ask.on_piece(message["text"])
            return
        del self.asks[message["id"]]
        text, n = "".join(ask.pieces), len(ask.pieces)
        if kind == "done":
            ask.end(Outcome("websocket", DONE, text=text, pieces=n, status=kind,
                            final=message))
        elif kind == "error":
            ask.end(Outcome("websocket", ERROR, text=text, pieces=n, status=kind,
                            code=message.get("code"), final=message,
                            message=message.get("message", "")))
        else:
            ask.end(Outcome("websocket", CANCELLED, text=text, pieces=n, status=kind,
                            final=message))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"{code} {reason}"))
        asks, self.asks = self.asks, {}
        for ask in asks.values():
            ask.end(Outcome("websocket", LOST, text="".join(ask.pieces),
                            pieces=len(ask.pieces), status=code,
                            message=f"closed: {code} {reason}"))
        self.closed.callback((wasClean, code, reason))

    def send_json(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode("utf-8"))

    def ask(
        self,
        conversation_id: str,
        prompt: str,
        *,
        ask_id: Any = None,
        on_piece: Callable[[str], None] | None = None,
        **fields: Any,
    ) -> "Deferred[Outcome]":
        """Send an ask (with a fresh id unless given); fires with its outcome."""
        if ask_id is None:
            self._next_id += 1
            ask_id = f"a{self._next_id}"
        ask = _WSAsk(on_piece)
        self.asks[ask_id] = ask
        self.send_json({"type": "ask", "id": ask_id,
                        "conversation_id": conversation_id, "prompt": prompt, **fields})
        return ask.result

    def close(self) -> "Deferred[Any]":
        """Close cleanly (if still open); fires once the connection is gone."""
        if not self.closed.called:
            self.sendClose()
        return within(_chain(self.closed))


def _chain(d: Deferred[Any]) -> Deferred[Any]:
    """A new Deferred that fires with C{d}'s result, leaving C{d} as it is."""
    out: Deferred[Any] = Deferred()

    def passthrough(result: Any) -> Any:
        out.callback(result)
        return result

    d.addBoth(passthrough)
    return out


async def connect_ws(port: int, path: str = "/", timeout: float = 10.0) -> WSClient:
    """A L{WSClient} connected to C{ws://127.0.0.1:port/path}."""
    from twisted.internet import reactor

    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = WSClient
    factory.opened = Deferred()
    await within(clientFromString(reactor, f"tcp:127.0.0.1:{port}").connect(factory), timeout)
    return await within(factory.opened, timeout)


# --- gRPC ---------------------------------------------------------------------


class GrpcClient:
    """
    A channel to C{address} and a pool of C{threads} threads that read its
    streams (grpcio's client blocks), so that many streams can be open at
    once without using the reactor's own thread pool.  L{close} cancels
    every call still open.
    """

    def __init__(self, address: str, threads: int = 10) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = chat_pb2_grpc.ChatStub(self.channel)
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="grpc-client")
        self.pool.start()

    def stream(
        self,
        conversation_id: str,
        prompt: str,
        *,
        timeout: float = 30.0,
        metadata: Any = None,
        on_piece: Callable[[str], None] | None = None,
        **fields: Any,
    ) -> tuple[Any, "Deferred[Outcome]"]:
        """Start an C{Ask}; the call (to cancel it) and its outcome."""
        from twisted.internet import reactor

        call = self.stub.Ask(
            chat_pb2.AskRequest(prompt=prompt, conversation_id=conversation_id, **fields),
            timeout=timeout, metadata=metadata,
        )

        def read() -> Outcome:
            pieces: list[str] = []
            last = None
            try:
                for message in call:
                    if message.done:
                        last = message
                    else:
                        pieces.append(message.response)
                        if on_piece is not None:
                            reactor.callFromThread(on_piece, message.response)
            except grpc.RpcError as e:
                trailing = dict(e.trailing_metadata() or ())
                ended = CANCELLED if e.code() == grpc.StatusCode.CANCELLED else ERROR
                return Outcome("grpc", ended, text="".join(pieces), pieces=len(pieces),
                               code=trailing.get("error-code"), status=e.code().name,
                               final=trailing, message=e.details() or "")
            if last is None:
                return Outcome("grpc", LOST, text="".join(pieces), pieces=len(pieces),
                               status="OK", message="the stream ended with no final message")
            final = {
                "conversation_id": last.conversation_id,
                "message_id": last.message_id,
                "prompt_message_id": last.prompt_message_id,
                "model": last.model,
                "finish_reason": last.finish_reason,
                "total_tokens": last.usage.total_tokens,
            }
            return Outcome("grpc", DONE, text="".join(pieces), pieces=len(pieces),
                           status="OK", final=final)

        return call, deferToThreadPool(reactor, self.pool, read)

    def ask(self, conversation_id: str, prompt: str, **kw: Any) -> "Deferred[Outcome]":
        return self.stream(conversation_id, prompt, **kw)[1]

    def run(self, function: Callable[..., Any], *args: Any, **kw: Any) -> "Deferred[Any]":
        """Run a blocking call (a unary RPC, say) in the pool."""
        from twisted.internet import reactor

        return deferToThreadPool(reactor, self.pool, function, *args, **kw)

    def close(self) -> None:
        self.channel.close()
        self.pool.stop()


def raw_grpc(
    port: int,
    path: bytes,
    message: bytes,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    timeout: float = 10.0,
) -> dict[str, Any]:
    """
    One gRPC call over a bare HTTP/2 connection (the C{h2} package), with
    C{message} sent as it is and C{headers} (metadata) unchecked, so that
    a test can send what grpcio's own client refuses to: bytes that are not
    UTF-8 in a text metadata value, say.  Blocks: run it in a thread.

    @return: C{{"headers": [...], "messages": [bytes, ...], "trailers":
        {name: value}, "reset": error code or None}}.
    """
    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False,
    )
    connection = h2.connection.H2Connection(config)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        connection.initiate_connection()
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(stream_id, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
            (b":authority", b"127.0.0.1:%d" % port),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            *headers,
        ])
        connection.send_data(
            stream_id, b"\x00" + struct.pack(">I", len(message)) + message,
            end_stream=True,
        )
        sock.sendall(connection.data_to_send())
        result: dict[str, Any] = {"headers": [], "messages": [], "trailers": {},
                                  "reset": None}
        body = b""
        ended = False
        while not ended:
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    result["headers"] = event.headers
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    result["trailers"] = dict(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    result["reset"] = event.error_code
                    ended = True
                elif isinstance(event, (h2.events.StreamEnded,
                                        h2.events.ConnectionTerminated)):
                    ended = True
            sock.sendall(connection.data_to_send())
        while len(body) >= 5:
            (length,) = struct.unpack(">I", body[1:5])
            result["messages"].append(body[5:5 + length])
            body = body[5 + length:]
        if not result["trailers"] and result["headers"]:
            # a trailers-only answer: the status is in the headers
            result["trailers"] = {k: v for k, v in result["headers"]
                                  if k.startswith(b"grpc-")}
        return result
    finally:
        sock.close()


# --- the log -------------------------------------------------------------------


class LogCapture:
    """
    Every log event of this process while it is installed (L{install}), to
    assert on what an in-process server logged.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def install(self, testcase: Any) -> "LogCapture":
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)
        return self

    def failures(self) -> list[str]:
        """The text of every event logged with a failure (a traceback)."""
        return [
            formatEvent(e) + "\n" + e["log_failure"].getTraceback()
            for e in self.events if e.get("log_failure") is not None
        ] + [
            formatEvent(e) for e in self.events
            if e.get("isError") and e.get("log_failure") is None
        ]

    def access(self, **match: Any) -> list[dict[str, Any]]:
        """The access lines (their fields) that have every field of C{match}."""
        return [
            e["access"] for e in self.events
            if isinstance(e.get("access"), dict)
            and all(e["access"].get(k) == v for k, v in match.items())
        ]

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]
