"""The only serializer of the mesh: frozen message dataclasses to and from ZeroMQ frames ([msgpack header, raw
tensor bytes]); `decode` trusts nothing and raises only `WireError`. The protocol is documented in docs/protocol.md.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Sequence

import msgpack
import torch

PROTOCOL_VERSION = 1

MAX_HEADER_BYTES = 64 * 1024
MAX_CONFIG_BYTES = 48 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_FORWARD_BYTES = 128 * 1024 * 1024
MAX_FRAME_BYTES = MAX_FORWARD_BYTES + MAX_HEADER_BYTES  # what ZMQ_MAXMSGSIZE is set to
MAX_TENSOR_BYTES = 1 << 36
MAX_REQUEST_ID = (1 << 63) - 1
MAX_LAYER = 4096
MAX_SEQ_LEN = 1 << 20
MAX_DIM = 1 << 31
MAX_PARTS_LISTED = 256
MAX_TENSORS_PER_PART = 100_000

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
PART_DTYPES = ("auto", "float32", "bfloat16", "float16")
ERROR_CODES = (
    "bad_request",  # the message failed validation
    "unsupported_version",  # the peer speaks another protocol version
    "unknown_part",  # forward/unload/chunk for a part this node does not hold
    "unknown_session",
    "too_many_sessions",
    "over_budget",  # the request would exceed the memory this node offers
    "shape_mismatch",  # tensor shape or dtype does not fit the loaded part
    "not_found",  # load with source=local, but the node has no copy of the model
    "transfer_failed",  # sha256 mismatch, out-of-order chunk, incomplete transfer
    "internal",  # the node failed while serving a valid request
)

_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{16,64}")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_TENSOR_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class WireError(ValueError):
    """A message that cannot be encoded or decoded; `code` is the error code to answer with."""

    def __init__(self, message: str, code: str = "bad_request", request_id: int = 0):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


# -- field checks: each takes (value, field name) and returns the value or raises WireError ------------------

Check = Callable[[Any, str], Any]


def _integer(low: int, high: int) -> Check:
    def check(value: Any, name: str) -> int:
        if type(value) is not int or not low <= value <= high:
            raise WireError(f"{name} must be an integer in [{low}, {high}]")
        return value

    return check


def _boolean(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"{name} must be true or false")
    return value


def _pattern(pattern: re.Pattern, what: str) -> Check:
    def check(value: Any, name: str) -> str:
        if type(value) is not str or not pattern.fullmatch(value):
            raise WireError(f"{name} must be {what}")
        return value

    return check


def _text(max_chars: int) -> Check:
    def check(value: Any, name: str) -> str:
        if type(value) is not str or len(value) > max_chars or not value.isprintable():
            raise WireError(f"{name} must be one printable line of at most {max_chars} characters")
        return value

    return check


def _choice(options: Sequence[str]) -> Check:
    def check(value: Any, name: str) -> str:
        if type(value) is not str or value not in options:
            raise WireError(f"{name} must be one of {', '.join(options)}")
        return value

    return check


def _json_text(value: Any, name: str) -> str:
    if type(value) is not str or len(value.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise WireError(f"{name} must be a string of at most {MAX_CONFIG_BYTES} bytes")
    return value


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or len(value) > 4:
        raise WireError(f"{name} must be a list of at most 4 dimensions")
    for size in value:
        if type(size) is not int or not 1 <= size <= MAX_DIM:
            raise WireError(f"{name} dimensions must be integers in [1, {MAX_DIM}]")
    return tuple(value)


def _records(record_type: type, max_items: int) -> Check:
    def check(value: Any, name: str) -> tuple:
        if type(value) not in (tuple, list) or len(value) > max_items:
            raise WireError(f"{name} must be a list of at most {max_items} items")
        return tuple(_record(record_type, item, name) for item in value)

    return check


def _version(value: Any, name: str) -> int:
    if type(value) is not int:
        raise WireError(f"{name} must be an integer")
    if value != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {value} is not supported (this node speaks {PROTOCOL_VERSION}); "
            "run the same cakep2p version on every node",
            code="unsupported_version",
        )
    return value


REQUEST_ID = _integer(0, MAX_REQUEST_ID)
LAYER = _integer(0, MAX_LAYER)
COUNT = _integer(0, MAX_REQUEST_ID)
SESSION_ID = _pattern(_ID_PATTERN, "1-64 characters of A-Z a-z 0-9 _ . : -")
FINGERPRINT = _pattern(_FINGERPRINT_PATTERN, "16-64 lowercase hex digits")
SHA256 = _pattern(_SHA256_PATTERN, "64 lowercase hex digits")
TENSOR_NAME = _pattern(_TENSOR_NAME_PATTERN, "1-200 characters of A-Z a-z 0-9 _ . -")
DTYPE = _choice(tuple(DTYPES))


def _part(value: Any, name: str) -> "PartRef":
    return _record(PartRef, value, name)


def _field(check: Check, **kwargs: Any) -> Any:
    return field(metadata={"check": check}, **kwargs)


def _payload(kind: str) -> Any:
    """A field carried as the raw frame after the header ('tensor' or 'bytes'), not in the header."""
    return field(metadata={"payload": kind})


# -- messages ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PartRef:
    """Which part of which model: layers [start, end) plus the embedding and/or the head."""

    model_fingerprint: str = _field(FINGERPRINT)
    start: int = _field(LAYER)
    end: int = _field(LAYER)
    has_embedding: bool = _field(_boolean)
    has_head: bool = _field(_boolean)

    def validate(self) -> None:
        if self.end < self.start or (self.end == self.start and not (self.has_embedding or self.has_head)):
            raise WireError("part must hold layers [start, end) with start <= end, or the embedding or head")


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
    dtype: str = _field(_choice(PART_DTYPES), default="auto")
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
    """All tensors sent; `sha256` is over their raw bytes concatenated in part_tensor_names order."""

    type: ClassVar[str] = "transfer_end"
    part: PartRef = _field(_part)
    sha256: str = _field(SHA256)
    tensor_count: int = _field(_integer(0, MAX_TENSORS_PER_PART))


@dataclass(frozen=True, kw_only=True)
class Ack(Message):
    type: ClassVar[str] = "ack"


@dataclass(frozen=True, kw_only=True)
class Forward(Message):
    """Run `positions` positions from `start_pos` through a loaded part, in the session's KV cache."""

    type: ClassVar[str] = "forward"
    session_id: str = _field(SESSION_ID)
    part: PartRef = _field(_part)
    step: int = _field(COUNT)
    start_pos: int = _field(_integer(0, MAX_SEQ_LEN))
    positions: int = _field(_integer(1, MAX_SEQ_LEN))
    tensor: torch.Tensor = _payload("tensor")

    def validate(self) -> None:
        if self.tensor.dim() not in (1, 2) or self.tensor.shape[0] != self.positions:
            raise WireError(f"forward tensor must be [positions] or [positions, hidden], got {list(self.tensor.shape)}")
        if self.start_pos + self.positions > MAX_SEQ_LEN:
            raise WireError(f"forward start_pos + positions must not exceed {MAX_SEQ_LEN}")


@dataclass(frozen=True, kw_only=True)
class ForwardResult(Message):
    """Hidden states [positions, hidden] of a middle stage, or float32 logits [1, vocab] of the last position."""

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


# -- encoding and decoding ---------------------------------------------------------------------------------


def encode(message: Message) -> list:
    """Frames for `socket.send_multipart(frames, copy=False)`: the msgpack header, then a tensor's raw bytes."""
    header: dict[str, Any] = {"type": message.type}
    frames: list = []
    for message_field in fields(message):
        kind = message_field.metadata.get("payload")
        value = getattr(message, message_field.name)
        if kind == "tensor":
            tensor = _checked_tensor(value, PAYLOAD_LIMITS[message.type])
            header["dtype"] = DTYPE_NAMES[tensor.dtype]
            header["shape"] = list(tensor.shape)
            frames.append(tensor.reshape(-1).view(torch.uint8).numpy())
        elif kind == "bytes":
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise WireError(f"{message.type}.{message_field.name} must be bytes")
            frames.append(value)
    header.update(_to_map(message))
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError) as error:
        raise WireError(f"{message.type} cannot be encoded ({type(error).__name__})") from None
    if len(packed) > MAX_HEADER_BYTES:
        raise WireError(f"{message.type} header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}")
    return [packed, *frames]


def decode(frames: Sequence[Any]) -> Message:
    """The message in `frames` (bytes, memoryviews or zmq.Frames), fully validated; raises only WireError."""
    try:
        return _decode(frames)
    except WireError:
        raise
    except Exception as error:  # a safety net: malformed input must never surface as another exception type
        raise WireError(f"malformed message ({type(error).__name__})") from None


def _decode(frames: Sequence[Any]) -> Message:
    if not isinstance(frames, (list, tuple)) or not 1 <= len(frames) <= 2:
        raise WireError("a message is 1 or 2 frames: header and optional payload")
    header_bytes = _buffer(frames[0])
    if header_bytes.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {header_bytes.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            header_bytes, raw=False, strict_map_key=True, use_list=False, max_str_len=MAX_HEADER_BYTES,
            max_bin_len=0, max_ext_len=0, max_array_len=MAX_PARTS_LISTED, max_map_len=32,
        )
    except Exception as error:
        raise WireError(f"header is not valid msgpack ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("header must be a msgpack map")
    request_id = header.get("request_id")
    request_id = request_id if type(request_id) is int and 0 <= request_id <= MAX_REQUEST_ID else 0
    try:
        return _decode_header(header, frames[1:])
    except WireError as error:
        error.request_id = request_id
        raise


def _decode_header(header: dict, payload: Sequence[Any]) -> Message:
    op = header.get("type")
    if type(op) is not str or op not in MESSAGE_TYPES:
        raise WireError(f"unknown op {str(op)[:40]!r}")
    _version(header.get("protocol_version"), "protocol_version")
    message_type = MESSAGE_TYPES[op]
    payload_fields = [f for f in fields(message_type) if "payload" in f.metadata]
    if len(payload) != len(payload_fields):
        raise WireError(f"{op} takes {len(payload_fields)} payload frame(s), got {len(payload)}")
    extra: dict[str, Any] = {}
    body = {key: value for key, value in header.items() if key != "type"}
    for payload_field in payload_fields:
        buffer = _buffer(payload[0])
        limit = PAYLOAD_LIMITS[op]
        if payload_field.metadata["payload"] == "tensor":
            dtype_name = DTYPE(body.pop("dtype", None), "dtype")
            shape = _shape(body.pop("shape", None), "shape")
            if not shape:
                raise WireError(f"{op} tensor must have at least one dimension")
            nbytes = math.prod(shape) * DTYPES[dtype_name].itemsize
            if nbytes > limit:
                raise WireError(f"{op} tensor of {nbytes} bytes exceeds the limit of {limit}")
            if nbytes != buffer.nbytes:
                raise WireError(f"{op} payload is {buffer.nbytes} bytes, header declares {nbytes}")
            tensor = torch.frombuffer(bytearray(buffer), dtype=DTYPES[dtype_name]).reshape(shape)
            extra[payload_field.name] = tensor
        else:
            if buffer.nbytes > limit:
                raise WireError(f"{op} payload of {buffer.nbytes} bytes exceeds the limit of {limit}")
            extra[payload_field.name] = bytes(buffer)
    values = _checked_values(message_type, body)
    values.update(extra)
    return _build(message_type, values)


def _checked_values(record_type: type, mapping: Any) -> dict[str, Any]:
    """The header fields of `record_type` from `mapping`: exactly the expected keys, each value checked."""
    if not isinstance(mapping, dict):
        raise WireError(f"{record_type.__name__} must be a map")
    header_fields = [f for f in fields(record_type) if "check" in f.metadata]
    names = {f.name for f in header_fields}
    unknown = set(mapping) - names
    if unknown:
        raise WireError(f"unexpected field {sorted(map(str, unknown))[0][:40]!r} in {record_type.__name__}")
    missing = names - set(mapping)
    if missing:
        raise WireError(f"missing field {sorted(missing)[0]!r} in {record_type.__name__}")
    return {f.name: f.metadata["check"](mapping[f.name], f.name) for f in header_fields}


def _build(record_type: type, values: dict[str, Any]) -> Any:
    record = record_type(**values)
    record.validate()
    return record


def _record(record_type: type, value: Any, name: str) -> Any:
    if isinstance(value, record_type):
        _to_map(value)  # checks every field of a record built locally
        return value
    if not isinstance(value, dict):
        raise WireError(f"{name} must be a map")
    return _build(record_type, _checked_values(record_type, value))


def _to_map(record: Any) -> dict[str, Any]:
    """The header fields of a locally built record or message, checked; nested records become maps."""
    mapping: dict[str, Any] = {}
    for record_field in fields(record):
        if "check" not in record_field.metadata:
            continue
        value = record_field.metadata["check"](getattr(record, record_field.name), record_field.name)
        if isinstance(value, PartRef):
            value = _to_map(value)
        elif isinstance(value, tuple) and value and isinstance(value[0], PartRef):
            value = [_to_map(item) for item in value]
        elif isinstance(value, tuple):
            value = list(value)
        mapping[record_field.name] = value
    record.validate()
    return mapping


def _checked_tensor(tensor: Any, limit: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in DTYPE_NAMES:
        raise WireError(f"a wire tensor must be a torch tensor of {', '.join(DTYPES)}")
    if not 1 <= tensor.dim() <= 4 or 0 in tensor.shape:
        raise WireError(f"a wire tensor needs 1-4 non-empty dimensions, got {list(tensor.shape)}")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > limit:
        raise WireError(f"a wire tensor of {nbytes} bytes exceeds the limit of {limit}")
    return tensor.detach().cpu().contiguous()


def _buffer(frame: Any) -> memoryview:
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if buffer.ndim != 1 or buffer.itemsize != 1:
        buffer = buffer.cast("B")
    return buffer


if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian, as are all our platforms
    raise ImportError("cakep2p's wire format needs a little-endian machine")
