"""Every message of the mesh as a frozen dataclass: its op name (`type`), its fields with their checks, and the
checks across fields (`validate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cakep2p.wire.fields import (ADDRESS, CONNECTION, COUNT, DTYPE, DTYPES, ERROR_CODES, FINGERPRINT, LAYER,
                                 MAX_CHUNK_BYTES, MAX_FORWARD_BYTES, MAX_PARTS_LISTED, MAX_ROUTE_HOPS, MAX_SEQ_LEN,
                                 MAX_TENSORS_PER_PART, MAX_TENSOR_BYTES, OPTIONAL_SHA256, PART_DTYPES, PORT,
                                 PROTOCOL_VERSION, REQUEST_ID, SESSION_ID, SHA256, TENSOR_NAME, WEIGHT_FORMATS,
                                 WireError, _boolean, _choice, _field, _integer, _json_text, _payload, _record,
                                 _records, _shape, _text, _version)



@dataclass(frozen=True, kw_only=True)
class PartRef:
    """Which part of which model: layers [start, end) plus the embedding and/or the head, and `digest`, the sha256
    of its weights in their format (engine/digests.py): a part is served only under the name of its content."""

    model_fingerprint: str = _field(FINGERPRINT)
    digest: str = _field(SHA256)
    start: int = _field(LAYER)
    end: int = _field(LAYER)
    has_embedding: bool = _field(_boolean)
    has_head: bool = _field(_boolean)

    def validate(self) -> None:
        if self.end < self.start or (self.end == self.start and not (self.has_embedding or self.has_head)):
            raise WireError("part must hold layers [start, end) with start <= end, or the embedding or head")




def _part(value: Any, name: str) -> "PartRef":
    return _record(PartRef, value, name)


@dataclass(frozen=True, kw_only=True)
class Hop:
    """The next stage of a chained forward: where it listens, the part it runs, the dtype its hidden states travel
    in, the initiator's grant that lets the sender drive that one session there (mesh/lease.py), and which of the
    initiator's connections to that stage (the number that ends its routing id) the stage answers on."""

    address: str = _field(ADDRESS)
    port: int = _field(PORT)
    part: PartRef = _field(_part)
    dtype: str = _field(_choice(PART_DTYPES[1:]))
    grant: str = _field(SHA256)
    answer_on: int = _field(CONNECTION)

    def validate(self) -> None:
        """Each field is checked by its own check."""


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message: the op name (`type`), the protocol version and the request id replies echo."""

    type: ClassVar[str] = ""
    request_id: int = _field(REQUEST_ID, default=0)
    protocol_version: int = _field(_version, default=PROTOCOL_VERSION)

    def validate(self) -> None:
        """Checks across fields; single fields are checked by their field check."""


@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    type: ClassVar[str] = "ping"


@dataclass(frozen=True, kw_only=True)
class Pong(Message):
    """Capabilities: who the node is, what it holds, how much memory it still offers."""

    type: ClassVar[str] = "pong"
    node_id: str = _field(SESSION_ID)
    name: str = _field(_text(64))
    loaded_parts: tuple[PartRef, ...] = _field(_records(PartRef, MAX_PARTS_LISTED), default=())
    free_budget: int = _field(COUNT, default=0)
    sessions: int = _field(COUNT, default=0)
    max_sessions: int = _field(COUNT, default=0)


@dataclass(frozen=True, kw_only=True)
class LoadPart(Message):
    """Load a part: from the node's own copy (source 'local') or, if it has none, from tensors that follow."""

    type: ClassVar[str] = "load_part"
    part: PartRef = _field(_part)
    model_name: str = _field(_text(128))
    dtype: str = _field(_choice(PART_DTYPES), default="auto")   # activations; auto: the node's choice
    weights: str = _field(_choice(WEIGHT_FORMATS))
    weight_bytes: int = _field(_integer(0, MAX_TENSOR_BYTES))   # the part's tensors in that format
    max_seq_len: int = _field(_integer(1, MAX_SEQ_LEN))
    source: str = _field(_choice(("local", "transfer")), default="local")
    config_json: str = _field(_json_text, default="")

    def validate(self) -> None:
        if self.source == "transfer" and not self.config_json:
            raise WireError("load_part with source 'transfer' must carry config_json")


@dataclass(frozen=True, kw_only=True)
class LoadReply(Message):
    """'ready' (with where the weights came from) or 'send' (the initiator streams the part's tensors)."""

    type: ClassVar[str] = "load_reply"
    status: str = _field(_choice(("ready", "send")))
    source: str = _field(_choice(("", "memory", "cache", "models_dir", "transfer")), default="")
    dtype: str = _field(_choice(("", *PART_DTYPES[1:])), default="")  # the loaded part's dtype, when ready

    def validate(self) -> None:
        if (self.status == "ready") != bool(self.source and self.dtype):
            raise WireError("load_reply: 'ready' carries source and dtype, 'send' carries neither")


@dataclass(frozen=True, kw_only=True)
class TensorChunk(Message):
    """`data` is bytes [offset, offset+len) of the tensor `name` (dtype, shape: `total` bytes in all)."""

    type: ClassVar[str] = "tensor_chunk"
    part: PartRef = _field(_part)
    name: str = _field(TENSOR_NAME)
    dtype: str = _field(DTYPE)
    shape: tuple[int, ...] = _field(_shape)
    offset: int = _field(_integer(0, MAX_TENSOR_BYTES))
    total: int = _field(_integer(1, MAX_TENSOR_BYTES))
    data: bytes = _payload("bytes")

    def validate(self) -> None:
        expected = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.total != expected:
            raise WireError(f"tensor_chunk total {self.total} != {expected} bytes for {self.dtype}{list(self.shape)}")
        size = memoryview(self.data).nbytes
        if not 1 <= size <= MAX_CHUNK_BYTES or self.offset + size > self.total:
            raise WireError(f"tensor_chunk data must be 1-{MAX_CHUNK_BYTES} bytes inside [0, total)")


@dataclass(frozen=True, kw_only=True)
class TransferEnd(Message):
    """All tensors sent; the stage uses them only if their content digest is the part's `digest`."""

    type: ClassVar[str] = "transfer_end"
    part: PartRef = _field(_part)
    tensor_count: int = _field(_integer(0, MAX_TENSORS_PER_PART))


@dataclass(frozen=True, kw_only=True)
class Ack(Message):
    type: ClassVar[str] = "ack"


@dataclass(frozen=True, kw_only=True)
class Forward(Message):
    """Run `positions` positions from `start_pos` through a loaded part, in the session's KV cache.

    Chained: with a `route`, the stage sends its output on to route[0] as a relayed Forward (the rest of the route
    with it) instead of answering; the last stage answers the initiator. A relayed Forward names its owner by
    `owner_tag` and carries that hop's `grant` and `answer_on`. `every_position`: each position with the bits of
    forwarding it alone, and a head answers the logits of all of them."""

    type: ClassVar[str] = "forward"
    session_id: str = _field(SESSION_ID)
    part: PartRef = _field(_part)
    step: int = _field(COUNT)
    start_pos: int = _field(_integer(0, MAX_SEQ_LEN))
    positions: int = _field(_integer(1, MAX_SEQ_LEN))
    every_position: bool = _field(_boolean, default=False)
    route: tuple[Hop, ...] = _field(_records(Hop, MAX_ROUTE_HOPS), default=())
    owner_tag: str = _field(OPTIONAL_SHA256, default="")
    grant: str = _field(OPTIONAL_SHA256, default="")
    answer_on: int = _field(CONNECTION, default=0)
    tensor: torch.Tensor = _payload("tensor")

    def validate(self) -> None:
        if self.tensor.dim() not in (1, 2) or self.tensor.shape[0] != self.positions:
            raise WireError(f"forward tensor must be [positions] or [positions, hidden], got {list(self.tensor.shape)}")
        if self.start_pos + self.positions > MAX_SEQ_LEN:
            raise WireError(f"forward start_pos + positions must not exceed {MAX_SEQ_LEN}")
        if bool(self.owner_tag) != bool(self.grant):
            raise WireError("a relayed forward carries both owner_tag and grant, a direct one neither")
        if self.route and self.part.has_head:
            raise WireError("a forward through the head is the last of its chain: it takes no route")


@dataclass(frozen=True, kw_only=True)
class ForwardResult(Message):
    """Hidden states [positions, hidden] of a middle stage, or float32 logits from a head: [1, vocab] of the last
    position, or [positions, vocab] for an every-position forward."""

    type: ClassVar[str] = "forward_result"
    session_id: str = _field(SESSION_ID)
    step: int = _field(COUNT)
    tensor: torch.Tensor = _payload("tensor")

    def validate(self) -> None:
        if self.tensor.dim() != 2:
            raise WireError(f"forward_result tensor must be 2-D, got {list(self.tensor.shape)}")


@dataclass(frozen=True, kw_only=True)
class EndSession(Message):
    type: ClassVar[str] = "end_session"
    session_id: str = _field(SESSION_ID)


@dataclass(frozen=True, kw_only=True)
class Unload(Message):
    type: ClassVar[str] = "unload"
    part: PartRef = _field(_part)


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    type: ClassVar[str] = "error"
    code: str = _field(_choice(ERROR_CODES))
    message: str = _field(_text(300))


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    type: ClassVar[str] = "heartbeat"


MESSAGE_TYPES: dict[str, type[Message]] = {
    message_type.type: message_type
    for message_type in (
        Ping, Pong, LoadPart, LoadReply, TensorChunk, TransferEnd, Ack,
        Forward, ForwardResult, EndSession, Unload, Error, Heartbeat,
    )
}
PAYLOAD_LIMITS = {"forward": MAX_FORWARD_BYTES, "forward_result": MAX_FORWARD_BYTES, "tensor_chunk": MAX_CHUNK_BYTES}

