"""The loading half of a stage server: model parts from the parts cache, a models dir or a weight transfer
streamed by the initiator, all counted against the memory budget the node lends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cakep2p import wire
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.part import ModelPart, part_tensor_names, resolve_dtype
from cakep2p.weights import (Transfer, TransferRejected, accept_chunk, find_model_dir, part_spec, read_cached_part,
                             store_transfer, weight_bytes)

log = logging.getLogger("cakep2p.stage")  # one logger for the whole stage server

TRANSFER_STALL_S = 30.0  # a transfer without a chunk for this long may be taken over by another initiator


@dataclass
class _LoadedPart:
    model: ModelPart
    max_seq_len: int
    weight_bytes: int
    source: str


class _Refusal(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class PartLoading:
    """StageServer's load_part, tensor_chunk and transfer_end requests: a mixin over the server's state that
    uses its _send, _refuse, _compute and free_bytes."""

    _parts: dict[wire.PartRef, _LoadedPart]
    _transfers: dict[wire.PartRef, Transfer]
    _pending: dict[wire.PartRef, asyncio.Event]  # parts being loaded; set when done or failed
    _reserved_bytes: int  # weights being loaded: counted from the budget check until registered or failed
    models_dirs: list[Path]
    parts_dir: Path
    device: str

    async def _load(self, peer: bytes, request: wire.LoadPart) -> None:
        ref = request.part
        while True:
            loaded = self._parts.get(ref)
            if loaded is not None:
                loaded.max_seq_len = max(loaded.max_seq_len, request.max_seq_len)
                await self._send(peer, _ready(request.request_id, "memory", loaded.model))
                return
            pending = self._pending.get(ref)
            if pending is None:
                break
            transfer = self._transfers.get(ref)
            stalled = transfer is not None and time.monotonic() - transfer.last_used > TRANSFER_STALL_S
            if transfer is not None and (transfer.peer == peer or stalled):
                self._drop_transfer(ref)  # the same initiator starts over, or takes over a stalled transfer
                continue
            try:  # another initiator is loading this part: share its result
                await asyncio.wait_for(pending.wait(), timeout=TRANSFER_STALL_S / 4)
            except asyncio.TimeoutError:
                pass
        self._pending[ref] = asyncio.Event()
        transfer_follows = False
        try:
            source = await self._load_local(request)
            if source is not None:
                await self._send(peer, _ready(request.request_id, source, self._parts[ref].model))
                return
            if request.source != "transfer":
                raise _Refusal("not_found", f"this node has no copy of model {request.model_name} "
                                            f"({ref.model_fingerprint}); send it with source 'transfer'")
            args = _args_from_json(request.config_json)
            spec = part_spec(ref)
            reserved = weight_bytes(args, spec, resolve_dtype(request.dtype, args))
            with self._reservation(reserved):  # handed over to the transfer, which counts it until it ends
                self._transfers[ref] = Transfer(peer, request, args, part_tensor_names(args, spec), reserved,
                                                spool_dir=self.parts_dir)
            transfer_follows = True
            await self._send(peer, wire.LoadReply(request_id=request.request_id, status="send"))
        finally:
            if not transfer_follows:
                self._end_pending(ref)

    def _end_pending(self, ref: wire.PartRef) -> None:
        pending = self._pending.pop(ref, None)
        if pending is not None:
            pending.set()

    def _drop_transfer(self, ref: wire.PartRef) -> None:
        transfer = self._transfers.pop(ref, None)
        if transfer is not None:
            transfer.close()
        self._end_pending(ref)

    async def _load_local(self, request: wire.LoadPart) -> str | None:
        """Load from the parts cache or a models dir; the source name, or None if this node has no copy."""
        ref, spec = request.part, part_spec(request.part)
        cached = await self._compute(read_cached_part, ref, self.parts_dir)
        if cached is not None:
            config_json, tensors = cached
            args = _args_from_json(config_json)
            with self._reservation(weight_bytes(args, spec, resolve_dtype(request.dtype, args))):
                model = await self._compute(ModelPart.from_tensors, args, spec, tensors, request.dtype, self.device)
                self._register(request, model, "cache")
            return "cache"
        model_dir = await self._compute(find_model_dir, self.models_dirs, ref.model_fingerprint)
        if model_dir is None:
            return None
        args = ModelArgs.from_dir(model_dir)
        with self._reservation(weight_bytes(args, spec, resolve_dtype(request.dtype, args))):
            model = await self._compute(ModelPart.load, model_dir, spec, request.dtype, self.device)
            self._register(request, model, "models_dir")
        return "models_dir"

    @contextlib.contextmanager
    def _reservation(self, nbytes: int):
        """Count `nbytes` as used while the block runs (a load awaits; a concurrent one must see them taken);
        the block registers what it loaded before the reservation is released."""
        if nbytes > self.free_bytes():
            raise _Refusal("over_budget", f"loading needs {nbytes} bytes but this node offers only "
                                          f"{self.free_bytes()} more; plan with fewer layers here")
        self._reserved_bytes += nbytes
        try:
            yield
        finally:
            self._reserved_bytes -= nbytes

    def _register(self, request: wire.LoadPart, model: ModelPart, source: str) -> None:
        nbytes = weight_bytes(model.args, model.part, model.dtype)
        self._parts[request.part] = _LoadedPart(model, request.max_seq_len, nbytes, source)
        log.info("loaded layers %d-%d of %s from %s", request.part.start, request.part.end, request.model_name, source)

    async def _chunk(self, peer: bytes, chunk: wire.TensorChunk) -> None:
        transfer = self._transfers.get(chunk.part)
        if transfer is None or transfer.peer != peer:
            await self._refuse(peer, chunk.request_id, "transfer_failed", "tensor_chunk: no transfer of that part "
                                                                         "in progress from you; send load_part")
            return
        try:
            accept_chunk(transfer, chunk)
        except TransferRejected as rejection:
            self._drop_transfer(chunk.part)
            await self._refuse(peer, chunk.request_id, "transfer_failed", str(rejection))
            return
        await self._send(peer, wire.Ack(request_id=chunk.request_id))

    async def _finish_transfer(self, peer: bytes, end: wire.TransferEnd) -> None:
        transfer = self._transfers.get(end.part)
        if transfer is None or transfer.peer != peer:
            raise _Refusal("transfer_failed", "transfer_end: no transfer of that part in progress from you")
        transfer.last_used = float("inf")  # being built: neither stalled nor abandoned
        try:  # the transfer keeps its memory reservation until the part is registered
            if transfer.complete_tensors != len(transfer.names) or end.tensor_count != len(transfer.names):
                raise _Refusal("transfer_failed", f"transfer_end after {transfer.complete_tensors} of "
                                                  f"{len(transfer.names)} tensors")
            if transfer.digest.hexdigest() != end.sha256:
                raise _Refusal("transfer_failed", "transfer_end: sha256 of the received tensors does not match")
            request = transfer.request
            await self._compute(store_transfer, transfer, end.sha256, self.parts_dir)
            transfer.close()
            cached = await self._compute(read_cached_part, end.part, self.parts_dir)  # built from the file, one
            # tensor at a time: the part is in memory once, never twice
            if cached is None:
                raise _Refusal("transfer_failed", "transfer_end: the received part could not be stored; retry")
            model = await self._compute(ModelPart.from_tensors, transfer.args, part_spec(end.part), cached[1],
                                        request.dtype, self.device)
            self._transfers.pop(end.part, None)
            self._register(request, model, "transfer")
        finally:
            self._drop_transfer(end.part)
        await self._send(peer, _ready(end.request_id, "transfer", model))


def _ready(request_id: int, source: str, model: ModelPart) -> wire.LoadReply:
    return wire.LoadReply(request_id=request_id, status="ready", source=source, dtype=wire.DTYPE_NAMES[model.dtype])


def _args_from_json(config_json: str) -> ModelArgs:
    try:
        config = json.loads(config_json)
    except ValueError:
        raise _Refusal("bad_request", "load_part: config_json is not valid JSON") from None
    if not isinstance(config, dict):
        raise _Refusal("bad_request", "load_part: config_json must be a JSON object")
    return ModelArgs.from_config(config, source="the initiator's config.json")

