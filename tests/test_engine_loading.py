"""Loading models: configs, (sharded) safetensors, partial loading, clear errors, and the stories260K reference."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cakep2p.engine import checkpoint as checkpoint_module, safetensors
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.generate import LocalPipeline, generate
from cakep2p.engine.kernels import has_bf16_hardware
from cakep2p.engine.loading import load_part, part_from_tensors, part_tensor_names, resolve_device
from cakep2p.engine.model import ModelPart
from cakep2p.engine.safetensors import read_tensor_index
from cakep2p.engine.sampling import SamplingParams
from cakep2p.errors import ModelError
from cakep2p.planner import LayerRange
from cakep2p.testing import cached_random_model, make_random_model, write_safetensors
from tests.kit import reference_rows

PROMPT = [1, 40, 41, 42, 43]




@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=11)


def whole(model_dir: Path, **kwargs) -> ModelPart:
    args = Checkpoint.open(model_dir).args
    return load_part(Checkpoint.open(model_dir), LayerRange(0, args.num_layers, True, True), **kwargs)


def greedy(model_dir: Path, prompt: list[int], count: int, **kwargs) -> list[int]:
    pipeline = LocalPipeline([whole(model_dir, **kwargs)], max_seq_len=len(prompt) + count)
    return list(generate(pipeline, prompt, SamplingParams(max_new_tokens=count)))


# --- the trained reference model --------------------------------------------------------------------------------

def test_stories260k_greedy_matches_reference_for_every_prompt(stories_dir):
    pipeline_part = whole(stories_dir, dtype="float32", device="cpu")
    for case in reference_rows(stories_dir):
        pipeline = LocalPipeline([pipeline_part], max_seq_len=256)
        tokens = list(generate(pipeline, case["prompt_token_ids"], SamplingParams(max_new_tokens=64)))
        assert tokens == case["new_token_ids"], case["prompt"]


# --- configs ----------------------------------------------------------------------------------------------------

def test_config_reads_llama3_scaling_from_rope_scaling_and_from_rope_parameters():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    old = ModelArgs.from_config({**base, "rope_theta": 500000.0, "rope_scaling": {**scaling, "rope_type": "llama3"}})
    new = ModelArgs.from_config({**base, "rope_parameters": {**scaling, "rope_type": "llama3", "rope_theta": 500000.0}})
    assert old == new
    assert old.rope_theta == 500000.0 and old.rope_scaling["rope_type"] == "llama3"


def test_config_of_each_family_sets_bias_and_qk_norm(tmp_path):
    qwen2 = Checkpoint.open(make_random_model(tmp_path / "q2", "qwen2")).args
    qwen3 = Checkpoint.open(make_random_model(tmp_path / "q3", "qwen3")).args
    mistral = Checkpoint.open(make_random_model(tmp_path / "m", "mistral")).args
    assert (qwen2.attention_bias, qwen2.qk_norm) == (True, False)
    assert (qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 16)
    assert (mistral.attention_bias, mistral.qk_norm, mistral.num_kv_heads) == (False, False, 4)


# --- checkpoints ------------------------------------------------------------------------------------------------

def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single = make_random_model(tmp_path / "single", "llama", seed=5)
    sharded = make_random_model(tmp_path / "sharded", "llama", seed=5, shards=2)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert len({info.file for info in read_tensor_index(sharded)[0].values()}) == 2
    assert greedy(sharded, PROMPT, 8, dtype="float32") == greedy(single, PROMPT, 8, dtype="float32")


def test_partial_load_reads_only_the_parts_tensors(tmp_path, monkeypatch):
    model_dir = make_random_model(tmp_path / "twelve", "llama", num_hidden_layers=12, shards=2)
    read: list[str] = []
    real_load = safetensors.load_tensor

    def recording_load(info, *args, **kwargs):
        read.append(info.name)
        return real_load(info, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "load_tensor", recording_load)
    spec = LayerRange(2, 4, has_embedding=False, has_head=False)
    load_part(Checkpoint.open(model_dir), spec, dtype="float32", device="cpu")
    assert sorted(read) == sorted(part_tensor_names(Checkpoint.open(model_dir).args, spec))
    assert {name.split(".")[2] for name in read} == {"2", "3"}


RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.loading import load_part
    from cakep2p.planner import LayerRange
    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    before = rss("VmRSS:")
    load_part(Checkpoint.open(sys.argv[1]), LayerRange(0, int(sys.argv[2]), False, False), dtype="float32", device="cpu")
    print(rss("VmHWM:") - before)
""")


def peak_rss_growth(model_dir: Path, layers: int) -> int:
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model_dir), str(layers)],
                            capture_output=True, text=True, timeout=120, check=True)
    return int(result.stdout.strip())


@pytest.mark.slow
def test_loading_two_of_twelve_layers_takes_a_fraction_of_the_memory(tmp_path):
    model_dir = make_random_model(tmp_path / "rss", "llama", num_hidden_layers=12, hidden_size=384,
                                  intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2)
    layer_bytes = sum(info.nbytes for name, info in read_tensor_index(model_dir)[0].items() if ".layers.0." in name)
    two, twelve = peak_rss_growth(model_dir, 2), peak_rss_growth(model_dir, 12)
    fixed_base = 32 * 2**20  # allocator and oneDNN code pages touched by the first packed weight
    assert two < 2 * layer_bytes * 1.2 + fixed_base
    assert twelve - two > 0.8 * 10 * layer_bytes
    assert twelve < 12 * layer_bytes * 1.2 + fixed_base


def test_from_tensors_equals_load(tiny_dir):
    from safetensors.torch import load_file

    args = Checkpoint.open(tiny_dir).args
    spec = LayerRange(0, args.num_layers, True, True)
    built = part_from_tensors(args, spec, "f32", load_file(tiny_dir / "model.safetensors"), "float32", "cpu")
    loaded = load_part(Checkpoint.open(tiny_dir), spec, dtype="float32", device="cpu")
    ids = torch.tensor(PROMPT)
    assert torch.equal(built(ids, 0, built.new_cache(8)), loaded(ids, 0, loaded.new_cache(8)))


def test_unpacked_weights_give_the_same_logits(tmp_path, monkeypatch):
    model_dir = make_random_model(tmp_path / "wide", "llama", hidden_size=256, intermediate_size=2048,
                                  vocab_size=4096, num_hidden_layers=2)
    packed = whole(model_dir, dtype="float32", device="cpu")
    monkeypatch.setenv("CAKEP2P_PACK", "0")
    dense = whole(model_dir, dtype="float32", device="cpu")
    assert not any(tensor.is_mkldnn for tensor in dense.weight_tensors())
    assert any(tensor.is_mkldnn for tensor in packed.weight_tensors()) == torch.backends.mkldnn.is_available()
    ids = torch.tensor(PROMPT)
    difference = (packed(ids, 0, packed.new_cache(8)) - dense(ids, 0, dense.new_cache(8))).abs().max().item()
    assert difference < 1e-4


# --- dtype and device -------------------------------------------------------------------------------------------

def test_auto_dtype_is_the_checkpoints(tmp_path):
    """16-bit weights compute in their own dtype where the CPU has bf16 arithmetic, in float32 elsewhere (the
    16 bits stay 16 bits in memory under fbgemm's fp16 kernel)."""
    model_dir = make_random_model(tmp_path / "bf16", "llama", dtype="bfloat16")
    assert whole(model_dir, device="cpu").dtype == (torch.bfloat16 if has_bf16_hardware() else torch.float32)
    assert whole(model_dir, dtype="float32", device="cpu").dtype == torch.float32


def test_unknown_dtype_is_refused(tiny_dir):
    with pytest.raises(ModelError, match="dtype .int8. is not supported"):
        whole(tiny_dir, dtype="int8")


def test_auto_device_prefers_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected


def test_bfloat16_generation_runs_and_float16_loads(tiny_dir):
    assert len(greedy(tiny_dir, PROMPT, 4, dtype="bfloat16", device="cpu")) == 4
    assert whole(tiny_dir, dtype="float16", device="cpu").dtype == torch.float16


# --- generation -------------------------------------------------------------------------------------------------

def test_reused_prefix_gives_the_same_tokens(tiny_dir):
    part = whole(tiny_dir, dtype="float32")
    expected = list(generate(LocalPipeline([part], 64), PROMPT + [50, 51], SamplingParams(max_new_tokens=6)))
    pipeline = LocalPipeline([part], 64)
    pipeline.forward(PROMPT, 0)
    resumed = list(generate(pipeline, PROMPT + [50, 51], SamplingParams(max_new_tokens=6), start_pos=len(PROMPT)))
    assert resumed == expected


def test_generate_stops_at_a_stop_token_and_yields_it(tiny_dir):
    tokens = greedy(tiny_dir, PROMPT, 6, dtype="float32")
    pipeline = LocalPipeline([whole(tiny_dir, dtype="float32")], 64)
    stopped = list(generate(pipeline, PROMPT, SamplingParams(max_new_tokens=6, stop_token_ids=frozenset({tokens[2]}))))
    assert stopped == tokens[:tokens.index(tokens[2]) + 1]


def test_generate_refuses_more_tokens_than_the_context(tiny_dir):
    pipeline = LocalPipeline([whole(tiny_dir, dtype="float32")], max_seq_len=8)
    with pytest.raises(ModelError, match="exceed the context of 8"):
        list(generate(pipeline, PROMPT, SamplingParams(max_new_tokens=10)))


def test_generate_refuses_an_empty_prompt(tiny_dir):
    pipeline = LocalPipeline([whole(tiny_dir, dtype="float32")], max_seq_len=8)
    with pytest.raises(ValueError, match="the prompt is empty"):
        list(generate(pipeline, [], SamplingParams(max_new_tokens=2)))


def test_closed_pipeline_refuses_to_run(tiny_dir):
    pipeline = LocalPipeline([whole(tiny_dir, dtype="float32")], max_seq_len=8)
    pipeline.close()
    with pytest.raises(ValueError, match="closed"):
        pipeline.forward(PROMPT, 0)


def test_pipeline_refuses_parts_that_do_not_cover_the_model(tiny_dir):
    part = load_part(Checkpoint.open(tiny_dir), LayerRange(0, 2, True, False), dtype="float32")
    with pytest.raises(ModelError, match="LM head"):
        LocalPipeline([part], 16)


# --- bad input --------------------------------------------------------------------------------------------------

def copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        whole(tmp_path / "nowhere")


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        whole(tmp_path / "empty")


def test_invalid_config_json_is_a_clear_error(tiny_dir, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not valid JSON"):
        whole(broken)


def test_config_missing_a_key_is_a_clear_error(tiny_dir, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="lacks the key 'hidden_size'"):
        whole(broken)


TINY_CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                   num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", 0), ("hidden_size", -64), ("hidden_size", 65536 * 4 + 2), ("num_attention_heads", 0),
    ("num_key_value_heads", -2), ("head_dim", -4), ("max_position_embeddings", -1), ("num_hidden_layers", 1e9),
    ("vocab_size", 2**22 + 1), ("intermediate_size", -16), ("hidden_size", True), ("num_hidden_layers", "4"),
    ("num_hidden_layers", 2.5),
])
def test_config_size_out_of_range_is_a_clear_error_naming_the_key(key, value):
    with pytest.raises(ModelError, match=rf"^config.json: {key} must be an integer in \[1, \d+\], got "):
        ModelArgs.from_config({**TINY_CONFIG, key: value})


def test_config_heads_that_do_not_divide_the_hidden_size_without_head_dim_is_a_clear_error():
    with pytest.raises(ModelError, match="hidden_size 8 is not a multiple of num_attention_heads 3"):
        ModelArgs.from_config({**TINY_CONFIG, "num_attention_heads": 3})
    assert ModelArgs.from_config({**TINY_CONFIG, "num_attention_heads": 3, "head_dim": 4}).head_dim == 4


def test_config_with_odd_head_dim_or_non_positive_eps_is_a_clear_error():
    with pytest.raises(ModelError, match="head_dim 3 must be even"):
        ModelArgs.from_config({**TINY_CONFIG, "head_dim": 3})
    with pytest.raises(ModelError, match="rms_norm_eps must be a positive number"):
        ModelArgs.from_config({**TINY_CONFIG, "rms_norm_eps": -1e-5})


def test_config_integral_floats_are_read_as_integers():
    assert ModelArgs.from_config({**TINY_CONFIG, "num_hidden_layers": 2.0}).num_layers == 2


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    model_dir = make_random_model(tmp_path / "gpt", "llama", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelError, match="'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM"):
        whole(model_dir)


def test_truncated_safetensors_is_a_clear_error(tiny_dir, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model.safetensors is truncated or corrupt \(tensor .* beyond"):
        whole(broken)


def test_header_length_beyond_the_file_is_a_clear_error(tiny_dir, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(ModelError, match="header length .* runs past the file size"):
        whole(broken)


def test_corrupt_header_is_a_clear_error(tiny_dir, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[8:16] = b"garbage!"
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="header is not valid JSON"):
        whole(broken)


def test_missing_tensor_is_a_clear_error(tiny_dir, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    shapes = {name: info.shape for name, info in read_tensor_index(tiny_dir)[0].items()}
    del shapes["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(broken / "model.safetensors", shapes, 0, torch.float32)
    with pytest.raises(ModelError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        whole(broken)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tiny_dir, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    shapes = {name: info.shape for name, info in read_tensor_index(tiny_dir)[0].items()}
    shapes["model.layers.0.self_attn.k_proj.weight"] = (16, 64)
    write_safetensors(broken / "model.safetensors", shapes, 0, torch.float32)
    with pytest.raises(ModelError, match=r"k_proj.weight has shape \[16, 64\], expected \[32, 64\]"):
        whole(broken)


def test_missing_shard_is_a_clear_error(tmp_path):
    model_dir = make_random_model(tmp_path / "sharded", "llama", shards=2)
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="names model-00002-of-00002.safetensors, which is missing"):
        whole(model_dir)


def test_cached_random_model_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CAKEP2P_MODEL_CACHE", str(tmp_path / "cache"))
    first = cached_random_model("qwen2", "tiny", seed=1)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_random_model("qwen2", "tiny", seed=1) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [first.name]
