"""
Tests for L{easybackend.upstream.OpenAIUpstream}.

The first half runs in memory: L{FakeUpstream}'s resource behind
C{treq.testing.StubTreq}, every timer on a L{Clock}, so retries, backoff and
timeouts are checked at exact times.  The second half runs over real
loopback sockets against a listening L{FakeUpstream}: streaming, every fault
scenario, and cancellation closing the upstream connection.
"""

from __future__ import annotations

import gc
import os

import socket
from email.utils import formatdate
from typing import Any, Callable

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web._newclient import HTTPClientParser
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from easybackend.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from easybackend.model import ChatMessage, ChatRequest, Completion, History, Usage, message_json
from easybackend.testing.fake_upstream import (
    FakeUpstream,
    Hang,
    Reset,
    Status,
    Stream,
    answer_text,
    split_text,
)
from easybackend.upstream import OpenAIUpstream, _Endpoints, parse_retry_after

REQUEST = ChatRequest(
    model="gpt-4o-mini",
    messages=[ChatMessage("system", "Be brief."), ChatMessage("user", "Hello")],
)
#: The fake's default answer to REQUEST, in its default 5 pieces.
PIECES = split_text(
    answer_text({"messages": [m.to_dict() for m in REQUEST.messages]}), 5
)
#: Bounded wait for real-socket events.
WAIT = 10.0


def after_events(n: int) -> Callable[[bytes], list[int]]:
    """
    A L{Stream.split_at} that writes the first C{n} events (the role chunk
    is the first) at once, and the rest in one later write.
    """

    def split_at(body: bytes) -> list[int]:
        offset = 0
        for _ in range(n):
            offset = body.index(b"\n\n", offset) + 2
        return [offset]

    return split_at


# --- in memory ---------------------------------------------------------------


class Harness:
    """
    An L{OpenAIUpstream} talking to a L{FakeUpstream} in memory, with one
    L{Clock} for both.
    """

    def __init__(self, client: Any = None, **settings: Any) -> None:
        self.clock = Clock()
        self.fake = FakeUpstream(self.clock)
        self.stub = StubTreq(self.fake.resource())
        settings.setdefault("random", lambda: 0.5)
        settings.setdefault("headers_timeout", 10.0)
        settings.setdefault("idle_timeout", 10.0)
        settings.setdefault("total_timeout", 100.0)
        settings.setdefault("base_backoff", 1.0)
        settings.setdefault("max_backoff", 10.0)
        self.upstream = OpenAIUpstream(
            self.clock,
            "http://upstream.test/v1",
            api_key="sk-test",
            client=self.stub if client is None else client,
            **settings,
        )
        self.pieces: list[str] = []
        #: clock times at which the fake received requests
        self.arrivals: list[float] = []

    def ask(
        self,
        request: ChatRequest = REQUEST,
        on_piece: Callable[[str], None] | None = None,
    ) -> "Deferred[Completion]":
        d = self.upstream.stream_chat(request, on_piece or self.pieces.append)
        self.flush()
        return d

    def flush(self) -> None:
        self.stub.flush()
        while len(self.arrivals) < len(self.fake.requests):
            self.arrivals.append(self.clock.seconds())

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Advance the clock by C{seconds}, moving bytes after each step."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.flush()


class RetryTests(SynchronousTestCase):
    """Retries, backoff and Retry-After, at exact clock times."""

    def test_retries_5xx_with_exponential_backoff(self) -> None:
        """
        When the upstream answers 503 then 500 then streams, then the client
        retries after 0.75s then 1.5s (base 1s doubling, jitter 0.5 of the
        upper half) and succeeds, counting two retries.
        """
        h = Harness(max_retries=3)
        h.fake.script(Status(503), Status(500), Stream())
        d = h.ask()
        h.advance(5)
        completion = self.successResultOf(d)
        self.assertEqual(h.arrivals, [0.0, 0.75, 2.25])
        self.assertEqual(completion.retries, 2)
        self.assertEqual(h.pieces, PIECES)

    def test_backoff_is_capped_and_jittered(self) -> None:
        """
        When retries go on, then each wait doubles up to C{max_backoff}, and
        the jitter picks a wait between half and all of it.
        """
        for jitter, expected in [
            (0.0, [0.0, 0.5, 1.5, 2.5, 3.5]),
            (0.5, [0.0, 0.75, 2.25, 3.75, 5.25]),
        ]:
            h = Harness(
                max_retries=4, base_backoff=1.0, max_backoff=2.0,
                random=lambda: jitter,
            )
            h.fake.script(*[Status(503)] * 4)
            d = h.ask()
            h.advance(10)
            self.successResultOf(d)
            self.assertEqual(h.arrivals, expected, jitter)

    def test_retry_after_replaces_backoff(self) -> None:
        """
        When a 429 carries C{Retry-After: 3}, then the retry comes after 3s,
        not after the computed backoff.
        """
        h = Harness(max_retries=1, base_backoff=0.25)
        h.fake.script(Status(429, retry_after="3"), Stream())
        d = h.ask()
        h.advance(5)
        self.assertEqual(self.successResultOf(d).retries, 1)
        self.assertEqual(h.arrivals, [0.0, 3.0])

    def test_retry_after_http_date(self) -> None:
        """
        When C{Retry-After} is an HTTP date 4s ahead, then the retry comes
        after 4s.
        """
        h = Harness(max_retries=1)
        h.clock.advance(1_700_000_000)
        h.fake.script(
            Status(503, retry_after=formatdate(1_700_000_004, usegmt=True)),
            Stream(),
        )
        d = h.ask()
        h.advance(6)
        self.successResultOf(d)
        self.assertEqual(
            [t - 1_700_000_000 for t in h.arrivals], [0.0, 4.0]
        )

    def test_retry_after_capped_by_max_backoff(self) -> None:
        """
        When C{Retry-After} is longer than C{max_backoff}, then the client
        waits C{max_backoff}.
        """
        h = Harness(max_retries=1, max_backoff=2.0)
        h.fake.script(Status(429, retry_after="60"), Stream())
        d = h.ask()
        h.advance(5)
        self.successResultOf(d)
        self.assertEqual(h.arrivals, [0.0, 2.0])

    def test_retry_after_beyond_total_timeout(self) -> None:
        """
        When the wait asked for runs past the total timeout, then the client
        does not wait: it fails at once with the 429 and its C{retry_after}.
        """
        h = Harness(max_retries=3, max_backoff=100.0, total_timeout=30.0)
        h.fake.script(Status(429, retry_after="60"), Stream())
        d = h.ask()
        error = self.failureResultOf(d, UpstreamRateLimited).value
        self.assertEqual((error.status, error.retry_after), (429, 60.0))
        self.assertEqual(len(h.fake.requests), 1)

    def test_backoff_beyond_total_timeout(self) -> None:
        """
        When the next backoff would end past the total timeout, then the
        client gives up with the last error instead of timing out.
        """
        h = Harness(max_retries=5, total_timeout=1.5)
        h.fake.script(*[Status(503)] * 5)
        d = h.ask()
        h.advance(1)
        error = self.failureResultOf(d, UpstreamUnavailable).value
        self.assertEqual(error.status, 503)
        self.assertEqual(h.arrivals, [0.0, 0.75])

    def test_retries_exhausted(self) -> None:
        """
        When every attempt gets 503, then after C{max_retries} retries the
        call fails with L{UpstreamUnavailable} and the upstream's message.
        """
        h = Harness(max_retries=2)
        h.fake.script(*[Status(503)] * 3)
        d = h.ask()
        h.advance(5)
        error = self.failureResultOf(d, UpstreamUnavailable).value
        self.assertEqual(error.status, 503)
        self.assertIn("overloaded", error.message)
        self.assertEqual(len(h.fake.requests), 3)

    def test_rate_limited_exhausted(self) -> None:
        """
        When every attempt gets 429, then the call fails with
        L{UpstreamRateLimited} carrying the last C{Retry-After}.
        """
        h = Harness(max_retries=1)
        h.fake.script(Status(429, retry_after="1"), Status(429, retry_after="2"))
        d = h.ask()
        h.advance(2)
        error = self.failureResultOf(d, UpstreamRateLimited).value
        self.assertEqual((error.status, error.retry_after), (429, 2.0))
        self.assertIn("Rate limit", error.message)

    def test_no_retry_on_client_errors(self) -> None:
        """
        When the upstream answers 400, 401, 403 or 404, then the call fails
        at once with an L{UpstreamError} (not a retryable subclass) holding
        the status and OpenAI's error message.
        """
        for code, text in [
            (400, "Invalid request"),
            (401, "Incorrect API key"),
            (403, "not allowed"),
            (404, "does not exist"),
        ]:
            h = Harness(max_retries=3)
            h.fake.script(Status(code), Stream())
            d = h.ask()
            h.advance(5)
            error = self.failureResultOf(d, UpstreamError).value
            self.assertIs(type(error), UpstreamError, code)
            self.assertEqual(error.status, code)
            self.assertIn(text, error.message)
            self.assertEqual(len(h.fake.requests), 1)

    def test_error_body_not_json(self) -> None:
        """
        When an error answer is not OpenAI's JSON (a proxy's HTML page), then
        the message carries the start of its text.
        """
        h = Harness(max_retries=0)
        h.fake.script(
            Status(502, body=b"<html><h1>502 Bad Gateway</h1></html>",
                   content_type="text/html")
        )
        error = self.failureResultOf(h.ask(), UpstreamUnavailable).value
        self.assertEqual(error.status, 502)
        self.assertIn("502 Bad Gateway", error.message)

    def test_error_body_is_bounded(self) -> None:
        """
        When an error answer's body is huge, then the client reads only
        C{max_error_body} bytes and closes the connection.
        """
        h = Harness(max_retries=0, max_error_body=1000)
        h.fake.script(Status(500, body=b"x" * 1_000_000, content_type="text/plain"))
        d = h.ask()
        error = self.failureResultOf(d, UpstreamUnavailable).value
        self.assertLess(len(error.message), 300)

    def test_retries_connection_errors(self) -> None:
        """
        When connecting fails (refused, DNS), then the client retries, and
        counts the retries in the completion.
        """
        stub_harness = Harness()

        class Failing:
            errors = [ConnectionRefusedError(), DNSLookupError("upstream.test")]

            def request(self, *args: Any, **kwargs: Any) -> Any:
                if self.errors:
                    return fail(self.errors.pop(0))
                return stub_harness.stub.request(*args, **kwargs)

        h = Harness(client=Failing(), max_retries=2)
        h.stub, h.fake = stub_harness.stub, stub_harness.fake
        d = h.ask()
        h.advance(5)
        completion = self.successResultOf(d)
        self.assertEqual(completion.retries, 2)
        self.assertEqual(h.pieces, PIECES)

    def test_connection_error_exhausted(self) -> None:
        """
        When connecting keeps failing, then the call fails with
        L{UpstreamUnavailable} without a status.
        """

        class Refusing:
            calls = 0

            def request(self, *args: Any, **kwargs: Any) -> Any:
                self.calls += 1
                return fail(ConnectionRefusedError())

        client = Refusing()
        h = Harness(client=client, max_retries=2)
        d = h.ask()
        h.advance(5)
        error = self.failureResultOf(d, UpstreamUnavailable).value
        self.assertIsNone(error.status)
        self.assertIn("refused", error.message)
        self.assertEqual(client.calls, 3)

    def test_other_request_failures_not_retried(self) -> None:
        """
        When the request fails with something that is not a network error,
        then the call fails with L{UpstreamError} at once.
        """

        class Broken:
            calls = 0

            def request(self, *args: Any, **kwargs: Any) -> Any:
                self.calls += 1
                raise ValueError("broken client")

        client = Broken()
        h = Harness(client=client, max_retries=2)
        error = self.failureResultOf(h.ask(), UpstreamError).value
        self.assertIs(type(error), UpstreamError)
        self.assertIn("broken client", error.message)
        self.assertEqual(client.calls, 1)

    def test_no_retry_after_first_piece(self) -> None:
        """
        When the connection drops after the first piece was passed on, then
        the call fails without retrying (a retry would repeat text).
        """
        h = Harness(max_retries=3)
        h.fake.script(Stream(fault="drop", fault_after=1), Stream())
        d = h.ask()
        h.advance(5)
        error = self.failureResultOf(d, UpstreamError).value
        self.assertIs(type(error), UpstreamError)
        self.assertIn("mid-answer", error.message)
        self.assertEqual(h.pieces, PIECES[:1])
        self.assertEqual(len(h.fake.requests), 1)

    def test_retry_when_dropped_before_first_piece(self) -> None:
        """
        When the connection drops after the headers and the role chunk but
        before any text, then the client retries.
        """
        h = Harness(max_retries=1)
        h.fake.script(Stream(fault="drop", fault_after=0), Stream())
        d = h.ask()
        h.advance(5)
        self.assertEqual(self.successResultOf(d).retries, 1)
        self.assertEqual(h.pieces, PIECES)


class TimeoutTests(SynchronousTestCase):
    """The three timeouts, at exact clock times."""

    def test_headers_timeout(self) -> None:
        """
        When no response headers arrive within C{headers_timeout}, then the
        call fails with L{UpstreamTimeout} at that time, is not retried, and
        the connection is closed.
        """
        h = Harness(headers_timeout=5.0, max_retries=3)
        h.fake.script(Hang())
        d = h.ask()
        h.advance(4.75)
        self.assertNoResult(d)
        h.advance(0.25)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertTrue(h.fake.requests[0].connection_lost.called)
        h.advance(20)
        self.assertEqual(len(h.fake.requests), 1)

    def test_idle_timer_restarts_on_each_chunk(self) -> None:
        """
        When chunks come 4s apart with a 5s idle timeout, then the answer
        completes though it takes longer than 5s in all.
        """
        h = Harness(idle_timeout=5.0)
        h.fake.script(Stream(pieces=5, interval=4.0))
        d = h.ask()
        h.advance(20)
        self.assertEqual(self.successResultOf(d).text, "".join(PIECES))

    def test_idle_timeout(self) -> None:
        """
        When the stream stalls after a piece for C{idle_timeout}, then the
        call fails with L{UpstreamTimeout}, keeps the piece passed on, and
        closes the connection.
        """
        h = Harness(idle_timeout=5.0)
        h.fake.script(Stream(pieces=5, interval=1.0, fault="hang", fault_after=2))
        d = h.ask()
        h.advance(6.75)
        self.assertNoResult(d)
        h.advance(0.25)
        self.assertIn("stalled", self.failureResultOf(d, UpstreamTimeout).value.message)
        self.assertEqual(h.pieces, PIECES[:2])
        self.assertTrue(h.fake.requests[0].connection_lost.called)

    def test_total_timeout(self) -> None:
        """
        When keep-alive comments keep the stream alive but the answer is
        not complete within C{total_timeout}, then the call fails with
        L{UpstreamTimeout} at that time and closes the connection.
        """
        h = Harness(idle_timeout=5.0, total_timeout=7.0)
        h.fake.script(Stream(pieces=5, interval=2.0, keepalive=True))
        d = h.ask()
        h.advance(6.75)
        self.assertNoResult(d)
        h.advance(0.25)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertEqual(h.pieces, PIECES[:3])
        self.assertTrue(h.fake.requests[0].connection_lost.called)

    def test_timers_cancelled_on_success(self) -> None:
        """
        When an answer completes, then no timer of the call is left on the
        clock.
        """
        h = Harness()
        d = h.ask()
        self.successResultOf(d)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_timers_cancelled_on_failure(self) -> None:
        """
        When a call fails, then no timer of the call is left on the clock.
        """
        h = Harness(max_retries=0)
        h.fake.script(Status(500))
        self.failureResultOf(h.ask(), UpstreamUnavailable)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class CancelTests(SynchronousTestCase):
    """Cancelling the Deferred, in memory."""

    def test_cancel_before_headers(self) -> None:
        """
        When the call is cancelled before the headers arrive, then it fails
        with L{CancelledError}, the connection is closed, and no timer is
        left.
        """
        h = Harness()
        h.fake.script(Hang())
        d = h.ask()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.flush()
        self.assertTrue(h.fake.requests[0].connection_lost.called)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_cancel_mid_stream(self) -> None:
        """
        When the call is cancelled mid-answer, then the connection is closed
        and no further piece is passed on.
        """
        h = Harness()
        h.fake.script(Stream(pieces=5, interval=1.0))
        d = h.ask()
        h.advance(2)
        self.assertEqual(h.pieces, PIECES[:2])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.flush()
        self.assertTrue(h.fake.requests[0].connection_lost.called)
        h.advance(10)
        self.assertEqual(h.pieces, PIECES[:2])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_cancel_during_backoff(self) -> None:
        """
        When the call is cancelled while waiting to retry, then no retry is
        sent and no timer is left.
        """
        h = Harness(max_retries=2)
        h.fake.script(Status(503), Stream())
        d = h.ask()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.advance(10)
        self.assertEqual(len(h.fake.requests), 1)

    def test_cancel_from_on_piece(self) -> None:
        """
        When C{on_piece} cancels the call, then no later piece is passed on,
        even from the same chunk, and the connection is closed.
        """
        h = Harness()
        h.fake.script(
            Stream(interval=1.0, split_at=after_events(1), fault="hang", fault_after=5)
        )
        results: list[Deferred[Completion]] = []
        pieces: list[str] = []

        def on_piece(piece: str) -> None:
            pieces.append(piece)
            results[0].cancel()

        results.append(h.upstream.stream_chat(REQUEST, on_piece))
        h.advance(1)
        self.failureResultOf(results[0], CancelledError)
        self.assertEqual(pieces, PIECES[:1])
        self.assertTrue(h.fake.requests[0].connection_lost.called)

    def test_on_piece_raises(self) -> None:
        """
        When C{on_piece} raises, then the call fails with that exception and
        the connection is closed.
        """
        h = Harness()
        h.fake.script(Stream(interval=1.0))

        def on_piece(piece: str) -> None:
            raise ZeroDivisionError()

        d = h.upstream.stream_chat(REQUEST, on_piece)
        h.advance(1)
        self.failureResultOf(d, ZeroDivisionError)
        self.assertTrue(h.fake.requests[0].connection_lost.called)


class _Resource(Resource):
    """Answers every request through C{render}, for shapes the fake lacks."""

    isLeaf = True

    def __init__(self, render: Callable[[Any], Any]) -> None:
        super().__init__()
        self.render = render  # type: ignore[method-assign]


class StreamTests(SynchronousTestCase):
    """What the client sends, and what it makes of what it receives."""

    def test_messages_json(self) -> None:
        """
        When messages hold quotes, backslashes, control characters, line
        separators or non-ASCII text, then each is sent as the JSON that
        C{json.dumps} makes of it, and reads back unchanged.
        """
        import json

        texts = ['say "hi"\\n', "tab\tnew\nline\x00\x1f", "é ü 日本 \u2028 \U0001f600", ""]
        messages = [ChatMessage(role, text) for role in ("user", "assistant") for text in texts]
        h = Harness()
        self.successResultOf(h.ask(ChatRequest(model="m", messages=messages)))
        [request] = h.fake.requests
        self.assertEqual(request.body["messages"],
                         [m.to_dict() for m in messages])
        for m in messages:
            self.assertEqual(m.json, json.dumps(
                m.to_dict(), ensure_ascii=False, separators=(",", ":")))

    def test_request(self) -> None:
        """
        When a call is made, then it POSTs the streaming request with usage
        asked for, the key as Bearer, and temperature and max_tokens only
        when set.
        """
        h = Harness()
        self.successResultOf(h.ask())
        self.successResultOf(
            h.ask(
                ChatRequest(
                    model="gpt-4o",
                    messages=[ChatMessage("user", "héllo")],
                    temperature=0.5,
                    max_tokens=100,
                )
            )
        )
        first, second = h.fake.requests
        self.assertEqual((first.method, first.path), ("POST", "/v1/chat/completions"))
        self.assertEqual(first.headers["authorization"], "Bearer sk-test")
        self.assertEqual(first.headers["content-type"], "application/json")
        self.assertEqual(
            first.body,
            {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hello"},
                ],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        self.assertEqual(
            (second.body["temperature"], second.body["max_tokens"]), (0.5, 100)
        )
        self.assertEqual(second.body["messages"][0]["content"], "héllo")

    def test_completion(self) -> None:
        """
        When an answer streams, then each piece is passed on as it arrives
        and the completion holds the text, model, finish reason, usage and
        status.
        """
        h = Harness()
        h.fake.script(Stream(pieces=3, interval=1.0))
        d = h.ask()
        self.assertEqual(h.pieces, [])
        h.advance(1)
        self.assertEqual(len(h.pieces), 1)
        h.advance(2)
        completion = self.successResultOf(d)
        text = "".join(PIECES)
        self.assertEqual(
            completion,
            Completion(
                text=text,
                model="gpt-4o-mini",
                finish_reason="stop",
                usage=Usage(prompt_tokens=14, completion_tokens=3, total_tokens=17),
                retries=0,
                status=200,
            ),
        )
        self.assertEqual(h.pieces, split_text(text, 3))

    def test_length_finish_reason(self) -> None:
        """
        When the upstream stops at C{max_tokens}, then the completion says
        C{"length"}.
        """
        h = Harness()
        d = h.ask(ChatRequest(model="m", messages=[ChatMessage("user", "hi")], max_tokens=2))
        completion = self.successResultOf(d)
        self.assertEqual(completion.finish_reason, "length")
        self.assertEqual(len(h.pieces), 2)

    def test_error_object(self) -> None:
        """
        When an C{{"error": ...}} object comes instead of a chunk, then the
        call fails with L{UpstreamError} and its message, without retry.
        """
        h = Harness(max_retries=3)
        h.fake.script(Stream(fault="error", fault_after=0), Stream())
        error = self.failureResultOf(h.ask(), UpstreamError).value
        self.assertIs(type(error), UpstreamError)
        self.assertIn("server had an error", error.message)
        self.assertEqual(len(h.fake.requests), 1)

    def test_malformed_json(self) -> None:
        """
        When a data line is not JSON, then the call fails with
        L{UpstreamError} and the connection is closed.
        """
        h = Harness()
        h.fake.script(Stream(fault="malformed", fault_after=1))
        error = self.failureResultOf(h.ask(), UpstreamError).value
        self.assertIn("malformed JSON", error.message)
        self.assertEqual(h.pieces, PIECES[:1])

    def test_no_done(self) -> None:
        """
        When the stream ends cleanly without C{data: [DONE]}, then the call
        fails: the answer may be cut short.
        """
        h = Harness(max_retries=3)
        h.fake.script(Stream(fault="no_done"))
        error = self.failureResultOf(h.ask(), UpstreamError).value
        self.assertIn("before [DONE]", error.message)
        self.assertEqual(h.pieces, PIECES)
        self.assertEqual(len(h.fake.requests), 1)

    def test_body_kept_open_after_done(self) -> None:
        """
        When the upstream sends C{[DONE]} but keeps the body open, then the
        call succeeds a moment later and closes the connection.
        """
        lost: list[object] = []

        def render(request: Any) -> Any:
            request.notifyFinish().addErrback(lost.append)
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
            request.write(b"data: [DONE]\n\n")
            return NOT_DONE_YET

        clock = Clock()
        stub = StubTreq(_Resource(render))
        upstream = OpenAIUpstream(clock, "http://x.test/v1", client=stub)
        d = upstream.stream_chat(REQUEST, lambda piece: None)
        stub.flush()
        self.assertNoResult(d)
        clock.advance(1)
        stub.flush()
        self.assertEqual(self.successResultOf(d).text, "Hi")
        self.assertEqual(len(lost), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_whole_completion_instead_of_stream(self) -> None:
        """
        When an upstream ignores C{"stream": true} and answers one
        C{chat.completion} JSON object, then its text is passed on as one
        piece and the call succeeds.
        """

        def render(request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return (
                b'{"object":"chat.completion","model":"m-1","choices":[{"index":0,'
                b'"message":{"role":"assistant","content":"Hi there"},'
                b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,'
                b'"completion_tokens":2,"total_tokens":3}}'
            )

        pieces: list[str] = []
        upstream = OpenAIUpstream(
            Clock(), "http://x.test/v1", client=StubTreq(_Resource(render))
        )
        completion = self.successResultOf(upstream.stream_chat(REQUEST, pieces.append))
        self.assertEqual(pieces, ["Hi there"])
        self.assertEqual(
            (completion.text, completion.model, completion.usage),
            ("Hi there", "m-1", Usage(1, 2, 3)),
        )

    def test_unexpected_content_type(self) -> None:
        """
        When a 2xx answer is neither an event stream nor a completion, then
        the call fails with L{UpstreamError} naming its content type.
        """

        def render(request: Any) -> bytes:
            request.setHeader(b"content-type", b"text/html")
            return b"<html>login</html>"

        upstream = OpenAIUpstream(
            Clock(), "http://x.test/v1", client=StubTreq(_Resource(render))
        )
        error = self.failureResultOf(
            upstream.stream_chat(REQUEST, lambda piece: None), UpstreamError
        ).value
        self.assertIn("text/html", error.message)

    def test_bad_base_url(self) -> None:
        """
        When the base URL is not an http(s) URL, then the constructor raises
        L{ValueError}.
        """
        self.assertRaises(ValueError, OpenAIUpstream, Clock(), "ftp://x/v1")
        self.assertRaises(ValueError, OpenAIUpstream, Clock(), "not a url")


class HistoryTests(SynchronousTestCase):
    """Messages kept as columns (L{History}), as a branch is kept."""

    def test_same_messages(self) -> None:
        """
        When messages are kept as columns, then each one read back is what
        making it alone makes: the same role, content, tokens and JSON,
        whether the texts are all ASCII (with or without DEL), or hold other
        text, and whatever the role.
        """
        import json

        batches = [
            ["plain", 'say "hi"\\n', "tab\tnew\nline\x00\x1f", ""],
            ["plain", "del \x7f here"],
            ["plain", "é ü 日本 \u2028 \U0001f600"],
        ]
        for texts in batches:
            roles = ["user", "assistant", "tool", "odd role"][: len(texts)]
            tokens = list(range(len(texts)))
            history = History(roles, texts, tokens)
            alone = [ChatMessage(r, t, n) for r, t, n in zip(roles, texts, tokens)]
            self.assertEqual([tuple(m) for m in history], [tuple(m) for m in alone])
            self.assertEqual([tuple(history[i]) for i in range(len(texts))],
                             [tuple(m) for m in alone])
            self.assertTrue(all(type(m) is ChatMessage for m in history))
            for m in history:
                self.assertEqual(m.json, json.dumps(
                    m.to_dict(), ensure_ascii=False, separators=(",", ":")))
            self.assertEqual(json.loads("[" + history.json() + "]"),
                             [m.to_dict() for m in alone])

    def test_sequence(self) -> None:
        """
        When a history is cut, added to or compared, then it behaves as the
        list of its messages would, and its token total follows.
        """
        a, b, c = ChatMessage("user", "a", 1), ChatMessage("assistant", "b", 2), \
            ChatMessage("user", "c", 4)
        history = History.of([a, b])
        self.assertIs(History.of(history), history)
        self.assertEqual((len(history), history.total), (2, 3))
        self.assertEqual(history, [a, b])
        self.assertNotEqual(history, [a])
        longer = history + (c,)
        self.assertEqual((longer, longer.total), ([a, b, c], 7))
        self.assertEqual((history, history.total), ([a, b], 3), "the original changed")
        self.assertEqual((longer[1:], longer[1:].total), ([b, c], 6))
        self.assertEqual(longer[-1], c)
        self.assertEqual(History.of([]) + longer[:0], [])
        self.assertEqual(History.of([]).json(), "")

    def test_stored(self) -> None:
        """
        When a history is made from its messages' JSON as stored (ours, or
        another writer's with spaces and escapes), then it sends that JSON
        unchanged, reads back the same messages, one at a time or all, and
        stays so when cut or added to.
        """
        texts = ["plain", 'say "hi"\n', "é 日本 \u2028", "tab\tnew\nline\x1f"]
        roles = ["user", "assistant", "user", "assistant"]
        alone = [ChatMessage(r, t, n) for n, (r, t) in enumerate(zip(roles, texts))]
        ours = [message_json(r, t) for r, t in zip(roles, texts)]
        self.assertEqual(ours, [m.json for m in alone])
        theirs = ['{"role" : "user", "content" : "plain"}',
                  '{"role" : "assistant", "content" : "say \\"hi\\"\\n"}',
                  '{"content": "\\u00e9 \\u65e5\\u672c \\u2028", "role": "user"}',
                  '{"role":"assistant","content":"tab\\tnew\\nline\\u001f"}']
        for jsons in (ours, theirs):
            history = History.stored(list(jsons), [0, 1, 2, 3])
            self.assertEqual(history.json(), ",".join(jsons))
            self.assertEqual((len(history), history.total), (4, 6))
            self.assertEqual([tuple(history[i])[:3] for i in range(4)],
                             [tuple(m)[:3] for m in alone])
            self.assertEqual(history[-1].json, jsons[-1])
            longer = history[1:] + (ChatMessage("user", "more", 5),)
            self.assertEqual(longer.json(), ",".join([*jsons[1:], message_json("user", "more")]))
            self.assertEqual((longer, longer.total), ([*alone[1:], ChatMessage("user", "more")], 11))
            self.assertEqual([m[:3] for m in history], [m[:3] for m in alone])
            self.assertEqual((history.roles, history.contents), (roles, texts))


class AddressTests(SynchronousTestCase):
    """Where requests go: the API's URL and its connection endpoints."""

    def test_international_url(self) -> None:
        """
        When the base URL has a non-ASCII host and path, then every request
        goes to its URI form (IDNA host, percent-encoded path).
        """
        clock = Clock()
        fake = FakeUpstream(clock)
        stub = StubTreq(fake.resource())
        upstream = OpenAIUpstream(clock, "http://bücher.test/ü/v1", client=stub)
        for _ in range(2):
            d = upstream.stream_chat(REQUEST, lambda piece: None)
            stub.flush()
            self.successResultOf(d)
        self.assertEqual(
            [(r.path, r.headers["host"]) for r in fake.requests],
            [("/%C3%BC/v1/chat/completions", "xn--bcher-kva.test")] * 2,
        )

    def test_one_endpoint_per_origin(self) -> None:
        """
        When requests go to the same scheme, host and port, then they share
        one endpoint; https gets a TLS endpoint; another scheme is refused.
        """
        endpoints = _Endpoints(MemoryReactorClock())
        plain = endpoints.endpointForURI(URI.fromBytes(b"http://a.test/v1/x"))
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"http://a.test/y")), plain)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"http://a.test:81/")), plain)
        tls = endpoints.endpointForURI(URI.fromBytes(b"https://a.test/v1"))
        self.assertIsNot(type(tls), type(plain))
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"https://a.test/")), tls)
        self.assertRaises(
            SchemeNotSupported, endpoints.endpointForURI, URI.fromBytes(b"ftp://a.test/")
        )


class RetryAfterTests(SynchronousTestCase):
    """L{parse_retry_after}."""

    def test_forms(self) -> None:
        """
        When C{Retry-After} holds seconds or an HTTP date, or
        C{retry-after-ms} holds milliseconds, then the delay is returned in
        seconds; a missing or unreadable value gives C{None}.
        """
        now = 1_700_000_000.0
        date = formatdate(now + 30, usegmt=True)
        for headers, expected in [
            ({}, None),
            ({b"Retry-After": [b"7"]}, 7.0),
            ({b"Retry-After": [b"1.5"]}, 1.5),
            ({b"Retry-After": [date.encode()]}, 30.0),
            ({b"Retry-After": [formatdate(now - 30, usegmt=True).encode()]}, 0.0),
            ({b"Retry-After": [b"-3"]}, 0.0),
            ({b"Retry-After": [b"soon"]}, None),
            ({b"Retry-After": [b"nan"]}, None),
            ({b"retry-after-ms": [b"250"], b"Retry-After": [b"1"]}, 0.25),
            ({b"retry-after-ms": [b"x"], b"Retry-After": [b"1"]}, 1.0),
        ]:
            self.assertEqual(
                parse_retry_after(Headers(headers), now), expected, headers
            )


# --- over real loopback sockets -------------------------------------------------


def _wait(d: "Deferred[Any]", timeout: float = WAIT) -> "Deferred[Any]":
    """C{d}, failing if it has not fired within C{timeout} seconds."""
    return d.addTimeout(timeout, reactor)


class LoopbackTests(TestCase):
    """Against a real L{FakeUpstream} over TCP, with the default client."""

    async def upstream(self, **settings: Any) -> OpenAIUpstream:
        """Start the fake and return a client for it, both closed at the end."""
        self.fake = FakeUpstream(reactor, api_key="sk-loop")
        await self.fake.listen()
        self.addCleanup(self.fake.stop)
        settings.setdefault("random", lambda: 0.0)
        settings.setdefault("base_backoff", 0.01)
        settings.setdefault("max_backoff", 0.05)
        upstream = OpenAIUpstream(
            reactor, self.fake.base_url, api_key="sk-loop", **settings
        )
        self.addCleanup(upstream.close)
        return upstream

    async def test_stream(self) -> None:
        """
        When the fake streams an answer, then the pieces arrive in order and
        the completion matches them.
        """
        upstream = await self.upstream()
        pieces: list[str] = []
        completion = await _wait(upstream.stream_chat(REQUEST, pieces.append))
        self.assertEqual(pieces, PIECES)
        self.assertEqual(completion.text, "".join(PIECES))
        self.assertEqual(completion.usage, Usage(14, 5, 19))
        self.assertEqual(self.fake.requests[0].headers["authorization"], "Bearer sk-loop")

    async def test_connection_reused(self) -> None:
        """
        When two answers are asked one after the other, then both use the
        same persistent connection.
        """
        upstream = await self.upstream()
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertEqual([r.connection for r in self.fake.requests], [1, 1])

    async def test_request_sent_at_once(self) -> None:
        """
        When an answer is asked on a pooled connection, then the request
        (its headers and its body) is sent before the reactor turns again,
        not left in the transport's buffer for its next turn.
        """
        upstream = await self.upstream()
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        [connections] = upstream._pool._connections.values()
        [connection] = connections
        transport = connection.transport
        answer = upstream.stream_chat(REQUEST, lambda piece: None)
        self.assertIs(connection.transport, transport, "not the pooled connection")
        self.assertEqual(
            (transport.dataBuffer[transport.offset:], transport._tempDataBuffer), (b"", []),
            "the request waits for the reactor")
        await _wait(answer)
        self.assertEqual([r.connection for r in self.fake.requests], [1, 1])

    async def test_finished_answer_left_to_refcounts(self) -> None:
        """
        When an answer has streamed, then nothing of its HTTP response waits
        for the cycle collector: once the reactor's turn ends, its parser
        (and the request, response and headers it holds) is freed.  A full
        collection walks whatever garbage is left, while every answer in
        flight waits.
        """
        upstream = await self.upstream()
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        await deferLater(reactor, 0, lambda: None)  # the turn that fired it ends
        url = self.fake.base_url.encode("ascii")
        self.assertEqual([o for o in gc.get_objects() if isinstance(o, HTTPClientParser)
                          and o.request.absoluteURI.startswith(url)], [])
        # Still one connection, kept for the next answer.
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertEqual([r.connection for r in self.fake.requests], [1, 1, 1])

    async def test_upstream_cookies_not_sent_back(self) -> None:
        """
        When the upstream sets a cookie (api.openai.com's CDN does, on every
        answer), then no later request carries it: one client serves every
        user, so the cookie would travel between users' requests.
        """
        upstream = await self.upstream()
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertEqual([r.headers.get("cookie") for r in self.fake.requests], [None, None])

    async def test_https_upstream(self) -> None:
        """
        When the upstream is https, then the default client checks its
        certificate against the system's trust: a certificate nobody
        trusts fails the ask as unavailable, one that is trusted (here
        through C{SSL_CERT_FILE}) answers, over the same kept endpoint.
        """
        from twisted.internet.endpoints import serverFromString

        from easybackend.testing.tls import self_signed, server_endpoint

        cert, key = self_signed(self.mktemp())
        self.fake = FakeUpstream(reactor)
        port = await self.fake.listen(serverFromString(reactor, server_endpoint(cert, key)))
        self.addCleanup(self.fake.stop)
        url = f"https://localhost:{port.getHost().port}/v1"
        untrusted = OpenAIUpstream(reactor, url, max_retries=0)
        self.addCleanup(untrusted.close)
        error = await self.assertFailure(
            _wait(untrusted.stream_chat(REQUEST, lambda piece: None)), UpstreamUnavailable
        )
        self.assertIn("certificate", str(error).lower())

        # OpenSSL reads it when the client's TLS context is made.
        previous = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = cert
        self.addCleanup(
            lambda: os.environ.__setitem__("SSL_CERT_FILE", previous) if previous
            else os.environ.pop("SSL_CERT_FILE", None))
        trusted = OpenAIUpstream(reactor, url, max_retries=0)
        self.addCleanup(trusted.close)
        pieces: list[str] = []
        for _ in range(2):
            await _wait(trusted.stream_chat(REQUEST, pieces.append))
        self.assertEqual(pieces, PIECES * 2)

    async def test_split_at_every_byte(self) -> None:
        """
        When the fake writes the body one byte at a time, with CRLF line
        ends, keep-alive comments and multi-byte characters, then the pieces
        arrive intact.
        """
        upstream = await self.upstream()
        text = "héllo wörld 😀 世界 done"
        self.fake.script(
            Stream(pieces=6, text=text, newline="\r\n", keepalive=True, chunk_size=1)
        )
        pieces: list[str] = []
        completion = await _wait(upstream.stream_chat(REQUEST, pieces.append))
        self.assertEqual(pieces, split_text(text, 6))
        self.assertEqual(completion.text, text)

    async def test_split_inside_character_and_crlf(self) -> None:
        """
        When writes are cut inside a 4-byte character and between the CR and
        LF of a line end, then the pieces arrive intact.
        """
        upstream = await self.upstream()
        text = "a😀b"

        def split_at(body: bytes) -> list[int]:
            emoji = body.index("😀".encode())
            return [emoji + 1, emoji + 2, emoji + 3, body.index(b"\r\n") + 1,
                    body.rindex(b"\r\n") + 1]

        self.fake.script(Stream(pieces=3, text=text, newline="\r\n", split_at=split_at))
        pieces: list[str] = []
        await _wait(upstream.stream_chat(REQUEST, pieces.append))
        self.assertEqual(pieces, ["a", "😀", "b"])

    async def test_lone_cr(self) -> None:
        """
        When the fake ends lines with lone CRs, then the answer is parsed.
        """
        upstream = await self.upstream()
        self.fake.script(Stream(newline="\r", chunk_size=7))
        completion = await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertEqual(completion.text, "".join(PIECES))

    async def test_status_errors(self) -> None:
        """
        When the fake answers an error status, then the call fails with the
        matching error class, status, message and Retry-After, after one
        request when retries are off.
        """
        upstream = await self.upstream(max_retries=0)
        cases = [
            (Status(429, retry_after="7"), UpstreamRateLimited, 7.0),
            (Status(429), UpstreamRateLimited, None),
            (Status(500), UpstreamUnavailable, None),
            (Status(503, retry_after="2"), UpstreamUnavailable, 2.0),
            (Status(400, message="bad temperature"), UpstreamError, None),
            (Status(401), UpstreamError, None),
        ]
        messages = []
        for scenario, kind, retry_after in cases:
            self.fake.script(scenario)
            with self.assertRaises(UpstreamError) as raised:
                await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
            error = raised.exception
            self.assertIs(type(error), kind, scenario)
            self.assertEqual(
                (error.status, error.retry_after), (scenario.code, retry_after)
            )
            self.assertIn(f"HTTP {scenario.code}", error.message)
            messages.append(error.message)
        self.assertIn("bad temperature", messages[4])
        self.assertEqual(len(self.fake.requests), len(cases))

    async def test_wrong_key(self) -> None:
        """
        When the upstream rejects the key, then the call fails with a 401
        L{UpstreamError} carrying OpenAI's message, without retry.
        """
        await self.upstream()
        wrong = OpenAIUpstream(reactor, self.fake.base_url, api_key="sk-wrong")
        self.addCleanup(wrong.close)
        with self.assertRaises(UpstreamError) as raised:
            await _wait(wrong.stream_chat(REQUEST, lambda piece: None))
        self.assertEqual(raised.exception.status, 401)
        self.assertIn("Incorrect API key", raised.exception.message)
        self.assertEqual(len(self.fake.requests), 1)

    async def test_retry_then_success(self) -> None:
        """
        When the fake answers 503, then 429, then streams, then the call
        succeeds after two retries.
        """
        upstream = await self.upstream(max_retries=2)
        self.fake.script(Status(503), Status(429, retry_after="0"), Stream())
        completion = await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertEqual(completion.retries, 2)
        self.assertEqual(len(self.fake.requests), 3)

    async def test_error_object(self) -> None:
        """
        When the fake sends an error object after a piece, then the call
        fails with its message.
        """
        upstream = await self.upstream()
        self.fake.script(Stream(fault="error", fault_after=1))
        pieces: list[str] = []
        with self.assertRaises(UpstreamError) as raised:
            await _wait(upstream.stream_chat(REQUEST, pieces.append))
        self.assertIn("server had an error", raised.exception.message)
        self.assertEqual(pieces, PIECES[:1])

    async def test_malformed(self) -> None:
        """
        When the fake sends a data line that is not JSON, then the call
        fails and the connection is closed.
        """
        upstream = await self.upstream()
        self.fake.script(Stream(fault="malformed", fault_after=2))
        with self.assertRaises(UpstreamError) as raised:
            await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertIn("malformed JSON", raised.exception.message)
        await _wait(self.fake.requests[0].connection_lost)

    async def test_no_done(self) -> None:
        """
        When the fake ends the stream cleanly without C{[DONE]}, then the
        call fails.
        """
        upstream = await self.upstream()
        self.fake.script(Stream(fault="no_done"))
        with self.assertRaises(UpstreamError) as raised:
            await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertIn("before [DONE]", raised.exception.message)

    async def test_early_close(self) -> None:
        """
        When the fake closes the connection mid-answer, then the call fails
        with L{UpstreamError} (not retried: pieces were passed on).
        """
        upstream = await self.upstream(max_retries=2)
        self.fake.script(Stream(fault="drop", fault_after=2), Stream())
        pieces: list[str] = []
        with self.assertRaises(UpstreamError) as raised:
            await _wait(upstream.stream_chat(REQUEST, pieces.append))
        self.assertIs(type(raised.exception), UpstreamError)
        self.assertEqual(pieces, PIECES[:2])
        self.assertEqual(len(self.fake.requests), 1)

    async def test_reset_mid_stream(self) -> None:
        """
        When the fake resets the connection mid-answer, then the call fails
        with L{UpstreamError}.
        """
        upstream = await self.upstream(max_retries=2)
        self.fake.script(Stream(fault="reset", fault_after=1))
        pieces: list[str] = []
        with self.assertRaises(UpstreamError) as raised:
            await _wait(upstream.stream_chat(REQUEST, pieces.append))
        self.assertIs(type(raised.exception), UpstreamError)
        self.assertEqual(pieces, PIECES[:1])

    async def test_reset_before_first_chunk(self) -> None:
        """
        When the fake resets the connection before answering, or after the
        headers but before the first chunk, then the call fails with
        L{UpstreamUnavailable}, or succeeds on a retry.
        """
        upstream = await self.upstream(max_retries=0)
        for scenario in [Reset(), Reset(after_headers=True)]:
            self.fake.script(scenario)
            with self.assertRaises(UpstreamUnavailable) as raised:
                await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
            self.assertIsNone(raised.exception.status)
        retrying = OpenAIUpstream(
            reactor, self.fake.base_url, api_key="sk-loop", max_retries=2,
            base_backoff=0.01, random=lambda: 0.0,
        )
        self.addCleanup(retrying.close)
        self.fake.script(Reset(), Reset(after_headers=True), Stream())
        completion = await _wait(retrying.stream_chat(REQUEST, lambda piece: None))
        self.assertEqual(completion.retries, 2)

    async def test_connection_refused(self) -> None:
        """
        When nothing listens at the upstream's address, then the call fails
        with L{UpstreamUnavailable} without a status, after its retries.
        """
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        upstream = OpenAIUpstream(
            reactor, f"http://127.0.0.1:{port}/v1", max_retries=2,
            base_backoff=0.01, random=lambda: 0.0,
        )
        self.addCleanup(upstream.close)
        with self.assertRaises(UpstreamUnavailable) as raised:
            await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        self.assertIsNone(raised.exception.status)

    async def test_headers_timeout_closes(self) -> None:
        """
        When the fake never sends headers, then the call fails with
        L{UpstreamTimeout} and the fake sees its connection closed.
        """
        upstream = await self.upstream(headers_timeout=0.1)
        self.fake.script(Hang())
        with self.assertRaises(UpstreamTimeout):
            await _wait(upstream.stream_chat(REQUEST, lambda piece: None))
        await _wait(self.fake.requests[0].connection_lost)

    async def test_idle_timeout_closes(self) -> None:
        """
        When the fake stalls mid-answer, then the call fails with
        L{UpstreamTimeout} after the pieces so far, and the fake sees its
        connection closed.
        """
        upstream = await self.upstream(idle_timeout=0.1)
        self.fake.script(Stream(fault="hang", fault_after=2))
        pieces: list[str] = []
        with self.assertRaises(UpstreamTimeout):
            await _wait(upstream.stream_chat(REQUEST, pieces.append))
        self.assertEqual(pieces, PIECES[:2])
        await _wait(self.fake.requests[0].connection_lost)

    async def test_cancel_before_headers_closes(self) -> None:
        """
        When the call is cancelled while the fake holds back the headers,
        then the fake sees its connection closed.
        """
        upstream = await self.upstream()
        self.fake.script(Hang())
        d = upstream.stream_chat(REQUEST, lambda piece: None)
        received = await _wait(self.fake.wait_for_request(0))
        self.assertFalse(received.connection_lost.called)
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await _wait(received.connection_lost)

    async def test_cancel_mid_stream_closes(self) -> None:
        """
        When the call is cancelled mid-answer, then the fake sees its
        connection closed and no piece is passed on after the cancel.
        """
        upstream = await self.upstream()
        self.fake.script(Stream(pieces=5, interval=60.0, split_at=after_events(2)))
        first: Deferred[str] = Deferred()
        pieces: list[str] = []

        def on_piece(piece: str) -> None:
            pieces.append(piece)
            if not first.called:
                first.callback(piece)

        d = upstream.stream_chat(REQUEST, on_piece)
        await _wait(first)
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await _wait(self.fake.requests[0].connection_lost)
        self.assertEqual(pieces, PIECES[:1])

    async def test_cancel_after_pieces_of_hung_stream(self) -> None:
        """
        When the fake hangs mid-answer and the call is cancelled, then the
        fake sees its connection closed.
        """
        upstream = await self.upstream()
        self.fake.script(Stream(fault="hang", fault_after=3))
        got_three: Deferred[None] = Deferred()
        pieces: list[str] = []

        def on_piece(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) == 3:
                got_three.callback(None)

        d = upstream.stream_chat(REQUEST, on_piece)
        await _wait(got_three)
        d.cancel()
        await _wait(self.fake.requests[0].connection_lost)
        self.failureResultOf(d, CancelledError)
        self.assertEqual(pieces, PIECES[:3])
