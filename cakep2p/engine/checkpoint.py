"""A checkpoint, read once: `Checkpoint.open(path)` parses config.json and the tensor headers, and everything
above the engine (the planner's sizes, loading a part, the mesh's transfers, the tokenizer) is handed this value
instead of a bare path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from cakep2p.engine.config import ModelArgs
from cakep2p.engine.generation_config import GenerationDefaults, read_generation_defaults
from cakep2p.engine.safetensors import TensorInfo, load_tensor, mapped_tensor, read_tensor_index
from cakep2p.errors import ModelError

CONFIG_FILE = "config.json"
FINGERPRINT_CHARS = 32


@dataclass(frozen=True)
class Checkpoint:
    """A model on this machine: where it is, its shape, where each tensor lies, its identity and defaults."""

    path: Path                          # the model folder
    config_text: str                    # config.json as read (peers without the model receive it)
    args: ModelArgs
    tensors: Mapping[str, TensorInfo] = field(repr=False)
    fingerprint: str                    # sha256 of config.json and the tensor headers: cheap, not of the weights
    generation: GenerationDefaults

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Read a Hugging Face model folder's config.json and safetensors headers; ModelError with one clear line
        when it is missing, corrupt or of an unsupported architecture."""
        path = Path(path).expanduser()
        if not path.is_dir():
            if path.exists():
                raise ModelError(f"{path} is a file, not a model folder; pass the Hugging Face model directory")
            raise ModelError(f"model folder {path} does not exist; pass a Hugging Face model directory")
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise ModelError(f"model folder {path} has no config.json; is it a Hugging Face model directory?")
        try:
            config_text = config_path.read_text(encoding="utf-8")
            config = json.loads(config_text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"{config_path} is not valid JSON ({error}); restore the file") from None
        if not isinstance(config, dict):
            raise ModelError(f"{config_path} does not hold a JSON object; restore the file")
        args = ModelArgs.from_config(config, source=str(config_path))
        tensors, headers = read_tensor_index(path)
        digest = hashlib.sha256(b"cakep2p-model/v1\0" + config_text.encode("utf-8") + headers)
        return cls(path=path, config_text=config_text, args=args, tensors=tensors,
                   fingerprint=digest.hexdigest()[:FINGERPRINT_CHARS],
                   generation=read_generation_defaults(path, config))

    def info(self, name: str) -> TensorInfo:
        """Where the named tensor lies; ModelError when the checkpoint lacks it."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"model {self.path} lacks tensor {name}; the checkpoint is incomplete or of another "
                             "model") from None

    def load(self, name: str, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The named tensor converted to `dtype` (into `out` when given), reading only its bytes."""
        return load_tensor(self.info(name), dtype, out)

    def mapped(self, name: str) -> torch.Tensor:
        """The named tensor as stored, over a memory map (nothing is read until used)."""
        return mapped_tensor(self.info(name))

    def weight_bytes(self) -> int:
        """Bytes of every tensor as stored."""
        return sum(info.nbytes for info in self.tensors.values())
