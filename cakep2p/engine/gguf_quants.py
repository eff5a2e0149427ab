"""The GGUF block formats, decoded: every supported ggml type's raw bytes to float32 (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), vectorized in torch, and the integer codes of the blocks kept quantized."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from cakep2p.errors import ModelError


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
