"""The parts a stage server holds: loaded from its parts cache, a models dir or a weight transfer streamed by the
initiator, each counted against the memory the node lends and held by the owners (mesh/sessions.py) that loaded
it: a part stays while one of them holds it. A collaborator of the server: it answers load requests with replies
(or a Refusal) and the server does the talking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from cakep2p import wire
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.digests import part_identity
from cakep2p.engine.dtypes import name_of
from cakep2p.engine.loading import check_range, load_part, part_from_tensors, part_tensor_names
from cakep2p.engine.model import ModelPart
from cakep2p.mesh.client import layer_range
from cakep2p.mesh.parts_cache import DEFAULT_CAP_BYTES, CacheFull, find_model_dir, read_cached_part
from cakep2p.mesh.sessions import Owner
from cakep2p.mesh.transfer import (Transfer, TransferRejected, accept_chunk, append_chunk, spool_in_memory,
                                   spool_tensors, store_transfer)
from cakep2p.units import format_size

log = logging.getLogger("cakep2p.mesh.server")  # one logger for the whole stage server

TRANSFER_STALL_S = 30.0  # a transfer without a chunk for this long is dropped (or taken over by another initiator)
Compute = Callable[..., Awaitable]  # compute(owner, function, *args): runs a function in the server's compute thread


class Refusal(Exception):
    """A request the stage turns down; `code` is the wire error code of the answer."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class LoadedPart:
    model: ModelPart
    weight_bytes: int
    source: str
    holders: dict[Owner, int] = field(default_factory=dict)   # owner -> the context its sessions get

    def context_for(self, owner: Owner) -> int:
        return self.holders[owner]


class PartStore:
    """Loaded parts by wire name and who holds them, the transfers under way, and the memory both take."""

    def __init__(self, *, parts_dir: Path, models_dirs: Sequence[Path], device: str,
                 free_bytes: Callable[[], int], compute: Compute, node_name: Callable[[], str] = lambda: "this node",
                 cache_cap: int = DEFAULT_CAP_BYTES) -> None:
        self.parts_dir, self.models_dirs, self.device = parts_dir, list(models_dirs), device
        self._free_bytes, self._compute, self._node_name = free_bytes, compute, node_name
        self.cache_cap = cache_cap
        self.parts: dict[wire.PartRef, LoadedPart] = {}
        self.transfers: dict[wire.PartRef, Transfer] = {}
        self._pending: dict[wire.PartRef, asyncio.Event] = {}  # parts being loaded; set when done or failed
        self._reserved_bytes = 0  # weights being loaded: counted from the budget check until registered or failed

    def used_bytes(self) -> int:
        return (sum(part.weight_bytes for part in self.parts.values())
                + sum(transfer.reserved_bytes for transfer in self.transfers.values()) + self._reserved_bytes)

    def close(self) -> None:
        self.parts.clear()
        for transfer in self.transfers.values():
            transfer.close()
        self.transfers.clear()

    # -- who holds what -----------------------------------------------------------------------------------------

    def held(self, owner: Owner, ref: wire.PartRef) -> LoadedPart | None:
        """The part if `owner` holds it (nobody uses a part it did not load)."""
        loaded = self.parts.get(ref)
        return loaded if loaded is not None and owner in loaded.holders else None

    def parts_of(self, owner: Owner) -> list[wire.PartRef]:
        return [ref for ref, loaded in self.parts.items() if owner in loaded.holders]

    def owners(self) -> set[Owner]:
        """Every owner that holds a part or sends one."""
        holders = {owner for loaded in self.parts.values() for owner in loaded.holders}
        return holders | {transfer.owner for transfer in self.transfers.values()}

    def unload(self, owner: Owner, ref: wire.PartRef) -> bool:
        """Give up `owner`'s hold on the part (the part goes with its last holder); False if it held none."""
        loaded = self.held(owner, ref)
        if loaded is None:
            return False
        del loaded.holders[owner]
        if not loaded.holders:
            del self.parts[ref]
        return True

    def release(self, owner: Owner) -> list[wire.PartRef]:
        """Drop every hold and transfer of `owner` (its lease lapsed); returns the parts that went."""
        gone = [ref for ref in self.parts_of(owner) if self.unload(owner, ref) and ref not in self.parts]
        for ref in [ref for ref, transfer in self.transfers.items() if transfer.owner == owner]:
            self.drop_transfer(ref)
        return gone

    # -- load_part ----------------------------------------------------------------------------------------------

    async def load(self, owner: Owner, request: wire.LoadPart) -> wire.LoadReply:
        """'ready' when the part is (or now is) in memory and held by `owner`, 'send' when the initiator must
        stream it; Refusal else."""
        ref = request.part
        while True:
            loaded = self.parts.get(ref)
            if loaded is not None:
                self._hold(owner, loaded, request.max_seq_len)
                return _ready(request.request_id, "memory", loaded.model)
            pending = self._pending.get(ref)
            if pending is None:
                break
            transfer = self.transfers.get(ref)
            stalled = transfer is not None and time.monotonic() - transfer.last_used > TRANSFER_STALL_S
            if transfer is not None and (transfer.owner == owner or stalled):
                self.drop_transfer(ref)  # the same initiator starts over, or takes over a stalled transfer
                continue
            with contextlib.suppress(asyncio.TimeoutError):  # another initiator is loading it: share its result
                await asyncio.wait_for(pending.wait(), timeout=TRANSFER_STALL_S / 4)
        self._pending[ref] = asyncio.Event()
        transfer_follows = False
        try:
            source = await self._load_own_copy(owner, request)
            if source is not None:
                return _ready(request.request_id, source, self.parts[ref].model)
            if request.source != "transfer":
                raise Refusal("not_found", f"this node has no copy of model {request.model_name} "
                                           f"({ref.model_fingerprint}); send it with source 'transfer'")
            args = _args_from_json(request.config_json)
            check_range(args, layer_range(ref))
            reserved = request.weight_bytes
            with self._reservation(reserved):  # handed over to the transfer, which counts it until it ends
                self.transfers[ref] = Transfer(owner, request, args, part_tensor_names(args, layer_range(ref)),
                                               reserved, spool_dir=self.parts_dir)
            transfer_follows = True
            return wire.LoadReply(request_id=request.request_id, status="send")
        finally:
            if not transfer_follows:
                self._end_pending(ref)

    async def _load_own_copy(self, owner: Owner, request: wire.LoadPart) -> str | None:
        """Load from the parts cache or a models dir, only a copy whose content digest is the part's name; the
        source name, or None if this node has no such copy."""
        ref, layers = request.part, layer_range(request.part)
        cached = await self._compute(owner, read_cached_part, ref, self.parts_dir)
        if cached is not None:
            config_json, weights, tensors = cached
            args = _args_from_json(config_json)
            with self._reservation(request.weight_bytes):
                model = await self._compute(owner, part_from_tensors, args, layers, weights, tensors, request.dtype,
                                            self.device)
                self._register(owner, request, model, "cache")
            return "cache"
        checkpoint = await self._compute(owner, find_model_dir, self.models_dirs, ref.model_fingerprint)
        if checkpoint is None:
            return None
        check_range(checkpoint.args, layers)
        identity = await self._compute(owner, part_identity, checkpoint, layers, request.weights)
        if identity.digest != ref.digest:
            log.info("this node's copy of %s has other weights than asked for; it will be sent", request.model_name)
            return None
        with self._reservation(identity.nbytes):
            model = await self._compute(owner, load_part, checkpoint, layers, request.dtype, self.device,
                                        request.weights)
            self._register(owner, request, model, "models_dir")
        return "models_dir"

    @contextlib.contextmanager
    def _reservation(self, nbytes: int):
        """Count `nbytes` as used while the block runs (a load awaits; a concurrent one must see them taken);
        the block registers what it loaded before the reservation is released."""
        if nbytes > self._free_bytes():
            raise Refusal("over_budget", f"loading needs {nbytes} bytes but this node offers only "
                                         f"{self._free_bytes()} more; plan with fewer layers here")
        self._reserved_bytes += nbytes
        try:
            yield
        finally:
            self._reserved_bytes -= nbytes

    def _hold(self, owner: Owner, loaded: LoadedPart, max_seq_len: int) -> None:
        """`owner` holds the part; its sessions get its own context, never more than the model's."""
        loaded.holders[owner] = min(max_seq_len, loaded.model.args.max_position_embeddings)

    def _register(self, owner: Owner, request: wire.LoadPart, model: ModelPart, source: str) -> None:
        loaded = LoadedPart(model, model.weight_bytes, source)
        self._hold(owner, loaded, request.max_seq_len)
        self.parts[request.part] = loaded
        log.info("loaded %s of %s from %s", model.layers.describe(), request.model_name, source)

    def _end_pending(self, ref: wire.PartRef) -> None:
        pending = self._pending.pop(ref, None)
        if pending is not None:
            pending.set()

    # -- tensor_chunk and transfer_end --------------------------------------------------------------------------

    def drop_transfer(self, ref: wire.PartRef) -> None:
        transfer = self.transfers.pop(ref, None)
        if transfer is not None:
            transfer.close()
        self._end_pending(ref)

    def drop_stalled(self, deadline: float) -> list[wire.PartRef]:
        """Drop the transfers that have had no chunk since `deadline` (monotonic); returns their parts."""
        stalled = [ref for ref, transfer in self.transfers.items() if transfer.last_used < deadline]
        for ref in stalled:
            self.drop_transfer(ref)
        return stalled

    def accept(self, owner: Owner, chunk: wire.TensorChunk) -> None:
        """Take one chunk of a transfer from `owner`; Refusal (and the transfer dropped) when it does not fit."""
        transfer = self.transfers.get(chunk.part)
        if transfer is None or transfer.owner != owner:
            raise Refusal("transfer_failed", "tensor_chunk: no transfer of that part in progress from you; "
                                             "send load_part")
        try:
            accept_chunk(transfer, chunk)
        except TransferRejected as rejection:
            self.drop_transfer(chunk.part)
            raise Refusal("transfer_failed", str(rejection)) from None
        except OSError as error:   # the spool's disk is full: go on in memory if the node lends it
            self._spool_in_memory(transfer, error)
            append_chunk(transfer, chunk)

    def _spool_in_memory(self, transfer: Transfer, error: OSError) -> None:
        extra = transfer.request.weight_bytes
        if transfer.in_memory or extra > self._free_bytes():
            self.drop_transfer(transfer.request.part)
            raise Refusal("disk_full", f"disk full on {self._node_name()}: cannot spool the part "
                                       f"({error.strerror or error}), and keeping its {format_size(extra)} in memory "
                                       "is more than this node offers; re-plan without it")
        log.warning("disk full on %s (%s): receiving the part into memory", self._node_name(), error.strerror or error)
        spool_in_memory(transfer)
        transfer.reserved_bytes += extra

    async def finish(self, owner: Owner, end: wire.TransferEnd) -> wire.LoadReply:
        """Verify a complete transfer, store it in the parts cache and build the part from the stored file (or
        from the received bytes, kept in memory only, when the cache cannot store it)."""
        transfer = self.transfers.get(end.part)
        if transfer is None or transfer.owner != owner:
            raise Refusal("transfer_failed", "transfer_end: no transfer of that part in progress from you")
        transfer.last_used = float("inf")  # being built: neither stalled nor abandoned
        try:  # the transfer keeps its memory reservation until the part is registered
            if not transfer.covers_every_tensor() or end.tensor_count != len(transfer.entries):
                raise Refusal("transfer_failed", f"transfer_end after {len(transfer.entries)} tensors, which do not "
                                                 f"make the part's {len(transfer.names)}")
            if transfer.content_digest() != end.part.digest:
                raise Refusal("transfer_failed", "transfer_end: the received tensors are not the part's content "
                                                 "(their digest differs from its name)")
            request = transfer.request
            tensors = await self._stored_tensors(owner, transfer)
            model = await self._compute(owner, part_from_tensors, transfer.args, layer_range(end.part),
                                        request.weights, tensors, request.dtype, self.device)
            del tensors
            self.transfers.pop(end.part, None)
            self._register(owner, request, model, "transfer")
        finally:
            self.drop_transfer(end.part)
        return _ready(end.request_id, "transfer", model)

    async def _stored_tensors(self, owner: Owner, transfer: Transfer):
        """The received tensors from the part's new cache file (the part is then in memory once, never twice), or
        from the spool when the disk is full or the part is bigger than the cache may hold."""
        if not transfer.in_memory:
            try:
                await self._compute(owner, store_transfer, transfer, self.parts_dir, self.cache_cap)
            except CacheFull as error:
                log.info("the part of %s is kept in memory only: %s", transfer.request.model_name, error)
                return spool_tensors(transfer)
            except OSError as error:
                log.warning("disk full on %s: the part of %s is kept in memory only, not cached (%s)",
                            self._node_name(), transfer.request.model_name, error.strerror or error)
                return spool_tensors(transfer)
            transfer.close()
            cached = await self._compute(owner, read_cached_part, transfer.request.part, self.parts_dir)
            if cached is None:
                raise Refusal("transfer_failed", "transfer_end: the received part could not be stored; retry")
            return cached[2]
        return spool_tensors(transfer)


def _ready(request_id: int, source: str, model: ModelPart) -> wire.LoadReply:
    return wire.LoadReply(request_id=request_id, status="ready", source=source, dtype=name_of(model.dtype))


def _args_from_json(config_json: str) -> ModelArgs:
    try:
        config = json.loads(config_json)
    except ValueError:
        raise Refusal("bad_request", "load_part: config_json is not valid JSON") from None
    if not isinstance(config, dict):
        raise Refusal("bad_request", "load_part: config_json must be a JSON object")
    return ModelArgs.from_config(config, source="the initiator's config.json")
