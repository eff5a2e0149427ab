"""Model weights between nodes: checkpoint fingerprints, the cache of received parts, and streaming exactly a
part's tensors to a stage (sending side) or assembling them (receiving side), verified by sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from cakep2p import paths, wire
from cakep2p.engine.checkpoint import (DTYPES as CHECKPOINT_DTYPES, TensorInfo, load_tensor, read_safetensors_header,
                                      read_tensor_index)
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.part import PartSpec, expected_shapes, part_tensor_names
from cakep2p.errors import MeshError, ModelError, ProtocolError

if TYPE_CHECKING:
    from cakep2p.mesh import StageClient

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024
PARTS_DIR = "parts"
FINGERPRINT_CHARS = 32
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)
SAFETENSORS_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# -- model identity and the cache of received parts --------------------------------------------------------


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap identity of a checkpoint: sha256 of config.json and the safetensors headers (and index), 32 hex."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256(b"cakep2p-model/v1\0")
    try:
        digest.update((model_dir / "config.json").read_bytes())
        if (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            index = (model_dir / "model.safetensors.index.json").read_bytes()
            digest.update(index)
            files = sorted(set(json.loads(index)["weight_map"].values()))
        for name in files:
            with (model_dir / name).open("rb") as handle:
                length_bytes = handle.read(8)
                length = int.from_bytes(length_bytes, "little")
                digest.update(length_bytes + handle.read(min(length, 100 * 1024 * 1024)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"cannot identify the checkpoint in {model_dir} ({type(error).__name__}); "
                         "is it a Hugging Face model folder with config.json and safetensors?") from None
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def part_ref(fingerprint: str, spec: PartSpec) -> wire.PartRef:
    return wire.PartRef(model_fingerprint=fingerprint, start=spec.start, end=spec.end,
                        has_embedding=spec.has_embedding, has_head=spec.has_head)


def part_spec(ref: wire.PartRef) -> PartSpec:
    return PartSpec(ref.start, ref.end, ref.has_embedding, ref.has_head)


def cached_part_path(ref: wire.PartRef, parts_dir: Path | None = None) -> Path:
    """Where a part received from a peer is kept: cache_dir()/parts/<fingerprint>-<start>-<end>.safetensors."""
    parts_dir = parts_dir if parts_dir is not None else paths.cache_dir() / PARTS_DIR
    return parts_dir / f"{ref.model_fingerprint}-{ref.start}-{ref.end}.safetensors"


def weight_bytes(args: ModelArgs, spec: PartSpec, dtype: torch.dtype) -> int:
    return sum(math.prod(shape) for shape in expected_shapes(args, spec).values()) * dtype.itemsize


def kv_cache_bytes(args: ModelArgs, spec: PartSpec, dtype: torch.dtype, max_seq_len: int) -> int:
    return 2 * (spec.end - spec.start) * args.num_kv_heads * args.head_dim * max_seq_len * dtype.itemsize


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (what travels in a tensor_chunk and what sha256 covers)."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_part_file(ref: wire.PartRef, config_json: str, sha256: str,
                     entries: list[tuple[str, torch.dtype, list[int], int]], write_data: Callable[[BinaryIO], None],
                     parts_dir: Path | None) -> Path:
    """Atomically write a part's cache file: a safetensors header for `entries` (name, dtype, shape, nbytes) with
    the part's config and checksum in the metadata, then the tensors' bytes as `write_data` streams them."""
    path = cached_part_path(ref, parts_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    header: dict[str, object] = {"__metadata__": {
        "cakep2p_fingerprint": ref.model_fingerprint, "cakep2p_sha256": sha256, "cakep2p_config": config_json,
        "cakep2p_part": json.dumps(_ref_fields(ref)), "cakep2p_order": json.dumps([entry[0] for entry in entries])}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(len(header_bytes).to_bytes(8, "little"))
            handle.write(header_bytes)
            write_data(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_cached_part(ref: wire.PartRef, config_json: str, tensors: dict[str, torch.Tensor], sha256: str,
                      parts_dir: Path | None = None) -> Path:
    """Store a part (tensors in part_tensor_names order) with its config and checksum in the metadata.

    Written as safetensors one tensor at a time, straight from the tensors' memory: no second copy of the part.
    """
    entries = [(name, tensor.dtype, list(tensor.shape), tensor.numel() * tensor.element_size())
               for name, tensor in tensors.items()]

    def write_data(handle: BinaryIO) -> None:
        for tensor in tensors.values():
            handle.write(raw_bytes(tensor))

    return _write_part_file(ref, config_json, sha256, entries, write_data, parts_dir)


class FileTensors(Mapping):
    """The tensors of a safetensors file, each read from disk when asked for and not kept: filling a ModelPart from
    it holds one tensor at a time besides the part (memory-mapped reads, as ModelPart.load does)."""

    def __init__(self, index: dict[str, TensorInfo], order: Sequence[str]) -> None:
        self._index, self._order = index, list(order)

    def __getitem__(self, name: str) -> torch.Tensor:
        """A tensor over a private memory map of the file (no heap copy; unmapped when the tensor is freed)."""
        info = self._index[name]
        dtype = CHECKPOINT_DTYPES[info.dtype][0]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        with info.file.open("rb") as handle:
            mapped = mmap.mmap(handle.fileno(), info.offset + info.nbytes - start, offset=start,
                               access=mmap.ACCESS_COPY)
        return torch.frombuffer(mapped, dtype=dtype, count=info.nbytes // dtype.itemsize,
                                offset=info.offset - start).view(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def read_cached_part(ref: wire.PartRef, parts_dir: Path | None = None) -> tuple[str, FileTensors] | None:
    """(config_json, tensors read on demand) of a cached part whose checksum still matches; None (and the file
    removed) if not. The checksum is computed by streaming the file, so the part is never all in memory here."""
    path = cached_part_path(ref, parts_dir)
    if not path.is_file():
        return None
    try:
        index = read_safetensors_header(path)
        with path.open("rb") as handle:  # read_safetensors_header has checked the length against the file
            metadata = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
        order = json.loads(metadata["cakep2p_order"])
        valid = (metadata["cakep2p_fingerprint"] == ref.model_fingerprint
                 and json.loads(metadata["cakep2p_part"]) == _ref_fields(ref)
                 and sorted(order) == sorted(index)
                 and _file_sha256(path, [index[name] for name in order]) == metadata["cakep2p_sha256"])
    except Exception as error:  # a damaged cache file is re-fetched, never trusted
        log.warning("cached part %s is unreadable (%s); it will be transferred again", path.name, error)
        valid = False
    if not valid:
        log.warning("cached part %s does not match its checksum; removing it", path.name)
        path.unlink(missing_ok=True)
        return None
    return metadata["cakep2p_config"], FileTensors(index, order)


def _file_sha256(path: Path, infos: Sequence[TensorInfo]) -> str:
    """sha256 over the tensors' bytes in the file, in the given order, read CHUNK_BYTES at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for info in infos:
            handle.seek(info.offset)
            left = info.nbytes
            while left:
                piece = handle.read(min(left, CHUNK_BYTES))
                if not piece:
                    raise ModelError(f"{path} is truncated")
                digest.update(piece)
                left -= len(piece)
    return digest.hexdigest()


def content_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the tensors' raw bytes, in order (what a transfer_end carries)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(raw_bytes(tensor))
    return digest.hexdigest()


def find_model_dir(models_dirs: Sequence[Path], fingerprint: str) -> Path | None:
    """A folder under the given models dirs (itself, children, grandchildren) whose checkpoint has this fingerprint."""
    for root in models_dirs:
        candidates = [Path(root)] + sorted(Path(root).glob("*/")) + sorted(Path(root).glob("*/*/"))
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                try:
                    if model_fingerprint(candidate) == fingerprint:
                        return candidate
                except ModelError:
                    continue
    return None


def _ref_fields(ref: wire.PartRef) -> list:
    return [ref.start, ref.end, ref.has_embedding, ref.has_head]


# -- sending a part -----------------------------------------------------------------------------------------


def send_part_tensors(client: "StageClient", model_dir: Path, ref: wire.PartRef,
                      on_progress: Progress | None = None) -> wire.Message:
    """Stream exactly the part's tensors in chunks, then transfer_end with the sha256 of all their bytes.

    Returns the stage's reply to transfer_end (a ready load_reply once it has built the part)."""
    args = ModelArgs.from_dir(model_dir)
    index = read_tensor_index(model_dir)
    names = part_tensor_names(args, PartSpec(ref.start, ref.end, ref.has_embedding, ref.has_head))
    missing = [name for name in names if name not in index]
    if missing:
        raise MeshError(f"model folder {model_dir} lacks tensor {missing[0]}; cannot send it to {client.label}")
    total = sum(index[name].nbytes for name in names)
    sent = 0
    digest = hashlib.sha256()
    for name in names:
        info = index[name]
        dtype = CHECKPOINT_DTYPES[info.dtype][0]
        if dtype not in wire.DTYPE_NAMES or dtype in (torch.int64, torch.int32):
            dtype = torch.float32
        data = raw_bytes(load_tensor(info, dtype))
        digest.update(data)
        for offset in range(0, data.nbytes, CHUNK_BYTES):
            piece = data[offset:offset + CHUNK_BYTES]
            reply = client.request(wire.TensorChunk(part=ref, name=name, dtype=wire.DTYPE_NAMES[dtype],
                                                    shape=tuple(info.shape), offset=offset, total=data.nbytes,
                                                    data=piece))
            if not isinstance(reply, wire.Ack):
                raise ProtocolError(f"stage {client.label} answered tensor_chunk with {reply.type}")
            sent += piece.nbytes
            if on_progress is not None:
                on_progress(sent, total)
    return client.request(wire.TransferEnd(part=ref, sha256=digest.hexdigest(), tensor_count=len(names)))


# -- receiving a part ---------------------------------------------------------------------------------------


class TransferRejected(ValueError):
    """A tensor_chunk that does not continue the transfer (wrong tensor, shape, dtype or offset)."""


@dataclass
class Transfer:
    """A part being streamed in by `peer`: tensors arrive in part_tensor_names order, each in offset order, and go
    straight to a spool file in `spool_dir` (never all in memory: the part is built from the stored file)."""

    peer: bytes
    request: wire.LoadPart
    args: ModelArgs
    names: list[str]
    reserved_bytes: int
    spool_dir: Path | None = None
    received_tensors: dict[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)  # dtype, shape, bytes
    current: str | None = None  # the tensor whose chunks are arriving
    received: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    last_used: float = field(default_factory=time.monotonic)
    spool: BinaryIO | None = None

    @property
    def complete_tensors(self) -> int:
        return len(self.received_tensors) - (self.current is not None)

    def close(self) -> None:
        """Drop the spool file (a transfer that ends, fails or is abandoned)."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None


def accept_chunk(transfer: Transfer, chunk: wire.TensorChunk) -> None:
    """Append one chunk to the transfer's spool; TransferRejected when it is not the next one expected."""
    index = transfer.complete_tensors
    if index >= len(transfer.names) or chunk.name != transfer.names[index]:
        expected = transfer.names[index] if index < len(transfer.names) else "nothing more"
        raise TransferRejected(f"tensor_chunk: expected {expected}, got {chunk.name}")
    if transfer.current is None:
        expected_shape = expected_shapes(transfer.args, part_spec(chunk.part))[chunk.name]
        if chunk.offset != 0 or chunk.shape != expected_shape or chunk.dtype not in WEIGHT_DTYPES:
            raise TransferRejected(f"tensor_chunk: {chunk.name} must start at offset 0 with shape "
                                   f"{list(expected_shape)} and a float dtype")
        if transfer.spool is None:
            directory = transfer.spool_dir if transfer.spool_dir is not None else paths.cache_dir() / PARTS_DIR
            directory.mkdir(parents=True, exist_ok=True)
            transfer.spool = tempfile.TemporaryFile(dir=directory, prefix=".transfer-")
        transfer.current, transfer.received = chunk.name, 0
        transfer.received_tensors[chunk.name] = (chunk.dtype, chunk.shape, chunk.total)
    _, _, total = transfer.received_tensors[chunk.name]
    if chunk.offset != transfer.received or chunk.total != total:
        raise TransferRejected(f"tensor_chunk: {chunk.name} offset {chunk.offset} out of order")
    data = memoryview(chunk.data)
    if transfer.received + data.nbytes > total:
        raise TransferRejected(f"tensor_chunk: {chunk.name} runs past its {total} bytes")
    transfer.spool.write(data)
    transfer.digest.update(data)
    transfer.received += data.nbytes
    transfer.last_used = time.monotonic()
    if transfer.received == total:
        transfer.current = None


def store_transfer(transfer: Transfer, sha256: str, parts_dir: Path | None = None) -> Path:
    """Write a complete transfer as the part's cache file (safetensors, as write_cached_part), copying the spool."""
    entries = [(name, wire.DTYPES[dtype], list(shape), nbytes)
               for name, (dtype, shape, nbytes) in transfer.received_tensors.items()]

    def write_data(handle: BinaryIO) -> None:
        transfer.spool.seek(0)
        shutil.copyfileobj(transfer.spool, handle, CHUNK_BYTES)

    return _write_part_file(transfer.request.part, transfer.request.config_json, sha256, entries, write_data,
                            parts_dir)
