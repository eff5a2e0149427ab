"""A GGUF's tensor data: one tensor's bytes decoded from its ggml block format to float32 (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; vectorized torch), in Hugging Face layout (llama.cpp's q/k row
permutation undone), or kept quantized as integer codes and scales (Q8_0, Q4_0, Q4_1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from cakep2p.engine.gguf_file import FLOAT_TORCH, GGUFFile, TensorRecord
from cakep2p.errors import ModelError

BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1)  # the types `quantized_blocks` hands out as codes + scales


@dataclass(frozen=True)
class QuantBlocks:
    """A Q8_0/Q4_0/Q4_1 matrix kept quantized, in HF row order: one scale (and min) per 32 codes of a row.

    Q8_0: value = scale * code (code int8); Q4_0: value = scale * (code - 8); Q4_1: value = scale * code + min
    (codes uint8 0..15). scales/mins are float16 [rows, cols // 32]; codes are [rows, cols].
    """

    ggml_type: T
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    block_size: int = 32

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        codes = self.codes.view(rows, cols // self.block_size, self.block_size).to(torch.float32)
        if self.ggml_type == T.Q4_0:
            codes = codes - 8
        values = self.scales.to(torch.float32).unsqueeze(-1) * codes
        if self.mins is not None:
            values = values + self.mins.to(torch.float32).unsqueeze(-1)
        return values.reshape(rows, cols)


def _raw_bytes(gguf: GGUFFile, record: TensorRecord) -> torch.Tensor:
    """Just this tensor's bytes, copied out of the memory map."""
    return torch.from_numpy(np.array(gguf.reader.data[record.offset:record.offset + record.nbytes]))


def _record(gguf: GGUFFile, name: str) -> TensorRecord:
    if name not in gguf.tensors:
        raise ModelError(f"{gguf.path.name} has no tensor {name!r}")
    return gguf.tensors[name]


def unpermute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: GGUF row h*D + 2*i + s holds HF row h*D + s*D/2 + i (i < D/2, s in 0,1)."""
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def dequantize(gguf: GGUFFile, name: str, keep_float: bool = False) -> torch.Tensor:
    """One tensor as float32 in HF layout (q/k rows un-permuted for llama); reads only that tensor's bytes.
    With `keep_float`, an F16 or BF16 tensor keeps its type."""
    record = _record(gguf, name)
    data = _raw_bytes(gguf, record)
    if keep_float and record.ggml_type in FLOAT_TORCH:
        values = data.view(FLOAT_TORCH[record.ggml_type]).reshape(record.shape)
    else:
        values = dequantize_raw(data, record.ggml_type).reshape(record.shape)
    return unpermute_rows(values, record.rope_heads) if record.rope_heads else values


def quantized_blocks(gguf: GGUFFile, name: str) -> QuantBlocks:
    """A Q8_0/Q4_0/Q4_1 matrix as integer codes + float16 scales (+ mins) in HF row order."""
    record = _record(gguf, name)
    if record.ggml_type not in BLOCK_TYPES or len(record.shape) != 2:
        raise ModelError(f"{name} is {record.ggml_type.name} {list(record.shape)}; only Q8_0, Q4_0 and Q4_1 "
                         "matrices can be kept quantized")
    rows, cols = record.shape
    blocks = _raw_bytes(gguf, record).view(rows * cols // 32, -1)
    scales = half_field(blocks, 0, torch.float16).reshape(rows, cols // 32)
    mins = half_field(blocks, 2, torch.float16).reshape(rows, cols // 32) if record.ggml_type == T.Q4_1 else None
    if record.ggml_type == T.Q8_0:
        codes = blocks[:, 2:].contiguous().view(torch.int8)
    else:
        codes = nibbles(blocks[:, 4 if mins is not None else 2:])
    codes = codes.reshape(rows, cols)
    if record.rope_heads:
        codes, scales = unpermute_rows(codes, record.rope_heads), unpermute_rows(scales, record.rope_heads)
        mins = unpermute_rows(mins, record.rope_heads) if mins is not None else None
    return QuantBlocks(record.ggml_type, codes, scales, mins)




def half_field(blocks: torch.Tensor, start: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float16 field at byte `start` of each block, as [blocks, 1] of `dtype`."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(dtype)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[blocks, 16] bytes -> [blocks, 32] codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """[blocks, n] bytes -> [blocks, count, n]: bit b of every byte, for b < count."""
    shifts = torch.arange(count, dtype=torch.uint8).view(1, count, 1)
    return (packed.unsqueeze(1) >> shifts) & 1


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, as float32 [blocks, 8]."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((a & 63, (c & 0x0F) | ((a >> 6) << 4)), dim=-1)
    mins = torch.cat((b & 63, (c >> 4) | ((b >> 6) << 4)), dim=-1)
    return scales.to(torch.float32), mins.to(torch.float32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * half_field(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return half_field(b, 0) * (nibbles(b[:, 2:]).to(torch.float32) - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return half_field(b, 0) * nibbles(b[:, 4:]).to(torch.float32) + half_field(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    high = _bits(b[:, 2:6], 8).transpose(1, 2).reshape(-1, 32)  # element 8*byte + bit
    return half_field(b, 0) * ((nibbles(b[:, 6:]) | (high << 4)).to(torch.float32) - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    high = _bits(b[:, 4:8], 8).transpose(1, 2).reshape(-1, 32)
    return half_field(b, 0) * (nibbles(b[:, 8:]) | (high << 4)).to(torch.float32) + half_field(b, 2)


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 128 bytes -> [blocks, 8, 32]: sub-block 2c is the low nibbles of bytes 32c.., 2c+1 the high."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(b[:, 4:16])
    d, dmin = (half_field(b, 0) * scales).unsqueeze(-1), (half_field(b, 2) * mins).unsqueeze(-1)
    return d * _k_low(b[:, 16:144]).to(torch.float32) - dmin


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(b[:, 4:16])
    d, dmin = (half_field(b, 0) * scales).unsqueeze(-1), (half_field(b, 2) * mins).unsqueeze(-1)
    q = _k_low(b[:, 48:176]) | (_bits(b[:, 16:48], 8) << 4)  # bit s of qh byte l is sub-block s, element l
    return d * q.to(torch.float32) - dmin


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(-1, 256)           # half, nibble, 64
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((qh >> shifts) & 3).reshape(-1, 256)                            # half, bit pair, 32
    q = ((low | (high << 4)).to(torch.float32) - 32).reshape(-1, 16, 16)
    d = half_field(b, 208) * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return d.unsqueeze(-1) * q


_DEQUANTIZERS = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
                 T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}
_FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def dequantize_raw(data: torch.Tensor, ggml_type: T) -> torch.Tensor:
    """Raw uint8 bytes of a tensor in `ggml_type` -> flat float32 values (file order)."""
    ggml_type = T(ggml_type)
    if ggml_type in _FLOATS:
        return data.view(_FLOATS[ggml_type]).to(torch.float32)
    if ggml_type not in _DEQUANTIZERS:
        raise ModelError(f"ggml type {ggml_type.name} is not supported")
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    return _DEQUANTIZERS[ggml_type](data.view(-1, type_size)).reshape(-1)
