"""The matrix kernels, chosen once per weight for this device and CPU capability (measured side by side with
llama.cpp: bench/quant_bench.py), and the one `linear` the model calls.

On a CPU:
- float32: oneDNN's blocked layout (fp32 GEMM/GEMV).
- 16-bit: bf16 in oneDNN's layout where the CPU has bf16 hardware (avx512_bf16, AMX); elsewhere fbgemm's fp16
  kernel, fp32 in and out (bf16 GEMMs without the hardware run 3-6x slower than fp32 for a prompt).
- int8 / int4: torch's weight-only kernels (bf16 in) for decode and short prompts; a longer prompt runs int8 as
  chunks of dequantized rows through the dense GEMM (bf16 with the hardware, else fp32) and int4 in slices of
  64 rows through its kernel, which keeps no second copy of the weight (a 4-bit part costs its 4-bit bytes).
Elsewhere (CUDA, MPS) a quantized weight is dequantized once at load and runs as a dense one: correct and
simple; those devices are not what the quantized kernels were measured on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

from cakep2p.engine.quant import QuantizedWeight

aten = torch.ops.aten
Kind = Literal["dense", "mkldnn", "fp16", "int8", "int4"]
PACK_MIN_ELEMENTS = {torch.float32: 2**20, torch.bfloat16: 2**16}  # oneDNN packing pays off above these (1 thread)
WEIGHT_ONLY_MAX_ROWS = {8: 16, 4: 64}   # input rows up to which the weight-only kernel beats dequantize + GEMM
                                        # (both capabilities, 2 threads, TinyLlama's matrices)
DEQUANT_CHUNK_ROWS = 1024      # weight rows dequantized at a time on the many-rows path (cache-sized)
FP16_PACK_ELEMENTS = 2**24     # fbgemm packs fp16 from a float32 copy: a matrix bigger than this (a vocabulary
                               # head) is packed in row blocks, so that copy never costs more than 64 MiB
REFINED_LOGITS = 64            # largest logits per position recomputed in float32 (see logits)
BATCH_ROWS = WEIGHT_ONLY_MAX_ROWS[8]   # rows of different sessions one batched_linear call runs at once
BATCH_ROWS_16BIT = 8                   # the same through oneDNN's 16-bit GEMM (see shared_rows)


@lru_cache(maxsize=1)
def cpu_capability() -> str:
    """'AVX512', 'AVX2', 'DEFAULT'... as torch dispatches (ATEN_CPU_CAPABILITY can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


@lru_cache(maxsize=1)
def has_bf16_hardware() -> bool:
    """Whether oneDNN runs bf16 GEMMs in hardware here (ONEDNN_MAX_CPU_ISA can turn it off)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class PreparedLinear:
    """One weight [out, in] in the layout its kernel wants on this machine (never stored: it is device-specific)."""

    kind: Kind
    weight: object                       # dense/mkldnn tensor, fbgemm packed fp16 row blocks, int8 codes, int4pack, or
                                         # None: a shape the weight-only kernels cannot take (always dequantized)
    out_features: int
    in_features: int
    scales: torch.Tensor | None = None   # int8: bf16 [out]; int4: bf16 scales-and-zeros [in / group, out, 2]
    group: int = 0
    source: QuantizedWeight | None = None   # int8, and shapes the kernels cannot take: the canonical weight that
                                            # long prompts dequantize (int4 keeps only its packed form)

    @property
    def nbytes(self) -> int:
        if self.kind == "fp16":
            return 2 * self.out_features * self.in_features
        weight = self.weight
        if weight is None:
            return 0
        size = 0 if getattr(weight, "is_mkldnn", False) else weight.numel() * weight.element_size()
        if getattr(weight, "is_mkldnn", False):
            size = self.out_features * self.in_features * weight.element_size()
        return size + (self.scales.numel() * self.scales.element_size() if self.scales is not None else 0)


def kernel_name(compute: torch.dtype, quantized: int | None, device: torch.device,
                matrix: torch.Tensor | PreparedLinear | None = None) -> str:
    """What runs the matrices, for --json and the window: e.g. 'int8pack+dequant-bf16 (AVX512)'. `matrix`, one of
    the part's prepared matrices, tells the 16-bit kernels apart (fbgemm fp16 under float32 compute)."""
    if device.type != "cpu":
        return f"dense {str(compute).removeprefix('torch.')} ({device.type})"
    big = "bf16" if has_bf16_hardware() else "fp32"
    if quantized == 8:
        return f"int8pack+dequant-{big} ({cpu_capability()})"
    if quantized == 4:
        return f"int4pack ({cpu_capability()})"
    if isinstance(matrix, PreparedLinear) and matrix.kind == "fp16":
        return f"fbgemm-fp16 ({cpu_capability()})"
    if compute == torch.float32:
        return f"onednn-fp32 ({cpu_capability()})"
    return f"{'onednn-bf16' if has_bf16_hardware() else 'fbgemm-fp16'} ({cpu_capability()})"


def prepare(weight: torch.Tensor | QuantizedWeight, compute: torch.dtype,
            device: torch.device) -> torch.Tensor | PreparedLinear:
    """The weight in its kernel's layout; a float tensor may come back as a plain tensor (dense F.linear)."""
    if isinstance(weight, QuantizedWeight):
        if device.type != "cpu":
            return weight.dequantize(compute).to(device)
        return _prepare_quantized(weight)
    if device.type != "cpu" or os.environ.get("CAKEP2P_PACK", "1") == "0":
        return weight.to(device=device, dtype=compute)
    if weight.dtype in (torch.bfloat16, torch.float16) and compute == torch.float32:
        # 16 bits stay 16 bits (what the planner counts), fp32 in and out (bf16 -> fp16 is exact in fp16's range)
        if float(weight.abs().max()) <= 65504:
            step = max(1, FP16_PACK_ELEMENTS // weight.shape[1])
            blocks = tuple(torch.ops.quantized.linear_prepack_fp16(weight[first:first + step].float(), None)
                           for first in range(0, weight.shape[0], step))
            return PreparedLinear("fp16", blocks, weight.shape[0], weight.shape[1])
    return _pack_dense(weight.to(compute))


def _pack_dense(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout for a big CPU weight (~1.4x faster matrix-vector products); small ones stay."""
    if weight.numel() < PACK_MIN_ELEMENTS.get(weight.dtype, 2**62) or not torch.backends.mkldnn.is_available():
        return weight.contiguous()
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    except (RuntimeError, AttributeError):
        return weight.contiguous()


def _weight_only_fits(rows: int, cols: int, group: int) -> bool:
    """Shapes torch's weight-only kernels handle: int8pack reads garbage past an input width that is not a
    multiple of its vector tile (seen at 172), int4pack needs rows % 16 and a power-of-two group >= 32."""
    return cols % 64 == 0 and rows % 16 == 0 and (group == cols or group in (32, 64, 128, 256))


def _prepare_quantized(weight: QuantizedWeight) -> PreparedLinear:
    rows, cols = weight.shape
    if not _weight_only_fits(rows, cols, weight.group):  # toy shapes: always the dequantizing path
        return PreparedLinear(f"int{weight.bits}", None, rows, cols, group=weight.group, source=weight)
    if weight.bits == 8:
        return PreparedLinear("int8", weight.codes, rows, cols, weight.scales.to(torch.bfloat16), source=weight)
    packed = _int4pack(weight)
    scales, mins = weight.scales.float(), weight.mins.float()
    zeros = mins + 8.0 * scales  # the kernel computes (q - 8) * scale + zero
    scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).to(torch.bfloat16).contiguous()
    return PreparedLinear("int4", packed, rows, cols, scales_and_zeros, weight.group)


def _int4pack(weight: QuantizedWeight, step: int = 1024) -> torch.Tensor:
    """The kernel's layout, packed `step` rows at a time (whole 64-row blocks: the same bytes as at once), so the
    int32 codes the packer takes exist for `step` rows only, not for the whole matrix."""
    def packed(first: int) -> torch.Tensor:
        rows = QuantizedWeight(4, weight.codes[first:first + step], weight.scales, weight.mins, weight.group)
        return aten._convert_weight_to_int4pack_for_cpu(rows.unpacked_codes().to(torch.int32), 1)

    return torch.cat([packed(first) for first in range(0, weight.shape[0], step)])


def linear(x: torch.Tensor, weight: torch.Tensor | PreparedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight^T (+ bias) -> [M, out] in x's dtype, by the weight's kernel."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype != x.dtype:  # a 16-bit weight under float32 compute (quantized formats' head, a tied head)
            return linear(x.to(weight.dtype), weight).to(x.dtype) + (0 if bias is None else bias)
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)
    if weight.kind == "fp16":
        x32 = x.float()
        parts = [torch.ops.quantized.linear_dynamic_fp16(x32, block) for block in weight.weight]
        out = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(x.dtype)
    elif weight.weight is None or (weight.kind == "int8" and x.shape[0] > WEIGHT_ONLY_MAX_ROWS[8]):
        out = _dequantized_gemm(x, weight)
    else:
        step = WEIGHT_ONLY_MAX_ROWS[4] if weight.kind == "int4" else x.shape[0]
        out = torch.cat([_weight_only(x[first:first + step], weight) for first in range(0, x.shape[0], step)])
    return out if bias is None else out + bias


def shared_rows(weight: torch.Tensor | PreparedLinear, compute: torch.dtype) -> int:
    """How many input rows of `compute` dtype one call may take with each row's bits still those it gets alone.
    Whether a kernel keeps rows apart depends on the CPU as much as on the kernel (oneDNN's bf16 GEMM at K=5632 mixes
    them past 11 rows on one Xeon, from 8 on one EPYC; fbgemm's fp16 from 2 rows without AVX-512), so each kind's most
    (BATCH_ROWS for the int8/int4/fp16 kernels, BATCH_ROWS_16BIT for a 16-bit GEMM) is probed once per shape on this
    machine. A float32 GEMM's summation order depends on the rows from 2 on: 1, row by row."""
    if isinstance(weight, PreparedLinear):
        most = BATCH_ROWS if weight.weight is not None else 1
        key = (weight.kind, compute, weight.out_features, weight.in_features)
    else:
        most = BATCH_ROWS_16BIT if weight.dtype in (torch.bfloat16, torch.float16) else 1
        key = (weight.dtype, compute, weight.is_mkldnn, *weight.shape)
    if most > 1 and key not in _PROBED_ROWS:
        _PROBED_ROWS[key] = _rows_kept_apart(weight, compute, most)
    return _PROBED_ROWS.get(key, 1)


_PROBED_ROWS: dict[tuple, int] = {}


def _rows_kept_apart(weight: torch.Tensor | PreparedLinear, compute: torch.dtype, most: int) -> int:
    """The largest m <= most such that every call of 2..m rows gives each row the bits it gets alone."""
    width = weight.in_features if isinstance(weight, PreparedLinear) else weight.shape[1]
    x = torch.randn(most, width, generator=torch.Generator().manual_seed(0)).to(compute)
    alone = torch.cat([linear(x[row:row + 1], weight) for row in range(most)])
    for rows in range(2, most + 1):
        if not torch.equal(linear(x[:rows], weight), alone[:rows]):
            return rows - 1
    return most


def batched_linear(x: torch.Tensor, weight: torch.Tensor | PreparedLinear,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear() of rows from different sessions, each row bit-identical to linear() of that row alone: one weight
    read per shared_rows(weight) rows."""
    step = shared_rows(weight, x.dtype)
    if x.shape[0] <= step:
        return linear(x, weight, bias)
    return torch.cat([linear(x[first:first + step], weight, bias) for first in range(0, x.shape[0], step)])


def logits(x: torch.Tensor, head: torch.Tensor | PreparedLinear, batched: bool = False) -> torch.Tensor:
    """float32 logits [M, vocab]. Kernels that round their output to bf16 (the int8 kernel, a bf16 table) step by
    0.125 near 25, which ties greedy choices: each row's REFINED_LOGITS largest are recomputed in float32 from the
    exact weight rows wherever these are at hand (an int8 head, a plain 16-bit table). `batched`: the rows are
    different sessions' (batched_linear)."""
    out = (batched_linear if batched else linear)(x, head).float()
    if isinstance(head, PreparedLinear) and head.kind == "int8" and head.source is not None:
        codes, scales = head.source.codes, head.source.scales
    elif isinstance(head, torch.Tensor) and not head.is_mkldnn and head.dtype != torch.float32:
        codes, scales = head, None
    else:
        return out
    x32 = x.float()
    step = 1 if batched else 32   # rows of x at a time: the gathered weights stay a few MiB (a session's row alone)
    for first in range(0, out.shape[0], step):
        rows = slice(first, first + step)
        top = out[rows].topk(min(REFINED_LOGITS, out.shape[1]), dim=-1).indices
        exact = torch.einsum("mkh,mh->mk", codes[top].float(), x32[rows])
        out[rows] = out[rows].scatter(1, top, exact if scales is None else exact * scales[top])
    return out


def _weight_only(x: torch.Tensor, weight: PreparedLinear) -> torch.Tensor:
    """torch's weight-only kernels: bf16 activations, fp32 accumulation (fp32 activations take a slow path)."""
    x16 = x.to(torch.bfloat16)
    if weight.kind == "int8":
        out = aten._weight_int8pack_mm(x16, weight.weight, weight.scales)
    else:
        out = aten._weight_int4pack_mm_for_cpu(x16, weight.weight, weight.group, weight.scales)
    return out.to(x.dtype)


def _dequantized_gemm(x: torch.Tensor, weight: PreparedLinear) -> torch.Tensor:
    """Many input rows: dequantize DEQUANT_CHUNK_ROWS weight rows at a time (from the canonical codes) into a
    cache-sized buffer and run the dense GEMM on it (bf16 with the hardware, else fp32)."""
    gemm = torch.bfloat16 if has_bf16_hardware() else torch.float32
    xc = x.to(gemm)
    out_t = torch.empty(weight.out_features, x.shape[0], dtype=gemm)
    source = weight.source
    for first in range(0, weight.out_features, DEQUANT_CHUNK_ROWS):
        rows = slice(first, min(first + DEQUANT_CHUNK_ROWS, weight.out_features))
        if source.bits == 8:  # the row scale applies to the output: one copy of the codes, no multiply
            torch.mm(source.codes[rows].to(gemm), xc.t(), out=out_t[rows])
            out_t[rows] *= source.scales[rows].to(gemm).unsqueeze(1)
        else:
            torch.mm(source.dequantize(gemm, rows), xc.t(), out=out_t[rows])
    return out_t.t().to(x.dtype)
