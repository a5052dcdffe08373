"""
Tests for L{easybackend.testing.fake_upstream}: the fake OpenAI upstream
must speak OpenAI's wire format faithfully (every chunk is checked against
the C{openai} package's types), and its scripted faults must happen.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import treq
from openai import BaseModel as OpenAIModel
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

import easybackend
from easybackend.sse import SSEParser
from easybackend.testing.fake_upstream import (
    FakeUpstream,
    Hang,
    Reset,
    Status,
    Stream,
    answer_text,
    split_text,
)

WAIT = 10.0
BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ],
    "stream": True,
    "stream_options": {"include_usage": True},
}


def _no_extra(model: OpenAIModel, where: str = "") -> None:
    """Fail if C{model} or a model inside it has fields its type lacks."""
    if model.model_extra:
        raise AssertionError(f"unknown fields at {where or 'top'}: {model.model_extra}")
    for name in type(model).model_fields:
        value = getattr(model, name)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, OpenAIModel):
                _no_extra(item, f"{where}.{name}")


def validate(kind: type[OpenAIModel], value: dict[str, Any]) -> Any:
    """
    Validate C{value} as C{kind}: strict types, no unknown fields, and a
    round trip that gives back exactly C{value}.
    """
    model = kind.model_validate(value, strict=True)
    _no_extra(model)
    if model.model_dump(exclude_unset=True) != value:
        raise AssertionError(f"{kind.__name__} does not round-trip: {value}")
    return model


class Fetched:
    """One raw HTTP exchange with the fake."""

    def __init__(self, response: Any, body: bytes, error: Failure | None) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = body
        self.error = error

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return values[-1].decode("latin-1") if values else None

    def events(self) -> list[str]:
        """The data of each event of the body."""
        return [e.data for e in SSEParser().feed(self.body)]

    def chunks(self) -> list[dict[str, Any]]:
        """The decoded JSON chunks, without the final C{[DONE]}."""
        return [json.loads(e) for e in self.events() if e != "[DONE]"]

    def json(self) -> Any:
        return json.loads(self.body)


class FakeTestCase(TestCase):
    """Tests that talk to a listening fake over TCP."""

    async def start(self, **kwargs: Any) -> FakeUpstream:
        fake = FakeUpstream(reactor, **kwargs)
        await fake.listen()
        self.addCleanup(fake.stop)
        self.fake = fake
        self.client = HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        )
        return fake

    async def fetch(
        self,
        body: Any = BODY,
        path: str = "/chat/completions",
        method: str = "POST",
        headers: dict[bytes, list[bytes]] | None = None,
        url: str | None = None,
    ) -> Fetched:
        """Send a request and read the whole answer, even a broken one."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.client.request(
            method,
            url or self.fake.base_url + path,
            data=data,
            headers=headers or {b"content-type": [b"application/json"]},
            unbuffered=True,
        ).addTimeout(WAIT, reactor)
        parts: list[bytes] = []
        error = None
        try:
            await treq.collect(response, parts.append).addTimeout(WAIT, reactor)
        except ResponseFailed:
            error = Failure()
        return Fetched(response, b"".join(parts), error)


class WireFormatTests(FakeTestCase):
    """What the fake sends, checked against the C{openai} package's types."""

    async def test_chunks_validate_against_openai_types(self) -> None:
        """
        When a streamed answer is asked with usage, then every chunk is a
        valid C{ChatCompletionChunk}, with nothing unknown: the first delta
        has the role and empty content, the pieces follow, then a
        C{finish_reason} of C{"stop"}, a usage chunk with no choices, and
        C{[DONE]}.
        """
        await self.start()
        fetched = await self.fetch()
        self.assertEqual(fetched.code, 200)
        self.assertEqual(fetched.header("content-type"), "text/event-stream; charset=utf-8")
        self.assertEqual(fetched.events()[-1], "[DONE]")
        chunks = [validate(ChatCompletionChunk, c) for c in fetched.chunks()]
        self.assertEqual(len(chunks), 1 + 5 + 1 + 1)
        self.assertEqual(len({c.id for c in chunks}), 1)
        self.assertTrue(chunks[0].id.startswith("chatcmpl-"))
        self.assertEqual(
            (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content),
            ("assistant", ""),
        )
        pieces = [c.choices[0].delta.content for c in chunks[1:6]]
        self.assertEqual(pieces, split_text(answer_text(BODY), 5))
        self.assertEqual(chunks[6].choices[0].finish_reason, "stop")
        self.assertEqual(chunks[6].choices[0].delta.content, None)
        self.assertEqual(chunks[7].choices, [])
        assert chunks[7].usage is not None
        self.assertEqual(chunks[7].usage.completion_tokens, 5)
        self.assertEqual(
            chunks[7].usage.total_tokens,
            chunks[7].usage.prompt_tokens + chunks[7].usage.completion_tokens,
        )
        for raw in fetched.chunks()[:7]:
            self.assertIsNone(raw["usage"])

    async def test_no_usage_unless_asked(self) -> None:
        """
        When C{stream_options.include_usage} is not set, then no chunk has a
        C{usage} field and there is no usage chunk.
        """
        await self.start()
        body = dict(BODY)
        del body["stream_options"]
        fetched = await self.fetch(body)
        chunks = fetched.chunks()
        for chunk in chunks:
            validate(ChatCompletionChunk, chunk)
            self.assertNotIn("usage", chunk)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    async def test_completion_validates_against_openai_type(self) -> None:
        """
        When C{"stream"} is false or absent, then the answer is one valid
        C{ChatCompletion} holding the whole text and usage.
        """
        await self.start()
        for stream in [False, None]:
            body = dict(BODY, stream=stream)
            del body["stream_options"]
            if stream is None:
                del body["stream"]
            fetched = await self.fetch(body)
            self.assertEqual(fetched.header("content-type"), "application/json")
            completion = validate(ChatCompletion, fetched.json())
            self.assertEqual(completion.object, "chat.completion")
            self.assertEqual(completion.choices[0].message.content, answer_text(BODY))
            self.assertEqual(completion.choices[0].finish_reason, "stop")

    async def test_models(self) -> None:
        """
        When the model list is asked, then each entry is a valid C{Model}.
        """
        await self.start(models=("a", "b"))
        fetched = await self.fetch(None, "/models", "GET")
        listing = fetched.json()
        self.assertEqual(listing["object"], "list")
        models = [validate(Model, m) for m in listing["data"]]
        self.assertEqual([m.id for m in models], ["a", "b"])

    async def test_paths(self) -> None:
        """
        When the API is asked with or without the C{/v1} prefix, then it
        answers the same; an unknown path gets OpenAI's 404 error object.
        """
        fake = await self.start()
        root = f"http://127.0.0.1:{fake.port}"
        with_prefix = await self.fetch(url=root + "/v1/chat/completions")
        without = await self.fetch(url=root + "/chat/completions")
        self.assertEqual(
            [c["choices"] for c in with_prefix.chunks()],
            [c["choices"] for c in without.chunks()],
        )
        missing = await self.fetch(None, "/nothing", "GET")
        self.assertEqual(missing.code, 404)
        self.assertIn("Invalid URL", missing.json()["error"]["message"])
        wrong_method = await self.fetch(None, "/chat/completions", "GET")
        self.assertEqual(wrong_method.code, 405)

    async def test_answer_depends_on_request(self) -> None:
        """
        When two requests differ, then the answers differ; when they are the
        same, then the answers are the same.
        """
        await self.start()

        async def text(body: dict[str, Any]) -> str:
            fetched = await self.fetch(body)
            return "".join(
                c["choices"][0]["delta"].get("content") or ""
                for c in fetched.chunks()
                if c["choices"]
            )

        other = dict(BODY, messages=[{"role": "user", "content": "Bye"}])
        first, second, third = await text(BODY), await text(BODY), await text(other)
        self.assertEqual(first, second)
        self.assertEqual(first, "You said: Hello there (2 messages received)")
        self.assertEqual(third, "You said: Bye (1 message received)")

    async def test_max_tokens(self) -> None:
        """
        When C{max_tokens} is lower than the pieces, then the answer stops
        there with C{finish_reason} C{"length"}.
        """
        await self.start()
        fetched = await self.fetch(dict(BODY, max_tokens=2))
        chunks = fetched.chunks()
        self.assertEqual(len(chunks), 1 + 2 + 1 + 1)
        self.assertEqual(chunks[3]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[4]["usage"]["completion_tokens"], 2)

    async def test_split_newline_keepalive(self) -> None:
        """
        When the body is written one byte at a time with CRLF line ends and
        keep-alive comments, then it holds the same events as the plain one.
        """
        fake = await self.start()
        text = "naïve 😀 ok"
        fake.script(Stream(text=text), Stream(
            text=text, newline="\r\n", keepalive=True, chunk_size=1
        ))
        plain = await self.fetch()
        split = await self.fetch()
        self.assertIn(b"\r\n\r\n", split.body)
        self.assertIn(b": keep-alive\r\n\r\n", split.body)

        def strip(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in c.items() if k != "id"} for c in chunks]

        self.assertEqual(strip(plain.chunks()), strip(split.chunks()))

    async def test_split_at(self) -> None:
        """
        When the body is cut at given offsets, then it still arrives whole.
        """
        fake = await self.start()
        fake.script(Stream(text="😀", pieces=1))
        plain = await self.fetch()
        fake.script(Stream(text="😀", pieces=1, split_at=lambda body: [
            body.index("😀".encode()) + 1, body.index(b"\n\n") + 1
        ]))
        split = await self.fetch()
        self.assertEqual(len(plain.body), len(split.body))
        self.assertEqual(plain.events()[1:], [
            e.replace("chatcmpl-fake00000000000000000002", "chatcmpl-fake00000000000000000001")
            for e in split.events()[1:]
        ])


class ScenarioTests(FakeTestCase):
    """Scripted answers and faults."""

    async def test_script_then_default(self) -> None:
        """
        When scenarios are scripted, then the next requests get them in
        order, and later ones get the default.
        """
        fake = await self.start()
        fake.script(Status(500), Status(503))
        codes = [(await self.fetch()).code for _ in range(3)]
        self.assertEqual(codes, [500, 503, 200])
        self.assertEqual(
            [r.scenario for r in fake.requests], [Status(500), Status(503), fake.default]
        )

    async def test_status(self) -> None:
        """
        When a status is scripted, then the fake answers it with OpenAI's
        error object and any C{Retry-After}; or with the raw body given.
        """
        fake = await self.start()
        fake.script(
            Status(429, retry_after="5"),
            Status(400, message="bad temperature"),
            Status(502, body=b"<html>bad gateway</html>", content_type="text/html"),
        )
        limited = await self.fetch()
        self.assertEqual((limited.code, limited.header("retry-after")), (429, "5"))
        self.assertEqual(limited.json()["error"]["code"], "rate_limit_exceeded")
        bad = await self.fetch()
        self.assertEqual(bad.json()["error"]["message"], "bad temperature")
        self.assertEqual(bad.json()["error"]["type"], "invalid_request_error")
        gateway = await self.fetch()
        self.assertEqual(
            (gateway.code, gateway.header("content-type"), gateway.body),
            (502, "text/html", b"<html>bad gateway</html>"),
        )

    async def test_api_key(self) -> None:
        """
        When the fake has an API key, then requests without it or with a
        wrong one get 401 with OpenAI's error, and the right one passes.
        """
        await self.start(api_key="sk-right")
        missing = await self.fetch()
        wrong = await self.fetch(headers={b"authorization": [b"Bearer sk-wrong"]})
        right = await self.fetch(headers={b"authorization": [b"Bearer sk-right"]})
        self.assertEqual((missing.code, wrong.code, right.code), (401, 401, 200))
        self.assertIn("didn't provide an API key", missing.json()["error"]["message"])
        self.assertEqual(wrong.json()["error"]["code"], "invalid_api_key")

    async def test_bad_requests(self) -> None:
        """
        When the body is not JSON, or lacks the model or the messages, then
        the fake answers 400 with OpenAI's error object.
        """
        await self.start()
        for body, text in [
            (b"{not json", "could not parse"),
            ({"messages": [{"role": "user", "content": "x"}]}, "model"),
            ({"model": "m"}, "messages"),
            ({"model": "m", "messages": []}, "messages"),
        ]:
            fetched = await self.fetch(body)
            self.assertEqual(fetched.code, 400, body)
            self.assertIn(text, fetched.json()["error"]["message"])

    async def test_error_mid_stream(self) -> None:
        """
        When an error is scripted after a piece, then the role chunk and the
        piece come, then an error object, and the body ends without
        C{[DONE]}.
        """
        fake = await self.start()
        fake.script(Stream(fault="error", fault_after=1))
        fetched = await self.fetch()
        self.assertIsNone(fetched.error)
        chunks = fetched.chunks()
        self.assertEqual(len(chunks), 3)
        self.assertEqual(chunks[2]["error"]["type"], "server_error")
        self.assertNotIn("[DONE]", fetched.events())

    async def test_malformed(self) -> None:
        """
        When malformed data is scripted, then one data line is not JSON and
        the rest of the answer follows.
        """
        fake = await self.start()
        fake.script(Stream(fault="malformed", fault_after=2))
        events = (await self.fetch()).events()
        broken = []
        for event in events[:-1]:
            try:
                json.loads(event)
            except ValueError:
                broken.append(event)
        self.assertEqual(len(broken), 1)
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(len(events), 1 + 1 + 5 + 1 + 1 + 1)

    async def test_no_done(self) -> None:
        """
        When C{no_done} is scripted, then the whole answer comes and the
        body ends cleanly, without C{[DONE]}.
        """
        fake = await self.start()
        fake.script(Stream(fault="no_done"))
        fetched = await self.fetch()
        self.assertIsNone(fetched.error)
        self.assertEqual(len(fetched.chunks()), 8)
        self.assertNotIn("[DONE]", fetched.events())

    async def test_drop_and_reset_mid_stream(self) -> None:
        """
        When a drop or a reset is scripted after two pieces, then the body
        is cut short after them and the client sees the response fail.
        """
        fake = await self.start()
        for fault in ["drop", "reset"]:
            fake.script(Stream(fault=fault, fault_after=2))
            fetched = await self.fetch()
            self.assertIsNotNone(fetched.error, fault)
            self.assertEqual(len(fetched.chunks()), 3, fault)
        await self.assertFiresSoon(fake.requests[0].connection_lost)
        await self.assertFiresSoon(fake.requests[1].connection_lost)

    async def test_reset(self) -> None:
        """
        When a reset is scripted, then the client gets no answer; with
        C{after_headers}, then it gets the 200 headers and a failed body.
        """
        fake = await self.start()
        fake.script(Reset())
        with self.assertRaises(ResponseFailed):
            await self.fetch()
        fake.script(Reset(after_headers=True))
        fetched = await self.fetch()
        self.assertEqual(fetched.code, 200)
        self.assertEqual(fetched.body, b"")
        self.assertIsNotNone(fetched.error)

    async def test_hang_then_client_cancels(self) -> None:
        """
        When a hang is scripted and the client gives up, then the request
        was received, nothing was answered, and its C{connection_lost}
        fires.
        """
        fake = await self.start()
        fake.script(Hang())
        d = self.client.post(fake.base_url + "/chat/completions", json=BODY)
        received = await fake.wait_for_request(0).addTimeout(WAIT, reactor)
        self.assertEqual(received.body, BODY)
        d.cancel()  # no answer came: the request fails as cancelled
        with self.assertRaises(ResponseFailed) as raised:
            await d
        raised.exception.reasons[0].trap(CancelledError)
        await self.assertFiresSoon(received.connection_lost)

    async def test_hang_mid_stream(self) -> None:
        """
        When a hang is scripted after a piece, then the role chunk and the
        piece arrive and the body stays open until the fake stops.
        """
        fake = await self.start()
        fake.script(Stream(fault="hang", fault_after=1))
        response = await self.client.post(
            fake.base_url + "/chat/completions", json=BODY, unbuffered=True
        ).addTimeout(WAIT, reactor)
        events: list[str] = []
        two: Deferred[None] = Deferred()
        parser = SSEParser()

        def collect(data: bytes) -> None:
            events.extend(e.data for e in parser.feed(data))
            if len(events) >= 2 and not two.called:
                two.callback(None)

        done = treq.collect(response, collect)
        await two.addTimeout(WAIT, reactor)
        self.assertEqual(len(events), 2)
        self.assertFalse(done.called)
        await fake.stop()
        with self.assertRaises(ResponseFailed):
            await done.addTimeout(WAIT, reactor)

    async def test_interval_paces_pieces(self) -> None:
        """
        When an interval is set, then the pieces are written one by one on
        the reactor's schedule and the whole answer arrives.
        """
        fake = await self.start()
        fake.script(Stream(pieces=3, interval=0.01))
        fetched = await self.fetch()
        self.assertEqual(len(fetched.chunks()), 1 + 3 + 1 + 1)

    async def test_requests_recorded(self) -> None:
        """
        When requests arrive, then the fake records method, path, lower-cased
        headers, JSON body and the connection; persistent connections keep
        one number.
        """
        fake = await self.start()
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor)))
        self.addCleanup(client._agent._pool.closeCachedConnections)
        for _ in range(2):
            response = await client.post(
                fake.base_url + "/chat/completions", json=BODY,
                headers={b"X-Test": [b"yes"]},
            ).addTimeout(WAIT, reactor)
            await treq.content(response)
        first, second = fake.requests
        self.assertEqual((first.method, first.path), ("POST", "/v1/chat/completions"))
        self.assertEqual(first.headers["x-test"], "yes")
        self.assertEqual(first.body, BODY)
        self.assertEqual((first.connection, second.connection), (1, 1))
        self.assertFalse(first.connection_lost.called)

    async def test_stop_closes_connections(self) -> None:
        """
        When the fake stops with requests hanging, then their connections
        are closed and it stops listening.
        """
        fake = await self.start()
        fake.script(Hang())
        d = self.client.post(fake.base_url + "/chat/completions", json=BODY)
        received = await fake.wait_for_request(0).addTimeout(WAIT, reactor)
        await fake.stop()
        self.assertTrue(received.connection_lost.called)
        self.assertEqual(fake.open_connections, 0)
        with self.assertRaises(ResponseFailed):
            await d.addTimeout(WAIT, reactor)

    def assertFiresSoon(self, d: "Deferred[Any]") -> "Deferred[Any]":
        return d.addTimeout(WAIT, reactor)


class TextTests(SynchronousTestCase):
    """The default answer's text and its pieces."""

    def test_answer_text(self) -> None:
        """
        When a request has messages, then the answer echoes the last user
        message and counts the messages; content parts are joined.
        """
        self.assertEqual(
            answer_text({"messages": [{"role": "user", "content": "a"}]}),
            "You said: a (1 message received)",
        )
        self.assertEqual(
            answer_text(
                {
                    "messages": [
                        {"role": "user", "content": "first"},
                        {"role": "assistant", "content": "x"},
                        {"role": "user", "content": [
                            {"type": "text", "text": "se"},
                            {"type": "text", "text": "cond"},
                        ]},
                    ]
                }
            ),
            "You said: second (3 messages received)",
        )
        self.assertEqual(answer_text({}), "You said:  (0 messages received)")

    def test_split_text(self) -> None:
        """
        When a text is split, then the pieces are non-empty, nearly equal,
        and join back to it; fewer pieces come when the text is short.
        """
        self.assertEqual(split_text("abcdefg", 3), ["abc", "de", "fg"])
        self.assertEqual(split_text("ab", 5), ["a", "b"])
        self.assertEqual(split_text("", 5), [])
        self.assertEqual(split_text("abc", 0), [])
        for n in range(1, 30):
            pieces = split_text("You said: hello there", n)
            self.assertEqual("".join(pieces), "You said: hello there")
            self.assertTrue(all(pieces))


class _Lines(ProcessProtocol):
    def __init__(self) -> None:
        self.first_line: Deferred[str] = Deferred()
        self.ended: Deferred[Exception] = Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"\n" in self._out and not self.first_line.called:
            self.first_line.callback(self._out.split(b"\n")[0].decode())

    def processEnded(self, reason: Failure) -> None:
        if not self.first_line.called:
            self.first_line.errback(reason)
        self.ended.callback(reason.value)


class ProcessTests(FakeTestCase):
    """The fake as a process, for the benchmark."""

    async def test_run_as_process(self) -> None:
        """
        When run with C{python -m}, then it prints its port on one line once
        listening, and streams answers with the pieces asked for.
        """
        protocol = _Lines()
        root = os.path.dirname(os.path.dirname(os.path.abspath(easybackend.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        process = reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", "easybackend.testing.fake_upstream",
             "--port", "0", "--pieces", "3", "--interval", "0.001"],
            env=env,
        )
        try:
            line = await protocol.first_line.addTimeout(WAIT * 3, reactor)
            port = int(line)
            self.client = HTTPClient(
                Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
            )
            fetched = await self.fetch(url=f"http://127.0.0.1:{port}/v1/chat/completions")
            self.assertEqual(len(fetched.chunks()), 1 + 3 + 1 + 1)
            self.assertEqual(fetched.events()[-1], "[DONE]")
        finally:
            if not protocol.ended.called:
                process.signalProcess("TERM")
            reason = await protocol.ended.addTimeout(WAIT, reactor)
        self.assertIsNone(reason.signal)  # it stopped cleanly on TERM
