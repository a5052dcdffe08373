"""
What the HTTP port serves to people rather than programs: the chat page at
C{/}, the OpenAPI document at C{/openapi.json}, and Swagger UI at C{/docs}
from assets installed with the package (never a CDN).
"""

from __future__ import annotations

import json
import re
from copy import deepcopy
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.static import Data, File

__all__ = ["index_html", "openapi_document", "docs_resource", "swagger_ui_assets"]


@cache
def index_html() -> bytes:
    """The chat page, read once from the package's C{static} folder."""
    return resources.files("easybackend").joinpath("static/index.html").read_bytes()


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every HTTP route (a fresh copy)."""
    return deepcopy(_document())


# -- /docs ------------------------------------------------------------------

#: The oldest Swagger UI that renders OpenAPI 3.1.
SWAGGER_UI_MAJOR = 5

_DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>EasyBackend API</title>
<link rel="stylesheet" href="swagger-ui.css">
<link rel="stylesheet" href="index.css">
<link rel="icon" type="image/png" href="favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="swagger-ui-bundle.js"></script>
<script src="swagger-ui-standalone-preset.js"></script>
<script src="swagger-initializer.js"></script>
</body>
</html>
"""

# The document lives at /openapi.json, next to /docs/; the key the chat page
# keeps is offered to "Authorize".
_DOCS_INITIALIZER = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: new URL("../openapi.json", window.location.href).href,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
    onComplete: function () {
      var key = null;
      try { key = window.localStorage.getItem("easybackend.apiKey"); } catch (e) {}
      if (key) { window.ui.preauthorizeApiKey("bearerAuth", key); }
    },
  });
};
"""


def swagger_ui_assets() -> Path:
    """
    The folder of Swagger UI's static files, as the C{swagger-ui-bundle-v2}
    distribution installs it (its import name is C{swagger_ui_bundle}).

    @raise RuntimeError: it is missing, or too old to render OpenAPI 3.1.
    """
    try:
        vendor = Path(str(resources.files("swagger_ui_bundle").joinpath("vendor")))
    except ModuleNotFoundError:
        raise RuntimeError("Swagger UI is not installed: pip install swagger-ui-bundle-v2") from None
    found = []
    for folder in vendor.glob("swagger-ui-*"):
        match = re.fullmatch(r"swagger-ui-(\d+)\.(\d+)\.(\d+)", folder.name)
        if match and (folder / "swagger-ui-bundle.js").is_file():
            found.append((tuple(int(n) for n in match.groups()), folder))
    if not found:
        raise RuntimeError(f"no Swagger UI assets under {vendor}")
    version, folder = max(found)
    if version[0] < SWAGGER_UI_MAJOR:
        raise RuntimeError(
            f"Swagger UI {'.'.join(map(str, version))} cannot render OpenAPI 3.1: "
            "uninstall swagger-ui-bundle and install swagger-ui-bundle-v2"
        )
    return folder


class _NotFound(Resource):
    """The JSON 404 every other route answers with."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps({"error": {"code": "not_found", "message": "no such route"}}).encode()


class _Docs(Resource):
    """
    C{/docs}: redirects to C{/docs/}, which is Swagger UI's page, so that
    the page's relative asset URLs resolve under C{/docs/}.
    """

    def __init__(self, assets: Path) -> None:
        super().__init__()
        page = Data(_DOCS_PAGE, "text/html; charset=utf-8")
        self._children: dict[bytes, IResource] = {
            b"": page,
            b"index.html": page,
            b"swagger-initializer.js": Data(_DOCS_INITIALIZER, "text/javascript; charset=utf-8"),
        }
        for path in assets.iterdir():
            name = path.name.encode("utf-8")
            if path.is_file() and name not in self._children and path.suffix != ".j2":
                self._children[name] = File(str(path))

    def render_GET(self, request: IRequest) -> bytes:
        # Relative, so that it also works where the site is mounted under a prefix.
        last = request.prepath[-1] if request.prepath else b"docs"
        request.setResponseCode(301)
        request.setHeader(b"location", last + b"/")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"see /docs/\n"

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        if request.postpath:  # nothing under /docs/ is a folder
            return _NotFound()
        return self._children.get(path) or _NotFound()


@cache
def _docs() -> _Docs:
    return _Docs(swagger_ui_assets())


def docs_resource() -> IResource:
    """Swagger UI, served from the installed package's assets."""
    return _docs()


# -- the OpenAPI document ---------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, example: Any = None,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON answer."""
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    answer = {"description": description, "content": {"application/json": media}}
    if headers:
        answer["headers"] = headers
    return answer


def _errors(*names: str) -> dict[str, Any]:
    """The error answers C{names}, by status, from C{components.responses}."""
    return {STATUS_OF[name]: {"$ref": f"#/components/responses/{name}"} for name in names}


#: Each shared error answer's status.
STATUS_OF = {
    "BadRequest": "400",
    "Unauthenticated": "401",
    "NotFound": "404",
    "TooLarge": "413",
    "RateLimited": "429",
    "UpstreamFailed": "502",
    "NoUpstream": "503",
    "UpstreamTimeout": "504",
    "OpenAIBadRequest": "400",
    "OpenAIUnauthenticated": "401",
    "OpenAIRateLimited": "429",
    "OpenAIUpstreamFailed": "502",
    "OpenAINoUpstream": "503",
    "OpenAIUpstreamTimeout": "504",
}

#: Routes that need a key when the server has keys (and are open otherwise).
_KEYED = [{"bearerAuth": []}, {}]
#: Routes that never need a key.
_OPEN: list[dict[str, Any]] = []

_CID = {"$ref": "#/components/parameters/ConversationId"}

_SSE_ASK = """\
event: delta
data: {"text": "(offline model) I "}

event: delta
data: {"text": "see no earlier turns"}

event: done
data: {"conversation_id": "c_3f0c", "message_id": "msg_1", "response": "(offline model) I see no earlier turns", "model": "offline", "usage": {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8}, "finish_reason": "stop"}

"""

_SSE_OPENAI = """\
data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": null}]}

data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}

data: [DONE]

"""

_ERROR_CODES = [
    "bad_request", "unauthenticated", "not_found", "method_not_allowed",
    "request_too_large", "prompt_too_long", "rate_limited", "upstream_error",
    "upstream_unavailable", "upstream_rate_limited", "no_upstream",
    "upstream_timeout", "internal",
]


def _schemas() -> dict[str, Any]:
    string_or_null = {"type": ["string", "null"]}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": _ERROR_CODES},
                    "message": {"type": "string"},
                    "upstream_status": {
                        "type": "integer",
                        "description": "the upstream's HTTP status, on upstream_* errors",
                    },
                },
            }},
            "example": {"error": {"code": "not_found", "message": "conversation 'x' not found"}},
        },
        "AskRequest": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "minLength": 1},
                "system_prompt": {"type": "string",
                                  "description": "for a new conversation"},
                "model": {"type": "string"},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "max_tokens": {"type": "integer", "minimum": 1},
                "parent_id": {"type": "string", "description":
                              "continue from this message instead of the latest "
                              "one: branches the conversation"},
                "stream": {"type": "boolean", "description":
                           "true: answer with Server-Sent Events, as with "
                           "Accept: text/event-stream"},
            },
            "example": {"prompt": "Hello", "system_prompt": "Be brief."},
        },
        "Usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {name: {"type": "integer", "minimum": 0} for name in
                           ["prompt_tokens", "completion_tokens", "total_tokens"]},
        },
        "Answer": {
            "type": "object",
            "required": ["conversation_id", "message_id", "response", "model",
                         "usage", "finish_reason"],
            "properties": {
                "conversation_id": {"type": "string"},
                "message_id": {"type": "string"},
                "response": {"type": "string"},
                "model": {"type": "string"},
                "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
                "finish_reason": string_or_null,
            },
        },
        "Conversation": {
            "type": "object",
            "required": ["id", "title", "system_prompt", "model", "created",
                         "updated", "current_message_id"],
            "properties": {
                "id": {"type": "string"},
                "title": {"type": "string"},
                "system_prompt": string_or_null,
                "model": string_or_null,
                "created": {"type": "number", "description": "seconds since the epoch"},
                "updated": {"type": "number", "description": "seconds since the epoch"},
                "current_message_id": string_or_null,
            },
        },
        "Message": {
            "type": "object",
            "required": ["id", "parent_id", "role", "content", "tokens", "created",
                         "model", "finish_reason", "usage"],
            "properties": {
                "id": {"type": "string"},
                "parent_id": string_or_null,
                "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                "content": {"type": "string"},
                "tokens": {"type": "integer"},
                "created": {"type": "number"},
                "model": string_or_null,
                "finish_reason": string_or_null,
                "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
            },
        },
        "ConversationView": {
            "description": "a conversation and its current branch's messages, root first",
            "allOf": [_ref("Conversation"), {
                "type": "object",
                "required": ["messages"],
                "properties": {"messages": {"type": "array", "items": _ref("Message")}},
            }],
        },
        "ConversationList": {
            "type": "object",
            "required": ["conversations", "limit", "offset", "next_offset"],
            "properties": {
                "conversations": {"type": "array", "items": _ref("Conversation")},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
                "next_offset": {"type": ["integer", "null"],
                                "description": "the next page's offset; null on the last page"},
            },
        },
        "Deleted": {
            "type": "object",
            "required": ["id", "deleted"],
            "properties": {"id": {"type": "string"}, "deleted": {"const": True}},
        },
        "Rollback": {
            "type": "object",
            "properties": {"turns": {"type": "integer", "minimum": 1, "default": 1}},
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}},
        },
        # OpenAI's shapes, as much as clients rely on; the rest passes through.
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": string_or_null,
                    "code": string_or_null,
                },
            }},
        },
        "ChatMessage": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"type": "string",
                         "enum": ["system", "developer", "user", "assistant", "tool"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]},
                "name": {"type": "string"},
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "additionalProperties": True,
            "properties": {
                "model": {"type": "string"},
                "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                "stream": {"type": "boolean", "default": False},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "max_tokens": {"type": "integer", "minimum": 1},
                "max_completion_tokens": {"type": "integer", "minimum": 1},
                "stream_options": {"type": "object",
                                   "properties": {"include_usage": {"type": "boolean"}}},
            },
            "example": {"model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "Hello"}]},
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"},
                                           "content": string_or_null},
                        },
                        "finish_reason": string_or_null,
                    },
                }},
                "usage": _ref("Usage"),
            },
        },
        "ChatCompletionChunk": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion.chunk"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {
                    "type": "object",
                    "required": ["index", "delta"],
                    "properties": {
                        "index": {"type": "integer"},
                        "delta": {"type": "object", "properties": {
                            "role": {"type": "string"}, "content": string_or_null}},
                        "finish_reason": string_or_null,
                    },
                }},
                "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {
                    "type": "object",
                    "required": ["id", "object"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                    },
                }},
            },
        },
    }


def _responses() -> dict[str, Any]:
    error = _ref("Error")
    openai_error = _ref("OpenAIError")
    retry_after = {"Retry-After": {
        "description": "seconds after which a retry may succeed",
        "schema": {"type": "integer"}}}
    return {
        "BadRequest": _json(error, "`bad_request`: bad JSON, a missing or "
                            "mistyped field, a bad id"),
        "Unauthenticated": _json(error, "`unauthenticated`: the server has API "
                                 "keys and the request's is missing or wrong"),
        "NotFound": _json(error, "`not_found`: unknown conversation or message"),
        "TooLarge": _json(error, "`request_too_large`: the body is over "
                          "--max-body; `prompt_too_long`: the prompt alone is "
                          "over the token budget"),
        "RateLimited": _json(error, "`rate_limited`: the key is over one of "
                             "its limits", headers=retry_after),
        "UpstreamFailed": _json(error, "`upstream_error`, `upstream_unavailable`, "
                                "`upstream_rate_limited`: the upstream failed; "
                                "`upstream_status` carries its status"),
        "NoUpstream": _json(error, "`no_upstream`: no upstream configured"),
        "UpstreamTimeout": _json(error, "`upstream_timeout`: the upstream did "
                                 "not answer in time"),
        "OpenAIBadRequest": _json(openai_error, "a malformed request, in OpenAI's error shape"),
        "OpenAIUnauthenticated": _json(openai_error, "a missing or wrong API "
                                       "key, when the server has keys"),
        "OpenAIRateLimited": _json(openai_error, "over a limit of the key",
                                   headers=retry_after),
        "OpenAIUpstreamFailed": _json(openai_error, "the upstream failed"),
        "OpenAINoUpstream": _json(openai_error, "no upstream configured"),
        "OpenAIUpstreamTimeout": _json(openai_error, "the upstream did not answer in time"),
    }


def _paths() -> dict[str, Any]:
    conversations = ["Conversations"]
    return {
        "/ask/{conversation_id}": {"post": {
            "tags": ["Ask"],
            "operationId": "ask",
            "summary": "Ask in a conversation",
            "description": (
                "Sends `prompt` in the conversation and answers when the answer "
                "is complete; the turn is then stored. An unknown id starts a "
                "conversation under that id; `new` makes a fresh server-made id, "
                "returned in the answer. Asks on one conversation run one after "
                "the other.\n\nWith `Accept: text/event-stream` or `\"stream\": "
                "true`, the answer streams as Server-Sent Events: `event: delta` "
                "(`{\"text\"}`) for each piece, then one `event: done` (the JSON "
                "answer's fields) or `event: error` (`{\"code\", \"message\"}`); "
                "comments keep the connection alive. Errors found before the "
                "stream starts get the JSON error answers below. A client that "
                "goes away cancels the ask, and nothing is stored."),
            "security": _KEYED,
            "parameters": [_CID],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("AskRequest")}}},
            "responses": {
                "200": {
                    "description": "the answer, as JSON or as an event stream",
                    "content": {
                        "application/json": {"schema": _ref("Answer")},
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "example": _SSE_ASK,
                        },
                    },
                },
                **_errors("BadRequest", "Unauthenticated", "NotFound", "TooLarge",
                          "RateLimited", "UpstreamFailed", "NoUpstream",
                          "UpstreamTimeout"),
            },
        }},
        "/conversations": {"get": {
            "tags": conversations,
            "operationId": "listConversations",
            "summary": "List conversations, the most recently updated first",
            "security": _KEYED,
            "parameters": [
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                {"name": "offset", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0, "default": 0}},
            ],
            "responses": {
                "200": _json(_ref("ConversationList"), "a page of conversations"),
                **_errors("BadRequest", "Unauthenticated"),
            },
        }},
        "/conversations/{conversation_id}": {
            "parameters": [_CID],
            "get": {
                "tags": conversations,
                "operationId": "getConversation",
                "summary": "A conversation and its current branch's messages",
                "security": _KEYED,
                "responses": {
                    "200": _json(_ref("ConversationView"), "the conversation"),
                    **_errors("BadRequest", "Unauthenticated", "NotFound"),
                },
            },
            "delete": {
                "tags": conversations,
                "operationId": "deleteConversation",
                "summary": "Delete a conversation and all its messages",
                "security": _KEYED,
                "responses": {
                    "200": _json(_ref("Deleted"), "deleted"),
                    **_errors("BadRequest", "Unauthenticated", "NotFound"),
                },
            },
        },
        "/conversations/{conversation_id}/rollback": {"post": {
            "tags": conversations,
            "operationId": "rollbackConversation",
            "summary": "Move the current branch back by some turns",
            "description": "Deletes nothing: the old messages stay readable by "
                           "id and usable as `parent_id`.",
            "security": _KEYED,
            "parameters": [_CID],
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": _ref("Rollback"),
                                     "example": {"turns": 1}}}},
            "responses": {
                "200": _json(_ref("ConversationView"), "the conversation after the rollback"),
                **_errors("BadRequest", "Unauthenticated", "NotFound", "TooLarge"),
            },
        }},
        "/v1/chat/completions": {"post": {
            "tags": ["OpenAI-compatible"],
            "operationId": "createChatCompletion",
            "summary": "Chat Completions, in OpenAI's shapes",
            "description": (
                "Point the `openai` SDK at `http://HOST:PORT/v1`. Without "
                "`X-Conversation-Id`, the request passes through to the upstream. "
                "With it (an id, or `new`), the stored history goes in front of "
                "the request's new messages, the turn is stored, and the answer "
                "carries the conversation's id in the same header. With "
                "`\"stream\": true`, the answer is Server-Sent Events of "
                "`chat.completion.chunk` objects ending with `data: [DONE]`. "
                "Errors keep OpenAI's error shape."),
            "security": _KEYED,
            "parameters": [{
                "name": "X-Conversation-Id", "in": "header", "required": False,
                "description": "a conversation id, or `new`: keep the history on the server",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            }],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("ChatCompletionRequest")}}},
            "responses": {
                "200": {
                    "description": "the completion, or its chunks as an event stream",
                    "headers": {"X-Conversation-Id": {
                        "description": "the conversation's id, when the request named one",
                        "schema": {"type": "string"}}},
                    "content": {
                        "application/json": {"schema": _ref("ChatCompletion")},
                        "text/event-stream": {"schema": {"type": "string"},
                                              "example": _SSE_OPENAI},
                    },
                },
                "400": {"$ref": "#/components/responses/OpenAIBadRequest"},
                "401": {"$ref": "#/components/responses/OpenAIUnauthenticated"},
                "404": _json(_ref("OpenAIError"), "unknown conversation, or the "
                             "upstream's 404 (an unknown model)"),
                "409": _json(_ref("OpenAIError"), "the upstream's 409, passed through"),
                "413": _json(_ref("OpenAIError"), "body or prompt too large"),
                "422": _json(_ref("OpenAIError"), "the upstream's 422, passed through"),
                "429": {"$ref": "#/components/responses/OpenAIRateLimited"},
                "502": {"$ref": "#/components/responses/OpenAIUpstreamFailed"},
                "503": {"$ref": "#/components/responses/OpenAINoUpstream"},
                "504": {"$ref": "#/components/responses/OpenAIUpstreamTimeout"},
            },
        }},
        "/v1/models": {"get": {
            "tags": ["OpenAI-compatible"],
            "operationId": "listModels",
            "summary": "The models the upstream offers",
            "description": "Or the configured model, where the upstream cannot list.",
            "security": _KEYED,
            "responses": {
                "200": _json(_ref("ModelList"), "the models"),
                "401": {"$ref": "#/components/responses/OpenAIUnauthenticated"},
                "502": {"$ref": "#/components/responses/OpenAIUpstreamFailed"},
                "503": {"$ref": "#/components/responses/OpenAINoUpstream"},
                "504": {"$ref": "#/components/responses/OpenAIUpstreamTimeout"},
            },
        }},
        "/healthz": {"get": {
            "tags": ["Operations"],
            "operationId": "healthz",
            "summary": "Alive",
            "security": _OPEN,
            "responses": {"200": _json(_ref("Status"), "alive",
                                       example={"status": "ok"})},
        }},
        "/readyz": {"get": {
            "tags": ["Operations"],
            "operationId": "readyz",
            "summary": "Ready: the database answers and an upstream is configured",
            "security": _OPEN,
            "responses": {
                "200": _json(_ref("Status"), "ready"),
                **_errors("NoUpstream"),
            },
        }},
        "/metrics": {"get": {
            "tags": ["Operations"],
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "security": _OPEN,
            "responses": {"200": {
                "description": "Prometheus' text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }},
        }},
        "/openapi.json": {"get": {
            "tags": ["Documentation"],
            "operationId": "openapi",
            "summary": "This document",
            "security": _OPEN,
            "responses": {"200": _json({"type": "object"}, "the OpenAPI 3.1 document")},
        }},
        "/docs": {"get": {
            "tags": ["Documentation"],
            "operationId": "docs",
            "summary": "Swagger UI for this document",
            "description": "Redirects to `/docs/`, Swagger UI's page, whose assets "
                           "are served from under `/docs/`, from the installed "
                           "package: no CDN.",
            "security": _OPEN,
            "responses": {"301": {
                "description": "to `/docs/`",
                "headers": {"Location": {"schema": {"type": "string"}}},
            }},
        }},
        "/": {"get": {
            "tags": ["Documentation"],
            "operationId": "page",
            "summary": "The chat page, for trying EasyBackend in a browser",
            "security": _OPEN,
            "responses": {"200": {
                "description": "the page",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }},
        }},
        "/ws": {"get": {
            "tags": ["WebSocket"],
            "operationId": "websocket",
            "summary": "The WebSocket, on the HTTP port",
            "description": (
                "Upgrade to a WebSocket speaking EasyBackend's JSON protocol: "
                "the client sends `{\"type\": \"ask\", \"id\", \"conversation_id\", "
                "\"prompt\", ...}` or `{\"type\": \"cancel\", \"id\"}`; the server "
                "answers each ask with `delta` messages, then one `done`, `error` "
                "or `cancelled`. When the server has keys, send "
                "`Authorization: Bearer` or `?api_key=` (browsers cannot set "
                "headers on a WebSocket): without a valid key, the handshake "
                "succeeds and the server closes at once with code 4401 and the "
                "reason, which a browser can read."),
            "security": _KEYED,
            "parameters": [
                {"name": "Upgrade", "in": "header", "required": True,
                 "schema": {"const": "websocket"}},
                {"name": "api_key", "in": "query", "required": False,
                 "description": "the API key, for clients that cannot set headers",
                 "schema": {"type": "string"}},
            ],
            "responses": {
                "101": {"description": "switching to the WebSocket protocol"},
                "404": {"$ref": "#/components/responses/NotFound"},
            },
        }},
    }


@cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "EasyBackend",
            "version": _version(),
            "summary": "A self-hosted ChatGPT backend with server-side conversation memory",
            "description": (
                "Every answer is JSON unless it says otherwise; errors are "
                "`{\"error\": {\"code\", \"message\"}}` (the `/v1` routes use "
                "OpenAI's error shape). A wrong method gets 405 "
                "`method_not_allowed`, an unknown route 404 `not_found`. When "
                "the server has API keys, send `Authorization: Bearer <key>`."),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "Ask"}, {"name": "Conversations"}, {"name": "OpenAI-compatible"},
            {"name": "WebSocket"}, {"name": "Operations"}, {"name": "Documentation"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _responses(),
            "parameters": {"ConversationId": {
                "name": "conversation_id", "in": "path", "required": True,
                "description": "1 to 128 characters of `A-Z a-z 0-9 . _ : -`; "
                               "`new` asks for a fresh server-made id",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            }},
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "an API key, required only when the server has keys",
            }},
        },
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("easybackend")
    except PackageNotFoundError:
        return "0"
