"""A .gguf file, opened and checked: an HF-style config, an HF-named tensor index, and per-tensor dequantization."""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from cakep2p.errors import ModelError


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp's converter interleaves the two rotary halves of each q/k head for these architectures only.
PERMUTED_ARCHITECTURES = frozenset({"llama"})
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
READER_VERSIONS = (2, 3)
QUANTIZED_TORCH_DTYPE = "bfloat16"  # what a quantized file asks for; the originals are almost always bf16
FLOAT_DTYPES = {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}
FLOAT_TORCH = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}

_TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_REQUIRED_LAYER = ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                   "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"  # llama3-style per-frequency rope factors, folded into the config
_KNOWN_TYPES = frozenset(kind.value for kind in T)


@dataclass(frozen=True)
class TensorRecord:
    """Where one HF-named tensor lies in the file; `shape` is in HF order (rows first)."""

    name: str                 # HF name, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str            # e.g. blk.0.attn_q.weight
    ggml_type: T
    shape: tuple[int, ...]
    offset: int               # absolute byte offset of the data in the file
    nbytes: int
    rope_heads: int | None    # rows are llama.cpp's rope-interleaved order in this many heads; None if not


@dataclass(frozen=True)
class GGUFFile:
    """An opened .gguf: its metadata (scalars), HF-style config and HF-named tensor index."""

    path: Path
    architecture: str
    metadata: Mapping[str, Any] = field(repr=False)
    config: Mapping[str, Any] = field(repr=False)
    tensors: Mapping[str, TensorRecord] = field(repr=False)
    reader: GGUFReader = field(repr=False, compare=False)

    def header_bytes(self) -> bytes:
        """The file up to its first tensor's data: magic, metadata and tensor infos (what its identity hashes)."""
        start = min((record.offset for record in self.tensors.values()), default=len(self.reader.data))
        return bytes(self.reader.data[:start])

    def array(self, key: str) -> list | None:
        """A metadata array (tokens, merges, scores...) as a Python list; None when the key is absent."""
        value = self.reader.fields.get(key)
        if value is None:
            return None
        if value.types[:1] != [GGUFValueType.ARRAY]:
            raise ModelError(f"{self.path.name}: metadata {key} should be an array; the file is corrupt")
        try:
            return value.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as error:
            raise ModelError(f"{self.path.name}: metadata {key} is unreadable ({error}); the file is corrupt") from None

    def array_length(self, key: str) -> int:
        """How many items a metadata array holds (0 when absent), without decoding them."""
        value = self.reader.fields.get(key)
        return len(value.data) if value is not None and value.types[:1] == [GGUFValueType.ARRAY] else 0


class _CheckedReader(GGUFReader):
    """ggml's reader, checking each tensor's type and extent before it maps the data (so errors name the tensor)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for info in fields:
            _, name_data, _, dims, raw_type, relative = info.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            code = int(raw_type[0])
            if code not in _KNOWN_TYPES:
                raise ModelError(f"tensor {name!r} has unknown ggml type {code}; the file is corrupt or "
                                 "from a newer llama.cpp than this reader knows")
            block, type_size = GGML_QUANT_SIZES[T(code)]
            shape = [int(d) for d in dims]
            if not shape or shape[0] % block:
                raise ModelError(f"tensor {name!r} has shape {shape}, whose rows are not whole "
                                 f"{T(code).name} blocks of {block}; the file is corrupt")
            start = int(start_offs) + int(relative[0])
            end = start + math.prod(shape) // block * type_size
            if end > size:
                raise ModelError(f"tensor {name!r} needs bytes {start}..{end} but the file has only {size} bytes; "
                                 "the file is truncated or corrupt, download it again")
        super()._build_tensors(start_offs, fields)


def _read(path: Path) -> GGUFReader:
    name = path.name
    if not path.is_file():
        raise ModelError(f"{path} does not exist or is not a file; pass the path of a .gguf file")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] == b"GGUF" and size < 8:
        raise ModelError(f"{name} is truncated ({size} bytes); download the file again")
    if head[:4] != b"GGUF":
        raise ModelError(f"{name} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    (version,) = struct.unpack("<I", head[4:8])
    if version & 0xFFFF == 0 and version:
        raise ModelError(f"{name} is a big-endian GGUF, which is not supported; use a little-endian file")
    if version not in READER_VERSIONS:
        raise ModelError(f"{name} is GGUF version {version}, which is not supported (versions 2 and 3 are); "
                         "convert it again with a current llama.cpp")
    try:
        return _CheckedReader(path, "r")
    except ModelError as error:
        raise ModelError(f"{name}: {error}") from None
    except OSError as error:
        raise ModelError(f"cannot read {path} ({error.strerror or error}); check the path and its permissions") from None
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as error:
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ModelError(f"{name}: the GGUF header is truncated or corrupt ({detail}); "
                         "download the file again") from None


def _scalars(reader: GGUFReader, name: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in reader.fields.items():
        if value.types[:1] == [GGUFValueType.ARRAY]:
            continue
        try:
            values[key] = value.contents()
        except (UnicodeDecodeError, ValueError, IndexError):
            raise ModelError(f"{name}: metadata {key} is unreadable; the file is corrupt") from None
    return values


def open_gguf(path: str | Path) -> GGUFFile:
    """Open and check a .gguf (memory-mapped; no tensor data is read); ModelError with one line if unusable."""
    path = Path(path)
    reader = _read(path)
    metadata = _scalars(reader, path.name)
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ModelError(f"{path.name}: GGUF architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in reader.fields:
            raise ModelError(f"{path.name} has no tokenizer ({key} is missing from its metadata); "
                             "convert the model again with llama.cpp's convert_hf_to_gguf.py")
    raw = {t.name: t for t in reader.tensors}
    try:
        config = _config(path.name, architecture, metadata, raw, reader)
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise ModelError(f"{path.name} has an invalid metadata value ({error}); the file is corrupt") from None
    tensors = _index(path.name, architecture, config, raw)
    return GGUFFile(path=path, architecture=architecture, metadata=metadata, config=config,
                    tensors=tensors, reader=reader)


def _config(name: str, arch: str, meta: Mapping[str, Any], raw: Mapping[str, Any],
            reader: GGUFReader) -> dict[str, Any]:
    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        stored = reader.fields.get(f"{arch}.{key}")
        if stored is not None and stored.types[:1] == [GGUFValueType.ARRAY]:
            raise ModelError(f"{name}: {arch}.{key} varies per layer, which {ARCHITECTURES[arch]} does not support")
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ModelError(f"{name} lacks the metadata key {arch}.{key}; the file is incomplete")
        return value

    if "token_embd.weight" not in raw:
        raise ModelError(f"{name} lacks the tensor token_embd.weight; the file is incomplete")
    hidden, vocab = (int(d) for d in raw["token_embd.weight"].shape[:2])
    if get("vocab_size") not in (None, vocab):
        raise ModelError(f"{name}: {arch}.vocab_size {get('vocab_size')} disagrees with token_embd.weight "
                         f"({vocab} rows); the file is corrupt")
    heads = int(get("attention.head_count", required=True))
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else None)
    if head_dim is None and "blk.0.attn_q.weight" in raw and heads:
        head_dim = int(raw["blk.0.attn_q.weight"].shape[1]) // heads
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": int(get("embedding_length", required=True)),
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", required=True)),
        "tie_word_embeddings": "output.weight" not in raw,
        "torch_dtype": _torch_dtype(raw),
    }
    if hidden != config["hidden_size"]:
        raise ModelError(f"{name}: token_embd.weight has width {hidden}, not embedding_length "
                         f"{config['hidden_size']}; the file is corrupt")
    if head_dim:
        config["head_dim"] = int(head_dim)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in raw
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{gguf_key}"), int):
            config[key] = meta[f"tokenizer.ggml.{gguf_key}"]
    rope = _rope_scaling(name, arch, meta, raw, reader, config)
    if rope is not None:
        config["rope_scaling"] = rope
    return config


def _torch_dtype(raw: Mapping[str, Any]) -> str:
    """float32/float16/bfloat16 when every matrix is stored so; QUANTIZED_TORCH_DTYPE for a quantized file."""
    kinds = {T(int(t.tensor_type)) for t in raw.values() if len(t.shape) > 1}
    if len(kinds) == 1 and (kind := next(iter(kinds))) in FLOAT_DTYPES:
        return FLOAT_DTYPES[kind]
    return QUANTIZED_TORCH_DTYPE


def _rope_scaling(name: str, arch: str, meta: Mapping[str, Any], raw: Mapping[str, Any], reader: GGUFReader,
                  config: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if ROPE_FREQS in raw:
        return _llama3_from_freqs(name, config, np.array(raw[ROPE_FREQS].data, dtype=np.float64), original)
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ModelError(f"{name}: rope scaling {kind!r} is not supported (default, linear and llama3 are)")


def _llama3_from_freqs(name: str, config: Mapping[str, Any], freqs: np.ndarray,
                       original: int | None) -> dict[str, Any]:
    """Recover llama3 rope parameters from llama.cpp's rope_freqs tensor (per-frequency divisors).

    The llama3 rule depends only on original/low and original/high, so `original` is taken from the metadata
    (or Llama 3's 8192) and the two factors are fitted to the smooth band, then checked on every frequency.
    """
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config["rope_theta"]
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    factor = round(float(freqs.max()), 4)
    original = int(original or 8192)
    if freqs.shape != wavelen.shape or factor < 1:
        raise ModelError(f"{name}: {ROPE_FREQS} has {freqs.size} values for head_dim {dim}; the file is corrupt")
    if factor == 1:
        return {"rope_type": "default"}
    smooth_band = (freqs > 1 + 1e-6) & (freqs < factor * (1 - 1e-6))
    if smooth_band.sum() >= 2:
        smooth = (1 / freqs[smooth_band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(original / wavelen[smooth_band], smooth, 1)
        span = 1 / slope
        low, high = -intercept * span, -intercept * span + span
    else:
        low, high = 1.0, 4.0
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 4),
               "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": original}
    smooth = np.clip((original / wavelen - low) / (high - low), 0, 1)
    expected = 1 / ((1 - smooth) / factor + smooth)
    if not np.allclose(expected, freqs, rtol=1e-4):
        raise ModelError(f"{name}: {ROPE_FREQS} does not follow llama3 rope scaling; it is not supported")
    return scaling


def _index(name: str, arch: str, config: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, TensorRecord]:
    layers = config["num_hidden_layers"]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, TensorRecord] = {}
    for gguf_name, tensor in raw.items():
        match = _LAYER_NAME.fullmatch(gguf_name)
        if match and int(match[1]) < layers and match[2] in _LAYER:
            hf_name = f"model.layers.{match[1]}.{_LAYER[match[2]]}"
            kind = match[2].split(".")[0]
        elif gguf_name in _TOP_LEVEL:
            hf_name, kind = _TOP_LEVEL[gguf_name], ""
        elif gguf_name == ROPE_FREQS:
            continue
        else:
            raise ModelError(f"{name} holds the tensor {gguf_name!r}, which is not part of a {arch} model; "
                             "the file is not a plain checkpoint of a supported architecture")
        ggml_type = T(int(tensor.tensor_type))
        if ggml_type not in SUPPORTED_TYPES:
            raise ModelError(f"{name}: tensor {gguf_name} is {ggml_type.name}, which is not supported "
                             f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)}); use another quantization")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        rope_heads = heads.get(kind) if arch in PERMUTED_ARCHITECTURES else None
        if rope_heads and shape[0] % (2 * rope_heads):
            raise ModelError(f"{name}: {gguf_name} has {shape[0]} rows, not a whole number of even-sized heads "
                             f"for {rope_heads} heads; the file is corrupt")
        tensors[hf_name] = TensorRecord(hf_name, gguf_name, ggml_type, shape, int(tensor.data_offset),
                                        int(tensor.n_bytes), rope_heads)
    missing = [f"blk.{i}.{key}" for i in range(layers) for key in _REQUIRED_LAYER
               if f"blk.{i}.{key}" not in raw] + [key for key in ("output_norm.weight",) if key not in raw]
    if missing:
        raise ModelError(f"{name} lacks the tensor {missing[0]} ({len(missing)} missing); the file is incomplete")
    return tensors
