"""Raw completion for models without a chat template: each message is a prompt the model continues.

Same surface as `cakep2p.conversation.Conversation` (ask / regenerate / reset / context_used), so the
window drives either one.
"""

from __future__ import annotations

import threading
from typing import Iterator

from cakep2p.conversation import ContextFull, Reply, TokenEvent, stream_completion
from cakep2p.engine.generate import Pipeline
from cakep2p.engine.sampling import SamplingParams
from cakep2p.engine.tokenizer import Tokenizer
from cakep2p.errors import CakeError


class CompletionSession:
    """Continues each user message on its own (no template, no earlier turns); the KV prefix is reused."""

    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer, system_prompt: str | None = None):
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt  # unused: a raw completion has no roles
        self.messages: list[dict[str, str]] = []
        self._cached_ids: list[int] = []
        self._last_used = 0
        self._lock = threading.Lock()

    @property
    def max_context(self) -> int:
        return self.pipeline.max_seq_len

    def context_used(self) -> int:
        return self._last_used

    def ask(self, text: str, params: SamplingParams, reply: Reply,
            cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        self.messages.append({"role": "user", "content": text})
        return self._answer(text, params, reply, cancel, drop_question_if_full=True)

    def regenerate(self, params: SamplingParams, reply: Reply,
                   cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise CakeError("nothing to regenerate: the chat has no message yet")
        return self._answer(self.messages[-1]["content"], params, reply, cancel)

    def reset(self) -> None:
        self.messages.clear()
        self._cached_ids = []
        self._last_used = 0

    def _answer(self, text: str, params: SamplingParams, reply: Reply, cancel: threading.Event | None,
                drop_question_if_full: bool = False) -> Iterator[TokenEvent]:
        with self._lock:
            prompt_ids = self.tokenizer.encode(text, add_special_tokens=True)
            try:
                yield from stream_completion(self.pipeline, self.tokenizer, prompt_ids, params, reply,
                                             cached_ids=self._cached_ids, cancel=cancel)
            except ContextFull:
                if drop_question_if_full:
                    self.messages.pop()
                raise
            finally:
                self._cached_ids = prompt_ids + reply.token_ids[:-1] if reply.stats else []
            self._last_used = len(prompt_ids) + len(reply.token_ids)
            self.messages.append({"role": "assistant", "content": reply.text})
