"""
Fresh PostgreSQL databases for tests, on the server at
C{EASYBACKEND_TEST_POSTGRES} (default: the loopback one, trust
authentication).  Without that server a test using them fails, never
skips: CI must start it.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, TypeVar

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

__all__ = [
    "POSTGRES_URL",
    "fresh_database",
    "query",
    "terminate_backends",
    "with_database",
]

#: The server tests make their databases on (its maintenance database).
POSTGRES_URL = os.environ.get(
    "EASYBACKEND_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)

T = TypeVar("T")


def with_database(url: str, database: str) -> str:
    """C{url} naming another database on the same server."""
    return url.rsplit("/", 1)[0] + "/" + database


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as c:
        c.execute(sql)


async def fresh_database(testcase: TestCase) -> str:
    """
    Create an empty database C{eb_test_<random>}, dropped (with its
    sessions, C{WITH (FORCE)}) when the test ends; return its URL.  Fails
    the test when psycopg is missing or the server cannot be reached.
    """
    try:
        import psycopg
    except ImportError:
        testcase.fail(
            "the PostgreSQL tests need psycopg: pip install 'psycopg[binary]'"
        )
    name = "eb_test_" + uuid.uuid4().hex[:16]
    try:
        await deferToThread(_admin, f"CREATE DATABASE {name}")
    except psycopg.OperationalError as e:
        testcase.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({e}); start it"
            " (.ci/run does) or set EASYBACKEND_TEST_POSTGRES"
        )
    testcase.addCleanup(deferToThread, _admin, f"DROP DATABASE {name} WITH (FORCE)")
    return with_database(POSTGRES_URL, name)


def _run(url: str, f: Callable[[Any], T]) -> T:
    import psycopg

    with psycopg.connect(url, application_name="test", connect_timeout=5) as c:
        return f(c)  # commits on success


async def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The rows of C{sql} (C{%s} placeholders), on a connection of its own."""

    def run(connection: Any) -> list[tuple[Any, ...]]:
        cursor = connection.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    return await deferToThread(_run, url, run)


async def terminate_backends(url: str, application: str = "%") -> int:
    """
    Kill every other session on C{url}'s database whose application name
    is C{LIKE application}, as a database restart or a network cut would;
    how many were killed.
    """
    rows = await query(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name LIKE %s",
        (application,),
    )
    return sum(1 for (killed,) in rows if killed)
