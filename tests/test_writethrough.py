"""
Tests for L{easybackend.writethrough}: listening ports whose connections
send a write at once.
"""

from __future__ import annotations

import select
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from easybackend.tap import QuietSite
from easybackend.writethrough import WriteThroughTCPEndpoint, write_through


def _readable(sock: socket.socket, timeout: float = 2.0) -> bool:
    """Whether C{sock} has bytes to read within C{timeout}, the reactor not turning."""
    return bool(select.select([sock], [], [], timeout)[0])


def _read_all(sock: socket.socket, size: int, timeout: float = 10.0) -> bytes:
    """Read until C{size} bytes came, each wait bounded by C{timeout}."""
    got = b""
    while len(got) < size:
        if not _readable(sock, timeout):
            raise AssertionError(f"only {len(got)} of {size} bytes came")
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return got


class _Server(Protocol):
    """Hands its connection to the test once made."""

    def connectionMade(self) -> None:
        self.factory.made.callback(self)  # type: ignore[attr-defined]


class WriteThroughTests(TestCase):
    """Connections of a write-through port, over real loopback sockets."""

    async def connect(self) -> tuple[Any, socket.socket]:
        factory = Factory.forProtocol(_Server)
        factory.made = Deferred()  # type: ignore[attr-defined]
        port = await WriteThroughTCPEndpoint(reactor, 0, 50, "127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        server = await factory.made  # type: ignore[attr-defined]
        self.addCleanup(server.transport.abortConnection)
        return server, client

    async def test_sent_at_once(self) -> None:
        """
        When a connection writes, or writes a sequence, then the bytes
        reach the peer before the reactor turns again.
        """
        server, client = await self.connect()
        server.transport.write(b"piece 1")
        self.assertTrue(_readable(client), "the write waited for the reactor")
        self.assertEqual(client.recv(100), b"piece 1")
        server.transport.writeSequence([b"piece", b" 2"])
        self.assertTrue(_readable(client), "the sequence waited for the reactor")
        self.assertEqual(client.recv(100), b"piece 2")

    async def test_order_kept_when_the_socket_is_full(self) -> None:
        """
        When the socket cannot take a write whole, then what is left goes
        out later, and every write after it waits behind it: the peer reads
        all the bytes in the order they were written, then the close.
        """
        server, client = await self.connect()
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 8192  # 2 MiB, more than the socket holds
        server.transport.write(big)
        self.assertTrue(server.transport.dataBuffer or server.transport._tempDataBuffer,
                        "the socket took 2 MiB at once; the test proves nothing")
        server.transport.write(b"tail 1")
        server.transport.writeSequence([b"tail", b" 2"])
        server.transport.loseConnection()
        expected = big + b"tail 1tail 2"
        # Read in a thread, so that the reactor turns and sends the rest.
        got = await deferToThread(_read_all, client, len(expected))
        self.assertEqual(len(got), len(expected))
        self.assertTrue(got == expected, "the bytes came out of order")
        self.assertEqual(client.recv(10), b"", "no close after the bytes")

    async def test_no_delay(self) -> None:
        """
        When a connection is accepted, then it sends small writes without
        waiting for the peer's acknowledgement of earlier ones
        (C{TCP_NODELAY}), so that a response's last two writes are not
        held apart by Nagle's algorithm.
        """
        server, client = await self.connect()
        self.assertTrue(server.transport.socket.getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.assertTrue(server.transport.getTcpNoDelay())

    async def test_not_bytes(self) -> None:
        """When a connection writes text, then it is refused as Twisted refuses it."""
        server, client = await self.connect()
        with self.assertRaises(TypeError):
            server.transport.write("text")  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            server.transport.writeSequence(["text"])  # type: ignore[list-item]


    async def test_held_writes_go_together(self) -> None:
        """
        When a connection writes within C{held()}, then nothing reaches the
        peer until the block ends, and then every byte does, in order.
        """
        server, client = await self.connect()
        with server.transport.held():
            server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
            server.transport.writeSequence([b"first", b" piece"])
            self.assertFalse(_readable(client, 0), "a held write was sent")
        self.assertTrue(_readable(client), "the held writes were not sent at the end")
        self.assertEqual(client.recv(100), b"HTTP/1.1 200 OK\r\n\r\nfirst piece")

    async def test_close_within_held(self) -> None:
        """
        When a connection is closed within C{held()}, then what was held
        is sent before the close.
        """
        server, client = await self.connect()
        with server.transport.held():
            server.transport.write(b"last words")
            server.transport.loseConnection()
        got = await deferToThread(_read_all, client, len(b"last words"))
        self.assertEqual(got, b"last words")
        client.settimeout(10)
        # in a thread: the reactor turns to close the connection
        self.assertEqual(await deferToThread(client.recv, 10), b"", "no close after the bytes")


class _Sends:
    """A socket that lists what each C{send} sent."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        n = self._sock.send(data)
        self.sent.append(bytes(data[:n]))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _FirstPiece(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: first piece\n\n")
        return NOT_DONE_YET


class ResponseStartTests(TestCase):
    """EasyBackend's HTTP site over a write-through listener."""

    async def test_headers_and_first_bytes_in_one_send(self) -> None:
        """
        When a response starts (a stream's first event, a JSON answer),
        then its headers and its first bytes leave in one C{send}: one
        segment, one wake-up of the client, instead of two.
        """
        made: Deferred[Any] = Deferred()

        class Site(QuietSite):
            def buildProtocol(self, addr: Any) -> Any:
                channel = super().buildProtocol(addr)
                reactor.callLater(0, made.callback, getattr(channel, "_channel", channel))
                return channel

        port = await WriteThroughTCPEndpoint(reactor, 0, 50, "127.0.0.1").listen(
            Site(_FirstPiece()))
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        channel = await made
        self.addCleanup(channel.transport.abortConnection)
        sends = channel.transport.socket = _Sends(channel.transport.socket)
        client.sendall(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
        await deferToThread(_readable, client, 10)
        self.assertEqual(len(sends.sent), 1, sends.sent)
        self.assertTrue(sends.sent[0].startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"data: first piece", sends.sent[0])


class EndpointTests(SynchronousTestCase):
    """Which listeners L{write_through} changes."""

    def test_tcp(self) -> None:
        """
        When an endpoint is plain TCP (C{tcp:} with or without an
        interface, IPv4 or IPv6), then it listens the same way with
        write-through connections.
        """
        for description in ("tcp:8080", "tcp:0:interface=127.0.0.1",
                            "tcp6:0:interface=\\:\\:1"):
            endpoint = serverFromString(reactor, description)
            changed = write_through(endpoint)
            self.assertIsInstance(changed, WriteThroughTCPEndpoint, description)
            self.assertEqual(
                (changed._port, changed._backlog, changed._interface),
                (endpoint._port, endpoint._backlog, endpoint._interface))

    def test_others_unchanged(self) -> None:
        """
        When an endpoint is anything but plain TCP on a POSIX reactor
        (a UNIX socket, TLS, another reactor), then it is kept as it is.
        """
        unix = UNIXServerEndpoint(reactor, "/tmp/eb-test.sock")
        self.assertIs(write_through(unix), unix)
        tls = SSL4ServerEndpoint(reactor, 8443, object())
        self.assertIs(write_through(tls), tls)
        other = TCP4ServerEndpoint(object(), 8080)
        self.assertIs(write_through(other), other)
