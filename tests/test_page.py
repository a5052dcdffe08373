"""
End-to-end tests of the chat page at C{/} and of Swagger UI at C{/docs}:
headless Chromium from the system's packages, driven by Selenium, against a
real core with the offline model, the HTTP site and the WebSocket at C{/ws}
on real loopback sockets.

The browser is never downloaded: the tests need C{/usr/bin/chromium} and
C{/usr/bin/chromedriver} (C{make browser}, i.e. C{apt-get install -y
chromium chromium-driver}), and fail, rather than skip, without them.
Selenium's calls block, so the browser's part runs in a thread while the
reactor serves.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from easybackend.auth import KeyRing
from easybackend.offline import OfflineUpstream
from easybackend.testing.fixtures import make_core, serve_http
from easybackend.transports.pages import openapi_document
from easybackend.transports.websocket import (
    WebSocketFactoryService,
    make_websocket_factory,
    websocket_resource,
)
from tests.test_openapi import documented_routes

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage"]
#: seconds any one wait in the browser may take
WAIT = 20
#: the key the keyed tests' server knows, by the name "page"
KEY = "sk-page-test"

#: Records each text the last answer showed while it streamed.
WATCH_STREAM = """
window.__seen = new Set();
new MutationObserver(() => {
  const last = document.querySelector("#messages li.assistant:last-child .content");
  if (last && last.textContent) window.__seen.add(last.textContent);
}).observe(document.getElementById("messages"),
           {subtree: true, childList: true, characterData: true});
"""

#: Records the Authorization header of each fetch the page makes.
WATCH_FETCH = """
window.__auth = [];
const fetch0 = window.fetch;
window.fetch = (url, options) => {
  window.__auth.push((options && options.headers && options.headers.Authorization) || null);
  return fetch0(url, options);
};
"""

#: The shown messages, as [role, text] pairs, read at once.
HISTORY = """
return Array.from(document.querySelectorAll("#messages li.message"),
                  (m) => [m.classList[1], m.querySelector(".content").textContent]);
"""


def browser_missing() -> str | None:
    """Why the browser cannot run here, or C{None}."""
    for path in [CHROMIUM, CHROMEDRIVER]:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return (f"{path} is missing: run `make browser` "
                    "(apt-get install -y chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: install the test extras (pip install -e '.[test]')"
    return None


class Recording(Resource):
    """Renders C{inner}, after recording the URI it was asked for."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner
        self.uris: list[bytes] = []

    def render(self, request: IRequest) -> Any:
        self.uris.append(request.uri)
        return self.inner.render(request)


class Page:
    """A headless Chromium on one server, with waits that fail with a reason."""

    def __init__(self, testcase: TestCase, url: str) -> None:
        from selenium import webdriver
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        os.environ["SE_OFFLINE"] = "1"  # Selenium Manager must not download
        profile = os.path.abspath(testcase.mktemp())
        os.makedirs(profile)
        testcase.addCleanup(shutil.rmtree, profile, True)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        self.t = testcase
        self.url = url
        self.by = By
        self.driver = webdriver.Chrome(
            service=Service(executable_path=CHROMEDRIVER), options=options)
        self._wait = WebDriverWait(self.driver, WAIT,
                                   ignored_exceptions=[StaleElementReferenceException])

    def quit(self) -> None:
        self.driver.quit()

    def until(self, condition: Callable[[Any], Any], what: str) -> Any:
        """C{condition(driver)}'s first true value, within L{WAIT} seconds."""
        return self._wait.until(condition, f"waited {WAIT} s for {what}")

    def open(self, path: str = "/") -> None:
        self.driver.get(self.url + path)
        self.until(lambda d: d.find_element(self.by.ID, "prompt").is_enabled(), "the page")

    def find(self, selector: str) -> Any:
        return self.driver.find_element(self.by.CSS_SELECTOR, selector)

    def run(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def answers(self, state: str = "done") -> list[str]:
        return [m.find_element(self.by.CLASS_NAME, "content").text
                for m in self.driver.find_elements(
                    self.by.CSS_SELECTOR, f'#messages li.assistant[data-state="{state}"]')]

    def history(self) -> list[tuple[str, str]]:
        return [tuple(m) for m in self.run(HISTORY)]

    def ask(self, prompt: str, state: str = "done") -> str:
        """Send C{prompt}; wait for its answer to end in C{state}; its text."""
        before = len(self.answers(state))
        self.run(WATCH_STREAM)
        self.find("#prompt").send_keys(prompt)
        self.find("#send").click()
        self.until(lambda d: len(self.answers(state)) > before, f"the answer to {prompt!r}")
        return self.answers(state)[-1]

    def ask_streamed(self, prompt: str) -> str:
        """L{ask}, checking that the answer came in several growing pieces."""
        text = self.ask(prompt)
        seen = self.run("return Array.from(window.__seen)")
        self.t.assertGreater(len(seen), 1, f"the answer did not stream: {seen}")
        self.t.assertTrue(all(text.startswith(piece) for piece in seen), seen)
        return text

    def conversation(self) -> str:
        """The conversation the page shows, from its URL's fragment."""
        return self.run("return decodeURIComponent(location.hash.slice(1))")


class PageTests(TestCase):
    """The chat page and Swagger UI in a real browser."""

    timeout = 120

    async def serve(self, keys: KeyRing = KeyRing()) -> None:
        """Serve HTTP, with the WebSocket at /ws, over a core with the offline model."""
        from twisted.internet import reactor

        core = await make_core(self, OfflineUpstream(reactor, interval=0.01))
        factory = make_websocket_factory(core, reactor=reactor, keys=keys)
        service = WebSocketFactoryService(factory)
        service.startService()
        self.addCleanup(service.stopService)
        self.websocket = Recording(websocket_resource(factory))
        self.url = await serve_http(self, core, websocket=self.websocket, keys=keys)

    async def browse(self, steps: Callable[[Page], None]) -> None:
        """Run C{steps} on a fresh browser, in a thread; fail if there is no browser."""
        missing = browser_missing()
        if missing:
            self.fail(missing)

        def run() -> None:
            page = Page(self, self.url)
            try:
                steps(page)
            finally:
                page.quit()

        await deferToThread(run)

    async def test_chat(self) -> None:
        """
        When a user asks twice on the page, then each answer streams in over
        the WebSocket, the second one remembers the first, and the model is
        shown; when the page is opened again, then the conversation is in
        the list, and opening it shows its history; when the user undoes the
        last turn, then the history loses it.
        """
        await self.serve()
        await self.browse(self.chat)

    def chat(self, page: Page) -> None:
        page.open()
        self.assertEqual(page.driver.title, "EasyBackend")
        first = page.ask_streamed("Hello browser")
        self.assertIn("(offline model) I see no earlier turns", first)
        self.assertIn("You said: \u201cHello browser\u201d", first)
        self.assertEqual(page.find("#model").text, "offline")
        second = page.ask_streamed("Second question")
        self.assertIn("1 earlier turn", second)
        self.assertIn("Before this you said: \u201cHello browser\u201d", second)
        cid = page.conversation()
        self.assertTrue(cid.startswith("c_"), cid)
        item = f'#conversations button[data-id="{cid}"]'
        page.until(lambda d: d.find_elements(page.by.CSS_SELECTOR, item), "the list")
        self.assertEqual(page.find("#conversation-title").text, "Hello browser")

        # Opened again, with nothing chosen: the list has it.
        page.open()
        button = page.until(lambda d: d.find_element(page.by.CSS_SELECTOR, item), "the list")
        self.assertEqual(page.history(), [])
        button.click()
        page.until(lambda d: len(page.history()) == 4, "the history")
        self.assertEqual(page.history(), [
            ("user", "Hello browser"), ("assistant", first),
            ("user", "Second question"), ("assistant", second),
        ])
        self.assertEqual(page.find(item).get_attribute("aria-current"), "true")
        self.assertEqual(page.find("#model").text, "offline")

        page.find("#rollback").click()
        page.until(lambda d: len(page.history()) == 2, "the rollback")
        self.assertEqual(page.history(), [("user", "Hello browser"), ("assistant", first)])
        third = page.ask("After the rollback")
        self.assertIn("Before this you said: \u201cHello browser\u201d", third)

    async def test_api_key(self) -> None:
        """
        When the server has keys and the page has none, then the page says
        so, and an ask fails with the server's reason; when the user saves
        the key, then it is sent as Bearer on fetch and as C{?api_key=} on
        the WebSocket, so that asks and the list work, and it is still there
        when the page is opened again.
        """
        await self.serve(KeyRing.parse([f"page:{KEY}"], "test"))
        await self.browse(self.api_key)

    def api_key(self, page: Page) -> None:
        page.open()
        page.until(lambda d: "unauthenticated" in page.find("#status").text, "the refusal")
        refused = page.ask("No key yet", state="error")
        self.assertIn("unauthenticated", refused)

        page.run(WATCH_FETCH)
        page.find("#api-key").send_keys(KEY)
        page.find("#save-key").click()
        page.until(lambda d: f"Bearer {KEY}" in page.run("return window.__auth"),
                   "a fetch with the key")
        answer = page.ask_streamed("With a key")
        self.assertIn("You said: \u201cWith a key\u201d", answer)
        self.assertIn(f"api_key={KEY}".encode(), self.websocket.uris[-1])
        cid = page.conversation()

        page.open()
        self.assertEqual(page.find("#api-key").get_attribute("value"), KEY)
        page.until(lambda d: d.find_elements(
            page.by.CSS_SELECTOR, f'#conversations button[data-id="{cid}"]'), "the list")

    async def test_docs(self) -> None:
        """
        When a browser opens Swagger UI, then it renders every operation of
        the OpenAPI 3.1 document, loading nothing from another origin; the
        chat page's key is offered to its "Authorize".
        """
        await self.serve()
        await self.browse(self.docs)

    def docs(self, page: Page) -> None:
        operations = len(documented_routes(openapi_document()))
        page.driver.get(self.url + "/docs/index.html")
        page.until(lambda d: len(d.find_elements(page.by.CSS_SELECTOR, ".opblock")) == operations,
                   f"{operations} operations in Swagger UI")
        self.assertEqual(page.driver.find_elements(page.by.CSS_SELECTOR, ".errors-wrapper"), [])
        self.assertIn("OAS 3.1", page.find(".info").text)
        loaded = page.run("return performance.getEntriesByType('resource').map((e) => e.name)")
        self.assertIn(self.url + "/openapi.json", loaded)
        self.assertEqual([u for u in loaded if not u.startswith(self.url + "/")], [])

        page.run("localStorage.setItem('easybackend.apiKey', 'sk-docs')")
        page.driver.refresh()
        authorized = "return window.ui && window.ui.authSelectors.authorized().toJS()"
        page.until(lambda d: page.run(authorized), "Swagger UI's authorization")
        self.assertEqual(page.run(authorized)["bearerAuth"]["value"], "sk-docs")
