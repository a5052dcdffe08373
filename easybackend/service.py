"""
The conversation service: the one core that every transport shares.

It knows nothing of HTTP, WebSocket or gRPC.  A transport turns its
protocol into calls on L{ConversationService} and turns the results and
L{easybackend.errors.EasyBackendError}s back into its own form.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred

from easybackend.model import Answer, AskRequest, Conversation, ConversationView


class ConversationService:
    """
    Answers asks with server-side memory.

    All methods are called on the reactor thread and return Deferreds that
    fire on the reactor thread.
    """

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
        raise NotImplementedError

    def list_conversations(
        self, limit: int = 20, offset: int = 0
    ) -> "Deferred[list[Conversation]]":
        """The conversations, most recently updated first."""
        raise NotImplementedError

    def get_conversation(self, conversation_id: str) -> "Deferred[ConversationView]":
        """The conversation and its current branch; L{NotFound} if unknown."""
        raise NotImplementedError

    def delete_conversation(self, conversation_id: str) -> "Deferred[None]":
        """Delete the conversation and all its messages; L{NotFound} if unknown."""
        raise NotImplementedError

    def rollback(self, conversation_id: str, turns: int) -> "Deferred[ConversationView]":
        """
        Move the current leaf back by C{turns} turns, deleting nothing;
        L{NotFound} if unknown, L{BadRequest} if C{turns} < 1.
        """
        raise NotImplementedError
