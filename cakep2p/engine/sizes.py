"""A model's memory figures: the bytes of a layer range's weights (in a weight format) and KV cache, and the
planner's ModelSpec, from the actual tensor shapes of a checkpoint (or from a config alone, for what-if plans)."""

from __future__ import annotations

from math import prod
from typing import Callable, Mapping

import torch

from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.formats import FORMAT_OF_DTYPE, resolve_format, served_bytes
from cakep2p.engine.loading import EMBEDDING, compute_dtype, expected_shapes, resolve_device
from cakep2p.planner import LayerRange, ModelSpec

ShapeOf = Callable[[str, tuple[int, ...]], tuple[int, ...]]  # (tensor name, expected shape) -> shape to count


def weight_bytes(args: ModelArgs, layers: LayerRange, format_name: str,
                 stored: Mapping[str, str] | None = None) -> int:
    """Bytes of the range's weights in the weight format (`stored`: a GGUF's block type per tensor)."""
    return served_bytes(args, expected_shapes(args, layers), format_name, stored)


def kv_cache_bytes(args: ModelArgs, layers: LayerRange, dtype: torch.dtype, max_seq_len: int) -> int:
    """Bytes of one session's K and V for the range's layers at a context of `max_seq_len`."""
    return 2 * layers.num_layers * args.num_kv_heads * args.head_dim * max_seq_len * dtype.itemsize


def model_spec(checkpoint: Checkpoint, dtype: str = "auto", weights: str = "auto") -> ModelSpec:
    """The planner's view of the checkpoint in a weight format: every tensor a part loads, counted from its shape
    in the checkpoint (the tied embedding once: it is the embedding, the head adds only the final norm)."""
    format_name = resolve_format(checkpoint, weights, dtype)
    stored = {name: info.dtype for name, info in checkpoint.tensors.items()}
    return _spec(checkpoint.args, format_name, dtype, checkpoint.name, lambda name, _: checkpoint.info(name).shape,
                 stored)


def spec_from_args(args: ModelArgs, dtype: str = "auto", name: str = "model", weights: str | None = None) -> ModelSpec:
    """The same figures from the config's shapes alone, with no weights on disk (for remote or what-if plans);
    the weight format defaults to the dtype's (the config's own float type for auto)."""
    if weights is None:
        weights = FORMAT_OF_DTYPE.get(args.torch_dtype if dtype == "auto" else dtype, "f32")
    return _spec(args, weights, dtype, name, lambda tensor_name, expected: expected, None)


def _spec(args: ModelArgs, format_name: str, dtype: str, name: str, shape_of: ShapeOf,
          stored: Mapping[str, str] | None) -> ModelSpec:
    def range_bytes(layers: LayerRange, skip: frozenset[str] = frozenset()) -> int:
        shapes = {tensor: shape_of(tensor, shape) for tensor, shape in expected_shapes(args, layers).items()
                  if tensor not in skip}
        return served_bytes(args, shapes, format_name, stored)

    compute = compute_dtype(format_name, dtype, args, resolve_device("cpu"))
    return ModelSpec(
        name=name,
        layer_bytes=tuple(range_bytes(LayerRange(index, index + 1)) for index in range(args.num_layers)),
        embedding_bytes=range_bytes(LayerRange(0, 0, has_embedding=True)),
        head_bytes=range_bytes(LayerRange(0, 0, has_head=True), skip=frozenset({EMBEDDING})),  # tied: counted once
        kv_bytes_per_token=2 * args.num_kv_heads * args.head_dim * compute.itemsize,
        hidden_size=args.hidden_size,
    )
