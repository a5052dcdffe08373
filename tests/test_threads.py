"""
Tests for L{easybackend.threads}: a thread pool whose calls leave no
reference cycle for the garbage collector.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from easybackend.threads import ThreadPool


class Work:
    """An argument whose end we can watch with a weak reference."""


class ThreadPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(0, 2, name="test-threads")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def call(self, func: Any, *args: Any) -> tuple[bool, Any]:
        """Run C{func(*args)} in the pool; its C{(ok, result)}, within 10 s."""
        done = threading.Event()
        outcome: list[tuple[bool, Any]] = []

        def on_result(ok: bool, result: Any) -> None:
            outcome.append((ok, result))
            done.set()

        self.pool.callInThreadWithCallback(on_result, func, *args)
        self.assertTrue(done.wait(10), "the call did not finish in 10 s")
        return outcome[0]

    def test_result_and_nothing_left(self) -> None:
        """
        When a call returns, then its result reaches the callback, and the
        call's arguments are freed with the collector off: no cycle holds
        them (Twisted's own pool leaves one per call).
        """
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        work = Work()
        watch = weakref.ref(work)
        ok, result = self.call(lambda w: id(w), work)
        self.assertEqual((ok, result), (True, id(work)))
        del work
        self.assertIsNone(watch())

    def test_failure(self) -> None:
        """
        When a call raises, then the callback gets C{False} and a Failure
        of that exception.
        """
        def fail() -> None:
            raise ValueError("bad")

        ok, result = self.call(fail)
        self.assertFalse(ok)
        self.assertIsInstance(result, Failure)
        self.assertIsInstance(result.value, ValueError)

    def test_failure_without_callback_is_logged(self) -> None:
        """
        When a call with no callback raises, then the failure is logged,
        not lost.
        """
        logged = threading.Event()
        events: list[dict[str, Any]] = []

        def observer(event: dict[str, Any]) -> None:
            if "log_failure" in event:
                events.append(event)
                logged.set()

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        def fail() -> None:
            raise ValueError("nobody waits")

        self.pool.callInThreadWithCallback(None, fail)
        self.assertTrue(logged.wait(10))
        self.assertIsInstance(events[0]["log_failure"].value, ValueError)
        self.flushLoggedErrors(ValueError)
