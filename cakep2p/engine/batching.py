"""Batched decode across the sessions of one model: single-token steps that are ready at the same time run as one
forward (each matrix read once for all of them), attention still per session over its own cache at its own position.

Continuous batching by group commit, with no stepping thread: a session that asks for a step while no forward runs
becomes the leader; it waits (at most GATHER_S) for the sessions of the previous batch to come back with their next
token, then runs every step queued by then, hands out the rows, and whoever is still queued leads the next one.
Sessions join and leave between steps. A lone session never waits: nobody else is expected, and a batch of one is the
plain forward. Prompts (more than one token) run alone, before the next batch, so forwards never compete for the
cores.
Row b of a batch has the bits of session b's step alone (ModelPart.decode_batch), so greedy output is unchanged.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from cakep2p.engine.generate import LocalPipeline
from cakep2p.engine.model import ModelPart

GATHER_S = 0.01   # longest a leader waits for last step's sessions: they sample and stream between steps (~1 ms)
Result = TypeVar("Result")


@dataclass(eq=False)
class _Step:
    """One session's queued decode step, and its logits (or error) once a batch has run it."""

    pipeline: "BatchedPipeline"
    token_id: int
    position: int
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class Batcher:
    """Runs the forwards of every pipeline made with it, one at a time, batching their single-token steps."""

    def __init__(self, parts: list[ModelPart], gather_s: float = GATHER_S) -> None:
        self.parts = list(parts)
        self.gather_s = gather_s
        self.batch_sizes: list[int] = []     # every batch run so far, for tests and benchmarks
        self.gathers_timed_out = 0           # batches that left without a session of the last one (it was late)
        self._condition = threading.Condition()
        self._queue: list[_Step] = []
        self._busy = False                   # a forward (a batch or a prompt) is running
        self._prompts_waiting = 0            # prompts go before the next batch (no prompt waits behind steps)
        self._expected: set[BatchedPipeline] = set()   # sessions of the last batch: their next step is coming

    def pipeline(self, max_seq_len: int) -> "BatchedPipeline":
        """A new session (its own caches) whose forwards go through this batcher."""
        return BatchedPipeline(self, max_seq_len)

    def step(self, pipeline: "BatchedPipeline", token_id: int, position: int) -> torch.Tensor:
        """float32 logits [vocab] of `token_id` at `position` in the pipeline's session, batched with others'."""
        step = _Step(pipeline, token_id, position)
        with self._condition:
            self._queue.append(step)
            self._condition.notify_all()   # a gathering leader may be waiting for this session
            while not step.done and (self._busy or self._prompts_waiting):
                self._condition.wait()
            if not step.done:
                self._busy = True
                batch = self._gather()
        if not step.done:
            self._run(batch)
        if step.error is not None:
            raise step.error
        return step.logits

    def alone(self, pipeline: "BatchedPipeline", forward: Callable[[], Result]) -> Result:
        """Run `forward` (the pipeline's prompt, or a verify pass) with nothing else computing, as soon as the
        running forward ends; the next batch does not wait for this session's step."""
        with self._condition:
            self._expected.discard(pipeline)
            self._condition.notify_all()   # a gathering leader may be waiting for this session
            self._prompts_waiting += 1
            try:
                while self._busy:
                    self._condition.wait()
            finally:
                self._prompts_waiting -= 1
            self._busy = True
        try:
            return forward()
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()

    def leave(self, pipeline: "BatchedPipeline") -> None:
        """The session is closed: the next batch no longer waits for it."""
        with self._condition:
            self._expected.discard(pipeline)
            self._condition.notify_all()

    def _gather(self) -> list[_Step]:
        """The queued steps, once every session of the last batch is back or GATHER_S has passed (lock held)."""
        deadline = time.monotonic() + self.gather_s
        while self._expected - {step.pipeline for step in self._queue}:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._condition.wait(remaining):
                self.gathers_timed_out += 1
                break
        batch, self._queue = self._queue, []
        return batch

    def _run(self, batch: list[_Step]) -> None:
        try:
            rows = self._forward(batch)
            for step, row in zip(batch, rows):
                step.logits = row
        except BaseException as error:   # every session of the batch gets the error, the leader's caller too
            for step in batch:
                step.error = error
        with self._condition:
            for step in batch:
                step.done = True
            self.batch_sizes.append(len(batch))
            self._expected = {step.pipeline for step in batch if step.error is None and step.pipeline.caches}
            self._busy = False
            self._condition.notify_all()

    def _forward(self, batch: list[_Step]) -> list[torch.Tensor]:
        if len(batch) == 1:   # today's path, exactly
            step = batch[0]
            return [LocalPipeline.forward(step.pipeline, [step.token_id], step.position)]
        x = torch.tensor([step.token_id for step in batch], dtype=torch.long)
        positions = [step.position for step in batch]
        for index, part in enumerate(self.parts):
            x = part.decode_batch(x, positions, [step.pipeline.caches[index] for step in batch])
        return list(x.float())


class BatchedPipeline(LocalPipeline):
    """A LocalPipeline (its own KV caches) whose single-token steps may share a forward with other sessions'."""

    def __init__(self, batcher: Batcher, max_seq_len: int) -> None:
        super().__init__(batcher.parts, max_seq_len)
        self.batcher = batcher

    def forward(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        if len(token_ids) != 1 or not self.caches or not 0 <= start_pos < self.max_seq_len:
            return self.batcher.alone(self, lambda: super(BatchedPipeline, self).forward(token_ids, start_pos))
        return self.batcher.step(self, token_ids[0], start_pos)

    def close(self) -> None:
        super().close()
        self.batcher.leave(self)

    def forward_all(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        if len(token_ids) == 1:   # a verify pass without drafts is a plain step: [1, vocab], the same bits
            return self.forward(token_ids, start_pos).unsqueeze(0)
        return self.batcher.alone(self, lambda: super(BatchedPipeline, self).forward_all(token_ids, start_pos))
