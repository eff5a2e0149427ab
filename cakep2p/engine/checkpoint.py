"""A checkpoint, read once: `Checkpoint.open(path)` parses a Hugging Face folder's config.json and safetensors
headers, or a GGUF file's metadata and tensor index, and everything above the engine (the planner's sizes, loading
a part, the mesh's transfers, the tokenizer) is handed this value instead of a bare path.
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
from cakep2p.engine.gguf_file import GGUFFile, open_gguf
from cakep2p.engine.gguf_quants import dequantize
from cakep2p.engine.gguf_tokenizer import special_token_ids
from cakep2p.engine.safetensors import MappedRows, TensorInfo, load_tensor, mapped_tensor, read_tensor_index
from cakep2p.errors import ModelError

CONFIG_FILE = "config.json"
GGUF_SUFFIX = ".gguf"
FINGERPRINT_CHARS = 32


@dataclass(frozen=True)
class Checkpoint:
    """A model on this machine: where it is, its shape, where each tensor lies, its identity and defaults."""

    path: Path                          # the model folder, or the .gguf file
    config_text: str                    # config.json as read, or the GGUF's metadata as one (what peers receive)
    args: ModelArgs
    tensors: Mapping[str, TensorInfo] = field(repr=False)   # by Hugging Face name, shapes in HF order
    fingerprint: str                    # sha256 of the config and the tensor headers: cheap, not of the weights
    generation: GenerationDefaults
    gguf: GGUFFile | None = field(default=None, repr=False, compare=False)  # the opened file, for a GGUF

    @property
    def name(self) -> str:
        return self.path.stem if self.gguf is not None else self.path.name

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """A Hugging Face model folder, a .gguf file, or a folder holding one .gguf; ModelError with one clear line
        when it is missing, corrupt or of an unsupported architecture."""
        path = Path(path).expanduser()
        if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
            return _open_gguf(path)
        if path.is_file():
            raise ModelError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face model folder")
        if not path.is_dir():
            raise ModelError(f"{path} does not exist; pass a Hugging Face model folder or a .gguf file")
        if (path / CONFIG_FILE).is_file():
            return _open_folder(path)
        ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0])
        if ggufs:
            raise ModelError(f"folder {path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); "
                             "pass the one to run")
        raise ModelError(f"model folder {path} has no config.json and no .gguf file; pass a Hugging Face model "
                         "folder or a .gguf file")

    def info(self, name: str) -> TensorInfo:
        """Where the named tensor lies; ModelError when the checkpoint lacks it."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"model {self.path} lacks tensor {name}; the checkpoint is incomplete or of another "
                             "model") from None

    def load(self, name: str, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The named tensor converted to `dtype` (into `out` when given), reading only its bytes."""
        if self.gguf is None:
            return load_tensor(self.info(name), dtype, out)
        values = self.stored(name)
        if out is None:
            return values.to(dtype)
        return out.copy_(values)

    def stored(self, name: str) -> torch.Tensor:
        """The named tensor in the float type it is stored in (a memory map of a safetensors file: nothing is read
        until used); a GGUF block format comes dequantized to float32, its q/k rows in Hugging Face order."""
        info = self.info(name)
        if self.gguf is None:
            return mapped_tensor(info)
        return dequantize(self.gguf, name, keep_float=True)

    def rows(self, name: str) -> torch.Tensor | MappedRows:
        """The named matrix for quantizing a slice of rows at a time: mapped slice by slice from a safetensors
        file, or (GGUF) the stored tensor."""
        return self.stored(name) if self.gguf is not None else MappedRows(self.info(name))

    def weight_bytes(self) -> int:
        """Bytes of every tensor as stored."""
        return sum(info.nbytes for info in self.tensors.values())


def _open_folder(path: Path) -> Checkpoint:
    config_path = path / CONFIG_FILE
    try:
        config_text = config_path.read_text(encoding="utf-8")
        config = json.loads(config_text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{config_path} is not valid JSON ({error}); restore the file") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_path} does not hold a JSON object; restore the file")
    args = ModelArgs.from_config(config, source=str(config_path))
    tensors, headers = read_tensor_index(path)
    return Checkpoint(path=path, config_text=config_text, args=args, tensors=tensors,
                      fingerprint=_fingerprint(config_text, headers),
                      generation=read_generation_defaults(path, config))


def _open_gguf(path: Path) -> Checkpoint:
    gguf = open_gguf(path)
    config_text = json.dumps(gguf.config, sort_keys=True)
    args = ModelArgs.from_config(dict(gguf.config), source=path.name)
    tensors = {name: TensorInfo(name, record.ggml_type.name, record.shape, path, record.offset, record.nbytes)
               for name, record in gguf.tensors.items()}
    eos_ids, bos_id = special_token_ids(gguf)
    return Checkpoint(path=path, config_text=config_text, args=args, tensors=tensors,
                      fingerprint=_fingerprint(config_text, gguf.header_bytes()),
                      generation=GenerationDefaults(eos_ids=eos_ids, bos_id=bos_id), gguf=gguf)


def _fingerprint(config_text: str, headers: bytes) -> str:
    digest = hashlib.sha256(b"cakep2p-model/v1\0" + config_text.encode("utf-8") + headers)
    return digest.hexdigest()[:FINGERPRINT_CHARS]
