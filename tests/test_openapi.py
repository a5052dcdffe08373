"""
Tests for L{easybackend.transports.pages}: the OpenAPI document, kept equal
to the routes Klein serves, and Swagger UI at C{/docs} from installed assets.
"""

from __future__ import annotations

import json
import re
from typing import Any

import treq
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from twisted.trial.unittest import SynchronousTestCase, TestCase

from easybackend.offline import OfflineUpstream
from easybackend.testing.fixtures import make_core, serve_http, within
from easybackend.transports import pages
from easybackend.transports.web import WebApp

#: The HTTP methods an OpenAPI path item may hold.
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

#: Any absolute or protocol-relative URL: what a page served offline must not load.
EXTERNAL = re.compile(rb"""(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}|(?:src|href)\s*=\s*["']?(?:https?:)?//""",
                      re.IGNORECASE)


def served_routes() -> set[tuple[str, str]]:
    """
    Every (path, method) the Klein app routes, in OpenAPI's path syntax;
    HEAD and OPTIONS (answered for every route) and Klein's own rule for a
    branch route's subtree left out.
    """
    routes = set()
    for rule in WebApp.app.url_map.iter_rules():
        if rule.endpoint.endswith("_branch"):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    return routes


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    """Every (path, method) the document describes."""
    return {(path, method) for path, item in document["paths"].items()
            for method in item if method in METHODS}


def schema_validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for the document's schema C{name}, its references resolved."""
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                 "components": document["components"]})


class DocumentTests(SynchronousTestCase):
    """The document itself."""

    def test_valid(self) -> None:
        """When the document is checked, then it is valid OpenAPI 3.1."""
        document = pages.openapi_document()
        self.assertEqual(document["openapi"], "3.1.0")
        validate_spec(document)
        for name, schema in document["components"]["schemas"].items():
            Draft202012Validator.check_schema(schema)
            if "example" in schema:
                schema_validator(document, name).validate(schema["example"])

    def test_no_drift(self) -> None:
        """
        When the routes Klein serves are compared with the document's, then
        both are the same: a new route must be documented, and a documented
        one must exist.
        """
        served = served_routes()
        documented = documented_routes(pages.openapi_document())
        self.assertEqual(
            (sorted(documented - served), sorted(served - documented)), ([], []),
            "(documented but not served, served but not documented)",
        )

    def test_errors(self) -> None:
        """
        When an HTTP operation is keyed, then it documents 401 (the
        WebSocket closes with 4401 instead); when it asks the
        model, then 429 (the per-key limits) and the upstream's failures;
        every 4xx or 5xx answer has a JSON body.
        """
        document = pages.openapi_document()
        resolved = document["components"]["responses"]
        asking = {("/ask/{conversation_id}", "post"), ("/v1/chat/completions", "post")}
        for path, method in documented_routes(document):
            operation = document["paths"][path][method]
            answers = operation["responses"]
            self.assertTrue(answers, f"{method} {path}")
            if operation.get("security") and path != "/ws":
                self.assertIn("401", answers, f"{method} {path}")
            if (path, method) in asking:
                for status in ["400", "413", "429", "502", "503", "504"]:
                    self.assertIn(status, answers, f"{method} {path}")
            for status, answer in answers.items():
                if "$ref" in answer:
                    answer = resolved[answer["$ref"].rsplit("/", 1)[1]]
                if status[0] in "45":
                    self.assertIn("application/json", answer["content"], f"{method} {path} {status}")

    def test_a_copy(self) -> None:
        """When a caller changes the document it got, then the next caller's is intact."""
        pages.openapi_document()["paths"].clear()
        self.assertIn("/healthz", pages.openapi_document()["paths"])

    def test_swagger_ui_renders_31(self) -> None:
        """When the Swagger UI assets are found, then they are version 5 or later."""
        folder = pages.swagger_ui_assets()
        major = int(re.fullmatch(r"swagger-ui-(\d+)\..*", folder.name).group(1))
        self.assertGreaterEqual(major, 5)
        self.assertTrue((folder / "swagger-ui-bundle.js").is_file())


async def get(url: str) -> tuple[int, Any, bytes]:
    response = await within(treq.get(url, persistent=False, allow_redirects=False))
    return response.code, response.headers, await within(treq.content(response))


class ServedTests(TestCase):
    """The document, Swagger UI and the page over a real loopback socket."""

    async def setUp(self) -> None:
        from twisted.internet import reactor

        self.core = await make_core(self, OfflineUpstream(reactor, interval=0))
        self.url = await serve_http(self, self.core)

    async def test_openapi_json(self) -> None:
        """When a client gets /openapi.json, then it is the document, as JSON."""
        code, headers, body = await get(self.url + "/openapi.json")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("application/json"))
        self.assertEqual(json.loads(body), pages.openapi_document())

    async def test_docs(self) -> None:
        """
        When a browser opens /docs, then it is sent to /docs/, a Swagger UI
        page that loads only its own assets, served from under /docs/; its
        initializer loads /openapi.json.
        """
        code, headers, _ = await get(self.url + "/docs")
        self.assertEqual(code, 301)
        self.assertEqual(headers.getRawHeaders("location"), ["docs/"])

        code, headers, page = await get(self.url + "/docs/")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/html"))
        self.assertIsNone(EXTERNAL.search(page), page)
        assets = re.findall(rb'(?:src|href)="([^"]+)"', page)
        self.assertIn(b"swagger-ui-bundle.js", assets)
        for asset in assets:
            code, headers, body = await get(self.url + "/docs/" + asset.decode())
            self.assertEqual(code, 200, asset)
            self.assertTrue(body, asset)

        code, headers, script = await get(self.url + "/docs/swagger-ui-bundle.js")
        self.assertIn("javascript", headers.getRawHeaders("content-type")[0])
        self.assertIn(b"SwaggerUIBundle", script)

        code, _, initializer = await get(self.url + "/docs/swagger-initializer.js")
        self.assertIn(b'"../openapi.json"', initializer)
        self.assertIsNone(EXTERNAL.search(initializer))

    async def test_docs_unknown(self) -> None:
        """When a client asks for a file /docs does not have, then a JSON 404."""
        for path in ["/docs/nope.js", "/docs/swagger-ui.css/x", "/docs/index.j2"]:
            code, headers, body = await get(self.url + path)
            self.assertEqual(code, 404, path)
            self.assertEqual(json.loads(body)["error"]["code"], "not_found")

    async def test_page(self) -> None:
        """When a browser opens /, then it gets the chat page, which loads nothing from elsewhere."""
        code, headers, page = await get(self.url + "/")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertEqual(page, pages.index_html())
        self.assertIn(b'id="prompt"', page)
        self.assertIsNone(EXTERNAL.search(page))

    async def test_answers_match(self) -> None:
        """
        When clients use the JSON routes, then each answer, and an error,
        matches the schema the document gives it.
        """
        document = pages.openapi_document()

        async def check(method: str, path: str, schema: str, body: Any = None,
                        status: int = 200) -> Any:
            response = await within(treq.request(
                method, self.url + path, persistent=False,
                data=None if body is None else json.dumps(body).encode()))
            decoded = json.loads(await within(treq.content(response)))
            self.assertEqual(response.code, status, decoded)
            schema_validator(document, schema).validate(decoded)
            return decoded

        answer = await check("POST", "/ask/new", "Answer", {"prompt": "Hello"})
        cid = answer["conversation_id"]
        await check("POST", f"/ask/{cid}", "Answer", {"prompt": "Again"})
        await check("GET", "/conversations", "ConversationList")
        await check("GET", f"/conversations/{cid}", "ConversationView")
        await check("POST", f"/conversations/{cid}/rollback", "ConversationView", {"turns": 1})
        await check("DELETE", f"/conversations/{cid}", "Deleted")
        await check("GET", "/healthz", "Status")
        await check("GET", "/readyz", "Status")
        await check("GET", f"/conversations/{cid}", "Error", status=404)
        await check("POST", "/ask/new", "Error", {"prompt": 3}, status=400)

    async def test_security(self) -> None:
        """
        When the server has API keys, then each HTTP operation the document
        marks as keyed answers 401 without a key, in its documented error
        shape, and each one it marks as open does not.
        """
        from easybackend.auth import KeyRing

        url = await serve_http(self, self.core, keys=KeyRing.parse(["t:sk-t"], "test"))
        document = pages.openapi_document()
        responses = document["components"]["responses"]
        for path, method in sorted(documented_routes(document)):
            if path == "/ws":  # a WebSocket handshake, not a plain request
                continue
            operation = document["paths"][path][method]
            concrete = path.replace("{conversation_id}", "c1")
            body = b'{"prompt": "hi", "model": "m", "messages": [{"role": "user", "content": "hi"}]}'
            response = await within(treq.request(
                method.upper(), url + concrete, persistent=False, allow_redirects=False,
                data=body if method == "post" else None))
            content = await within(treq.content(response))
            if not operation["security"]:
                self.assertNotEqual(response.code, 401, f"{method} {path}")
                continue
            self.assertEqual(response.code, 401, f"{method} {path}")
            answer = operation["responses"]["401"]
            answer = responses[answer["$ref"].rsplit("/", 1)[1]]
            schema = answer["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            schema_validator(document, schema).validate(json.loads(content))
