"""Sampler: greedy, seeded draws, top-k, top-p, repetition penalty, parameter checks."""

from __future__ import annotations

import pytest
import torch

from cakep2p.engine.sampling import Sampler, SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.5, 2.9])


def draws(params: SamplingParams, count: int = 200, logits: torch.Tensor = LOGITS) -> list[int]:
    sampler = Sampler(params)
    return [sampler.next_token(logits, []) for _ in range(count)]


def test_zero_temperature_is_argmax():
    assert Sampler(SamplingParams()).next_token(LOGITS, []) == 1


def test_same_seed_gives_the_same_draws():
    params = SamplingParams(temperature=1.0, seed=42)
    assert draws(params) == draws(params)


def test_different_seeds_give_different_draws():
    assert draws(SamplingParams(temperature=1.0, seed=1)) != draws(SamplingParams(temperature=1.0, seed=2))


def test_top_k_draws_only_among_the_k_best():
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=0))) == {1, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probabilities = torch.softmax(LOGITS, dim=-1)
    order = torch.argsort(probabilities, descending=True).tolist()
    needed = int((probabilities[order].cumsum(0) < 0.6).sum()) + 1
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.6, seed=0))) == set(order[:needed])


def test_tiny_top_p_is_greedy():
    assert set(draws(SamplingParams(temperature=1.0, top_p=1e-6, seed=0), count=50)) == {1}


def test_repetition_penalty_demotes_seen_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    assert sampler.next_token(LOGITS, history=[1]) == 5
    assert sampler.next_token(LOGITS, history=[1, 5]) == 2


def test_repetition_penalty_makes_negative_logits_more_negative():
    logits = torch.tensor([-0.5, -0.6])
    assert Sampler(SamplingParams(repetition_penalty=1.5)).next_token(logits, history=[0]) == 1


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, torch.log(torch.tensor(3.0)).item()])
    ones = sum(draws(SamplingParams(temperature=1.0, seed=3), count=4000, logits=logits))
    assert 2800 < ones < 3200


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                          ("top_k", -1), ("repetition_penalty", 0.0), ("max_new_tokens", -1)])
def test_invalid_parameters_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameters_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_seed_outside_0_to_2_pow_63_is_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)


def test_largest_seed_is_accepted():
    assert Sampler(SamplingParams(temperature=1.0, seed=2**63 - 1)).next_token(torch.zeros(4), []) in range(4)
