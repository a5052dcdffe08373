"""
What the HTTP port serves to people rather than programs: the chat page at
C{/}, the OpenAPI document at C{/openapi.json}, and Swagger UI at C{/docs}
from assets installed with the package (never a CDN).
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import IResource


def index_html() -> bytes:
    """The chat page."""
    raise NotImplementedError


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every HTTP route."""
    raise NotImplementedError


def docs_resource() -> IResource:
    """Swagger UI, served from the installed package's assets."""
    raise NotImplementedError
