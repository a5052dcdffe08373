"""
An upstream that needs no network: it answers with what it was given, to
show the conversation memory at work (C{--offline}, tests, demos).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from easybackend.model import ChatMessage, ChatRequest, Completion, Usage

#: The model name every offline answer reports.
MODEL = "offline"
#: Words per streamed piece.
WORDS_PER_PIECE = 3


def count_words(text: str) -> int:
    """A rough token count: the number of words."""
    return len(text.split())


def compose(messages: Sequence[ChatMessage]) -> str:
    """
    The offline answer to C{messages}: how many earlier turns it sees, the
    system prompt if any, the previous prompt if any, and the prompt.
    """
    system = next((m.content for m in messages if m.role == "system"), None)
    prompts = [m.content for m in messages if m.role == "user"]
    earlier = max(len(prompts) - 1, 0)
    parts = ["(offline model)"]
    if system is not None:
        parts.append(f"I follow the system prompt: \u201c{system}\u201d.")
    parts.append(
        f"I see {earlier or 'no'} earlier turn{'' if earlier == 1 else 's'} "
        "in this conversation."
    )
    if earlier:
        parts.append(f"Before this you said: \u201c{prompts[-2]}\u201d.")
    if prompts:
        parts.append(f"You said: \u201c{prompts[-1]}\u201d.")
    return " ".join(parts)


def split_pieces(text: str, words: int = WORDS_PER_PIECE) -> list[str]:
    """Cut C{text} into pieces of C{words} words; they join back to it."""
    tokens = re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    return ["".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]


@define
class OfflineUpstream:
    """
    An L{easybackend.model.Upstream} that streams a deterministic answer,
    one piece of a few words every C{interval} seconds of C{clock}.

    Tokens are counted by C{count_tokens} (words by default, a rough
    approximation; the prompt's are its messages' contents, without
    per-message overhead): an answer longer than C{request.max_tokens} is
    cut at a word with finish reason C{"length"}.
    """

    clock: IReactorTime
    interval: float = 0.02
    count_tokens: Callable[[str], int] = field(default=count_words)

    def list_models(self) -> "Deferred[list[str]]":
        """The one model there is."""
        return succeed([MODEL])

    def stream_chat(
        self, request: ChatRequest, on_piece: Callable[[str], None]
    ) -> "Deferred[Completion]":
        """
        Call C{on_piece} with each piece, the first one C{interval} seconds
        from now, then fire with the L{Completion}.  Cancelling stops the
        pieces at once.
        """
        text = compose(request.messages)
        finish_reason = "stop"
        if (
            request.max_tokens is not None
            and self.count_tokens(text) > request.max_tokens
        ):
            text = self._cut(text, request.max_tokens)
            finish_reason = "length"
        pieces = split_pieces(text)
        prompt_tokens = sum(self.count_tokens(m.content) for m in request.messages)
        completion_tokens = self.count_tokens(text)
        completion = Completion(
            text=text,
            model=MODEL,
            finish_reason=finish_reason,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )
        return _Recital(self.clock, self.interval, pieces, on_piece, completion).done

    def _cut(self, text: str, max_tokens: int) -> str:
        """The longest run of C{text}'s first words within C{max_tokens}."""
        words = re.findall(r"\s*\S+", text)
        low, high = 0, len(words)
        while low < high:
            middle = (low + high + 1) // 2
            if self.count_tokens("".join(words[:middle])) <= max_tokens:
                low = middle
            else:
                high = middle - 1
        return "".join(words[:low])


class _Recital:
    """
    One offline answer, a piece every C{interval} seconds.  It holds the
    next call only until it runs, so that a finished answer leaves no
    reference cycle behind (the call refers back to it).
    """

    def __init__(self, clock: IReactorTime, interval: float, pieces: list[str],
                 on_piece: Callable[[str], None], completion: Completion) -> None:
        self._clock = clock
        self._interval = interval
        self._pieces = pieces
        self._on_piece = on_piece
        self._completion = completion
        # Cancelling stops the pieces at once.
        self.done: Deferred[Completion] = Deferred(self._cancel)
        self._call: IDelayedCall | None = clock.callLater(interval, self._send, 0)

    def _cancel(self, d: Deferred[Completion]) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _send(self, index: int) -> None:
        self._call = None
        pieces = self._pieces
        if index < len(pieces):
            try:
                self._on_piece(pieces[index])
            except Exception:
                self.done.errback()
                return
            if self.done.called:  # on_piece cancelled us
                return
        if index + 1 < len(pieces):
            self._call = self._clock.callLater(self._interval, self._send, index + 1)
        else:
            self.done.callback(self._completion)
