"""Tests for L{easybackend.offline}."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from easybackend.model import ChatMessage, ChatRequest, Completion
from easybackend.offline import OfflineUpstream


def request(
    *prompts: str, system: str | None = None, max_tokens: int | None = None
) -> ChatRequest:
    """A request asking C{prompts[-1]} after turns asking the others."""
    messages = [ChatMessage("system", system)] if system is not None else []
    for prompt in prompts[:-1]:
        messages += [ChatMessage("user", prompt), ChatMessage("assistant", "ok")]
    messages.append(ChatMessage("user", prompts[-1]))
    return ChatRequest(model="gpt-4o-mini", messages=messages, max_tokens=max_tokens)


class OfflineUpstreamTests(SynchronousTestCase):
    """Tests for L{OfflineUpstream}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = OfflineUpstream(self.clock, interval=0.5)

    def run_chat(
        self, chat: ChatRequest, upstream: OfflineUpstream | None = None
    ) -> tuple[list[str], Completion]:
        """Stream C{chat} to its end; return the pieces and the completion."""
        upstream = upstream or self.upstream
        pieces: list[str] = []
        d = upstream.stream_chat(chat, pieces.append)
        assert isinstance(upstream.clock, Clock)
        upstream.clock.pump([upstream.interval] * 1000)
        return pieces, self.successResultOf(d)

    def test_piecesOneIntervalApart(self) -> None:
        """
        When streaming, then one piece arrives every interval, the first
        one interval after the call, and the Deferred fires with the last
        piece with the text they make.
        """
        pieces: list[str] = []
        d = self.upstream.stream_chat(request("Hello"), pieces.append)
        self.assertEqual(pieces, [])
        seen = 0
        while not d.called:
            self.clock.advance(0.49)
            self.assertEqual(len(pieces), seen)
            self.clock.advance(0.01)
            seen += 1
            self.assertEqual(len(pieces), seen)
        self.assertGreater(seen, 3)
        self.assertEqual("".join(pieces), self.successResultOf(d).text)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fewWordsPerPiece(self) -> None:
        """Each piece is a few words, never empty."""
        pieces, _ = self.run_chat(request("one two three four five"))
        for piece in pieces:
            self.assertTrue(piece.strip())
            self.assertLessEqual(len(piece.split()), 3)

    def test_earlierTurnsAndPrompt(self) -> None:
        """
        When there are earlier turns, then the answer says how many, quotes
        the previous prompt and quotes the prompt.
        """
        _, completion = self.run_chat(request("Hi", "My name is Ada", "Hello"))
        self.assertIn("I see 2 earlier turns in this conversation.", completion.text)
        self.assertIn("\u201cMy name is Ada\u201d", completion.text)
        self.assertIn("You said: \u201cHello\u201d.", completion.text)

    def test_oneEarlierTurn(self) -> None:
        """When there is one earlier turn, then it says so in the singular."""
        _, completion = self.run_chat(request("Hi", "Hello"))
        self.assertIn("I see 1 earlier turn in", completion.text)

    def test_noEarlierTurns(self) -> None:
        """
        When the prompt is the first, then the answer says there are no
        earlier turns.
        """
        _, completion = self.run_chat(request("Hello"))
        self.assertEqual(
            completion.text,
            "(offline model) I see no earlier turns in this conversation. "
            "You said: \u201cHello\u201d.",
        )

    def test_systemPrompt(self) -> None:
        """When there is a system prompt, then the answer quotes it."""
        _, completion = self.run_chat(request("Hello", system="Be brief."))
        self.assertIn("\u201cBe brief.\u201d", completion.text)

    def test_completion(self) -> None:
        """
        The completion names model C{"offline"}, finishes with C{"stop"} and
        counts words as tokens.
        """
        _, completion = self.run_chat(request("Hello there"))
        self.assertEqual((completion.model, completion.finish_reason),
                         ("offline", "stop"))
        assert completion.usage is not None
        words = len(completion.text.split())
        self.assertEqual(
            (completion.usage.prompt_tokens, completion.usage.completion_tokens,
             completion.usage.total_tokens),
            (2, words, 2 + words),
        )

    def test_countTokens(self) -> None:
        """When given C{count_tokens}, then usage counts with it."""
        upstream = OfflineUpstream(self.clock, count_tokens=len)
        _, completion = self.run_chat(request("Hello"), upstream)
        assert completion.usage is not None
        self.assertEqual(completion.usage.prompt_tokens, 5)
        self.assertEqual(completion.usage.completion_tokens, len(completion.text))

    def test_maxTokens(self) -> None:
        """
        When the answer is longer than C{max_tokens}, then it is cut there
        with finish reason C{"length"}.
        """
        pieces, completion = self.run_chat(request("Hello", max_tokens=4))
        self.assertEqual(completion.text, "(offline model) I see")
        self.assertEqual("".join(pieces), completion.text)
        self.assertEqual(completion.finish_reason, "length")
        assert completion.usage is not None
        self.assertEqual(completion.usage.completion_tokens, 4)

    def test_cancel(self) -> None:
        """
        When the Deferred is cancelled, then no more pieces arrive and
        nothing stays scheduled.
        """
        pieces: list[str] = []
        d = self.upstream.stream_chat(request("Hello"), pieces.append)
        self.clock.advance(0.5)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(pieces), 1)

    def test_cancelInPiece(self) -> None:
        """
        When C{on_piece} cancels the Deferred, then no more pieces arrive.
        """
        pieces: list[str] = []

        def on_piece(piece: str) -> None:
            pieces.append(piece)
            d.cancel()

        d = self.upstream.stream_chat(request("Hello"), on_piece)
        self.clock.advance(100)
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(pieces), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_onPieceFails(self) -> None:
        """
        When C{on_piece} raises, then the Deferred fails with its error and
        streaming stops.
        """
        def on_piece(piece: str) -> None:
            raise ZeroDivisionError()

        d = self.upstream.stream_chat(request("Hello"), on_piece)
        self.clock.advance(0.5)
        self.failureResultOf(d, ZeroDivisionError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deterministic(self) -> None:
        """The same request gives the same pieces."""
        chat = request("Hi", "Hello", system="Be brief.")
        self.assertEqual(
            self.run_chat(chat),
            self.run_chat(chat, OfflineUpstream(Clock(), interval=0.5)),
        )
