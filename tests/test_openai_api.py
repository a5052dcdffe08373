"""
Tests for L{easybackend.transports.openai_api}: the official C{openai}
SDK, pointed at EasyBackend, works unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import openai
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from easybackend.offline import OfflineUpstream
from easybackend.testing.fixtures import make_core, serve_http, within
from tests.test_service import ScriptedUpstream, _reactor


class SDKTests(TestCase):
    """The openai SDK as the client, streaming and not, with and without memory."""

    async def setUp(self) -> None:
        self.core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        self.url = await serve_http(self, self.core)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused",
                                    max_retries=0, timeout=10)
        self.addCleanup(self.client.close)

    def sdk(self, f: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run a blocking SDK call off the reactor thread."""
        return within(deferToThread(f, *args, **kw), 20)

    async def test_plain_completion(self) -> None:
        """
        When the SDK asks without a conversation, then it gets a
        chat.completion parsed into its own types, and nothing is stored.
        """
        result = await self.sdk(self.client.chat.completions.create, model="offline",
                                messages=[{"role": "user", "content": "Hi SDK"}])
        self.assertEqual(result.object, "chat.completion")
        self.assertEqual(result.choices[0].message.role, "assistant")
        self.assertIn("Hi SDK", result.choices[0].message.content)
        self.assertEqual(result.choices[0].finish_reason, "stop")
        self.assertGreater(result.usage.completion_tokens, 0)
        self.assertEqual(await self.core.list_conversations(10, 0), [])

    async def test_streaming_completion(self) -> None:
        """
        When the SDK streams, then its chunks add up to the answer, the
        last carries usage when asked for, and the stream ends cleanly.
        """
        def run() -> list[Any]:
            stream = self.client.chat.completions.create(
                model="offline", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Stream me"}])
            return list(stream)

        chunks = await self.sdk(run)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertIn("Stream me", text)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop")
        self.assertGreater(chunks[-1].usage.total_tokens, 0)
        self.assertEqual(chunks[-1].choices, [])

    async def test_conversation_memory(self) -> None:
        """
        When the SDK sends X-Conversation-Id: new, then the answer carries
        the new id in the same header; a second call with that id sees the
        first turn, and the turns are stored.
        """
        def turn(cid: str, prompt: str, stream: bool) -> tuple[str, str]:
            raw = self.client.chat.completions.with_raw_response.create(
                model="offline", stream=stream, extra_headers={"X-Conversation-Id": cid},
                messages=[{"role": "user", "content": prompt}])
            parsed = raw.parse()
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
            else:
                text = parsed.choices[0].message.content
            return raw.headers["x-conversation-id"], text

        cid, first = await self.sdk(turn, "new", "Remember me", False)
        self.assertTrue(cid.startswith("c_"))
        same, second = await self.sdk(turn, cid, "Do you?", True)
        self.assertEqual(same, cid)
        self.assertIn("1 earlier turn", second)
        view = await self.core.get_conversation(cid)
        self.assertEqual([m.content for m in view.messages if m.role == "user"],
                         ["Remember me", "Do you?"])

    async def test_errors_raise_sdk_exceptions(self) -> None:
        """
        When a request is bad or there is no upstream, then the SDK raises
        its usual exception types with the server's message.
        """
        with self.assertRaises(openai.BadRequestError) as e:
            await self.sdk(self.client.chat.completions.create, model="offline", messages=[])
        self.assertIn("messages", str(e.exception))
        with self.assertRaises(openai.BadRequestError):
            await self.sdk(self.client.chat.completions.create, model="offline",
                           extra_headers={"X-Conversation-Id": "bad id!"},
                           messages=[{"role": "user", "content": "x"}])
        self.core.upstream = None
        with self.assertRaises(openai.InternalServerError) as e:
            await self.sdk(self.client.chat.completions.create, model="offline",
                           messages=[{"role": "user", "content": "x"}])
        self.assertEqual(e.exception.status_code, 503)

    async def test_models(self) -> None:
        """When the SDK lists models, then it sees the upstream's."""
        models = await self.sdk(self.client.models.list)
        self.assertEqual([m.id for m in models.data], ["offline"])


class UpstreamFailureTests(TestCase):
    """Upstream errors keep OpenAI's shape."""

    async def rate_limited(self, **options: Any) -> Any:
        """
        The SDK's C{create} call (in a thread) whose upstream answered 429
        with C{Retry-After: 2}.
        """
        from easybackend.errors import UpstreamRateLimited

        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        url = await serve_http(self, core)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
        self.addCleanup(client.close)
        next_call = upstream.next_call()
        d = deferToThread(client.chat.completions.create, model="m",
                          messages=[{"role": "user", "content": "x"}], **options)
        (await next_call).d.errback(UpstreamRateLimited("slow down", status=429, retry_after=2))
        return d

    async def test_rate_limit_passes_through(self) -> None:
        """When the upstream answers 429, then the SDK raises RateLimitError."""
        with self.assertRaises(openai.RateLimitError):
            await within(await self.rate_limited(), 20)

    async def test_streamed_rate_limit_before_the_first_chunk(self) -> None:
        """
        When a streamed request fails upstream before its first chunk, then
        it is still an HTTP error, and the SDK raises RateLimitError when
        the stream is created, as it would against OpenAI.
        """
        with self.assertRaises(openai.RateLimitError) as raised:
            await within(await self.rate_limited(stream=True), 20)
        self.assertEqual(raised.exception.response.headers.get("retry-after"), "2")


class CompletionStreamTests(TestCase):
    """The chunks of a streamed answer, as bytes on the wire."""

    def test_pieces_with_any_text(self) -> None:
        """
        When pieces hold quotes, backslashes, newlines, control and
        non-ASCII characters, and the model's name holds the character the
        chunk template is cut at, then every content chunk is one
        C{chat.completion.chunk} whose delta is exactly the piece.
        """
        import json

        from easybackend.transports.openai_api import CompletionStream

        written: list[bytes] = []
        stream = CompletionStream(written.append, "odd\x00model", include_usage=True)
        texts = ['say "hi"\\', "line\nnext\x00\x1f", "é 日本 \u2028 \U0001f600", ""]
        for text in texts:
            stream.piece(text)
        chunks = [json.loads(w.decode("utf-8").removeprefix("data: ")) for w in written]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual([c["choices"][0]["delta"] for c in chunks[1:]],
                         [{"content": t} for t in texts])
        for c in chunks:
            self.assertEqual((c["object"], c["model"], c["usage"], c["id"]),
                             ("chat.completion.chunk", "odd\x00model", None, stream.id))
            self.assertTrue(all(w.endswith(b"\n\n") and w.count(b"\n\n") == 1 for w in written))
