"""
Per-key limits: asks per minute and streams open at once.

Counted in this process; with several replicas each counts its own share
(see the README's deployment section).
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from twisted.internet.interfaces import IReactorTime

from easybackend.errors import RateLimited

WINDOW = 60.0


class Limiter:
    """
    Admits asks per key: at most C{asks_per_minute} started in any 60
    seconds, and at most C{streams} open at once.  C{None} is no limit.
    """

    def __init__(
        self,
        clock: IReactorTime,
        asks_per_minute: int | None = None,
        streams: int | None = None,
    ) -> None:
        self._clock = clock
        self._per_minute = asks_per_minute
        self._streams = streams
        self._started: dict[str | None, deque[float]] = {}
        self._open: dict[str | None, int] = {}

    def acquire(self, key: str | None) -> Callable[[], None]:
        """
        Admit one ask for C{key} and return the function that ends it.

        @raise RateLimited: with the seconds after which a retry may pass.
        """
        now = self._clock.seconds()
        if self._streams is not None and self._open.get(key, 0) >= self._streams:
            raise RateLimited(
                f"too many streams open at once (limit {self._streams})", 1.0)
        if self._per_minute is not None:
            started = self._started.setdefault(key, deque())
            while started and started[0] <= now - WINDOW:
                started.popleft()
            if len(started) >= self._per_minute:
                raise RateLimited(
                    f"too many asks (limit {self._per_minute} a minute)",
                    max(started[0] + WINDOW - now, 0.001))
            started.append(now)
        self._open[key] = self._open.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._open[key] - 1
                if left:
                    self._open[key] = left
                else:
                    del self._open[key]

        return release

    @contextmanager
    def admitted(self, key: str | None) -> Iterator[None]:
        """Hold one of C{key}'s places for a block; see L{acquire}."""
        release = self.acquire(key)
        try:
            yield
        finally:
            release()
