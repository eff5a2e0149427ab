"""Batched decode across the sessions of one model: single-token steps that are ready at the same time run as one
forward (each matrix read once for all of them), attention still per session over its own cache at its own position.

One compute thread per Batcher runs every forward of its sessions (torch's OpenMP workers stay with one caller
thread: a forward from another thread would leave the last one's workers spinning on the cores). Continuous batching:
before each batch it waits (at most GATHER_S) for the sessions of the previous batch to come back with their next
token, then runs every step queued by then; sessions join and leave between steps. A lone session never waits:
nobody else is expected, and a batch of one is the plain forward. Prompts (more than one token) run alone, before the
next batch. Row b of a batch has the bits of session b's step alone (ModelPart.decode_batch), so greedy output is
unchanged. The thread starts with the first forward and ends when no session is open.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cakep2p.engine.generate import LocalPipeline
from cakep2p.engine.model import ModelPart

GATHER_S = 0.01   # longest a batch waits for last step's sessions: they sample and stream between steps (~1 ms)


@dataclass(eq=False)
class _Job:
    """A queued forward: one session's decode step (`pipeline`, `token_id`, `position`) or a prompt (`run`)."""

    pipeline: "BatchedPipeline"
    token_id: int = 0
    position: int = 0
    run: Callable[[], Any] | None = None
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class Batcher:
    """Runs the forwards of every pipeline made with it on one thread, batching their single-token steps."""

    def __init__(self, parts: list[ModelPart], gather_s: float = GATHER_S) -> None:
        self.parts = list(parts)
        self.gather_s = gather_s
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batches run so far, by size (tests)
        self.gathers_timed_out = 0           # batches that left without a session of the last one (it was late)
        self._condition = threading.Condition()
        self._prompts: collections.deque[_Job] = collections.deque()
        self._steps: list[_Job] = []
        self._expected: set[BatchedPipeline] = set()   # sessions of the last batch: their next step is coming
        self._open = 0                                 # sessions not closed yet
        self._thread: threading.Thread | None = None
        self._closing = False

    def pipeline(self, max_seq_len: int) -> "BatchedPipeline":
        """A new session (its own caches) whose forwards go through this batcher."""
        pipeline = BatchedPipeline(self, max_seq_len)
        with self._condition:
            self._open += 1
        return pipeline

    def step(self, pipeline: "BatchedPipeline", token_id: int, position: int) -> torch.Tensor:
        """float32 logits [vocab] of `token_id` at `position` in the pipeline's session, batched with others'."""
        return self._submit(_Job(pipeline, token_id, position), self._steps)

    def alone(self, pipeline: "BatchedPipeline", forward: Callable[[], Any]) -> Any:
        """Run `forward` (the pipeline's prompt, or a verify pass) with nothing else computing, before the next
        batch; that batch does not wait for this session's step."""
        with self._condition:
            self._expected.discard(pipeline)
        return self._submit(_Job(pipeline, run=forward), self._prompts)

    def leave(self, pipeline: "BatchedPipeline") -> None:
        """The session is closed: the next batch no longer waits for it (the thread ends with the last one)."""
        with self._condition:
            self._expected.discard(pipeline)
            self._open -= 1
            self._condition.notify_all()

    def close(self) -> None:
        """End the compute thread once its queued work is done (before the process exits: torch's thread pools
        abort a process that ends under a running thread); later forwards start a new one."""
        with self._condition:
            self._closing, thread = True, self._thread
            self._condition.notify_all()
        if thread is not None:
            thread.join()
        with self._condition:
            self._closing = False

    def _submit(self, job: _Job, queue: list[_Job] | collections.deque[_Job]) -> Any:
        with self._condition:
            queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="cakep2p-batcher", daemon=True)
                self._thread.start()
            self._condition.notify_all()
            while not job.done:
                self._condition.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _serve(self) -> None:
        """The compute thread: a prompt, else a batch of steps, until no session is open and nothing is queued."""
        while True:
            with self._condition:
                work = self._next_work()
                if work is None:
                    self._thread = None
                    return
            batch = work if isinstance(work, list) else [work]
            try:
                results = [work.run()] if isinstance(work, _Job) else self._forward(batch)
                for job, result in zip(batch, results):
                    job.result = result
            except Exception as error:   # every session of the batch gets the error
                for job in batch:
                    job.error = error
            with self._condition:
                for job in batch:
                    job.done = True
                if isinstance(work, list):
                    self.batch_sizes[len(batch)] += 1
                    self._expected = {job.pipeline for job in batch if job.error is None and job.pipeline.caches}
                self._condition.notify_all()

    def _next_work(self) -> _Job | list[_Job] | None:
        """The next prompt, or the queued steps once every session of the last batch is back or GATHER_S has
        passed; None when the thread may end (lock held)."""
        deadline = None
        while True:
            if self._prompts:
                return self._prompts.popleft()
            if self._steps:
                deadline = deadline or time.monotonic() + self.gather_s
                remaining = deadline - time.monotonic()
                if not self._expected - {job.pipeline for job in self._steps}:
                    break
                if remaining <= 0:
                    self.gathers_timed_out += 1
                    break
                self._condition.wait(remaining)
            elif self._open <= 0 or self._closing:
                return None
            else:
                self._condition.wait()
        batch, self._steps = self._steps, []
        return batch

    def _forward(self, batch: list[_Job]) -> list[torch.Tensor]:
        if len(batch) == 1:   # today's path, exactly
            job = batch[0]
            return [LocalPipeline.forward(job.pipeline, [job.token_id], job.position)]
        x = torch.tensor([job.token_id for job in batch], dtype=torch.long)
        positions = [job.position for job in batch]
        for index, part in enumerate(self.parts):
            x = part.decode_batch(x, positions, [job.pipeline.caches[index] for job in batch])
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
        if self.caches:
            super().close()
            self.batcher.leave(self)

    def forward_all(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        if len(token_ids) == 1:   # a verify pass without drafts is a plain step: [1, vocab], the same bits
            return self.forward(token_ids, start_pos).unsqueeze(0)
        return self.batcher.alone(self, lambda: super(BatchedPipeline, self).forward_all(token_ids, start_pos))
