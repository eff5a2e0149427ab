"""The wire format: every op round-trips, bad values are refused on encode, and the decoder raises only WireError."""

import dataclasses
import random

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cakep2p import wire
from cakep2p.wire import codec

PART = wire.PartRef(model_fingerprint="0123456789abcdef" * 2, digest="cd" * 32, start=2, end=5, has_embedding=False,
                    has_head=True)
MIDDLE = dataclasses.replace(PART, end=4, has_head=False)   # a chained forward's part: no head


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def sample_messages() -> list[wire.Message]:
    """One message of every op, with non-default values."""
    return [
        wire.Ping(request_id=1),
        wire.Pong(request_id=2, node_id="node-1", name="kitchen laptop", loaded_parts=(PART, PART),
                  free_budget=123456789, sessions=1, max_sessions=8),
        wire.LoadPart(request_id=3, part=PART, model_name="stories260K", dtype="bfloat16", weights="int4",
                      weight_bytes=123456, max_seq_len=2048, source="transfer", config_json='{"hidden_size": 64}'),
        wire.LoadReply(request_id=4, status="ready", source="cache", dtype="bfloat16"),
        wire.TensorChunk(request_id=5, part=PART, name="model.layers.2.mlp.up_proj.weight", dtype="bfloat16",
                         shape=(4, 8), offset=16, total=64, data=bytes(range(32))),
        wire.TransferEnd(request_id=6, part=PART, tensor_count=27),
        wire.Ack(request_id=7),
        wire.Forward(request_id=8, session_id="s-1", part=PART, step=3, start_pos=5, positions=2,
                     tensor=torch.randn(2, 64).to(torch.bfloat16)),
        wire.Forward(request_id=14, session_id="s-1", part=MIDDLE, step=3, start_pos=5, positions=1,
                     every_position=True, owner_tag="a" * 64, grant="b" * 64, answer_on=7,
                     route=(wire.Hop(address="127.0.0.1", port=5555, part=MIDDLE, dtype="float32", grant="c" * 64,
                                     answer_on=2), wire.Hop(address="fe80::1", port=1, part=PART, dtype="bfloat16",
                                                            grant="d" * 64, answer_on=0)),
                     tensor=torch.randn(1, 64)),
        wire.ForwardResult(request_id=9, session_id="s-1", step=3, tensor=torch.randn(1, 512)),
        wire.EndSession(request_id=10, session_id="s-1"),
        wire.Unload(request_id=11, part=PART),
        wire.Error(request_id=12, code="over_budget", message="needs 5 bytes, offers 4"),
        wire.Heartbeat(request_id=13),
    ]


def assert_same(decoded: wire.Message, original: wire.Message) -> None:
    assert type(decoded) is type(original)
    for name in original.__dataclass_fields__:
        value, expected = getattr(decoded, name), getattr(original, name)
        if isinstance(expected, torch.Tensor):
            assert value.dtype == expected.dtype and torch.equal(value, expected)
        else:
            assert value == expected, name


def test_sample_messages_cover_every_op():
    assert {message.type for message in sample_messages()} == set(wire.MESSAGE_TYPES)


@pytest.mark.parametrize("message", sample_messages(), ids=lambda message: message.type)
def test_every_op_round_trips(message):
    assert_same(wire.decode(wire.encode(message)), message)


def test_forward_with_token_ids_round_trips():
    message = wire.Forward(session_id="abc", part=PART, step=0, start_pos=0, positions=3,
                           tensor=torch.tensor([1, 403, 407]))
    assert_same(wire.decode(wire.encode(message)), message)


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()), ids=str)
def test_tensor_of_every_allowed_dtype_round_trips(dtype):
    tensor = (torch.arange(12) - 6).to(dtype).reshape(3, 4)
    message = wire.ForwardResult(session_id="s", step=0, tensor=tensor)
    assert_same(wire.decode(wire.encode(message)), message)


def test_tensor_travels_as_its_own_raw_frame():
    tensor = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    frames = wire.encode(wire.ForwardResult(session_id="s", step=0, tensor=tensor))
    assert len(frames) == 2
    assert bytes(memoryview(frames[1])) == tensor.numpy().tobytes()
    header = msgpack.unpackb(frames[0])
    assert header["dtype"] == "float32" and header["shape"] == [3, 2] and header["protocol_version"] == wire.PROTOCOL_VERSION


def test_decode_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    message = sample_messages()[7]
    assert_same(wire.decode([zmq.Frame(bytes(memoryview(frame))) for frame in wire.encode(message)]), message)


@pytest.mark.parametrize("build", [
    lambda: wire.EndSession(session_id="has space"),
    lambda: wire.EndSession(session_id=""),
    lambda: wire.EndSession(session_id="x" * 65),
    lambda: wire.Error(code="no_such_code", message="x"),
    lambda: wire.Error(code="internal", message="two\nlines"),
    lambda: wire.Ping(request_id=-1),
    lambda: wire.Ping(request_id=True),
    lambda: wire.Unload(part=wire.PartRef(model_fingerprint="XYZ", digest="cd" * 32, start=0, end=1, has_embedding=True,
                                          has_head=False)),
    lambda: wire.Unload(part=wire.PartRef(model_fingerprint="ab" * 8, digest="cd" * 32, start=3, end=1, has_embedding=True,
                                          has_head=False)),
    lambda: wire.LoadPart(part=PART, model_name="m", weights="int4", weight_bytes=1, max_seq_len=0),
    lambda: wire.LoadPart(part=PART, model_name="m", weights="int4", weight_bytes=1, max_seq_len=16,
                          source="transfer"),
    lambda: wire.LoadPart(part=PART, model_name="m", weights="int3", weight_bytes=1, max_seq_len=16),
    lambda: wire.Forward(session_id="s", part=PART, step=0, start_pos=0, positions=2, tensor=torch.zeros(3, 4)),
    lambda: wire.Forward(session_id="s", part=PART, step=0, start_pos=0, positions=1,
                         tensor=torch.zeros(1, 4, dtype=torch.float64)),
    lambda: wire.ForwardResult(session_id="s", step=0, tensor=torch.zeros(0, 4)),
    lambda: wire.TensorChunk(part=PART, name="w", dtype="float32", shape=(2,), offset=0, total=9, data=b"x"),
    lambda: wire.TensorChunk(part=PART, name="w", dtype="float32", shape=(2,), offset=4, total=8, data=b"12345"),
], ids=lambda build: "")
def test_encode_refuses_invalid_values(build):
    with pytest.raises(wire.WireError):
        wire.encode(build())


def test_package_protocol_version_is_the_wires():
    import cakep2p

    assert cakep2p.PROTOCOL_VERSION == wire.PROTOCOL_VERSION


def test_other_protocol_version_is_refused_with_its_own_code():
    header = msgpack.packb({"type": "ping", "request_id": 7, "protocol_version": wire.PROTOCOL_VERSION + 1})
    with pytest.raises(wire.WireError) as caught:
        wire.decode([header])
    assert caught.value.code == "unsupported_version"
    assert caught.value.request_id == 7


def test_decode_error_carries_the_request_id_for_the_reply():
    header = msgpack.packb({"type": "end_session", "request_id": 42, "protocol_version": wire.PROTOCOL_VERSION, "session_id": "a b"})
    with pytest.raises(wire.WireError) as caught:
        wire.decode([header])
    assert caught.value.request_id == 42 and caught.value.code == "bad_request"


def test_payload_size_must_match_declared_shape():
    frames = wire.encode(wire.ForwardResult(session_id="s", step=0, tensor=torch.zeros(2, 4)))
    with pytest.raises(wire.WireError, match="declares"):
        wire.decode([frames[0], bytes(31)])


def test_huge_declared_shape_is_refused_before_any_allocation():
    header = msgpack.unpackb(wire.encode(wire.ForwardResult(session_id="s", step=0, tensor=torch.zeros(1, 4)))[0])
    header["shape"] = [2**31, 2**31]
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.decode([msgpack.packb(header), bytes(16)])


def test_oversize_header_is_refused():
    with pytest.raises(wire.WireError, match="header"):
        wire.decode([b"\x80" + bytes(wire.MAX_HEADER_BYTES)])


def test_unknown_and_missing_fields_are_refused():
    header = msgpack.unpackb(wire.encode(wire.Ack(request_id=1))[0])
    with pytest.raises(wire.WireError, match="unexpected field"):
        wire.decode([msgpack.packb({**header, "extra": 1})])
    del header["request_id"]
    with pytest.raises(wire.WireError, match="missing field"):
        wire.decode([msgpack.packb(header)])


def test_payload_frame_on_an_op_without_payload_is_refused():
    with pytest.raises(wire.WireError, match="payload"):
        wire.decode([wire.encode(wire.Ping())[0], b"1234"])


# -- fuzzing: hypothesis drives 4,500 examples that feed the decoder 11,500 generated inputs -----------------
# (the header/size/byte mutators make several inputs per example from a hypothesis-chosen random stream: cheap
# enough to keep this file under ~30 s on a loaded 2-core machine)


def decodes_or_refuses(frames) -> None:
    """The inner decoder, below decode's safety net (which would turn a validator's own crash into WireError)."""
    try:
        message = codec._decode(frames)
    except wire.WireError:
        return
    assert isinstance(message, wire.Message)


VALID_FRAMES = [wire.encode(message) for message in sample_messages()]
VALID_HEADERS = [msgpack.unpackb(frames[0]) for frames in VALID_FRAMES]
ODD_INTEGERS = [-(2**63), -1, 0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**64 - 1]
ODD_TEXT = ["", " ", "a\nb", "\x00", "é" * 70, "x" * 70_000, "../../etc/passwd", "ping", "float32", "💥"]


def random_value(rng: random.Random, depth: int = 0):
    """Any msgpack value, biased towards the edges validators must catch."""
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(ODD_INTEGERS) if rng.random() < 0.5 else rng.randint(-10, 10)
    if kind == 2:
        return rng.choice([float("nan"), float("inf"), -0.0, 1.5, 1e300])
    if kind == 3:
        return rng.choice(ODD_TEXT) if rng.random() < 0.5 else "".join(
            chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x30000)])) for _ in range(rng.randrange(20)))
    if kind == 4:
        return rng.randbytes(rng.randrange(40))
    if kind == 5:
        return rng.choice([[], [1, 2], {}, dict(VALID_HEADERS[2]["part"])])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 7:
        return {str(random_value(rng, depth + 1))[:20]: random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    return dict(VALID_HEADERS[rng.randrange(len(VALID_HEADERS))])


def mutated_header(rng: random.Random, header: dict) -> dict:
    header = dict(header)
    for _ in range(rng.randint(1, 3)):
        action = rng.choice(["replace", "replace", "delete", "add", "nested"])
        key = rng.choice(sorted(header)) if header else "type"
        if action == "replace":
            header[key] = random_value(rng)
        elif action == "delete":
            header.pop(key, None)
        elif action == "add":
            header[str(random_value(rng))[:12]] = random_value(rng)
        elif isinstance(header.get("part"), dict):
            header["part"] = mutated_header(rng, header["part"])
    return header


@fuzz(1500)
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_fuzz_random_frames_are_only_ever_refused_cleanly(frames):
    decodes_or_refuses(frames)


@fuzz(1000)
@given(st.sampled_from(range(len(VALID_HEADERS))), st.randoms(use_true_random=False))
@pytest.mark.slow
def test_fuzz_mutated_valid_headers_are_only_ever_refused_cleanly(index, rng):
    for _ in range(4):
        header = mutated_header(rng, VALID_HEADERS[index])
        payload = rng.choice([[], VALID_FRAMES[index][1:], [rng.randbytes(rng.randrange(200))]])
        decodes_or_refuses([msgpack.packb(header, use_bin_type=True), *payload])


@fuzz(1000)
@given(st.sampled_from(["forward", "forward_result", "tensor_chunk"]), st.randoms(use_true_random=False))
@pytest.mark.slow
def test_fuzz_huge_or_wrong_declared_sizes_are_only_ever_refused_cleanly(op, rng):
    index = [message.type for message in sample_messages()].index(op)
    for _ in range(3):
        header = dict(VALID_HEADERS[index])
        header["shape"] = [rng.choice([*ODD_INTEGERS, 2**62, 3, 64]) for _ in range(rng.randrange(7))]
        for key in ("total", "offset", "positions", "start_pos"):
            if key in header and rng.random() < 0.5:
                header[key] = rng.choice(ODD_INTEGERS)
        header["dtype"] = rng.choice([*wire.DTYPES, "float64", "bool", "", 7])
        decodes_or_refuses([msgpack.packb(header, use_bin_type=True), rng.randbytes(rng.randrange(64))])


@fuzz(1000)
@given(st.sampled_from(range(len(VALID_FRAMES))), st.randoms(use_true_random=False))
@pytest.mark.slow
def test_fuzz_corrupted_valid_bytes_are_only_ever_refused_cleanly(index, rng):
    for _ in range(3):
        frames = [bytearray(memoryview(frame).cast("B")) for frame in VALID_FRAMES[index]]
        target = rng.randrange(len(frames))
        frame = frames[target]
        if frame and rng.random() < 0.6:
            for _ in range(rng.randint(1, 4)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        else:
            frames[target] = frame[:rng.randrange(len(frame) + 1)]
        decodes_or_refuses([bytes(frame) for frame in frames])
