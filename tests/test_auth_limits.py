"""Tests for L{easybackend.auth} and L{easybackend.limits}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from easybackend.auth import KeyRing
from easybackend.errors import RateLimited, Unauthenticated
from easybackend.limits import Limiter


class KeyRingTests(SynchronousTestCase):
    """Keys name their holders."""

    def test_names(self) -> None:
        """When a known key is presented, then its name is returned."""
        ring = KeyRing.parse(["# team keys", "alice:sk-a", "", "bob: sk-b "], "keys.txt")
        self.assertEqual(ring.name_of("sk-a"), "alice")
        self.assertEqual(ring.name_of_header("Bearer sk-b"), "bob")
        self.assertEqual(ring.name_of_header(b"bearer  sk-b"), "bob")

    def test_refusals(self) -> None:
        """When the key is missing, wrong or not Bearer, then L{Unauthenticated}."""
        ring = KeyRing.parse(["alice:sk-a"], "keys.txt")
        for header in [None, "", "Bearer", "Bearer sk-x", "Basic sk-a", "sk-a"]:
            with self.assertRaises(Unauthenticated):
                ring.name_of_header(header)

    def test_open_without_keys(self) -> None:
        """When no keys are configured, then everyone is let in, unnamed."""
        self.assertIsNone(KeyRing().name_of_header(None))
        self.assertFalse(KeyRing().enabled)

    def test_bad_lines(self) -> None:
        """When a line is not name:key or a name repeats, then the error names the source."""
        for lines in [["nocolon"], [":key"], ["name:"], ["a:1", "a:2"]]:
            with self.assertRaises(ValueError) as e:
                KeyRing.parse(lines, "keys.txt")
            self.assertIn("keys.txt", str(e.exception))

    def test_key_not_kept(self) -> None:
        """When keys are loaded, then the ring holds no key in clear."""
        ring = KeyRing.parse(["alice:sk-secret"], "x")
        self.assertNotIn("sk-secret", repr(ring))


class LimiterTests(SynchronousTestCase):
    """Per-key admission."""

    def test_per_minute(self) -> None:
        """
        When a key has started its asks of the minute, then the next is
        refused with the seconds until one leaves the window; other keys
        are not affected.
        """
        clock = Clock()
        limiter = Limiter(clock, asks_per_minute=2)
        limiter.acquire("a")()
        clock.advance(10)
        limiter.acquire("a")()
        with self.assertRaises(RateLimited) as e:
            limiter.acquire("a")
        self.assertAlmostEqual(e.exception.retry_after, 50)
        limiter.acquire("b")
        clock.advance(50)
        limiter.acquire("a")

    def test_streams(self) -> None:
        """When a key has its streams open, then another waits until one ends."""
        limiter = Limiter(Clock(), streams=1)
        release = limiter.acquire("a")
        with self.assertRaises(RateLimited):
            limiter.acquire("a")
        release()
        release()  # a second release changes nothing
        limiter.acquire("a")
        with self.assertRaises(RateLimited):
            limiter.acquire("a")
