"""Quantized weights: deterministic formats, kernels equal to their float reference, and the quality of int8 and
4-bit stories260K (and of a GGUF kept in its own blocks) measured against float32, teacher-forced."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.digests import part_identity
from cakep2p.engine.formats import served_tensors
from cakep2p.engine.generate import LocalPipeline, generate
from cakep2p.engine.kernels import PreparedLinear, linear, prepare
from cakep2p.engine.loading import load_part, part_tensor_names, whole_model
from cakep2p.engine.quant import QuantizedWeight, int4_group, quantize_int4, quantize_int8
from cakep2p.engine.sampling import SamplingParams
from cakep2p.engine.sizes import model_spec
from cakep2p.engine.tokenizer import Tokenizer
from tests.test_gguf_format import SMOL_DIR, SMOL_NAME

CPU = torch.device("cpu")
PROMPTS = ["Once upon a time", "Lily and Ben", "One day, a little", "The cat", "Tom had a big", "In the park",
           "Sara wanted to", "The sun was"]


@pytest.fixture(scope="module")
def stories(stories_dir) -> Checkpoint:
    return Checkpoint.open(stories_dir)


# -- formats and kernels ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4], ids=["int8", "int4"])
def test_quantization_is_bit_identical_run_to_run_and_thread_count_to_thread_count(quantize):
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    first = quantize(weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        second = quantize(weight.clone())
    finally:
        torch.set_num_threads(threads)
    for a, b in ((first.codes, second.codes), (first.scales, second.scales), (first.mins, second.mins)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_int4_round_trips_within_half_a_step_and_stores_the_exact_scales():
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(5))
    quantized = quantize_int4(weight)
    assert quantized.scales.dtype == torch.float16 and quantized.group == 32
    step = quantized.scales.float().repeat_interleave(32, dim=1)
    assert bool(((quantized.dequantize() - weight).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all())


def test_int4_groups_divide_every_width_and_are_32_for_real_models():
    assert [int4_group(width) for width in (2048, 5632, 576, 256)] == [32, 32, 32, 32]
    assert all(width % int4_group(width) == 0 for width in (64, 172, 100, 18))


@pytest.mark.parametrize("shape", [(256, 512), (96, 256), (64, 172), (344, 64)], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 17, 64, 130])   # both sides of WEIGHT_ONLY_MAX_ROWS; int4 in slices
@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4], ids=["int8", "int4"])
def test_every_kernel_path_equals_its_float_reference(shape, rows, quantize):
    generator = torch.Generator().manual_seed(rows)
    weight = quantize(torch.randn(*shape, generator=generator) * 0.05)
    prepared = prepare(weight, torch.float32, CPU)
    x = torch.randn(rows, shape[1], generator=generator)
    reference = x @ weight.dequantize().t()
    out = linear(x, prepared)
    assert out.dtype == torch.float32 and out.shape == (rows, shape[0])
    assert float((out - reference).abs().max()) <= 2e-2 * float(reference.abs().max())   # bf16 activations


def test_kernels_stay_correct_where_the_weight_only_kernels_cannot_take_the_shape():
    weight = quantize_int8(torch.randn(64, 172) * 0.05)  # int8pack reads garbage past an odd width: never used
    prepared = prepare(weight, torch.float32, CPU)
    assert isinstance(prepared, PreparedLinear) and prepared.weight is None
    x = torch.randn(1, 172)
    for _ in range(20):
        assert torch.isfinite(linear(x, prepared)).all()


def test_served_tensors_rebuild_the_same_part_and_the_digest_names_the_content(stories):
    names = part_tensor_names(stories.args, whole_model(stories.args))
    served = dict(served_tensors(stories, names, "int4"))
    assert "model.layers.0.mlp.down_proj.weight.q4" in served and "model.norm.weight" in served
    assert served["model.embed_tokens.weight.q8"].dtype == torch.int8          # the embedding a step finer
    first, again = part_identity(stories, whole_model(stories.args), "int4"), \
        part_identity(stories, whole_model(stories.args), "int4")
    assert first == again and first.digest != part_identity(stories, whole_model(stories.args), "int8").digest
    assert first.nbytes == sum(tensor.numel() * tensor.element_size() for tensor in served.values())


# -- quality on real weights ------------------------------------------------------------------------------------

def teacher_forced(part, tokens: list[int]) -> torch.Tensor:
    """Logits of every next token, one position at a time (the decode path)."""
    cache = part.new_cache(len(tokens))
    return torch.stack([part(torch.tensor([token]), position, cache)[-1]
                        for position, token in enumerate(tokens[:-1])])


def prompted(part, tokens: list[int]) -> torch.Tensor:
    """Logits of every next token from one teacher-forced pass over `tokens` (the prompt path: quicker than one
    position at a time for a model the size of SmolLM2)."""
    with torch.no_grad():
        return part(torch.tensor(tokens[:-1]), 0, part.new_cache(len(tokens)))


@pytest.fixture(scope="module")
def story_text(stories) -> list[int]:
    """512 tokens of TinyStories-like text: stories260K's own float32 greedy continuations of eight prompts."""
    tokenizer = Tokenizer.from_checkpoint(stories)
    part = load_part(stories, whole_model(stories.args), device="cpu", weights="f32")
    tokens: list[int] = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        tokens += ids + list(generate(LocalPipeline([part], 512), ids, SamplingParams(max_new_tokens=120)))
    return tokens[:513]


@pytest.mark.slow
@pytest.mark.parametrize("weights, most_perplexity, least_agreement", [("int8", 1.01, 0.99), ("int4", 1.05, 0.90)])
def test_quantized_stories260k_keeps_perplexity_and_top1_agreement(stories, story_text, weights, most_perplexity,
                                                                  least_agreement):
    reference = teacher_forced(load_part(stories, whole_model(stories.args), device="cpu", weights="f32"), story_text)
    quantized = teacher_forced(load_part(stories, whole_model(stories.args), device="cpu", weights=weights),
                               story_text)
    targets = torch.tensor(story_text[1:])
    ratio = float(torch.nn.functional.cross_entropy(quantized, targets).exp()
                  / torch.nn.functional.cross_entropy(reference, targets).exp())
    agreement = float((quantized.argmax(-1) == reference.argmax(-1)).float().mean())
    print(f"{weights}: perplexity x{ratio:.4f}, top-1 agreement {agreement:.4f} over {len(targets)} tokens")
    assert ratio <= most_perplexity and agreement >= least_agreement


@pytest.mark.slow
@pytest.mark.skipif(not (SMOL_DIR / SMOL_NAME).is_file(), reason="the SmolLM2 GGUF is not on this machine")
def test_a_gguf_in_its_own_blocks_agrees_with_its_float32_self_on_its_chat_output():
    checkpoint = Checkpoint.open(SMOL_DIR)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    native = load_part(checkpoint, whole_model(checkpoint.args), device="cpu")
    assert native.weight_format == "gguf"
    tokens: list[int] = []
    for question in ("Tell me a story about a brave fox.", "Explain why the sky is blue.", "Name some fruits."):
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]),
                                  add_special_tokens=False)
        tokens += prompt + list(generate(LocalPipeline([native], 1024), prompt, SamplingParams(max_new_tokens=160)))
    tokens = tokens[:513]   # the measure: 512 tokens of its own chat output
    exact = load_part(checkpoint, whole_model(checkpoint.args), dtype="float32", device="cpu")
    agreement = float((prompted(native, tokens).argmax(-1) == prompted(exact, tokens).argmax(-1)).float().mean())
    print(f"SmolLM2 Q4_1 in its own blocks vs float32: top-1 agreement {agreement:.4f} over {len(tokens) - 1} tokens")
    assert agreement >= 0.95


def test_the_planner_counts_the_formats_real_bytes(stories):
    sizes = {weights: sum(spec.layer_bytes) + spec.embedding_bytes + spec.head_bytes
             for weights in ("f32", "bf16", "int8", "int4")
             for spec in [model_spec(stories, weights=weights)]}
    parts = {weights: load_part(stories, whole_model(stories.args), device="cpu", weights=weights).weight_bytes
             for weights in sizes}
    assert sizes["f32"] == 2 * sizes["bf16"] and sizes["int4"] < sizes["int8"] < sizes["bf16"]
    assert all(abs(parts[weights] - sizes[weights]) <= 0.02 * sizes[weights] for weights in sizes), (parts, sizes)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_a_part_in_its_kernels_layout_costs_the_formats_bytes_and_no_second_copy(tmp_path, weights):
    from cakep2p.testing import make_random_model

    checkpoint = Checkpoint.open(make_random_model(tmp_path / "kernel-shaped", "llama", hidden_size=256,
                                                   intermediate_size=512, num_hidden_layers=2, vocab_size=512))
    spec = model_spec(checkpoint, weights=weights)
    part = load_part(checkpoint, whole_model(checkpoint.args), device="cpu", weights=weights)
    planned = sum(spec.layer_bytes) + spec.embedding_bytes + spec.head_bytes
    qkv = part.blocks[0].qkv
    assert weights == "bf16" or (isinstance(qkv, PreparedLinear) and qkv.weight is not None)   # the kernel path
    assert abs(part.weight_bytes - planned) <= 0.05 * planned, (part.weight_bytes, planned)


def test_generate_json_says_which_format_and_kernel_ran(stories_dir, tmp_path):
    import json
    import os

    env = {**os.environ, "CAKEP2P_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "cakep2p", "generate", "--local", "--model", str(stories_dir),
                             "--prompt", "Once upon a time", "--max-new-tokens", "8", "--weights", "int4", "--json"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["weights"] == "int4" and "int4" in report["kernel"] and report["dtype"] == "float32"
