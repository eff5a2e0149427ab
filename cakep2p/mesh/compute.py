"""A stage's compute: one thread shared fairly between the owners that send it work, a forward pass cut into the
engine's prefill chunks, each its own turn on that thread, and the one-token steps of different sessions on one
part that wait for it at the same time run as one batched forward (DecodeBatches).

Round robin by owner: every owner with work waiting gets one job (a chunk of at most PREFILL_CHUNK positions, a
token, a load step) before any owner gets a second. A member looping long prefills delays another's token by one
chunk, not by its whole queue; and a long prefill's attention temporaries are those of one chunk.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import Executor
from typing import Callable

import torch

from cakep2p import wire
from cakep2p.engine.dtypes import name_of
from cakep2p.engine.generate import decode_each
from cakep2p.engine.model import PREFILL_CHUNK, ModelPart
from cakep2p.mesh.part_store import Refusal
from cakep2p.mesh.sessions import Owner, Session

Compute = Callable[..., "asyncio.Future"]  # compute(function, *args) -> its result, on the compute thread


class FairCompute:
    """Runs functions on one executor thread, taking the owners with work in turn (one job each per round)."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._queues: dict[Owner, collections.deque] = {}
        self._turns: collections.deque[Owner] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def run(self, owner: Owner, function: Callable, *args):
        """function(*args) on the compute thread when `owner`'s turn comes; returns its result."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        queue = self._queues.setdefault(owner, collections.deque())
        if not queue:
            self._turns.append(owner)
        queue.append((function, args, future))
        self._wake.set()
        return await future

    def for_owner(self, owner: Owner) -> Compute:
        return lambda function, *args: self.run(owner, function, *args)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for queue in self._queues.values():
            for _, _, future in queue:
                future.cancel()
        self._queues.clear()
        self._turns.clear()

    async def _work(self) -> None:
        while True:
            while not self._turns:
                self._wake.clear()
                await self._wake.wait()
            owner = self._turns.popleft()
            queue = self._queues[owner]
            job = queue.popleft()
            if queue:
                self._turns.append(owner)   # back of the line: everyone else waiting goes first
            else:
                del self._queues[owner]
            await self._run_job(*job)
            del job   # nothing of a finished job (a session's cache among its arguments) may stay alive here

    async def _run_job(self, function: Callable, args: tuple, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        except Exception as error:
            if not future.cancelled():
                future.set_exception(error)
        else:
            if not future.cancelled():
                future.set_result(result)


class DecodeBatches:
    """Continuous batching on a stage: the one-token steps of different sessions on one part that are waiting for
    the compute thread when one of them gets its turn run as one `decode_batch` (each row with the bits it gets
    alone, tests/test_batching.py); a session that arrives while a batch computes joins the next. A step alone
    runs the plain forward, as before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()   # the waiting rows are taken on the compute thread
        self._waiting: dict[int, list[tuple[Session, torch.Tensor, int, asyncio.Future]]] = {}
        self.batch_sizes: collections.Counter[int] = collections.Counter()   # batches run so far, by size

    async def step(self, compute: Compute, model: ModelPart, session: Session, inputs: torch.Tensor,
                   start_pos: int) -> torch.Tensor:
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            rows = self._waiting.setdefault(id(model), [])
            rows.append((session, inputs, start_pos, future))
            leads = len(rows) == 1   # the first to wait asks for the turn; whoever joins before it comes rides
        if leads:
            try:
                ran, outputs = await compute(self._run_waiting, model)
            except BaseException as error:
                with self._lock:
                    orphans = self._waiting.pop(id(model), [])
                for *_, waiting in orphans:
                    if not waiting.done():
                        waiting.set_exception(error if isinstance(error, Exception) else asyncio.CancelledError())
                raise
            for (*_, waiting), output in zip(ran, outputs):
                if waiting.done():
                    continue
                if isinstance(output, Exception):
                    waiting.set_exception(output)
                else:
                    waiting.set_result(output)
        return await future

    def _run_waiting(self, model: ModelPart) -> tuple[list, list]:
        """On the compute thread: every row waiting for `model` now, as one forward; (rows, outputs or the error)."""
        with self._lock:
            rows = self._waiting.pop(id(model), [])
        if not rows:
            return [], []
        self.batch_sizes[len(rows)] += 1
        try:
            if len(rows) == 1:
                session, inputs, start_pos, _ = rows[0]
                return rows, [model(inputs, start_pos, session.cache, last_only=model.layers.has_head)]
            batched = model.decode_batch(torch.cat([inputs for _, inputs, _, _ in rows]),
                                         [start_pos for _, _, start_pos, _ in rows],
                                         [session.cache for session, _, _, _ in rows])
            return rows, list(batched.split(1))
        except Exception as error:   # noqa: BLE001  (each waiting request gets the error, the server goes on)
            return rows, [error] * len(rows)


async def run_forward(compute: Compute, model: ModelPart, session: Session, inputs: torch.Tensor,
                      start_pos: int, every_position: bool = False,
                      batches: DecodeBatches | None = None) -> torch.Tensor:
    """The part's output for `inputs` at start_pos.., computed chunk by chunk as the engine itself cuts a prefill
    (so the bits are the same as one call), each chunk one turn: hidden states [T, hidden], or the head's logits
    of the last position [1, vocab]. every_position: each position with the bits of forwarding it alone (engine
    decode_each), and a head's logits of every position [T, vocab]. With `batches`, a one-token step joins the
    other sessions' steps waiting on this part."""
    if session.cache is None:
        session.cache = await compute(model.new_cache, session.max_seq_len)
    if batches is not None and inputs.shape[0] == 1 and not every_position:
        return await batches.step(compute, model, session, inputs, start_pos)
    last_only = model.layers.has_head and not every_position
    outputs = []
    for offset in range(0, inputs.shape[0], PREFILL_CHUNK):
        piece = inputs[offset:offset + PREFILL_CHUNK]
        outputs.append(await compute(_run_chunk, model, piece, start_pos + offset, session.cache, last_only,
                                     every_position))
    return outputs[-1] if last_only or len(outputs) == 1 else torch.cat(outputs)


def _run_chunk(model: ModelPart, inputs: torch.Tensor, start_pos: int, cache, last_only: bool,
               every_position: bool) -> torch.Tensor:
    if every_position:
        return decode_each(model, inputs, start_pos, cache)
    return model(inputs, start_pos, cache, last_only=last_only)


def checked_inputs(model: ModelPart, tensor: torch.Tensor) -> torch.Tensor:
    """A forward's tensor if it fits the part: token ids in the vocabulary, or hidden states of its width and dtype;
    Refusal (shape_mismatch) else."""
    args = model.args
    if model.layers.has_embedding:
        if tensor.dim() != 1 or tensor.dtype != torch.int64:
            raise Refusal("shape_mismatch", f"forward: this part takes int64 token ids [T], got "
                                             f"{wire.DTYPE_NAMES[tensor.dtype]}{list(tensor.shape)}")
        if int(tensor.min()) < 0 or int(tensor.max()) >= args.vocab_size:
            raise Refusal("shape_mismatch", f"forward: token ids must lie in [0, {args.vocab_size})")
        return tensor
    if tensor.dim() != 2 or tensor.shape[1] != args.hidden_size or tensor.dtype != model.dtype:
        raise Refusal("shape_mismatch", f"forward: this part takes {name_of(model.dtype)} hidden states "
                                         f"[T, {args.hidden_size}], got {wire.DTYPE_NAMES[tensor.dtype]}"
                                         f"{list(tensor.shape)}")
    return tensor
