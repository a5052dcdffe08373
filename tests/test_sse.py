"""
Tests for L{easybackend.sse}: the incremental Server-Sent Events parser.

Every case of the table is fed whole, cut in two at every byte offset, cut
in three at every pair of offsets, and one byte at a time: the events must
not depend on how the bytes were chunked.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from easybackend.sse import Event, SSEError, SSEParser

#: (name, input, expected events as (event type, data, last event id))
CASES: list[tuple[str, bytes, list[tuple[str, str, str]]]] = [
    ("one event", b"data: hello\n\n", [("message", "hello", "")]),
    ("no space after the colon", b"data:hello\n\n", [("message", "hello", "")]),
    ("only one space is removed", b"data:  hello\n\n", [("message", " hello", "")]),
    ("multi-line data is joined with LF",
     b"data: a\ndata: b\ndata: c\n\n", [("message", "a\nb\nc", "")]),
    ("CRLF line ends", b"data: a\r\ndata: b\r\n\r\n", [("message", "a\nb", "")]),
    ("lone CR line ends", b"data: a\rdata: b\r\r", [("message", "a\nb", "")]),
    ("mixed line ends",
     b"data: a\r\ndata: b\rdata: c\n\r\n", [("message", "a\nb\nc", "")]),
    ("LF then CR is two line ends", b"data: a\n\r", [("message", "a", "")]),
    ("CR CR LF is two line ends",
     b"data: a\r\r\ndata: b\n\n", [("message", "a", ""), ("message", "b", "")]),
    ("two events", b"data: 1\n\ndata: 2\n\n",
     [("message", "1", ""), ("message", "2", "")]),
    ("a comment alone dispatches nothing", b": keep-alive\n\n", []),
    ("comments between data lines are skipped",
     b": hi\ndata: a\n:\ndata: b\n\n", [("message", "a\nb", "")]),
    ("event and id fields",
     b"event: update\nid: 7\ndata: x\n\n", [("update", "x", "7")]),
    ("the id carries over, the event type does not",
     b"event: e\nid: 1\ndata: a\n\ndata: b\n\n",
     [("e", "a", "1"), ("message", "b", "1")]),
    ("an empty id resets it",
     b"id: 1\ndata: a\n\nid\ndata: b\n\n", [("message", "a", "1"), ("message", "b", "")]),
    ("an id with NUL is ignored",
     b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
     [("message", "a", "1"), ("message", "b", "1")]),
    ("an empty event type means message", b"event:\ndata: a\n\n", [("message", "a", "")]),
    ("a blank line without data dispatches nothing and resets the type",
     b"event: x\n\ndata: y\n\n", [("message", "y", "")]),
    ("a field without colon is a field with an empty value",
     b"data\n\n", [("message", "", "")]),
    ("an empty data line then a value", b"data\ndata: x\n\n", [("message", "\nx", "")]),
    ("unknown fields are ignored", b"foo: bar\ndata: a\nDATA: b\n\n", [("message", "a", "")]),
    ("only the first colon splits", b"data: a: b:c\n\n", [("message", "a: b:c", "")]),
    ("an incomplete event is not dispatched", b"data: x\n", []),
    ("an incomplete line is not dispatched", b"data: x\n\ndata: y", [("message", "x", "")]),
    ("multi-byte UTF-8", "data: héllo 😀 世界\n\n".encode(),
     [("message", "héllo 😀 世界", "")]),
    ("invalid UTF-8 becomes U+FFFD", b"data: a\xffb\n\n", [("message", "a\ufffdb", "")]),
    ("a leading BOM is dropped", b"\xef\xbb\xbfdata: a\n\n", [("message", "a", "")]),
    ("a BOM later is part of the field name",
     b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [("message", "a", "")]),
    ("the OpenAI wire format",
     b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
     b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
     b"data: [DONE]\n\n",
     [("message", '{"choices":[{"delta":{"content":"Hi"}}]}', ""),
      ("message", '{"choices":[],"usage":{"total_tokens":3}}', ""),
      ("message", "[DONE]", "")]),
    ("keep-alives and CRLF around events",
     b": ping\r\n\r\ndata: a\r\n\r\n: ping\r\n\r\ndata: b\r\n\r\n",
     [("message", "a", ""), ("message", "b", "")]),
]


def _events(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.event, e.data, e.id) for e in events]


def _feed(chunks: list[bytes]) -> list[tuple[str, str, str]]:
    parser = SSEParser()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return _events(events)


class TableTests(SynchronousTestCase):
    """The table of cases, under every chunking."""

    def test_whole(self) -> None:
        """
        When an input arrives in one chunk, then the parser returns the
        expected events.
        """
        for name, data, expected in CASES:
            self.assertEqual(_feed([data]), expected, name)

    def test_every_split(self) -> None:
        """
        When an input arrives cut in two at any byte offset (inside a line,
        a CRLF, a multi-byte character or a BOM), then the events are the
        same as when it arrives whole.
        """
        for name, data, expected in CASES:
            for i in range(len(data) + 1):
                self.assertEqual(
                    _feed([data[:i], data[i:]]), expected, f"{name}: split at {i}"
                )

    def test_every_three_way_split(self) -> None:
        """
        When an input arrives cut in three at any two offsets, then the
        events are the same as when it arrives whole.
        """
        for name, data, expected in CASES:
            if len(data) > 80:
                continue
            for i in range(len(data) + 1):
                for j in range(i, len(data) + 1):
                    self.assertEqual(
                        _feed([data[:i], data[i:j], data[j:]]),
                        expected,
                        f"{name}: split at {i} and {j}",
                    )

    def test_byte_by_byte(self) -> None:
        """
        When an input arrives one byte at a time, then the events are the
        same as when it arrives whole.
        """
        for name, data, expected in CASES:
            chunks = [data[i:i + 1] for i in range(len(data))]
            self.assertEqual(_feed(chunks), expected, name)


class ParserTests(SynchronousTestCase):
    """Behaviours outside the table."""

    def test_events_as_soon_as_complete(self) -> None:
        """
        When a chunk completes an event, then that feed returns it, before
        the rest of the stream arrives.
        """
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: a\n"), [])
        self.assertEqual(parser.feed(b"\ndata: b"), [Event("a")])
        self.assertEqual(parser.feed(b"\n\n"), [Event("b")])

    def test_empty_chunk_between_cr_and_lf(self) -> None:
        """
        When an empty chunk arrives between the CR and the LF of a CRLF,
        then the CRLF still counts as one line end.
        """
        parser = SSEParser()
        events = []
        for chunk in [b"data: a\r", b"", b"\ndata: b\r", b"", b"\n\r", b"", b"\n"]:
            events.extend(parser.feed(chunk))
        self.assertEqual(_events(events), [("message", "a\nb", "")])

    def test_retry(self) -> None:
        """
        When a C{retry:} field holds ASCII digits, then the parser keeps
        its value; otherwise it ignores it.
        """
        parser = SSEParser()
        self.assertIsNone(parser.retry)
        parser.feed(b"retry: 1500\n\n")
        self.assertEqual(parser.retry, 1500)
        parser.feed(b"retry: 1.5\nretry: x\nretry: \xd9\xa3\n\n")
        self.assertEqual(parser.retry, 1500)

    def test_last_event_id(self) -> None:
        """
        When an C{id:} field was seen, then the parser exposes it as
        C{last_event_id}, even before an event is dispatched.
        """
        parser = SSEParser()
        parser.feed(b"id: abc\n")
        self.assertEqual(parser.last_event_id, "abc")

    def test_line_too_long(self) -> None:
        """
        When a line grows past C{max_line_length} without ending, then the
        parser raises L{SSEError} instead of buffering without bound.
        """
        parser = SSEParser(max_line_length=10)
        parser.feed(b"data: 1234")
        self.assertRaises(SSEError, parser.feed, b"5")

    def test_long_line_that_ends(self) -> None:
        """
        When a long line arrives in many chunks and ends within the limit,
        then its event is returned whole.
        """
        parser = SSEParser()
        events = []
        for _ in range(1000):
            events.extend(parser.feed(b"x" * 100))
        self.assertEqual(events, [])
        events = parser.feed(b"\n\n")
        self.assertEqual(events, [])  # "xxx..." is an unknown field name
        parser.feed(b"data: ")
        for _ in range(1000):
            parser.feed("é".encode() * 50)
        [event] = parser.feed(b"\n\n")
        self.assertEqual(event.data, "é" * 50_000)

    def test_many_events_in_one_chunk(self) -> None:
        """
        When one chunk holds many events, then one feed returns them all, in
        order.
        """
        chunk = b"".join(b"data: %d\n\n" % i for i in range(500))
        events = SSEParser().feed(chunk)
        self.assertEqual([e.data for e in events], [str(i) for i in range(500)])
