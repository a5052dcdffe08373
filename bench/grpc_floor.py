"""
What grpcio's threaded (sync) server alone costs per streamed answer: the
floor under EasyBackend's gRPC transport, which the project builds on that
server.

    .venv/bin/python -m bench.grpc_floor          # c=50, 2 x 800 answers each
    .venv/bin/python -m bench.grpc_floor --concurrency 1 --answers 60

A child process serves one server-streaming method with a generic handler
(no protobuf, no reactor, no store): each call sends C{--pieces} messages
C{--interval} seconds apart, then one last message, from grpcio's worker
thread, as EasyBackend's handler threads do.  A C{grpc.aio} client in this
process keeps C{--concurrency} calls open over four channels.  In rounds
that alternate with these, the same load goes to the project's fake
upstream, which streams the same pieces as Server-Sent Events: the yardstick
of C{docs/benchmarks.md}, so that the ratio compares across machines.  The
serving process's CPU (utime + stime of all its threads, from C{/proc}) and
context switches are counted over each round's answers, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

from bench.procs import Proc, context_switches, cpu_seconds, start_fake

_SERVICE = "floor.Floor"
_METHOD = "Stream"


def serve(pieces: int, interval: float, workers: int) -> None:
    """The child: serve until killed; print the port once listening."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    def stream(request: bytes, context: Any) -> Any:
        for i in range(pieces):
            time.sleep(interval)
            yield b'{"text": "piece %d"}' % i
        yield b'{"done": true}'

    handler = grpc.method_handlers_generic_handler(
        _SERVICE, {_METHOD: grpc.unary_stream_rpc_method_handler(stream)})
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), handlers=[handler],
                         maximum_concurrent_rpcs=workers)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


async def measure(ask: Callable[[int], Awaitable[None]], pid: int, concurrency: int,
                  answers: int, warmup: int, deadline: float) -> dict[str, float]:
    """
    Keep C{concurrency} calls of C{ask} going until C{warmup} answers, then
    count C{pid}'s CPU and context switches over C{answers} more.
    """
    done = 0

    async def worker(w: int, until: int) -> None:
        nonlocal done
        while done < until and time.monotonic() < deadline:
            await ask(w)
            done += 1

    await asyncio.gather(*(worker(w, warmup) for w in range(concurrency)))
    start, cpu, switches = time.monotonic(), cpu_seconds(pid), context_switches(pid)
    first = done
    await asyncio.gather(*(worker(w, first + answers) for w in range(concurrency)))
    measured = done - first
    if measured == 0:
        raise RuntimeError("no answer measured within the time limit")
    return {
        "answers": measured,
        "answers_per_s": measured / (time.monotonic() - start),
        "cpu_ms_per_answer": (cpu_seconds(pid) - cpu) / measured * 1000,
        "context_switches_per_answer": (context_switches(pid) - switches) / measured,
    }


async def compare(args: argparse.Namespace, grpc_port: int, grpc_pid: int,
                  fake_port: int, fake_pid: int) -> list[tuple[str, dict[str, float]]]:
    """Rounds of the grpcio server and of the fake upstream, alternating."""
    import aiohttp
    import grpc

    from bench.clients import DirectClient

    messages = args.pieces + 1
    deadline = time.monotonic() + args.time_limit
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") for _ in range(4)]
    calls = [c.unary_stream(f"/{_SERVICE}/{_METHOD}") for c in channels]

    async def grpc_ask(w: int) -> None:
        got = 0
        async for _ in calls[w % len(calls)](b"ask"):
            got += 1
        if got != messages:
            raise RuntimeError(f"{got} messages instead of {messages}")

    results = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            direct = DirectClient(session, fake_port, expected=args.pieces)

            async def fake_ask(w: int) -> None:
                await direct.ask(w, f"floor-{w}", w)

            for _ in range(args.rounds):
                for name, ask, pid in (("grpcio", grpc_ask, grpc_pid), ("fake", fake_ask, fake_pid)):
                    results.append((name, await measure(
                        ask, pid, args.concurrency, args.answers, args.warmup, deadline)))
    finally:
        for channel in channels:
            await channel.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--answers", type=int, default=800, help="answers measured a round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each, alternating")
    parser.add_argument("--warmup", type=int, default=100, help="answers before measuring")
    parser.add_argument("--pieces", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="give up after this many seconds")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.pieces, args.interval, workers=args.concurrency + 10)
        return 0
    logs = tempfile.mkdtemp(prefix="easybackend-grpc-floor-")
    server = Proc("grpcio", [
        sys.executable, "-m", "bench.grpc_floor", "--serve", "--pieces", str(args.pieces),
        "--interval", repr(args.interval), "--concurrency", str(args.concurrency),
    ], os.path.join(logs, "grpcio.log"))
    fake = None
    try:
        port = int(server.wait_for(re.compile(rb"^(\d+)\s*$", re.M), 30).group(1))
        fake, fake_port = start_fake(logs, "fake", args.pieces, args.interval)
        results = asyncio.run(compare(args, port, server.pid, fake_port, fake.pid))
    finally:
        server.stop()
        if fake is not None:
            fake.stop()
        shutil.rmtree(logs, ignore_errors=True)
    print(f"c={args.concurrency}, {args.pieces} pieces {args.interval * 1000:g} ms apart; "
          "CPU and context switches of the serving process, per answer:")
    for name, result in results:
        what = ("grpcio's sync server, one message a piece" if name == "grpcio"
                else "the fake upstream, the same pieces as SSE")
        print(f"  {what:<44} {result['cpu_ms_per_answer']:6.2f} ms "
              f"{result['context_switches_per_answer']:6.0f} switches "
              f"({result['answers']:.0f} answers, {result['answers_per_s']:.0f}/s)")
    grpcio = [r["cpu_ms_per_answer"] for n, r in results if n == "grpcio"]
    fake_cpu = [r["cpu_ms_per_answer"] for n, r in results if n == "fake"]
    if sum(fake_cpu) > 0:
        print(f"grpcio's server costs {sum(grpcio) / sum(fake_cpu):.2f}x the fake's CPU per answer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
