"""What a model on disk is, in a user's words: its format, how its weights are stored, and its real size."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakep2p.units import format_size

FLOAT_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64",
               "float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class ModelFacts:
    """`format`: "GGUF" or "safetensors"; `storage`: "Q4_1", "Q4_K_M", "bf16"…; `file_bytes`: on disk."""

    format: str
    storage: str
    file_bytes: int

    @property
    def text(self) -> str:
        """"GGUF Q4_1, 93.8 MiB" / "safetensors f32, 1020 KiB"."""
        return f"{self.format} {self.storage}, {format_size(self.file_bytes)}"


def facts_of(checkpoint: Any) -> ModelFacts:
    """The facts of an opened cakep2p.engine.checkpoint.Checkpoint."""
    if checkpoint.gguf is not None:
        return ModelFacts("GGUF", gguf_storage(checkpoint), checkpoint.path.stat().st_size)
    files = {Path(info.file) for info in checkpoint.tensors.values()}
    size = sum(path.stat().st_size for path in files if path.is_file())
    return ModelFacts("safetensors", _main_type(checkpoint), size)


def gguf_storage(checkpoint: Any) -> str:
    """The file's own name for its quantization (general.file_type, e.g. Q4_K_M), else its commonest block type."""
    file_type = checkpoint.gguf.metadata.get("general.file_type")
    try:
        import gguf

        name = gguf.LlamaFileType(int(file_type)).name
        return name.removeprefix("MOSTLY_").replace("ALL_", "")
    except (ImportError, TypeError, ValueError):
        return _main_type(checkpoint)


def _main_type(checkpoint: Any) -> str:
    """The type that holds most of the weight bytes."""
    by_bytes: Counter[str] = Counter()
    for info in checkpoint.tensors.values():
        by_bytes[str(info.dtype)] += int(info.nbytes)
    if not by_bytes:
        return "?"
    main = by_bytes.most_common(1)[0][0]
    return FLOAT_NAMES.get(main, main)
