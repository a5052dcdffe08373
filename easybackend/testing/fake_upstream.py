"""
A fake OpenAI-compatible upstream: a Twisted web server answering like the
Chat Completions API, with scriptable faults.

The tests of every transport run against it, and so does the benchmark (run
it as a process: C{python -m easybackend.testing.fake_upstream --port 8100
--pieces 20 --interval 0.01} prints the port it listens on once ready).

It answers C{POST <base>/chat/completions} (streamed as
C{text/event-stream} chunks shaped exactly like OpenAI's
C{chat.completion.chunk} objects, or as one C{chat.completion} object when
C{"stream"} is not true) and C{GET <base>/models}.  The default answer is
deterministic and depends on the request: C{"You said: <last user message>
(<n> messages received)"}, split into pieces.  Scenarios (L{Stream},
L{Status}, L{Hang}, L{Reset}) queued with L{FakeUpstream.script} shape the
next answers; the rest get L{FakeUpstream.default}.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from typing import Any, Callable, Iterable, Sequence, Union

from attrs import define, field, frozen
from attrs.validators import in_
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = [
    "FakeUpstream",
    "Hang",
    "ReceivedRequest",
    "Reset",
    "Scenario",
    "Status",
    "Stream",
    "answer_text",
    "main",
    "split_text",
]

#: The faults a L{Stream} can end with, see L{Stream.fault}.
FAULTS = ("error", "malformed", "hang", "drop", "reset", "no_done")
#: What the fake says its backend configuration is.
SYSTEM_FINGERPRINT = "fp_fake0001"


# --- scenarios -------------------------------------------------------------


@frozen
class Stream:
    """
    Answer normally, optionally with a fault.

    @ivar pieces: how many pieces (content chunks) the answer is split into
        (fewer when the text is shorter, or C{max_tokens} is lower).
    @ivar interval: seconds between two writes (C{reactor.callLater}).
    @ivar text: the answer text, instead of the default echo.
    @ivar newline: the line end on the wire: C{"\\n"} (as OpenAI),
        C{"\\r\\n"} or C{"\\r"}.
    @ivar keepalive: write a C{": keep-alive"} comment before every event.
    @ivar chunk_size: cut the whole body into writes of this many bytes
        (1 splits inside every multi-byte character and every CRLF).
    @ivar split_at: called with the whole body, returns the byte offsets to
        cut it at, one write per part.
    @ivar fault: C{None} for a complete answer, or after C{fault_after}
        pieces: C{"error"} (an C{{"error": ...}} object, then a clean end),
        C{"malformed"} (a data line that is not JSON, then the rest),
        C{"hang"} (write nothing more, keep the connection open),
        C{"drop"} (close the connection: the chunked body is cut short),
        C{"reset"} (reset the connection); or C{"no_done"}: the whole answer
        and a clean end, but no C{data: [DONE]}.
    @ivar fault_after: how many pieces are sent before the fault.
    @ivar finish_reason: the final chunk's C{finish_reason}.
    """

    pieces: int = 5
    interval: float = 0.0
    text: str | None = None
    newline: str = field(default="\n", validator=in_(("\n", "\r\n", "\r")))
    keepalive: bool = False
    chunk_size: int | None = None
    split_at: Callable[[bytes], Iterable[int]] | None = None
    fault: str | None = field(default=None, validator=in_(FAULTS + (None,)))
    fault_after: int = 0
    finish_reason: str = "stop"


@frozen
class Status:
    """
    Answer with an HTTP error status and OpenAI's error object (or C{body}).

    @ivar retry_after: the C{Retry-After} header value, if any.
    """

    code: int
    message: str | None = None
    retry_after: str | None = None
    body: bytes | None = None
    content_type: str = "application/json"


@frozen
class Hang:
    """Read the request and never answer: no status line, no headers."""


@frozen
class Reset:
    """
    Reset the TCP connection (RST) instead of answering; with
    C{after_headers}, once the 200 headers are sent, before the first chunk.
    """

    after_headers: bool = False


Scenario = Union[Stream, Status, Hang, Reset]


@define(eq=False)
class ReceivedRequest:
    """
    One request the fake received.

    @ivar headers: the request headers, names lower-cased, last value.
    @ivar body: the decoded JSON body, or C{None}.
    @ivar scenario: the scenario it was answered with (chat requests only).
    @ivar connection: a number for the TCP connection it came on, counting
        from 1 (0 when not served by L{FakeUpstream.listen}).
    @ivar connection_lost: fires (with C{None}) once the TCP connection it
        came on is closed, by either side.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    scenario: Scenario | None
    connection: int = 0
    connection_lost: "Deferred[None]" = field(factory=Deferred, repr=False)


# --- the answer --------------------------------------------------------------


def _text(content: Any) -> str:
    """The text of a message's content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def answer_text(body: Any) -> str:
    """The fake's default answer to a Chat Completions request body."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        messages = []
    last = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            last = _text(message.get("content"))
            break
    n = len(messages)
    return f"You said: {last} ({n} message{'' if n == 1 else 's'} received)"


def split_text(text: str, pieces: int) -> list[str]:
    """
    Split C{text} into C{pieces} non-empty pieces of nearly equal length
    (fewer when C{text} is shorter).
    """
    n = max(0, min(pieces, len(text)))
    if n == 0:
        return []
    size, extra = divmod(len(text), n)
    result = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        result.append(text[start:end])
        start = end
    return result


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    )


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    """Deterministic token counts, shaped like OpenAI's usage object."""
    messages = body.get("messages") or []
    prompt = 3 + sum(
        4 + len(_text(m.get("content")).split())
        for m in messages
        if isinstance(m, dict)
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _error_body(message: str, kind: str, code: str | None = None) -> bytes:
    return _dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    )


_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: (
        "Incorrect API key provided: sk-fake. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    ),
    403: ("You are not allowed to sample from this model",
          "invalid_request_error", None),
    404: ("The model does not exist or you do not have access to it.",
          "invalid_request_error", "model_not_found"),
    429: ("Rate limit reached for requests. Please try again later.",
          "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. "
          "Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.",
          "server_error", None),
}


def _reset(transport: Any) -> None:
    """Close with a TCP reset: SO_LINGER 0, once pending writes are out."""
    try:
        transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    except Exception:
        transport.abortConnection()
    else:
        transport.loseConnection()


class _Writer:
    """Writes a streamed answer, paced by the reactor, and ends it."""

    def __init__(
        self,
        reactor: Any,
        request: Request,
        writes: list[bytes],
        interval: float,
        paced: bool,
        ending: str,
    ) -> None:
        self._reactor = reactor
        self._request = request
        self._writes = writes
        self._interval = interval
        self._paced = paced
        self._ending = ending
        self._index = 0
        self._call: Any = None
        self._stopped = False

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._lost)
        self._next()

    def _lost(self, reason: Failure) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _next(self) -> None:
        self._call = None
        writes = self._writes
        while not self._stopped and self._index < len(writes):
            self._request.write(writes[self._index])
            self._index += 1
            if self._paced and self._index < len(writes):
                self._call = self._reactor.callLater(self._interval, self._next)
                return
        if self._stopped:
            return
        channel = self._request.channel
        if self._ending == "finish":
            self._request.finish()
        elif self._ending == "drop" and channel is not None:
            channel.transport.loseConnection()
        elif self._ending == "reset" and channel is not None:
            _reset(channel.transport)
        # "hang": leave the connection open, write nothing more


# --- the server ---------------------------------------------------------------


class _Channel(HTTPChannel):
    """An HTTP connection that tells the fake when it opens and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.number = 0
        self.records: list[ReceivedRequest] = []
        self.lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.fake._opened(self)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.site.fake._closed(self)
        for record in self.records:
            _fire(record.connection_lost)
        waiters, self.lost_waiters = self.lost_waiters, []
        for d in waiters:
            d.callback(None)


class _Site(Site):
    protocol = _Channel
    fake: "FakeUpstream"

    def log(self, request: Request) -> None:
        """No access log: the benchmark should measure the server under test."""


class _Root(Resource):
    isLeaf = True

    def __init__(self, fake: "FakeUpstream") -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> Any:
        return self._fake._render(request)


def _fire(d: "Deferred[None]") -> None:
    if not d.called:
        d.callback(None)


@define(eq=False)
class FakeUpstream:
    """
    A fake OpenAI Chat Completions server.

    @ivar reactor: provides C{IReactorTime} (and C{IReactorTCP} to listen).
    @ivar default: the scenario for requests nothing was scripted for.
    @ivar api_key: when set, requests must send C{Authorization: Bearer} it.
    @ivar record: keep every request in L{requests} (off for benchmarks).
    @ivar requests: the requests received, in order.
    """

    reactor: Any
    default: Scenario = field(factory=Stream)
    api_key: str | None = None
    models: Sequence[str] = ("gpt-4o-mini", "gpt-4o")
    record: bool = True
    requests: list[ReceivedRequest] = field(factory=list, init=False)
    _script: list[Scenario] = field(factory=list, init=False)
    _waiters: dict[int, list[Deferred[ReceivedRequest]]] = field(
        factory=dict, init=False
    )
    _port: IListeningPort | None = field(default=None, init=False)
    _listening: bool = field(default=False, init=False)
    _channels: set[_Channel] = field(factory=set, init=False)
    _connections: int = field(default=0, init=False)
    _answers: int = field(default=0, init=False)

    # --- API for tests ------------------------------------------------------

    def script(self, *scenarios: Scenario) -> None:
        """Answer the next chat requests with C{scenarios}, in order."""
        self._script.extend(scenarios)

    def resource(self) -> IResource:
        """The web resource, e.g. to serve through C{treq.testing.StubTreq}."""
        return _Root(self)

    def listen(self, endpoint_or_port: Any = 0) -> "Deferred[IListeningPort]":
        """
        Listen on a TCP port of 127.0.0.1 (0: any free one) or on a server
        endpoint; fires with the listening port.
        """
        if isinstance(endpoint_or_port, int):
            endpoint: Any = TCP4ServerEndpoint(
                self.reactor, endpoint_or_port, interface="127.0.0.1"
            )
        else:
            endpoint = endpoint_or_port
        site = _Site(self.resource(), reactor=self.reactor)
        site.fake = self

        def listening(port: IListeningPort) -> IListeningPort:
            self._port = port
            self._listening = True
            return port

        return endpoint.listen(site).addCallback(listening)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream.listen() has not succeeded")
        return self._port.getHost().port  # type: ignore[attr-defined, no-any-return]

    @property
    def base_url(self) -> str:
        """The API root to configure clients with, C{http://host:port/v1}."""
        if self._port is None:
            raise RuntimeError("FakeUpstream.listen() has not succeeded")
        host = self._port.getHost()
        return f"http://{host.host}:{host.port}/v1"  # type: ignore[attr-defined]

    def wait_for_request(self, index: int) -> "Deferred[ReceivedRequest]":
        """Fires with the C{index}th request (from 0) once it was received."""
        if index < len(self.requests):
            return succeed(self.requests[index])
        d: Deferred[ReceivedRequest] = Deferred()
        self._waiters.setdefault(index, []).append(d)
        return d

    @property
    def open_connections(self) -> int:
        return len(self._channels)

    def stop(self) -> "Deferred[None]":
        """
        Stop listening and close every connection; fires once all are closed.
        L{base_url} still names the address, now refusing connections.
        """
        results: list[Deferred[Any]] = []
        if self._port is not None and self._listening:
            self._listening = False
            results.append(maybeDeferred(self._port.stopListening))
        for channel in list(self._channels):
            d: Deferred[None] = Deferred()
            channel.lost_waiters.append(d)
            results.append(d)
            channel.transport.abortConnection()
        return gatherResults(results).addCallback(lambda _: None)

    # --- connections ------------------------------------------------------

    def _opened(self, channel: _Channel) -> None:
        self._connections += 1
        channel.number = self._connections
        self._channels.add(channel)

    def _closed(self, channel: _Channel) -> None:
        self._channels.discard(channel)

    # --- requests ---------------------------------------------------------

    def _render(self, request: Request) -> Any:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("latin-1")
        raw = request.content.read() if request.content is not None else b""
        body: Any = None
        parsed = True
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                parsed = False
        # api.openai.com answers through Cloudflare, which sets a bot
        # management cookie on every answer; a client must not send it back
        # on other users' requests.
        request.addCookie(
            b"__cf_bm", b"fake-%d" % len(self.requests), path=b"/", httpOnly=True
        )
        is_chat = path.endswith("/chat/completions")
        scenario: Scenario | None = None
        if is_chat and method == "POST":
            scenario = self._script.pop(0) if self._script else self.default
        record = self._received(request, method, path, body, scenario)
        if is_chat:
            if method != "POST":
                return self._error(
                    request, 405, f"Invalid method for URL ({method} {path})"
                )
            return self._chat(request, body, parsed, scenario, record)
        if path.endswith("/models") and method == "GET":
            denied = self._check_key(request)
            if denied is not None:
                return denied
            request.setHeader(b"content-type", b"application/json")
            return _dumps(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": model,
                            "object": "model",
                            "created": 1686935002,
                            "owned_by": "system",
                        }
                        for model in self.models
                    ],
                }
            )
        return self._error(request, 404, f"Invalid URL ({method} {path})")

    def _received(
        self,
        request: Request,
        method: str,
        path: str,
        body: Any,
        scenario: Scenario | None,
    ) -> ReceivedRequest:
        channel = request.channel
        record = ReceivedRequest(
            method=method,
            path=path,
            headers={
                name.decode("latin-1").lower(): values[-1].decode("latin-1")
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            body=body,
            scenario=scenario,
            connection=getattr(channel, "number", 0),
        )
        if not self.record:
            return record
        if isinstance(channel, _Channel):
            channel.records.append(record)
        request.notifyFinish().addErrback(lambda _: _fire(record.connection_lost))
        self.requests.append(record)
        for d in self._waiters.pop(len(self.requests) - 1, []):
            d.callback(record)
        return record

    def _error(
        self,
        request: Request,
        code: int,
        message: str,
        kind: str = "invalid_request_error",
        error_code: str | None = None,
    ) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return _error_body(message, kind, error_code)

    def _check_key(self, request: Request) -> bytes | None:
        if self.api_key is None:
            return None
        given = request.getHeader(b"authorization")
        if given is None:
            return self._error(
                request,
                401,
                "You didn't provide an API key. You need to provide your API "
                "key in an Authorization header using Bearer auth.",
            )
        if given != b"Bearer " + self.api_key.encode("ascii"):
            return self._error(
                request, 401, _STATUS_ERRORS[401][0], error_code="invalid_api_key"
            )
        return None

    def _chat(
        self,
        request: Request,
        body: Any,
        parsed: bool,
        scenario: Scenario | None,
        record: ReceivedRequest,
    ) -> Any:
        if isinstance(scenario, Hang):
            return NOT_DONE_YET
        if isinstance(scenario, Reset):
            if scenario.after_headers:
                request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
                request.write(b"")
            _reset(request.channel.transport)
            return NOT_DONE_YET
        if isinstance(scenario, Status):
            return self._status(request, scenario)
        assert isinstance(scenario, Stream)
        denied = self._check_key(request)
        if denied is not None:
            return denied
        if not parsed or not isinstance(body, dict):
            return self._error(
                request,
                400,
                "We could not parse the JSON body of your request.",
            )
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self._error(request, 400, "you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._error(
                request, 400, "Missing required parameter: 'messages'."
            )

        text = answer_text(body) if scenario.text is None else scenario.text
        pieces = split_text(text, scenario.pieces)
        finish_reason = scenario.finish_reason
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if type(limit) is int and 0 < limit < len(pieces):
            pieces = pieces[:limit]
            finish_reason = "length"
        self._answers += 1
        ident = f"chatcmpl-fake{self._answers:020d}"
        created = int(self.reactor.seconds())
        model = body["model"]
        usage = _usage(body, len(pieces))

        if body.get("stream") is not True:
            request.setHeader(b"content-type", b"application/json")
            return _dumps(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "".join(pieces),
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                }
            )

        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        writes, ending = _stream_writes(
            scenario, ident, created, model, pieces, finish_reason,
            usage if include_usage else None,
        )
        paced = scenario.interval > 0
        if scenario.chunk_size or scenario.split_at:
            whole = b"".join(writes)
            if scenario.chunk_size:
                offsets: Iterable[int] = range(
                    scenario.chunk_size, len(whole), scenario.chunk_size
                )
            else:
                assert scenario.split_at is not None
                offsets = scenario.split_at(whole)
            cuts = [0] + sorted({o for o in offsets if 0 < o < len(whole)})
            cuts.append(len(whole))
            writes = [whole[a:b] for a, b in zip(cuts, cuts[1:])]
            paced = True
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-request-id", f"req_fake{self._answers:020d}".encode())
        _Writer(
            self.reactor, request, writes, scenario.interval, paced, ending
        ).start()
        return NOT_DONE_YET

    def _status(self, request: Request, scenario: Status) -> bytes:
        request.setResponseCode(scenario.code)
        request.setHeader(b"content-type", scenario.content_type.encode("latin-1"))
        if scenario.retry_after is not None:
            request.setHeader(b"retry-after", scenario.retry_after.encode("latin-1"))
        if scenario.body is not None:
            return scenario.body
        message, kind, code = _STATUS_ERRORS.get(
            scenario.code, ("Request failed.", "server_error", None)
        )
        return _error_body(scenario.message or message, kind, code)


def _stream_writes(
    scenario: Stream,
    ident: str,
    created: int,
    model: str,
    pieces: list[str],
    finish_reason: str,
    usage: dict[str, Any] | None,
) -> tuple[list[bytes], str]:
    """
    The writes of a streamed answer (one per event, the end joined to the
    last piece) and how the response ends: C{"finish"}, C{"hang"},
    C{"drop"} or C{"reset"}.
    """
    nl = scenario.newline.encode("ascii")
    end_of_event = nl + nl
    keep = b": keep-alive" + end_of_event if scenario.keepalive else b""
    head = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def event(value: Any) -> bytes:
        return keep + b"data: " + _dumps(value) + end_of_event

    def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
        value = dict(head)
        value["choices"] = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        ]
        if usage is not None:
            value["usage"] = None
        return event(value)

    role = chunk({"role": "assistant", "content": "", "refusal": None}, None)
    content = [chunk({"content": piece}, None) for piece in pieces]
    end = chunk({}, finish_reason)
    if usage is not None:
        end += event(dict(head, choices=[], usage=usage))
    done = keep + b"data: [DONE]" + end_of_event

    fault = scenario.fault
    k = min(max(scenario.fault_after, 0), len(content))
    ending = "finish"
    if fault is None:
        writes, tail = [role, *content], end + done
    elif fault == "no_done":
        writes, tail = [role, *content], end
    elif fault == "malformed":
        broken = keep + b'data: {"id": "' + ident.encode() + b'", "choices": [' + end_of_event
        writes, tail = [role, *content[:k], broken, *content[k:]], end + done
    elif fault == "error":
        writes = [role, *content[:k]]
        tail = event(
            {
                "error": {
                    "message": "The server had an error while processing your "
                    "request. Sorry about that!",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    else:
        writes, tail, ending = [role, *content[:k]], b"", fault
    writes[-1] += tail
    return writes, ending


# --- as a process ---------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake until killed; print the listening port once ready."""
    parser = argparse.ArgumentParser(
        prog="python -m easybackend.testing.fake_upstream",
        description="A fake OpenAI Chat Completions server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--pieces", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between two pieces")
    parser.add_argument("--api-key", default=None,
                        help="require this key as Authorization: Bearer")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    fake = FakeUpstream(
        reactor,
        default=Stream(pieces=args.pieces, interval=args.interval),
        api_key=args.api_key,
        record=False,
    )
    failed: list[Failure] = []

    def ready(port: IListeningPort) -> None:
        print(port.getHost().port, flush=True)  # type: ignore[attr-defined]

    def failed_to_listen(failure: Failure) -> None:
        failed.append(failure)
        print(f"cannot listen: {failure.getErrorMessage()}", file=sys.stderr)
        reactor.stop()  # type: ignore[attr-defined]

    endpoint = TCP4ServerEndpoint(reactor, args.port, interface=args.host)
    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: fake.listen(endpoint).addCallbacks(ready, failed_to_listen)
    )
    reactor.run()  # type: ignore[attr-defined]
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
