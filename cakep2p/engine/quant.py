"""Quantized weights, the canonical way every node stores and sends them: a small frozen type (codes, scales,
group), deterministic quantization (the same source gives bit-identical bytes on every node), GGUF blocks mapped
in exactly, and dequantization (the reference the kernels are checked against).

int8: value = scale[n] * q[n, k], q in -127..127, one scale per output row (what the weight-only kernel takes).
int4: value = scale[n, g] * q[n, k] + min[n, g] over groups of 32 along k, q in 0..15, packed two per byte (k even in
      the low nibble); scales and mins are float16. This is GGUF Q4_1 exactly; Q4_0 maps in with min = -8 * scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from cakep2p.errors import ModelError

Bits = Literal[8, 4]


class Rows(Protocol):
    """A matrix that gives float rows by slice (a tensor, or engine/safetensors.MappedRows over a file)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: slice) -> torch.Tensor: ...

INT4_GROUP = 32
QUANTIZE_CHUNK_ELEMENTS = 1 << 20   # values quantized at a time (4 MiB of float32)


@dataclass(frozen=True)
class QuantizedWeight:
    """A [rows, cols] weight quantized by row (int8) or by group of `group` columns (int4)."""

    bits: Bits
    codes: torch.Tensor             # int8 [rows, cols], or uint8 [rows, cols // 2] (two 4-bit codes per byte)
    scales: torch.Tensor            # int8: float32 [rows]; int4: float16 [rows, cols // group]
    mins: torch.Tensor | None       # int4: float16 [rows, cols // group]; int8: None
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.codes.shape
        return rows, width * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def unpacked_codes(self) -> torch.Tensor:
        """The integer codes [rows, cols]: int8 for int8, uint8 0..15 for int4."""
        if self.bits == 8:
            return self.codes
        return torch.stack((self.codes & 15, self.codes >> 4), dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight (or the given rows of it); the reference every kernel is checked against."""
        if self.bits == 8:
            return (self.codes[rows].float() * self.scales[rows].unsqueeze(-1)).to(dtype)
        codes = QuantizedWeight(4, self.codes[rows], self.scales[rows], self.mins[rows], self.group).unpacked_codes()
        grouped = codes.float().view(codes.shape[0], -1, self.group)
        values = grouped * self.scales[rows].float().unsqueeze(-1) + self.mins[rows].float().unsqueeze(-1)
        return values.reshape(codes.shape).to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 rows picked by `index` (an embedding lookup)."""
        picked = QuantizedWeight(self.bits, self.codes[index], self.scales[index],
                                 None if self.mins is None else self.mins[index], self.group)
        return picked.dequantize()

    @staticmethod
    def concat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack weights by rows (fused q/k/v or gate/up): row quantization makes this exact."""
        first = parts[0]
        if any(part.bits != first.bits or part.group != first.group for part in parts):
            raise ModelError("weights fused into one matrix must share one quantized format")
        mins = None if first.mins is None else torch.cat([part.mins for part in parts])
        return QuantizedWeight(first.bits, torch.cat([part.codes for part in parts]),
                               torch.cat([part.scales for part in parts]), mins, first.group)


def _by_rows(weight: torch.Tensor | Rows, quantize_rows, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fill `outputs` (each [rows, ...]) from `quantize_rows(float32 rows)` over slices of QUANTIZE_CHUNK_ELEMENTS:
    every row is quantized on its own, so the result is the whole matrix's, and a load's float32 copy stays a few
    MiB, whatever the matrix."""
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for first in range(0, weight.shape[0], step):
        for output, piece in zip(outputs, quantize_rows(weight[first:first + step].float())):
            output[first:first + step] = piece
    return outputs


def quantize_int8(weight: torch.Tensor | Rows) -> QuantizedWeight:
    """Symmetric per-row int8: scale = max|w| / 127, q = round-half-even(w / scale). Deterministic."""
    def rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        return torch.round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8), scales

    count, cols = weight.shape
    codes, scales = _by_rows(weight, rows, torch.empty(count, cols, dtype=torch.int8), torch.empty(count))
    return QuantizedWeight(8, codes, scales, None, cols)


def int4_group(cols: int) -> int:
    """Columns per 4-bit group: 32 (what the int4 kernel and GGUF use) for rows of 256 columns or more; narrower
    rows (toy models) get groups of at most an eighth of a row, which kept stories260K's 64-wide rows within
    +2 % perplexity (32 lost 7 %). Always a divisor of `cols`."""
    target = INT4_GROUP if cols >= 8 * INT4_GROUP else max(2, cols // 8)
    return next(size for size in range(min(target, cols), 0, -1) if cols % size == 0)


def quantize_int4(weight: torch.Tensor | Rows, group: int | None = None) -> QuantizedWeight:
    """Asymmetric 4-bit by groups of columns (GGUF Q4_1's form): min and scale = (max - min) / 15 are rounded to
    float16 first, so the stored scales are the exact ones the codes were chosen with. Deterministic."""
    rows, cols = weight.shape
    group = group or int4_group(cols)
    if cols % group or cols % 2:
        raise ModelError(f"a {rows}x{cols} weight cannot be quantized to 4 bits in groups of {group} columns")

    def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grouped = w.view(w.shape[0], cols // group, group)
        low = grouped.amin(dim=-1).half()
        spread = ((grouped.amax(dim=-1) - low.float()) / 15.0).half()
        scales = torch.where(spread > 0, spread, torch.ones_like(spread))
        codes = torch.round((grouped - low.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)).clamp_(0, 15)
        return pack_int4(codes.reshape(w.shape)), scales, low

    codes, scales, mins = _by_rows(weight, quantize_rows, torch.empty(rows, cols // 2, dtype=torch.uint8),
                                   *(torch.empty(rows, cols // group, dtype=torch.float16) for _ in range(2)))
    return QuantizedWeight(4, codes, scales, mins, group)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes 0..15 -> uint8 [rows, cols // 2], even columns in the low nibble."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def from_blocks(kind: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> QuantizedWeight:
    """GGUF blocks in Hugging Face row order (engine/gguf_quants.QuantBlocks' fields) as our canonical weight:
    Q4_1 and Q4_0 exactly; Q8_0 (a scale per 32 codes) re-quantized per row, as the int8 kernel needs."""
    if kind == "Q8_0":   # dequantized and re-quantized a slice of rows at a time, like quantize_int8 itself
        rows, cols = codes.shape
        step = max(1, QUANTIZE_CHUNK_ELEMENTS // cols)

        def requantized(first: int) -> QuantizedWeight:
            blocks = codes[first:first + step].float().view(-1, cols // 32, 32)
            return quantize_int8((blocks * scales[first:first + step].float().unsqueeze(-1)).reshape(-1, cols))

        parts = [requantized(first) for first in range(0, rows, step)]
        return QuantizedWeight(8, torch.cat([part.codes for part in parts]), torch.cat([part.scales for part in parts]),
                               None, cols)
    if kind == "Q4_0":
        return QuantizedWeight(4, pack_int4(codes), scales.half(), (scales.float() * -8.0).half(), 32)
    if kind == "Q4_1":
        return QuantizedWeight(4, pack_int4(codes), scales.half(), mins.half(), 32)
    raise ModelError(f"GGUF {kind} blocks do not map to a quantized format; dequantize them")
