"""Seeded random Hugging Face checkpoints of any supported family and size, for tests and benchmarks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from cakep2p.engine.dtypes import float_dtype
from cakep2p.engine.safetensors import Entry, raw_bytes
from cakep2p.engine.safetensors import write_safetensors as write_safetensors_file

FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BASE_CHARACTERS = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'"
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CACHE_VERSION = "v1"


def model_config(family: str, preset: str = "tiny", dtype: str = "float32", **overrides: Any) -> dict[str, Any]:
    """The config.json dict for a family and preset; `overrides` replace or add keys."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    architecture, model_type = FAMILIES[family]
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        **PRESETS[preset],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5 if family in ("llama", "mistral") else 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": dtype,
        "attention_dropout": 0.0,
    }
    if family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if family == "mistral":
        config.update(sliding_window=None)
    if family in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    if family == "qwen3":
        config.update(attention_bias=False, head_dim=2 * config["hidden_size"] // config["num_attention_heads"])
    config.update(overrides)
    if "rope_scaling" in overrides or "rope_theta" in overrides:
        config.pop("rope_parameters", None)
    return config


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, with its HF name and shape."""
    hidden, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    architecture = config["architectures"][0]
    has_bias = architecture == "Qwen2ForCausalLM" or config.get("attention_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for index in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{index}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            shapes[prefix + f"self_attn.{name}_proj.weight"] = (rows, hidden)
            if has_bias:
                shapes[prefix + f"self_attn.{name}_proj.bias"] = (rows,)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if has_bias and architecture != "Qwen2ForCausalLM":
            shapes[prefix + "self_attn.o_proj.bias"] = (hidden,)
        if architecture == "Qwen3ForCausalLM":
            shapes[prefix + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[prefix + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes[prefix + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 tensor that depends only on (name, seed); scaled so logits are peaked, not flat."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    values = torch.randn(shape, generator=generator)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * values
    if name.endswith(".bias"):
        return 0.1 * values
    if name == "model.embed_tokens.weight":
        return values
    return values * shape[-1] ** -0.5


def make_random_model(out_dir: str | Path, family: str, *, preset: str = "tiny", seed: int = 0,
                      dtype: str = "float32", shards: int = 1, **overrides: Any) -> Path:
    """Write config, weights (HF names; `shards` > 1 writes an index), generation config and tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = float_dtype(dtype)
    config = model_config(family, preset, dtype, **overrides)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2))
    write_tokenizer(out_dir, config["vocab_size"])
    shapes = tensor_shapes(config)
    names = list(shapes)
    if shards <= 1:
        write_safetensors(out_dir / "model.safetensors", shapes, seed, torch_dtype)
        return out_dir
    groups = [names[index * len(names) // shards:(index + 1) * len(names) // shards] for index in range(shards)]
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        total += write_safetensors(out_dir / file_name, {n: shapes[n] for n in group}, seed, torch_dtype)
        weight_map.update({name: file_name for name in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> int:
    """Stream random tensors into one .safetensors file, one tensor in memory at a time; returns data bytes."""
    entries = [Entry(name, dtype, shape, math.prod(shape) * dtype.itemsize) for name, shape in shapes.items()]

    def write_data(handle) -> None:
        for name, shape in shapes.items():
            handle.write(raw_bytes(random_tensor(name, shape, seed).to(dtype)))

    write_safetensors_file(path, entries, write_data, {"format": "pt"})
    return sum(entry.nbytes for entry in entries)


def _pieces(count: int) -> Iterator[str]:
    """Deterministic BPE pieces: the base characters, then left+right merges of earlier pieces."""
    pieces = list(BASE_CHARACTERS)
    seen = set(pieces)
    yield from pieces[:count]
    produced, left = min(count, len(pieces)), 0
    while produced < count:
        for right in BASE_CHARACTERS[1:]:
            piece = pieces[left] + right
            if piece not in seen and produced < count:
                seen.add(piece)
                pieces.append(piece)
                produced += 1
                yield piece
        left += 1


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for piece in sorted(vocab, key=vocab.get):
        if len(piece) > 1 and not piece.startswith("<"):
            merges.append((piece[:-1], piece[-1]))
    return merges


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A Llama-style byte-fallback BPE tokenizer with exactly `vocab_size` ids (plus tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < fixed + len(BASE_CHARACTERS):
        raise ValueError(f"vocab_size must be at least {fixed + len(BASE_CHARACTERS)} for the test tokenizer")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{byte:02X}>": len(SPECIAL_TOKENS) + byte for byte in range(256)})
    for piece in _pieces(vocab_size - fixed):
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=_merges(vocab), unk_token="<unk>", byte_fallback=True,
                              fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def model_cache_root() -> Path:
    """$CAKEP2P_MODEL_CACHE, default ~/.cache/cakep2p-models (outside the repository)."""
    return Path(os.environ.get("CAKEP2P_MODEL_CACHE") or Path.home() / ".cache" / "cakep2p-models")


def cached_random_model(family: str, preset: str, seed: int = 0, dtype: str = "float32") -> Path:
    """make_random_model once per (family, preset, seed, dtype); later calls return the cached folder."""
    root = model_cache_root()
    target = root / f"{family}-{preset}-seed{seed}-{dtype}-{CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        make_random_model(building, family, preset=preset, seed=seed, dtype=dtype)
        os.rename(building, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target
