"""Speculative decoding by prompt lookup: draft what followed the context's latest n-gram, verify it in one pass.

Greedy generation only (the sampler's argmax, repetition penalty included): the drafts the model agrees with are
kept, and the model's own next token after them, so the tokens are the ones token-by-token decoding gives, in fewer
passes through the pipeline (over the mesh, fewer round trips per token). Drafting needs no second model: the tail
n-gram of the history (MAX_NGRAM tokens down to MIN_NGRAM) is looked up earlier in the context, most recent match
first, and up to MAX_DRAFT tokens that followed it are proposed. With no match the step is a plain one-token
forward; a verify pass never runs without a draft. A verify pass costs more than a one-token step on a CPU, so
drafting backs off after a pass that kept nothing (1, 2, 4... up to MAX_BACKOFF plain steps) and resumes fully after
one that kept a draft: ordinary chat text stays at its plain speed, repetitive text gains.

On by default for greedy generation over a pipeline with `forward_all`; `CAKEP2P_SPECULATE=0` in the environment
(or `generate(..., speculate=False)`) turns it off. Sampled generation never speculates.
"""

from __future__ import annotations

import os
from typing import Iterator, Protocol

import torch

from cakep2p.engine.sampling import GREEDY_BELOW, Sampler, SamplingParams

MAX_NGRAM = 3        # the longest tail n-gram looked up
MIN_NGRAM = 3        # the shortest in generation: shorter matches predict little (SmolLM2 chat: 0.95x with 2, 1.0x with 3)
MAX_BACKOFF = 16     # plain steps at most between verify passes after ones that kept nothing
MAX_DRAFT = 4        # tokens proposed per verify pass (bench/speculative_bench.py measures the trade); a pipeline
                     # whose passes cost round trips proposes more: its `max_draft` (mesh/pipeline.py)
LOOKUP_WINDOW = 2048  # how far back the n-gram is looked for: bounds the lookup's cost per step
ENV_SWITCH = "CAKEP2P_SPECULATE"


class Verifier(Protocol):
    """What speculative decoding needs of a pipeline (engine/generate.py's Pipeline has it)."""

    max_seq_len: int

    def forward(self, token_ids: list[int], start_pos: int) -> torch.Tensor: ...

    def forward_all(self, token_ids: list[int], start_pos: int) -> torch.Tensor: ...


def applies(pipeline: object, params: SamplingParams, speculate: bool | None = None) -> bool:
    """Whether to speculate: greedy, a pipeline with forward_all (which verifies in one pass), and not turned off
    (`speculate`, else the environment)."""
    if speculate is None:
        speculate = os.environ.get(ENV_SWITCH, "1").strip() != "0"
    return (speculate and params.temperature < GREEDY_BELOW and callable(getattr(pipeline, "forward_all", None)))


def draft_tokens(history: list[int], max_draft: int = MAX_DRAFT, max_ngram: int = MAX_NGRAM,
                 window: int = LOOKUP_WINDOW, min_ngram: int = 1) -> list[int]:
    """Up to `max_draft` tokens that followed an earlier occurrence of the history's tail n-gram, trying the longest
    n first: the latest occurrence with `max_draft` followers, else the one with the most; [] when no tail n-gram
    occurs earlier (or max_draft < 1)."""
    if max_draft < 1:
        return []
    first = max(0, len(history) - window)
    for n in range(min(max_ngram, len(history) - 1), max(1, min_ngram) - 1, -1):
        tail = history[-n:]
        best: list[int] = []
        for start in range(len(history) - n - 1, first - 1, -1):  # a match ends before the tail, so it has followers
            if history[start] == tail[0] and history[start:start + n] == tail:
                followers = history[start + n:start + n + max_draft]
                if len(followers) > len(best):
                    best = followers
                if len(best) == max_draft:
                    break
        if best:
            return best
    return []


def decode(pipeline: Verifier, history: list[int], logits: torch.Tensor, sampler: Sampler,
           max_draft: int = MAX_DRAFT) -> Iterator[int]:
    """Yield greedy tokens after `history` (the ids in the caches; extended in place), `logits` being the last
    one's. Stops after a stop token or `max_new_tokens` exactly as token-by-token decoding does, and never runs a
    position past the pipeline's max_seq_len."""
    params = sampler.params
    produced, backoff, wait = 0, 0, 0   # after a pass that kept nothing: `wait` plain steps, then double `backoff`
    token = sampler.next_token(logits, history)
    while True:
        yield token
        produced += 1
        if token in params.stop_token_ids or produced == params.max_new_tokens:
            return
        position = len(history)
        history.append(token)
        # k drafts yield at most k + 1 tokens and fill positions up to position + k
        room = min(max_draft, params.max_new_tokens - produced - 1, pipeline.max_seq_len - position - 1)
        drafts = draft_tokens(history, room, min_ngram=MIN_NGRAM) if wait == 0 else []
        if not drafts:
            wait = max(0, wait - 1)
            token = sampler.next_token(pipeline.forward([token], position), history)
            continue
        rows = pipeline.forward_all([token, *drafts], position)
        for kept, (row, draft) in enumerate(zip(rows, drafts)):
            token = sampler.next_token(row, history)
            if token != draft:
                backoff = 0 if kept else min(MAX_BACKOFF, max(1, 2 * backoff))
                wait = backoff
                break
            yield token
            produced += 1
            if token in params.stop_token_ids or produced == params.max_new_tokens:
                return
            history.append(token)
        else:
            backoff = 0
            token = sampler.next_token(rows[len(drafts)], history)
