"""A chat over one pipeline: messages, prompt rendering, KV-prefix reuse across turns, streamed replies.

Shared by the terminal chat, the window and the HTTP API; it knows nothing of where the
pipeline's layers run. Only text is kept between turns; the KV cache is reused as long as the
new prompt starts with what the pipeline already holds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal

from cakep2p.engine.generate import Pipeline, generate
from cakep2p.engine.sampling import SamplingParams
from cakep2p.engine.tokenizer import Tokenizer
from cakep2p.errors import CakeError

FinishReason = Literal["stop", "length", "cancelled"]
ANSWER_SHARE_OF_CONTEXT = 4   # an answer's default length: a quarter of the context, so a chat has room for turns


class ContextFull(CakeError):
    """The conversation no longer fits the context: start a new chat or drop old messages."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it completes (may be empty while a character is split)."""

    token_id: int
    text: str


@dataclass
class Reply:
    """One generation, filled in while it streams (the one result record: CLI, API and window read it).

    `finish_reason` is None until it ends: "stop" (a stop token or string), "length" (max tokens or the end of
    the context, see `context_full`) or "cancelled".
    """

    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0         # from the request to the first new token, prefill included
    tokens_per_s: float = 0.0   # decode rate after the first token: (n - 1) / (t_last - t_first)
    finish_reason: FinishReason | None = None
    reused_prefix: int = 0      # prompt tokens whose keys and values were already cached
    context_full: bool = False  # it stopped because the context had no room left

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def summary(self, where: str = "") -> str:
        """`48 tokens · first token 120 ms · 31.2 tok/s`, then `where` it ran ("3 nodes") if given, then how it ended
        when that was not a stop."""
        text = f"{self.completion_tokens} tokens · first token {self.ttft_s * 1000:.0f} ms · {self.tokens_per_s:.1f} tok/s"
        if where:
            text += f" · {where}"
        if self.context_full:
            return text + " · stopped at the end of the context"
        return text + {"length": " · hit the token limit", "cancelled": " · stopped"}.get(self.finish_reason or "", "")


def _common_prefix(cached: list[int], prompt: list[int]) -> int:
    length = 0
    for cached_id, prompt_id in zip(cached, prompt):
        if cached_id != prompt_id:
            break
        length += 1
    # At least one prompt token must run to produce the next token's logits.
    return min(length, len(prompt) - 1)


def stream_completion(
    pipeline: Pipeline,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    reply: Reply,
    *,
    cached_ids: list[int] | None = None,
    cancel: threading.Event | None = None,
    trim_start: bool = False,
) -> Iterator[TokenEvent]:
    """Generate after `prompt_ids`, filling `reply` with the ids and text the events carry.

    The text is decoded after the prompt, so it continues the prompt exactly (a first word keeps its
    leading space); with `trim_start`, whitespace before the first visible character is dropped, as a
    chat answer starts with its first word. Stops at the tokenizer's eos ids (plus
    `params.stop_token_ids`), at `params.max_new_tokens`, or within one token of `cancel` being set.
    """
    if len(prompt_ids) + 1 > pipeline.max_seq_len:
        raise ContextFull(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {pipeline.max_seq_len}: "
            "start a new chat or remove earlier messages"
        )
    room = pipeline.max_seq_len - len(prompt_ids)
    limited = replace(params, stop_token_ids=frozenset(params.stop_token_ids) | tokenizer.eos_ids,
                      max_new_tokens=min(params.max_new_tokens, room))
    start_pos = _common_prefix(cached_ids or [], prompt_ids)
    reply.prompt_ids, reply.reused_prefix = list(prompt_ids), start_pos
    decoder = tokenizer.stream_decoder(prompt_ids)
    clock = _Clock()
    finish: FinishReason = "length"
    for token_id in generate(pipeline, prompt_ids, limited, start_pos=start_pos):
        clock.tick(first=not reply.token_ids)
        reply.token_ids.append(token_id)
        if token_id in limited.stop_token_ids:
            finish = "stop"
            break
        text = decoder.push(token_id)
        if trim_start and not reply.text:
            text = text.lstrip()
        reply.text += text
        yield TokenEvent(token_id, text)
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
    tail = decoder.flush()
    if trim_start and not reply.text:
        tail = tail.lstrip()
    if tail:
        reply.text += tail
        yield TokenEvent(-1, tail)
    reply.ttft_s, reply.tokens_per_s = clock.rates(len(reply.token_ids))
    reply.context_full = finish == "length" and room < params.max_new_tokens
    reply.finish_reason = finish


class _Clock:
    """When the request started, and when its first and latest tokens came."""

    def __init__(self) -> None:
        self.started = self.first_at = self.last_at = time.perf_counter()

    def tick(self, first: bool) -> None:
        self.last_at = time.perf_counter()
        if first:
            self.first_at = self.last_at

    def rates(self, generated: int) -> tuple[float, float]:
        """(time to first token, decode tokens/s after it)."""
        ttft = (self.first_at - self.started) if generated else 0.0
        decode = self.last_at - self.first_at
        return ttft, (generated - 1) / decode if generated > 1 and decode > 0 else 0.0


def default_max_new_tokens(max_context: int) -> int:
    """How long an answer may be when the user does not say: a quarter of the context (at least one token)."""
    return max(1, max_context // ANSWER_SHARE_OF_CONTEXT)


@dataclass(frozen=True)
class ConversationMode:
    """How a chat turns messages into the prompt; the window and `cakep2p chat` decide it the same way.

    template "model": the model's own chat template; "fallback": the plain `User: ... / Assistant:` template, for a
    model without one; both keep every turn. `raw`: no template at all: the chat is one text the model continues
    (each message goes on from the last answer, on a new line), for base models and for seeing the model as it is.
    """

    raw: bool
    template: Literal["model", "fallback", "none"]

    def describe(self) -> str:
        if self.raw:
            return "raw completion: the model continues your text as written, no chat template"
        if self.template == "model":
            return "chat with the model's chat template"
        return "chat with a plain User/Assistant template, as the model has none of its own"


def conversation_mode(tokenizer: Tokenizer, raw: bool = False) -> ConversationMode:
    """The mode of a chat with this model: its template when it has one, the fallback otherwise; `raw` only when
    asked for (never chosen for the user: a model without a template still chats)."""
    if raw:
        return ConversationMode(True, "none")
    return ConversationMode(False, "model" if tokenizer.has_chat_template else "fallback")


class Conversation:
    """Messages of one chat and the pipeline that answers them, in the mode conversation_mode(tokenizer, raw) gives.

    In raw mode the messages are one running text (no template, no system prompt) and an answer keeps its leading
    space: it continues the text exactly.
    """

    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer, system_prompt: str | None = None, *,
                 raw: bool = False):
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.mode = conversation_mode(tokenizer, raw)
        self.messages: list[dict[str, str]] = []
        self._cached_ids: list[int] = []
        self._lock = threading.Lock()

    @property
    def raw(self) -> bool:
        return self.mode.raw

    def set_raw(self, raw: bool) -> None:
        """Switch between chat and raw completion; a switch starts a new chat (the two read the history apart)."""
        if raw != self.mode.raw:
            with self._lock:
                self.mode = conversation_mode(self.tokenizer, raw)
                self.reset()

    @property
    def max_context(self) -> int:
        return self.pipeline.max_seq_len

    def default_max_new_tokens(self) -> int:
        return default_max_new_tokens(self.max_context)

    def prompt_ids(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the rendered chat (system prompt first), ready for the assistant's turn."""
        full = list(self.messages if messages is None else messages)
        if self.raw:
            return self.tokenizer.encode(raw_text(full))
        if self.system_prompt:
            full.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(full, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def context_used(self) -> int:
        """Tokens the conversation takes now: the prompt of the whole chat."""
        return len(self.prompt_ids()) if self.messages else 0

    def ask(
        self, text: str, params: SamplingParams, reply: Reply, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Add a user message and stream the assistant's answer into `reply`; the answer joins the history."""
        self.messages.append({"role": "user", "content": text})
        return self._answer(params, reply, cancel, drop_question_if_full=True)

    def regenerate(
        self, params: SamplingParams, reply: Reply, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Drop the last assistant answer and answer the last user message again."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise CakeError("nothing to regenerate: the chat has no user message yet")
        return self._answer(params, reply, cancel)

    def reset(self) -> None:
        """A new chat on the same pipeline (its cache is simply overwritten)."""
        self.messages.clear()
        self._cached_ids = []

    def _answer(
        self, params: SamplingParams, reply: Reply, cancel: threading.Event | None, drop_question_if_full: bool = False
    ) -> Iterator[TokenEvent]:
        with self._lock:
            prompt_ids = self.prompt_ids()
            try:
                yield from stream_completion(
                    self.pipeline, self.tokenizer, prompt_ids, params, reply,
                    cached_ids=self._cached_ids, cancel=cancel, trim_start=not self.raw,
                )
            except ContextFull:
                if drop_question_if_full:
                    self.messages.pop()
                raise
            finally:
                # The cache now holds the prompt and every generated token but the last one;
                # after an interrupted run nothing in it is trusted.
                self._cached_ids = prompt_ids + reply.token_ids[:-1] if reply.done else []
            self.messages.append({"role": "assistant", "content": reply.text})


def raw_text(messages: list[dict[str, str]]) -> str:
    """The text a raw-completion chat continues: every message in order, an answer right after what it continues,
    a new message on a new line."""
    text = ""
    for message in messages:
        if message["role"] == "user" and text and not text.endswith("\n"):
            text += "\n"
        text += message["content"]
    return text
