"""Safetensors checkpoints: a validated index of every tensor, and memory-mapped loading of only the named ones."""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from cakep2p.errors import ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: `offset` is absolute in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


def read_tensor_index(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `model_dir` (single file or sharded); validates headers and sizes."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    single_path = model_dir / SINGLE_FILE
    if single_path.is_file():
        return read_safetensors_header(single_path)
    if not index_path.is_file():
        raise ModelError(f"model folder {model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"{index_path} is not a valid safetensors index ({error}); restore the file") from None
    tensors: dict[str, TensorInfo] = {}
    for file_name in files:
        shard = model_dir / file_name
        if not shard.is_file():
            raise ModelError(f"{index_path} names {file_name}, which is missing; download the model again")
        tensors.update(read_safetensors_header(shard))
    for name, file_name in weight_map.items():
        if name not in tensors or tensors[name].file.name != Path(file_name).name:
            raise ModelError(f"{index_path} maps {name} to {file_name}, which lacks it; download the model again")
    return tensors


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one .safetensors header: its length, JSON, dtypes and data offsets against the file size."""
    def corrupt(why: str) -> ModelError:
        return ModelError(f"{path} is truncated or corrupt ({why}); download the model again")

    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise corrupt("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(file_size - 8, MAX_HEADER_BYTES):
                raise corrupt(f"header length {header_len} runs past the file size {file_size}")
            header_bytes = handle.read(header_len)
    except OSError as error:
        raise ModelError(f"cannot read {path} ({error.strerror})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code = entry["dtype"]
            shape = tuple(int(dim) for dim in entry["shape"])
            begin, end = (int(value) for value in entry["data_offsets"])
            element_size = DTYPES[dtype_code][1]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name} has a malformed entry") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if not 0 <= begin <= end <= data_size:
            raise corrupt(f"tensor {name} data [{begin}, {end}) lies beyond the file's {data_size} data bytes")
        if end - begin != numel * element_size:
            raise corrupt(f"tensor {name} has {end - begin} bytes for shape {list(shape)} of {dtype_code}")
        tensors[name] = TensorInfo(name, dtype_code, shape, path, data_start + begin, end - begin)
    return tensors


def load_tensor(
    info: TensorInfo,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map only this tensor's bytes and copy them, converted, into `out` (or a new tensor); nothing else is read."""
    source_dtype, _ = DTYPES[info.dtype]
    target = out if out is not None else torch.empty(info.shape, dtype=dtype, device=device)
    if tuple(target.shape) != info.shape:
        raise ModelError(f"tensor {info.name} has shape {list(info.shape)}, expected {list(target.shape)}")
    if info.nbytes == 0:
        return target
    page = mmap.ALLOCATIONGRANULARITY
    start = info.offset - info.offset % page
    with info.file.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), info.offset + info.nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    try:
        view = torch.frombuffer(mapped, dtype=source_dtype, count=info.nbytes // source_dtype.itemsize,
                                offset=info.offset - start).view(info.shape)
        target.copy_(view)
        del view
    finally:
        mapped.close()
    return target
