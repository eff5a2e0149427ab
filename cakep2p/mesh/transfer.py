"""Weights between nodes: asking a stage to load a part and, when it has no copy, streaming exactly the part's
served tensors to it, in its weight format (sending side); assembling such a stream on disk, in order, and using it
only when its content digest is the part's name (receiving side).
"""

from __future__ import annotations

import hashlib
import io
import mmap
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import torch

from cakep2p import wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.digests import PartIdentity, Served, content_digest, part_identity
from cakep2p.engine.dtypes import BY_NAME, FLOAT_WEIGHTS, name_of
from cakep2p.engine.formats import served_tensors
from cakep2p.engine.loading import expected_shapes, part_tensor_names
from cakep2p.engine.safetensors import Entry, raw_bytes
from cakep2p.errors import ProtocolError
from cakep2p.mesh.client import StageClient, layer_range, part_ref
from cakep2p.mesh.parts_cache import DEFAULT_CAP_BYTES, write_cached_part
from cakep2p.planner import LayerRange

CHUNK_BYTES = 8 * 1024 * 1024
QUANTIZED_PIECES = {".q8": ("int8",), ".q4": ("uint8",), ".scale": ("float32", "float16"), ".min": ("float16",)}
Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)


# -- sending a part -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartOffer:
    """A part this node can send: which checkpoint, which layers, which weight format, and its content identity."""

    checkpoint: Checkpoint
    layers: LayerRange
    weights: str
    identity: PartIdentity

    @classmethod
    def of(cls, checkpoint: Checkpoint, layers: LayerRange, weights: str) -> "PartOffer":
        return cls(checkpoint, layers, weights, part_identity(checkpoint, layers, weights))

    @property
    def ref(self) -> wire.PartRef:
        return part_ref(self.checkpoint.fingerprint, self.identity.digest, self.layers)


def load_part(client: StageClient, offer: PartOffer, *, max_seq_len: int, dtype: str = "auto",
              allow_transfer: bool = True, on_progress: Progress | None = None) -> wire.LoadReply:
    """Make the stage hold the offered part.

    The stage uses its own copy when it has one with the same content; otherwise (if allowed) exactly the part's
    served tensors are streamed to it. The reply says where its weights came from (memory, cache, models_dir,
    transfer) and the dtype it computes in.
    """
    checkpoint = offer.checkpoint
    model_name = "".join(char for char in checkpoint.name if char.isprintable())[:128]
    reply = client.request(wire.LoadPart(part=offer.ref, model_name=model_name, dtype=dtype, weights=offer.weights,
                                         weight_bytes=offer.identity.nbytes, max_seq_len=max_seq_len,
                                         source="transfer" if allow_transfer else "local",
                                         config_json=checkpoint.config_text if allow_transfer else ""))
    if isinstance(reply, wire.LoadReply) and reply.status == "send":
        reply = send_part_tensors(client, offer, on_progress)
    if not isinstance(reply, wire.LoadReply) or reply.status != "ready":
        raise ProtocolError(f"stage {client.label} did not confirm loading {offer.layers.describe()}")
    return reply


def send_part_tensors(client: StageClient, offer: PartOffer, on_progress: Progress | None = None) -> wire.Message:
    """Stream the part's served tensors in chunks, then transfer_end; returns the stage's reply to transfer_end (a
    ready load_reply once it has checked the content and built the part)."""
    names = part_tensor_names(offer.checkpoint.args, offer.layers)
    ref, total, sent, count = offer.ref, offer.identity.nbytes, 0, 0
    for name, tensor in served_tensors(offer.checkpoint, names, offer.weights):
        data = raw_bytes(tensor)
        for offset in range(0, data.nbytes, CHUNK_BYTES):
            piece = data[offset:offset + CHUNK_BYTES]
            reply = client.request(wire.TensorChunk(part=ref, name=name, dtype=name_of(tensor.dtype),
                                                    shape=tuple(tensor.shape), offset=offset, total=data.nbytes,
                                                    data=piece))
            if not isinstance(reply, wire.Ack):
                raise ProtocolError(f"stage {client.label} answered tensor_chunk with {reply.type}")
            sent += piece.nbytes
            if on_progress is not None:
                on_progress(sent, total)
        count += 1
        del tensor, data
    return client.request(wire.TransferEnd(part=ref, tensor_count=count))


# -- receiving a part ---------------------------------------------------------------------------------------------

class TransferRejected(ValueError):
    """A tensor_chunk that does not continue the transfer (wrong tensor, shape, dtype, offset or size)."""


@dataclass
class Transfer:
    """A part being streamed in by `owner`: served tensors arrive in the order of the part's checkpoint tensors, each
    in offset order, and go straight to a spool file in `spool_dir` (never all in memory, unless that disk is full
    and the node lends the memory: `in_memory`); each one's sha256 is taken on the way, for the content digest."""

    owner: bytes
    request: wire.LoadPart
    args: ModelArgs
    names: list[str]                         # the checkpoint tensors the part is made of, in order
    reserved_bytes: int
    spool_dir: Path
    entries: list[Served] = field(default_factory=list)   # the tensors received whole
    current: tuple[str, str, tuple[int, ...], int] | None = None  # name, dtype, shape, bytes of the one arriving
    received: int = 0
    received_bytes: int = 0
    base_index: int = 0                      # which of `names` the arriving tensors belong to
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    last_used: float = field(default_factory=time.monotonic)
    spool: BinaryIO | None = None
    spooled: int = 0                         # bytes in the spool
    in_memory: bool = False

    def close(self) -> None:
        """Drop the spool file (a transfer that ends, fails or is abandoned)."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def content_digest(self) -> str:
        return content_digest(self.entries)

    def covers_every_tensor(self) -> bool:
        """Whether every checkpoint tensor of the part has arrived (and nothing is half sent)."""
        bases = {_base_name(entry[0]) for entry in self.entries}
        return self.current is None and bases == set(self.names)


def _base_name(served: str) -> str:
    for suffix in QUANTIZED_PIECES:
        if served.endswith(suffix):
            return served[:-len(suffix)]
    return served


def accept_chunk(transfer: Transfer, chunk: wire.TensorChunk) -> None:
    """Append one chunk to the transfer's spool; TransferRejected when it is not what may come next, OSError when
    the spool cannot take it (the transfer then stands as before the chunk's bytes: see append_chunk)."""
    if transfer.current is None or chunk.name != transfer.current[0] or chunk.offset == 0:
        _begin_tensor(transfer, chunk)
    name, dtype, shape, total = transfer.current
    if chunk.offset != transfer.received or chunk.total != total or (chunk.dtype, chunk.shape) != (dtype, shape):
        raise TransferRejected(f"tensor_chunk: {chunk.name} offset {chunk.offset} out of order")
    if transfer.received + memoryview(chunk.data).nbytes > total:
        raise TransferRejected(f"tensor_chunk: {chunk.name} runs past its {total} bytes")
    append_chunk(transfer, chunk)


def append_chunk(transfer: Transfer, chunk: wire.TensorChunk) -> None:
    """Write an admitted chunk's bytes to the spool and count them (again after an OSError and spool_in_memory)."""
    if transfer.spool is None:
        transfer.spool_dir.mkdir(parents=True, exist_ok=True)
        transfer.spool = tempfile.TemporaryFile(dir=transfer.spool_dir, prefix=".transfer-", buffering=0)
    data = memoryview(chunk.data).cast("B")
    transfer.spool.seek(transfer.spooled)
    written = 0
    while written < data.nbytes:
        written += transfer.spool.write(data[written:]) or 0
    transfer.spooled += data.nbytes
    name, dtype, shape, total = transfer.current
    transfer.digest.update(data)
    transfer.received += data.nbytes
    transfer.last_used = time.monotonic()
    if transfer.received == total:
        transfer.entries.append((name, dtype, shape, transfer.digest.hexdigest()))
        transfer.current = None


def _begin_tensor(transfer: Transfer, chunk: wire.TensorChunk) -> None:
    if transfer.current is not None or chunk.offset != 0:
        raise TransferRejected(f"tensor_chunk: {chunk.name} starts before the previous tensor ended")
    base = _base_name(chunk.name)
    index = transfer.base_index
    if index < len(transfer.names) and base != transfer.names[index] and transfer.entries:
        index += 1  # the next checkpoint tensor begins
    if index >= len(transfer.names) or base != transfer.names[index]:
        expected = transfer.names[index] if index < len(transfer.names) else "nothing more"
        raise TransferRejected(f"tensor_chunk: expected a piece of {expected}, got {chunk.name}")
    if any(entry[0] == chunk.name for entry in transfer.entries):
        raise TransferRejected(f"tensor_chunk: {chunk.name} was sent already")
    _check_piece(transfer, chunk, expected_shapes(transfer.args, layer_range(chunk.part))[base])
    if transfer.received_bytes + chunk.total > transfer.request.weight_bytes:
        raise TransferRejected(f"tensor_chunk: the part's tensors exceed the {transfer.request.weight_bytes} bytes "
                               "load_part declared")
    transfer.base_index = index
    transfer.current = (chunk.name, chunk.dtype, chunk.shape, chunk.total)
    transfer.received, transfer.digest = 0, hashlib.sha256()
    transfer.received_bytes += chunk.total


def _check_piece(transfer: Transfer, chunk: wire.TensorChunk, expected: tuple[int, ...]) -> None:
    """A float tensor of its checkpoint shape, or a quantized piece of plausible dtype and shape for it."""
    suffix = chunk.name[len(_base_name(chunk.name)):]
    if not suffix:
        if chunk.shape != expected or chunk.dtype not in FLOAT_WEIGHTS:
            raise TransferRejected(f"tensor_chunk: {chunk.name} must have shape {list(expected)} and a float dtype")
        return
    rows, cols = expected if len(expected) == 2 else (0, 0)
    allowed_shape = {".q8": (rows, cols), ".q4": (rows, cols // 2)}.get(suffix)
    if chunk.dtype not in QUANTIZED_PIECES[suffix] or not rows or (allowed_shape and chunk.shape != allowed_shape) \
            or (not allowed_shape and (chunk.shape[0] != rows or len(chunk.shape) > 2)):
        raise TransferRejected(f"tensor_chunk: {chunk.name} is not a quantized piece of a {rows}x{cols} matrix")


def spool_in_memory(transfer: Transfer) -> None:
    """Move the spool to memory (its disk is full): the bytes so far are copied, the file goes."""
    memory = io.BytesIO()
    if transfer.spool is not None:
        transfer.spool.seek(0)
        left = transfer.spooled
        while left:
            piece = transfer.spool.read(min(left, CHUNK_BYTES))
            if not piece:
                raise OSError(f"the transfer's spool lost its bytes after {transfer.spooled - left}")
            memory.write(piece)
            left -= len(piece)
        transfer.spool.close()
    transfer.spool, transfer.in_memory = memory, True


def spool_tensors(transfer: Transfer) -> Mapping[str, torch.Tensor]:
    """The received tensors straight from the spool (a part kept in memory only: the cache could not store it)."""
    if transfer.in_memory:
        buffer = transfer.spool.getbuffer()
    else:
        buffer = mmap.mmap(transfer.spool.fileno(), 0, access=mmap.ACCESS_COPY) if transfer.spooled else b""
    tensors, offset = {}, 0
    for name, dtype_name, shape, _ in transfer.entries:
        dtype = BY_NAME[dtype_name].torch
        nbytes = BY_NAME[dtype_name].itemsize * _count(shape)
        tensors[name] = (torch.frombuffer(buffer, dtype=dtype, count=_count(shape), offset=offset).view(shape)
                         if nbytes else torch.empty(shape, dtype=dtype))
        offset += nbytes
    return tensors


def store_transfer(transfer: Transfer, parts_dir: Path, cap: int = DEFAULT_CAP_BYTES) -> Path:
    """Write a complete transfer as the part's cache file, copying the spool (CacheFull or OSError if it cannot)."""
    entries = [Entry(name, BY_NAME[dtype].torch, shape, BY_NAME[dtype].itemsize * _count(shape))
               for name, dtype, shape, _ in transfer.entries]

    def write_data(handle: BinaryIO) -> None:
        transfer.spool.seek(0)
        shutil.copyfileobj(transfer.spool, handle, CHUNK_BYTES)

    request = transfer.request
    return write_cached_part(request.part, request.config_json, request.weights, entries, write_data, parts_dir,
                             cap)


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
