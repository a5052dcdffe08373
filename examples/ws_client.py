#!/usr/bin/env python
"""
A small interactive EasyBackend client over WebSocket (Autobahn on Twisted).

Reads one prompt a line from stdin, streams each answer as it is written,
and keeps the conversation id the server gives back, so the next prompt
continues the same conversation:

    python examples/ws_client.py                       # a new conversation
    python examples/ws_client.py --conversation-id my-notes
    echo hi | python examples/ws_client.py --url ws://127.0.0.1:8000/ws

The answers go to stdout; the conversation id and errors go to stderr.
The exit status is 1 when an ask failed or the connection did.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.threads import deferToThread


class ChatClient(WebSocketClientProtocol):
    """Sends one ask at a time and prints its pieces as they arrive."""

    def onOpen(self) -> None:
        self.pending: Deferred[dict[str, Any]] | None = None
        self.factory.opened.callback(self)

    def ask(self, ask_id: str, conversation_id: str, prompt: str) -> Deferred:
        """Fires with the final message of the ask: done, error or cancelled."""
        self.pending = Deferred()
        self.sendMessage(json.dumps({
            "type": "ask", "id": ask_id, "conversation_id": conversation_id,
            "prompt": prompt,
        }).encode("utf-8"))
        return self.pending

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload.decode("utf-8"))
        if message["type"] == "delta":
            sys.stdout.write(message["text"])
            sys.stdout.flush()
        elif self.pending is not None:
            pending, self.pending = self.pending, None
            pending.callback(message)
        else:  # an error about no ask of ours
            print(f"\n[{message.get('code')}] {message.get('message')}",
                  file=sys.stderr)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        error = ConnectionError(f"connection closed ({code}): {reason}")
        if not self.factory.opened.called:
            self.factory.opened.errback(error)
        elif getattr(self, "pending", None) is not None:
            pending, self.pending = self.pending, None
            pending.errback(error)
        self.factory.closed.callback(None)


def endpoint_for(reactor: Any, url: str) -> Any:
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    endpoint = HostnameEndpoint(reactor, parts.hostname, port)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
    return endpoint


async def main(reactor: Any, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:9001",
                        help="the server's WebSocket URL (default %(default)s; "
                             "ws://HOST:8000/ws for the HTTP port)")
    parser.add_argument("--conversation-id", default="new",
                        help='the conversation to continue, or "new" '
                             "(default) for a fresh one")
    parser.add_argument("--api-key", default=None,
                        help="sent as Authorization: Bearer, when the server "
                             "requires keys")
    args = parser.parse_args(argv)

    headers = {}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    factory = WebSocketClientFactory(args.url, headers=headers or None)
    factory.protocol = ChatClient
    factory.opened = Deferred()
    factory.closed = Deferred()
    try:
        await endpoint_for(reactor, args.url).connect(factory)
        client = await factory.opened
    except Exception as e:
        print(f"cannot connect to {args.url}: {e}", file=sys.stderr)
        return 1

    interactive = sys.stdin.isatty()
    conversation_id = args.conversation_id
    status = 0
    count = 0
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = await deferToThread(sys.stdin.readline)
        if not line:  # end of input
            break
        prompt = line.rstrip("\n")
        if not prompt.strip():
            continue
        count += 1
        try:
            final = await client.ask(str(count), conversation_id, prompt)
        except ConnectionError as e:
            print(f"\n{e}", file=sys.stderr)
            return 1
        if final["type"] == "done":
            conversation_id = final["conversation_id"]
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"(conversation {conversation_id}, model {final['model']})",
                  file=sys.stderr)
        else:
            status = 1
            print(f"\n[{final.get('code', final['type'])}] "
                  f"{final.get('message', '')}", file=sys.stderr)
    client.sendClose(1000)
    await factory.closed
    return status


def run() -> None:
    def react_main(reactor: Any) -> Deferred:
        d = Deferred.fromCoroutine(main(reactor, sys.argv[1:]))

        def exit_with(status: int) -> None:
            if status:
                raise SystemExit(status)

        return d.addCallback(exit_with)

    task.react(react_main)


if __name__ == "__main__":
    run()
