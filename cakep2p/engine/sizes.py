"""A model's memory figures: the bytes of a layer range's weights and KV cache, and the planner's ModelSpec, from the
actual tensor shapes of a checkpoint (or from a config alone, for what-if plans) at the chosen dtype."""

from __future__ import annotations

from math import prod
from typing import Callable

import torch

from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.loading import EMBEDDING, expected_shapes, resolve_dtype
from cakep2p.planner import LayerRange, ModelSpec

ShapeOf = Callable[[str, tuple[int, ...]], tuple[int, ...]]  # (tensor name, expected shape) -> shape to count


def weight_bytes(args: ModelArgs, layers: LayerRange, dtype: torch.dtype) -> int:
    """Bytes of the range's weights once loaded in `dtype`."""
    return sum(prod(shape) for shape in expected_shapes(args, layers).values()) * dtype.itemsize


def kv_cache_bytes(args: ModelArgs, layers: LayerRange, dtype: torch.dtype, max_seq_len: int) -> int:
    """Bytes of one session's K and V for the range's layers at a context of `max_seq_len`."""
    return 2 * layers.num_layers * args.num_kv_heads * args.head_dim * max_seq_len * dtype.itemsize


def model_spec(checkpoint: Checkpoint, dtype: str = "auto") -> ModelSpec:
    """The planner's view of the checkpoint: every tensor a part loads, counted at `dtype`'s element size from its
    shape in the checkpoint (the tied embedding once: it is the embedding, the head adds only the final norm)."""
    def actual_shape(name: str, expected: tuple[int, ...]) -> tuple[int, ...]:
        return checkpoint.info(name).shape

    return _spec(checkpoint.args, dtype, checkpoint.name, actual_shape)


def spec_from_args(args: ModelArgs, dtype: str = "auto", name: str = "model") -> ModelSpec:
    """The same figures from the config's shapes alone, with no weights on disk (for remote or what-if plans)."""
    return _spec(args, dtype, name, lambda tensor_name, expected: expected)


def _spec(args: ModelArgs, dtype: str, name: str, shape_of: ShapeOf) -> ModelSpec:
    element_bytes = resolve_dtype(dtype, args).itemsize

    def range_bytes(layers: LayerRange, skip: frozenset[str] = frozenset()) -> int:
        return sum(prod(shape_of(tensor, shape)) * element_bytes
                   for tensor, shape in expected_shapes(args, layers).items() if tensor not in skip)

    return ModelSpec(
        name=name,
        layer_bytes=tuple(range_bytes(LayerRange(index, index + 1)) for index in range(args.num_layers)),
        embedding_bytes=range_bytes(LayerRange(0, 0, has_embedding=True)),
        head_bytes=range_bytes(LayerRange(0, 0, has_head=True), skip=frozenset({EMBEDDING})),  # tied: counted once
        kv_bytes_per_token=2 * args.num_kv_heads * args.head_dim * element_bytes,
        hidden_size=args.hidden_size,
    )
