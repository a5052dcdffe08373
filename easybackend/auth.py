"""
API keys: who is asking.

Keys come from a file (one C{name:key} a line) or a comma-separated
variable of the same pairs.  Keys are kept only as SHA-256 digests and
compared in constant time; only the key's I{name} ever reaches logs,
metrics and the store (as the owner of conversations).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

from attrs import frozen

from easybackend.errors import Unauthenticated


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@frozen
class KeyRing:
    """The configured keys; empty means the server is open to all."""

    entries: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def parse(cls, pairs: Iterable[str], source: str) -> "KeyRing":
        """
        Read C{name:key} pairs (blank lines and C{#} comments skipped);
        raise C{ValueError} naming C{source} and the line for a bad one.
        """
        entries: list[tuple[str, bytes]] = []
        names: set[str] = set()
        for number, line in enumerate(pairs, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, key = line.partition(":")
            name, key = name.strip(), key.strip()
            if not sep or not name or not key:
                raise ValueError(f"{source}: entry {number} is not name:key")
            if name in names:
                raise ValueError(f"{source}: the name {name!r} appears twice")
            names.add(name)
            entries.append((name, _digest(key)))
        return cls(tuple(entries))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def name_of(self, key: str | None) -> str | None:
        """
        The name of C{key}, or C{None} when keys are off.  Every entry is
        compared, in constant time, whatever matches.

        @raise Unauthenticated: keys are on and C{key} is missing or wrong.
        """
        if not self.entries:
            return None
        if not key:
            raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
        digest = _digest(key)
        found = None
        for name, known in self.entries:
            if hmac.compare_digest(digest, known):
                found = name
        if found is None:
            raise Unauthenticated("the API key is not valid")
        return found

    def name_of_header(self, authorization: str | bytes | None) -> str | None:
        """The name for an C{Authorization: Bearer <key>} header value."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        key = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                key = value.strip()
        return self.name_of(key)
