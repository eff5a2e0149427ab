"""The GGUF reader, checked against transformers' GGUF loader, gguf-py's reference dequantizers,
stories260K's HF conversion and tokenizer.json, and corrupted copies of real files."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import gguf
import jinja2.sandbox
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from cakep2p.engine.gguf_file import open_gguf
from cakep2p.engine.gguf_quants import QuantBlocks, dequantize, dequantize_raw, quantized_blocks, unpermute_rows
from cakep2p.engine.gguf_tokenizer import PRE_TOKENIZERS, build_tokenizer
from cakep2p.errors import ModelError

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
SMOL_DIR = Path(os.environ.get("CAKEP2P_TEST_GGUF", MODELS / "SmolLM2-135M-Instruct-Q4_1"))
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES_DIR = Path(os.environ.get("CAKEP2P_TEST_MODEL", MODELS / "stories260K"))
STORIES = STORIES_DIR / "llama2c" / "stories260K.gguf"
pytestmark = pytest.mark.skipif(not (SMOL_DIR / SMOL_NAME).is_file() or not STORIES.is_file(),
                                reason="test models are not on this machine")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# --- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return open_gguf(SMOL_DIR / SMOL_NAME)


@pytest.fixture(scope="module")
def stories():
    return open_gguf(STORIES)


@pytest.fixture(scope="module")
def hf_state(smol_transformers):
    return smol_transformers.state_dict()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_NAME)


@pytest.fixture(scope="module")
def smol_tokenizer(smol):
    return build_tokenizer(smol)


def corpus() -> list[str]:
    """A few hundred strings: scripts, numbers, whitespace, code, emoji and chat markers, then seeded mixtures."""
    base = [
        "Hello world", "The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
        "Hello, world! How are you today?", "I'm fine, thanks; and you?", "don't won't can't I'LL they've she'd",
        "'s 't 're 've 'm 'll 'd", "Wait... what?!", "(parentheses) [brackets] {braces} <angles>",
        "email@example.com https://example.org/path?q=1&r=2#frag", "#hashtag @mention $100 50% a+b=c ^ ~ | `",
        "1", "12", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "2024-01-15T10:30:00Z",
        " 42", "  7 8  9", "x=10**9+7", "+1 (555) 123-4567", "0.000001", "1e-5", "v1.2.3-rc4", "٣٤٥ ١٢", "Ⅻ ½ ²",
        "emoji 😀👍🏽", "😀😃😄😁", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "❤️ love", "🤖 robot 🚀 rocket",
        "中文测试", "你好，世界！", "日本語のテキスト", "ひらがな カタカナ", "한국어 문장입니다", "ภาษาไทย",
        "مرحبا بالعالم", "السلام عليكم ورحمة الله", "שלום עולם", "Привет, мир", "Γειά σου Κόσμε",
        "नमस्ते दुनिया", "naïve café résumé", "e\u0301 combining", "Zürich Straße", "İstanbul ıi",
        "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", " \t \n ", "\r\n", "a\r\nb",
        "  leading", "trailing  ", "  both  ", "multiple    internal   spaces", "a  b   c    d",
        "line one\nline two\n", "tab\tseparated\tvalues", "a\u00a0b non-breaking", "zero\u200bwidth",
        "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        '{"key": "value", "list": [1, 2, 3]}', "<html><body><p>Hi</p></body></html>",
        "SELECT * FROM users WHERE id = 42;", "import numpy as np\nnp.zeros((3, 4))", "^[a-z]+\\d{2,}$",
        "    indented code", "\tif x:\n\t\tpass", "x_1 = y__2 - z___3", "camelCaseWord snake_case_word",
        "<|im_start|>user\nHi<|im_end|>", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>", "text<|im_end|>more", "< |im_start| >", "<|im_start|", "<repo_name>x<file_sep>y",
        "<s>Hi</s> there", "<unk>", " <s> ", "ALL CAPS SENTENCE", "MiXeD cAsE", "ﬁ ligature", "™ © ® € £ ¥",
        "“curly quotes” ‘single’ — dash … ellipsis", "Ω≈ç√∫˜µ≤≥÷", "\\backslash\\ /slash/",
    ]
    fragments = [s for s in base if s] + [" ", "  ", "\n", "\t", "99", " 7", "é", "🙂", "<|im_end|>", "'s"]
    rng = random.Random(1234)
    mixtures = ["".join(rng.choice(fragments) for _ in range(rng.randint(2, 5))) for _ in range(200)]
    return base + mixtures


# --- config and tensor index ----------------------------------------------------------------------------

@pytest.mark.slow
def test_config_matches_transformers(smol):
    from transformers import AutoConfig
    reference = AutoConfig.from_pretrained(SMOL_DIR, gguf_file=SMOL_NAME).to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert smol.config[key] == reference[key], key
    assert smol.config["rope_theta"] == reference["rope_parameters"]["rope_theta"]
    assert reference["rope_parameters"]["rope_type"] == "default" and "rope_scaling" not in smol.config
    assert smol.config["architectures"] == ["LlamaForCausalLM"]
    assert smol.config["torch_dtype"] == "bfloat16"  # quantized file: QUANTIZED_TORCH_DTYPE


def test_config_is_accepted_by_model_args(smol, stories):
    config_module = pytest.importorskip("cakep2p.engine.config")
    args = config_module.ModelArgs.from_config(dict(smol.config), source=SMOL_NAME)
    shape = (args.num_layers, args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim)
    assert shape == (30, 576, 9, 3, 64)
    assert args.tie_word_embeddings and args.rope_theta == 100000.0 and args.rope_scaling is None
    tiny = config_module.ModelArgs.from_config(dict(stories.config))
    reference = json.loads((STORIES_DIR / "config.json").read_text())
    assert (tiny.hidden_size, tiny.num_kv_heads, tiny.head_dim) == (reference["hidden_size"], 4, 8)


@pytest.mark.slow
def test_tensor_index_matches_transformers(smol, hf_state):
    hf_names = set(hf_state) - {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    assert set(smol.tensors) == hf_names and len(hf_names) == 272
    reader_tensors = {t.name: t for t in smol.reader.tensors}
    with open(SMOL_DIR / SMOL_NAME, "rb") as handle:
        for name, record in smol.tensors.items():
            assert record.shape == tuple(hf_state[name].shape), name
            source = reader_tensors[record.gguf_name]
            assert (record.offset, record.nbytes) == (source.data_offset, source.n_bytes)
        record = smol.tensors["model.layers.7.self_attn.k_proj.weight"]
        handle.seek(record.offset)
        assert handle.read(record.nbytes) == reader_tensors[record.gguf_name].data.tobytes()
    kinds = {record.ggml_type for record in smol.tensors.values()}
    assert kinds == {T.Q4_1, T.Q8_0, T.F32}
    assert {r.rope_heads for n, r in smol.tensors.items() if n.endswith("q_proj.weight")} == {9}
    assert {r.rope_heads for n, r in smol.tensors.items() if n.endswith("k_proj.weight")} == {3}


# --- tensor values -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_tensor_equals_transformers(smol, hf_state):
    worst, exact = 0.0, 0
    for name in smol.tensors:
        ours = dequantize(smol, name)
        assert ours.dtype == torch.float32 and ours.shape == hf_state[name].shape, name
        diff = (ours - hf_state[name]).abs().max().item()
        worst, exact = max(worst, diff), exact + torch.equal(ours, hf_state[name])
    print(f"\nSmolLM2: {exact}/{len(smol.tensors)} tensors bit-identical to transformers, max abs diff {worst}")
    assert worst <= 1e-6 and exact == len(smol.tensors)


def test_stories_tensors_equal_hf_conversion(stories):
    from safetensors.torch import load_file
    reference = load_file(STORIES_DIR / "model.safetensors")
    assert set(stories.tensors) == set(reference) | {"lm_head.weight"}  # the GGUF stores the head separately
    for name, tensor in reference.items():
        assert torch.equal(dequantize(stories, name), tensor), name
    assert torch.equal(dequantize(stories, "lm_head.weight"), reference["model.embed_tokens.weight"])


def test_quantized_blocks_match_dequantize(smol):
    for name, record in smol.tensors.items():
        if record.ggml_type not in (T.Q4_1, T.Q8_0) or not (name.endswith("proj.weight") or "embed" in name):
            continue
        blocks = quantized_blocks(smol, name)
        rows, cols = record.shape
        assert blocks.codes.shape == (rows, cols) and blocks.scales.shape == (rows, cols // 32)
        assert blocks.scales.dtype == torch.float16
        if record.ggml_type == T.Q4_1:
            assert blocks.codes.dtype == torch.uint8 and int(blocks.codes.max()) <= 15
            assert blocks.mins is not None and blocks.mins.shape == blocks.scales.shape
        else:
            assert blocks.codes.dtype == torch.int8 and blocks.mins is None
        assert torch.equal(blocks.dequantize(), dequantize(smol, name)), name


QUANTIZABLE = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


@pytest.mark.parametrize("kind", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantizer_matches_gguf_on_quantized_data(kind):
    rng = np.random.default_rng(int(kind))
    values = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    packed = gguf.quants.quantize(values, kind)
    reference = gguf.quants.dequantize(packed, kind).reshape(-1)
    ours = dequantize_raw(torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(-1)), kind)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(reference)))
    assert (ours.reshape(values.shape) - torch.from_numpy(values)).abs().max() < 0.5 * np.abs(values).max()


def random_blocks(kind: T, count: int, seed: int) -> np.ndarray:
    """Random bytes in `kind`'s block layout, with finite, moderate float16 scale fields."""
    rng = np.random.default_rng(seed)
    _, size = GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (count, size), dtype=np.uint8)
    scale_at = {T.Q2_K: (80, 82), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2),
                T.Q5_0: (0,), T.Q5_1: (0, 2)}[kind]
    for start in scale_at:
        blocks[:, start:start + 2] = rng.uniform(-0.1, 0.1, count).astype(np.float16).view(np.uint8).reshape(count, 2)
    return blocks


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1],
                         ids=lambda t: t.name)
def test_dequantizer_matches_gguf_on_random_blocks(kind):
    blocks = random_blocks(kind, 300, int(kind))
    reference = gguf.quants.dequantize(blocks, kind).reshape(-1)
    ours = dequantize_raw(torch.from_numpy(blocks.reshape(-1)), kind)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(reference)))


# --- synthetic files: permutation, architectures, rope --------------------------------------------------

def byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return list(bytes_to_unicode().values())


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter, as an index rule: GGUF row h*D + 2i + s comes from HF row h*D + s*D/2 + i."""
    dim = weight.shape[0] // heads
    order = [h * dim + s * (dim // 2) + i for h in range(heads) for i in range(dim // 2) for s in range(2)]
    return weight[order]


def write_tiny(path: Path, arch: str = "llama", *, kind: T = T.F32, tokenizer: bool = True, pre: str = "gpt2",
               extra: dict | None = None, rope_freqs: np.ndarray | None = None, seed: int = 0,
               skip_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A one-layer model (hidden 256, 4 heads / 2 kv heads of 64) with a 261-token byte-level vocabulary.
    Returns the HF-layout float32 weights as written (before any quantization)."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, head_dim, ffn = 256, 4, 2, 64, 512
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_alphabet() + ["Ġt", "he"]
    writer = gguf.GGUFWriter(str(path), arch)
    values = {f"{arch}.block_count": 1, f"{arch}.context_length": 4096, f"{arch}.embedding_length": hidden,
              f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": heads,
              f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
              f"{arch}.rope.freq_base": 500000.0, **(extra or {})}
    for key, value in values.items():
        if key in skip_keys:
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    if tokenizer:
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", pre)
        writer.add_array("tokenizer.ggml.tokens", tokens)
        writer.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (len(tokens) - 3))
        writer.add_array("tokenizer.ggml.merges", ["Ġ t", "h e"])
        writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
        writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (heads * head_dim, hidden), "blk.0.attn_k.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_v.weight": (kv_heads * head_dim, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    if arch == "qwen2":
        shapes.update({f"blk.0.attn_{x}.bias": (n * head_dim,) for x, n in (("q", heads), ("k", kv_heads),
                                                                             ("v", kv_heads))})
    if arch == "qwen3":
        shapes.update({"blk.0.attn_q_norm.weight": (head_dim,), "blk.0.attn_k_norm.weight": (head_dim,)})
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, weight in weights.items():
        stored = weight
        if arch == "llama" and ".attn_q." in name or arch == "llama" and ".attn_k." in name:
            stored = llama_permute(weight, heads if ".attn_q." in name else kv_heads)
        if weight.ndim == 2 and kind in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K):
            rows, cols = weight.shape
            writer.add_tensor(name, random_blocks(kind, rows * cols // 256, seed).reshape(rows, -1), raw_dtype=kind)
            weights[name] = None  # values defined by the random blocks
        elif weight.ndim == 2 and kind != T.F32:
            writer.add_tensor(name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, stored)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: weight for name, weight in weights.items()}


def test_llama_qk_permutation_is_undone(tmp_path):
    weights = write_tiny(tmp_path / "tiny.gguf")
    tiny = open_gguf(tmp_path / "tiny.gguf")
    assert tiny.tensors["model.layers.0.self_attn.q_proj.weight"].rope_heads == 4
    assert tiny.tensors["model.layers.0.self_attn.k_proj.weight"].rope_heads == 2
    for gguf_name, hf_name in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
                               ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight")):
        assert np.array_equal(dequantize(tiny, hf_name).numpy(), weights[gguf_name]), hf_name
    # the rule itself, row by row, for head_dim 64: HF row h*64 + j <- GGUF row h*64 + 2*(j % 32) + j // 32
    rows = torch.arange(4 * 64).unsqueeze(1).float()
    undone = unpermute_rows(torch.from_numpy(llama_permute(rows.numpy(), 4)), 4)
    assert torch.equal(undone, rows)


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_quantized_permutation_keeps_codes_and_scales_together(tmp_path, kind):
    weights = write_tiny(tmp_path / "tiny.gguf", kind=kind)
    tiny = open_gguf(tmp_path / "tiny.gguf")
    for gguf_name, hf_name, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                                      ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 2)):
        blocks = quantized_blocks(tiny, hf_name)
        values = dequantize(tiny, hf_name)
        assert torch.equal(blocks.dequantize(), values)
        # dequantizing the stored (permuted) matrix with gguf-py, then un-permuting, gives the same values
        stored = gguf.quants.dequantize(gguf.quants.quantize(llama_permute(weights[gguf_name], heads), kind), kind)
        assert torch.equal(values, unpermute_rows(torch.from_numpy(stored), heads))
        assert (values - torch.from_numpy(weights[gguf_name])).abs().max() < 0.6  # close to the HF weights


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_k_quant_files_dequantize_per_tensor(tmp_path, kind):
    write_tiny(tmp_path / "tiny.gguf", kind=kind)
    tiny = open_gguf(tmp_path / "tiny.gguf")
    record = tiny.tensors["model.layers.0.self_attn.q_proj.weight"]
    raw = gguf.GGUFReader(tmp_path / "tiny.gguf").tensors
    stored = next(t for t in raw if t.name == "blk.0.attn_q.weight")
    reference = gguf.quants.dequantize(stored.data, kind)
    assert torch.equal(dequantize(tiny, record.name), unpermute_rows(torch.from_numpy(reference), 4))
    with pytest.raises(ModelError, match="only Q8_0, Q4_0 and Q4_1"):
        quantized_blocks(tiny, record.name)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_files_are_not_permuted(tmp_path, arch):
    weights = write_tiny(tmp_path / "tiny.gguf", arch, pre="qwen2",
                         extra={f"{arch}.attention.key_length": 64} if arch == "qwen3" else None)
    tiny = open_gguf(tmp_path / "tiny.gguf")
    assert tiny.config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert tiny.config["head_dim"] == 64 and tiny.config["torch_dtype"] == "float32"
    assert all(record.rope_heads is None for record in tiny.tensors.values())
    extra = {"qwen2": ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias"],
             "qwen3": ["model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"]}[arch]
    gguf_names = {record.name: record.gguf_name for record in tiny.tensors.values()}
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", *extra]:
        assert np.array_equal(dequantize(tiny, name).numpy(), weights[gguf_names[name]]), name
    config_module = pytest.importorskip("cakep2p.engine.config")
    args = config_module.ModelArgs.from_config(dict(tiny.config))
    assert args.attention_bias == (arch == "qwen2") and args.qk_norm == (arch == "qwen3")


def llama3_rope_freqs(dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for a llama3-scaled model."""
    result = []
    for inv in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / inv
        if wavelen < original / high:
            result.append(1.0)
        elif wavelen > original / low:
            result.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            result.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(result)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    freqs = llama3_rope_freqs(64, 500000.0, 8.0, 1.0, 4.0, 8192)
    write_tiny(tmp_path / "tiny.gguf", rope_freqs=freqs)
    tiny = open_gguf(tmp_path / "tiny.gguf")
    assert tiny.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in {record.gguf_name for record in tiny.tensors.values()}
    rope = pytest.importorskip("cakep2p.engine.rope")
    from cakep2p.engine.config import ModelArgs
    ours = rope.inverse_frequencies(ModelArgs.from_config(dict(tiny.config)))
    expected = 1.0 / 500000.0 ** (torch.arange(0, 64, 2).double() / 64) / torch.from_numpy(freqs)
    assert torch.allclose(ours.double(), expected, rtol=1e-5)


def test_linear_and_yarn_rope_metadata(tmp_path):
    write_tiny(tmp_path / "linear.gguf", extra={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert open_gguf(tmp_path / "linear.gguf").config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    write_tiny(tmp_path / "yarn.gguf", extra={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ModelError, match="rope scaling 'yarn' is not supported"):
        open_gguf(tmp_path / "yarn.gguf")


# --- tokenizer -----------------------------------------------------------------------------------------

def smollm_reference(hf_tokenizer):
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer (individual digits, then GPT-2 byte-level),
    which is also what llama.cpp does for tokenizer.ggml.pre = smollm."""
    from tokenizers import Tokenizer, pre_tokenizers
    reference = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return reference


@pytest.mark.slow
def test_smol_tokenizer_matches_transformers(smol_tokenizer, hf_tokenizer):
    raw, config, eos_ids, bos_id = smol_tokenizer
    reference = smollm_reference(hf_tokenizer)
    texts = corpus()
    differing = []
    for text in texts:
        for special in (True, False):
            ours = raw.encode(text, add_special_tokens=special).ids
            assert ours == reference.encode(text, add_special_tokens=special).ids, text
            theirs = hf_tokenizer.encode(text, add_special_tokens=special)
            if ours != theirs:  # allowed only where SmolLM2's digit split changes the pre-tokenization
                pieces = [piece for piece, _ in reference.pre_tokenizer.pre_tokenize_str(text)]
                plain = [piece for piece, _ in hf_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
                assert pieces != plain, text
                differing.append(text)
        ids = raw.encode(text).ids
        assert raw.decode(ids, skip_special_tokens=False) == text
        assert raw.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)
        assert raw.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    print(f"\nSmolLM2 tokenizer: {len(texts)} strings x2, all equal to transformers + SmolLM2's digit split; "
          f"{len(set(differing))} differ from plain transformers (no digit split): {sorted(set(differing))[:6]}")
    assert raw.encode("<|im_start|>user\nHi<|im_end|>").ids == [1, 4093, 198, 26843, 2]
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert eos_ids == {2} and bos_id == 1 and config["chat_template"] == hf_tokenizer.chat_template


@pytest.mark.slow
def test_smol_chat_template_matches_transformers(smol_tokenizer, hf_tokenizer):
    raw, config, eos_ids, bos_id = smol_tokenizer
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = environment.from_string(config["chat_template"]).render(messages=MESSAGES, add_generation_prompt=True)
    expected = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == expected and text.endswith("<|im_start|>assistant\n")
    expected_ids = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    expected_ids = expected_ids["input_ids"] if not isinstance(expected_ids, list) else expected_ids
    assert raw.encode(text, add_special_tokens=False).ids == list(expected_ids)
    engine = pytest.importorskip("cakep2p.engine.tokenizer")
    wrapped = engine.Tokenizer(raw, name=SMOL_NAME, tokenizer_config=config, chat_template=config["chat_template"],
                               eos_ids=eos_ids, bos_id=bos_id)
    prompt = wrapped.apply_chat_template(MESSAGES)
    assert wrapped.encode(prompt, add_special_tokens=False) == list(expected_ids)
    assert not wrapped.adds_bos and wrapped.eos_ids == {2}


def test_stories_tokenizer_matches_tokenizer_json(stories):
    from tokenizers import Tokenizer
    raw, config, eos_ids, bos_id = build_tokenizer(stories)
    reference = Tokenizer.from_file(str(STORIES_DIR / "tokenizer.json"))
    rows = json.loads((STORIES_DIR / "VERIFICATION.json").read_text())["tokenizer"]["rows"]
    for row in rows:
        assert raw.encode(row["text"]).ids == row["tokenizer_json_ids"] == row["llama2c_ids"], row["text"]
        assert raw.decode(row["tokenizer_json_ids"]) == row["text"]
    texts = corpus()
    for text in texts:
        for special in (True, False):
            assert raw.encode(text, add_special_tokens=special).ids == \
                reference.encode(text, add_special_tokens=special).ids, text
        ids = raw.encode(text).ids
        assert raw.decode(ids) == reference.decode(ids)
        assert raw.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
    print(f"\nstories260K tokenizer: {len(rows)} VERIFICATION rows and {len(texts)} strings x2 equal tokenizer.json")
    tokenizer_config = json.loads((STORIES_DIR / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token"):
        assert config[key] == tokenizer_config[key], key
    assert config["chat_template"] is None and eos_ids == {2} and bos_id == 1


def test_pre_tokenizer_regexes_agree_with_transformers_table():
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    for name in ("llama-bpe", "llama3", "qwen2", "tekken", "deepseek-r1-qwen"):
        ours = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(s), "isolated")
                                        for s in PRE_TOKENIZERS[name].splits])
        theirs = pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[name]), "isolated")
        for text in corpus():
            assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), (name, text)


# --- bad files -----------------------------------------------------------------------------------------

def writable_copy(tmp_path: Path, name: str = "copy.gguf") -> Path:
    target = tmp_path / name
    shutil.copyfile(STORIES, target)
    os.chmod(target, 0o644)
    return target


def patch_tensor_info(path: Path, tensor: str, part: int, value: int) -> None:
    """Overwrite one field of a tensor's header entry in place (part 4: ggml type, part 5: data offset)."""
    reader = gguf.GGUFReader(path, "r+")
    field = next(t.field for t in reader.tensors if t.name == tensor)
    field.parts[part][0] = value
    reader.data.flush()
    del reader


def assert_one_line(path: Path, *phrases: str) -> str:
    with pytest.raises(ModelError) as caught:
        build_tokenizer(open_gguf(path))
    message = str(caught.value)
    assert "\n" not in message and all(phrase in message for phrase in phrases), message
    return message


def test_bad_magic(tmp_path):
    path = writable_copy(tmp_path)
    with open(path, "r+b") as handle:
        handle.write(b"GGML")
    assert_one_line(path, "copy.gguf", "is not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_one_line(tmp_path / "empty.gguf", "is not a GGUF file")
    (tmp_path / "stub.gguf").write_bytes(b"GGUF\x03")
    assert_one_line(tmp_path / "stub.gguf", "is truncated")
    assert_one_line(tmp_path / "missing.gguf", "does not exist")


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(tmp_path, version):
    path = writable_copy(tmp_path)
    with open(path, "r+b") as handle:
        handle.seek(4)
        handle.write(version.to_bytes(4, "little"))
    expected = "big-endian" if version == 0x03000000 else f"GGUF version {version}, which is not supported"
    assert_one_line(path, expected)


@pytest.mark.parametrize("keep", [30, 5000, 14100])
def test_truncated_header(tmp_path, keep):
    path = tmp_path / "cut.gguf"
    path.write_bytes(STORIES.read_bytes()[:keep])
    assert_one_line(path, "cut.gguf", "truncated or corrupt")


def test_truncated_data(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(STORIES.read_bytes()[:600_000])
    assert_one_line(path, "cut.gguf: tensor", "needs bytes", "truncated")


def test_unknown_tensor_type(tmp_path):
    path = writable_copy(tmp_path)
    patch_tensor_info(path, "blk.2.attn_v.weight", 4, 99)
    assert_one_line(path, "'blk.2.attn_v.weight'", "unknown ggml type 99")


def test_unsupported_tensor_type(tmp_path):
    write_tiny(tmp_path / "q2k.gguf", kind=T.Q2_K)
    assert_one_line(tmp_path / "q2k.gguf", "is Q2_K, which is not supported")


def test_tensor_data_beyond_end_of_file(tmp_path):
    path = writable_copy(tmp_path)
    patch_tensor_info(path, "blk.0.attn_q.weight", 5, 1 << 40)
    assert_one_line(path, "'blk.0.attn_q.weight' needs bytes", "file has only")


@pytest.mark.parametrize("arch", ["gemma2", "phi3", "mamba"])
def test_unsupported_architecture(tmp_path, arch):
    write_tiny(tmp_path / "other.gguf", arch)
    assert_one_line(tmp_path / "other.gguf", f"architecture {arch!r} is not supported", "llama, qwen2, qwen3")


def test_missing_tokenizer_metadata(tmp_path):
    write_tiny(tmp_path / "notok.gguf", tokenizer=False)
    assert_one_line(tmp_path / "notok.gguf", "has no tokenizer", "tokenizer.ggml.model")


def test_missing_hyperparameter(tmp_path):
    write_tiny(tmp_path / "nolayers.gguf", skip_keys=("llama.block_count",))
    assert_one_line(tmp_path / "nolayers.gguf", "lacks the metadata key llama.block_count")


def test_unknown_pre_tokenizer(tmp_path):
    write_tiny(tmp_path / "pre.gguf", pre="made-up")
    assert_one_line(tmp_path / "pre.gguf", "pre-tokenizer 'made-up' is not supported")


def test_quantized_blocks_rejects_other_types(stories):
    with pytest.raises(ModelError, match="only Q8_0, Q4_0 and Q4_1"):
        quantized_blocks(stories, "model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ModelError, match="has no tensor"):
        dequantize(stories, "model.layers.9.mlp.up_proj.weight")
    assert isinstance(QuantBlocks, type)
