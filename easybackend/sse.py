"""
An incremental Server-Sent Events parser.

Feed it the bytes of a C{text/event-stream} body as they arrive, in chunks
of any size, and it returns the events each chunk completed.  It follows the
WHATWG "event stream interpretation" rules: lines end with CRLF, lone LF or
lone CR (a CRLF split across two chunks is one line end), C{:} lines are
comments, C{data:} lines of one event are joined with C{"\\n"}, and a blank
line dispatches the event.  Only complete lines are decoded, so a UTF-8
character split across chunks is never mangled.

It is pure (no reactor, no I/O) and works with a few C{bytes} operations per
chunk rather than a loop over bytes, because it sits on the hot path of
every streamed answer.
"""

from __future__ import annotations

from attrs import frozen

__all__ = ["Event", "SSEError", "SSEParser"]

_BOM = b"\xef\xbb\xbf"
_CR = 13
_LF = 10


class SSEError(ValueError):
    """The stream is not one this parser will accept (a line is too long)."""


@frozen
class Event:
    """
    One dispatched event.

    @ivar data: the C{data:} lines of the event, joined with C{"\\n"}.
    @ivar event: the event type (C{event:} field), C{"message"} by default.
    @ivar id: the last event id seen on the stream so far (C{id:} field).
    """

    data: str
    event: str = "message"
    id: str = ""


class SSEParser:
    """
    Turns chunks of an event stream into L{Event}s.

    @ivar last_event_id: the last C{id:} seen; it carries over to later events.
    @ivar retry: the last valid C{retry:} value in milliseconds, or C{None}.
    """

    def __init__(self, max_line_length: int = 1 << 20) -> None:
        """
        @param max_line_length: the longest incomplete line kept in memory, in
            bytes; a longer one raises L{SSEError} so a broken upstream cannot
            make us buffer without bound.
        """
        self._max_line_length = max_line_length
        self._partial: list[bytes] = []
        self._partial_length = 0
        self._skip_lf = False
        self._head: bytes | None = b""
        self._data: list[str] = []
        self._event_type = ""
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """
        Parse one more chunk of the body; return the events it completed, in
        order (often none, sometimes several).
        """
        if not chunk:
            return []
        if self._head is not None:
            # Still at the start of the stream: drop a UTF-8 BOM, which may
            # itself arrive split across chunks.
            head = self._head + chunk
            if len(head) < 3 and _BOM.startswith(head):
                self._head = head
                return []
            self._head = None
            chunk = head[3:] if head.startswith(_BOM) else head
            if not chunk:
                return []
        if self._skip_lf:
            # The previous chunk ended with CR: an LF here completes a CRLF
            # whose line already ended.
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\r" in chunk:
            self._skip_lf = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            self._keep(chunk)
            return []
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial = []
            self._partial_length = 0
        complete, _, rest = chunk.rpartition(b"\n")
        if rest:
            self._keep(rest)
        return self._lines(complete.decode("utf-8", "replace").split("\n"))

    def _keep(self, part: bytes) -> None:
        """Keep the start of a line until its end arrives."""
        self._partial.append(part)
        self._partial_length += len(part)
        if self._partial_length > self._max_line_length:
            raise SSEError(
                f"event stream line longer than {self._max_line_length} bytes"
            )

    def _lines(self, lines: list[str]) -> list[Event]:
        """Interpret complete lines; return the events blank lines dispatched."""
        events: list[Event] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(
                        Event(
                            data[0] if len(data) == 1 else "\n".join(data),
                            self._event_type or "message",
                            self.last_event_id,
                        )
                    )
                    data = self._data = []
                self._event_type = ""
            elif line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value[:1] == " " else value)
            elif line[0] == ":":
                continue
            else:
                name, _, value = line.partition(":")
                if value[:1] == " ":
                    value = value[1:]
                if name == "data":
                    data.append(value)
                elif name == "event":
                    self._event_type = value
                elif name == "id":
                    if "\0" not in value:
                        self.last_event_id = value
                elif name == "retry":
                    if value.isascii() and value.isdigit():
                        self.retry = int(value)
        return events
