"""The safetensors format: a validated index of every tensor (single file or sharded), memory-mapped reads of only
the named ones, and the one writer of safetensors files (the parts cache and generated test models use it)."""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import torch

from cakep2p import paths
from cakep2p.engine.dtypes import BY_SAFETENSORS, BY_TORCH
from cakep2p.errors import ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: `offset` is absolute in `file`; `dtype` is the file's type code (e.g. BF16)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


def read_tensor_index(model_dir: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """Every tensor of the checkpoint in `model_dir` (single file or sharded), validated against the file sizes;
    and the raw index and header bytes in file order (what a checkpoint's cheap fingerprint covers)."""
    index_path = model_dir / INDEX_FILE
    single_path = model_dir / SINGLE_FILE
    if single_path.is_file():
        return read_safetensors_header(single_path)
    if not index_path.is_file():
        raise ModelError(f"model folder {model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        index_bytes = index_path.read_bytes()
        weight_map = json.loads(index_bytes)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"{index_path} is not a valid safetensors index ({error}); restore the file") from None
    tensors: dict[str, TensorInfo] = {}
    raw = [index_bytes]
    for file_name in files:
        shard = model_dir / file_name
        if not shard.is_file():
            raise ModelError(f"{index_path} names {file_name}, which is missing; download the model again")
        shard_tensors, shard_header = read_safetensors_header(shard)
        tensors.update(shard_tensors)
        raw.append(shard_header)
    for name, file_name in weight_map.items():
        if name not in tensors or tensors[name].file.name != Path(file_name).name:
            raise ModelError(f"{index_path} maps {name} to {file_name}, which lacks it; download the model again")
    return tensors, b"".join(raw)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """Parse and check one .safetensors header (length, JSON, dtypes, data offsets against the file size, no
    overlaps); returns its tensors and the header bytes as stored (length prefix included)."""
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
            element_size = BY_SAFETENSORS[dtype_code].itemsize
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
    _check_no_overlap(tensors.values(), corrupt)
    return tensors, prefix + header_bytes


def _check_no_overlap(infos, corrupt: Callable[[str], ModelError]) -> None:
    previous: TensorInfo | None = None
    for info in sorted((info for info in infos if info.nbytes), key=lambda info: info.offset):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise corrupt(f"tensors {previous.name} and {info.name} overlap")
        previous = info


def mapped_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor over a private memory map of its bytes in the file: nothing is read until used, nothing else of
    the file is mapped, and the map goes when the tensor is freed."""
    dtype = BY_SAFETENSORS[info.dtype].torch
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    with info.file.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), info.offset + info.nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=dtype, count=info.nbytes // dtype.itemsize,
                            offset=info.offset - start).view(info.shape)


@dataclass(frozen=True)
class MappedRows:
    """A stored matrix read a slice of rows at a time, each slice its own short-lived memory map: quantizing a
    large matrix never holds more of its file in memory than the slice being quantized."""

    info: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.info.shape[0])
        row_bytes = self.info.nbytes // max(1, self.info.shape[0])
        return mapped_tensor(replace(self.info, shape=(stop - start, *self.info.shape[1:]),
                                     offset=self.info.offset + start * row_bytes, nbytes=(stop - start) * row_bytes))


def load_tensor(info: TensorInfo, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy only this tensor's bytes, converted to `dtype`, into `out` (or a new tensor)."""
    target = out if out is not None else torch.empty(info.shape, dtype=dtype)
    if tuple(target.shape) != info.shape:
        raise ModelError(f"tensor {info.name} has shape {list(info.shape)}, expected {list(target.shape)}")
    view = mapped_tensor(info)
    target.copy_(view)
    del view
    return target


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file being written: its bytes follow in the order of the entries."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def write_safetensors(path: Path, entries: Sequence[Entry], write_data: Callable[[BinaryIO], None],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: the header for `entries`, then the tensors' bytes as `write_data`
    streams them (so a part or a generated model is never all in memory)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": BY_TORCH[entry.dtype].safetensors, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    def write(handle: BinaryIO) -> None:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        write_data(handle)

    return paths.write_atomically(path, write)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (what a file holds, what travels in a tensor_chunk, what sha256 covers)."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
