"""
An end-to-end test of the chat page at C{/}: headless Chromium from the
system's packages, driven by Selenium, against a real core with the offline
model, the HTTP site and the WebSocket at C{/ws} on real loopback sockets.

The browser is never downloaded: the test needs C{/usr/bin/chromium} and
C{/usr/bin/chromedriver} (C{make browser}, i.e. C{apt-get install -y
chromium chromium-driver}), and fails, rather than skips, without them.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from easybackend.offline import OfflineUpstream
from easybackend.testing.fixtures import make_core, serve_http
from easybackend.transports.websocket import (
    WebSocketFactoryService,
    make_websocket_factory,
    websocket_resource,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: seconds any one wait in the browser may take
WAIT = 20

#: Records each text the assistant's answer showed while it streamed.
WATCH_STREAM = """
window.__seen = new Set();
new MutationObserver(() => {
  const last = document.querySelector("#messages li.assistant:last-child .content");
  if (last && last.textContent) window.__seen.add(last.textContent);
}).observe(document.getElementById("messages"),
           {subtree: true, childList: true, characterData: true});
"""

#: The shown messages, as [role, text] pairs, read at once.
HISTORY = """
return Array.from(document.querySelectorAll("#messages li.message"),
                  (m) => [m.classList[1], m.querySelector(".content").textContent]);
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


class Recording(Resource):
    """A resource that records the URIs it was asked for, then renders C{inner}."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner
        self.uris: list[bytes] = []

    def render(self, request: IRequest) -> Any:
        self.uris.append(request.uri)
        return self.inner.render(request)


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


class ChatPageTests(TestCase):
    """The chat page in a real browser."""

    timeout = 120

    async def setUp(self) -> None:
        from twisted.internet import reactor

        self.core = await make_core(self, OfflineUpstream(reactor, interval=0.01))
        factory = make_websocket_factory(self.core, reactor=reactor)
        service = WebSocketFactoryService(factory)
        service.startService()
        self.addCleanup(service.stopService)
        self.websocket = Recording(websocket_resource(factory))
        self.url = await serve_http(self, self.core, websocket=self.websocket)

    def browser(self) -> Any:
        """A fresh headless Chromium, from the system's packages only."""
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ["SE_OFFLINE"] = "1"  # Selenium Manager must not download
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        self.addCleanup(shutil.rmtree, profile, True)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ["--headless", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)

    async def test_chat(self) -> None:
        """
        When a user asks twice on the page, then each answer streams in over
        the WebSocket, the second one remembers the first, and the model is
        shown; when the page is opened again, then the conversation is in
        the list, and opening it shows its history; when the user undoes the
        last turn, then the history loses it; when the user saves an API key,
        then it is kept, and sent on fetch and on the WebSocket.
        """
        missing = browser_missing()
        if missing:
            self.fail(missing)
        await deferToThread(self.drive)

    def drive(self) -> None:
        """The browser's part: blocking Selenium calls, off the reactor thread."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = self.browser()
        try:
            wait = WebDriverWait(driver, WAIT, ignored_exceptions=[StaleElementReferenceException])

            def until(condition: Callable[[Any], Any], what: str) -> Any:
                return wait.until(lambda d: condition(d), f"waited {WAIT} s for {what}")

            def done_answers(d: Any) -> list[Any]:
                return d.find_elements(By.CSS_SELECTOR, '#messages li.assistant[data-state="done"]')

            def ask(prompt: str, answers: int) -> str:
                driver.execute_script(WATCH_STREAM)
                field = driver.find_element(By.ID, "prompt")
                field.send_keys(prompt)
                driver.find_element(By.ID, "send").click()
                until(lambda d: len(done_answers(d)) == answers, f"answer {answers}")
                text = done_answers(driver)[-1].find_element(By.CLASS_NAME, "content").text
                seen = driver.execute_script("return Array.from(window.__seen)")
                self.assertGreater(len(seen), 1, f"the answer did not stream: {seen}")
                self.assertTrue(all(text.startswith(piece) for piece in seen), seen)
                return text

            driver.get(self.url + "/")
            until(lambda d: d.find_element(By.ID, "prompt").is_enabled(), "the page")
            self.assertEqual(driver.title, "EasyBackend")

            first = ask("Hello browser", 1)
            self.assertIn("(offline model)", first)
            self.assertIn("You said: \u201cHello browser\u201d", first)
            self.assertEqual(driver.find_element(By.ID, "model").text, "offline")
            second = ask("Second question", 2)
            self.assertIn("1 earlier turn", second)
            self.assertIn("Before this you said: \u201cHello browser\u201d", second)
            cid = driver.execute_script("return decodeURIComponent(location.hash.slice(1))")
            self.assertTrue(cid.startswith("c_"), cid)
            item = f'#conversations button[data-id="{cid}"]'
            until(lambda d: d.find_elements(By.CSS_SELECTOR, item), "the new conversation in the list")

            # Opened again, with nothing chosen: the list has it.
            driver.get(self.url + "/")
            button = until(lambda d: d.find_element(By.CSS_SELECTOR, item), "the list")
            self.assertEqual(driver.find_elements(By.CSS_SELECTOR, "#messages li"), [])
            button.click()

            def history(d: Any) -> list[tuple[str, str]]:
                return [tuple(m) for m in d.execute_script(HISTORY)]

            until(lambda d: len(history(d)) == 4, "the history")
            self.assertEqual(history(driver), [
                ("user", "Hello browser"), ("assistant", first),
                ("user", "Second question"), ("assistant", second),
            ])
            self.assertEqual(driver.find_element(By.ID, "conversation-title").text,
                             "Hello browser")
            self.assertEqual(driver.find_element(By.CSS_SELECTOR, item)
                             .get_attribute("aria-current"), "true")

            driver.find_element(By.ID, "rollback").click()
            until(lambda d: len(history(d)) == 2, "the rollback")
            self.assertEqual(history(driver), [("user", "Hello browser"), ("assistant", first)])

            # The key: kept in the browser, sent as Bearer and as ?api_key=.
            driver.execute_script(WATCH_FETCH)
            driver.find_element(By.ID, "api-key").send_keys("sk-page-test")
            driver.find_element(By.ID, "save-key").click()
            until(lambda d: "Bearer sk-page-test" in d.execute_script("return window.__auth"),
                  "a fetch with the key")
            third = ask("With a key", 2)
            self.assertIn("1 earlier turn", third)
            self.assertIn(b"api_key=sk-page-test", self.websocket.uris[-1])
            driver.refresh()
            until(lambda d: d.find_element(By.ID, "api-key").get_attribute("value")
                  == "sk-page-test", "the kept key")
        finally:
            driver.quit()

    async def test_docs(self) -> None:
        """
        When a browser opens Swagger UI, then it renders every operation of
        the OpenAPI 3.1 document, loading nothing from another origin.
        """
        missing = browser_missing()
        if missing:
            self.fail(missing)
        await deferToThread(self.drive_docs)

    def drive_docs(self) -> None:
        """The browser's part of L{test_docs}."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        from easybackend.transports.pages import openapi_document
        from tests.test_openapi import documented_routes

        operations = len(documented_routes(openapi_document()))
        driver = self.browser()
        try:
            driver.get(self.url + "/docs/index.html")
            WebDriverWait(driver, WAIT).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == operations,
                f"waited {WAIT} s for {operations} operations in Swagger UI")
            self.assertEqual(driver.find_elements(By.CSS_SELECTOR, ".errors-wrapper"), [])
            self.assertIn("OAS 3.1", driver.find_element(By.CSS_SELECTOR, ".info").text)
            loaded = driver.execute_script(
                "return performance.getEntriesByType('resource').map((e) => e.name)")
            self.assertIn(self.url + "/openapi.json", loaded)
            self.assertEqual([u for u in loaded if not u.startswith(self.url + "/")], [])

            # The chat page's key is offered to "Authorize".
            driver.execute_script("localStorage.setItem('easybackend.apiKey', 'sk-docs')")
            driver.refresh()
            WebDriverWait(driver, WAIT).until(
                lambda d: d.execute_script(
                    "return window.ui && window.ui.authSelectors.authorized().toJS()"),
                f"waited {WAIT} s for Swagger UI's authorization")
            authorized = driver.execute_script("return window.ui.authSelectors.authorized().toJS()")
            self.assertEqual(authorized["bearerAuth"]["value"], "sk-docs")
        finally:
            driver.quit()
