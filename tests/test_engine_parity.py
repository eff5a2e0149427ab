"""Our engine against transformers on tiny random checkpoints of each family: logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cakep2p.engine.config import ModelArgs
from cakep2p.engine.generate import LocalPipeline, generate
from cakep2p.engine.loading import load_part
from cakep2p.engine.model import ModelPart
from cakep2p.planner import LayerRange
from cakep2p.engine.sampling import SamplingParams
from cakep2p.testing import make_random_model
from cakep2p.engine.checkpoint import Checkpoint

transformers = pytest.importorskip("transformers")

PROMPT = [1, 5, 100, 200, 7, 9, 300, 40]
DECODE_STEPS = 20
TOLERANCE = 1e-4
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)

CASES = {
    "llama": ("llama", dict()),
    "llama-llama3-rope-old-style": ("llama", dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)),
    "llama-llama3-rope-parameters": ("llama", dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0})),
    "llama-tied-embeddings": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict()),
    "mistral-sliding-window": ("mistral", dict(sliding_window=5)),
    "qwen2-qkv-bias": ("qwen2", dict()),
    "qwen2-tied-embeddings": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": ("qwen3", dict()),
    # big enough that the MLP and head weights take the packed oneDNN path
    "llama-packed-weights": ("llama", dict(hidden_size=256, intermediate_size=2048, vocab_size=4096,
                                           num_hidden_layers=2)),
}




def reference_model(model_dir: Path):
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def whole_part(model_dir: Path) -> ModelPart:
    args = Checkpoint.open(model_dir).args
    return load_part(Checkpoint.open(model_dir), LayerRange(0, args.num_layers, True, True), dtype="float32", device="cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    model_dir = make_random_model(tmp_path / case, family, seed=len(case), **overrides)
    reference, ours = reference_model(model_dir), whole_part(model_dir)
    cache = ours.new_cache(64)
    with torch.no_grad():
        output = reference(torch.tensor([PROMPT]), use_cache=True)
        ours_logits = ours(torch.tensor(PROMPT), 0, cache)
        assert (output.logits[0] - ours_logits).abs().max().item() < TOLERANCE
        token, position = int(output.logits[0, -1].argmax()), len(PROMPT)
        for step in range(DECODE_STEPS):
            output = reference(torch.tensor([[token]]), cache=output.past_key_values, use_cache=True)
            ours_logits = ours(torch.tensor([token]), position, cache)
            difference = (output.logits[0] - ours_logits).abs().max().item()
            assert difference < TOLERANCE, f"step {step}: max abs difference {difference}"
            assert int(ours_logits[-1].argmax()) == int(output.logits[0, -1].argmax()), f"step {step}"
            token, position = int(output.logits[0, -1].argmax()), position + 1


def test_generate_matches_transformers_generate(tmp_path):
    model_dir = make_random_model(tmp_path / "qwen3", "qwen3", seed=3)
    reference = reference_model(model_dir)
    expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=DECODE_STEPS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    pipeline = LocalPipeline([whole_part(model_dir)], max_seq_len=64)
    assert list(generate(pipeline, PROMPT, SamplingParams(max_new_tokens=DECODE_STEPS))) == expected


def test_three_parts_chained_equal_the_whole_model(tmp_path):
    model_dir = make_random_model(tmp_path / "llama", "llama", seed=7, num_hidden_layers=5, shards=2)
    whole = LocalPipeline([whole_part(model_dir)], max_seq_len=64)
    specs = [LayerRange(0, 1, True, False), LayerRange(1, 3, False, False), LayerRange(3, 5, False, True)]
    parts = [load_part(Checkpoint.open(model_dir), spec, dtype="float32", device="cpu") for spec in specs]
    split = LocalPipeline(parts, max_seq_len=64)
    assert torch.allclose(whole.forward(PROMPT, 0), split.forward(PROMPT, 0), atol=1e-5, rtol=0)
    whole, split = LocalPipeline(whole.parts, 64), LocalPipeline(parts, 64)
    params = SamplingParams(max_new_tokens=DECODE_STEPS)
    assert list(generate(split, PROMPT, params)) == list(generate(whole, PROMPT, params))
