"""Token generation over any Pipeline (local parts here, remote stages in the mesh): prefill, then token by token."""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from cakep2p.engine import speculative
from cakep2p.engine.kvcache import KVCache
from cakep2p.engine.model import ModelPart
from cakep2p.engine.sampling import Sampler, SamplingParams
from cakep2p.errors import ModelError


class Pipeline(Protocol):
    """The whole model, however it is spread; it owns the KV caches of one session."""

    max_seq_len: int

    def forward(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        """Run tokens at positions start_pos.. and return float32 logits [vocab] of the last one."""

    def forward_all(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        """As forward, but float32 logits [T, vocab] of every one, row t (and the caches) bit-identical to forwarding
        the tokens one at a time: what speculative decoding verifies drafts with, so greedy tokens do not change.

        Optional: generation decodes token by token over a pipeline without it (a wrapper, a test fake)."""

    def close(self) -> None:
        """Release the caches (and, remotely, the session)."""


class LocalPipeline:
    """One or more ModelParts chained in-process; owns their KV caches.

    `stages`, `load_sources` and `stage_seconds` are the per-stage report a mesh pipeline gives (where each stage
    ran, where its weights came from, its seconds); parts in this process are no such stages, so they stay empty.
    """

    def __init__(self, parts: list[ModelPart], max_seq_len: int) -> None:
        _check_chain(parts)
        self.parts = list(parts)
        self.max_seq_len = max_seq_len
        self.caches = [part.new_cache(max_seq_len) for part in self.parts]
        self.stages: list[ModelPart] = []
        self.load_sources: list[str] = []
        self.stage_seconds: list[float] = []

    def forward(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        x = torch.tensor(self._checked(token_ids, start_pos), dtype=torch.long)
        for part, cache in zip(self.parts, self.caches):
            x = part(x, start_pos, cache, last_only=True)
        return x[-1].float()

    def forward_all(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        x = torch.tensor(self._checked(token_ids, start_pos), dtype=torch.long)
        for part, cache in zip(self.parts, self.caches):
            x = decode_each(part, x, start_pos, cache)
        return x.float()

    def _checked(self, token_ids: list[int], start_pos: int) -> list[int]:
        if not token_ids:
            raise ValueError("forward needs at least one token")
        if not self.caches:
            raise ValueError("this pipeline is closed; open a new one")
        if start_pos < 0 or start_pos + len(token_ids) > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + len(token_ids)} exceed the context "
                             f"of {self.max_seq_len} tokens")
        return token_ids


    def close(self) -> None:
        self.caches = []


def decode_each(part: ModelPart, inputs: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
    """`part` on T consecutive positions of one cache, each with the bits of a one-token forward of it alone (the
    batched decode path: one weight read for all rows, attention row by row, so row t sees rows before it)."""
    positions = list(range(start_pos, start_pos + inputs.shape[0]))
    return part.decode_batch(inputs, positions, [cache] * len(positions))


def _check_chain(parts: list[ModelPart]) -> None:
    if not parts:
        raise ModelError("a pipeline needs at least one model part")
    if not parts[0].layers.has_embedding or not parts[-1].layers.has_head:
        raise ModelError("the first part must hold the embedding and the last the LM head")
    for before, after in zip(parts, parts[1:]):
        if before.layers.has_head or after.layers.has_embedding or before.layers.end != after.layers.start:
            raise ModelError(f"parts {before.layers} and {after.layers} do not follow one another")
    if parts[-1].layers.end != parts[-1].args.num_layers or parts[0].layers.start != 0:
        raise ModelError(f"the parts cover layers {parts[0].layers.start}..{parts[-1].layers.end}, "
                         f"not all {parts[-1].args.num_layers}")


def generate(pipeline: Pipeline, prompt_ids: list[int], params: SamplingParams,
             start_pos: int = 0, *, speculate: bool | None = None) -> Iterator[int]:
    """Yield new token ids as they come; a stop token is yielded, then generation ends.

    `prompt_ids[:start_pos]` must already be in the pipeline's caches (a reused prefix). Greedy generation drafts
    by prompt lookup and verifies the drafts in one pass (engine/speculative.py; the same tokens, fewer passes);
    `speculate` False turns that off, None leaves it to CAKEP2P_SPECULATE (on unless "0").
    """
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("the prompt is empty; generation needs at least one token (e.g. BOS)")
    if not 0 <= start_pos < len(prompt_ids):
        raise ValueError(f"start_pos {start_pos} must leave at least one of the {len(prompt_ids)} prompt tokens to run")
    if params.max_new_tokens == 0:
        return
    needed = len(prompt_ids) + params.max_new_tokens - 1
    if needed > pipeline.max_seq_len:
        raise ModelError(f"{len(prompt_ids)} prompt tokens + {params.max_new_tokens} new tokens exceed the context "
                         f"of {pipeline.max_seq_len}; shorten the prompt or lower max_new_tokens")
    sampler = Sampler(params)
    history = prompt_ids
    logits = pipeline.forward(prompt_ids[start_pos:], start_pos)
    if speculative.applies(pipeline, params, speculate):
        yield from speculative.decode(pipeline, history, logits, sampler,
                                      getattr(pipeline, "max_draft", speculative.MAX_DRAFT))
        return
    for produced in range(params.max_new_tokens):
        token = sampler.next_token(logits, history)
        yield token
        if token in params.stop_token_ids or produced + 1 == params.max_new_tokens:
            return
        history.append(token)
        logits = pipeline.forward([token], len(history) - 1)
