"""
The OpenAI Chat Completions client: streams answers over treq.

L{OpenAIUpstream} implements L{easybackend.model.Upstream}.  It POSTs a
streaming request, parses the C{text/event-stream} body as it arrives and
passes each piece of text on at once.  It retries connection failures, 429
and 5xx answers with exponential backoff and jitter, but only until the first
piece was passed on: after that a retry would repeat text the client already
has.  It enforces three timeouts (response headers, the gap between two body
chunks, the whole answer), and cancelling its Deferred closes the upstream
TCP connection so the upstream stops generating, and billing, at once.
"""

from __future__ import annotations

import json
import random as _random
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar
from typing import Any, Callable

from hyperlink import EncodedURL
from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
)
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    _HTTP11ClientFactory,
)
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from treq.client import HTTPClient
from zope.interface import implementer

from easybackend import __version__
from easybackend.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from easybackend.model import ChatRequest, Completion, History, Usage
from easybackend.sse import SSEError, SSEParser

__all__ = ["OpenAIUpstream", "parse_retry_after"]

_log = Logger()

#: The failures of a request that mean "could not talk to the upstream".
_CONNECTION_ERRORS = (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    OSError,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
)
#: How much of a 2xx answer that is not an event stream we read.
_MAX_PLAIN_BODY = 4 << 20
#: Decodes one data line; bound once, as it runs for every chunk.
_decode = json.JSONDecoder().decode
#: After C{data: [DONE]}, how long we wait for the body to end, so that the
#: connection goes back to the pool before the answer is reported.
_DONE_GRACE = 1.0


@implementer(IBodyProducer)
class _BytesProducer:
    """
    Writes a request body at once, with no cooperator and so no global
    reactor and no extra reactor turn.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        consumer.write(self._body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class _NoCookies(CookieJar):
    """
    A cookie jar that keeps nothing.  The client serves every user of the
    server, so a cookie the upstream sets (a CDN's, say) must not go back
    with other users' requests; and an empty jar's bookkeeping still costs
    time on every request.
    """

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


class _ReadyURL(EncodedURL):
    """
    A URL already in URI form.  treq converts the URL of every request to
    that form (hyperlink's IDNA and percent encoding); for the one fixed URL
    of the API that is done once, here.
    """

    _text: str | None = None

    @classmethod
    def of(cls, url: EncodedURL) -> "_ReadyURL":
        uri = url.to_uri()
        return cls(
            scheme=uri.scheme,
            host=uri.host,
            path=uri.path,
            query=uri.query,
            fragment=uri.fragment,
            port=uri.port,
            rooted=uri.rooted,
            userinfo=uri.userinfo,
        )

    def to_uri(self) -> "_ReadyURL":
        return self

    def to_text(self, with_password: bool = False) -> str:
        if with_password:
            return super().to_text(with_password)
        if self._text is None:
            self._text = super().to_text()
        return self._text


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Twisted's standard endpoints (TCP for http, TLS over TCP for https), made
    once per origin instead of once per request: making one resolves the
    host's IDNA form and, for https, the TLS options.  The host name is
    still resolved at every new connection.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._tls = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(
                    self._tls.creatorForNetloc(uri.host, uri.port), endpoint
                )
            self._endpoints[key] = endpoint
        return endpoint


class _Connection(HTTP11ClientProtocol):
    """
    An upstream connection whose finished responses are freed at once.

    Twisted's response parser and its body decoder refer to each other (the
    decoder calls the parser back when the body ends).  Left as it is, that
    cycle keeps the request, the response and their headers, about 40
    objects an answer, until the cycle collector's next full collection: a
    pause that every answer in flight waits through, and that this garbage
    made two to three times longer under load.
    """

    def request(self, request: Any) -> "Deferred[Any]":
        """
        Send the request now, not at the reactor's next turn: Twisted's TCP
        transport keeps a write until then (see L{easybackend.writethrough}),
        so every answer's first piece waited for one more turn of the loop,
        a long one under load.  The headers and the body, written apart,
        still leave in one C{send}.
        """
        d = super().request(request)
        transport = self.transport
        if type(transport) is tcp.Client and transport.connected and not transport.disconnecting:
            # An error here is met again, and handled, at the reactor's own
            # write on its next turn: the socket stays registered for it.
            transport.doWrite()
        return d

    def _disconnectParser(self, reason: Failure) -> None:
        parser = self._parser
        super()._disconnectParser(reason)
        if parser is not None:
            # It is done: nothing reads its decoder any more.
            parser.bodyDecoder = None


class _ConnectionFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._quiescentCallback)


class _Pool(HTTPConnectionPool):
    """The persistent connection pool, of L{_Connection}s."""

    _factory = _ConnectionFactory


class _BodyReader(Protocol):
    """
    Receives a response body for L{_Call} and can close the connection it
    arrives on.
    """

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_end: Callable[[Failure], None],
    ) -> None:
        self._on_data = on_data
        self._on_end = on_end
        self._aborted = False
        self._on_closed: Callable[[], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        if not self._aborted:
            self._on_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._aborted:
            self._aborted = True
            self._on_end(reason)
        elif self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed()

    def abort(self, on_closed: Callable[[], None] | None = None) -> None:
        """
        Close the connection the body arrives on, and report nothing more
        but, if given, call C{on_closed} once the body is over.  Cancelling
        a Deferred that waits for the body would not close anything: the
        upstream would keep generating into a socket nobody reads.
        """
        self._aborted = True
        self._on_closed = on_closed
        if self.transport is not None:
            self.transport.stopProducing()


class OpenAIUpstream:
    """
    Streams chat completions from an OpenAI-compatible Chat Completions API.
    """

    def __init__(
        self,
        reactor: Any,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        *,
        headers_timeout: float | None = 30.0,
        idle_timeout: float | None = 60.0,
        total_timeout: float | None = 600.0,
        max_retries: int = 2,
        base_backoff: float = 0.5,
        max_backoff: float = 8.0,
        client: Any = None,
        random: Callable[[], float] = _random.random,
        max_error_body: int = 64 * 1024,
        max_connections_per_host: int = 128,
    ) -> None:
        """
        @param reactor: provides C{IReactorTime} and C{IReactorTCP}.
        @param base_url: the API root, C{/chat/completions} is appended.
        @param api_key: sent as C{Authorization: Bearer}, if given.
        @param headers_timeout: seconds from sending a request (connecting
            included) to the response headers.
        @param idle_timeout: the longest gap between two body chunks.
        @param total_timeout: seconds for the whole answer, retries included.
        @param max_retries: retries of connection failures, 429 and 5xx
            before the first piece; timeouts are not retried.
        @param base_backoff: the first retry waits about this long, each
            later one twice as long, up to C{max_backoff}; a C{Retry-After}
            replaces the computed wait, capped by C{max_backoff}.
        @param client: a treq C{HTTPClient} (or C{StubTreq}) to use instead
            of the default client over one persistent connection pool.
        @param random: returns a float in [0, 1) for the backoff jitter.
        @param max_error_body: how much of an error answer's body is read.
        @param max_connections_per_host: idle connections the pool keeps for
            reuse; as many as answers usually stream at once, so that a busy
            server does not open a new connection for most asks.
        """
        url = EncodedURL.from_text(base_url.rstrip("/") + "/chat/completions")
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL: {base_url!r}")
        self._reactor = reactor
        self._url = _ReadyURL.of(url)
        self._headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"text/event-stream"],
                b"User-Agent": [f"EasyBackend/{__version__}".encode("ascii")],
            }
        )
        if api_key:
            if not api_key.isascii():
                raise ValueError("api_key must be ASCII")
            self._headers.setRawHeaders(
                b"Authorization", [b"Bearer " + api_key.encode("ascii")]
            )
        self._headers_timeout = headers_timeout
        self._idle_timeout = idle_timeout
        self._total_timeout = total_timeout
        self._max_retries = max_retries
        self._base_backoff = base_backoff
        self._max_backoff = max_backoff
        self._random = random
        self._max_error_body = max_error_body
        self._pool: HTTPConnectionPool | None = None
        if client is None:
            self._pool = _Pool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = max_connections_per_host
            client = HTTPClient(
                Agent.usingEndpointFactory(reactor, _Endpoints(reactor), self._pool),
                cookiejar=_NoCookies(),
                data_to_body_producer=_BytesProducer,
            )
        self._client = client

    def stream_chat(
        self, request: ChatRequest, on_piece: Callable[[str], None]
    ) -> "Deferred[Completion]":
        """
        Stream the answer to C{request}; see L{easybackend.model.Upstream}.
        """
        return _Call(self, request, on_piece).start()

    def close(self) -> "Deferred[None]":
        """
        Close the idle persistent connections (answers in flight are not
        touched); fires once they are closed.
        """
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()


def _request_body(request: ChatRequest) -> bytes:
    """
    The JSON body of a streaming Chat Completions request; each message's
    JSON is made once (L{ChatMessage.json}, L{History.jsons}), however
    often it is sent.
    """
    payload: dict[str, Any] = {
        "model": request.model,
        "messages": None,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.max_tokens is not None:
        payload["max_tokens"] = request.max_tokens
    head, tail = json.dumps(
        payload, ensure_ascii=False, separators=(",", ":")).split('"messages":null', 1)
    messages = History.of(request.messages).json()
    return f'{head}"messages":[{messages}]{tail}'.encode("utf-8")


class _Call:
    """
    One L{OpenAIUpstream.stream_chat} call: its attempts, timers and state.

    Everything runs on the reactor thread.  C{_done} is set once the result
    Deferred has fired or was cancelled; from then on every event from the
    network is ignored.
    """

    def __init__(
        self,
        upstream: OpenAIUpstream,
        request: ChatRequest,
        on_piece: Callable[[str], None],
    ) -> None:
        self._upstream = upstream
        self._reactor = upstream._reactor
        self._on_piece = on_piece
        self._body = _request_body(request)
        self._model = request.model
        self.result: Deferred[Completion] = Deferred(self._cancel)
        self._done = False
        self._saw_done = False
        self._started = False
        self._retries = 0
        self._pieces: list[str] = []
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._status: int | None = None
        self._response_headers: Headers | None = None
        self._deadline: float | None = None
        self._pending: Deferred[Any] | None = None
        self._reader: _BodyReader | None = None
        self._parser = SSEParser()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._headers_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._total_call: IDelayedCall | None = None
        self._backoff_call: IDelayedCall | None = None
        self._grace_call: IDelayedCall | None = None
        self._report_call: IDelayedCall | None = None

    # --- attempts ---------------------------------------------------------

    def start(self) -> "Deferred[Completion]":
        total = self._upstream._total_timeout
        if total is not None:
            self._deadline = self._reactor.seconds() + total
            self._total_call = self._reactor.callLater(
                total,
                self._timed_out,
                f"upstream did not finish its answer within {total:g}s",
            )
        self._send()
        return self.result

    def _send(self) -> None:
        upstream = self._upstream
        timeout = upstream._headers_timeout
        if timeout is not None:
            self._headers_call = self._reactor.callLater(
                timeout,
                self._timed_out,
                f"upstream sent no response headers within {timeout:g}s",
            )
        try:
            d = upstream._client.request(
                "POST",
                upstream._url,
                headers=upstream._headers.copy(),
                data=self._body,
                unbuffered=True,
                allow_redirects=False,
            )
        except Exception:
            d = fail()
        self._pending = d
        d.addCallbacks(self._got_response, self._request_failed)
        d.addErrback(self._fail)

    def _request_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._done:
            return
        _cancel(self._headers_call)
        if failure.check(*_CONNECTION_ERRORS):
            error: UpstreamError = UpstreamUnavailable(
                f"could not reach upstream: {_describe(failure)}"
            )
        else:
            _log.warn("upstream request failed: {f!r}", f=failure.value)
            error = UpstreamError(f"upstream request failed: {_describe(failure)}")
        self._attempt_failed(error)

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        if self._done:
            return
        _cancel(self._headers_call)
        self._status = status = response.code
        headers = response.headers
        if 200 <= status < 300 and _is_event_stream(headers):
            self._parser = SSEParser()
            reader = _BodyReader(self._stream_data, self._stream_end)
        else:
            self._response_headers = headers
            self._buffer = []
            self._buffered = 0
            reader = _BodyReader(self._other_data, self._other_end)
        self._reader = reader
        idle = self._upstream._idle_timeout
        if idle is not None:
            self._idle_call = self._reactor.callLater(
                idle, self._timed_out, f"upstream stream stalled for {idle:g}s"
            )
        response.deliverBody(reader)

    def _attempt_failed(self, error: UpstreamError) -> None:
        """Retry after a backoff if C{error} allows it, else fail with it."""
        _cancel(self._headers_call)
        _cancel(self._idle_call)
        self._reader = None
        upstream = self._upstream
        if (
            not self._started
            and self._retries < upstream._max_retries
            and isinstance(error, (UpstreamRateLimited, UpstreamUnavailable))
        ):
            delay = self._backoff(error)
            if delay is not None:
                self._retries += 1
                _log.info(
                    "upstream failed ({error}); retry {n} of {max} in {delay:.3g}s",
                    error=error,
                    n=self._retries,
                    max=upstream._max_retries,
                    delay=delay,
                )
                self._backoff_call = self._reactor.callLater(delay, self._retry)
                return
        self._fail(error)

    def _backoff(self, error: UpstreamError) -> float | None:
        """
        How long to wait before the next attempt, or C{None} when the wait
        would run past the total timeout.
        """
        upstream = self._upstream
        if error.retry_after is not None:
            delay = min(max(error.retry_after, 0.0), upstream._max_backoff)
        else:
            cap = min(
                upstream._max_backoff, upstream._base_backoff * 2**self._retries
            )
            delay = cap * (0.5 + 0.5 * upstream._random())
        if self._deadline is not None and (
            self._reactor.seconds() + delay >= self._deadline
        ):
            return None
        return delay

    def _retry(self) -> None:
        self._backoff_call = None
        if not self._done:
            self._send()

    # --- the event stream: the hot path -----------------------------------

    def _stream_data(self, data: bytes) -> None:
        if self._done or self._saw_done:
            return
        if self._idle_call is not None:
            self._idle_call.reset(self._upstream._idle_timeout)
        try:
            events = self._parser.feed(data)
        except SSEError as e:
            self._fail(UpstreamError(f"upstream sent a broken event stream: {e}"))
            return
        for event in events:
            payload = event.data
            if payload == "[DONE]":
                self._got_done()
                return
            try:
                chunk = _decode(payload)
            except ValueError:
                if event.event == "error":
                    chunk = payload
                else:
                    self._fail(
                        UpstreamError(
                            "upstream sent malformed JSON in its stream: "
                            + _snippet(payload)
                        )
                    )
                    return
            if event.event == "error":
                self._fail(UpstreamError(f"upstream error: {_error_text(chunk)}"))
                return
            self._chunk(chunk)
            if self._done:
                return

    def _chunk(self, chunk: Any) -> None:
        """Take what one C{chat.completion.chunk} object carries."""
        content = None
        try:
            error = chunk.get("error")
            if error is not None:
                self._fail(UpstreamError(f"upstream error: {_error_text(error)}"))
                return
            choices = chunk.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content")
                reason = choice.get("finish_reason")
                if reason:
                    self._finish_reason = reason
            model = chunk.get("model")
            if model:
                self._model = model
            usage = chunk.get("usage")
            if usage:
                self._usage = _usage(usage)
        except (AttributeError, TypeError, ValueError, KeyError):
            self._fail(
                UpstreamError(
                    "upstream sent a chunk of an unexpected shape: "
                    + _snippet(json.dumps(chunk))
                )
            )
            return
        if content and type(content) is str:
            self._pieces.append(content)
            self._started = True
            try:
                self._on_piece(content)
            except Exception:
                self._fail(Failure())

    def _got_done(self) -> None:
        """
        C{data: [DONE]}: the answer is complete.  Report it once the body
        ends, which it does at once (in the same read, usually): by then
        the pool has the connection back for the next request.
        """
        self._saw_done = True
        _cancel(self._idle_call)
        _cancel(self._total_call)
        self._grace_call = self._reactor.callLater(_DONE_GRACE, self._grace_expired)

    def _grace_expired(self) -> None:
        """The body did not end after C{[DONE]}: close it, keep the answer."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.abort()
        self._succeed()

    def _stream_end(self, reason: Failure) -> None:
        self._reader = None
        if self._done:
            return
        if self._saw_done:
            self._succeed()
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            error = UpstreamError("upstream stream ended before [DONE]")
        elif self._started:
            error = UpstreamError(
                f"upstream connection lost mid-answer: {_describe(reason)}"
            )
        else:
            error = UpstreamUnavailable(
                "upstream connection lost before the answer started: "
                + _describe(reason)
            )
        self._attempt_failed(error)

    # --- answers that are not an event stream -----------------------------

    def _other_data(self, data: bytes) -> None:
        if self._done:
            return
        if self._idle_call is not None:
            self._idle_call.reset(self._upstream._idle_timeout)
        status = self._status or 0
        limit = _MAX_PLAIN_BODY if 200 <= status < 300 else (
            self._upstream._max_error_body
        )
        room = limit - self._buffered
        self._buffer.append(data[:room])
        self._buffered += min(len(data), room)
        if self._buffered >= limit:
            # Enough to explain the failure: stop reading.
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.abort()
            self._other_complete()

    def _other_end(self, reason: Failure) -> None:
        self._reader = None
        if not self._done:
            self._other_complete()

    def _other_complete(self) -> None:
        _cancel(self._idle_call)
        body = b"".join(self._buffer)
        self._buffer = []
        status = self._status or 0
        headers = self._response_headers or Headers()
        if 200 <= status < 300:
            self._plain_answer(body, headers)
            return
        text = f"upstream answered HTTP {status}: {_error_message(body, status)}"
        retry_after = parse_retry_after(headers, self._reactor.seconds())
        if status == 429:
            error: UpstreamError = UpstreamRateLimited(text, status, retry_after)
        elif status >= 500:
            error = UpstreamUnavailable(text, status, retry_after)
        else:
            error = UpstreamError(text, status, retry_after)
        self._attempt_failed(error)

    def _plain_answer(self, body: bytes, headers: Headers) -> None:
        """
        A 2xx answer that is not an event stream: an upstream that ignored
        C{"stream": true} and sent a whole C{chat.completion}, or an error.
        """
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            if answer.get("error") is not None:
                self._fail(
                    UpstreamError(
                        f"upstream error: {_error_text(answer['error'])}",
                        self._status,
                    )
                )
                return
            try:
                choice = answer["choices"][0]
                content = choice["message"].get("content") or ""
                self._finish_reason = choice.get("finish_reason")
                self._model = answer.get("model") or self._model
                if answer.get("usage"):
                    self._usage = _usage(answer["usage"])
            except (AttributeError, TypeError, ValueError, KeyError, IndexError):
                pass
            else:
                if content and type(content) is str:
                    self._pieces.append(content)
                    self._started = True
                    try:
                        self._on_piece(content)
                    except Exception:
                        self._fail(Failure())
                        return
                self._succeed()
                return
        kind = b", ".join(headers.getRawHeaders(b"content-type", [b"no type"]))
        self._fail(
            UpstreamError(
                f"upstream answered HTTP {self._status} with "
                f"{kind.decode('latin-1')} instead of an event stream",
                self._status,
            )
        )

    # --- endings ----------------------------------------------------------

    def _succeed(self) -> None:
        self._done = True
        for call in (
            self._headers_call, self._idle_call, self._total_call,
            self._backoff_call, self._grace_call,
        ):
            _cancel(call)
        self.result.callback(
            Completion(
                text="".join(self._pieces),
                model=self._model,
                finish_reason=self._finish_reason,
                usage=self._usage,
                retries=self._retries,
                status=self._status,
            )
        )

    def _timed_out(self, message: str) -> None:
        self._fail(UpstreamTimeout(message))

    def _fail(self, error: Exception | Failure) -> None:
        if self._done:
            return
        reader, self._reader = self._reader, None
        self._stop()
        if reader is None:
            self.result.errback(error)
            return
        # Report the failure once the body is over: after a close we asked
        # for, or at once when the rest of the body was in the same read.
        # Either way the connection is closed, or back in the pool, before
        # the caller hears of it (and may close the pool).
        self._report_call = self._reactor.callLater(
            _DONE_GRACE, self._report, error
        )
        reader.abort(lambda: self._report(error))

    def _report(self, error: Exception | Failure) -> None:
        _cancel(self._report_call)
        if not self.result.called:
            self.result.errback(error)

    def _cancel(self, result: "Deferred[Completion]") -> None:
        """The result's canceller: stop everything; the Deferred then fails."""
        if not self._done:
            self._stop()
        _cancel(self._report_call)

    def _stop(self) -> None:
        """Mark the call done, cancel its timers, close its connection."""
        self._done = True
        for call in (
            self._headers_call, self._idle_call, self._total_call,
            self._backoff_call, self._grace_call,
        ):
            _cancel(call)
        pending, self._pending = self._pending, None
        if pending is not None:
            # Before the headers: the Agent aborts the connection.
            pending.cancel()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.abort()


# --- helpers ----------------------------------------------------------------


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


def _is_event_stream(headers: Headers) -> bool:
    types = headers.getRawHeaders(b"content-type")
    if not types:
        return True
    return b"event-stream" in types[-1].lower()


def _describe(failure: Failure) -> str:
    """A failure's message, looking inside Twisted's wrapper exceptions."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(
            r.getErrorMessage() if isinstance(r, Failure) else str(r)
            for r in reasons
        )
    return failure.getErrorMessage() or type(failure.value).__name__


def _snippet(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _error_text(error: Any) -> str:
    """The message of an OpenAI error object (or of whatever came instead)."""
    if isinstance(error, dict):
        inner = error.get("error")
        if isinstance(inner, dict):
            error = inner
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
        return _snippet(json.dumps(error))
    if isinstance(error, str) and error:
        return error
    return _snippet(json.dumps(error))


def _error_message(body: bytes, status: int) -> str:
    """OpenAI's C{{"error": {"message": ...}}} if the body has it."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str) and error:
            return error
        if isinstance(parsed.get("message"), str):
            return parsed["message"]
    text = " ".join(body.decode("utf-8", "replace").split())
    if text:
        return _snippet(text)
    return RESPONSES.get(status, b"error").decode("latin-1")


def _usage(usage: Any) -> Usage:
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        total_tokens=int(usage.get("total_tokens") or 0),
    )


def parse_retry_after(headers: Headers, now: float) -> float | None:
    """
    Seconds to wait according to C{retry-after-ms} or C{Retry-After} (delay
    seconds or an HTTP date, compared with C{now}), or C{None}.
    """
    values = headers.getRawHeaders(b"retry-after-ms")
    if values:
        try:
            return max(0.0, float(values[-1]) / 1000.0)
        except ValueError:
            pass
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    value = values[-1].decode("latin-1").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
