"""
EasyBackend's benchmark: what the server adds to every answer.

    .venv/bin/python -m bench.run            # the full run, ~15 minutes
    .venv/bin/python -m bench.run --quick    # a smoke check, under 2 minutes

Three processes on loopback: the project's fake upstream (20 pieces, 10 ms
apart), C{twistd -n easybackend} pointed at it, and this load driver
(asyncio + aiohttp + grpc.aio).  Every figure is measured against the same
load sent straight to the fake (the baseline), in alternating rounds of the
same run.  Writes C{bench/results/latest.json} (C{quick.json} for
C{--quick}) and, for a full run, C{docs/benchmarks.md}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import procs  # noqa: E402
from bench.procs import cpu_seconds, rss_bytes  # noqa: E402

ROOT = procs.ROOT
RESULTS = os.path.join(ROOT, "bench", "results")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
ORDER = ["http", "sse", "websocket", "grpc", "openai"]
PIECES, INTERVAL = 20, 0.01
#: how long the fake takes to answer: the spread of a round's workers' starts
ANSWER_S = PIECES * INTERVAL


@dataclass
class Plan:
    """How much of everything a run does (asks are per round and side)."""

    transports: list[str] = field(default_factory=lambda: list(ORDER))
    c1: tuple[int, int] = (4, 30)            # rounds, asks at concurrency 1
    c100: tuple[int, int] = (4, 600)
    c50: tuple[int, int] = (4, 400)
    #: c=100 again with every worker starting at once (see L{Bench.round})
    burst: tuple[int, int] = (2, 600)
    saturation: tuple[int, int, int] = (3, 1200, 200)  # rounds, asks, concurrency
    round_cap: float = 30.0                  # seconds, any round
    memory_streams: int = 1000
    memory_transports: list[str] = field(
        default_factory=lambda: ["sse", "websocket", "grpc", "openai"])
    slow_interval: float = 0.5               # the held streams' fake: 20 pieces this far apart
    history: tuple[int, int, int] = (6, 80, 10)  # rounds, asks, concurrency
    history_sizes: tuple[int, int] = (10, 1000)
    profile_seconds: int = 6
    profile_transports: list[str] = field(default_factory=lambda: list(ORDER))


QUICK = Plan(
    c1=(2, 6), c100=(2, 200), c50=(2, 150), burst=(1, 200), saturation=(0, 0, 0), round_cap=15.0,
    memory_streams=200, memory_transports=["sse"], slow_interval=0.25,
    history=(2, 20, 10), profile_seconds=3, profile_transports=["sse"],
)


def speed_yardstick(result: dict[str, Any]) -> str | None:
    """
    The machine's speed in this run, read off the fake (the same work in
    every run), and the server's CPU per ask as a multiple of the fake's:
    the multiples compare across runs, the milliseconds only within one.
    """
    multiples, fake = [], []
    for name, t in result.get("transports", {}).items():
        c50 = t.get("c50")
        if not c50:
            continue
        base = c50["direct"].get("fake_cpu_ms_per_ask")
        server = c50["server"].get("server_cpu_ms_per_ask")
        if base and server is not None:
            fake.append(base)
            multiples.append(f"`{name}` {server / base:.2f}×")
    if not multiples:
        return None
    return ("This machine's speed in this run: the fake upstream, which does the same work in "
            f"every run, spent {fmt(min(fake))}–{fmt(max(fake))} ms of CPU per ask at c=50. "
            "Server CPU per ask as a multiple of the "
            "fake's in the same phase, which compares across runs: " + ", ".join(multiples) + ".")


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest-rank on sorted values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


class LagMonitor:
    """How late this loop wakes up: the driver's own distortion."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            self.samples.append(loop.time() - t - self.period)

    def start(self) -> None:
        self.samples = []
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return self.samples


@dataclass
class Round:
    side: str
    concurrency: int
    first: list[float]
    total: list[float]
    errors: list[str]
    elapsed: float
    window_rate: float
    cpu: dict[str, float]
    lag: list[float]
    tcp: dict[str, int]
    upstream_connections: int
    core_first: list[float]        # the server's own first_piece, from its access log
    sched: dict[str, tuple[float, float]]  # main threads: seconds on a CPU, waiting for one
    machine: float                 # CPU seconds the whole machine used
    switches: int                  # the server's context switches (all threads)


class Bench:
    def __init__(self, plan: Plan, tmp: str, session: Any) -> None:
        self.plan = plan
        self.tmp = tmp
        self.session = session
        self.pids: dict[str, int] = {"driver": os.getpid()}
        self._conv = 0
        #: the server's log: new upstream connections, access lines
        self.server_log: procs.ServerLog | None = None
        #: the server under test, checked after every round
        self.server: procs.Proc | None = None

    def _server_log(self) -> tuple[int, list[float]]:
        return self.server_log.read() if self.server_log is not None else (0, [])

    def conversation(self, prefix: str) -> str:
        self._conv += 1
        return f"{prefix}-{self._conv}"

    async def round(self, client: Any, side: str, concurrency: int, n: int,
                    conversation: Callable[[int, int], str] | None = None,
                    burst: bool = False) -> Round:
        """
        C{concurrency} workers ask one after another until C{n} asks were
        started (or the round cap passed).

        The workers start spread over one answer's time (C{ANSWER_S}), as
        independent users do, so that their answers' pieces do not all fall
        due at the same instant; with C{burst}, they all start at once and,
        since every answer of the fake takes the same time, stay in step
        for the whole round (a thundering herd at every piece).  Asks per
        second are counted while every worker was busy: from the end of the
        spread to the last ask started.
        """
        cap = self.plan.round_cap
        if conversation is None:
            ids = [self.conversation(f"b{side[:3]}") for _ in range(concurrency)]

            def conversation(w: int, j: int) -> str:
                return ids[w]
        first: list[float] = []
        total: list[float] = []
        ends: list[float] = []
        errors: list[str] = []
        started = 0
        last_start = 0.0
        lag = LagMonitor()
        tcp0 = procs.tcp_counters()
        self._server_log()  # skip what came before
        cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        sched0 = {k: procs.main_thread(p) for k, p in self.pids.items()}
        machine0 = procs.machine_busy()
        switches0 = procs.context_switches(self.pids["server"]) if "server" in self.pids else 0
        t0 = perf_counter()
        deadline = t0 + cap

        ramp = 0.0 if burst or concurrency == 1 else ANSWER_S

        async def worker(w: int) -> None:
            nonlocal started, last_start
            if ramp:
                await asyncio.sleep(ramp * w / concurrency)
            j = 0
            while started < n and perf_counter() < deadline:
                cid = conversation(w, j)
                j += 1
                i = started
                started += 1
                last_start = perf_counter()
                try:
                    f, t = await client.ask(w, cid, i)
                except Exception as e:  # noqa: BLE001 - counted and shown
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                first.append(f)
                total.append(t)
                ends.append(perf_counter())

        lag.start()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = perf_counter() - t0
        if self.server is not None and self.server.popen.poll() is not None:
            raise RuntimeError(
                f"the server exited ({self.server.popen.returncode}) during a round; its log "
                f"ends:\n{self.server.output().decode('utf-8', 'replace')[-1500:]}")
        cpu1 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        sched1 = {k: procs.main_thread(p) for k, p in self.pids.items()}
        machine1 = procs.machine_busy()
        switches1 = procs.context_switches(self.pids["server"]) if "server" in self.pids else 0
        lags = await lag.stop()
        tcp1 = procs.tcp_counters()
        connections, core_first = self._server_log()
        window = last_start - t0 - ramp
        in_window = sum(1 for e in ends if t0 + ramp < e <= last_start)
        rate = in_window / window if window > 0.05 and in_window else len(total) / elapsed
        return Round(side, concurrency, first, total, errors, elapsed, rate,
                     {k: cpu1[k] - cpu0[k] for k in cpu0}, lags,
                     {k: tcp1[k] - tcp0.get(k, 0) for k in tcp1}, connections, core_first,
                     {k: (sched1[k][0] - sched0[k][0], sched1[k][1] - sched0[k][1])
                      for k in sched0}, machine1 - machine0, switches1 - switches0)

    async def paired(self, server_client: Any, direct: Any, concurrency: int,
                     rounds: int, n: int, label: str, burst: bool = False) -> dict[str, Any]:
        """Alternate direct and server rounds (ABBA), warm both first."""
        # warm-up: open the connections at this concurrency, not counted
        await self.round(direct, "direct", concurrency, concurrency)
        await self.round(server_client, "server", concurrency, concurrency)
        sides: dict[str, list[Round]] = {"direct": [], "server": []}
        for r in range(rounds):
            pair = [("direct", direct), ("server", server_client)]
            if r % 2:
                pair.reverse()
            for side, client in pair:
                sides[side].append(
                    await self.round(client, side, concurrency, n, burst=burst))
        log(f"  {label} c={concurrency}{' burst' if burst else ''}: " + ", ".join(
            f"{s} {sum(len(x.total) for x in rs)} asks "
            f"{sum(x.window_rate for x in rs) / max(1, len(rs)):.0f}/s"
            f" err={sum(len(x.errors) for x in rs)}" for s, rs in sides.items()))
        return self.aggregate(sides, whole_answer=server_client.whole_answer)

    def aggregate(self, sides: dict[str, list[Round]], whole_answer: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        direct_time = sum(r.elapsed for r in sides["direct"])
        idle_rate = (sum(r.cpu["server"] for r in sides["direct"]) / direct_time
                     if "server" in self.pids and direct_time else 0.0)
        for side, rounds in sides.items():
            first = [x for r in rounds for x in r.first]
            total = [x for r in rounds for x in r.total]
            asks = len(total)
            errors = [e for r in rounds for e in r.errors]
            rates = sorted(r.window_rate for r in rounds)
            elapsed = sum(r.elapsed for r in rounds)
            agg: dict[str, Any] = {
                "asks": asks, "errors": len(errors), "error_samples": errors[:3],
                "rounds": len(rounds),
                "ttfp_ms": {"p50": ms(pct(first, 50)), "p90": ms(pct(first, 90)),
                            "p99": ms(pct(first, 99))},
                "total_ms": {"p50": ms(pct(total, 50)), "p90": ms(pct(total, 90)),
                             "p99": ms(pct(total, 99))},
                "asks_per_s": round(rates[len(rates) // 2], 1) if rates else None,
                "asks_per_s_rounds": [round(x, 1) for x in rates],
                "loop_lag_ms_p99": ms(pct([x for r in rounds for x in r.lag], 99)),
                "listen_overflows": sum(r.tcp.get("ListenOverflows", 0) for r in rounds),
                "syn_retransmits": sum(r.tcp.get("TCPSynRetrans", 0) for r in rounds),
            }
            agg["machine_busy_cores"] = round(sum(r.machine for r in rounds) / elapsed, 2)
            agg["others_busy_cores"] = round(
                (sum(r.machine for r in rounds) - sum(sum(r.cpu.values()) for r in rounds))
                / elapsed, 2)
            if side == "server":
                core = [x for r in rounds for x in r.core_first]
                agg["core_first_piece_ms"] = {"p50": ms(pct(core, 50)), "p99": ms(pct(core, 99))}
                agg["reactor_busy"] = round(sum(r.sched["server"][0] for r in rounds) / elapsed, 3)
                agg["server_context_switches_per_ask"] = (
                    round(sum(r.switches for r in rounds) / asks, 1) if asks else None)
                agg["upstream_connections_per_ask"] = (
                    round(sum(r.upstream_connections for r in rounds) / asks, 3) if asks else None)
            for proc in self.pids:
                waited = sum(r.sched[proc][1] for r in rounds)
                agg[f"{proc}_cpu_wait_ms_per_ask"] = ms(waited / asks) if asks else None
                used = sum(r.cpu[proc] for r in rounds)
                if proc == "server" and side == "server":
                    agg["server_cpu_ms_per_ask_raw"] = ms(used / asks) if asks else None
                    used -= idle_rate * elapsed
                agg[f"{proc}_cpu_ms_per_ask"] = ms(used / asks) if asks else None
            out[side] = agg
        key = "total_ms" if whole_answer else "ttfp_ms"
        s, d = out["server"], out["direct"]
        out["compared"] = "time to the whole answer" if whole_answer else "time to first piece"
        out["added_ms"] = {q: (round(s[key][q] - d[key][q], 3)
                               if s[key][q] is not None and d[key][q] is not None else None)
                           for q in ("p50", "p90", "p99")}
        out["throughput_ratio"] = (round(s["asks_per_s"] / d["asks_per_s"], 3)
                                   if s["asks_per_s"] and d["asks_per_s"] else None)
        out["server_idle_cpu_per_s"] = round(idle_rate, 4)
        return out


def make_client(name: str, session: Any, ports: dict[str, int], **kw: Any) -> Any:
    from bench.clients import TRANSPORTS

    return TRANSPORTS[name](session, ports, **kw)


# --- the phases ------------------------------------------------------------


async def transport_phases(bench: Bench, name: str, ports: dict[str, int],
                           direct: Any) -> dict[str, Any]:
    plan = bench.plan
    client = make_client(name, bench.session, ports)
    result: dict[str, Any] = {}
    try:
        result["c1"] = await bench.paired(client, direct, 1, *plan.c1, label=name)
        result["c100"] = await bench.paired(client, direct, 100, *plan.c100, label=name)
        result["c50"] = await bench.paired(client, direct, 50, *plan.c50, label=name)
        rounds, n, conc = plan.saturation
        if rounds:
            result[f"c{conc}"] = await bench.paired(client, direct, conc, rounds, n, label=name)
        if plan.burst[0]:
            result["burst100"] = await bench.paired(
                client, direct, 100, *plan.burst, label=name, burst=True)
    finally:
        await client.close()
    levels = {k: v for k, v in result.items() if is_level(k)}
    best = max(levels, key=lambda k: levels[k]["server"]["asks_per_s"] or 0)
    best_direct = max(levels, key=lambda k: levels[k]["direct"]["asks_per_s"] or 0)
    result["saturation"] = {
        "server_asks_per_s": levels[best]["server"]["asks_per_s"], "server_at": best,
        "direct_asks_per_s": levels[best_direct]["direct"]["asks_per_s"],
        "direct_at": best_direct,
    }
    return result


def is_level(key: str) -> bool:
    """Whether a transport result's C{key} is a spread-start c=N level (C{c50})."""
    return key.startswith("c") and key[1:].isdigit()


def server_errors(t: dict[str, Any]) -> int:
    """The failed asks through the server in a transport's load rounds, burst included."""
    return sum(c["server"]["errors"] for k, c in t.items() if is_level(k) or k == "burst100")


async def profile_phase(bench: Bench, name: str, ports: dict[str, int], server_pid: int,
                        out_dir: str, client: Any = None,
                        conversation: Callable[[int, int], str] | None = None,
                        concurrency: int = 200) -> dict[str, Any]:
    """py-spy on the server while it is saturated; not a measured round."""
    from bench.profile import summarize

    own = client is None
    if own:
        client = make_client(name, bench.session, ports)
    out = os.path.join(out_dir, f"profile-{name}.txt")
    seconds = bench.plan.profile_seconds
    try:
        await bench.round(client, "server", concurrency, concurrency, conversation)  # warm
        spy = procs.start_profile(server_pid, out, seconds)
        if spy is None:
            return {"error": "py-spy not found (pip install py-spy)"}
        await asyncio.sleep(0.3)
        old_cap = bench.plan.round_cap
        bench.plan.round_cap = seconds + 1.0
        try:
            r = await bench.round(client, "server", concurrency, 10**9, conversation)
        finally:
            bench.plan.round_cap = old_cap
        _, err = await asyncio.get_running_loop().run_in_executor(None, spy.communicate)
    finally:
        if own:
            await client.close()
    if not os.path.exists(out):
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
    with open(out) as f:
        summary = summarize(f.read())
    summary["load"] = {"concurrency": concurrency, "asks": len(r.total),
                       "asks_per_s": round(r.window_rate, 1), "errors": len(r.errors)}
    summary["raw_file"] = out
    summary["busy_threads"] = round(summary.get("samples", 0) / (200 * seconds), 2)
    return summary


async def memory_phase(bench: Bench, name: str, slow_port: int) -> dict[str, Any]:
    """
    A fresh server in front of a slow fake (pieces far apart); open
    C{n} streams at once, read VmRSS once all got their first piece, then
    let every one finish.
    """
    plan = bench.plan
    n = plan.memory_streams
    workers = n + 50 if name == "grpc" else 10
    db = os.path.join(bench.tmp, f"memory-{name}.sqlite3")
    server, ports = procs.start_server(bench.tmp, f"server-memory-{name}", slow_port, db,
                                       grpc_workers=workers)
    kw: dict[str, Any] = {}
    if name == "grpc":
        kw["channels"] = max(1, math.ceil(n / 90))
    client = make_client(name, bench.session, ports, **kw)
    lifetime = PIECES * plan.slow_interval
    try:
        warm = 20
        await asyncio.gather(*(client.ask(n + w, f"memwarm-{w}", w) for w in range(warm)))
        await asyncio.sleep(0.5)
        rss0 = rss_bytes(server.pid)
        threads0 = procs.threads(server.pid)
        opened = 0
        all_open = asyncio.Event()

        def on_first() -> None:
            nonlocal opened
            opened += 1
            if opened == n:
                all_open.set()

        async def one(w: int) -> tuple[float, float]:
            return await client.ask(w, f"mem-{name}-{w}", w, on_first)

        t0 = perf_counter()
        tasks = []
        peak = rss0
        for start in range(0, n, 50):  # a ramp: 50 new streams every 20 ms
            tasks.extend(asyncio.ensure_future(one(w)) for w in range(start, min(n, start + 50)))
            await asyncio.sleep(0.02)
        while not all_open.is_set() and perf_counter() - t0 < lifetime * 2 + 30:
            peak = max(peak, rss_bytes(server.pid))
            try:
                await asyncio.wait_for(all_open.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        open_after = perf_counter() - t0
        simultaneous = sum(1 for t in tasks if not t.done())
        await asyncio.sleep(0.3)
        rss1 = rss_bytes(server.pid)
        threads1 = procs.threads(server.pid)
        peak = max(peak, rss1)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [f"{type(r).__name__}: {r}"[:300] for r in results if isinstance(r, BaseException)]
        ok = [r for r in results if not isinstance(r, BaseException)]
        out = {
            "streams": n, "got_first_piece": opened, "simultaneously_open": simultaneous,
            "seconds_to_open_all": round(open_after, 2), "stream_lifetime_s": lifetime,
            "completed": len(ok), "errors": len(errors), "error_samples": errors[:3],
            "rss_before_mib": round(rss0 / 2**20, 1), "rss_open_mib": round(rss1 / 2**20, 1),
            "rss_peak_mib": round(peak / 2**20, 1),
            "kib_per_stream": round((rss1 - rss0) / n / 1024, 1),
            "threads_before": threads0, "threads_open": threads1,
            "grpc_workers": workers if name == "grpc" else None,
            "held": (opened == n and simultaneous == n and not errors and len(ok) == n),
        }
        log(f"  memory {name}: {out['kib_per_stream']} KiB/stream, open {simultaneous}/{n},"
            f" completed {len(ok)}, errors {len(errors)}")
        return out
    finally:
        await client.close()
        server.stop()


def history_files(directory: str, sizes: tuple[int, ...], names: dict[str, int]) -> dict[str, dict[int, list[str]]]:
    """
    Old-design conversation files, as if asked N/2 times against the fake:
    prompt, then the fake's echo.  C{names} maps a prefix to how many
    conversations of each size; returns their ids by prefix and size.
    """
    ids: dict[str, dict[int, list[str]]] = {}
    os.makedirs(directory, exist_ok=True)
    for prefix, count in names.items():
        ids[prefix] = {}
        for size in sizes:
            entries = []
            for turn in range(size // 2):
                prompt = f"Benchmark question {turn}: how much time does the backend add?"
                answer = f"You said: {prompt} ({2 * turn + 1} messages received)"
                entries.append(f"User: {prompt}\n\n\nChatGPT: {answer}<|im_end|>\n")
            ids[prefix][size] = []
            for k in range(count):
                cid = f"{prefix}{size}-{k}"
                with open(os.path.join(directory, f"{cid}.json"), "w") as f:
                    json.dump(entries, f)
                ids[prefix][size].append(cid)
    return ids


#: conversations each history worker takes turns on, so a history grows slowly
HOT_PER_WORKER = 8


#: the kinds of history round: key, label in tables, label of the target
HISTORY_KINDS = (
    ("continuing", "continuing", "continuing turn"),
    ("regenerate", "regenerate", "regenerate (parent_id on the last branch)"),
    ("from_store", "from the store", "first ask, history read from the store"),
)


def history_names(plan: Plan) -> dict[str, int]:
    rounds, n, conc = plan.history
    # "fresh": one conversation for every from-the-store ask, and enough for
    # its profile (at most about 60 asks a second)
    return {"hot": conc * HOT_PER_WORKER, "cold": conc,
            "fresh": rounds * fresh_asks(plan) + conc + 60 * plan.profile_seconds}


def fresh_asks(plan: Plan) -> int:
    """
    How many from-the-store asks a history round makes, per size: few
    enough that the conversations they add (the server keeps the last 256)
    do not push out those the other rounds continue.
    """
    return max(1, plan.history[1] // 4)


async def history_phase(bench: Bench, ports: dict[str, int],
                        ids: dict[str, dict[int, list[str]]], server_pid: int) -> dict[str, Any]:
    """
    Server CPU per ask on a conversation of 10 messages against one of
    1,000, three ways, in alternating rounds:

    - continuing: the ordinary next turn (no C{parent_id}), on conversations
      asked once before (so whatever the server keeps from the last turn is
      there); each worker takes turns on 8 conversations, so that a history
      grows by at most ~2 messages a round;
    - regenerate: every ask continues from the same imported message
      (C{parent_id}) of a conversation asked before, as a regenerate does,
      so the history stays exactly that long (each ask adds its two
      messages beside it, off the branch);
    - from the store: the first ask on a conversation this server has not
      seen (as after a restart), a fresh one every ask, so the history is
      read from the store every time.
    """
    from bench.clients import SSEClient

    plan = bench.plan
    rounds, n, conc = plan.history
    sizes = list(plan.history_sizes)
    hot, cold, fresh = ids["hot"], ids["cold"], ids["fresh"]
    client = SSEClient(bench.session, ports)        # continuing: no parent_id
    cold_client = SSEClient(bench.session, ports)   # regenerate: parent_id
    base = f"http://127.0.0.1:{ports['http']}/conversations/"
    for size in sizes:
        for cid in cold[size]:
            async with bench.session.get(base + cid) as resp:
                view = await resp.json()
            cold_client.parents[cid] = view["current_message_id"]

    def hot_pick(size: int) -> Callable[[int, int], str]:
        return lambda w, j: hot[size][w * HOT_PER_WORKER + j % HOT_PER_WORKER]

    def cold_pick(size: int) -> Callable[[int, int], str]:
        return lambda w, j: cold[size][w]

    unasked = {size: iter(fresh[size]) for size in sizes}

    def fresh_pick(size: int) -> Callable[[int, int], str]:
        return lambda w, j: next(unasked[size])

    # one ask on every conversation first: a continuing turn follows a turn
    for size in sizes:
        await bench.round(client, "server", conc, conc * HOT_PER_WORKER, hot_pick(size))
        await bench.round(cold_client, "server", conc, conc, cold_pick(size))
    kinds = {"continuing": (client, hot_pick, n), "regenerate": (cold_client, cold_pick, n),
             "from_store": (client, fresh_pick, fresh_asks(plan))}
    plan_rounds = [(k, size) for k in kinds for size in sizes]
    results: dict[tuple[str, int], list[Round]] = {key: [] for key in plan_rounds}
    for r in range(rounds):
        for kind, size in (plan_rounds if r % 2 == 0 else plan_rounds[::-1]):
            c, pick, asks = kinds[kind]
            results[(kind, size)].append(await bench.round(c, "server", conc, asks, pick(size)))
    lengths: dict[str, list[int]] = {}
    for kind, size in plan_rounds:
        sample = {"continuing": hot, "regenerate": cold, "from_store": fresh}[kind][size][0]
        async with bench.session.get(base + sample) as resp:
            view = await resp.json()
        lengths[f"{kind}-{size}"] = [size, len(view["messages"]) if kind == "continuing" else size]
    out: dict[str, Any] = {"transport": "sse", "concurrency": conc, "sizes": sizes}
    for kind in kinds:
        part: dict[str, Any] = {}
        for size in sizes:
            rs = results[(kind, size)]
            asks = sum(len(r.total) for r in rs)
            total = [x for r in rs for x in r.total]
            first = [x for r in rs for x in r.first]
            part[str(size)] = {
                "asks": asks, "errors": sum(len(r.errors) for r in rs),
                "error_samples": [e for r in rs for e in r.errors][:3],
                "messages_first_to_last": lengths[f"{kind}-{size}"],
                "server_cpu_ms_per_ask": (ms(sum(r.cpu["server"] for r in rs) / asks)
                                          if asks else None),
                "fake_cpu_ms_per_ask": ms(sum(r.cpu["fake"] for r in rs) / asks) if asks else None,
                "ttfp_ms_p50": ms(pct(first, 50)), "total_ms_p50": ms(pct(total, 50)),
            }
        a = part[str(sizes[0])]["server_cpu_ms_per_ask"]
        b = part[str(sizes[-1])]["server_cpu_ms_per_ask"]
        part["cpu_ratio"] = round(b / a, 2) if a and b else None
        out[kind] = part
        log(f"  history {kind}: {sizes[0]} msgs {a} ms/ask, {sizes[-1]} msgs {b} ms/ask, "
            f"ratio {part['cpu_ratio']}")
    if plan.profile_seconds:
        for kind, (c, pick, _) in kinds.items():
            out[kind]["profile"] = await profile_phase(
                bench, f"history-{kind}", ports, server_pid, bench.tmp, client=c,
                conversation=pick(sizes[-1]), concurrency=conc)
    return out


# --- targets and the report ------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, t in result["transports"].items():
        if "c1" not in t:
            continue
        c1, c100, c50 = t["c1"], t["c100"], t["c50"]
        what = "whole answer" if name == "http" else "first piece"
        rows.append({"transport": name, "target": f"added time to {what}, p50 at c=1 < 1 ms",
                     "value": c1["added_ms"]["p50"], "unit": "ms",
                     "pass": c1["added_ms"]["p50"] is not None and c1["added_ms"]["p50"] < 1})
        rows.append({"transport": name, "target": f"added time to {what}, p99 at c=100 < 10 ms",
                     "value": c100["added_ms"]["p99"], "unit": "ms",
                     "pass": c100["added_ms"]["p99"] is not None and c100["added_ms"]["p99"] < 10})
        cpu = c50["server"]["server_cpu_ms_per_ask"]
        rows.append({"transport": name, "target": "server CPU per ask (c=50) < 3 ms",
                     "value": cpu, "unit": "ms", "pass": cpu is not None and cpu < 3})
        ratio = c50["throughput_ratio"]
        rows.append({"transport": name, "target": "asks/s at c=50 >= 0.9 x direct",
                     "value": ratio, "unit": "x", "pass": ratio is not None and ratio >= 0.9})
        errs = server_errors(t)
        if errs:
            rows.append({"transport": name, "target": "no failed asks under load",
                         "value": errs, "unit": "errors", "pass": False})
    for name, m in result.get("memory", {}).items():
        rows.append({"transport": name,
                     "target": f"{m.get('streams')} concurrent streams held, no error",
                     "value": f"{m.get('simultaneously_open')} open, {m.get('errors')} errors",
                     "unit": "", "pass": bool(m.get("held"))})
    h = result.get("history")
    for kind, _, label in HISTORY_KINDS:
        part = (h or {}).get(kind)
        if part:
            ratio = part.get("cpu_ratio")
            rows.append({"transport": "sse",
                         "target": f"ask at 1,000 messages <= 1.5 x at 10 (CPU), {label}",
                         "value": ratio, "unit": "x",
                         "pass": ratio is not None and ratio <= 1.5})
    return rows


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    plan = result["plan"]
    L: list[str] = []
    L.append("# Benchmarks\n")
    L.append("What EasyBackend adds to every answer, measured by `make bench` "
             "(`.venv/bin/python -m bench.run`; `--quick` for a 2-minute smoke check). "
             "Generated by `bench/run.py`; the raw figures are in "
             "`bench/results/latest.json` (not committed).\n")
    L.append(f"- **Date**: {result['date']}  ")
    L.append(f"- **Machine**: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, "
             f"Linux {m['kernel']}, Python {m['python']}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg'])} (a shared, noisy machine)  ")
    L.append(f"- **Commit**: `{result.get('commit') or '?'}`, mode `{result['mode']}`, "
             f"run took {result['duration_s'] / 60:.1f} min\n")
    L.append("## Setup\n")
    L.append(
        f"Three processes on loopback, sharing the {m['cores']} cores: the project's fake "
        f"upstream (`easybackend.testing.fake_upstream`, {PIECES} pieces {INTERVAL * 1000:.0f} ms "
        "apart, so an answer takes about 200 ms), `twistd -n easybackend` pointed at it "
        "(`--grpc-workers 256`, a fresh SQLite file), and the load driver (one asyncio "
        "process with uvloop when installed, aiohttp and grpc.aio). The **baseline** is "
        "the same load sent straight to the fake's streaming `/v1/chat/completions`; "
        "baseline and server rounds alternate (ABBA) within the run, and every figure "
        "below is a difference or ratio against the baseline of the same phase.\n")
    L.append(
        "- *Added time to first piece*: p50/p99 of the server's time to the first piece "
        "minus the same percentile of the baseline's (for `http`, the plain JSON ask, "
        "the whole answer against the baseline's whole stream).\n"
        "- *c=N*: N workers, each asking again as soon as its answer ended; each worker "
        "keeps its connection (HTTP keep-alive, one WebSocket each, one gRPC channel for "
        "all) and its own conversation, so that asks continue a conversation. The workers "
        f"start spread over one answer's time ({ANSWER_S * 1000:.0f} ms), as independent "
        "users do.\n"
        "- *Burst*: c=100 again with all workers starting at the same instant. Every answer "
        f"of the fake takes the same {ANSWER_S * 1000:.0f} ms, so they stay in step for the "
        f"whole round: every {INTERVAL * 1000:.0f} ms, 100 pieces fall due at once, a "
        "thundering herd that real users, whose answers differ in length, do not keep up. "
        "Runs before 2026-11-26 measured every c=N this way; it is kept as a stress "
        "figure, not a target.\n"
        "- *Asks/s*: counted while all N workers were busy; median of the rounds.\n"
        "- *Server CPU/ask*: utime+stime of the server process (all threads) from "
        "`/proc/<pid>/stat` over the server rounds, less its idle rate measured during "
        "the baseline rounds, divided by the asks.\n"
        "- *Driver CPU/ask* and *loop lag* (how late the driver's event loop woke, p99) "
        "show the driver's own cost.\n"
        "- `openai` is `/v1/chat/completions` streamed, stateless (no `X-Conversation-Id`), "
        "as the OpenAI SDKs use it; the other four store every turn.\n")
    L.append(f"Rounds × asks per round and side: c=1 {plan['c1'][0]}×{plan['c1'][1]}, "
             f"c=100 {plan['c100'][0]}×{plan['c100'][1]}, c=50 {plan['c50'][0]}×{plan['c50'][1]}"
             + (f", c={plan['saturation'][2]} {plan['saturation'][0]}×{plan['saturation'][1]}"
                if plan['saturation'][0] else "")
             + (f", burst c=100 {plan['burst'][0]}×{plan['burst'][1]}"
                if plan.get('burst', (0,))[0] else "") + ".\n")

    L.append("## Targets\n")
    L.append("| transport | target | value | result |")
    L.append("|---|---|---|---|")
    for row in result["targets"]:
        L.append(f"| {row['transport']} | {row['target']} | {fmt(row['value'])} {row['unit']} | "
                 f"{'**pass**' if row['pass'] else '**FAIL**'} |")
    L.append("")
    yardstick = speed_yardstick(result)
    if yardstick:
        L.append(yardstick + "\n")

    L.append("## Figures\n")
    L.append("Times in ms. *added* = server − baseline, same percentile.\n")
    L.append("| transport | added p50 c=1 | added p99 c=1 | added p50 c=100 | added p99 c=100 "
             "| asks/s c=50 (× direct) | asks/s saturation (direct) | server CPU ms/ask c=50 "
             "| c=1 | c=100 | new upstream connections per ask c=50 | SYN retransmits c=100 "
             "| driver CPU ms/ask | errors | burst c=100: added p50 / p99, asks/s (× direct) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, t in result["transports"].items():
        sat = t["saturation"]
        errs = server_errors(t)
        L.append(
            f"| {name} | {fmt(t['c1']['added_ms']['p50'])} | {fmt(t['c1']['added_ms']['p99'])} | "
            f"{fmt(t['c100']['added_ms']['p50'])} | {fmt(t['c100']['added_ms']['p99'])} | "
            f"{fmt(t['c50']['server']['asks_per_s'], 0)} ({fmt(t['c50']['throughput_ratio'])}) | "
            f"{fmt(sat['server_asks_per_s'], 0)} at {sat['server_at']} "
            f"({fmt(sat['direct_asks_per_s'], 0)} at {sat['direct_at']}) | "
            f"{fmt(t['c50']['server']['server_cpu_ms_per_ask'])} | "
            f"{fmt(t['c1']['server']['server_cpu_ms_per_ask'])} | "
            f"{fmt(t['c100']['server']['server_cpu_ms_per_ask'])} | "
            f"{fmt(t['c50']['server'].get('upstream_connections_per_ask'))} | "
            f"{t['c100']['server'].get('syn_retransmits')} (direct "
            f"{t['c100']['direct'].get('syn_retransmits')}) | "
            f"{fmt(t['c50']['server']['driver_cpu_ms_per_ask'])} | {errs} | "
            + (f"{fmt(b['added_ms']['p50'])} / {fmt(b['added_ms']['p99'])}, "
               f"{fmt(b['server']['asks_per_s'], 0)} ({fmt(b['throughput_ratio'])})"
               if (b := t.get("burst100")) else "–") + " |")
    L.append("")
    first = next(iter(result["transports"].values()))
    L.append("Baseline (direct to the fake), from the `" + next(iter(result["transports"]))
             + "` phases: time to first piece p50 "
             f"{fmt(first['c1']['direct']['ttfp_ms']['p50'])} ms at c=1, p99 "
             f"{fmt(first['c100']['direct']['ttfp_ms']['p99'])} ms at c=100; whole answer p50 "
             f"{fmt(first['c1']['direct']['total_ms']['p50'])} ms; "
             f"{fmt(first['c50']['direct']['asks_per_s'], 0)} asks/s at c=50; the fake spends "
             f"{fmt(first['c50']['direct']['fake_cpu_ms_per_ask'])} ms CPU per ask and the "
             f"driver {fmt(first['c50']['direct']['driver_cpu_ms_per_ask'])} ms; driver loop "
             f"lag p99 {fmt(first['c50']['direct']['loop_lag_ms_p99'])} ms (direct) and "
             f"{fmt(first['c50']['server']['loop_lag_ms_p99'])} ms (server) at c=50.\n")

    L.append("### Where the added time is spent, and how busy the machine was\n")
    L.append("*core first piece*: the server's own access-log `first_piece` (from the core taking "
             "the ask to the first piece from upstream, so DB reads + upstream call + upstream "
             "wait). *CPU wait*: time a main thread was runnable but had no CPU "
             "(`/proc/<pid>/task/<pid>/schedstat`), per ask. *others*: cores busy with processes "
             "that are not part of the benchmark (a shared machine).\n")
    L.append("| transport | c | first piece p50: client / core / direct | reactor busy "
             "| CPU wait ms/ask: server / fake (direct rounds) | others' cores: server / direct rounds "
             "| server context switches per ask | new upstream connections per ask | listen overflows |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for name, t in result["transports"].items():
        for c in ("c1", "c50", "c100"):
            s_, d_ = t[c]["server"], t[c]["direct"]
            L.append(
                f"| {name} | {c[1:]} | {fmt(s_['ttfp_ms']['p50'], 1)} / "
                f"{fmt(s_.get('core_first_piece_ms', {}).get('p50'), 1)} / "
                f"{fmt(d_['ttfp_ms']['p50'], 1)} | {fmt(s_.get('reactor_busy'))} | "
                f"{fmt(s_.get('server_cpu_wait_ms_per_ask'))} / {fmt(s_.get('fake_cpu_wait_ms_per_ask'))} "
                f"({fmt(d_.get('fake_cpu_wait_ms_per_ask'))}) | {fmt(s_.get('others_busy_cores'))} / "
                f"{fmt(d_.get('others_busy_cores'))} | {fmt(s_.get('server_context_switches_per_ask'), 0)} | "
                f"{fmt(s_.get('upstream_connections_per_ask'))} | "
                f"{s_.get('listen_overflows')} |")
    L.append("")

    if result.get("memory"):
        L.append("## 1,000 streams held at once\n")
        L.append("A fresh server per transport, in front of a second fake whose 20 pieces "
                 f"are {plan['slow_interval']} s apart; after 20 warm-up asks, "
                 f"{plan['memory_streams']} streams are opened (50 every 20 ms, one connection "
                 "each; gRPC over several channels, with `--grpc-workers` raised to streams + 50, "
                 "since each gRPC stream holds a worker thread) and VmRSS is read once every "
                 "stream got its first piece. The plain JSON ask is not a stream and is left out.\n")
        L.append("| transport | streams open at once | KiB per stream | RSS before → open (peak) MiB "
                 "| threads | completed | errors | held |")
        L.append("|---|---|---|---|---|---|---|---|")
        for name, mm in result["memory"].items():
            if "error" in mm:
                L.append(f"| {name} | – | – | – | – | – | {mm['error']} | **FAIL** |")
                continue
            L.append(f"| {name} | {mm['simultaneously_open']} / {mm['streams']} | "
                     f"{fmt(mm['kib_per_stream'], 1)} | {mm['rss_before_mib']} → "
                     f"{mm['rss_open_mib']} ({mm['rss_peak_mib']}) | {mm['threads_before']} → "
                     f"{mm['threads_open']} | {mm['completed']} | {mm['errors']} | "
                     f"{'**pass**' if mm['held'] else '**FAIL**'} |")
        L.append("")

    h = result.get("history")
    if h:
        sizes = [str(x) for x in h["sizes"]]
        L.append("## History length\n")
        L.append("Conversations imported with `easybackend-import` (what 5 and 500 asks against "
                 f"the fake would have stored), asked over SSE at c={h['concurrency']}, the six "
                 "kinds of round alternating. *Continuing*: the ordinary next turn, on "
                 "conversations asked once before (each worker takes turns on 8, so a history "
                 "grows slowly: the messages column gives it at the first and the last ask). "
                 "*Regenerate*: every ask continues from the same imported message "
                 "(`parent_id`) of a conversation asked before, so the history stays exactly "
                 "that long (each ask adds its two messages beside it, off the branch). "
                 "*From the store*: the first ask on a conversation the server has not seen "
                 "(as after a restart), a fresh one every ask, so the history is read from "
                 "the store every time.\n")
        L.append("| kind | history (messages) | asks | server CPU ms/ask | fake CPU ms/ask "
                 "| first piece p50 ms | whole answer p50 ms |")
        L.append("|---|---|---|---|---|---|---|")
        for kind, label, _ in HISTORY_KINDS:
            part = h.get(kind) or {}
            for sz in sizes:
                x = part.get(sz)
                if not x:
                    continue
                first, last = x["messages_first_to_last"]
                span = f"{first}" if first == last else f"{first} → {last}"
                L.append(f"| {label} | {span} | {x['asks']} | {fmt(x['server_cpu_ms_per_ask'])} | "
                         f"{fmt(x['fake_cpu_ms_per_ask'])} | {fmt(x['ttfp_ms_p50'])} | "
                         f"{fmt(x['total_ms_p50'])} |")
        L.append("")
        for kind, label, _ in HISTORY_KINDS:
            part = h.get(kind) or {}
            if not part:
                continue
            L.append(f"Server CPU, {sizes[-1]} against {sizes[0]} messages, {label}: "
                     f"**{fmt(part.get('cpu_ratio'))}×** (target ≤ 1.5×).  ")
        L.append("")

    L.append("## Where the time goes (py-spy)\n")
    L.append("`py-spy record --nonblocking --function --format raw` on the server for "
             f"{plan['profile_seconds']} s while it is saturated (c=200, not a measured round; "
             "the history profiles at c=10). "
             "Shares are of the samples in which a server thread was running Python. "
             "*By part*: the leaf frame's package. *Self*: the function on top of the stack.\n")
    profiles = [(n, t["profile"]) for n, t in result["transports"].items() if t.get("profile")]
    for kind, label, _ in HISTORY_KINDS:
        if h and (h.get(kind) or {}).get("profile"):
            profiles.append((f"sse, 1,000-message history, {label} (c={h['concurrency']})",
                             h[kind]["profile"]))
    for name, p in profiles:
        if not p.get("samples"):
            L.append(f"### {name}\n\nno profile: {p.get('error', 'no samples')}\n")
            continue
        load = p.get("load", {})
        L.append(f"### {name}\n")
        L.append(f"{p['samples']} busy samples ({p.get('idle_samples', 0)} of waiting threads "
                 f"left out), {load.get('asks_per_s')} asks/s at c={load.get('concurrency')}.\n")
        L.append("| by part | share |  | self (top 10) | share |")
        L.append("|---|---|---|---|---|")
        cats = p["categories"][:10]
        selfs = p["self"][:10]
        for i in range(max(len(cats), len(selfs))):
            c = cats[i] if i < len(cats) else None
            s = selfs[i] if i < len(selfs) else None
            cat = f"{c['category']} | {c['share']:.0%}" if c else " | "
            fn = f"`{s['function']}` | {s['share']:.0%}" if s else " | "
            L.append(f"| {cat} |  | {fn} |")
        inc = [x for x in p["inclusive_easybackend"][:8]]
        if inc:
            L.append("\nEasyBackend functions, inclusive: " + "; ".join(
                f"`{x['function'].split(' (')[0]}` {x['share']:.0%}" for x in inc) + ".\n")
        else:
            L.append("")
    analysis = os.path.join(ROOT, "bench", "analysis.md")
    if os.path.exists(analysis):
        with open(analysis) as f:
            L.append(f.read().rstrip() + "\n")
    return "\n".join(L) + "\n"


# --- main ------------------------------------------------------------------


async def main_async(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    import aiohttp

    from bench.clients import DirectClient

    procs.raise_fd_limit()
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="easybackend-bench-")
    log(f"work folder {tmp}")
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "machine": procs.machine(),
        "commit": args.commit or _commit(),
        "plan": asdict(plan),
        "upstream": {"pieces": PIECES, "interval_s": INTERVAL},
        "transports": {},
    }
    started: list[procs.Proc] = []
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                    skip_auto_headers=("User-Agent",))
    try:
        fake, fake_port = procs.start_fake(tmp, "fake", PIECES, INTERVAL)
        started.append(fake)
        hist_ids = None
        db = os.path.join(tmp, "bench.sqlite3")
        if plan.history[0]:
            hist_dir = os.path.join(tmp, "history")
            hist_ids = history_files(hist_dir, plan.history_sizes, history_names(plan))
            subprocess.run([sys.executable, "-m", "easybackend.importer", hist_dir, "--db", db],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        server, ports = procs.start_server(tmp, "server", fake_port, db)
        started.append(server)
        log(f"fake pid {fake.pid} port {fake_port}; server pid {server.pid} ports {ports}")
        bench = Bench(plan, tmp, session)
        bench.pids.update({"server": server.pid, "fake": fake.pid})
        bench.server_log = procs.ServerLog(server.log_path)
        bench.server = server
        direct = DirectClient(session, fake_port)
        phases = set(args.phases.split(",")) if args.phases else {
            "transports", "history", "profile", "memory"}
        for name in plan.transports if "transports" in phases else ():
            log(f"transport {name}")
            result["transports"][name] = await transport_phases(bench, name, ports, direct)
        if hist_ids and "history" in phases:
            log("history")
            result["history"] = await history_phase(bench, ports, hist_ids, server.pid)
        if plan.profile_seconds and "profile" in phases:
            for name in plan.profile_transports:
                log(f"profile {name}")
                result["transports"].setdefault(name, {})["profile"] = await profile_phase(
                    bench, name, ports, server.pid, tmp)
        bench.server = None
        server.stop()
        if plan.memory_streams and plan.memory_transports and "memory" in phases:
            slow, slow_port = procs.start_fake(tmp, "fake-slow", PIECES, plan.slow_interval)
            started.append(slow)
            result["memory"] = {}
            for name in plan.memory_transports:
                log(f"memory {name}")
                try:
                    result["memory"][name] = await memory_phase(bench, name, slow_port)
                except Exception as e:  # noqa: BLE001 - reported as a failed row
                    log(f"  memory {name} failed: {e!r}")
                    result["memory"][name] = {"error": repr(e)[:300], "held": False}
    finally:
        await session.close()
        for p in reversed(started):
            p.stop()
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["duration_s"] = round(time.time() - t_start, 1)
    result["targets"] = targets(result)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resummarize(result: dict[str, Any]) -> None:
    """Summarize again the profiles whose raw py-spy files are still there."""
    from bench.profile import summarize

    found = [t.get("profile") for t in result.get("transports", {}).values()]
    found += [(result.get("history") or {}).get(k, {}).get("profile")
              for k, _, _ in HISTORY_KINDS]
    for p in found:
        if p and p.get("raw_file") and os.path.exists(p["raw_file"]):
            with open(p["raw_file"]) as f:
                fresh = summarize(f.read())
            p.update({k: v for k, v in fresh.items()})


def write_doc(text: str) -> None:
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text)
    log(f"wrote {DOC}")


def run_driver(coroutine: Any, uvloop: bool = True) -> Any:
    """Run the load driver's coroutine, on uvloop when it is installed."""
    if uvloop:
        try:
            import uvloop as _uvloop

            asyncio.set_event_loop_policy(_uvloop.EventLoopPolicy())
        except ImportError:
            pass
    return asyncio.run(coroutine)


def save(result: dict[str, Any], path: str) -> str:
    """Write a result as JSON; return its path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def choose(parser: argparse.ArgumentParser, value: str, known: Sequence[str],
           what: str) -> list[str]:
    """A comma-separated option's items; a usage error names unknown ones."""
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = set(chosen) - set(known)
    if unknown:
        parser.error(f"unknown {what}: {', '.join(sorted(unknown))}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check, under 2 minutes")
    parser.add_argument("--transports", help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks.md even with --quick")
    parser.add_argument("--out", help="the JSON result file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, profiles)")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--commit", help="the commit measured, when not run from a git checkout")
    parser.add_argument("--phases", help="comma-separated subset of "
                        "transports,history,profile,memory (a partial result: no docs)")
    parser.add_argument("--memory-streams", type=int, help="streams held at once (default 1000)")
    parser.add_argument("--render", metavar="JSON",
                        help="only write docs/benchmarks.md from an earlier result file")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        resummarize(result)
        with open(args.render, "w") as f:
            json.dump(result, f, indent=2)
        write_doc(markdown(result))
        return 0
    plan = QUICK if args.quick else Plan()
    if args.transports:
        chosen = choose(parser, args.transports, ORDER, "transports")
        plan.transports = chosen
        plan.memory_transports = [t for t in plan.memory_transports if t in chosen]
        plan.profile_transports = [t for t in plan.profile_transports if t in chosen]
    if args.memory_streams:
        plan.memory_streams = args.memory_streams
    if args.phases:
        args.no_docs = True
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("bench: aiohttp is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    result = run_driver(main_async(args, plan), uvloop=not args.no_uvloop)
    out = save(result, args.out or os.path.join(
        RESULTS, "quick.json" if args.quick else "latest.json"))
    if (not args.quick or args.docs) and not args.no_docs:
        write_doc(markdown(result))
    log(f"wrote {out} in {result['duration_s'] / 60:.1f} min")
    print()
    for row in result["targets"]:
        print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['transport']:<10} {row['target']}: "
              f"{fmt(row['value'])} {row['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
