"""
The core's failures.

Every failure the core reports is an L{EasyBackendError} with a stable
machine-readable C{code}.  The core knows nothing of transports: each
transport maps C{code} to its own form (an HTTP status, a gRPC status code,
a WebSocket C{error} message).
"""

from __future__ import annotations

import math


class EasyBackendError(Exception):
    """A failure the client should be told about, with a stable code."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(EasyBackendError):
    """The request is malformed: a missing field, a wrong type, a bad id."""

    code = "bad_request"


class NotFound(EasyBackendError):
    """The conversation or message does not exist."""

    code = "not_found"


class PromptTooLong(EasyBackendError):
    """The prompt alone does not fit in the model's token budget."""

    code = "prompt_too_long"


class RequestTooLarge(EasyBackendError):
    """The request body or message is over the configured size limit."""

    code = "request_too_large"


class NoUpstream(EasyBackendError):
    """No upstream is configured, so no ask can be answered."""

    code = "no_upstream"

    def __init__(self, message: str = (
        "no upstream configured: set OPENAI_API_KEY or OPENAI_BASE_URL, "
        "or start with --offline"
    )) -> None:
        super().__init__(message)


class UpstreamError(EasyBackendError):
    """
    The upstream answered with an error, or broke the stream.

    @ivar status: the upstream's HTTP status, or C{None} when the failure was
        not an HTTP status (a reset connection, a broken stream).
    @ivar retry_after: seconds the upstream asked us to wait, if it said so.
    """

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class UpstreamRateLimited(UpstreamError):
    """The upstream answered 429 and retries did not help."""

    code = "upstream_rate_limited"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, or answered 5xx after retries."""

    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer, or stalled, within the configured time."""

    code = "upstream_timeout"


def retry_seconds(error: EasyBackendError) -> int | None:
    """
    Whole seconds a client should wait before retrying after C{error},
    rounded up and at least 1 (as HTTP's C{Retry-After}), or C{None} when
    the error says nothing about it.
    """
    retry_after = getattr(error, "retry_after", None)
    if retry_after is None:
        return None
    return max(1, math.ceil(retry_after))


class Unauthenticated(EasyBackendError):
    """The API key is missing or wrong."""

    code = "unauthenticated"


class RateLimited(EasyBackendError):
    """
    The key is over one of its limits.

    @ivar retry_after: seconds after which a retry may succeed.
    """

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LockTimeout(EasyBackendError):
    """Another turn held the conversation for longer than the wait allowed."""

    code = "conversation_busy"


class ConversationChanged(LockTimeout):
    """
    The conversation moved on while an answer was being written (another
    replica committed a turn after this one's lock was lost): nothing of
    this turn is stored, so that no turn is lost.
    """
