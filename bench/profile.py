"""
Summaries of py-spy's raw (collapsed stack) output: where the server's
time goes, by function (self and inclusive) and by part of the stack.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

#: (label, test on a frame's file path), first match wins; applied to the
#: leaf frame for the self-time breakdown
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("model objects (attrs-generated __init__)", ("<attrs generated",)),
    ("JSON encode/decode", ("json/",)),
    ("logging (twisted.logger, access lines)", ("twisted/logger/", "twisted/python/log.py",
                                                "easybackend/observe.py")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("SQLite + adbapi thread pool", ("sqlite3/", "twisted/enterprise/", "easybackend/store.py",
                                     "twisted/python/threadpool.py", "twisted/_threads/")),
    ("tokenizer (tiktoken)", ("tiktoken", "easybackend/tokens.py")),
    ("HTTP client to upstream (twisted.web.client, treq)", ("twisted/web/client.py",
                                                            "twisted/web/_newclient.py", "treq/")),
    ("HTTP server (twisted.web, Klein, werkzeug)", ("twisted/web/", "klein/", "werkzeug/")),
    ("WebSocket (autobahn, txaio)", ("autobahn/", "txaio/")),
    ("gRPC (grpcio, protobuf, bridge)", ("grpc/", "grpc_", "google/protobuf",
                                         "easybackend/transports/grpc_server.py", "queue.py",
                                         "threading.py", "concurrent/")),
    ("SSE parsing + upstream call (easybackend.upstream, sse)", ("easybackend/upstream.py",
                                                                 "easybackend/sse.py")),
    ("EasyBackend core and transports", ("easybackend/",)),
    ("Deferreds, coroutines", ("twisted/internet/defer.py",)),
    ("reactor, sockets, timers (twisted.internet)", ("twisted/internet/", "twisted/protocols/",
                                                    "twisted/python/")),
    ("attrs, zope, hyperlink", ("attr/", "zope/", "hyperlink/")),
]


#: leaf frames that are a thread waiting, not working: left out of the shares
IDLE = (
    "EPollReactor.doPoll", "Condition.wait", "Event.wait", "Queue.get", "Thread.join",
    "_wait_once", "Lock.acquire", "select", "poll", "_poll",
    # grpcio's completion-queue poll and its executor's queue, both waits in C
    "_serve", "_worker",
)

#: leaf functions that are a system call on a socket or epoll
SYSCALLS = (
    "untilConcludes", "Connection.doRead", "Connection.writeSomeData", "BaseClient.doConnect",
    "EPollReactor._add", "EPollReactor._remove", "Port.doRead", "_SocketWaker.wakeUp",
)


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    if not m:
        return frame, ""
    return m.group("func"), m.group("file")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        i = path.find(marker)
        if i >= 0:
            path = path[i + len(marker):]
            if marker == "/lib/python3":
                path = path.split("/", 1)[-1]
    return path


def category(path: str) -> str:
    for label, needles in CATEGORIES:
        if any(n in path for n in needles):
            return label
    return "other (stdlib, C calls)"


def summarize(raw_text: str, top: int = 15) -> dict[str, Any]:
    """
    Parse C{py-spy record --format raw --function} output: C{frame;frame;...
    count} lines, root first.  Returns sample counts and shares.
    """
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in raw_text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        parsed = [_parse(f) for f in frames]
        # py-spy may prefix process/thread pseudo-frames: keep real ones
        parsed = [(fn, path) for fn, path in parsed if path] or parsed
        fn, path = parsed[-1]
        if fn in IDLE or fn.endswith(".wait"):
            idle += count
            continue
        total += count
        self_time[f"{fn} ({_short(path)})"] += count
        categories["socket and epoll system calls" if fn in SYSCALLS else category(path)] += count
        seen = set()
        for fn, path in parsed:
            key = f"{fn} ({_short(path)})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += count
    if not total:
        return {"samples": 0}

    def share(counter: Counter[str], n: int, where: str = "") -> list[dict[str, Any]]:
        rows = [(k, v) for k, v in counter.most_common() if where in k]
        return [{"function": k, "share": round(v / total, 4)} for k, v in rows[:n]]

    return {
        "samples": total,
        "idle_samples": idle,
        "self": share(self_time, top),
        "categories": [{"category": k, "share": round(v / total, 4)}
                       for k, v in categories.most_common()],
        # inclusive shares of the project's own functions: which request
        # stage costs what (the reactor loop and other wrappers left out)
        "inclusive_easybackend": share(inclusive, top, "easybackend/"),
    }
