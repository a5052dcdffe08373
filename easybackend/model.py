"""
Values shared by the core, the store, the upstream clients and the
transports.  All are frozen C{attrs} classes: plain data, no behaviour that
needs the reactor.
"""

from __future__ import annotations

import json
import re
import uuid
from itertools import repeat
from operator import itemgetter
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, overload

from attrs import asdict, field, frozen
from twisted.internet.defer import Deferred

from easybackend.errors import BadRequest
from easybackend.wire import json_string

#: Conversation ids the server accepts: no path separators, no surprises.
CONVERSATION_ID = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")
#: The conversation id that asks the server to make a fresh one.
NEW = "new"


def check_conversation_id(conversation_id: object) -> str:
    """
    Return C{conversation_id} when it is a valid id, else raise L{BadRequest}.
    """
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.match(
        conversation_id
    ):
        raise BadRequest(
            "conversation id must be 1 to 128 characters of "
            "A-Z a-z 0-9 . _ : -"
        )
    return conversation_id


def request_id_or_new(given: object) -> str:
    """A client's request id when it is one (1 to 128 printable characters), else a fresh one."""
    if isinstance(given, str) and 0 < len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


@frozen
class Usage:
    """Token usage of one answer, as the upstream reported it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@frozen
class AskRequest:
    """
    One ask, as every transport hands it to the core.

    @ivar conversation_id: an existing or client-chosen id, or C{"new"}.
    @ivar parent_id: continue from this message instead of the current leaf
        (branching: regenerate an answer, edit an earlier prompt).
    @ivar request_id: the client's or transport's id for logs.
    """

    conversation_id: str
    prompt: str
    system_prompt: str | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    parent_id: str | None = None
    request_id: str | None = None
    #: the name of the API key asking; conversations belong to it
    owner: str | None = None
    #: a label for logs and metrics: which transport the ask came through
    transport: str = "core"

    @classmethod
    def from_mapping(
        cls, conversation_id: object, body: Mapping[str, Any],
        request_id: str | None = None, owner: str | None = None,
        transport: str = "core",
    ) -> "AskRequest":
        """
        Build a request from a decoded JSON object, the shape HTTP and
        WebSocket share; raise L{BadRequest} naming the faulty field.
        """
        if not isinstance(body, Mapping):
            raise BadRequest("the request body must be a JSON object")
        conversation_id = check_conversation_id(conversation_id)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest('"prompt" is required and must be a string')
        if not prompt.strip():
            raise BadRequest('"prompt" must not be empty')
        return cls(
            conversation_id=conversation_id,
            prompt=prompt,
            system_prompt=_optional(body, "system_prompt", str),
            model=_optional(body, "model", str),
            temperature=_temperature(body),
            max_tokens=_max_tokens(body),
            parent_id=_message_id(body),
            request_id=request_id,
            owner=owner,
            transport=transport,
        )


def _optional(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f'"{name}" must be a {kind.__name__}')
    if kind is str and not value:
        return None
    return value


def _message_id(body: Mapping[str, Any]) -> str | None:
    value = _optional(body, "parent_id", str)
    if value is not None and len(value) > 128:
        raise BadRequest('"parent_id" is not a message id (over 128 characters)')
    return value


def _temperature(body: Mapping[str, Any]) -> float | None:
    value = body.get("temperature")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest('"temperature" must be a number')
    if not 0 <= value <= 2:
        raise BadRequest('"temperature" must be between 0 and 2')
    return float(value)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest('"max_tokens" must be an integer')
    if value < 1:
        raise BadRequest('"max_tokens" must be at least 1')
    return value


@frozen
class CompleteRequest:
    """
    A chat completion without server-side memory: the client's own
    messages, passed to the upstream as they are, stored nowhere.
    """

    messages: Sequence["ChatMessage"]
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    request_id: str | None = None
    owner: str | None = None
    transport: str = "core"


@frozen
class Answer:
    """The final result of an ask, after all its pieces were passed on."""

    conversation_id: str
    message_id: str
    text: str
    model: str
    usage: Usage | None
    finish_reason: str | None
    #: the id of the stored prompt message, parent of C{message_id}
    prompt_message_id: str = ""
    #: the upstream's HTTP status and the retries it took, for logs
    upstream_status: int | None = None
    retries: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape every transport answers with."""
        return {
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            "response": self.text,
            "model": self.model,
            "usage": self.usage.to_dict() if self.usage else None,
            "finish_reason": self.finish_reason,
        }


# --- what the core sends upstream, and gets back --------------------------


class _Heads(dict):  # type: ignore[type-arg]
    """
    The start of a message's JSON for each role, made once per role (kept
    for the first few roles only, so that odd roles cannot grow it).
    """

    def __missing__(self, role: str) -> str:
        head = '{"role":%s,"content":' % json_string(role)
        if len(self) < 16:
            self[role] = head
        return head


#: The start of a message's JSON for each role: a cold read of a long
#: conversation makes one message per stored row.  Roles are few (the
#: store and the transports accept only the usual ones).
_JSON_HEADS = _Heads()


def message_json(role: str, content: str) -> str:
    """
    A message's JSON as a request sends it, C{{"role":...,"content":...}},
    as C{json.dumps} with no spaces and C{ensure_ascii=False} writes it.
    The store keeps it beside the message, so that a history read from it
    goes upstream without being written again.
    """
    return _JSON_HEADS[role] + json_string(content) + "}"


class ChatMessage(tuple):  # type: ignore[type-arg]
    """
    One message of a Chat Completions request: C{role} and C{content}; as
    history, also C{tokens}, what it costs in a request (stored with it;
    elsewhere 0).  C{json} is its JSON, as C{json.dumps(self.to_dict(),
    ensure_ascii=False)} with no spaces would write it, made once since a
    conversation's history goes upstream again at every turn.

    A value like the C{attrs} classes here (immutable, equal by role and
    content), but a tuple underneath, cheap to make: a L{History} makes one
    whenever one of its messages is read.
    """

    __slots__ = ()

    def __new__(cls, role: str, content: str, tokens: int = 0) -> "ChatMessage":
        return tuple.__new__(cls, (role, content, tokens, message_json(role, content)))

    role: str = property(itemgetter(0))  # type: ignore[assignment]
    content: str = property(itemgetter(1))  # type: ignore[assignment]
    tokens: int = property(itemgetter(2))  # type: ignore[assignment]
    json: str = property(itemgetter(3))  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChatMessage):
            return NotImplemented
        return self[:2] == other[:2]

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self[:2])

    def __repr__(self) -> str:
        return f"ChatMessage(role={self[0]!r}, content={self[1]!r})"

    def __getnewargs__(self) -> tuple[str, str, int]:
        return self[:3]

    def to_dict(self) -> dict[str, str]:
        return {"role": self[0], "content": self[1]}


class History(Sequence[ChatMessage]):
    """
    Messages kept as columns: their JSON and stored token counts, the
    tokens' total, and their roles and contents.  A sequence of
    L{ChatMessage}s, made when one is read.

    A conversation's branch is kept between turns and read from the store
    as this: lists of strings and numbers are made by C loops and the
    garbage collector skips their items, where one tuple per message
    would be made one by one and walked at every full collection (a pause
    that grew with every long conversation kept).

    A history read from the store (L{stored}) has only the messages' JSON
    as stored: what a request sends.  Their roles and contents are parsed
    from it when first read, which an ask does not do unless it drops
    old turns to fit the context window (one message at a time).
    """

    __slots__ = ("_roles", "_contents", "tokens", "jsons", "total")

    def __init__(
        self, roles: list[str], contents: list[str], tokens: list[int],
        jsons: list[str] | None = None, total: int | None = None,
    ) -> None:
        self._roles: list[str] | None = roles
        self._contents: list[str] | None = contents
        self.tokens = tokens
        if jsons is None:
            jsons = [message_json(r, c) for r, c in zip(roles, contents)]
        self.jsons = jsons
        self.total = sum(tokens) if total is None else total

    @classmethod
    def stored(
        cls, jsons: list[str], tokens: list[int], total: int | None = None
    ) -> "History":
        """
        Messages from their JSON (as L{message_json} writes it, or any JSON
        object with C{role} and C{content}) and token counts.
        """
        self = cls.__new__(cls)
        self._roles = self._contents = None
        self.jsons = jsons
        self.tokens = tokens
        self.total = sum(tokens) if total is None else total
        return self

    @classmethod
    def of(cls, messages: Iterable[ChatMessage]) -> "History":
        """C{messages} as a L{History} (itself when it is one)."""
        if isinstance(messages, History):
            return messages
        rows = list(messages)
        return cls([m[0] for m in rows], [m[1] for m in rows], [m[2] for m in rows],
                   [m[3] for m in rows])

    @property
    def roles(self) -> list[str]:
        """Each message's role."""
        if self._roles is None:
            self._parse()
        return self._roles  # type: ignore[return-value]

    @property
    def contents(self) -> list[str]:
        """Each message's content."""
        if self._contents is None:
            self._parse()
        return self._contents  # type: ignore[return-value]

    def _parse(self) -> None:
        messages = json.loads("[" + self.json() + "]")
        self._roles = [m["role"] for m in messages]
        self._contents = [m["content"] for m in messages]

    def __len__(self) -> int:
        return len(self.jsons)

    @overload
    def __getitem__(self, at: int) -> ChatMessage: ...
    @overload
    def __getitem__(self, at: slice) -> "History": ...

    def __getitem__(self, at: int | slice) -> "ChatMessage | History":
        if isinstance(at, slice):
            if self._roles is None:
                return History.stored(self.jsons[at], self.tokens[at])
            return History(self.roles[at], self.contents[at], self.tokens[at], self.jsons[at])
        if self._roles is None:
            message = json.loads(self.jsons[at])
            role, content = message["role"], message["content"]
        else:
            role, content = self.roles[at], self.contents[at]  # type: ignore[index]
        return tuple.__new__(ChatMessage, (role, content, self.tokens[at], self.jsons[at]))

    def __iter__(self) -> Iterator[ChatMessage]:
        return map(tuple.__new__, repeat(ChatMessage),
                   zip(self.roles, self.contents, self.tokens, self.jsons))

    def __add__(self, other: Iterable[ChatMessage]) -> "History":
        more = History.of(other)
        tokens, jsons = self.tokens + more.tokens, self.jsons + more.jsons
        total = self.total + more.total
        if self._roles is None or more._roles is None:
            return History.stored(jsons, tokens, total)
        return History(self.roles + more.roles, self.contents + more.contents,
                       tokens, jsons, total)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (History, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"History({list(self)!r})"

    def json(self) -> str:
        """The messages' JSON, comma-separated: a JSON array's inside."""
        return ",".join(self.jsons)


@frozen
class ChatRequest:
    """One Chat Completions call, independent of the wire format."""

    model: str
    messages: Sequence[ChatMessage]
    temperature: float | None = None
    max_tokens: int | None = None


@frozen
class Completion:
    """What an upstream produced for one L{ChatRequest}."""

    text: str
    model: str
    finish_reason: str | None
    usage: Usage | None
    #: how many retries it took before the answer started
    retries: int = 0
    #: the upstream's HTTP status, for logs
    status: int | None = None


class Upstream(Protocol):
    """
    Something that answers chat requests: the treq client or the offline
    model.
    """

    def stream_chat(
        self, request: ChatRequest, on_piece: Callable[[str], None]
    ) -> "Deferred[Completion]":
        """
        Stream the answer: call C{on_piece} on the reactor thread with each
        non-empty piece of text as it arrives, then fire with the
        L{Completion}.  Fails with an L{easybackend.errors.UpstreamError}
        subclass.  Cancelling the Deferred closes the upstream connection
        at once.
        """


# --- what the store keeps ---------------------------------------------------


@frozen
class Conversation:
    """A conversation's row: its settings and its current leaf."""

    id: str
    title: str
    system_prompt: str | None
    model: str | None
    created: float
    updated: float
    leaf_id: str | None
    #: the key name that owns it (None when the server runs without keys)
    owner: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "system_prompt": self.system_prompt,
            "model": self.model,
            "created": self.created,
            "updated": self.updated,
            "current_message_id": self.leaf_id,
        }


@frozen
class Message:
    """One stored message, a node of the conversation's tree."""

    id: str
    conversation_id: str
    parent_id: str | None
    role: str
    content: str
    tokens: int
    created: float
    model: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent_id": self.parent_id,
            "role": self.role,
            "content": self.content,
            "tokens": self.tokens,
            "created": self.created,
            "model": self.model,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict() if self.usage else None,
        }


@frozen
class TurnContext:
    """
    What a new turn continues, read in one transaction: the conversation
    (C{None}: not created yet), the message the turn continues from
    (C{None}: the start) and the branch down to it, root first, as history
    (C{None} when the caller said it has that branch already) with the
    stored messages' ids.
    """

    conversation: Conversation | None
    leaf: str | None
    history: "History | None"
    ids: list[str] = field(factory=list)


@frozen
class Turn:
    """
    A finished turn, ready to be committed in one transaction: the prompt,
    the answer, and, for a conversation that does not exist yet, its
    settings.
    """

    conversation_id: str
    parent_id: str | None
    prompt: str
    prompt_tokens: int
    answer: str
    answer_tokens: int
    model: str
    finish_reason: str | None
    usage: Usage | None
    #: settings of a conversation this turn creates
    system_prompt: str | None = None
    owner: str | None = None
    #: the turn continues the conversation's current leaf (no explicit
    #: C{parent_id}): the commit checks the leaf is still C{parent_id}
    continues_leaf: bool = False


@frozen
class ConversationView:
    """A conversation with the messages of its current branch, root first."""

    conversation: Conversation
    messages: Sequence[Message]

    def to_dict(self) -> dict[str, Any]:
        d = self.conversation.to_dict()
        d["messages"] = [m.to_dict() for m in self.messages]
        return d
