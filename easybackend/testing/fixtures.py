"""
Building blocks for tests of every transport: a real core on a real SQLite
file in the test's temporary folder, and real loopback listeners.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from easybackend.service import ConversationService, CoreSettings
from easybackend.store import Store
from easybackend.tokens import TokenCounter, bundled_encoding

_COUNTER: TokenCounter | None = None


def token_counter() -> TokenCounter:
    """The bundled encoding's counter, loaded once per test process."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = TokenCounter(bundled_encoding())
    return _COUNTER


async def open_store(testcase: TestCase, path: str | None = None) -> Store:
    """A store on a fresh SQLite file, closed when the test ends."""
    if path is None:
        folder = testcase.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "easybackend.sqlite3")
    store = await Store.open(path)
    testcase.addCleanup(store.close)
    return store


async def make_core(
    testcase: TestCase,
    upstream: Any,
    settings: CoreSettings = CoreSettings(),
    store: Store | None = None,
    clock: Any = None,
    **services: Any,
) -> ConversationService:
    """A real conversation service over a real store and C{upstream}."""
    if clock is None:
        from twisted.internet import reactor as clock
    if store is None:
        store = await open_store(testcase)
    return ConversationService(
        store=store,
        upstream=upstream,
        tokens=lambda: succeed(token_counter()),
        clock=clock,
        settings=settings,
        **services,
    )


async def listen_tcp(testcase: TestCase, factory: Any) -> int:
    """Listen with C{factory} on a free loopback port; stop when the test ends."""
    from twisted.internet import reactor

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


async def serve_http(testcase: TestCase, core: ConversationService, **web: Any) -> str:
    """Serve the HTTP transport for C{core}; return its base URL."""
    from easybackend.tap import QuietSite
    from easybackend.transports.web import WebApp, WebSettings

    websocket = web.pop("websocket", None)
    clock = web.pop("clock", None)
    app = WebApp(core, WebSettings(**web), websocket=websocket, clock=clock)
    site = QuietSite(app.resource())  # the server's own
    site.noisy = False
    port = await listen_tcp(testcase, site)
    return f"http://127.0.0.1:{port}"


def within(d: Deferred[Any], seconds: float = 10.0) -> Deferred[Any]:
    """C{d}, failing with a timeout after C{seconds} instead of hanging."""
    from twisted.internet import reactor

    return d.addTimeout(seconds, reactor)


async def eventually(check: Callable[[], Any], what: str, within: float = 10.0) -> None:
    """
    Wait, by reactor time, until C{check} returns (or fires) something
    true: for what another thread, connection or process does in its own
    time.  Fails the test after C{within} seconds.
    """
    from twisted.internet import reactor

    deadline = reactor.seconds() + within
    while True:
        result = check()
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await deferLater(reactor, 0.01)
