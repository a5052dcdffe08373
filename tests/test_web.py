"""
Tests for L{easybackend.transports.web}: the HTTP routes over a real core,
through real loopback sockets.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from werkzeug.routing import MapAdapter

from easybackend.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from easybackend.offline import OfflineUpstream
from easybackend.service import CoreSettings
from easybackend.tap import JSONRequest
from easybackend.testing.fixtures import eventually, make_core, serve_http, within
from tests.test_service import ScriptedUpstream, _reactor


async def call(method: str, url: str, body: Any = None, raw: bytes | None = None,
               headers: dict[str, list[str]] | None = None) -> tuple[int, Any, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    response = await within(treq.request(method, url, data=data, headers=headers, persistent=False))
    content = await within(treq.content(response))
    try:
        decoded = json.loads(content) if content else None
    except ValueError:
        decoded = content
    return response.code, decoded, response.headers


class AskRouteTests(TestCase):
    """POST /ask/{conversation_id} and the conversation routes."""

    async def setUp(self) -> None:
        self.core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        self.url = await serve_http(self, self.core)

    async def test_answered_request_lets_go(self) -> None:
        """
        When an ask has been answered, as JSON or as events, then its
        request is freed at once, not by the cycle collector: Klein's
        C{render} keeps each request in a reference cycle, which the server
        breaks once the request is done (the server collects its older
        generations rarely, and what they hold would make each collection,
        a pause every answer in flight waits through, longer).  A request
        answered at once (C{/healthz}), whose cycle is not broken, holds
        neither its headers nor Klein's URL binding.
        """
        await call("POST", self.url + "/ask/new", {"prompt": "Hello"})
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for body in ({"prompt": "Hello"}, {"prompt": "Hello", "stream": True}):
            code, _, _ = await call("POST", self.url + "/ask/new", body)
            self.assertEqual(code, 200)
            # The client can have the answer a moment before the server is
            # done with the request; a request in a cycle is never freed.
            await eventually(lambda: not [o for o in gc.get_objects()
                                          if isinstance(o, JSONRequest)],
                             "the request is freed")
        code, _, _ = await call("GET", self.url + "/healthz")
        self.assertEqual(code, 200)
        self.assertEqual([o for o in gc.get_objects() if isinstance(o, MapAdapter)], [])
        for request in [o for o in gc.get_objects() if isinstance(o, JSONRequest)]:
            self.assertEqual(list(request.requestHeaders.getAllRawHeaders()), [])
            self.assertEqual(request.code, 200)

    async def test_ask_new_then_memory(self) -> None:
        """
        When a client asks on C{new} and then on the returned id, then the
        second answer sees the first turn, and the conversation lists both;
        a JSON answer comes with its length, not in chunks.
        """
        code, first, headers = await call("POST", self.url + "/ask/new", {"prompt": "Hello"})
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        response = await within(treq.get(self.url + "/healthz", persistent=False))
        body = await within(treq.content(response))
        self.assertEqual(response.length, len(body))  # a Content-Length, not chunks
        self.assertEqual(set(first), {"conversation_id", "message_id", "response",
                                      "model", "usage", "finish_reason"})
        self.assertIn("Hello", first["response"])
        self.assertEqual(first["model"], "offline")
        cid = first["conversation_id"]
        code, second, _ = await call("POST", f"{self.url}/ask/{cid}", {"prompt": "Again"})
        self.assertEqual(code, 200)
        self.assertEqual(second["conversation_id"], cid)
        self.assertIn("1 earlier turn", second["response"])
        code, view, _ = await call("GET", f"{self.url}/conversations/{cid}")
        self.assertEqual(code, 200)
        self.assertEqual([m["role"] for m in view["messages"]],
                         ["user", "assistant", "user", "assistant"])
        self.assertEqual(view["current_message_id"], second["message_id"])

    async def test_list_rollback_delete(self) -> None:
        """
        When a client lists, rolls back and deletes, then each route does
        what it says, with JSON answers.
        """
        for cid in ["a", "b"]:
            await call("POST", f"{self.url}/ask/{cid}", {"prompt": "one"})
        await call("POST", f"{self.url}/ask/b", {"prompt": "two"})
        code, listed, _ = await call("GET", self.url + "/conversations?limit=1")
        self.assertEqual(code, 200)
        self.assertEqual([c["id"] for c in listed["conversations"]], ["b"])
        self.assertEqual(listed["next_offset"], 1)
        code, view, _ = await call("POST", self.url + "/conversations/b/rollback", {"turns": 1})
        self.assertEqual(code, 200)
        self.assertEqual([m["content"] for m in view["messages"] if m["role"] == "user"], ["one"])
        code, body, _ = await call("DELETE", self.url + "/conversations/a")
        self.assertEqual((code, body), (200, {"id": "a", "deleted": True}))
        code, body, _ = await call("GET", self.url + "/conversations/a")
        self.assertEqual((code, body["error"]["code"]), (404, "not_found"))

    async def test_bad_input(self) -> None:
        """
        When a client sends bad input, then it gets a JSON error with the
        right status, never a 500 or HTML.
        """
        cases = [
            ("POST", "/ask/new", b"{not json", 400, "bad_request"),
            ("POST", "/ask/new", b"[1, 2]", 400, "bad_request"),
            ("POST", "/ask/new", b"", 400, "bad_request"),
            ("POST", "/ask/new", b'{"prompt": 5}', 400, "bad_request"),
            ("POST", "/ask/new", b'{"prompt": ""}', 400, "bad_request"),
            ("POST", "/ask/new", b'{"prompt": "x", "temperature": "hot"}', 400, "bad_request"),
            ("POST", "/ask/new", b'{"prompt": "x", "max_tokens": -1}', 400, "bad_request"),
            ("POST", "/ask/bad%24id", b'{"prompt": "x"}', 400, "bad_request"),
            ("POST", "/ask/" + "x" * 129, b'{"prompt": "x"}', 400, "bad_request"),
            ("POST", "/ask/new", b'\xff\xfe', 400, "bad_request"),
            ("GET", "/conversations/nope", None, 404, "not_found"),
            ("GET", "/conversations?limit=abc", None, 400, "bad_request"),
            ("GET", "/conversations?limit=0", None, 400, "bad_request"),
            ("POST", "/conversations/nope/rollback", b'{"turns": 1}', 404, "not_found"),
            ("POST", "/conversations/x/rollback", b'{"turns": "two"}', 400, "bad_request"),
            ("DELETE", "/conversations/nope", None, 404, "not_found"),
            ("GET", "/no/such/route", None, 404, "not_found"),
            ("GET", "/ask/new", None, 405, "method_not_allowed"),
            ("POST", "/ask/new", b'{"prompt": "x", "parent_id": "msg_nope"}', 404, "not_found"),
        ]
        for method, path, raw, status, code in cases:
            got, body, headers = await call(method, self.url + path, raw=raw)
            self.assertEqual((got, body["error"]["code"]), (status, code), (method, path, raw))
            self.assertTrue(body["error"]["message"])
            self.assertEqual(headers.getRawHeaders("content-type"),
                             ["application/json; charset=utf-8"])

    async def test_no_escape(self) -> None:
        """
        When an id tries to climb out of its place, then the client gets a
        JSON 4xx and nothing is stored.
        """
        for path in ["/ask/..%2Fescape", "/ask/../escape", "/ask/a%2Fb"]:
            got, body, _ = await call("POST", self.url + path, raw=b'{"prompt": "x"}')
            self.assertTrue(400 <= got < 500, (path, got))
            self.assertIn("error", body)
        _, listed, _ = await call("GET", self.url + "/conversations")
        self.assertEqual(listed["conversations"], [])

    async def test_body_too_large(self) -> None:
        """When the body is over the limit, then 413 and nothing stored."""
        url = await serve_http(self, self.core, max_body=100)
        code, body, _ = await call("POST", url + "/ask/big", {"prompt": "x" * 200})
        self.assertEqual((code, body["error"]["code"]), (413, "request_too_large"))
        code, _, _ = await call("GET", url + "/conversations/big")
        self.assertEqual(code, 404)

    async def test_prompt_over_budget(self) -> None:
        """When the prompt alone exceeds the token budget, then 413."""
        core = await make_core(self, OfflineUpstream(_reactor(), interval=0),
                               CoreSettings(context_tokens=50, answer_tokens=10))
        url = await serve_http(self, core)
        code, body, _ = await call("POST", url + "/ask/new", {"prompt": "word " * 100})
        self.assertEqual((code, body["error"]["code"]), (413, "prompt_too_long"))

    async def test_cors(self) -> None:
        """
        When a browser sends a preflight, then it is allowed; answers carry
        the allowed origin; an origin not on the list gets no grant.
        """
        code, _, headers = await call("OPTIONS", self.url + "/ask/new", headers={
            "Origin": ["http://app.example"],
            "Access-Control-Request-Method": ["POST"],
            "Access-Control-Request-Headers": ["content-type"]})
        self.assertEqual(code, 204)
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), ["*"])
        self.assertIn("POST", headers.getRawHeaders("access-control-allow-methods")[0])
        url = await serve_http(self, self.core, cors_origins=("http://good.example",))
        _, _, headers = await call("GET", url + "/healthz", headers={"Origin": ["http://good.example"]})
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), ["http://good.example"])
        _, _, headers = await call("GET", url + "/healthz", headers={"Origin": ["http://evil.example"]})
        self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))

    async def test_health(self) -> None:
        """When asked, then /healthz and /readyz answer 200."""
        self.assertEqual((await call("GET", self.url + "/healthz"))[:2], (200, {"status": "ok"}))
        self.assertEqual((await call("GET", self.url + "/readyz"))[0], 200)


class UpstreamErrorTests(TestCase):
    """Upstream failures become statuses a client can act on."""

    async def test_statuses(self) -> None:
        """
        When the upstream fails, then the client gets 502 (with the
        upstream's status), 503 without an upstream, 504 on a timeout.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        url = await serve_http(self, core)
        for error, status, code in [
            (UpstreamError("bad request upstream", status=400), 502, "upstream_error"),
            (UpstreamUnavailable("upstream answered 500", status=500), 502, "upstream_unavailable"),
            (UpstreamRateLimited("slow down", status=429, retry_after=3), 502, "upstream_rate_limited"),
            (UpstreamTimeout("no answer in 10s"), 504, "upstream_timeout"),
        ]:
            next_call = upstream.next_call()
            d = ensureDeferred(call("POST", url + "/ask/e", {"prompt": "x"}))
            (await next_call).d.errback(error)
            got, body, _ = await d
            self.assertEqual((got, body["error"]["code"]), (status, code))
            if error.status:
                self.assertEqual(body["error"]["upstream_status"], error.status)
        core.upstream = None
        got, body, _ = await call("POST", url + "/ask/e", {"prompt": "x"})
        self.assertEqual((got, body["error"]["code"]), (503, "no_upstream"))
        self.assertIn("--offline", body["error"]["message"])
        self.assertEqual((await call("GET", url + "/readyz"))[0], 503)

    async def test_disconnect_cancels(self) -> None:
        """
        When the client goes away during an ask, then the upstream call is
        cancelled and nothing is stored.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        url = await serve_http(self, core)
        next_call = upstream.next_call()
        client = await RawClient.connect(int(url.rsplit(":", 1)[1]))
        client.send_post("/ask/gone", b'{"prompt": "bye"}')
        c = await next_call
        client.transport.loseConnection()
        await within(c.cancel_seen)
        self.assertTrue(c.cancelled)
        self.assertEqual((await call("GET", url + "/conversations/gone"))[0], 404)


def parse_events(raw: bytes) -> list[tuple[str, Any]]:
    """(event, decoded data) of each event; comments as ("comment", text)."""
    events: list[tuple[str, Any]] = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append(("comment", block[1:].strip()))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


class EventStreamTests(TestCase):
    """POST /ask/{id} as Server-Sent Events."""

    async def test_stream_by_accept_and_by_body(self) -> None:
        """
        When a client asks with C{Accept: text/event-stream} or
        C{"stream": true}, then it gets delta events that add up to the
        answer, then one done event with the JSON answer's fields.
        """
        core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        url = await serve_http(self, core)
        for headers, body in [({"Accept": ["text/event-stream"]}, {"prompt": "Hi there"}),
                              (None, {"prompt": "Hi there", "stream": True})]:
            code, raw, h = await call("POST", url + "/ask/sse", body, headers=headers)
            self.assertEqual(code, 200)
            self.assertEqual(h.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
            events = parse_events(raw)
            self.assertGreater(len(events), 2)
            self.assertEqual({e for e, _ in events[:-1]}, {"delta"})
            name, done = events[-1]
            self.assertEqual(name, "done")
            self.assertEqual("".join(d["text"] for _, d in events[:-1]), done["response"])
            self.assertEqual(done["conversation_id"], "sse")
            self.assertIn("Hi there", done["response"])

    async def test_error_event(self) -> None:
        """
        When the upstream fails during a stream, then the stream ends with
        an error event carrying the same code as the JSON error.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        url = await serve_http(self, core)
        next_call = upstream.next_call()
        d = ensureDeferred(call("POST", url + "/ask/x", {"prompt": "p", "stream": True}))
        c = await next_call
        c.piece("partial")
        c.d.errback(UpstreamUnavailable("upstream answered 503", status=503))
        code, raw, _ = await d
        self.assertEqual(parse_events(raw), [
            ("delta", {"text": "partial"}),
            ("error", {"code": "upstream_unavailable", "message": "upstream answered 503",
                       "upstream_status": 503}),
        ])
        self.assertEqual((await call("GET", url + "/conversations/x"))[0], 404)

    async def test_bad_request_is_plain_json(self) -> None:
        """When a streaming ask is malformed, then it gets the usual JSON 400."""
        core = await make_core(self, ScriptedUpstream())
        url = await serve_http(self, core)
        code, body, _ = await call("POST", url + "/ask/x", {"stream": True},
                                   headers={"Accept": ["text/event-stream"]})
        self.assertEqual((code, body["error"]["code"]), (400, "bad_request"))

    async def stream_on_a_clock(self, cid: str, headers: bytes = b"") -> tuple[Any, Any, Any]:
        """
        A streamed ask from a raw client, to a server whose keep-alives
        (every 15 s) run on a L{Clock}: the clock, the client, and the
        upstream call once it started.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        url = await serve_http(self, core, clock=clock, keepalive_interval=15)
        next_call = upstream.next_call()
        client = await RawClient.connect(int(url.rsplit(":", 1)[1]))
        client.send_post(f"/ask/{cid}", b'{"prompt": "p", "stream": true}', headers)
        return clock, client, await next_call

    async def test_headers_when_the_first_piece_is_slow(self) -> None:
        """
        When the first piece comes at once, then the headers go out with
        it; when no piece comes within a second, then the headers go out
        with a comment, so that the client sees its stream open.
        """
        clock, client, c = await self.stream_on_a_clock("slow", b"Connection: close\r\n")
        self.assertEqual(client.data, b"")
        waiting = client.next_data()
        clock.advance(1)
        await within(waiting)
        while b": keep-alive\n\n" not in client.data:
            await within(client.next_data())
        self.assertTrue(client.data.startswith(b"HTTP/1.1 200 OK\r\n"), client.data)
        self.assertNotIn(b"event:", client.data)
        c.piece("one")
        while b"event: delta" not in client.data:
            await within(client.next_data())
        c.finish()
        await within(client.lost)
        self.assertIn(b"event: done", client.data)

    async def test_keepalive_and_disconnect(self) -> None:
        """
        When the answer pauses longer than the keep-alive interval, then
        the stream gets a comment; when the client then goes away, the
        upstream call is cancelled.
        """
        clock, client, c = await self.stream_on_a_clock("ka")
        waiting = client.next_data()
        c.piece("one")
        await within(waiting)
        while b"event: delta" not in client.data:
            await within(client.next_data())
        waiting = client.next_data()
        clock.advance(15)
        await within(waiting)
        self.assertTrue(client.data.endswith(b": keep-alive\n\n\r\n"), client.data)
        client.transport.loseConnection()
        await within(c.cancel_seen)


class RawClient(Protocol):
    """A bare TCP client, to send a request and then vanish mid-answer."""

    def __init__(self) -> None:
        self.data = b""
        self._waiting: list[Deferred[None]] = []
        self.lost: Deferred[None] = Deferred()

    @classmethod
    async def connect(cls, port: int) -> "RawClient":
        from twisted.internet import reactor
        from twisted.internet.protocol import ClientCreator

        return await within(ClientCreator(reactor, cls).connectTCP("127.0.0.1", port))

    def send_post(self, path: str, body: bytes, headers: bytes = b"") -> None:
        self.transport.write(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), headers, body))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def next_data(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class KeysAndLimitsTests(TestCase):
    """API keys, per-key isolation, limits and metrics over HTTP."""

    async def setUp(self) -> None:
        from twisted.internet.task import Clock

        from easybackend.auth import KeyRing
        from easybackend.limits import Limiter
        from easybackend.observe import Observer

        self.clock = Clock()
        self.core = await make_core(
            self, OfflineUpstream(_reactor(), interval=0),
            limiter=Limiter(self.clock, asks_per_minute=3), observer=Observer())
        self.url = await serve_http(
            self, self.core, keys=KeyRing.parse(["alice:sk-alice", "bob:sk-bob"], "test"))

    def auth(self, key: str) -> dict[str, list[str]]:
        return {"Authorization": [f"Bearer {key}"]}

    async def test_key_required(self) -> None:
        """
        When keys are configured, then a request without a key or with a
        wrong one gets 401 with WWW-Authenticate, on every route but the
        health checks and /metrics.
        """
        for method, path in [("POST", "/ask/new"), ("GET", "/conversations"),
                             ("GET", "/conversations/x"), ("DELETE", "/conversations/x"),
                             ("POST", "/conversations/x/rollback"),
                             ("POST", "/v1/chat/completions"), ("GET", "/v1/models")]:
            for headers in [None, self.auth("sk-wrong")]:
                code, body, h = await call(method, self.url + path, {"prompt": "x"},
                                           headers=headers)
                self.assertEqual(code, 401, (method, path))
                self.assertEqual(h.getRawHeaders("www-authenticate"),
                                 ['Bearer realm="easybackend"'])
        for path in ["/healthz", "/readyz", "/metrics"]:
            self.assertEqual((await call("GET", self.url + path))[0], 200, path)

    async def test_isolation(self) -> None:
        """
        When alice made a conversation, then for bob it does not exist:
        404 on read, ask, rollback and delete, and his listing is empty.
        """
        code, answer, _ = await call("POST", self.url + "/ask/shared-id", {"prompt": "mine"},
                                     headers=self.auth("sk-alice"))
        self.assertEqual(code, 200)
        bob = self.auth("sk-bob")
        for method, path, body in [
            ("GET", "/conversations/shared-id", None),
            ("POST", "/ask/shared-id", {"prompt": "let me in"}),
            ("POST", "/conversations/shared-id/rollback", {"turns": 1}),
            ("DELETE", "/conversations/shared-id", None),
        ]:
            code, got, _ = await call(method, self.url + path, body, headers=bob)
            self.assertEqual((code, got["error"]["code"]), (404, "not_found"), path)
        _, listed, _ = await call("GET", self.url + "/conversations", headers=bob)
        self.assertEqual(listed["conversations"], [])
        _, view, _ = await call("GET", self.url + "/conversations/shared-id",
                                headers=self.auth("sk-alice"))
        self.assertEqual([m["content"] for m in view["messages"]][0], "mine")
        self.assertEqual(len(view["messages"]), 2)

    async def test_rate_limit(self) -> None:
        """
        When a key is over its asks per minute, then it gets 429 with
        Retry-After, while another key still passes.
        """
        alice = self.auth("sk-alice")
        for _ in range(3):
            self.assertEqual((await call("POST", self.url + "/ask/new", {"prompt": "x"},
                                         headers=alice))[0], 200)
        code, body, headers = await call("POST", self.url + "/ask/new", {"prompt": "x"},
                                         headers=alice)
        self.assertEqual((code, body["error"]["code"]), (429, "rate_limited"))
        self.assertEqual(headers.getRawHeaders("retry-after"), ["60"])
        self.assertEqual((await call("POST", self.url + "/ask/new", {"prompt": "x"},
                                     headers=self.auth("sk-bob")))[0], 200)
        self.clock.advance(60)
        self.assertEqual((await call("POST", self.url + "/ask/new", {"prompt": "x"},
                                     headers=alice))[0], 200)

    async def test_metrics(self) -> None:
        """
        When asks were answered, then /metrics shows them by transport and
        status, with latency and time-to-first-piece histograms.
        """
        await call("POST", self.url + "/ask/new", {"prompt": "x"}, headers=self.auth("sk-bob"))
        code, text, headers = await call("GET", self.url + "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        text = text.decode() if isinstance(text, bytes) else str(text)
        self.assertIn('easybackend_requests_total{kind="ask",status="ok",transport="http"} 1.0',
                      text)
        self.assertIn("easybackend_ask_first_piece_seconds_bucket", text)
        self.assertIn("easybackend_asks_in_flight 0.0", text)
        self.assertNotIn("sk-bob", text)
