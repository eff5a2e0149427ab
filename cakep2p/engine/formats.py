"""Weight formats: what a part's weights are made of in each format, tensor by tensor. These "served" tensors are
what a node loads, what travels to a peer and what the parts cache keeps; every node makes bit-identical ones
from the same source, so a part is named by their content.

f32 / bf16 / f16: every tensor as that float type.
int8 / int4:      every matrix quantized (engine/quant.py), stored as `<name>.q8` + `<name>.scale`, or `<name>.q4`
                  + `<name>.scale` + `<name>.min`; vectors (norms, biases) stay in their float type. The embedding
                  (and the LM head) is a step finer, as llama.cpp keeps its output tensor: float in int8, int8 in
                  int4. Measured on stories260K, teacher-forced over 512 of its own tokens: an int8 head took
                  top-1 agreement from 100 % to 97.9 %, an int4 one perplexity from +2 % to +8.5 %.
gguf:             a GGUF's own blocks where they map (Q4_0/Q4_1 -> int4 exactly, Q8_0 -> int8), other block types
                  re-quantized from their exact values (Q6_K -> int8, Q4_K/Q5_K/Q5_0/Q5_1 -> int4).
"""

from __future__ import annotations

from math import prod
from typing import Iterator, Mapping

import torch

from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.dtypes import BY_NAME
from cakep2p.engine.gguf_quants import BLOCK_TYPES, quantized_blocks
from cakep2p.engine.quant import QuantizedWeight, from_blocks, int4_group, quantize_int4, quantize_int8
from cakep2p.errors import ModelError

FLOAT_FORMATS = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
FORMATS = (*FLOAT_FORMATS, "int8", "int4", "gguf")
USER_FORMATS = ("auto", "bf16", "f16", "f32", "int8", "int4")
FORMAT_OF_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
EIGHT_BIT_BLOCKS = ("Q8_0", "Q6_K")  # GGUF block types re-quantized to int8 (finer than 4 bits); others to int4
SUFFIXES = {8: (".q8", ".scale"), 4: (".q4", ".scale", ".min")}

Weight = torch.Tensor | QuantizedWeight


def resolve_format(checkpoint: Checkpoint, weights: str = "auto", dtype: str = "auto") -> str:
    """The concrete format: `auto` keeps a GGUF's blocks (or, with an explicit --dtype, dequantizes to it) and a
    16-bit or 32-bit checkpoint at its own float type."""
    if weights != "auto":
        if weights not in FORMATS:
            raise ModelError(f"weight format {weights!r} is not known; use one of {', '.join(USER_FORMATS)}")
        return weights
    if dtype != "auto":
        if dtype not in FORMAT_OF_DTYPE:
            raise ModelError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(FORMAT_OF_DTYPE)}")
        return FORMAT_OF_DTYPE[dtype]
    if checkpoint.gguf is not None:
        return "gguf"
    return FORMAT_OF_DTYPE.get(checkpoint.args.torch_dtype, "f32")


def quantized_bits(format_name: str) -> int | None:
    """8 or 4 for the quantized formats (gguf: None, it varies by tensor); None for float formats."""
    return {"int8": 8, "int4": 4}.get(format_name)


def served_tensors(checkpoint: Checkpoint, names: list[str], format_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The named checkpoint tensors in `format_name`, one at a time (a quantized matrix gives 2 or 3 tensors)."""
    for name in names:
        weight = convert(checkpoint, name, format_name)
        if isinstance(weight, QuantizedWeight):
            pieces = (weight.codes, weight.scales) if weight.bits == 8 else (weight.codes, weight.scales, weight.mins)
            yield from ((name + suffix, piece) for suffix, piece in zip(SUFFIXES[weight.bits], pieces))
        else:
            yield name, weight


def convert(checkpoint: Checkpoint, name: str, format_name: str) -> Weight:
    info = checkpoint.info(name)
    matrix = len(info.shape) == 2
    if format_name in FLOAT_FORMATS:
        return checkpoint.load(name, FLOAT_FORMATS[format_name])
    if format_name in ("int8", "int4"):
        head = name in (EMBEDDING, LM_HEAD)
        if not matrix or (head and format_name == "int8"):
            return checkpoint.stored(name)
        values = checkpoint.rows(name)   # read and quantized a slice of rows at a time
        return quantize_int8(values) if format_name == "int8" or head else quantize_int4(values)
    if format_name != "gguf" or checkpoint.gguf is None:
        raise ModelError(f"format {format_name!r} needs a GGUF checkpoint; {checkpoint.path} is not one")
    if not matrix or info.dtype in ("F32", "F16", "BF16"):
        return checkpoint.stored(name)
    if info.dtype in (kind.name for kind in BLOCK_TYPES):
        blocks = quantized_blocks(checkpoint.gguf, name)
        return from_blocks(info.dtype, blocks.codes, blocks.scales, blocks.mins)
    values = checkpoint.stored(name)
    return quantize_int8(values) if info.dtype in EIGHT_BIT_BLOCKS else quantize_int4(values)


def assemble(tensors: Mapping[str, torch.Tensor], names: list[str]) -> Iterator[tuple[str, Weight]]:
    """Served tensors back into weights, by checkpoint name: float tensors, or QuantizedWeights from their pieces."""
    for name in names:
        if name + ".q8" in tensors:
            codes, scales = (tensors[name + suffix] for suffix in SUFFIXES[8])
            yield name, QuantizedWeight(8, codes, scales, None, codes.shape[1])
        elif name + ".q4" in tensors:
            codes, scales, mins = (tensors[name + suffix] for suffix in SUFFIXES[4])
            yield name, QuantizedWeight(4, codes, scales, mins, 2 * codes.shape[1] // scales.shape[1])
        elif name in tensors:
            yield name, tensors[name]
        else:
            raise ModelError(f"the part's tensors lack {name}; the checkpoint is incomplete or of another model")


def served_bytes(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], format_name: str,
                 stored: Mapping[str, str] | None = None) -> int:
    """Bytes of the named tensors in `format_name` (a GGUF's per-tensor block types in `stored`, else the config's
    float type): what a part takes in memory, on the wire and in the parts cache."""
    float_bytes = BY_NAME.get(args.torch_dtype, BY_NAME["float32"]).itemsize
    total = 0
    for name, shape in shapes.items():
        count = prod(shape)
        kind = (stored or {}).get(name, "")
        stored_bytes = {"F32": 4, "F16": 2, "BF16": 2}.get(kind, 2 if kind else float_bytes)
        head = name in (EMBEDDING, LM_HEAD)
        if format_name in FLOAT_FORMATS:
            total += count * FLOAT_FORMATS[format_name].itemsize
        elif len(shape) != 2 or (format_name == "int8" and head) or (format_name == "gguf" and kind in
                                                                     ("F32", "F16", "BF16")):
            total += count * stored_bytes
        elif format_name in ("int8", "int4") and (format_name == "int8" or head) or kind in EIGHT_BIT_BLOCKS:
            total += count + shape[0] * 4
        else:
            group = int4_group(shape[1])
            total += count // 2 + 2 * 2 * count // group
    return total
