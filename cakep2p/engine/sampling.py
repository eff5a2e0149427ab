"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seeded generator; and the
one place sampling settings are built, from the model's defaults plus what the user set."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cakep2p.engine.generation_config import GenerationDefaults

GREEDY_BELOW = 1e-4  # temperatures this small pick the likeliest token as temperature 0 does


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; temperature 0 is greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses nan
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be from 0 to 2**63-1, got {self.seed}")


def sampling_params(defaults: GenerationDefaults, *, max_new_tokens: int, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                    seed: int | None = None, stop_token_ids: frozenset[int] = frozenset()) -> SamplingParams:
    """The model's recommended sampling (its generation_config.json; greedy when it has none), with every value
    the user set (not None) on top. ValueError names a bad value: "top_p must be in (0, 1], got 0.0"."""
    def chosen(value, default):
        return default if value is None else value

    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=chosen(temperature, defaults.temperature),
        top_k=chosen(top_k, defaults.top_k),
        top_p=chosen(top_p, defaults.top_p),
        repetition_penalty=chosen(repetition_penalty, defaults.repetition_penalty),
        seed=seed,
        stop_token_ids=stop_token_ids,
    )


class Sampler:
    """Applies repetition penalty, then temperature, top-k and top-p (the order transformers uses), then draws."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def next_token(self, logits: torch.Tensor, history: list[int]) -> int:
        """The next token id from float logits [vocab]; `history` is the context so far (for the penalty)."""
        params = self.params
        scores = logits.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        if params.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), dtype=torch.long)
            seen = seen[seen < scores.numel()]
            picked = scores[seen]
            scores = scores.clone()
            scores[seen] = torch.where(picked < 0, picked * params.repetition_penalty,
                                       picked / params.repetition_penalty)
        if params.temperature < GREEDY_BELOW:  # 1e-300 would overflow the division: it is greedy in all but name
            return int(torch.argmax(scores))
        scores = scores / params.temperature
        if 0 < params.top_k < scores.numel():
            threshold = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # drop a token when the ones before it already reach top_p; the first one always stays
            drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))
