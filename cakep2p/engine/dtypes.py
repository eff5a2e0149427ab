"""The one dtype table: each element type by its name (as in config.json and on the wire), its torch dtype and
its safetensors code. Every other lookup is derived from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cakep2p.errors import ModelError


@dataclass(frozen=True)
class ElementType:
    name: str                # "bfloat16": config.json's torch_dtype, --dtype, the wire
    torch: torch.dtype
    safetensors: str         # "BF16"

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize


TABLE: tuple[ElementType, ...] = (
    ElementType("float32", torch.float32, "F32"),
    ElementType("bfloat16", torch.bfloat16, "BF16"),
    ElementType("float16", torch.float16, "F16"),
    ElementType("float64", torch.float64, "F64"),
    ElementType("int64", torch.int64, "I64"),
    ElementType("int32", torch.int32, "I32"),
    ElementType("int16", torch.int16, "I16"),
    ElementType("int8", torch.int8, "I8"),
    ElementType("uint8", torch.uint8, "U8"),
    ElementType("bool", torch.bool, "BOOL"),
)
FLOAT_WEIGHTS = ("float32", "bfloat16", "float16")  # what weights and activations are computed in

BY_NAME = {entry.name: entry for entry in TABLE}
BY_SAFETENSORS = {entry.safetensors: entry for entry in TABLE}
BY_TORCH = {entry.torch: entry for entry in TABLE}


def name_of(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return BY_TORCH[dtype].name


def float_dtype(name: str) -> torch.dtype:
    """The torch dtype of a weight dtype name; ModelError naming the choices for anything else."""
    if name not in FLOAT_WEIGHTS:
        raise ModelError(f"dtype {name!r} is not supported; use one of auto, {', '.join(FLOAT_WEIGHTS)}")
    return BY_NAME[name].torch
