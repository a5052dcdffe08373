"""
The OpenAI-compatible HTTP API: C{POST /v1/chat/completions} and
C{GET /v1/models}, in OpenAI's exact shapes, so that the official SDKs
pointed at C{http://host:8000/v1} work unchanged.

Without a conversation, the client's messages go to the upstream as they
are and nothing is stored.  With C{X-Conversation-Id: <id>} (or C{new}),
the stored history goes in front of the new message and the turn is
stored; the answer carries the id in the same header.

It only translates: OpenAI request bodies to core requests, core results
to OpenAI objects, and core errors to OpenAI's error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

from twisted.web.iweb import IRequest

from easybackend.errors import BadRequest, EasyBackendError, UpstreamError
from easybackend.model import NEW, AskRequest, ChatMessage, CompleteRequest, Usage
from easybackend.service import new_conversation_id
from easybackend.wire import json_string

CONVERSATION_HEADER = "x-conversation-id"
ROLES = {"system", "developer", "user", "assistant"}

#: OpenAI's error "type" for each HTTP status
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


def openai_status(error: EasyBackendError, status: int) -> int:
    """
    The status the SDK should see.  The upstream's own client errors
    (400, 404, 422, 429) pass through, so that the SDK raises the same
    exception it would against OpenAI; its 401/403 is our server's
    misconfiguration, a 502 for the client.
    """
    if isinstance(error, UpstreamError) and error.status in (400, 404, 409, 422, 429):
        return error.status
    return status


def openai_error(error: EasyBackendError, status: int) -> dict[str, Any]:
    """OpenAI's error object for a core error."""
    return {"error": {
        "message": error.message,
        "type": ERROR_TYPES.get(status, "api_error"),
        "param": None,
        "code": error.code,
    }}


def _text(content: Any, index: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise BadRequest(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts")


def parse_messages(body: dict[str, Any]) -> list[ChatMessage]:
    """The request's messages; L{BadRequest} naming the faulty one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest('"messages" must be a non-empty array')
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must be an object with a role of "
                             "system, developer, user or assistant")
        role = "system" if m["role"] == "developer" else m["role"]
        parsed.append(ChatMessage(role, _text(m.get("content"), i)))
    return parsed


def parse_options(body: dict[str, Any]) -> dict[str, Any]:
    """model, temperature and max_tokens, checked as the ask route checks them."""
    for unsupported in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(unsupported) is not None:
            raise BadRequest(f'"{unsupported}" is not supported by this server')
    n = body.get("n")
    if n not in (None, 1):
        raise BadRequest('"n" must be 1')
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options = AskRequest.from_mapping(NEW, {
        "prompt": "-", "model": body.get("model"), "temperature": body.get("temperature"),
        "max_tokens": max_tokens,
    })
    return {"model": options.model, "temperature": options.temperature,
            "max_tokens": options.max_tokens}


def ask_for(conversation_id: str, messages: list[ChatMessage], options: dict[str, Any],
            **common: Any) -> AskRequest:
    """
    The ask for a request with server-side memory: one new user message,
    optionally after a system message (the system prompt of a new
    conversation).  The history comes from the server, not the request.
    """
    *before, last = messages
    if last.role != "user" or any(m.role != "system" for m in before) or len(before) > 1:
        raise BadRequest(
            "with X-Conversation-Id, send only the new user message (optionally "
            "after one system message): the server keeps the history")
    if not last.content.strip():
        raise BadRequest("the user message must not be empty")
    return AskRequest(
        conversation_id=conversation_id,
        prompt=last.content,
        system_prompt=before[0].content if before else None,
        **options, **common)


class CompletionStream:
    """Writes one answer as OpenAI C{chat.completion.chunk} events."""

    def __init__(self, write: Callable[[bytes], None], model: str, include_usage: bool) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self._write = write
        self._include_usage = include_usage
        self._started = False
        self._piece_head: bytes | None = None
        self._piece_tail = b""

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
               usage: Usage | None = None, choices: bool = True) -> None:
        self._write(self._dumps(delta, finish_reason, usage, choices).encode("utf-8"))

    def _dumps(self, delta: dict[str, Any], finish_reason: str | None = None,
               usage: Usage | None = None, choices: bool = True) -> str:
        """One chunk as an SSE C{data:} event."""
        chunk = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}] if choices else [],
        }
        if usage is not None:
            chunk["usage"] = usage.to_dict()
        elif self._include_usage:
            chunk["usage"] = None
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._chunk({"role": "assistant", "content": ""})

    def piece(self, text: str) -> None:
        self.start()
        if self._piece_head is None:
            # self._chunk({"content": text}) with the text left out, made
            # once: each piece only adds its text
            marker = "\x00"
            # (the last one: a model name may hold the marker too)
            head, _, tail = self._dumps({"content": marker}).rpartition(json_string(marker))
            self._piece_head, self._piece_tail = head.encode("utf-8"), tail.encode("utf-8")
        self._write(self._piece_head + json_string(text).encode("utf-8") + self._piece_tail)

    def finish(self, model: str, finish_reason: str | None, usage: Usage | None) -> None:
        self.start()
        self.model = model
        self._chunk({}, finish_reason or "stop")
        if self._include_usage:
            self._chunk({}, usage=usage or Usage(), choices=False)
        self._write(b"data: [DONE]\n\n")

    def error(self, error: EasyBackendError, status: int) -> None:
        self._write(b"data: " + json.dumps(openai_error(error, status)).encode() + b"\n\n")


def completion_object(model: str, text: str, finish_reason: str | None,
                      usage: Usage | None) -> dict[str, Any]:
    """A non-streamed C{chat.completion}."""
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason or "stop",
        }],
        "usage": (usage or Usage()).to_dict(),
    }


def models_list(models: list[str], owned_by: str = "easybackend") -> dict[str, Any]:
    """OpenAI's C{GET /v1/models} answer."""
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": owned_by} for m in models
    ]}


def conversation_header(request: IRequest) -> str | None:
    """The requested conversation: an id, C{new} made into a fresh id, or None."""
    value = request.getHeader(CONVERSATION_HEADER)
    if value is None:
        return None
    value = value.strip()
    return new_conversation_id() if value == NEW else value


__all__ = [
    "CompleteRequest", "CompletionStream", "ask_for", "completion_object",
    "conversation_header", "models_list", "openai_error", "openai_status",
    "parse_messages", "parse_options",
]
