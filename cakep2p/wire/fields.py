"""The wire's vocabulary: limits, error codes, its dtype names, WireError, and the field checks every message field
declares (each takes (value, field name) and returns the value or raises WireError), plus building and checking
records from maps. Imports nothing from cakep2p outside cakep2p.wire."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import re
from dataclasses import field, fields
from typing import Any, Callable, Sequence

import torch

PROTOCOL_VERSION = 4  # 2: parts named by their content, weight formats, quantized tensors; 3: leases, disk_full;
# 4: chained forwards (a route of next stages, grants), every-position forwards

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
MAX_ROUTE_HOPS = 64
MAX_TENSORS_PER_PART = 100_000

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,    # quantized weights' codes
    "uint8": torch.uint8,  # two 4-bit codes per byte
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
PART_DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_FORMATS = ("f32", "bf16", "f16", "int8", "int4", "gguf")  # cakep2p/engine/formats.py
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
    "disk_full",  # the node cannot store the part and has no memory to keep it instead
    "unreachable",  # a chained forward's next stage could not be reached from this node
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


def _ip_address(value: Any, name: str) -> str:
    """An IPv4 or IPv6 literal (never a host name: a route must not make a node resolve names)."""
    if type(value) is str and len(value) <= 45:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
    raise WireError(f"{name} must be an IPv4 or IPv6 address")


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
OPTIONAL_SHA256 = _pattern(re.compile(r"(?:[0-9a-f]{64})?"), "empty or 64 lowercase hex digits")
ADDRESS = _ip_address
PORT = _integer(1, 65535)
CONNECTION = _integer(0, (1 << 32) - 1)
TENSOR_NAME = _pattern(_TENSOR_NAME_PATTERN, "1-200 characters of A-Z a-z 0-9 _ . -")
DTYPE = _choice(tuple(DTYPES))


def _field(check: Check, **kwargs: Any) -> Any:
    return field(metadata={"check": check}, **kwargs)


def _payload(kind: str) -> Any:
    """A field carried as the raw frame after the header ('tensor' or 'bytes'), not in the header."""
    return field(metadata={"payload": kind})


@functools.cache
def _header_fields(record_type: type) -> tuple[tuple[str, Check], ...]:
    """(name, check) of each header field of a record or message type (every message on the path asks)."""
    return tuple((f.name, f.metadata["check"]) for f in fields(record_type) if "check" in f.metadata)


def _checked_values(record_type: type, mapping: Any) -> dict[str, Any]:
    """The header fields of `record_type` from `mapping`: exactly the expected keys, each value checked."""
    if not isinstance(mapping, dict):
        raise WireError(f"{record_type.__name__} must be a map")
    header_fields = _header_fields(record_type)
    if len(mapping) != len(header_fields) or any(name not in mapping for name, _ in header_fields):
        names = {name for name, _ in header_fields}
        unknown = set(mapping) - names
        if unknown:
            raise WireError(f"unexpected field {sorted(map(str, unknown))[0][:40]!r} in {record_type.__name__}")
        raise WireError(f"missing field {sorted(names - set(mapping))[0]!r} in {record_type.__name__}")
    return {name: check(mapping[name], name) for name, check in header_fields}


def _build(record_type: type, values: dict[str, Any]) -> Any:
    record = record_type(**values)
    record.validate()
    return record


def _record(record_type: type, value: Any, name: str) -> Any:
    if isinstance(value, record_type):
        return value    # built locally: _to_map checks every field of it as it maps it (once, not at every level)
    if not isinstance(value, dict):
        raise WireError(f"{name} must be a map")
    return _build(record_type, _checked_values(record_type, value))


def _to_map(record: Any) -> dict[str, Any]:
    """The header fields of a locally built record or message, checked; nested records become maps."""
    mapping: dict[str, Any] = {}
    for name, check in _header_fields(type(record)):
        value = check(getattr(record, name), name)
        if dataclasses.is_dataclass(value):
            value = _to_map(value)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            value = [_to_map(item) for item in value]
        elif isinstance(value, tuple):
            value = list(value)
        mapping[name] = value
    record.validate()
    return mapping

