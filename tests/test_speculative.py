"""Speculative decoding by prompt lookup (engine/speculative.py): drafting, and greedy tokens identical with and
without it, locally and over a RemotePipeline, at the stop-token, max_new_tokens and context-end edges."""

from __future__ import annotations

import pytest
import torch

from cakep2p.engine import speculative
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.generate import LocalPipeline, generate
from cakep2p.engine.loading import load_part, whole_model
from cakep2p.engine.sampling import SamplingParams
from cakep2p.mesh import RemotePipeline
from cakep2p.planner import LayerRange
from cakep2p.testing import cached_random_model

REPEATED = [1] + [40, 41, 42, 43, 44, 45, 46, 47] * 3


class CountingPipeline(LocalPipeline):
    """A LocalPipeline that counts its verify passes."""

    verifies = 0

    def forward_all(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        self.verifies += 1
        return super().forward_all(token_ids, start_pos)


@pytest.fixture(scope="module")
def stories_part(stories_dir):
    checkpoint = Checkpoint.open(stories_dir)
    return load_part(checkpoint, whole_model(checkpoint.args), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def random_part():
    checkpoint = Checkpoint.open(cached_random_model("llama", "tiny"))
    return load_part(checkpoint, whole_model(checkpoint.args), dtype="float32", device="cpu")


def both_ways(part, prompt: list[int], params: SamplingParams, max_seq_len: int = 256) -> tuple[list, list, int]:
    plain = list(generate(LocalPipeline([part], max_seq_len), prompt, params, speculate=False))
    pipeline = CountingPipeline([part], max_seq_len)
    drafted = list(generate(pipeline, prompt, params, speculate=True))
    return plain, drafted, pipeline.verifies


def test_draft_follows_the_latest_longest_ngram():
    assert speculative.draft_tokens([5, 6, 7, 9, 5, 6, 7, 8, 1, 5, 6, 7], max_draft=2) == [8, 1]


def test_draft_falls_back_to_shorter_ngrams():
    assert speculative.draft_tokens([3, 9, 4, 2, 8, 4], max_draft=3) == [2, 8, 4]


def test_draft_prefers_a_match_with_a_full_continuation():
    assert speculative.draft_tokens([7, 7, 7, 7, 7, 7], max_draft=3) == [7, 7, 7]


def test_no_draft_without_a_match_or_room():
    assert speculative.draft_tokens([1, 2, 3, 4]) == []
    assert speculative.draft_tokens([1, 2, 1, 2], max_draft=0) == []
    assert speculative.draft_tokens([1]) == []


def test_sampling_and_the_switch_turn_it_off(stories_part, monkeypatch):
    pipeline = LocalPipeline([stories_part], 32)
    assert speculative.applies(pipeline, SamplingParams())
    assert not speculative.applies(pipeline, SamplingParams(temperature=0.8))
    assert not speculative.applies(pipeline, SamplingParams(), speculate=False)
    monkeypatch.setenv(speculative.ENV_SWITCH, "0")
    assert not speculative.applies(pipeline, SamplingParams())
    assert not speculative.applies(object(), SamplingParams(), speculate=True)  # no forward_all


def test_forward_all_rows_equal_one_token_forwards(stories_part):
    tokens = REPEATED[:12]
    one_by_one = LocalPipeline([stories_part], 32)
    one_by_one.forward(tokens[:4], 0)
    rows = torch.stack([one_by_one.forward([token], 4 + index) for index, token in enumerate(tokens[4:])])
    at_once = LocalPipeline([stories_part], 32)
    at_once.forward(tokens[:4], 0)
    assert torch.equal(at_once.forward_all(tokens[4:], 4), rows)
    assert torch.equal(at_once.caches[0].keys, one_by_one.caches[0].keys)


@pytest.mark.parametrize("prompt", [REPEATED, [1, 300, 301, 302, 303]], ids=["repetitive", "plain"])
def test_greedy_tokens_identical_on_stories(stories_part, prompt):
    plain, drafted, verifies = both_ways(stories_part, prompt, SamplingParams(max_new_tokens=96))
    assert drafted == plain
    assert verifies > 0


def test_greedy_tokens_identical_with_repetition_penalty(random_part):
    params = SamplingParams(max_new_tokens=64, repetition_penalty=1.3)
    plain, drafted, _ = both_ways(random_part, REPEATED, params)
    assert drafted == plain


def test_greedy_tokens_identical_on_a_random_model(random_part):
    plain, drafted, verifies = both_ways(random_part, REPEATED, SamplingParams(max_new_tokens=80))
    assert drafted == plain
    assert verifies > 0


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 17])
def test_max_new_tokens_is_exact(stories_part, limit):
    plain, drafted, _ = both_ways(stories_part, REPEATED, SamplingParams(max_new_tokens=limit))
    assert drafted == plain and len(drafted) == limit


def test_stops_at_a_stop_token_inside_an_accepted_draft(stories_part):
    plain, _, _ = both_ways(stories_part, REPEATED, SamplingParams(max_new_tokens=60))
    for stop in sorted(set(plain))[:6]:
        params = SamplingParams(max_new_tokens=60, stop_token_ids=frozenset({stop}))
        expected, drafted, _ = both_ways(stories_part, REPEATED, params)
        assert drafted == expected and drafted[-1] == stop and drafted.count(stop) == 1


def test_never_runs_past_the_context(stories_part):
    max_seq_len = len(REPEATED) + 20
    params = SamplingParams(max_new_tokens=max_seq_len - len(REPEATED) + 1)  # the last token is never forwarded
    plain, drafted, _ = both_ways(stories_part, REPEATED, params, max_seq_len=max_seq_len)
    assert drafted == plain and len(drafted) == params.max_new_tokens


def test_remote_pipeline_of_local_stages_speculates_to_the_same_tokens(stories_dir):
    checkpoint = Checkpoint.open(stories_dir)
    layers = checkpoint.args.num_layers
    stages = [load_part(checkpoint, LayerRange(0, 2, True, False), dtype="float32", device="cpu"),
              load_part(checkpoint, LayerRange(2, layers, False, True), dtype="float32", device="cpu")]
    params = SamplingParams(max_new_tokens=64)
    runs = []
    for speculate in (False, True):
        pipeline = RemotePipeline(stages, checkpoint, 128, None, weights="f32", dtype="float32")
        try:
            runs.append(list(generate(pipeline, REPEATED, params, speculate=speculate)))
            history = pipeline.history
        finally:
            pipeline.close()
    assert runs[0] == runs[1]
    assert history[:len(REPEATED) + len(runs[1]) - 1] == REPEATED + runs[1][:-1]
