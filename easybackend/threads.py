"""
A thread pool whose calls leave no reference cycle behind.

Twisted's L{twisted.python.threadpool.ThreadPool} wraps every call in a
closure that refers to itself, so each call to a thread (each query of the
store) leaves a small cycle that only the garbage collector can free.  The
server collects its older generations rarely (L{easybackend.tap.settle_collector}),
so such cycles would pile up between collections and make each one longer.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger
from twisted.python import context
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool as _TwistedThreadPool

log = Logger()


class _Call:
    """One call to run in a pool's thread, in the caller's log context."""

    __slots__ = ("_ctx", "_func", "_args", "_kw", "_on_result")

    def __init__(self, ctx: Any, func: Callable[..., Any], args: tuple[Any, ...],
                 kw: dict[str, Any],
                 on_result: Callable[[bool, Any], object] | None) -> None:
        self._ctx = ctx
        self._func = func
        self._args = args
        self._kw = kw
        self._on_result = on_result

    def __call__(self) -> None:
        try:
            result = context.call(self._ctx, self._func, *self._args, **self._kw)
            ok = True
        except BaseException:
            result = Failure()
            ok = False
        on_result = self._on_result
        # Let go of the work before reporting, as Twisted's pool does.
        self._func = self._args = self._kw = self._on_result = None  # type: ignore[assignment]
        if on_result is not None:
            on_result(ok, result)
        elif not ok:
            log.failure("in a thread of the pool", result)


class ThreadPool(_TwistedThreadPool):
    """L{twisted.python.threadpool.ThreadPool} without the cycle per call."""

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        if self.joined:
            return
        ctx = context.theContextTracker.currentContext().contexts[-1]
        self._team.do(_Call(ctx, func, args, kw, onResult))
