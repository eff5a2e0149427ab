"""The engine side of the window's chat: the loaded model's Conversation, handed the transcript's history each turn.

The window's Transcript is the one record of the chat; the Conversation keeps no history of its own between
turns that anyone relies on: before each answer its messages are set to what the transcript holds, so the KV
cache is reused as far as the prompt still starts the same. Everything here runs on the bridge's model thread,
except `begin` and `stop`, which the UI thread calls.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from cakep2p.errors import CakeError
from cakep2p.gui.state import ReplyOutcome

if TYPE_CHECKING:
    from cakep2p.engine.conversation import Conversation, Reply, TokenEvent

log = logging.getLogger(__name__)


class ReplyEvents(Protocol):
    """Where a streamed reply goes (the bridge's signals' emit functions): text as it comes, then one ending."""

    started: Callable[[], None]
    token: Callable[[str], None]
    finished: Callable[[ReplyOutcome], None]
    failed: Callable[[str], None]
    context_full: Callable[[str, str], None]    # why, the question that did not fit


class ChatSession:
    """The Conversation over the loaded model (None without a model), the reply in flight and its Stop."""

    def __init__(self) -> None:
        self.conversation: Conversation | None = None
        self._cancel = threading.Event()
        self._reply: Reply | None = None
        self._tokens_at_stop: int | None = None

    # On the model thread ---------------------------------------------------------------------------
    def open(self, model: Any, raw: bool) -> None:
        """A conversation over a fresh pipeline of `model` (its own KV cache, its own remote sessions), chat or
        raw completion; the old one is closed once the new one exists."""
        from cakep2p.engine.conversation import Conversation

        old, self.conversation = self.conversation, Conversation(model.new_pipeline(), model.tokenizer, raw=raw)
        _close(old)

    def close(self) -> None:
        old, self.conversation = self.conversation, None
        _close(old)

    def set_history(self, history: Sequence[dict[str, str]]) -> tuple[int, int] | None:
        """Another chat is on screen (a stored one, or a new one): start over with its messages. Returns the
        context it takes and the context's size, or None without a model."""
        conversation = self.conversation
        if conversation is None:
            return None
        conversation.reset()
        conversation.messages = [dict(message) for message in history]
        return conversation.context_used(), conversation.max_context

    def answer(self, history: Sequence[dict[str, str]], params: Any, system_prompt: str | None, reply: Reply,
               cancel: threading.Event) -> Iterator[TokenEvent]:
        """The answer to the last message of `history` (a user message), streamed into `reply`."""
        conversation = self.conversation
        if conversation is None:
            raise CakeError("no model is loaded: choose a model folder and press Load")
        if not history or history[-1]["role"] != "user":
            raise CakeError("nothing to answer: the chat has no question at its end")
        conversation.system_prompt = system_prompt or None
        conversation.messages = [dict(message) for message in history[:-1]]
        return conversation.ask(history[-1]["content"], params, reply, cancel)

    def run(self, history: Sequence[dict[str, str]], params: Any, system_prompt: str | None, reply: Reply,
            cancel: threading.Event, events: ReplyEvents) -> bool:
        """Stream the answer to `history` into `events`; True when it ended as a reply (finished, not failed)."""
        from cakep2p.engine.conversation import ContextFull

        try:
            tokens = self.answer(history, params, system_prompt, reply, cancel)
            events.started()
            for event in tokens:
                if event.text:
                    events.token(event.text)
            events.finished(self.outcome(reply))
            return True
        except ContextFull as error:
            events.context_full(str(error), history[-1]["content"])
        except CakeError as error:
            events.failed(str(error))
        except Exception as error:  # the window shows it; it never takes the app down
            log.exception("generation failed")
            events.failed(f"generation failed: {error}")
        finally:
            self.finished(reply)
        return False

    def outcome(self, reply: Reply) -> ReplyOutcome:
        """How `reply` ended, with the chat's context use after it."""
        conversation = self.conversation
        after_stop = None if self._tokens_at_stop is None else len(reply.token_ids) - self._tokens_at_stop
        used, maximum = (conversation.context_used(), conversation.max_context) if conversation else (0, 0)
        return ReplyOutcome(reply, used, maximum, after_stop)

    def finished(self, reply: Reply) -> None:
        if self._reply is reply:
            self._reply = None

    # On the UI thread --------------------------------------------------------------------------------
    def begin(self) -> tuple[Reply, threading.Event]:
        """A new reply and the event that stops it."""
        from cakep2p.engine.conversation import Reply

        self._cancel = threading.Event()
        self._tokens_at_stop = None
        self._reply = Reply()
        return self._reply, self._cancel

    def stop(self) -> None:
        """End the streaming answer within one token."""
        reply = self._reply
        if reply is not None and not self._cancel.is_set():
            self._tokens_at_stop = len(reply.token_ids)
            self._cancel.set()

    def cancel(self) -> None:
        """Stop whatever runs, for good (the window closes)."""
        self._cancel.set()


def _close(conversation: Conversation | None) -> None:
    if conversation is None:
        return
    try:
        conversation.pipeline.close()
    except Exception:  # a lost peer cannot be told; the session is gone either way
        log.debug("closing the chat pipeline failed", exc_info=True)
