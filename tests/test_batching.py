"""Batched decode across sessions: a batched row has the bits of the same step alone, for every kernel; concurrent
sessions (through the Batcher and through the HTTP API) each get their solo greedy tokens, joining and leaving
mid-way; a lone session runs today's path without waiting for anyone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from cakep2p.api import create_app
from cakep2p.cluster import LocalModel, ModelOptions
from cakep2p.engine.batching import Batcher
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.generate import LocalPipeline, generate
from cakep2p.engine.kernels import BATCH_ROWS, BATCH_ROWS_16BIT, batched_linear, linear, prepare
from cakep2p.engine.loading import load_part, whole_model
from cakep2p.engine.quant import quantize_int4, quantize_int8
from cakep2p.engine.sampling import SamplingParams
from cakep2p.testing import cached_random_model
from tests.kit.api import GatedModel, serve

CPU = torch.device("cpu")
FORMATS = [("auto", "int8"), ("auto", "int4"), ("bfloat16", "bf16"), ("float32", "f32"), ("float32", "bf16")]
PROMPTS = [[1, 5, 9, 33], [1, 7], [1, 40, 41, 42, 43, 44, 45], [1, 100, 3]]
NEVER = 30.0   # a gather timeout no test waits out (gathers_timed_out == 0): nobody waited for an absent session


def format_id(value) -> str:
    return "-".join(value) if isinstance(value, tuple) else str(value)


@pytest.fixture(scope="module")
def tiny_checkpoint() -> Checkpoint:
    return Checkpoint.open(cached_random_model("llama", "tiny"))


@pytest.fixture(scope="module", params=FORMATS, ids=format_id)
def part(request, tiny_checkpoint):
    dtype, weights = request.param
    return load_part(tiny_checkpoint, whole_model(tiny_checkpoint.args), dtype=dtype, device="cpu", weights=weights)


def solo_tokens(parts, prompt: list[int], new_tokens: int) -> list[int]:
    pipeline = LocalPipeline(parts, 64)
    try:
        return list(generate(pipeline, prompt, SamplingParams(max_new_tokens=new_tokens)))
    finally:
        pipeline.close()


# -- kernels and the batched forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [2, 4, BATCH_ROWS_16BIT, BATCH_ROWS, BATCH_ROWS + 3])
@pytest.mark.parametrize("kind,shape", [
    ("int8", (64, 128)), ("int8", (1024, 1024)), ("int4", (1024, 1024)), ("bf16", (64, 128)),
    ("bf16", (1024, 1024)), ("f32", (64, 128)), ("f32", (1024, 1024)), ("bf16-under-f32", (1024, 1024)),
    ("int8", (2048, 5632)), ("int4", (2048, 5632)), ("bf16", (2048, 5632)),   # TinyLlama's down projection
])
def test_a_batched_row_has_the_bits_of_that_row_alone_for_every_kernel(kind, shape, rows):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator) * 0.05
    compute = torch.float32 if kind in ("f32", "bf16-under-f32") else torch.bfloat16
    source = {"int8": quantize_int8, "int4": quantize_int4}.get(kind, lambda w: w.to(
        torch.bfloat16 if kind.startswith("bf16") else torch.float32))(weight)
    prepared = prepare(source, compute, CPU)
    x = torch.randn(rows, shape[1], generator=generator).to(compute)
    alone = torch.cat([linear(x[row:row + 1], prepared) for row in range(rows)])
    assert torch.equal(batched_linear(x, prepared), alone)


def test_decode_batch_rows_equal_each_sessions_own_step(part):
    positions, solo_caches, batch_caches, tokens = [], [], [], []
    for prompt in PROMPTS[:3]:
        solo, batched = part.new_cache(64), part.new_cache(64)
        ids = torch.tensor(prompt)
        part(ids, 0, solo, last_only=True)
        part(ids, 0, batched, last_only=True)
        positions.append(len(prompt))
        solo_caches.append(solo)
        batch_caches.append(batched)
        tokens.append(prompt[-1] + 1)
    for _ in range(3):   # ragged positions, three steps on from each prompt
        rows = part.decode_batch(torch.tensor(tokens), positions, batch_caches)
        for index, (token, position, cache) in enumerate(zip(tokens, positions, solo_caches)):
            alone = part(torch.tensor([token]), position, cache, last_only=True)[-1].float()
            assert torch.equal(rows[index], alone), f"session {index} at position {position}"
        tokens = [int(row.argmax()) for row in rows]
        positions = [position + 1 for position in positions]


# -- the batcher ----------------------------------------------------------------------------------------------------

def run_sessions(batcher: Batcher, prompts: list[list[int]], new_tokens: list[int],
                 start_after: dict[int, tuple[int, int]] | None = None) -> list[list[int]]:
    """Each prompt generated in its own thread and pipeline; start_after {session: (other, tokens)} holds a session
    back until `other` has produced that many tokens (it joins mid-way)."""
    start_after = start_after or {}
    produced = [threading.Semaphore(0) for _ in prompts]

    def session(index: int) -> list[int]:
        if index in start_after:
            other, count = start_after[index]
            for _ in range(count):
                assert produced[other].acquire(timeout=60)
        pipeline = batcher.pipeline(64)
        tokens = []
        try:
            for token in generate(pipeline, prompts[index], SamplingParams(max_new_tokens=new_tokens[index])):
                tokens.append(token)
                produced[index].release()
        finally:
            pipeline.close()
        return tokens

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return [future.result(timeout=120) for future in [pool.submit(session, i) for i in range(len(prompts))]]


def test_concurrent_sessions_each_get_their_solo_tokens_in_shared_steps(part):
    new_tokens = [12, 5, 9, 12]   # sessions 1 and 2 leave mid-way
    batcher = Batcher([part], gather_s=NEVER)
    tokens = run_sessions(batcher, PROMPTS, new_tokens)
    assert tokens == [solo_tokens([part], prompt, count) for prompt, count in zip(PROMPTS, new_tokens)]
    assert max(batcher.batch_sizes) > 1
    assert batcher.gathers_timed_out == 0


def test_a_session_joining_mid_way_shares_steps_and_keeps_its_tokens(part):
    batcher = Batcher([part], gather_s=NEVER)
    tokens = run_sessions(batcher, PROMPTS[:2], [14, 6], start_after={1: (0, 4)})
    assert tokens == [solo_tokens([part], PROMPTS[0], 14), solo_tokens([part], PROMPTS[1], 6)]
    assert 2 in batcher.batch_sizes
    assert batcher.gathers_timed_out == 0


def test_a_lone_session_runs_alone_without_waiting(tiny_checkpoint):
    part = load_part(tiny_checkpoint, whole_model(tiny_checkpoint.args), device="cpu", weights="int8")
    batcher = Batcher([part], gather_s=NEVER)   # waiting for anyone would hang this test
    assert run_sessions(batcher, PROMPTS[:1], [10]) == [solo_tokens([part], PROMPTS[0], 10)]
    assert set(batcher.batch_sizes) == {1}
    assert batcher.gathers_timed_out == 0


def test_an_error_in_a_batch_reaches_every_session_and_frees_the_batcher(part):
    batcher = Batcher([part])
    pipeline = batcher.pipeline(8)
    pipeline.forward([1, 2], 0)
    with pytest.raises(ValueError):
        pipeline.forward([3], 8)   # past the context
    assert pipeline.forward([3], 2).shape == (part.args.vocab_size,)
    pipeline.close()


# -- through the HTTP API -------------------------------------------------------------------------------------------

def test_concurrent_api_streams_each_get_their_solo_text(stories_dir):
    model = LocalModel(Checkpoint.open(stories_dir), ModelOptions(weights="int8", device="cpu"))
    model.batcher.gather_s = NEVER
    prompts = ["Once upon a time", "Lily and Ben", "One day, a little", "The cat"]
    max_tokens = [40, 16, 40, 28]

    def complete(url: str, prompt: str, tokens: int) -> str:
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
            stream = client.completions.create(model=model.name, prompt=prompt, max_tokens=tokens, temperature=0,
                                               stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)

    try:
        with serve(create_app(model, max_sessions=4)) as url:
            solo = [complete(url, prompt, tokens) for prompt, tokens in zip(prompts, max_tokens)]
        assert set(model.batcher.batch_sizes) == {1}
        gated = GatedModel(model)   # every session opens and pauses, then they all decode at once
        with serve(create_app(gated, max_sessions=4)) as url, ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(complete, url, prompt, tokens) for prompt, tokens in zip(prompts, max_tokens)]
            while gated.opened < 4:
                threading.Event().wait(0.01)
            gated.gate.set()
            texts = [future.result(timeout=120) for future in futures]
    finally:
        model.close()
    assert texts == solo
    assert max(model.batcher.batch_sizes) > 1


def test_a_stage_runs_the_waiting_steps_of_different_sessions_as_one_batch_with_each_rows_bits(stories_dir):
    """Three sessions' one-token steps reach a stage while its compute thread is busy: they run as one batch when
    the turn comes, and each gets the bits of its step alone (mesh/compute.py's DecodeBatches)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from cakep2p.mesh.compute import DecodeBatches, FairCompute
    from cakep2p.planner import LayerRange

    checkpoint = Checkpoint.open(stories_dir)
    part = load_part(checkpoint, LayerRange(2, 5, False, True), dtype="bfloat16", device="cpu")   # hidden -> logits
    generator = torch.Generator().manual_seed(3)
    prefixes = [torch.randn(4 + index, 64, generator=generator).bfloat16() for index in range(3)]
    steps = [torch.randn(1, 64, generator=generator).bfloat16() for _ in range(3)]

    def sessions() -> list[SimpleNamespace]:
        filled = [SimpleNamespace(cache=part.new_cache(32)) for _ in prefixes]
        for session, prefix in zip(filled, prefixes):
            part(prefix, 0, session.cache)
        return filled

    alone = [part(step, len(prefix), session.cache, last_only=True)
             for step, prefix, session in zip(steps, prefixes, sessions())]

    async def together() -> tuple[list[torch.Tensor], DecodeBatches]:
        executor, gate = ThreadPoolExecutor(max_workers=1), threading.Event()
        compute, batches, waiting = FairCompute(executor), DecodeBatches(), sessions()
        try:
            busy = asyncio.ensure_future(compute.run(b"another", gate.wait, 30))
            await asyncio.sleep(0.05)   # the compute thread is taken
            results = [asyncio.ensure_future(batches.step(compute.for_owner(bytes([index])), part, session, step,
                                                          len(prefix)))
                       for index, (session, step, prefix) in enumerate(zip(waiting, steps, prefixes))]
            await asyncio.sleep(0.05)
            gate.set()
            await busy
            return list(await asyncio.gather(*results)), batches
        finally:
            await compute.stop()
            executor.shutdown()

    outputs, batches = asyncio.run(together())
    assert batches.batch_sizes == {3: 1}
    assert all(torch.equal(output, solo) for output, solo in zip(outputs, alone))
