"""
The conversation service: the one core that every transport shares.

It knows nothing of HTTP, WebSocket or gRPC.  A transport turns its
protocol into calls on L{ConversationService} and turns the results and
L{easybackend.errors.EasyBackendError}s back into its own form.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Sequence, TypeVar

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.python.failure import Failure
from twisted.internet.interfaces import IReactorTime

from easybackend.limits import Limiter
from easybackend.tokens import fit
from easybackend.errors import BadRequest, EasyBackendError, NoUpstream, NotFound
from easybackend.observe import AccessRecord, Observer
from easybackend.model import (
    NEW,
    Answer,
    AskRequest,
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    Completion,
    Conversation,
    ConversationView,
    History,
    Turn,
    Upstream,
    check_conversation_id,
)

T = TypeVar("T")


@frozen
class CoreSettings:
    """What the core needs to know of the configuration."""

    model: str = "gpt-4o-mini"
    first_prompt: str | None = None
    context_tokens: int = 128000
    answer_tokens: int = 1024
    temperature: float | None = None
    #: seconds to wait for a conversation another replica is answering
    lock_timeout: float = 600.0


def answer_tokens_of(counter: Any, completion: Completion) -> int:
    """
    The tokens the answer will cost as history: the upstream counted them
    (exactly, with the model's own encoding) when it reported usage, else
    count them here.
    """
    usage = completion.usage
    if usage is not None and usage.completion_tokens > 0:
        return counter.count_message("assistant", "") + usage.completion_tokens
    return counter.count_message("assistant", completion.text)


def new_conversation_id() -> str:
    """A fresh, unguessable conversation id."""
    return "c_" + uuid.uuid4().hex


@frozen
class Branch:
    """
    A conversation's branch, root first, as history (each message's role,
    content, stored token count for the budget, and JSON made once) and,
    beside it, the stored messages' ids.
    """

    messages: History = field(converter=History.of)
    ids: list[str]

    @property
    def tokens(self) -> int:
        """The messages' stored token counts, summed as they are added."""
        return self.messages.total

    def extended(
        self, prompt_id: str, prompt: ChatMessage, answer_id: str, answer: ChatMessage
    ) -> "Branch":
        return Branch(self.messages + (prompt, answer), [*self.ids, prompt_id, answer_id])

    def upto(self, message_id: str) -> "Branch | None":
        """
        The branch from the root down to C{message_id}, if it is on this
        one (stored messages never change, so a regenerate can start from
        here without reading the store).
        """
        try:
            end = self.ids.index(message_id) + 1
        except ValueError:
            return None
        return Branch(self.messages[:end], self.ids[:end])


@frozen
class Known:
    """
    What the service last wrote of a conversation: its leaf and branch,
    and the settings a turn needs (owner, system prompt, model).
    """

    leaf: str
    branch: Branch
    owner: str | None
    system_prompt: str | None
    model: str | None


class BranchCache:
    """
    What was last written of each recent conversation, so that a turn
    continuing it reads no history from the store.  When this process is
    the only writer, L{latest} is current as long as L{forget} is called on
    rollback and delete; otherwise its leaf is only a hint for
    L{Store.turn_context}, which reads the history again unless the
    conversation's leaf is still that one (leaf ids are unique and
    server-made).

    Bounded twice, the least recently used going first: at most C{size}
    conversations, and at most C{messages} messages in all, so that a few
    very long conversations cannot fill the memory (one longer than that
    is not kept: its turns read their history from the store).
    """

    def __init__(self, size: int = 256, messages: int = 200_000) -> None:
        self._size = size
        self._max_messages = messages
        self._messages = 0
        self._entries: OrderedDict[str, Known] = OrderedDict()

    @property
    def messages(self) -> int:
        """How many messages the kept branches hold."""
        return self._messages

    def latest(self, cid: str) -> Known | None:
        known = self._entries.get(cid)
        if known is not None:
            self._entries.move_to_end(cid)
        return known

    def put(self, cid: str, known: Known) -> None:
        self.forget(cid)
        self._entries[cid] = known
        self._messages += len(known.branch.messages)
        while self._entries and (
            len(self._entries) > self._size or self._messages > self._max_messages
        ):
            _, old = self._entries.popitem(last=False)
            self._messages -= len(old.branch.messages)

    def forget(self, cid: str) -> None:
        old = self._entries.pop(cid, None)
        if old is not None:
            self._messages -= len(old.branch.messages)


class Shared:
    """
    Call C{load} once and hand its result to every caller; a failure is
    handed to those waiting and the next call tries again.
    """

    def __init__(self, load: Callable[[], Awaitable[Any]]) -> None:
        self._load = load
        self._done = False
        self._result: Any = None
        self._waiting: list[Deferred[Any]] | None = None

    def __call__(self) -> "Deferred[Any]":
        if self._done:
            return succeed(self._result)
        d: Deferred[Any] = Deferred()
        if self._waiting is None:
            self._waiting = [d]
            Deferred.fromCoroutine(_await(self._load())).addBoth(self._fire)
        else:
            self._waiting.append(d)
        return d

    def _fire(self, result: Any) -> None:
        waiting, self._waiting = self._waiting or [], None
        if not isinstance(result, Failure):
            self._done, self._result = True, result
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _deferred(coroutine: Coroutine[Any, Any, T]) -> "Deferred[T]":
    return Deferred.fromCoroutine(coroutine)


class ConversationService:
    """
    Answers asks with server-side memory.

    All methods are called on the reactor thread and return Deferreds that
    fire on the reactor thread.

    @param store: an L{easybackend.store.Store}.
    @param upstream: the model to call, or C{None} when none is configured
        (every ask then fails with L{NoUpstream}).
    @param tokens: a zero-argument callable giving a Deferred that fires
        with the L{easybackend.tokens.TokenCounter} (loaded off the reactor
        thread, once).
    @param clock: the time source for timestamps.
    """

    def __init__(
        self,
        store: Any,
        upstream: Upstream | None,
        tokens: Callable[[], Awaitable[Any]],
        clock: IReactorTime,
        settings: CoreSettings = CoreSettings(),
        limiter: Limiter | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.observer = observer if observer is not None else Observer()
        self.limiter = limiter if limiter is not None else Limiter(clock)
        self.store = store
        self.upstream = upstream
        self._tokens = Shared(tokens)
        self._clock = clock
        self.settings = settings
        self._locks: dict[str, DeferredLock] = {}
        self._branches = BranchCache()
        self._exclusive = bool(getattr(store, "exclusive", False))
        self._in_flight: set[Deferred[Answer]] = set()
        self._idle: list[Deferred[None]] = []

    def warm_up(self) -> "Deferred[None]":
        """
        Start loading what the first ask needs, so that it does not wait;
        fires when loaded (or failed: the first ask tries again).
        """
        return self._tokens().addCallbacks(lambda _: None, lambda f: None)

    # -- asking ------------------------------------------------------------

    def ask(
        self, request: AskRequest, on_piece: Callable[[str], None]
    ) -> "Deferred[Answer]":
        """
        Answer C{request}: call C{on_piece(text)} for each piece of the
        answer as it arrives, then fire with the L{Answer} once the turn is
        stored.  Cancelling the Deferred at any point closes the upstream
        request and stores nothing.  Asks on one conversation run one after
        the other; asks on different conversations run concurrently.
        Fails with an L{EasyBackendError}: L{BadRequest}, L{NotFound} (unknown
        C{parent_id}), L{PromptTooLong}, L{NoUpstream}, or an
        L{UpstreamError} subclass.
        """
        return self._track(_deferred(self._observed(request, on_piece, self._ask)))

    def complete(
        self, request: CompleteRequest, on_piece: Callable[[str], None]
    ) -> "Deferred[Completion]":
        """
        Pass the client's own messages to the upstream, streaming the
        pieces to C{on_piece}; store nothing.  Keys, limits, logs, metrics
        and cancellation work as for L{ask}.
        """
        return self._track(_deferred(self._observed(request, on_piece, self._complete)))

    async def _complete(
        self, request: CompleteRequest, on_piece: Callable[[str], None]
    ) -> Completion:
        upstream = self._upstream()
        if not request.messages:
            raise BadRequest('"messages" must not be empty')
        with self.limiter.admitted(request.owner):
            return await upstream.stream_chat(self._chat_request(
                request, request.model or self.settings.model, request.messages,
            ), on_piece)

    def _upstream(self) -> Upstream:
        """The upstream to call; L{NoUpstream} when none is configured."""
        if self.upstream is None:
            raise NoUpstream()
        return self.upstream

    def _chat_request(
        self, request: AskRequest | CompleteRequest, model: str,
        messages: Sequence[ChatMessage],
    ) -> ChatRequest:
        """The upstream request, with the server's default temperature."""
        temperature = request.temperature
        if temperature is None:
            temperature = self.settings.temperature
        return ChatRequest(model=model, messages=messages, temperature=temperature,
                           max_tokens=request.max_tokens)

    def _track(self, d: "Deferred[T]") -> "Deferred[T]":
        """Count C{d} among the asks in flight until it ends."""
        self._in_flight.add(d)
        d.addBoth(self._ask_ended, d)
        return d

    def _ask_ended(self, result: Any, d: "Deferred[Answer]") -> Any:
        self._in_flight.discard(d)
        if not self._in_flight and self._idle:
            # Tell a drain only once the ask's caller has had its outcome
            # (its callbacks come after this one): at shutdown, a transport
            # then tells its client before the connections are closed.
            d.addBoth(self._now_idle)
        return result

    def _now_idle(self, result: Any) -> Any:
        if not self._in_flight:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)
        return result

    def drain(self, grace: float) -> "Deferred[int]":
        """
        For a graceful shutdown: let the asks in flight finish for up to
        C{grace} seconds, then cancel the rest (nothing of theirs is
        stored).  Fires with how many were cancelled.
        """
        if not self._in_flight:
            return succeed(0)
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)

        def cancel_rest() -> None:
            late = list(self._in_flight)
            result.append(len(late))
            for d in late:
                d.cancel()

        result: list[int] = []
        call = self._clock.callLater(grace, cancel_rest)

        def done(_: object) -> int:
            if call.active():
                call.cancel()
            return result[0] if result else 0

        return idle.addCallback(done)

    async def _observed(
        self, request: Any, on_piece: Callable[[str], None],
        run: Callable[[Any, Callable[[str], None]], Awaitable[T]],
    ) -> T:
        """Run an ask or completion, then write its access line and count it."""
        clock = self._clock
        started = clock.seconds()
        first: list[float] = []

        def piece(text: str) -> None:
            if not first:
                first.append(clock.seconds() - started)
            on_piece(text)

        status, answer, upstream_status, retries = "ok", None, None, None
        self.observer.metrics.in_flight.inc()
        try:
            answer = await run(request, piece)
            upstream_status = getattr(answer, "upstream_status", None) or getattr(
                answer, "status", None)
            retries = answer.retries  # type: ignore[attr-defined]
            return answer
        except CancelledError:
            status = "cancelled"
            raise
        except EasyBackendError as e:
            status = e.code
            upstream_status = getattr(e, "status", None)
            raise
        except BaseException:
            status = "internal"
            raise
        finally:
            self.observer.metrics.in_flight.dec()
            usage = getattr(answer, "usage", None)
            is_ask = isinstance(request, AskRequest)
            self.observer.record(AccessRecord(
                transport=request.transport,
                kind="ask" if is_ask else "completion",
                status=status,
                latency=clock.seconds() - started,
                request_id=request.request_id,
                conversation_id=(
                    getattr(answer, "conversation_id", None)
                    or getattr(request, "conversation_id", None)),
                key=request.owner,
                first_piece=first[0] if first else None,
                tokens_in=usage.prompt_tokens if usage else None,
                tokens_out=usage.completion_tokens if usage else None,
                upstream_status=upstream_status,
                retries=retries,
                prompt=request.prompt if is_ask else (
                    request.messages[-1].content if request.messages else None),
                answer=getattr(answer, "text", None),
            ))

    async def _ask(
        self, request: AskRequest, on_piece: Callable[[str], None]
    ) -> Answer:
        upstream = self._upstream()
        if not request.prompt.strip():
            raise BadRequest('"prompt" must not be empty')
        for name, text in (("prompt", request.prompt), ("system_prompt", request.system_prompt)):
            # PostgreSQL cannot store it: refused whatever the store, alike.
            if text and "\x00" in text:
                raise BadRequest(f'"{name}" must not hold the NUL character (U+0000)')
        cid = request.conversation_id
        if cid == NEW:
            cid = new_conversation_id()
        else:
            check_conversation_id(cid)
        with self.limiter.admitted(request.owner):
            return await self._answer(request, cid, upstream, on_piece)

    async def _answer(
        self, request: AskRequest, cid: str, upstream: Upstream,
        on_piece: Callable[[str], None],
    ) -> Answer:
        async with self._held(cid):
            counter = await self._tokens()
            cached = self._branches.latest(cid)
            branch = None
            if cached is not None and self._exclusive:
                # This process wrote the conversation last: no store call
                # before the answer starts, for the next turn or for one
                # from a message of the last branch (a regenerate).
                if cached.owner != request.owner:
                    raise NotFound(f"conversation {cid!r} not found")
                if request.parent_id is None:
                    leaf, branch = cached.leaf, cached.branch
                else:
                    leaf, branch = request.parent_id, cached.branch.upto(request.parent_id)
            if branch is not None:
                assert cached is not None
                system, created_model = cached.system_prompt, cached.model
                exists = True
            else:
                context = await self.store.turn_context(
                    cid, request.parent_id, cached.leaf if cached else None)
                conversation, leaf = context.conversation, context.leaf
                if conversation is not None and conversation.owner != request.owner:
                    raise NotFound(f"conversation {cid!r} not found")
                if context.history is not None:
                    branch = Branch(context.history, context.ids)
                else:
                    assert cached is not None
                    branch = cached.branch
                exists = conversation is not None
                system = conversation.system_prompt if conversation else None
                created_model = conversation.model if conversation else None
            if not exists:
                system = request.system_prompt or self.settings.first_prompt
                model = request.model or self.settings.model
            else:
                model = request.model or created_model or self.settings.model
            answer_tokens = request.max_tokens or self.settings.answer_tokens
            budget = self.settings.context_tokens - answer_tokens
            system_tokens = counter.count_message("system", system) if system else 0
            prompt_tokens = counter.count_message("user", request.prompt)
            start = fit(system_tokens, branch.messages, prompt_tokens, budget, branch.tokens)
            # made once: sent now, and kept with the branch after the commit
            prompt = ChatMessage("user", request.prompt, prompt_tokens)
            messages = (branch.messages[start:] if start else branch.messages) + (prompt,)
            if system:
                messages = History.of((ChatMessage("system", system),)) + messages
            completion = await upstream.stream_chat(
                self._chat_request(request, model, messages), on_piece)
            turn = Turn(
                conversation_id=cid,
                parent_id=leaf,
                prompt=request.prompt,
                prompt_tokens=prompt_tokens,
                answer=completion.text,
                answer_tokens=answer_tokens_of(counter, completion),
                model=completion.model or model,
                finish_reason=completion.finish_reason,
                usage=completion.usage,
                system_prompt=system,
                owner=request.owner,
                continues_leaf=request.parent_id is None,
            )
            now = self._clock.seconds()
            prompt_id, answer_id = await self.store.commit_turn(
                turn, now, system_tokens=system_tokens
            )
            self._branches.put(cid, Known(
                leaf=answer_id,
                branch=branch.extended(
                    prompt_id, prompt,
                    answer_id, ChatMessage("assistant", turn.answer, turn.answer_tokens),
                ),
                owner=request.owner,
                system_prompt=system,
                model=created_model if exists else turn.model,
            ))
        return Answer(
            conversation_id=cid,
            message_id=answer_id,
            text=completion.text,
            model=turn.model,
            usage=completion.usage,
            finish_reason=completion.finish_reason,
            prompt_message_id=prompt_id,
            upstream_status=completion.status,
            retries=completion.retries,
        )

    @asynccontextmanager
    async def _held(self, cid: str) -> AsyncIterator[None]:
        """
        Hold the conversation's lock for a block, in this process and
        across replicas: waiting for it can be cancelled (L{LockTimeout}
        when it cannot be had in time), and it is released however the
        block ends.  A lock nobody holds or waits for is forgotten.
        """
        lock = self._locks.setdefault(cid, DeferredLock())
        try:
            await lock.acquire()
            try:
                # Across processes too (PostgreSQL; a no-op on SQLite).
                lease = await self.store.lock_conversation(cid, self.settings.lock_timeout)
                try:
                    yield
                finally:
                    await lease.release()
            finally:
                lock.release()
        finally:
            if not lock.locked and not lock.waiting:
                self._locks.pop(cid, None)

    # -- reading and editing -----------------------------------------------

    async def _owned(
        self, cid: str, owner: str | None, missing_ok: bool = False
    ) -> Conversation | None:
        """
        The conversation if C{owner} may see it.  Another key's
        conversation does not exist for this one: L{NotFound}, never a
        refusal, so that ids do not leak.
        """
        conversation = await self.store.get_conversation(cid)
        if conversation is not None and conversation.owner != owner:
            raise NotFound(f"conversation {cid!r} not found")
        if conversation is None and not missing_ok:
            raise NotFound(f"conversation {cid!r} not found")
        return conversation

    def list_conversations(
        self, limit: int = 20, offset: int = 0, owner: str | None = None
    ) -> "Deferred[list[Conversation]]":
        """C{owner}'s conversations, most recently updated first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise BadRequest('"limit" must be an integer between 1 and 100')
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**63:
            raise BadRequest('"offset" must be an integer from 0 to 2**63 - 1')
        return self.store.list_conversations(limit, offset, owner=owner)

    def get_conversation(
        self, conversation_id: str, owner: str | None = None
    ) -> "Deferred[ConversationView]":
        """The conversation and its current branch; L{NotFound} if unknown."""
        return _deferred(self._view(check_conversation_id(conversation_id), owner))

    async def _view(self, cid: str, owner: str | None) -> ConversationView:
        conversation = await self._owned(cid, owner)
        assert conversation is not None
        leaf = conversation.leaf_id
        messages = await self.store.branch(cid, leaf) if leaf else []
        return ConversationView(conversation, messages)

    def delete_conversation(
        self, conversation_id: str, owner: str | None = None
    ) -> "Deferred[None]":
        """Delete the conversation and all its messages; L{NotFound} if unknown."""
        return _deferred(self._delete(check_conversation_id(conversation_id), owner))

    async def _delete(self, cid: str, owner: str | None) -> None:
        async with self._held(cid):
            await self._owned(cid, owner)
            self._branches.forget(cid)
            if not await self.store.delete_conversation(cid):
                raise NotFound(f"conversation {cid!r} not found")

    def rollback(
        self, conversation_id: str, turns: int, owner: str | None = None
    ) -> "Deferred[ConversationView]":
        """
        Move the current leaf back by C{turns} turns, deleting nothing;
        L{NotFound} if unknown, L{BadRequest} if C{turns} < 1.
        """
        return _deferred(self._rollback(check_conversation_id(conversation_id), turns, owner))

    async def _rollback(self, cid: str, turns: int, owner: str | None) -> ConversationView:
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
            raise BadRequest('"turns" must be an integer of at least 1')
        async with self._held(cid):
            await self._owned(cid, owner)
            self._branches.forget(cid)
            await self.store.rollback(cid, turns)
        return await self._view(cid, owner)

    def models(self) -> "Deferred[list[str]]":
        """
        The models the upstream offers, or the configured one where the
        upstream cannot list them.
        """
        return _deferred(self._models())

    async def _models(self) -> list[str]:
        listing = getattr(self.upstream, "list_models", None)
        if listing is not None:
            try:
                models = await listing()
                if models:
                    return list(models)
            except EasyBackendError:
                pass
        return [self.settings.model]

    def check_ready(self) -> "Deferred[None]":
        """
        Fire when the service can answer: the database answers and an
        upstream is configured; fail with the L{EasyBackendError} that says
        why not.
        """
        return _deferred(self._check_ready())

    async def _check_ready(self) -> None:
        await self.store.ping()
        self._upstream()
