"""ModelArgs: the few numbers our engine needs, from a Hugging Face config.json (parsed by Checkpoint.open)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cakep2p.engine.dtypes import FLOAT_WEIGHTS
from cakep2p.errors import ModelError

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# Upper bounds on a config's sizes: far above any released model, low enough that no byte count built from them
# is absurd (configs also arrive from the network, and the stage server budgets memory with them).
MAX_LAYERS = 1024
MAX_HIDDEN = 65536 * 4
MAX_INTERMEDIATE = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 22


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama-family model; built with `ModelArgs.from_config`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    torch_dtype: str
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from an already parsed config dict (`source` names it in errors)."""
        read = _ConfigReader(config, source)
        architectures = config.get("architectures") or []
        architecture = architectures[0] if isinstance(architectures, list) and architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"{source}: architecture {architecture!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        shape = _attention_shape(read)
        max_positions = read.count("max_position_embeddings", MAX_CONTEXT, default=2048)
        try:
            rope_theta, rope_scaling = _rope(read, max_positions)
            # Mistral windows every layer; Qwen's optional per-layer windows (use_sliding_window, off in
            # released checkpoints) are not modelled: attention is full, exact up to the window length.
            windowed = architecture == "MistralForCausalLM" and config.get("sliding_window")
            args = cls(
                architecture=architecture,
                vocab_size=read.count("vocab_size", MAX_VOCAB),
                intermediate_size=read.count("intermediate_size", MAX_INTERMEDIATE),
                num_layers=read.count("num_hidden_layers", MAX_LAYERS),
                **shape,
                rms_norm_eps=float(config.get("rms_norm_eps") or 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=max_positions,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=architecture == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
                qk_norm=architecture == "Qwen3ForCausalLM",
                torch_dtype=_dtype_name(config),
                sliding_window=read.count("sliding_window", MAX_CONTEXT) if windowed else None,
            )
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as error:
            raise ModelError(f"{source} has an invalid value ({error}); restore the model's config.json") from None
        for key, value in (("rms_norm_eps", args.rms_norm_eps), ("rope_theta", args.rope_theta)):
            if not math.isfinite(value) or value <= 0:
                raise ModelError(f"{source}: {key} must be a positive number, got {value}; "
                                 "restore the model's config.json")
        if args.num_heads % args.num_kv_heads != 0:
            raise ModelError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        return args


class _ConfigReader:
    """Typed, bounded reads of a config dict; every failure is one ModelError naming the key and the fix."""

    def __init__(self, config: dict[str, Any], source: str) -> None:
        self.config, self.source = config, source

    def required(self, key: str) -> Any:
        if key not in self.config or self.config[key] is None:
            raise ModelError(f"{self.source} lacks the key {key!r}; restore the model's config.json")
        return self.config[key]

    def count(self, key: str, high: int, default: int | None = None) -> int:
        """An integer in [1, high]; `default` only when the key is absent or null (0 is an error, not a default)."""
        value = self.required(key) if default is None or self.config.get(key) is not None else default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is not int or not 1 <= value <= high:
            raise ModelError(f"{self.source}: {key} must be an integer in [1, {high}], got {str(value)[:40]}; "
                             "restore the model's config.json")
        return value


def _attention_shape(read: _ConfigReader) -> dict[str, int]:
    hidden_size = read.count("hidden_size", MAX_HIDDEN)
    num_heads = read.count("num_attention_heads", MAX_HEADS)
    if not read.config.get("head_dim") and hidden_size % num_heads:
        raise ModelError(f"{read.source}: hidden_size {hidden_size} is not a multiple of num_attention_heads "
                         f"{num_heads} and no head_dim is given; restore the model's config.json")
    head_dim = read.count("head_dim", MAX_HEAD_DIM, default=hidden_size // num_heads)
    if head_dim % 2:
        raise ModelError(f"{read.source}: head_dim {head_dim} must be even for rotary embeddings; "
                         "restore the model's config.json")
    return {"hidden_size": hidden_size, "num_heads": num_heads, "head_dim": head_dim,
            "num_kv_heads": read.count("num_key_value_heads", MAX_HEADS, default=num_heads)}


def _rope(read: _ConfigReader, max_positions: int) -> tuple[float, dict | None]:
    """(rope_theta, the scaling dict or None for default rope)."""
    rope = _rope_settings(read.config)
    rope_theta = float(rope.pop("rope_theta", None) or read.config.get("rope_theta") or 10000.0)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"{read.source}: rope type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", max_positions)
    return rope_theta, rope if rope_type != "default" else None


def _rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The rope dict, from old-style `rope_scaling` or newer `rope_parameters` (transformers' priority order)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError("rope_scaling/rope_parameters must be an object")
    rope = dict(rope)
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    if "rope_theta" not in rope and isinstance(config.get("rope_parameters"), dict):
        rope["rope_theta"] = config["rope_parameters"].get("rope_theta")
    return rope


def _dtype_name(config: dict[str, Any]) -> str:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    name = str(name).removeprefix("torch.")
    return name if name in FLOAT_WEIGHTS else "float32"
