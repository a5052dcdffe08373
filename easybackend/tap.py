"""
C{twistd easybackend}: the options and the service they build.

The application opens the store first, then builds the core and the
transports on it and starts listening; on shutdown it stops listening,
lets gRPC finish, then closes the store.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from attrs import frozen

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from easybackend.config import SETTINGS, ConfigError, Settings, settings_from
from easybackend.writethrough import one_segment, write_through

log = Logger()


class Options(usage.Options):
    """The command line of C{twistd easybackend}; see the README's table."""

    synopsis = "[options]"
    longdesc = (
        "EasyBackend keeps each conversation's history on the server and "
        "answers over HTTP, WebSocket and gRPC with any OpenAI-compatible "
        "upstream. The API key is read from OPENAI_API_KEY only."
    )
    optFlags = [
        ["offline", None, "answer with the built-in offline model (no upstream)"],
        ["log-content", None, "write prompts and answers into the access log"],
    ]
    optParameters = [
        [s.option, None, None,
         f"{s.help}" + (f" [env: {s.env}]" if s.env else "")
         + (f" [default: {s.default}]" if s.default is not None
            and "default:" not in s.help else "")]
        for s in SETTINGS
    ]

    def postOptions(self) -> None:
        """
        Validate every setting; a bad one stops C{twistd} with one line on
        stderr naming it (L{SystemExit}), not the whole usage text.
        """
        try:
            self["settings"] = settings = settings_from(self, os.environ)
            check_endpoints(settings)
        except ConfigError as e:
            raise SystemExit(f"easybackend: {e}") from None


def check_endpoints(settings: Settings) -> None:
    """Raise L{ConfigError} for a listener address that cannot be parsed."""
    from twisted.internet import reactor

    from easybackend.transports.grpc_server import check_address

    try:
        check_address(settings.grpc)
    except ValueError as e:
        raise ConfigError(f"--grpc: {e}") from None

    for name in ("http", "websocket"):
        value = getattr(settings, name)
        try:
            serverFromString(reactor, value)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--{name}: invalid endpoint {value!r}: {e}") from None


#: The garbage collector's thresholds in the running server (Python's
#: default is 700, 10, 10): young collections as often as by default, the
#: older generations 100 times more rarely.
COLLECTOR_THRESHOLDS = (700, 1000, 10)


def settle_collector() -> None:
    """
    Set the garbage collector up for serving, once start-up is done.

    - Everything alive now (modules, the tokenizer's tables, the schema)
      goes into the permanent generation, so that no collection walks it
      again (a full collection under load took 67 ms before, 15 after).
    - Collections of the older generations become rare. Each walks every
      answer in flight, all of which has outlived a young collection: with
      Python's thresholds that was 3-8 ms, five times a second at 100
      concurrent asks, a pause every answer in flight waits through. An
      ask leaves no reference cycle (L{easybackend.threads},
      L{easybackend.transports.web}), so there is little for those
      collections to find; young ones still free short-lived cycles at
      once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


class EasyBackend(MultiService):
    """
    The whole server: opens the store, then builds and starts the core and
    its listeners; on shutdown stops accepting, lets asks in flight finish
    for the grace period, cancels the rest, then closes the store.
    """

    def __init__(self, settings: Settings, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.reactor = reactor
        self.store: Any = None
        self.core: Any = None
        self.listeners: Listeners | None = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        # Children are added once the store is open; they start as added.
        Service.startService(self)
        d = ensureDeferred(self._start())
        d.addCallbacks(self.ready.callback, self._failed)

    async def _start(self) -> None:
        from easybackend.store import Store

        self.store = await Store.open(self.settings.db, reactor=self.reactor,
                                      pool_size=self.settings.db_pool_size,
                                      lock_pool_size=self.settings.db_turns)
        self.core = build_core(self.settings, self.store, self.reactor)
        # Load the tokenizer now, off the reactor thread, not at the first ask;
        # then set the garbage collector up for serving.
        self.core.warm_up().addCallback(lambda _: settle_collector())
        self.listeners = build_listeners(self.settings, self.core, self.reactor)
        for service in self.listeners.services:
            service.setServiceParent(self)
        if not self.settings.keys.enabled:
            log.warn(
                "no API keys configured: anyone who reaches this server can "
                "use it; set --api-keys-file or EASYBACKEND_API_KEYS"
            )
        if self.core.upstream is None:
            log.warn(
                "no upstream configured: every ask will get 503; set "
                "OPENAI_API_KEY or OPENAI_BASE_URL, or start with --offline"
            )
        elif self.settings.offline:
            log.info("answering with the offline model (no upstream is called)")
        else:
            log.info("upstream: {url}, model {model}",
                     url=self.settings.upstream_url, model=self.settings.model)

    def _failed(self, failure: Any) -> None:
        log.failure("EasyBackend could not start", failure)
        self.ready.errback(failure)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        grace = self.settings.shutdown_grace
        listeners = self.listeners
        if listeners is not None:
            # Stop accepting; open connections and streams carry on.
            await gather(*(s.stopService() for s in listeners.ports))
            log.info("stopped accepting; letting asks in flight finish "
                     "for up to {grace}s", grace=grace)
            # gRPC stops its own calls after the same grace.
            await gather(self.core.drain(grace), listeners.grpc.stopService())
            await listeners.websocket.close_all()
        if self.core is not None and hasattr(self.core.upstream, "close"):
            await self.core.upstream.close()
        if self.store is not None:
            self.store.close()


class JSONRequest(Request):
    """
    A request whose body is never parsed as an HTML form: EasyBackend
    takes JSON only, and parsing C{Content-Type} costs more than an ask.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsePOSTFormSubmission = False

    def write(self, data: bytes) -> None:
        """
        The first write sends the response's headers with these bytes, in
        one segment on our TCP listeners (twisted.web writes them apart).
        """
        if self.startedWriting:
            super().write(data)
            return
        with one_segment(getattr(self.channel, "transport", None)):
            super().write(data)

    def _cleanup(self) -> None:
        """
        Once the response is done and whoever waited for it has run, let go
        of the headers, the arguments and Klein's adapter (with its URL
        map binding).  Klein's C{render} keeps each request in a reference
        cycle (an error handler that refers to itself); the web transport
        breaks it for answers still pending when C{render} returns, but a
        request answered within C{render} stays in it until the collector's
        next collection of the older generations, which this keeps short.
        """
        super()._cleanup()
        self._adapterCache = {}
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.args = {}
        self.received_cookies = {}
        self.cookies = []


class QuietSite(Site):
    """
    The HTTP site: its access lines come from EasyBackend, not
    twisted.web, and its requests skip form parsing.
    """

    requestFactory = JSONRequest

    def log(self, request: Any) -> None:
        pass


@frozen
class Listeners:
    """The transports' services, and what shutdown needs of them."""

    ports: list[IService]
    grpc: IService
    websocket: Any

    @property
    def services(self) -> list[IService]:
        return [*self.ports, self.grpc]


async def gather(*ds: Any) -> None:
    """Wait for all of C{ds} (Deferreds or None); log, not raise, failures."""
    results = await DeferredList([d for d in ds if d is not None], consumeErrors=True)
    for ok, result in results:
        if not ok:
            log.failure("while stopping", result)


def build_upstream(settings: Settings, reactor: Any) -> Any:
    """The offline model, the treq client, or None when none is configured."""
    if settings.offline:
        from easybackend.offline import OfflineUpstream

        return OfflineUpstream(reactor, interval=settings.offline_interval)
    url = settings.upstream_url
    if url is None:
        return None
    from easybackend.upstream import OpenAIUpstream

    return OpenAIUpstream(
        reactor=reactor,
        base_url=url,
        api_key=settings.api_key,
        headers_timeout=settings.connect_timeout,
        idle_timeout=settings.idle_timeout,
        total_timeout=settings.total_timeout,
        max_retries=settings.retries,
    )


def build_core(settings: Settings, store: Any, reactor: Any) -> Any:
    """The conversation service over C{store}."""
    from easybackend.limits import Limiter
    from easybackend.observe import Observer
    from easybackend.service import ConversationService, CoreSettings
    from easybackend.tokens import load_token_counter

    return ConversationService(
        limiter=Limiter(reactor, asks_per_minute=settings.asks_per_minute or None,
                        streams=settings.max_streams or None),
        observer=Observer(log_content=settings.log_content),
        store=store,
        upstream=build_upstream(settings, reactor),
        tokens=lambda: load_token_counter(settings.encoding, settings.model, clock=reactor),
        clock=reactor,
        settings=CoreSettings(
            model=settings.model,
            first_prompt=settings.first_prompt,
            context_tokens=settings.context_tokens,
            answer_tokens=settings.answer_tokens,
            temperature=settings.temperature,
            lock_timeout=settings.total_timeout,
        ),
    )


def build_listeners(settings: Settings, core: Any, reactor: Any) -> Listeners:
    """One service per listener: HTTP, WebSocket and gRPC."""
    from easybackend.transports.grpc_server import GrpcService
    from easybackend.transports.web import WebApp, WebSettings
    from easybackend.transports.websocket import make_websocket_factory, websocket_resource

    ws = make_websocket_factory(
        core,
        max_message_size=settings.ws_max_message,
        auto_ping_interval=settings.ws_ping_interval,
        auto_ping_timeout=settings.ws_ping_timeout,
        allowed_origins=settings.cors_origins,
        keys=settings.keys,
        reactor=reactor,
    )
    web = WebApp(core, WebSettings(max_body=settings.max_body,
                                   cors_origins=settings.cors_origins,
                                   keys=settings.keys),
                 websocket=websocket_resource(ws))
    grpc = GrpcService(
        core,
        address=settings.grpc,
        workers=settings.grpc_workers,
        reactor=reactor,
        grace=settings.shutdown_grace,
        max_message_size=settings.grpc_max_message,
        server_credentials=grpc_credentials(settings),
        keys=settings.keys,
    )
    # The WebSocket port starts the factory that /ws on the HTTP port shares.
    return Listeners(
        ports=[
            _listen(reactor, tls_endpoint(settings.http, settings), QuietSite(web.resource())),
            _listen(reactor, tls_endpoint(settings.websocket, settings), ws),
        ],
        grpc=grpc,
        websocket=ws,
    )


def grpc_credentials(settings: Settings) -> Any:
    """TLS credentials for gRPC from C{--tls-cert}/C{--tls-key}, or None."""
    if not settings.tls:
        return None
    import grpc

    with open(settings.tls_key, "rb") as key, open(settings.tls_cert, "rb") as cert:  # type: ignore[arg-type]
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


def tls_endpoint(description: str, settings: Settings) -> str:
    """
    With C{--tls-cert}, a plain C{tcp:} endpoint becomes the same C{ssl:}
    endpoint; any other string is the operator's finer control, as given.
    """
    if not settings.tls or not description.startswith("tcp:"):
        return description
    cert = settings.tls_cert.replace(":", "\\:").replace("=", "\\=")  # type: ignore[union-attr]
    key = settings.tls_key.replace(":", "\\:").replace("=", "\\=")  # type: ignore[union-attr]
    return f"ssl:{description[4:]}:privateKey={key}:certKey={cert}"


def _listen(reactor: Any, description: str, factory: Any) -> IService:
    service = StreamServerEndpointService(
        write_through(serverFromString(reactor, description)), factory)
    # Fail startup at once (with the reason) when the port cannot be had.
    service._raiseSynchronously = True
    return service


class _Application(EasyBackend):
    """
    The service twistd runs: when it joins the application, it gives it
    the JSON log observer if C{--log-format json} asked for one (twistd
    starts logging only after this).
    """

    def setServiceParent(self, parent: Any) -> Any:
        if self.settings.log_format == "json":
            import sys

            from twisted.logger import ILogObserver

            from easybackend.observe import json_observer

            parent.setComponent(ILogObserver, json_observer(sys.stdout))
        return super().setServiceParent(parent)


def makeService(options: Options) -> IService:
    return _Application(options["settings"])
