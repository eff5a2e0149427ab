"""The only serializer of the mesh: frozen message dataclasses to and from ZeroMQ frames ([msgpack header, raw
tensor bytes]); `decode` trusts nothing and raises only `WireError`. The protocol is documented in docs/protocol.md.

- fields.py: limits, error codes, dtype names and the field checks
- messages.py: the messages
- codec.py: encode and decode

Pure: imports nothing from cakep2p outside this package.
"""

from cakep2p.wire.codec import decode, encode
from cakep2p.wire.fields import (DTYPE_NAMES, DTYPES, ERROR_CODES, MAX_CHUNK_BYTES, MAX_CONFIG_BYTES, MAX_DIM,
                                 MAX_FORWARD_BYTES, MAX_FRAME_BYTES, MAX_HEADER_BYTES, MAX_LAYER, MAX_PARTS_LISTED,
                                 MAX_REQUEST_ID, MAX_ROUTE_HOPS, MAX_SEQ_LEN, MAX_TENSOR_BYTES, MAX_TENSORS_PER_PART,
                                 PART_DTYPES, PROTOCOL_VERSION, WEIGHT_FORMATS, WireError)
from cakep2p.wire.messages import (MESSAGE_TYPES, PAYLOAD_LIMITS, Ack, EndSession, Error, Forward, ForwardResult,
                                   Heartbeat, Hop, LoadPart, LoadReply, Message, PartRef, Ping, Pong, TensorChunk,
                                   TransferEnd, Unload)

__all__ = ["DTYPES", "DTYPE_NAMES", "ERROR_CODES", "MAX_CHUNK_BYTES", "MAX_CONFIG_BYTES", "MAX_DIM",
           "MAX_FORWARD_BYTES", "MAX_FRAME_BYTES", "MAX_HEADER_BYTES", "MAX_LAYER", "MAX_PARTS_LISTED",
           "MAX_REQUEST_ID", "MAX_ROUTE_HOPS", "MAX_SEQ_LEN", "MAX_TENSOR_BYTES", "MAX_TENSORS_PER_PART",
           "MESSAGE_TYPES", "PART_DTYPES", "PAYLOAD_LIMITS", "PROTOCOL_VERSION", "Ack", "EndSession", "Error", "Forward",
           "ForwardResult", "Heartbeat", "Hop", "LoadPart", "LoadReply", "Message", "PartRef", "Ping", "Pong",
           "TensorChunk", "TransferEnd", "Unload", "WEIGHT_FORMATS", "WireError", "decode", "encode"]
