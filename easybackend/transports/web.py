"""
The HTTP transport (Klein): JSON routes over the conversation service.

It only translates: request bodies to L{AskRequest}s and service calls,
results to JSON, and L{EasyBackendError}s to statuses with a JSON body
C{{"error": {"code", "message"}}}.  Nothing a client sends gets a 500 or
an HTML page.
"""

from __future__ import annotations

import json
from functools import partial
from types import CodeType
from typing import Any, Callable

from attrs import frozen
from klein import Klein
from klein.resource import KleinResource
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound as NoRoute

from easybackend import wire
from easybackend.auth import KeyRing
from easybackend.errors import (
    BadRequest,
    EasyBackendError,
    Unauthenticated,
    retry_seconds,
    RequestTooLarge,
    UpstreamError,
)
from easybackend.model import (
    AskRequest,
    CompleteRequest,
    check_conversation_id,
    request_id_or_new,
)
from easybackend.observe import AccessRecord
from easybackend.service import ConversationService
from easybackend.transports import openai_api as oa, pages

log = Logger()

#: The HTTP status for each core error code.
STATUS: dict[str, int] = {
    "bad_request": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "prompt_too_long": 413,
    "request_too_large": 413,
    "rate_limited": 429,
    "unauthenticated": 401,
    "conversation_busy": 409,
    "store_unavailable": 503,
    "upstream_error": 502,
    "upstream_rate_limited": 502,
    "upstream_unavailable": 502,
    "no_upstream": 503,
    "upstream_timeout": 504,
}


@frozen
class WebSettings:
    """The HTTP transport's own limits."""

    max_body: int = 1024 * 1024
    cors_origins: tuple[str, ...] = ("*",)
    #: seconds of silence after which an event stream gets a comment
    keepalive_interval: float = 15.0
    #: client API keys; empty: open to all
    keys: KeyRing = KeyRing()


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error shape every route answers with."""
    return {"error": {"code": code, "message": message, **extra}}


class _Resource(KleinResource):
    """
    Klein's resource, except that a request it has answered is freed as
    soon as it is done, not at the garbage collector's next collection.

    Klein's C{render} gives every request an error callback that refers to
    itself (C{processing_failed}, through its own closure), and with it the
    request.  The server collects its older generations rarely
    (L{easybackend.tap.settle_collector}), so these cycles would pile up
    and make each collection longer: a pause every answer in flight waits
    through.  Once the request's chain has run, the callback's reference to
    itself is dropped.  Should Klein change so that the callback cannot be
    found, nothing is dropped and the collector frees the request as before.
    """

    def render(self, request: IRequest) -> Any:
        result = super().render(request)
        # Klein cancels its chain when the request ends early, through an
        # errback on notifyFinish that holds the chain as C{d}.
        for finished in getattr(request, "notifications", ()):
            canceller = _errback(finished, _is_klein_canceller)
            if canceller is not None:
                chain = canceller.__closure__[0].cell_contents
                failed = _errback(chain, _is_processing_failed)
                if failed is not None:
                    names = failed.__code__.co_freevars
                    chain.addBoth(_empty_cell, failed.__closure__[names.index("processing_failed")])
                break
        return result


def _errback(d: Any, match: Callable[[CodeType], bool]) -> Any:
    """The first function among C{d}'s pending errbacks whose code matches."""
    for _, (errback, _, _) in d.callbacks:
        code = getattr(errback, "__code__", None)
        if code is not None and match(code):
            return errback
    return None


def _is_klein_canceller(code: CodeType) -> bool:
    return code.co_freevars == ("d",) and code.co_filename == _KLEIN_RESOURCE_FILE


def _is_processing_failed(code: CodeType) -> bool:
    return code.co_name == "processing_failed"


def _empty_cell(result: object, cell: Any) -> object:
    del cell.cell_contents
    return result


_KLEIN_RESOURCE_FILE = KleinResource.render.__code__.co_filename


class WebApp:
    """
    The Klein application.  C{websocket} is an optional resource mounted at
    C{/ws}, so that a page can reach the WebSocket on its own origin.
    """

    app = Klein()

    def __init__(
        self,
        service: ConversationService,
        settings: WebSettings = WebSettings(),
        websocket: IResource | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.service = service
        self.settings = settings
        self.websocket = websocket

    def resource(self) -> IResource:
        return _Resource(self.app)

    # -- plumbing ----------------------------------------------------------

    def _cors(self, request: IRequest) -> None:
        origins = self.settings.cors_origins
        origin = request.getHeader("origin")
        if "*" in origins:
            request.setHeader("access-control-allow-origin", "*")
        elif origin and origin in origins:
            request.setHeader("access-control-allow-origin", origin)
            request.setHeader("vary", "Origin")

    def _json(self, request: IRequest, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        self._cors(request)
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        # A length, not chunks: one write, and clients know the size.
        request.setHeader("content-length", b"%d" % len(data))
        return data

    def _caller(self, request: IRequest, log_access: bool = True) -> str | None:
        """
        The name of the caller's key (None when keys are off), and one
        access line when the request ends.  Asks are logged by the core
        instead (C{log_access=False}), except when refused here.

        @raise Unauthenticated: keys are on and the key is missing or wrong.
        """
        started = self.clock.seconds()

        def log_when_done(owner: str | None) -> None:
            def done(_: object) -> None:
                self.service.observer.record(AccessRecord(
                    transport="http", kind="request", status=str(request.code),
                    latency=self.clock.seconds() - started,
                    request_id=request.getHeader("x-request-id"), key=owner))

            request.notifyFinish().addBoth(done)

        try:
            owner = self.settings.keys.name_of_header(request.getHeader("authorization"))
        except Unauthenticated:
            log_when_done(None)
            raise
        if log_access:
            log_when_done(owner)
        return owner

    def _body(self, request: IRequest, required: bool = True) -> dict[str, Any]:
        """The request's JSON object, within the size limit."""
        limit = self.settings.max_body
        length = request.getHeader("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestTooLarge(f"request body is over the limit of {limit} bytes")
        raw = request.content.read(limit + 1) if request.content else b""
        if len(raw) > limit:
            raise RequestTooLarge(f"request body is over the limit of {limit} bytes")
        if not raw.strip():
            if required:
                raise BadRequest("the request body must be a JSON object")
            return {}
        try:
            body = wire.loads(raw)
        except ValueError as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.handle_errors(EasyBackendError)
    def _easy_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        _error_headers(request, error)
        return self._json(request, {"error": _error_fields(error)}, status_of(error))

    @app.handle_errors(NoRoute)
    def _no_route(self, request: IRequest, failure: Failure) -> bytes:
        return self._json(request, error_body("not_found", "no such route"), 404)

    @app.handle_errors(MethodNotAllowed)
    def _bad_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed = failure.value.valid_methods or []
        if request.method == b"OPTIONS":
            return self._preflight(request, allowed)
        request.setHeader("allow", ", ".join(allowed))
        return self._json(
            request,
            error_body("method_not_allowed", f"method not allowed; use {', '.join(allowed)}"),
            405,
        )

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        return self._json(request, error_body("bad_request", e.description or e.name), e.code or 400)

    @app.handle_errors(CancelledError)
    def _cancelled(self, request: IRequest, failure: Failure) -> bytes:
        # The client went away; nobody reads this.
        return b""

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unexpected error on {method} {path}", failure,
                    method=request.method, path=request.path)
        return self._json(request, error_body("internal", "internal server error"), 500)

    # -- routes ------------------------------------------------------------

    def _preflight(self, request: IRequest, allowed: list[str]) -> bytes:
        """A CORS preflight's answer, for any route that exists."""
        self._cors(request)
        request.setHeader("access-control-allow-methods", ", ".join([*allowed, "OPTIONS"]))
        request.setHeader(
            "access-control-allow-headers",
            request.getHeader("access-control-request-headers")
            or "authorization, content-type",
        )
        request.setHeader("access-control-max-age", "600")
        request.setResponseCode(204)
        return b""

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader("content-type", CONTENT_TYPE_LATEST)
        return generate_latest(self.service.observer.metrics.registry)

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        return self._json(request, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        await self.service.check_ready()
        return self._json(request, {"status": "ready"})

    @app.route("/ask/<string:conversation_id>", methods=["POST"])
    async def ask(self, request: IRequest, conversation_id: str) -> bytes:
        owner = self._caller(request, log_access=False)
        body = self._body(request)
        ask = AskRequest.from_mapping(
            conversation_id, body, request_id=request_id(request), transport="http",
            owner=owner)
        if body.get("stream") is True or _accepts_events(request):
            return await self._ask_events(request, ask)
        answer = await self.service.ask(ask, _ignore)
        return self._json(request, answer.to_dict())

    async def _ask_events(self, request: IRequest, ask: AskRequest) -> bytes:
        """
        Stream the answer as Server-Sent Events: C{delta} events, then one
        C{done} (the JSON answer's fields) or C{error} event.  Comments
        keep the connection alive through long pauses.
        """
        request.setResponseCode(200)
        request.setHeader("content-type", "text/event-stream; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-accel-buffering", "no")
        self._cors(request)
        # The headers go out with the first event (sent now, they would wake
        # the client before the upstream request has left), or with a
        # comment after a second when the first piece is slow.
        keepalive = KeepAlive(request, self.settings.keepalive_interval, self.clock)

        def piece(text: str) -> None:
            keepalive.wrote()
            # event("delta", {"text": text}), without json.dumps per piece
            request.write(b'event: delta\ndata: {"text": %s}\n\n'
                          % wire.json_string(text).encode("utf-8"))

        try:
            answer = await self.service.ask(ask, piece)
        except EasyBackendError as e:
            return event("error", _error_fields(e))
        finally:
            keepalive.stop()
        return event("done", answer.to_dict())

    @app.route("/conversations", methods=["GET"])
    async def list_conversations(self, request: IRequest) -> bytes:
        owner = self._caller(request)
        limit = _query_int(request, b"limit", 20)
        offset = _query_int(request, b"offset", 0)
        conversations = await self.service.list_conversations(limit, offset, owner)
        return self._json(request, {
            "conversations": [c.to_dict() for c in conversations],
            "limit": limit,
            "offset": offset,
            "next_offset": offset + limit if len(conversations) == limit else None,
        })

    @app.route("/conversations/<string:conversation_id>", methods=["GET"])
    async def get_conversation(self, request: IRequest, conversation_id: str) -> bytes:
        view = await self.service.get_conversation(conversation_id, self._caller(request))
        return self._json(request, view.to_dict())

    @app.route("/conversations/<string:conversation_id>", methods=["DELETE"])
    async def delete_conversation(self, request: IRequest, conversation_id: str) -> bytes:
        await self.service.delete_conversation(conversation_id, self._caller(request))
        return self._json(request, {"id": conversation_id, "deleted": True})

    @app.route("/conversations/<string:conversation_id>/rollback", methods=["POST"])
    async def rollback(self, request: IRequest, conversation_id: str) -> bytes:
        owner = self._caller(request)
        turns = self._body(request, required=False).get("turns", 1)
        view = await self.service.rollback(conversation_id, turns, owner)
        return self._json(request, view.to_dict())

    # -- the OpenAI-compatible API -----------------------------------------

    def _openai_error(self, request: IRequest, error: EasyBackendError) -> bytes:
        _error_headers(request, error)
        status = oa.openai_status(error, status_of(error))
        return self._json(request, oa.openai_error(error, status), status)

    @app.route("/v1/chat/completions", methods=["POST"])
    async def chat_completions(self, request: IRequest) -> bytes:
        try:
            owner = self._caller(request, log_access=False)
            body = self._body(request)
            messages = oa.parse_messages(body)
            options = oa.parse_options(body)
            common = {"request_id": request_id(request), "transport": "openai",
                      "owner": owner}
            cid = oa.conversation_header(request)
            if cid is not None:
                check_conversation_id(cid)
                ask = oa.ask_for(cid, messages, options, **common)
                request.setHeader(oa.CONVERSATION_HEADER, cid)
                run = partial(self.service.ask, ask)
            else:
                run = partial(self.service.complete,
                              CompleteRequest(messages=messages, **options, **common))
        except EasyBackendError as e:
            return self._openai_error(request, e)
        model = options["model"] or self.service.settings.model
        if body.get("stream") is not True:
            try:
                result = await run(_ignore)
            except EasyBackendError as e:
                return self._openai_error(request, e)
            return self._json(request, oa.completion_object(
                result.model, result.text, result.finish_reason, result.usage))
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        request.setHeader("content-type", "text/event-stream; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        self._cors(request)
        # The headers go out with the first chunk, or with a comment after a
        # second (see _ask_events); until then a failure is still an HTTP
        # error, as OpenAI's own, so that the SDK raises its usual exception.
        keepalive = KeepAlive(request, self.settings.keepalive_interval, self.clock)

        def piece(text: str) -> None:
            keepalive.wrote()
            out.piece(text)

        out = oa.CompletionStream(request.write, model, include_usage)
        try:
            result = await run(piece)
        except EasyBackendError as e:
            if not request.startedWriting:
                return self._openai_error(request, e)
            out.error(e, oa.openai_status(e, status_of(e)))
            return b""
        finally:
            keepalive.stop()
        out.finish(result.model, result.finish_reason, result.usage)
        return b""

    @app.route("/v1/models", methods=["GET"])
    async def models(self, request: IRequest) -> bytes:
        try:
            self._caller(request)
        except EasyBackendError as e:
            return self._openai_error(request, e)
        return self._json(request, oa.models_list(await self.service.models()))

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        request.setHeader("content-type", "text/html; charset=utf-8")
        return pages.index_html()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return self._json(request, pages.openapi_document())

    @app.route("/docs", branch=True, methods=["GET"], strict_slashes=False)
    def docs(self, request: IRequest) -> IResource:
        return pages.docs_resource()

    @app.route("/ws", methods=["GET"])
    def websocket_route(self, request: IRequest) -> IResource:
        if self.websocket is None:
            raise NoRoute()
        return self.websocket


def request_id(request: IRequest) -> str:
    """The client's C{X-Request-Id} (within reason), or a fresh one."""
    return request_id_or_new(request.getHeader("x-request-id"))


def _error_headers(request: IRequest, error: EasyBackendError) -> None:
    """
    C{Retry-After} when the error says when to try again (our limits, or
    the upstream's own C{Retry-After}), C{WWW-Authenticate} on 401.
    """
    seconds = retry_seconds(error)
    if seconds is not None:
        request.setHeader("retry-after", str(seconds))
    elif isinstance(error, Unauthenticated):
        request.setHeader("www-authenticate", 'Bearer realm="easybackend"')


def status_of(error: EasyBackendError) -> int:
    """The HTTP status for a core error."""
    return STATUS.get(error.code, 500)


def _error_fields(error: EasyBackendError) -> dict[str, Any]:
    fields: dict[str, Any] = {"code": error.code, "message": error.message}
    if isinstance(error, UpstreamError) and error.status is not None:
        fields["upstream_status"] = error.status
    return fields


def event(name: str, data: Any) -> bytes:
    """One Server-Sent Event with a JSON payload (JSON has no raw newlines)."""
    return b"event: %s\ndata: %s\n\n" % (
        name.encode("ascii"), json.dumps(data, ensure_ascii=False).encode("utf-8"))


def _accepts_events(request: IRequest) -> bool:
    accept = request.getHeader("accept") or ""
    return "text/event-stream" in accept


class KeepAlive:
    """
    Write an SSE comment when nothing was written for C{interval} seconds,
    so that proxies and clients do not drop a stream in a long pause; the
    first one after L{FIRST} seconds at most, so that a client whose first
    piece is slow (a reasoning model) still gets the response's headers
    soon (until then they wait to go out with the first piece).
    """

    FIRST = 1.0

    def __init__(self, request: IRequest, interval: float, clock: IReactorTime) -> None:
        self._request = request
        self._interval = interval
        self._clock = clock
        self._active = True
        self._call = clock.callLater(min(self.FIRST, interval), self._beat)

    def wrote(self) -> None:
        if self._active and self._call.active():
            self._call.reset(self._interval)

    def _beat(self) -> None:
        self._request.write(b": keep-alive\n\n")
        self._call = self._clock.callLater(self._interval, self._beat)

    def stop(self) -> None:
        self._active = False
        if self._call.active():
            self._call.cancel()


def _ignore(piece: str) -> None:
    """The plain JSON answer waits for the whole text."""


def _query_int(request: IRequest, name: bytes, default: int) -> int:
    values = request.args.get(name)
    if not values:
        return default
    try:
        return int(values[0])
    except ValueError:
        raise BadRequest(f'"{name.decode()}" must be an integer') from None
