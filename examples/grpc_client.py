#!/usr/bin/env python
"""
An interactive streaming client for EasyBackend's gRPC service.

    python examples/grpc_client.py --url 127.0.0.1:9000
    python examples/grpc_client.py --conversation_id my-chat
    python examples/grpc_client.py --prompt "Hello" # one question, then exit

Type a prompt and press Enter: the answer prints as it arrives.  The client
keeps the conversation id the server returns, so the next prompt continues
the same conversation.  Ctrl-C during an answer cancels it (the server
closes the upstream request and stores nothing); Ctrl-D quits.

It needs grpcio, protobuf and the easybackend package (run it from the
checkout, or after C{pip install .}).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO, Sequence

import grpc

try:
    from easybackend.proto import chat_pb2, chat_pb2_grpc
except ImportError:  # run from the checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
    from easybackend.proto import chat_pb2, chat_pb2_grpc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Chat with EasyBackend over gRPC, streaming the answers."
    )
    parser.add_argument("--url", default="127.0.0.1:9000",
                        help="the server's address, host:port [127.0.0.1:9000]")
    parser.add_argument("--conversation_id", "--conversation-id", default="",
                        help="continue this conversation [default: a new one]")
    parser.add_argument("--api-key", default=os.environ.get("EASYBACKEND_API_KEY"),
                        help="sent as 'authorization: Bearer <key>' metadata "
                             "[env: EASYBACKEND_API_KEY]")
    parser.add_argument("--system-prompt", default="",
                        help="the system prompt of a new conversation")
    parser.add_argument("--model", default="", help="the upstream model")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds allowed for each answer [300]")
    parser.add_argument("--tls", action="store_true",
                        help="connect over TLS")
    parser.add_argument("--ca-cert",
                        help="PEM file of the CA to trust with --tls "
                             "[default: the system's]")
    parser.add_argument("-p", "--prompt",
                        help="ask this one prompt, print the answer, and exit")
    return parser.parse_args(argv)


def open_channel(options: argparse.Namespace) -> grpc.Channel:
    if not (options.tls or options.ca_cert):
        return grpc.insecure_channel(options.url)
    root = None
    if options.ca_cert:
        with open(options.ca_cert, "rb") as f:
            root = f.read()
    return grpc.secure_channel(
        options.url, grpc.ssl_channel_credentials(root_certificates=root)
    )


class Client:
    """Asks on one conversation, remembering the id the server gives."""

    def __init__(self, stub: chat_pb2_grpc.ChatStub,
                 options: argparse.Namespace, out: IO[str]) -> None:
        self.stub = stub
        self.options = options
        self.out = out
        self.conversation_id = options.conversation_id
        self.metadata = (
            (("authorization", f"Bearer {options.api_key}"),)
            if options.api_key else ()
        )

    def ask(self, prompt: str) -> bool:
        """Stream one answer to C{out}; False when it failed."""
        o = self.options
        request = chat_pb2.AskRequest(
            prompt=prompt,
            conversation_id=self.conversation_id,
            system_prompt=o.system_prompt,
            model=o.model,
        )
        if o.temperature is not None:
            request.temperature = o.temperature
        if o.max_tokens is not None:
            request.max_tokens = o.max_tokens
        call = self.stub.Ask(request, timeout=o.timeout, metadata=self.metadata)
        try:
            for message in call:
                if message.response:
                    self.out.write(message.response)
                    self.out.flush()
                if message.done:
                    self.conversation_id = message.conversation_id
                    self.out.write("\n")
                    usage = (f", {message.usage.total_tokens} tokens"
                             if message.HasField("usage") else "")
                    print(f"[conversation {message.conversation_id}, "
                          f"{message.model}{usage}]", file=sys.stderr)
        except KeyboardInterrupt:
            call.cancel()
            print("\n[cancelled]", file=sys.stderr)
            return False
        except grpc.RpcError as e:
            print(f"\n[error {e.code().name}: {e.details()}]", file=sys.stderr)
            return False
        return True


def main(argv: Sequence[str] | None = None, stdin: IO[str] = sys.stdin,
         out: IO[str] = sys.stdout) -> int:
    options = parse_args(argv)
    with open_channel(options) as channel:
        client = Client(chat_pb2_grpc.ChatStub(channel), options, out)
        if options.prompt is not None:
            return 0 if client.ask(options.prompt) else 1
        interactive = stdin.isatty()
        while True:
            if interactive:
                label = client.conversation_id or "new"
                print(f"{label}> ", end="", file=sys.stderr, flush=True)
            try:
                prompt = stdin.readline()
            except KeyboardInterrupt:
                break
            if not prompt:
                break
            if not prompt.strip():
                continue
            client.ask(prompt.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
