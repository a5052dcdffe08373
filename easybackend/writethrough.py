"""
TCP listening ports whose connections send a write at once.

Twisted's TCP transport keeps every write until the reactor's next turn;
then it registers the socket for writing (C{epoll_ctl}), waits for it
(C{epoll_wait}), sends, and unregisters it (twisted/twisted#5303).  An
answer streamed in small pieces pays that for every piece.  These
connections send a write at once when nothing is waiting to be sent
before it, as asyncio's transports do, and leave to Twisted only what the
socket did not take, so the order of the bytes and the flow control
(producers paused on a full buffer) stay Twisted's.  In paired benchmark
runs the WebSocket and OpenAI-style streams cost about 5% less server CPU
per answer with them (bench/analysis.md).
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from twisted.internet import defer, tcp
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import implementer


class WriteThroughServer(tcp.Server):
    """
    A server connection that sends a write at once when it can, with
    C{TCP_NODELAY} on (as asyncio's transports have it).

    Twisted sends what a turn wrote in one C{send}.  Written through, a
    response's last pieces (an answer, then the chunked terminator) go out
    as two small segments, and with Nagle's algorithm the second waits
    for the client's acknowledgement of the first: on a real network, for
    the client's delayed ACK (40 ms on Linux, 200 ms on Windows).
    """

    #: what was written while L{held}, to go out in one send at its end
    _held: list[bytes] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP after all, or already closed: nothing to hold back

    @contextmanager
    def held(self) -> Iterator[None]:
        """
        Keep what is written within the block, and send it in one write at
        its end: an HTTP response's headers and its first bytes, written by
        twisted.web one after the other, then reach the client in one
        segment instead of two (one wake-up of the client, one C{send}).
        """
        if self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        if held:
            self.write(b"".join(held))

    def write(self, data: bytes) -> None:
        if self._held is not None:
            if isinstance(data, bytes):
                self._held.append(data)
                return
            self._release()  # what is not bytes goes after what was held
        if data and isinstance(data, bytes) and self._nothing_waiting():
            data = self._send_now(data)
            if not data:
                return
        super().write(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self._held is not None:
            for chunk in iovec:
                self.write(chunk)
            return
        if self._nothing_waiting():
            chunks = list(iovec)
            if all(isinstance(chunk, bytes) for chunk in chunks):
                rest = self._send_now(b"".join(chunks))
                if rest:
                    super().write(rest)
                return
            iovec = chunks
        super().writeSequence(iovec)

    def loseConnection(self, *args: Any, **kwargs: Any) -> None:
        self._release()
        super().loseConnection(*args, **kwargs)

    def _nothing_waiting(self) -> bool:
        """Connected, open for writing, and no earlier bytes left to send."""
        return (
            self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
        )

    def _send_now(self, data: bytes) -> bytes:
        """
        Send what the socket takes now; return the rest.  On an error the
        whole is returned: Twisted's own send, on the next turn, meets the
        same error and closes the connection its usual way.
        """
        try:
            sent = self.socket.send(data)
        except OSError:
            return data
        return data[sent:]


@contextmanager
def one_segment(transport: Any) -> Iterator[None]:
    """
    Writes to C{transport} within the block go out together (see
    L{WriteThroughServer.held}); on any other transport, as they come.
    """
    held = getattr(transport, "held", None)
    if held is None:
        yield
        return
    with held():
        yield


class WriteThroughPort(tcp.Port):
    """A listening port whose connections are L{WriteThroughServer}s."""

    transport = WriteThroughServer


@implementer(IStreamServerEndpoint)
class WriteThroughTCPEndpoint:
    """Listen on TCP as C{reactor.listenTCP} does, with L{WriteThroughPort}."""

    def __init__(self, reactor: Any, port: int, backlog: int, interface: str) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory: IProtocolFactory) -> "defer.Deferred[WriteThroughPort]":
        return defer.execute(self._listen, factory)

    def _listen(self, factory: IProtocolFactory) -> WriteThroughPort:
        port = WriteThroughPort(
            self._port, factory, self._backlog, self._interface, self._reactor)
        port.startListening()
        return port


def write_through(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    The same listener with L{WriteThroughServer} connections, for a plain
    TCP endpoint (C{tcp:...}) on a POSIX reactor; any other endpoint (TLS,
    UNIX sockets, another reactor) as it is.
    """
    if type(endpoint) not in (TCP4ServerEndpoint, TCP6ServerEndpoint):
        return endpoint
    reactor = getattr(endpoint, "_reactor", None)
    fields = [getattr(endpoint, name, None) for name in ("_port", "_backlog", "_interface")]
    if not isinstance(reactor, PosixReactorBase) or None in fields:
        return endpoint
    port, backlog, interface = fields
    return WriteThroughTCPEndpoint(reactor, port, backlog, interface)
