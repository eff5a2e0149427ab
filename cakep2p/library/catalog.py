"""The recommended models: a short, hand-checked list of instruction-tuned models our engine runs, each in the formats
people download (safetensors from the original repository, a GGUF quantization from a well-known converter).

Sizes are the files' approximate sizes on the hub (rounded, decimal units as the hub shows them); the shape is each
model's config.json, so that whether the cluster can hold a model is known before a byte is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ModelFormat = Literal["safetensors", "gguf"]
SAFETENSORS_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer*")   # a Hugging Face folder, no other weights
GGUF_Q4_K_M = ("*Q4_K_M.gguf", "*q4_k_m.gguf")                               # one file; split files do not match
MB = 1000 ** 2
GB = 1000 ** 3


@dataclass(frozen=True)
class Variant:
    """One format of a model: where it is on the hub, which of its files make it, and about how big they are."""

    format: ModelFormat
    repo: str                      # owner/name on the hub
    patterns: tuple[str, ...]      # the files to fetch (fnmatch patterns, matched without regard to case)
    approx_bytes: int              # the files' size, approximately (the hub's listing says the exact size)
    quantization: str              # "bf16", "Q4_K_M": what the weights are stored as

    @property
    def label(self) -> str:
        return f"GGUF {self.quantization}" if self.format == "gguf" else f"safetensors {self.quantization}"


@dataclass(frozen=True)
class CatalogEntry:
    """A recommended model: what it is, its shape (config.json), and its formats."""

    key: str
    title: str
    parameters: str                # "135M", "1.5B"
    summary: str
    license: str
    config: dict[str, Any]
    variants: tuple[Variant, ...]

    def variant(self, model_format: ModelFormat) -> Variant | None:
        return next((variant for variant in self.variants if variant.format == model_format), None)


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, context: int,
           rope_theta: float, tied: bool = True, **extra: Any) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": vocab, "max_position_embeddings": context, "rope_theta": rope_theta,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, "torch_dtype": "bfloat16", **extra}


def _qwen2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
           tied: bool) -> dict[str, Any]:
    return {**_llama(hidden, intermediate, layers, heads, kv_heads, vocab, 32768, 1000000.0, tied),
            "architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-6}


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _formats(safetensors_repo: str, safetensors_bytes: int, gguf_repo: str, gguf_bytes: int) -> tuple[Variant, ...]:
    return (Variant("gguf", gguf_repo, GGUF_Q4_K_M, gguf_bytes, "Q4_K_M"),
            Variant("safetensors", safetensors_repo, SAFETENSORS_FILES, safetensors_bytes, "bf16"))


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("smollm2-135m", "SmolLM2 135M Instruct", "135M",
                 "Hugging Face's smallest chat model: quick on any machine, good for trying things out.", "Apache-2.0",
                 _llama(576, 1536, 30, 9, 3, 49152, 8192, 100000.0),
                 _formats("HuggingFaceTB/SmolLM2-135M-Instruct", 269 * MB,
                          "bartowski/SmolLM2-135M-Instruct-GGUF", 105 * MB)),
    CatalogEntry("smollm2-360m", "SmolLM2 360M Instruct", "360M",
                 "A small chat model that still answers sensibly; fine on a laptop CPU.", "Apache-2.0",
                 _llama(960, 2560, 32, 15, 5, 49152, 8192, 100000.0),
                 _formats("HuggingFaceTB/SmolLM2-360M-Instruct", 724 * MB,
                          "bartowski/SmolLM2-360M-Instruct-GGUF", 271 * MB)),
    CatalogEntry("smollm2-1.7b", "SmolLM2 1.7B Instruct", "1.7B",
                 "The largest SmolLM2: a capable English assistant in a few GB.", "Apache-2.0",
                 _llama(2048, 8192, 24, 32, 32, 49152, 8192, 130000.0),
                 _formats("HuggingFaceTB/SmolLM2-1.7B-Instruct", 3420 * MB,
                          "bartowski/SmolLM2-1.7B-Instruct-GGUF", 1060 * MB)),
    CatalogEntry("qwen2.5-0.5b", "Qwen2.5 0.5B Instruct", "0.5B",
                 "Alibaba's smallest Qwen2.5: multilingual, 32K context.", "Apache-2.0",
                 _qwen2(896, 4864, 24, 14, 2, 151936, tied=True),
                 _formats("Qwen/Qwen2.5-0.5B-Instruct", 988 * MB, "bartowski/Qwen2.5-0.5B-Instruct-GGUF", 398 * MB)),
    CatalogEntry("qwen2.5-1.5b", "Qwen2.5 1.5B Instruct", "1.5B",
                 "A good all-round small assistant, multilingual, 32K context.", "Apache-2.0",
                 _qwen2(1536, 8960, 28, 12, 2, 151936, tied=True),
                 _formats("Qwen/Qwen2.5-1.5B-Instruct", 3090 * MB, "bartowski/Qwen2.5-1.5B-Instruct-GGUF", 986 * MB)),
    CatalogEntry("qwen2.5-7b", "Qwen2.5 7B Instruct", "7B",
                 "A strong assistant for coding and writing; worth spreading over several machines.", "Apache-2.0",
                 _qwen2(3584, 18944, 28, 28, 4, 152064, tied=False),
                 _formats("Qwen/Qwen2.5-7B-Instruct", 15230 * MB, "bartowski/Qwen2.5-7B-Instruct-GGUF", 4680 * MB)),
    CatalogEntry("llama3.2-1b", "Llama 3.2 1B Instruct", "1B",
                 "Meta's small Llama: multilingual chat with a 128K context window.", "Llama 3.2 Community License",
                 _llama(2048, 8192, 16, 32, 8, 128256, 131072, 500000.0, rope_scaling=LLAMA3_ROPE),
                 _formats("unsloth/Llama-3.2-1B-Instruct", 2470 * MB, "bartowski/Llama-3.2-1B-Instruct-GGUF",
                          808 * MB)),
    CatalogEntry("llama3.2-3b", "Llama 3.2 3B Instruct", "3B",
                 "Meta's 3B Llama: noticeably better answers than 1B, still laptop-sized.",
                 "Llama 3.2 Community License",
                 _llama(3072, 8192, 28, 24, 8, 128256, 131072, 500000.0, rope_scaling=LLAMA3_ROPE),
                 _formats("unsloth/Llama-3.2-3B-Instruct", 6430 * MB, "bartowski/Llama-3.2-3B-Instruct-GGUF",
                          2020 * MB)),
)


def entry(key: str) -> CatalogEntry:
    """The catalog entry `key`; KeyError naming the known keys otherwise."""
    for candidate in CATALOG:
        if candidate.key == key:
            return candidate
    raise KeyError(f"no model {key!r} in the catalog; known: {', '.join(item.key for item in CATALOG)}")
