"""Weights between nodes: asking a stage to load a part and, when it has no copy, streaming exactly the part's
tensors to it (sending side); assembling such a stream on disk, in order, verified by sha256 (receiving side).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from cakep2p import wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.dtypes import BY_NAME, FLOAT_WEIGHTS, name_of
from cakep2p.engine.loading import expected_shapes, part_tensor_names
from cakep2p.engine.safetensors import Entry, raw_bytes
from cakep2p.errors import ProtocolError
from cakep2p.mesh.client import StageClient, layer_range, part_ref
from cakep2p.mesh.parts_cache import write_cached_part
from cakep2p.planner import LayerRange

CHUNK_BYTES = 8 * 1024 * 1024
Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)


# -- sending a part -----------------------------------------------------------------------------------------------

def load_part(client: StageClient, checkpoint: Checkpoint, layers: LayerRange, *, max_seq_len: int,
              dtype: str = "auto", allow_transfer: bool = True, on_progress: Progress | None = None) -> wire.LoadReply:
    """Make the stage hold `layers` of the checkpoint (a model on this machine).

    The stage uses its own copy when it has one; otherwise (if allowed) exactly the part's tensors are streamed
    to it. The reply says where its weights came from (memory, cache, models_dir, transfer) and their dtype.
    """
    ref = part_ref(checkpoint.fingerprint, layers)
    model_name = "".join(char for char in checkpoint.name if char.isprintable())[:128]
    reply = client.request(wire.LoadPart(part=ref, model_name=model_name, dtype=dtype, max_seq_len=max_seq_len,
                                         source="transfer" if allow_transfer else "local",
                                         config_json=checkpoint.config_text if allow_transfer else ""))
    if isinstance(reply, wire.LoadReply) and reply.status == "send":
        reply = send_part_tensors(client, checkpoint, ref, on_progress)
    if not isinstance(reply, wire.LoadReply) or reply.status != "ready":
        raise ProtocolError(f"stage {client.label} did not confirm loading {layers.describe()}")
    return reply


def send_part_tensors(client: StageClient, checkpoint: Checkpoint, ref: wire.PartRef,
                      on_progress: Progress | None = None) -> wire.Message:
    """Stream exactly the part's tensors in chunks, then transfer_end with the sha256 of all their bytes.

    Returns the stage's reply to transfer_end (a ready load_reply once it has built the part)."""
    names = part_tensor_names(checkpoint.args, layer_range(ref))
    infos = [checkpoint.info(name) for name in names]
    total = sum(info.nbytes for info in infos)
    sent = 0
    digest = hashlib.sha256()
    for name in names:
        tensor = checkpoint.stored(name)
        if name_of(tensor.dtype) not in FLOAT_WEIGHTS:
            tensor = tensor.float()
        data = raw_bytes(tensor)
        digest.update(data)
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
        del tensor, data
    return client.request(wire.TransferEnd(part=ref, sha256=digest.hexdigest(), tensor_count=len(names)))


# -- receiving a part ---------------------------------------------------------------------------------------------

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
    spool_dir: Path
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
        expected_shape = expected_shapes(transfer.args, layer_range(chunk.part))[chunk.name]
        if chunk.offset != 0 or chunk.shape != expected_shape or chunk.dtype not in FLOAT_WEIGHTS:
            raise TransferRejected(f"tensor_chunk: {chunk.name} must start at offset 0 with shape "
                                   f"{list(expected_shape)} and a float dtype")
        if transfer.spool is None:
            transfer.spool_dir.mkdir(parents=True, exist_ok=True)
            transfer.spool = tempfile.TemporaryFile(dir=transfer.spool_dir, prefix=".transfer-")
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


def store_transfer(transfer: Transfer, sha256: str, parts_dir: Path) -> Path:
    """Write a complete transfer as the part's cache file, copying the spool."""
    entries = [Entry(name, BY_NAME[dtype].torch, tuple(shape), nbytes)
               for name, (dtype, shape, nbytes) in transfer.received_tensors.items()]

    def write_data(handle: BinaryIO) -> None:
        transfer.spool.seek(0)
        shutil.copyfileobj(transfer.spool, handle, CHUNK_BYTES)

    return write_cached_part(transfer.request.part, transfer.request.config_json, sha256, entries, write_data,
                             parts_dir)
