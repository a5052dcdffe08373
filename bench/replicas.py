"""
Replicas on PostgreSQL beside one process on SQLite (issue 8).

    .venv/bin/python -m bench.replicas            # the full run, ~5 minutes
    .venv/bin/python -m bench.replicas --quick    # a smoke check, under a minute

The same pieces as C{bench.run}: the project's fake upstream (20 pieces,
10 ms apart), C{twistd -n easybackend} processes started by
L{bench.procs.start_server}, and the SSE (or WebSocket) client of
L{bench.clients}.  Started once, side by side, and measured in interleaved
rounds (the order rotates every round):

    direct   the load sent straight to the fake (the baseline)
    sqlite   one replica on an SQLite file
    pg1      one replica on PostgreSQL
    pg2      two replicas on one PostgreSQL database, worker w always on
             replica w % 2 (round-robin per worker, as a sticky balancer)
    pg2-alt  the same two replicas, each worker's asks alternating between
             them (a stateless balancer: every turn moves to the other one)

Every worker continues one conversation of its own, so every ask takes the
conversation lock (across processes on PostgreSQL) and commits a turn.
CPU is read from /proc: the replicas', and PostgreSQL's backends serving
the setup's database (their pids from C{pg_stat_activity}).  Each
PostgreSQL setup gets a fresh database, dropped at the end.  At the end,
every conversation's stored messages are checked against the asks it
answered.  Writes C{bench/results/replicas.json} (C{replicas-quick.json}).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

if __package__ in (None, ""):  # python bench/replicas.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import procs  # noqa: E402
from bench.procs import cpu_seconds  # noqa: E402
from bench.run import _commit, choose, log, pct, run_driver, save  # noqa: E402
from bench.run import fmt as run_fmt  # noqa: E402

ROOT = procs.ROOT
RESULTS = os.path.join(ROOT, "bench", "results")
PIECES, INTERVAL = 20, 0.01
ADMIN_URL = os.environ.get("EASYBACKEND_BENCH_POSTGRES",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
SETUPS = ["sqlite", "pg1", "pg2", "pg2-alt"]
LABELS = {
    "direct": "direct to the fake",
    "sqlite": "1 replica, SQLite",
    "pg1": "1 replica, PostgreSQL",
    "pg2": "2 replicas, PostgreSQL (sticky per worker)",
    "pg2-alt": "2 replicas, PostgreSQL (asks alternate)",
}


@dataclass
class Plan:
    #: (concurrency, rounds, asks per round and side)
    levels: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(1, 4, 20), (10, 4, 150), (50, 4, 300), (100, 3, 400)])
    round_cap: float = 20.0      # seconds a round may start asks for
    ask_timeout: float = 30.0    # one ask, then it counts as an error
    budget: float = 540.0        # seconds for all levels; later ones are skipped
    setups: list[str] = field(default_factory=lambda: list(SETUPS))


QUICK = Plan(levels=[(1, 2, 5), (10, 2, 60), (50, 2, 150)], round_cap=10.0, budget=90.0)


# the helpers of bench.run (copied: that file is being edited)
def ms(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x * 1000, digits)


# --- other benchmarks --------------------------------------------------------


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            pid = int(data[data.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError):
            break
    return out


def other_benchmarks() -> list[str]:
    """Command lines of other C{bench.run} / C{bench.replicas} processes."""
    mine = _ancestors()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        modules = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"}
        scripts = {a for a in argv if a.endswith(("bench/run.py", "bench/replicas.py"))}
        if modules & {"bench.run", "bench.replicas"} or scripts:
            found.append(f"{name}: {' '.join(argv)[:120]}")
    return found


def wait_for_others(limit: float, poll: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        others = other_benchmarks()
        if not others:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench.replicas: another benchmark still runs: {others[0]}")
        log(f"waiting for another benchmark to end: {others[0]}")
        time.sleep(poll)


# --- PostgreSQL ----------------------------------------------------------------


class Postgres:
    """The maintenance connection: fresh databases, their backends' pids."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=5,
                                    application_name="bench-replicas")
        self.created: list[str] = []

    def url_for(self, name: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + name

    def create(self, name: str) -> str:
        self.conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.url_for(name)

    def drop_all(self) -> None:
        for name in self.created:
            try:
                self.conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as e:  # noqa: BLE001 - reported, the others still go
                log(f"could not drop {name}: {e}")
        self.created.clear()

    def backends(self) -> dict[int, str]:
        """pid -> database of every backend on our databases; the
        cluster's auxiliary processes (no database) under C{""}."""
        rows = self.conn.execute(
            "SELECT pid, coalesce(datname, '') FROM pg_stat_activity"
            " WHERE (datname = ANY(%s) OR datname IS NULL) AND pid <> pg_backend_pid()",
            (self.created,)).fetchall()
        return {pid: db for pid, db in rows}

    def settings(self) -> dict[str, str]:
        out = {}
        for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers",
                     "max_connections"):
            out[name] = self.conn.execute(f"SHOW {name}").fetchone()[0]
        return out

    def close(self) -> None:
        self.conn.close()


def _cpu(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


def _threads_cpu(pid: int) -> dict[int, int]:
    """
    Nanoseconds on a CPU of each of the process's threads (schedstat: exact,
    where utime + stime counts 10 ms ticks, too coarse for a backend that
    works well under a millisecond per ask).
    """
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def _delta(before: dict[int, int], after: dict[int, int]) -> float:
    """Seconds the threads used between two L{_threads_cpu} (a thread born
    in between counts from zero; one that ended in between is lost)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


# --- the setups ------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    servers: list[procs.Proc]
    ports: list[dict[str, int]]
    db: str                     # the SQLite path or the PostgreSQL URL
    database: str = ""          # the PostgreSQL database's name
    alternate: bool = False     # each worker's asks alternate between replicas

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.servers]


class Spread:
    """One client per replica; a worker's ask goes to replica C{w % n}, or,
    alternating, to the next replica after the one it used last."""

    whole_answer = False

    def __init__(self, clients: list[Any], alternate: bool) -> None:
        self.clients = clients
        self.alternate = alternate
        self.turn: dict[int, int] = {}

    async def ask(self, worker: int, cid: str, n: int, on_first: Any = None) -> tuple[float, float]:
        k = worker
        if self.alternate:
            k = worker + self.turn.get(worker, 0)
            self.turn[worker] = self.turn.get(worker, 0) + 1
        return await self.clients[k % len(self.clients)].ask(worker, cid, n, on_first)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


# --- a round -----------------------------------------------------------------------


@dataclass
class Round:
    side: str
    concurrency: int
    first: list[float]
    errors: list[str]
    asks: int
    elapsed: float
    window_rate: float
    cpu: dict[int, float]        # pid -> CPU seconds (replicas, fake, driver), schedstat
    ticks: dict[int, float]      # the same from utime + stime (a cross-check)
    pg: dict[str, float]         # database ("" for auxiliary processes) -> CPU seconds
    machine: float               # CPU seconds the whole machine used
    tcp: dict[str, int]          # kernel counters: listen overflows, SYN retransmits


class Runner:
    def __init__(self, plan: Plan, session: Any, pg: Postgres | None,
                 setups: dict[str, Setup], fake_pid: int) -> None:
        self.plan = plan
        self.session = session
        self.pg = pg
        self.setups = setups
        self.fake_pid = fake_pid
        self.watched = [os.getpid(), fake_pid] + [p for s in setups.values() for p in s.pids]
        #: conversation id -> asks answered (for the check at the end)
        self.answered: dict[str, int] = {}
        self.conversations: dict[str, list[str]] = {name: [] for name in setups}

    def _pg_cpu(self) -> dict[int, tuple[str, dict[int, int]]]:
        if self.pg is None:
            return {}
        return {pid: (db, _threads_cpu(pid)) for pid, db in self.pg.backends().items()}

    async def round(self, side: str, client: Any, concurrency: int, n: int,
                    ids: list[str]) -> Round:
        """
        C{concurrency} workers, worker w continuing conversation C{ids[w]},
        ask one after another until C{n} asks were started or the round cap
        passed.  Asks per second are counted while every worker was busy:
        answers ended between the start and the last ask started.
        """
        first: list[float] = []
        ends: list[float] = []
        errors: list[str] = []
        started = 0
        last_start = 0.0
        timeout = self.plan.ask_timeout
        pg0 = self._pg_cpu()
        ticks0 = {p: _cpu(p) for p in self.watched}
        cpu0 = {p: _threads_cpu(p) for p in self.watched}
        machine0 = procs.machine_busy()
        tcp0 = procs.tcp_counters()
        t0 = perf_counter()
        deadline = t0 + self.plan.round_cap

        async def worker(w: int) -> None:
            nonlocal started, last_start
            cid = ids[w]
            while started < n and perf_counter() < deadline:
                i = started
                started += 1
                last_start = perf_counter()
                try:
                    f, _ = await asyncio.wait_for(client.ask(w, cid, i), timeout)
                except Exception as e:  # noqa: BLE001 - counted and shown
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                first.append(f)
                ends.append(perf_counter())
                self.answered[cid] = self.answered.get(cid, 0) + 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = perf_counter() - t0
        machine1 = procs.machine_busy()
        tcp1 = procs.tcp_counters()
        cpu1 = {p: _threads_cpu(p) for p in self.watched}
        ticks1 = {p: _cpu(p) for p in self.watched}
        pg1 = self._pg_cpu()
        for s in self.setups.values():
            for p in s.servers:
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited ({p.popen.returncode}); its log ends:\n"
                                       + p.output().decode("utf-8", "replace")[-1500:])
        pg: dict[str, float] = {}
        for pid, (db, c) in pg1.items():
            before = pg0.get(pid)
            pg[db] = pg.get(db, 0.0) + _delta(before[1] if before and before[0] == db else {}, c)
        window = last_start - t0
        in_window = sum(1 for e in ends if e <= last_start)
        rate = in_window / window if window > 0.05 and in_window else len(ends) / elapsed
        return Round(side, concurrency, first, errors, len(ends), elapsed, rate,
                     {p: _delta(cpu0[p], cpu1[p]) for p in self.watched},
                     {p: (ticks1[p] or 0.0) - (ticks0[p] or 0.0) for p in self.watched}, pg,
                     machine1 - machine0, {k: v - tcp0.get(k, 0) for k, v in tcp1.items()})

    async def level(self, clients: dict[str, Any], concurrency: int, rounds: int,
                    n: int) -> dict[str, Any]:
        sides = ["direct"] + list(self.setups)
        tag = uuid.uuid4().hex[:6]
        ids = {s: [f"rep-{s}-c{concurrency}-{tag}-{w}" for w in range(concurrency)]
               for s in sides}
        for s in self.setups:
            self.conversations[s].extend(ids[s])
        # warm-up: one ask per worker, which also creates the conversations
        for s in sides:
            await self.round(s, clients[s], concurrency, concurrency, ids[s])
        got: dict[str, list[Round]] = {s: [] for s in sides}
        for r in range(rounds):
            k = r % len(sides)
            order = sides[k:] + sides[:k]
            if r % 2:
                order.reverse()
            for s in order:
                got[s].append(await self.round(s, clients[s], concurrency, n, ids[s]))
        log(f"  c={concurrency}: " + ", ".join(
            f"{s} {sum(x.asks for x in rs)} asks {self._rate(rs):.0f}/s "
            f"err={sum(len(x.errors) for x in rs)}" for s, rs in got.items()))
        return self.aggregate(got)

    @staticmethod
    def _rate(rounds: list[Round]) -> float:
        rates = sorted(r.window_rate for r in rounds)
        return rates[len(rates) // 2] if rates else 0.0

    def aggregate(self, got: dict[str, list[Round]]) -> dict[str, Any]:
        all_rounds = [r for rs in got.values() for r in rs]
        # a process's CPU while its setup was idle: subtracted from its busy rounds
        idle: dict[int, float] = {}
        idle_pg: dict[str, float] = {}
        for name, s in self.setups.items():
            # rounds in which none of its processes served (pg2 and pg2-alt share them)
            quiet = [r for r in all_rounds
                     if r.side not in self.setups or not set(self.setups[r.side].pids) & set(s.pids)]
            t = sum(r.elapsed for r in quiet)
            for p in s.pids:
                idle[p] = sum(r.cpu[p] for r in quiet) / t if t else 0.0
            if s.database:
                idle_pg[s.database] = sum(r.pg.get(s.database, 0.0) for r in quiet) / t if t else 0.0
        out: dict[str, Any] = {}
        for side, rounds in got.items():
            first = [x for r in rounds for x in r.first]
            asks = sum(r.asks for r in rounds)
            elapsed = sum(r.elapsed for r in rounds)
            errors = [e for r in rounds for e in r.errors]
            ours = sum(sum(r.cpu.values()) + sum(r.pg.values()) for r in rounds)
            agg: dict[str, Any] = {
                "asks": asks, "errors": len(errors), "error_samples": errors[:3],
                "rounds": len(rounds),
                "asks_per_s": round(self._rate(rounds), 1),
                "asks_per_s_rounds": sorted(round(r.window_rate, 1) for r in rounds),
                "ttfp_ms": {"p50": ms(pct(first, 50)), "p90": ms(pct(first, 90)),
                            "p99": ms(pct(first, 99))},
                "listen_overflows": sum(r.tcp.get("ListenOverflows", 0) for r in rounds),
                "syn_retransmits": sum(r.tcp.get("TCPSynRetrans", 0) for r in rounds),
                "driver_cpu_ms_per_ask": ms(sum(r.cpu[os.getpid()] for r in rounds) / asks)
                if asks else None,
                "fake_cpu_ms_per_ask": ms(sum(r.cpu[self.fake_pid] for r in rounds) / asks)
                if asks else None,
                "machine_busy_cores": round(sum(r.machine for r in rounds) / elapsed, 2)
                if elapsed else None,
                # the machine's CPU that none of our processes used: other work
                "others_busy_cores": round((sum(r.machine for r in rounds) - ours) / elapsed, 2)
                if elapsed else None,
            }
            s = self.setups.get(side)
            if s is not None and asks:
                raw = sum(r.cpu[p] for r in rounds for p in s.pids)
                agg["server_cpu_ms_per_ask_raw"] = ms(raw / asks)
                agg["server_cpu_ms_per_ask_raw_ticks"] = ms(
                    sum(r.ticks[p] for r in rounds for p in s.pids) / asks)
                agg["server_cpu_ms_per_ask"] = ms(
                    (raw - sum(idle[p] for p in s.pids) * elapsed) / asks)
                agg["server_cpu_ms_per_ask_each"] = [
                    ms(sum(r.cpu[p] for r in rounds) / asks) for p in s.pids]
                agg["server_busy_cores"] = round(raw / elapsed, 2)
                if s.database:
                    used = sum(r.pg.get(s.database, 0.0) for r in rounds)
                    agg["pg_cpu_ms_per_ask_raw"] = ms(used / asks)
                    agg["pg_cpu_ms_per_ask"] = ms((used - idle_pg[s.database] * elapsed) / asks)
                    agg["pg_busy_cores"] = round(used / elapsed, 2)
                    agg["pg_aux_cpu_ms_per_ask"] = ms(
                        sum(r.pg.get("", 0.0) for r in rounds) / asks)
            out[side] = agg
        d = out["direct"]["ttfp_ms"]
        for side in self.setups:
            t = out[side]["ttfp_ms"]
            out[side]["added_ttfp_ms"] = {
                q: (round(t[q] - d[q], 2) if t[q] is not None and d[q] is not None else None)
                for q in ("p50", "p99")}
        return out


# --- the check at the end -------------------------------------------------------------


def stored_turns(setup: Setup, ids: list[str]) -> dict[str, tuple[int, int]]:
    """conversation -> (messages stored, messages that share a parent with
    another message: a fork, which continued asks never make)."""
    q_count = ("SELECT conversation_id, count(*) FROM messages"
               " WHERE conversation_id = ANY(%s) GROUP BY conversation_id")
    q_forks = ("SELECT conversation_id, sum(n) FROM (SELECT conversation_id, count(*) AS n"
               " FROM messages WHERE conversation_id = ANY(%s)"
               " GROUP BY conversation_id, parent_id HAVING count(*) > 1) AS x"
               " GROUP BY conversation_id")
    if setup.database:
        import psycopg

        with psycopg.connect(setup.db, connect_timeout=5) as c:
            counts = dict(c.execute(q_count, (ids,)).fetchall())
            forks = dict(c.execute(q_forks, (ids,)).fetchall())
    else:
        marks = ",".join("?" * len(ids))
        c = sqlite3.connect(f"file:{setup.db}?mode=ro", uri=True, timeout=10)
        try:
            counts = dict(c.execute(q_count.replace("= ANY(%s)", f"IN ({marks})"), ids).fetchall())
            forks = dict(c.execute(q_forks.replace("= ANY(%s)", f"IN ({marks})"), ids).fetchall())
        finally:
            c.close()
    return {cid: (int(counts.get(cid, 0)), int(forks.get(cid, 0) or 0)) for cid in ids}


def check(runner: Runner) -> dict[str, Any]:
    out = {}
    for name, setup in runner.setups.items():
        ids = runner.conversations[name]
        if not ids:
            continue
        stored = stored_turns(setup, ids)
        answered = sum(runner.answered.get(cid, 0) for cid in ids)
        turns = sum(n for n, _ in stored.values()) // 2
        short = sum(1 for cid in ids if stored[cid][0] < 2 * runner.answered.get(cid, 0))
        forks = sum(f for _, f in stored.values())
        out[name] = {"conversations": len(ids), "asks_answered": answered,
                     "turns_stored": turns, "conversations_missing_turns": short,
                     "forked_messages": forks,
                     "ok": short == 0 and forks == 0 and turns >= answered}
    return out


# --- the run ---------------------------------------------------------------------------


def start_setups(plan: Plan, tmp: str, fake_port: int, pg: Postgres | None,
                 tag: str, extra: list[str]) -> dict[str, Setup]:
    """Every replica at once (the two on one database migrate it together)."""
    wanted = [s for s in SETUPS if s in plan.setups]
    dbs: dict[str, tuple[str, str]] = {}
    if "sqlite" in wanted:
        dbs["sqlite"] = (os.path.join(tmp, "bench.sqlite3"), "")
    for name in ("pg1", "pg2"):
        if name in wanted or (name == "pg2" and "pg2-alt" in wanted):
            assert pg is not None
            database = f"eb_bench_{tag}_{name}"
            dbs[name] = (pg.create(database), database)
    jobs = [(name, i) for name in dbs for i in range(2 if name == "pg2" else 1)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
        futures = {job: ex.submit(procs.start_server, tmp, f"{job[0]}-{job[1]}", fake_port,
                                  dbs[job[0]][0], 16, extra) for job in jobs}
        started = {}
        failed = None
        for job, fut in futures.items():
            try:
                started[job] = fut.result()
            except Exception as e:  # noqa: BLE001 - the others are stopped, then raised
                failed = failed or e
        if failed:
            for proc, _ in started.values():
                proc.stop()
            raise failed
    out: dict[str, Setup] = {}
    for name in wanted:
        base = "pg2" if name == "pg2-alt" else name
        members = [started[job] for job in jobs if job[0] == base]
        out[name] = Setup(name, [p for p, _ in members], [ports for _, ports in members],
                          dbs[base][0], dbs[base][1], alternate=(name == "pg2-alt"))
    return out


def make_clients(transport: str, session: Any, setups: dict[str, Setup],
                 fake_port: int) -> dict[str, Any]:
    from bench.clients import TRANSPORTS, DirectClient

    clients: dict[str, Any] = {"direct": DirectClient(session, fake_port)}
    for name, s in setups.items():
        clients[name] = Spread([TRANSPORTS[transport](session, ports) for ports in s.ports],
                               s.alternate)
    return clients


async def main_async(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    import aiohttp

    procs.raise_fd_limit()
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="easybackend-replicas-")
    log(f"work folder {tmp}")
    tag = uuid.uuid4().hex[:8]
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "machine": procs.machine(),
        "commit": args.commit or _commit(),
        "transport": args.transport,
        "plan": asdict(plan),
        "upstream": {"pieces": PIECES, "interval_s": INTERVAL},
        "levels": {},
    }
    started: list[procs.Proc] = []
    pg: Postgres | None = None
    session = None
    try:
        if any(s.startswith("pg") for s in plan.setups):
            pg = Postgres(args.postgres)
            result["postgres"] = pg.settings()
        fake, fake_port = procs.start_fake(tmp, "fake", PIECES, INTERVAL)
        started.append(fake)
        setups = start_setups(plan, tmp, fake_port, pg, tag, args.server_arg or [])
        for s in setups.values():
            started.extend(p for p in s.servers if p not in started)
        log("started: " + "; ".join(f"{n} pids {s.pids}" for n, s in setups.items()))
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                        skip_auto_headers=("User-Agent",))
        clients = make_clients(args.transport, session, setups, fake_port)
        runner = Runner(plan, session, pg, setups, fake.pid)
        deadline = time.monotonic() + plan.budget
        try:
            for conc, rounds, n in plan.levels:
                if time.monotonic() > deadline:
                    log(f"time budget spent: c={conc} skipped")
                    result["levels"][f"c{conc}"] = {"skipped": "time budget"}
                    continue
                log(f"concurrency {conc}: {rounds} rounds of {n} asks per side")
                seen = other_benchmarks()
                if seen:  # started after us: the figures may be distorted
                    log(f"  another benchmark runs meanwhile: {seen[0]}")
                    result.setdefault("other_benchmarks_seen", []).extend(seen)
                result["levels"][f"c{conc}"] = await runner.level(clients, conc, rounds, n)
        finally:
            for c in clients.values():
                await c.close()
        result["check"] = check(runner)
        log("check: " + ", ".join(
            f"{n} {'ok' if c['ok'] else 'FAIL'} ({c['turns_stored']} turns stored, "
            f"{c['asks_answered']} answered)" for n, c in result["check"].items()))
    finally:
        if session is not None:
            await session.close()
        for p in reversed(started):
            p.stop()
        if pg is not None:
            pg.drop_all()
            pg.close()
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["duration_s"] = round(time.time() - t_start, 1)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def fmt(x: Any, digits: int = 1) -> str:
    return run_fmt(x, digits)


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    L = ["| setup | c | asks/s | first piece p50 / p99 ms | added p50 / p99 ms "
         "| server CPU ms/ask | PostgreSQL CPU ms/ask | cores busy: server + PostgreSQL / machine "
         "| errors |",
         "|---|---|---|---|---|---|---|---|---|"]
    for level, sides in result["levels"].items():
        if "skipped" in sides:
            L.append(f"| – | {level[1:]} | skipped ({sides['skipped']}) | | | | | | |")
            continue
        for side, x in sides.items():
            t = x["ttfp_ms"]
            added = x.get("added_ttfp_ms")
            busy = "–"
            if "server_busy_cores" in x:
                busy = fmt(x["server_busy_cores"] + x.get("pg_busy_cores", 0.0), 2)
            L.append(
                f"| {LABELS.get(side, side)} | {level[1:]} | {fmt(x['asks_per_s'])} | "
                f"{fmt(t['p50'])} / {fmt(t['p99'])} | "
                f"{(fmt(added['p50']) + ' / ' + fmt(added['p99'])) if added else '(baseline)'} | "
                f"{fmt(x.get('server_cpu_ms_per_ask'), 2)} | {fmt(x.get('pg_cpu_ms_per_ask'), 2)} | "
                f"{busy} / {fmt(x.get('machine_busy_cores'), 2)} | {x['errors']} |")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas",
                                     description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check, about a minute")
    parser.add_argument("--transport", choices=["sse", "websocket"], default="sse")
    parser.add_argument("--setups", help=f"comma-separated subset of {','.join(SETUPS)}")
    parser.add_argument("--postgres", default=ADMIN_URL,
                        help="maintenance database URL the fresh databases are made from "
                             "(default: $EASYBACKEND_BENCH_POSTGRES or %(default)s)")
    parser.add_argument("--server-arg", action="append", metavar="ARG",
                        help="one more twistd easybackend option for every replica (repeatable)")
    parser.add_argument("--out", help="the JSON result file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server logs)")
    parser.add_argument("--commit", help="the commit measured, when not run from a git checkout")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for another bench.run / bench.replicas to end")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.setups:
        plan.setups = choose(parser, args.setups, list(SETUPS), "setups")
    try:
        import aiohttp  # noqa: F401
        if any(s.startswith("pg") for s in plan.setups):
            import psycopg  # noqa: F401
    except ImportError as e:
        print(f"bench.replicas: {e.name} is missing: pip install -e '.[bench]' "
              "'psycopg[binary]'", file=sys.stderr)
        return 2
    if not args.no_wait:
        wait_for_others(20 * 60)
    result = run_driver(main_async(args, plan), uvloop=not args.no_uvloop)
    out = save(result, args.out or os.path.join(
        RESULTS, "replicas-quick.json" if args.quick else "replicas.json"))
    log(f"wrote {out} in {result['duration_s'] / 60:.1f} min")
    print()
    print(table(result))
    bad = [n for n, c in result.get("check", {}).items() if not c["ok"]]
    if bad:
        print(f"\nCHECK FAILED: {', '.join(bad)} (stored turns do not match the answered asks)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
