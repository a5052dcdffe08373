"""
Tests for L{easybackend.service}: the core every transport shares, over a
real SQLite store and a scripted upstream.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from easybackend.errors import (
    BadRequest,
    NoUpstream,
    NotFound,
    PromptTooLong,
    UpstreamUnavailable,
)
from easybackend.model import AskRequest, ChatMessage, ChatRequest, Completion, Usage
from easybackend.offline import OfflineUpstream
from easybackend.service import CoreSettings
from easybackend.testing.fixtures import make_core, within


class Call:
    """One call to L{ScriptedUpstream}: the test decides how it goes."""

    def __init__(self, request: ChatRequest, on_piece: Callable[[str], None]) -> None:
        self.request = request
        self.on_piece = on_piece
        self.cancelled = False
        #: fires when the core cancels this call
        self.cancel_seen: Deferred[None] = Deferred()
        self.d: Deferred[Completion] = Deferred(self._cancel)
        self.text = ""

    def _cancel(self, d: Deferred[Completion]) -> None:
        self.cancelled = True
        self.cancel_seen.callback(None)

    def piece(self, text: str) -> None:
        self.text += text
        self.on_piece(text)

    def finish(self, usage: Usage | None = None) -> None:
        self.d.callback(Completion(self.text, "scripted", "stop", usage))

    @property
    def prompts(self) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in self.request.messages]


class ScriptedUpstream:
    """An upstream whose every answer the test drives by hand."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.called: list[Deferred[Call]] = []

    def stream_chat(self, request: ChatRequest, on_piece: Callable[[str], None]) -> Deferred[Completion]:
        call = Call(request, on_piece)
        self.calls.append(call)
        if self.called:
            # Tell the test once the core is waiting on the answer.
            _reactor().callLater(0, self.called.pop(0).callback, call)
        return call.d

    def next_call(self) -> Deferred[Call]:
        """Fires with the next call, once it is made."""
        d: Deferred[Call] = Deferred()
        self.called.append(d)
        return within(d)


def ask(prompt: str, cid: str = "new", **kw: Any) -> AskRequest:
    return AskRequest(conversation_id=cid, prompt=prompt, **kw)


class AskTests(TestCase):
    """The core's ask: memory, serialization, cancellation."""

    async def test_new_conversation_stored(self) -> None:
        """
        When a client asks on C{new}, then it gets a fresh conversation id
        and the turn (prompt, then answer) is stored under it.
        """
        core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        pieces: list[str] = []
        answer = await core.ask(ask("Hello"), pieces.append)
        self.assertTrue(answer.conversation_id.startswith("c_"))
        self.assertEqual("".join(pieces), answer.text)
        self.assertIn("Hello", answer.text)
        self.assertEqual(answer.model, "offline")
        view = await core.get_conversation(answer.conversation_id)
        self.assertEqual(
            [(m.role, m.content) for m in view.messages],
            [("user", "Hello"), ("assistant", answer.text)],
        )
        self.assertEqual(view.conversation.leaf_id, answer.message_id)

    async def test_nul_refused(self) -> None:
        """
        When a prompt or system prompt holds the NUL character (which
        PostgreSQL cannot store), then the ask is refused as a bad request
        naming the field, before the upstream is called, and nothing is
        stored.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        for request, field in [(ask("a\x00b", "chat-1"), "prompt"),
                               (AskRequest("chat-1", "hi", system_prompt="\x00"), "system_prompt")]:
            with self.assertRaises(BadRequest) as caught:
                await core.ask(request, lambda p: None)
            self.assertIn(f'"{field}" must not hold the NUL character', str(caught.exception))
        self.assertEqual(upstream.calls, [])
        with self.assertRaises(NotFound):
            await core.get_conversation("chat-1")

    async def test_second_ask_sees_first_turn(self) -> None:
        """
        When a second ask arrives on a conversation, then the upstream gets
        the first turn before the new prompt.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        call = upstream.next_call()
        first = core.ask(ask("one", "chat-1"), lambda p: None)
        (await call).piece("first answer")
        upstream.calls[0].finish()
        await first
        call = upstream.next_call()
        second = core.ask(ask("two", "chat-1"), lambda p: None)
        c = await call
        self.assertEqual(c.prompts, [
            ("user", "one"), ("assistant", "first answer"), ("user", "two"),
        ])
        c.finish()
        await second

    async def test_first_prompt_is_system_message(self) -> None:
        """
        When the server has a first prompt, then a new conversation starts
        with it as the system message; a request's own system prompt wins,
        and later turns keep the conversation's.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream, CoreSettings(first_prompt="Be brief."))
        call = upstream.next_call()
        d = core.ask(ask("hi", "a"), lambda p: None)
        c = await call
        self.assertEqual(c.prompts[0], ("system", "Be brief."))
        c.finish()
        await d
        call = upstream.next_call()
        d = core.ask(ask("hi", "b", system_prompt="Speak French."), lambda p: None)
        c = await call
        self.assertEqual(c.prompts[0], ("system", "Speak French."))
        c.finish()
        await d
        call = upstream.next_call()
        d = core.ask(ask("again", "b", system_prompt="ignored"), lambda p: None)
        c = await call
        self.assertEqual(c.prompts[0], ("system", "Speak French."))
        c.finish()
        await d

    async def test_same_conversation_serialized(self) -> None:
        """
        When two asks arrive on one conversation, then the second reaches
        the upstream only after the first is stored, and sees it.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        call = upstream.next_call()
        first = core.ask(ask("one", "same"), lambda p: None)
        second = core.ask(ask("two", "same"), lambda p: None)
        c1 = await call
        self.assertEqual(len(upstream.calls), 1)
        call = upstream.next_call()
        c1.piece("A1")
        c1.finish()
        c2 = await call
        self.assertEqual(c2.prompts[-3:], [("user", "one"), ("assistant", "A1"), ("user", "two")])
        c2.finish()
        await first
        await second

    async def test_different_conversations_concurrent(self) -> None:
        """
        When asks arrive on two conversations, then both reach the upstream
        before either finishes.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        calls = [upstream.next_call(), upstream.next_call()]
        d1 = core.ask(ask("one", "x"), lambda p: None)
        d2 = core.ask(ask("two", "y"), lambda p: None)
        c1, c2 = await calls[0], await calls[1]
        c2.finish()
        c1.finish()
        await d1
        await d2

    async def test_cancel_stores_nothing(self) -> None:
        """
        When an ask is cancelled mid-answer, then the upstream call is
        cancelled, nothing is stored, and the next ask on the conversation
        goes ahead.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        call = upstream.next_call()
        d = core.ask(ask("one", "cx"), lambda p: None)
        c = await call
        c.piece("half")
        d.cancel()
        self.assertTrue(c.cancelled)
        self.failureResultOf(d, CancelledError)
        with self.assertRaises(NotFound):
            await core.get_conversation("cx")
        call = upstream.next_call()
        d = core.ask(ask("two", "cx"), lambda p: None)
        c = await call
        self.assertEqual(c.prompts, [("user", "two")])
        c.finish()
        await d

    async def test_cancel_while_waiting(self) -> None:
        """
        When an ask waiting behind another on the same conversation is
        cancelled, then it never reaches the upstream.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        call = upstream.next_call()
        first = core.ask(ask("one", "w"), lambda p: None)
        second = core.ask(ask("two", "w"), lambda p: None)
        c = await call
        second.cancel()
        self.failureResultOf(second, CancelledError)
        c.finish()
        await first
        self.assertEqual(len(upstream.calls), 1)

    async def test_upstream_failure_stores_nothing(self) -> None:
        """
        When the upstream fails mid-answer, then the ask fails with its
        error and the history is exactly as it was.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        call = upstream.next_call()
        d = core.ask(ask("one", "f"), lambda p: None)
        (await call).finish()
        await d
        call = upstream.next_call()
        d = core.ask(ask("two", "f"), lambda p: None)
        c = await call
        c.piece("partial")
        c.d.errback(UpstreamUnavailable("upstream answered 500", status=500))
        with self.assertRaises(UpstreamUnavailable):
            await d
        view = await core.get_conversation("f")
        self.assertEqual([m.content for m in view.messages], ["one", ""])

    async def test_no_upstream(self) -> None:
        """
        When no upstream is configured, then every ask fails with
        L{NoUpstream} saying how to configure one.
        """
        core = await make_core(self, None)
        with self.assertRaises(NoUpstream) as e:
            await core.ask(ask("hi"), lambda p: None)
        self.assertIn("OPENAI_API_KEY", str(e.exception))

    async def test_bad_conversation_id(self) -> None:
        """When the id could escape a folder or is too long, then L{BadRequest}."""
        core = await make_core(self, ScriptedUpstream())
        for bad in ["../etc", "a/b", "", "x" * 129, "sp ace"]:
            with self.assertRaises(BadRequest):
                await core.ask(ask("hi", bad), lambda p: None)
            with self.assertRaises(BadRequest):
                await core.get_conversation(bad)

    async def test_branch_from_parent(self) -> None:
        """
        When an ask names an earlier answer as C{parent_id}, then it
        continues from there, and the conversation's current branch
        becomes the new one; an unknown parent is L{NotFound}.
        """
        core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        a1 = await core.ask(ask("one", "br"), lambda p: None)
        await core.ask(ask("two", "br"), lambda p: None)
        a3 = await core.ask(ask("two again", "br", parent_id=a1.message_id), lambda p: None)
        view = await core.get_conversation("br")
        self.assertEqual(
            [m.content for m in view.messages if m.role == "user"], ["one", "two again"]
        )
        self.assertEqual(view.conversation.leaf_id, a3.message_id)
        with self.assertRaises(NotFound):
            await core.ask(ask("x", "br", parent_id="msg_nope"), lambda p: None)
        with self.assertRaises(NotFound):
            await core.ask(ask("x", "unknown-conv", parent_id=a1.message_id), lambda p: None)

    async def test_rollback_then_ask(self) -> None:
        """
        When the last turn is rolled back, then the next ask continues from
        the turn before it, and the old answer is still stored.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        for prompt in ["one", "two"]:
            call = upstream.next_call()
            d = core.ask(ask(prompt, "rb"), lambda p: None)
            c = await call
            c.piece(prompt.upper())
            c.finish()
            await d
        view = await core.rollback("rb", 1)
        self.assertEqual([m.content for m in view.messages], ["one", "ONE"])
        call = upstream.next_call()
        d = core.ask(ask("three", "rb"), lambda p: None)
        c = await call
        self.assertEqual([p[1] for p in c.prompts], ["one", "ONE", "three"])
        c.finish()
        await d
        with self.assertRaises(BadRequest):
            await core.rollback("rb", 0)
        with self.assertRaises(NotFound):
            await core.rollback("nope", 1)

    async def test_budget_drops_oldest_turns(self) -> None:
        """
        When the history does not fit in the context window, then the
        oldest turns are left out of the request (but stay stored), and a
        prompt that alone is too long is refused.
        """
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream, CoreSettings(context_tokens=120, answer_tokens=20))
        for i in range(4):
            call = upstream.next_call()
            d = core.ask(ask(f"question {i} " + "word " * 10, "bud"), lambda p: None)
            c = await call
            c.piece(f"answer {i} " + "word " * 10)
            c.finish()
            await d
        call = upstream.next_call()
        d = core.ask(ask("last", "bud"), lambda p: None)
        c = await call
        users = [content for role, content in c.prompts if role == "user"]
        self.assertEqual(users[-1], "last")
        self.assertLess(len(users), 5)
        self.assertTrue(users[0].startswith("question 3") or users[0].startswith("question 2"))
        self.assertEqual(c.prompts[0][0], "user")
        c.finish()
        await d
        with self.assertRaises(PromptTooLong):
            await core.ask(ask("word " * 200, "bud"), lambda p: None)
        view = await core.get_conversation("bud")
        self.assertEqual(len(view.messages), 10)

    async def test_list_and_delete(self) -> None:
        """
        When conversations exist, then they are listed newest first, and a
        deleted one is gone (a second delete is L{NotFound}).
        """
        core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        for cid in ["l1", "l2", "l3"]:
            await core.ask(ask("hi", cid), lambda p: None)
        listed = await core.list_conversations(10, 0)
        self.assertEqual([c.id for c in listed], ["l3", "l2", "l1"])
        self.assertEqual([c.id for c in await core.list_conversations(1, 1)], ["l2"])
        await core.delete_conversation("l2")
        with self.assertRaises(NotFound):
            await core.delete_conversation("l2")
        with self.assertRaises(NotFound):
            await core.get_conversation("l2")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class OwnerTests(TestCase):
    """Conversations belong to the key that made them."""

    async def test_other_owner_sees_nothing(self) -> None:
        """
        When one key made a conversation, then for another key it does not
        exist: reads, asks, rollback and delete are L{NotFound}, and its
        listing is empty; the owner still sees it.
        """
        core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        await core.ask(ask("mine", "owned", owner="alice"), lambda p: None)
        with self.assertRaises(NotFound):
            await core.get_conversation("owned", owner="bob")
        with self.assertRaises(NotFound):
            await core.ask(ask("theirs?", "owned", owner="bob"), lambda p: None)
        with self.assertRaises(NotFound):
            await core.rollback("owned", 1, owner="bob")
        with self.assertRaises(NotFound):
            await core.delete_conversation("owned", owner="bob")
        self.assertEqual(await core.list_conversations(10, 0, owner="bob"), [])
        self.assertEqual([c.id for c in await core.list_conversations(10, 0, owner="alice")],
                         ["owned"])
        view = await core.get_conversation("owned", owner="alice")
        self.assertEqual(len(view.messages), 2)


class AccessLogTests(TestCase):
    """Every ask leaves one access line and counts in the metrics."""

    def capture(self) -> list[dict]:
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        observer = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    async def test_access_line_without_content(self) -> None:
        """
        When an ask finishes, then one access line says its transport, key
        name, conversation, status, latency, time to first piece and
        tokens, and neither prompt nor answer by default.
        """
        from easybackend.observe import Observer

        events = self.capture()
        observer = Observer()
        core = await make_core(self, OfflineUpstream(_reactor(), interval=0), observer=observer)
        answer = await core.ask(ask("secret prompt text", "logged", owner="alice",
                                    transport="http", request_id="r1"), lambda p: None)
        access = [e["access"] for e in events if "access" in e]
        self.assertEqual(len(access), 1)
        line = access[0]
        self.assertEqual((line["transport"], line["kind"], line["status"], line["key"],
                          line["conversation_id"], line["request_id"]),
                         ("http", "ask", "ok", "alice", "logged", "r1"))
        self.assertGreaterEqual(line["first_piece"], 0)
        self.assertGreaterEqual(line["latency"], line["first_piece"])
        self.assertGreater(line["tokens_out"], 0)
        text = repr(events)
        self.assertNotIn("secret prompt text", text)
        self.assertNotIn(answer.text, text)
        self.assertEqual(observer.metrics.registry.get_sample_value(
            "easybackend_requests_total",
            {"transport": "http", "kind": "ask", "status": "ok"}), 1.0)

    async def test_failed_ask_logged_with_code(self) -> None:
        """When an ask fails, then its access line carries the error code; with
        content logging on, the prompt appears."""
        from easybackend.observe import Observer

        events = self.capture()
        core = await make_core(self, None, observer=Observer(log_content=True))
        with self.assertRaises(NoUpstream):
            await core.ask(ask("visible prompt"), lambda p: None)
        access = [e["access"] for e in events if "access" in e]
        self.assertEqual(access[0]["status"], "no_upstream")
        self.assertEqual(access[0]["prompt"], "visible prompt")


class DrainTests(TestCase):
    """Graceful shutdown in the core."""

    async def test_drain_waits_then_cancels(self) -> None:
        """
        When the server drains, then an ask that finishes within the grace
        period is stored, and one still running when it ends is cancelled
        and stores nothing.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream, clock=clock)
        calls = [upstream.next_call(), upstream.next_call()]
        quick = core.ask(ask("quick", "q"), lambda p: None)
        slow = core.ask(ask("slow", "s"), lambda p: None)
        c1, c2 = await calls[0], await calls[1]
        drained = core.drain(10)
        self.assertNoResult(drained)
        c1.finish()
        await quick
        self.assertNoResult(drained)
        clock.advance(10)
        self.assertTrue(c2.cancelled)
        self.failureResultOf(slow, CancelledError)
        self.assertEqual(await within(drained), 1)
        self.assertEqual(len((await core.get_conversation("q")).messages), 2)
        with self.assertRaises(NotFound):
            await core.get_conversation("s")

    async def test_drain_ends_after_callers_heard(self) -> None:
        """
        When the grace period ends, then the drain fires only after each
        cancelled ask's caller has had its outcome: at shutdown a transport
        tells its client the ask was cancelled before the connections are
        closed, instead of writing to a connection already closing.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        upstream = ScriptedUpstream()
        core = await make_core(self, upstream, clock=clock)
        call = upstream.next_call()
        slow = core.ask(ask("slow", "s"), lambda p: None)
        await call
        order: list[str] = []
        slow.addErrback(lambda f: order.append(f.type.__name__))
        core.drain(1).addCallback(lambda n: order.append(f"drained {n}"))
        clock.advance(1)
        self.assertEqual(order, ["CancelledError", "drained 1"])

    async def test_drain_idle(self) -> None:
        """When nothing is in flight, then draining is immediate."""
        core = await make_core(self, ScriptedUpstream())
        self.assertEqual(self.successResultOf(core.drain(10)), 0)


class LeafCheckTests(TestCase):
    """A turn continuing the leaf commits only if the leaf did not move."""

    async def test_stale_leaf_refused(self) -> None:
        """
        When a turn that continued the leaf is committed after another turn
        moved the leaf (its lock was lost), then it is refused with
        L{ConversationChanged} and nothing of it is stored.
        """
        from easybackend.errors import ConversationChanged
        from easybackend.model import Turn

        core = await make_core(self, OfflineUpstream(_reactor(), interval=0))
        first = await core.ask(ask("one", "lc"), lambda p: None)
        await core.ask(ask("two", "lc"), lambda p: None)
        stale = Turn(conversation_id="lc", parent_id=first.message_id, prompt="late",
                     prompt_tokens=1, answer="a", answer_tokens=1, model="m",
                     finish_reason="stop", usage=None, continues_leaf=True)
        with self.assertRaises(ConversationChanged):
            await core.store.commit_turn(stale, 0.0)
        view = await core.get_conversation("lc")
        self.assertEqual([m.content for m in view.messages if m.role == "user"], ["one", "two"])
        branched = Turn(conversation_id="lc", parent_id=first.message_id, prompt="branch",
                        prompt_tokens=1, answer="a", answer_tokens=1, model="m",
                        finish_reason="stop", usage=None, continues_leaf=False)
        await core.store.commit_turn(branched, 0.0)


class BranchCacheTests(TestCase):
    """A conversation's history is read from the store only when needed."""

    async def setUp(self) -> None:
        from easybackend.testing.fixtures import open_store

        #: the leaves whose history was read from the store
        self.reads: list[str | None] = []
        reads = self.reads

        class CountingStore:
            def __init__(self, store: Any) -> None:
                self._store = store

            def __getattr__(self, name: str) -> Any:
                return getattr(self._store, name)

            def turn_context(self, cid: str, *args: Any) -> Any:
                def read(context: Any) -> Any:
                    if context.history:
                        reads.append(context.leaf)
                    return context
                return self._store.turn_context(cid, *args).addCallback(read)

        self.upstream = ScriptedUpstream()
        self.core = await make_core(
            self, self.upstream, store=CountingStore(await open_store(self)))

    async def turn(self, prompt: str, cid: str,
                   parent_id: str | None = None) -> tuple[Call, Any]:
        """One turn whose answer is the prompt in capitals."""
        next_call = self.upstream.next_call()
        d = self.core.ask(ask(prompt, cid, parent_id=parent_id), lambda p: None)
        c = await next_call
        c.piece(prompt.upper())
        c.finish()
        return c, await d

    async def test_continuing_turns_read_no_history(self) -> None:
        """
        When turns continue a conversation, then its history is read from
        the store once at most; when the leaf moved elsewhere (a rollback,
        or another replica's turn), then the fresh branch is read and used.
        """
        reads = self.reads
        for prompt in ["one", "two", "three"]:
            await self.turn(prompt, "bc")
        self.assertEqual(reads, [])
        await self.core.rollback("bc", 1)
        reads.clear()
        c, _ = await self.turn("four", "bc")
        self.assertEqual(len(reads), 1)
        self.assertEqual([content for _, content in c.prompts],
                         ["one", "ONE", "two", "TWO", "four"])

    async def test_regenerate_reads_no_history(self) -> None:
        """
        When a turn continues an earlier message of the branch this server
        wrote last (a regenerate, C{parent_id}), then no history is read
        from the store, the upstream gets the branch down to that message,
        and the new turn becomes the branch that later turns continue; a
        parent off that branch is read from the store.
        """
        reads = self.reads
        answers = [(await self.turn(prompt, "rg"))[1] for prompt in ["one", "two", "three"]]
        c, again = await self.turn("two again", "rg", answers[0].message_id)
        self.assertEqual([content for _, content in c.prompts],
                         ["one", "ONE", "two again"])
        c, _ = await self.turn("next", "rg")
        self.assertEqual([content for _, content in c.prompts],
                         ["one", "ONE", "two again", "TWO AGAIN", "next"])
        self.assertEqual(reads, [])
        c, _ = await self.turn("three again", "rg", answers[1].message_id)
        self.assertEqual([content for _, content in c.prompts],
                         ["one", "ONE", "two", "TWO", "three again"])
        self.assertEqual(reads, [answers[1].message_id])
        view = await self.core.get_conversation("rg")
        self.assertEqual([m.content for m in view.messages if m.role == "user"],
                         ["one", "two", "three again"])


class BranchTests(SynchronousTestCase):
    """A kept branch: its messages, their ids and their token total."""

    def test_token_total_follows_the_messages(self) -> None:
        """
        When a branch is extended turn by turn and then cut at one of its
        messages (a regenerate), then its token total is always the sum of
        its messages' counts, which the budget uses without summing again.
        """
        from easybackend.service import Branch

        branch = Branch([ChatMessage("user", "a", 4), ChatMessage("assistant", "b", 6)],
                        ["m1", "m2"])
        self.assertEqual(branch.tokens, 10)
        for n in range(3, 9, 2):
            branch = branch.extended(f"m{n}", ChatMessage("user", "q", n),
                                     f"m{n + 1}", ChatMessage("assistant", "r", 1))
        self.assertEqual(branch.tokens, 10 + 3 + 5 + 7 + 3)
        self.assertEqual(branch.tokens, sum(m.tokens for m in branch.messages))
        cut = branch.upto("m4")
        assert cut is not None
        self.assertEqual((cut.ids, cut.tokens), (["m1", "m2", "m3", "m4"], 14))


class BranchCacheBoundsTests(SynchronousTestCase):
    """The kept branches stay within their bounds."""

    def known(self, messages: int) -> Any:
        from easybackend.service import Branch, Known

        branch = Branch([ChatMessage("user", "m")] * messages, ["id"] * messages)
        return Known(leaf="id", branch=branch, owner=None, system_prompt=None, model=None)

    def test_bounded_by_conversations_and_messages(self) -> None:
        """
        When more conversations, or more messages in all, are kept than the
        bounds allow, then the least recently used go first; a conversation
        longer than the message bound is not kept; replacing or forgetting
        a conversation gives its messages back.
        """
        from easybackend.service import BranchCache

        cache = BranchCache(size=3, messages=100)
        for cid in "abc":
            cache.put(cid, self.known(10))
        cache.latest("a")
        cache.put("d", self.known(10))
        self.assertIsNone(cache.latest("b"))
        self.assertEqual(cache.messages, 30)
        cache.put("e", self.known(85))
        self.assertEqual([cid for cid in "acde" if cache.latest(cid)], ["d", "e"])
        self.assertEqual(cache.messages, 95)
        cache.put("e", self.known(20))
        self.assertEqual(cache.messages, 30)
        cache.put("huge", self.known(101))
        self.assertIsNone(cache.latest("huge"))
        self.assertEqual(cache.messages, 0)
        cache.put("f", self.known(5))
        cache.forget("f")
        cache.forget("f")
        self.assertEqual(cache.messages, 0)

class TokenCountTests(TestCase):
    """Stored token counts come from the upstream when it counted them."""

    async def test_answer_tokens_from_usage(self) -> None:
        """
        When the upstream reports usage, then the answer's stored token
        count is its completion tokens plus the message overhead; without
        usage, the answer is counted here.
        """
        from easybackend.testing.fixtures import token_counter

        upstream = ScriptedUpstream()
        core = await make_core(self, upstream)
        overhead = token_counter().count_message("assistant", "")
        for usage, expected in [(Usage(5, 7, 12), overhead + 7),
                                (None, token_counter().count_message("assistant", "a b c"))]:
            next_call = upstream.next_call()
            d = core.ask(ask("q", "tk"), lambda p: None)
            c = await next_call
            c.piece("a b c")
            c.finish(usage)
            await d
            view = await core.get_conversation("tk")
            self.assertEqual(view.messages[-1].tokens, expected)
