"""Messages to and from ZeroMQ frames: [msgpack header, raw tensor bytes]. `decode` trusts nothing and raises only
WireError."""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from typing import Any, Sequence

import msgpack
import torch

from cakep2p.wire.fields import (DTYPE, DTYPE_NAMES, DTYPES, MAX_HEADER_BYTES, MAX_PARTS_LISTED, MAX_REQUEST_ID,
                                 WireError, _build, _checked_values, _shape, _to_map, _version)
from cakep2p.wire.messages import MESSAGE_TYPES, PAYLOAD_LIMITS, Message


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
