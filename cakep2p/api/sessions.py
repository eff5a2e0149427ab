"""Generation sessions for the HTTP API: a first-come queue capped at `max_sessions`, one worker thread per request.

At most `max_waiting` requests (default WAITING_PER_SESSION x max_sessions) wait for a session; more are refused
with SessionsFull (the API answers 429) rather than each holding a thread.

Each request runs in its own pipeline (its own KV cache on every stage); its text reaches the event loop
through an asyncio queue, cut at the first stop string.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from typing import Any, AsyncIterator

from cakep2p.api.requests import GenerationRequest
from cakep2p.cluster import LoadedModel
from cakep2p.engine.conversation import Reply, stream_completion

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}
WAITING_PER_SESSION = 4


class SessionsFull(Exception):
    """Too many requests are already waiting for a session; the client should retry later."""


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that may be the start of one.

    Linear in the text: each stop string keeps a Knuth-Morris-Pratt state (how much of it the text ends with), so a
    long stop string costs its length once, not once per token.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._failures = [_failure_table(stop) for stop in stops]
        self._matched = [0] * len(stops)  # per stop: the length of its longest prefix the text so far ends with
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached (the text before it is returned)."""
        start = len(self.pending)
        self.pending += text
        for offset, char in enumerate(text, start):
            for index, stop in enumerate(self.stops):
                matched = _advance(stop, self._failures[index], self._matched[index], char)
                if matched == len(stop):
                    emitted, self.pending = self.pending[:offset + 1 - len(stop)], ""
                    self._matched = [0] * len(self.stops)
                    return emitted, True
                self._matched[index] = matched
        cut = len(self.pending) - max(self._matched, default=0)
        emitted, self.pending = self.pending[:cut], self.pending[cut:]
        return emitted, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        self._matched = [0] * len(self.stops)
        return text


def _failure_table(pattern: str) -> list[int]:
    """failure[i]: the length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    failure, length = [0] * len(pattern), 0
    for index in range(1, len(pattern)):
        while length and pattern[index] != pattern[length]:
            length = failure[length - 1]
        if pattern[index] == pattern[length]:
            length += 1
        failure[index] = length
    return failure


def _advance(pattern: str, failure: list[int], matched: int, char: str) -> int:
    while matched and char != pattern[matched]:
        matched = failure[matched - 1]
    return matched + 1 if char == pattern[matched] else 0


def openai_finish_reason(reply: Reply) -> str:
    """OpenAI's finish_reason for a reply: 'stop' (a stop token or string, or cancelled) or 'length'."""
    return FINISH_REASONS.get(reply.finish_reason or "stop", "stop")


def usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


class Sessions:
    """At most `limit` generations at once, each in its own pipeline; the others wait first come, first served."""

    def __init__(self, model: LoadedModel, limit: int, max_waiting: int | None = None):
        if limit < 1:
            raise ValueError(f"max_sessions must be >= 1, got {limit}")
        self.model = model
        self.limit = limit
        self.max_waiting = WAITING_PER_SESSION * limit if max_waiting is None else max_waiting
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        self.open = 0  # sessions holding a pipeline now
        self._admitted = 0  # started generations that have not got a pipeline (or given up) yet
        self.finished: collections.Counter[str] = collections.Counter()  # 'stop' | 'length' | 'cancelled' | 'error'
        self._queue: collections.deque[Generation] = collections.deque()
        self._running: set[Generation] = set()
        self._condition = threading.Condition()

    def snapshot(self) -> dict:
        with self._condition:
            cancelling = sum(generation.cancelled.is_set() for generation in self._running)
            return {"open": self.open, "waiting": len(self._queue), "cancelling": cancelling, "max": self.limit,
                    "finished": dict(self.finished)}

    def admit(self) -> None:
        """Count a new generation in (SessionsFull when there is no room); it leaves the count in acquire()."""
        with self._condition:
            self._check_room()
            self._admitted += 1

    def _check_room(self) -> None:
        if self.open + self._admitted >= self.limit + self.max_waiting:
            raise SessionsFull(f"{self.limit} sessions are busy and {self.max_waiting} requests already wait "
                               "for one: retry later")

    def acquire(self, generation: "Generation") -> bool:
        """Block until the generation may open a pipeline; False when it was cancelled while waiting."""
        with self._condition:
            self._queue.append(generation)
            try:
                while not generation.cancelled.is_set() and (
                    self.open >= self.limit or self._queue[0] is not generation
                ):
                    self._condition.wait()
                if generation.cancelled.is_set():
                    self.finished["cancelled"] += 1
                    return False
                self.open += 1
                self._running.add(generation)
                return True
            finally:
                self._queue.remove(generation)
                self._admitted -= 1
                self._condition.notify_all()

    def release(self, generation: "Generation", finish: str) -> None:
        with self._condition:
            self.open -= 1
            self._running.discard(generation)
            self.finished[finish] += 1
            self._condition.notify_all()

    def wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def cancel_all(self) -> None:
        with self._condition:
            everyone = list(self._queue) + list(self._running)
        for generation in everyone:
            generation.cancel()


class Generation:
    """One request's tokens, produced in a worker thread and handed to the event loop through a queue."""

    def __init__(self, sessions: Sessions, request: GenerationRequest):
        self.sessions = sessions
        self.request = request
        self.cancelled = threading.Event()
        self.outcome: Reply | None = None
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._thread = threading.Thread(target=self._work, name="cakep2p-api-generation", daemon=True)

    def start(self) -> "Generation":
        """Queue for a session and generate in the worker thread; SessionsFull when too many already wait."""
        self.sessions.admit()
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop within one token (or leave the queue); the pipeline is closed by the worker."""
        self.cancelled.set()
        self.sessions.wake()

    async def texts(self) -> AsyncIterator[str]:
        """The reply's text pieces as they come; `outcome` is set when this ends."""
        while True:
            kind, value = await self._events.get()
            if kind == "text":
                yield value
            elif kind == "end":
                self.outcome = value
                return
            else:
                raise value

    def _emit(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    def _work(self) -> None:
        request, model = self.request, self.sessions.model
        reply = Reply(prompt_ids=list(request.prompt_ids))
        if not self.sessions.acquire(self):
            reply.finish_reason = "cancelled"
            self._emit("end", reply)
            return
        finish = "error"
        pipeline = None
        try:
            pipeline = model.new_pipeline()
            matcher = StopMatcher(request.stops)
            events = stream_completion(pipeline, model.tokenizer, request.prompt_ids, request.params, reply,
                                       cancel=self.cancelled, trim_start=not request.continues_prompt)
            try:
                for event in events:
                    text, stopped = matcher.push(event.text)
                    if text:
                        self._emit("text", text)
                    if stopped:
                        finish = reply.finish_reason = "stop"
                        break
                else:
                    finish = reply.finish_reason or "cancelled"
                    tail = matcher.flush()
                    if tail:
                        self._emit("text", tail)
            finally:
                events.close()
        except Exception as error:  # reported to the client; the session is still freed below
            log.warning("generation failed: %s", error)
            self._emit("error", error)
        finally:
            if pipeline is not None:
                try:
                    pipeline.close()
                except Exception as error:
                    log.warning("closing a session's pipeline failed: %s", error)
            self.sessions.release(self, finish)
        if finish != "error":
            reply.finish_reason = reply.finish_reason or "cancelled"
            self._emit("end", reply)

