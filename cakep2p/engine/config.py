"""ModelArgs: the few numbers our engine needs, read from a Hugging Face config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakep2p.errors import ModelError

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
TORCH_DTYPE_NAMES = ("float32", "bfloat16", "float16")
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
    """The shape of a Llama-family model; built with `ModelArgs.from_dir`."""

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
    def from_dir(cls, model_dir: str | Path) -> "ModelArgs":
        """Read `model_dir/config.json`; raises ModelError with one clear line when it is unusable."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelError(f"model folder {model_dir} does not exist; pass a Hugging Face model directory")
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ModelError(f"model folder {model_dir} has no config.json; is it a Hugging Face model directory?")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"{config_path} is not valid JSON ({error}); restore the file") from None
        if not isinstance(config, dict):
            raise ModelError(f"{config_path} does not hold a JSON object; restore the file")
        return cls.from_config(config, source=str(config_path))

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from an already parsed config dict (`source` names it in errors)."""
        architectures = config.get("architectures") or []
        architecture = architectures[0] if isinstance(architectures, list) and architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"{source}: architecture {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def required(key: str) -> Any:
            if key not in config or config[key] is None:
                raise ModelError(f"{source} lacks the key {key!r}; restore the model's config.json")
            return config[key]

        def count(key: str, high: int, default: int | None = None) -> int:
            value = required(key) if default is None else (config.get(key) or default)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if type(value) is not int or not 1 <= value <= high:
                raise ModelError(f"{source}: {key} must be an integer in [1, {high}], got {str(value)[:40]}; "
                                 "restore the model's config.json")
            return value

        hidden_size = count("hidden_size", MAX_HIDDEN)
        num_heads = count("num_attention_heads", MAX_HEADS)
        if not config.get("head_dim") and hidden_size % num_heads:
            raise ModelError(f"{source}: hidden_size {hidden_size} is not a multiple of num_attention_heads "
                             f"{num_heads} and no head_dim is given; restore the model's config.json")
        num_kv_heads = count("num_key_value_heads", MAX_HEADS, default=num_heads)
        head_dim = count("head_dim", MAX_HEAD_DIM, default=hidden_size // num_heads)
        if head_dim % 2:
            raise ModelError(f"{source}: head_dim {head_dim} must be even for rotary embeddings; "
                             "restore the model's config.json")
        sizes = {"vocab_size": count("vocab_size", MAX_VOCAB),
                 "intermediate_size": count("intermediate_size", MAX_INTERMEDIATE),
                 "num_layers": count("num_hidden_layers", MAX_LAYERS)}
        max_positions = count("max_position_embeddings", MAX_CONTEXT, default=2048)
        try:
            rope = _rope_settings(config)
            rope_theta = float(rope.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
            rope_type = rope.get("rope_type", "default")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ModelError(
                    f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type == "llama3":
                rope.setdefault("original_max_position_embeddings", max_positions)
            family_is_qwen2 = architecture == "Qwen2ForCausalLM"
            # Mistral windows every layer; Qwen's optional per-layer windows (use_sliding_window, off in
            # released checkpoints) are not modelled: attention is full, exact up to the window length.
            windowed = architecture == "MistralForCausalLM" and config.get("sliding_window")
            sliding_window = count("sliding_window", MAX_CONTEXT) if windowed else None
            args = cls(
                architecture=architecture,
                hidden_size=hidden_size,
                **sizes,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(config.get("rms_norm_eps") or 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope if rope_type != "default" else None,
                max_position_embeddings=max_positions,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=True if family_is_qwen2 else bool(config.get("attention_bias", False)),
                qk_norm=architecture == "Qwen3ForCausalLM",
                torch_dtype=_dtype_name(config),
                sliding_window=sliding_window,
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
    return name if name in TORCH_DTYPE_NAMES else "float32"
