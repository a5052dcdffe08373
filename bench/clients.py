"""
One client per transport, all on one asyncio loop (aiohttp, grpc.aio).

C{await client.ask(worker, conversation_id, n)} sends one prompt and reads
the whole answer; it returns (seconds to the first piece, seconds to the
end) measured from just before the request was sent.  It raises when the
answer is not complete (an error, or not all pieces arrived), so that a
benchmark never counts a broken answer as a fast one.
"""

from __future__ import annotations

import asyncio
import json
from time import perf_counter
from typing import Any, AsyncIterator, Callable

import aiohttp

PIECES = 20
_loads = json.loads


class AnswerError(Exception):
    pass


def prompt_for(n: int) -> str:
    return f"Benchmark question {n}: how much time does the backend add?"


class _Base:
    #: the transport's name in results
    name = ""
    #: True when the client sees no pieces, only the whole answer
    whole_answer = False

    async def close(self) -> None:
        pass


def _check(pieces: int, expected: int | None) -> None:
    if expected is not None and pieces != expected:
        raise AnswerError(f"{pieces} pieces instead of {expected}")


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The Server-Sent Events of a response, each as its raw bytes."""
    buffer = b""
    async for data in resp.content.iter_any():
        buffer += data
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[:end], buffer[end + 2:]
            yield event


async def _openai_stream(session: aiohttp.ClientSession, url: str, body: bytes,
                         headers: dict[str, str], expected: int | None,
                         on_first: Callable[[], None] | None = None) -> tuple[float, float]:
    """POST a streaming Chat Completions request; time its content chunks."""
    first = 0.0
    pieces = 0
    done = False
    start = perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise AnswerError(f"status {resp.status}: {(await resp.read())[:200]!r}")
        async for event in _events(resp):
            if not event.startswith(b"data: "):
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                done = True
                continue
            chunk = _loads(payload)
            if "error" in chunk:
                raise AnswerError(f"error event: {chunk['error']}")
            choices = chunk.get("choices")
            if choices and choices[0]["delta"].get("content"):
                pieces += 1
                if pieces == 1:
                    first = perf_counter() - start
                    if on_first is not None:
                        on_first()
    total = perf_counter() - start
    if not done:
        raise AnswerError("no [DONE]")
    _check(pieces, expected)
    return first, total


class DirectClient(_Base):
    """The baseline: streaming Chat Completions straight from the fake."""

    name = "direct"

    def __init__(self, session: aiohttp.ClientSession, port: int,
                 expected: int | None = PIECES) -> None:
        self.session = session
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.expected = expected
        self.headers = {"content-type": "application/json",
                        "authorization": "Bearer bench"}

    async def ask(self, worker: int, cid: str, n: int,
                  on_first: Callable[[], None] | None = None) -> tuple[float, float]:
        body = json.dumps({
            "model": "gpt-4o-mini", "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt_for(n)}],
        }).encode()
        return await _openai_stream(self.session, self.url, body, self.headers,
                                    self.expected, on_first)


class OpenAIClient(DirectClient):
    """EasyBackend's C{/v1/chat/completions}, streamed, stateless (no
    C{X-Conversation-Id}), as the OpenAI SDKs use it."""

    name = "openai"

    def __init__(self, session: aiohttp.ClientSession, ports: dict[str, int],
                 expected: int | None = PIECES) -> None:
        super().__init__(session, ports["http"], expected)
        self.headers = {"content-type": "application/json"}


class HttpJsonClient(_Base):
    """C{POST /ask/{id}}, the whole answer as one JSON object."""

    name = "http"
    whole_answer = True

    def __init__(self, session: aiohttp.ClientSession, ports: dict[str, int],
                 expected: int | None = PIECES) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{ports['http']}/ask/"

    async def ask(self, worker: int, cid: str, n: int,
                  on_first: Callable[[], None] | None = None) -> tuple[float, float]:
        body = json.dumps({"prompt": prompt_for(n)}).encode()
        start = perf_counter()
        if on_first is not None:
            on_first()  # no pieces: the request is "open" once sent
        async with self.session.post(self.base + cid, data=body) as resp:
            raw = await resp.read()
        total = perf_counter() - start
        if resp.status != 200:
            raise AnswerError(f"status {resp.status}: {raw[:200]!r}")
        if "response" not in _loads(raw):
            raise AnswerError(f"no response: {raw[:200]!r}")
        return total, total


class SSEClient(_Base):
    """C{POST /ask/{id}} with C{"stream": true}: C{delta} events, then C{done}."""

    name = "sse"

    def __init__(self, session: aiohttp.ClientSession, ports: dict[str, int],
                 expected: int | None = PIECES) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{ports['http']}/ask/"
        self.expected = expected
        #: conversation id -> parent_id to continue from (the history phase)
        self.parents: dict[str, str] = {}

    async def ask(self, worker: int, cid: str, n: int,
                  on_first: Callable[[], None] | None = None) -> tuple[float, float]:
        fields: dict[str, Any] = {"prompt": prompt_for(n), "stream": True}
        parent = self.parents.get(cid)
        if parent is not None:
            fields["parent_id"] = parent
        body = json.dumps(fields).encode()
        first = 0.0
        pieces = 0
        done = False
        start = perf_counter()
        async with self.session.post(self.base + cid, data=body) as resp:
            if resp.status != 200:
                raise AnswerError(f"status {resp.status}: {(await resp.read())[:200]!r}")
            async for event in _events(resp):
                if event.startswith(b"event: delta"):
                    pieces += 1
                    if pieces == 1:
                        first = perf_counter() - start
                        if on_first is not None:
                            on_first()
                elif event.startswith(b"event: done"):
                    done = True
                elif event.startswith(b"event: error"):
                    raise AnswerError(event.decode("utf-8", "replace"))
        total = perf_counter() - start
        if not done:
            raise AnswerError("no done event")
        _check(pieces, self.expected)
        return first, total


class _Socket:
    """
    One WebSocket with a reader task that always reads, as a browser does:
    pings are answered even between asks, and a closed socket is noticed.
    Messages go to a queue with the time they were read.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                self.queue.put_nowait((perf_counter(), msg))
        finally:
            self.queue.put_nowait((perf_counter(), None))

    @property
    def alive(self) -> bool:
        return not self.task.done() and not self.ws.closed

    async def close(self) -> None:
        await self.ws.close()
        try:
            await asyncio.wait_for(self.task, 5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            self.task.cancel()


class WebSocketClient(_Base):
    """The JSON protocol on the WebSocket listener: one socket per worker,
    kept across asks, as a browser tab keeps it."""

    name = "websocket"

    def __init__(self, session: aiohttp.ClientSession, ports: dict[str, int],
                 expected: int | None = PIECES) -> None:
        self.session = session
        self.url = f"ws://127.0.0.1:{ports['websocket']}/"
        self.expected = expected
        self.sockets: dict[int, _Socket] = {}

    async def _socket(self, worker: int) -> _Socket:
        sock = self.sockets.get(worker)
        if sock is None or not sock.alive:
            ws = await self.session.ws_connect(self.url, autoping=True,
                                               max_msg_size=0, compress=0)
            sock = self.sockets[worker] = _Socket(ws)
        return sock

    async def ask(self, worker: int, cid: str, n: int,
                  on_first: Callable[[], None] | None = None) -> tuple[float, float]:
        sock = await self._socket(worker)
        message = json.dumps({"type": "ask", "id": str(n), "conversation_id": cid,
                              "prompt": prompt_for(n)})
        first = 0.0
        pieces = 0
        start = perf_counter()
        await sock.ws.send_str(message)
        while True:
            at, msg = await sock.queue.get()
            if msg is None or msg.type is not aiohttp.WSMsgType.TEXT:
                raise AnswerError(f"websocket: {msg!r}")
            data = msg.data
            if data.startswith('{"type": "delta"'):
                kind = "delta"
            else:
                kind = _loads(data).get("type")
            if kind == "delta":
                pieces += 1
                if pieces == 1:
                    first = at - start
                    if on_first is not None:
                        on_first()
            elif kind == "done":
                total = at - start
                break
            else:
                raise AnswerError(f"websocket: {data[:200]}")
        _check(pieces, self.expected)
        return first, total

    async def close(self) -> None:
        for sock in self.sockets.values():
            await sock.close()
        self.sockets.clear()


class GrpcClient(_Base):
    """C{chat.Chat/Ask} over grpc.aio; C{channels} connections, the calls
    spread over them (HTTP/2 multiplexes up to 100 streams on each)."""

    name = "grpc"

    def __init__(self, session: Any, ports: dict[str, int],
                 expected: int | None = PIECES, channels: int = 1) -> None:
        import grpc

        from easybackend.proto import chat_pb2, chat_pb2_grpc

        self._pb = chat_pb2
        target = f"127.0.0.1:{ports['grpc']}"
        self.channels = [
            grpc.aio.insecure_channel(target, options=[
                ("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)])
            for i in range(channels)]
        self.stubs = [chat_pb2_grpc.ChatStub(c) for c in self.channels]
        self.expected = expected

    async def ask(self, worker: int, cid: str, n: int,
                  on_first: Callable[[], None] | None = None) -> tuple[float, float]:
        stub = self.stubs[worker % len(self.stubs)]
        request = self._pb.AskRequest(prompt=prompt_for(n), conversation_id=cid)
        first = 0.0
        pieces = 0
        done = False
        start = perf_counter()
        async for m in stub.Ask(request):
            if m.done:
                done = True
            elif m.response:
                pieces += 1
                if pieces == 1:
                    first = perf_counter() - start
                    if on_first is not None:
                        on_first()
        total = perf_counter() - start
        if not done:
            raise AnswerError("no done message")
        # The server sends the pieces that queued while it was sending the
        # last message as one (grpc_server._ReactorCall.get_pieces).
        if self.expected is not None and not 1 <= pieces <= self.expected:
            raise AnswerError(f"{pieces} messages for {self.expected} pieces")
        return first, total

    async def close(self) -> None:
        for c in self.channels:
            await c.close()


TRANSPORTS: dict[str, type] = {
    "http": HttpJsonClient,
    "sse": SSEClient,
    "websocket": WebSocketClient,
    "grpc": GrpcClient,
    "openai": OpenAIClient,
}
