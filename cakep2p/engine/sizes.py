"""A model's memory figures for the planner: the actual tensor sizes in its safetensors, at the chosen dtype."""

from __future__ import annotations

from math import prod
from pathlib import Path

from cakep2p.engine.checkpoint import read_tensor_index
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.part import EMBEDDING, PartSpec, expected_shapes, resolve_dtype
from cakep2p.errors import ModelError
from cakep2p.planner import ModelSpec


def element_size(args: ModelArgs, dtype: str = "auto") -> int:
    """Bytes per element once loaded: 'auto' is the checkpoint's torch_dtype; ModelError for an unknown dtype."""
    try:
        return resolve_dtype(dtype, args).itemsize
    except ValueError as error:
        raise ModelError(str(error)) from None


def model_spec(model_dir: str | Path, dtype: str = "auto") -> ModelSpec:
    """The planner's view of the model in `model_dir`, from config.json and the safetensors headers.

    Every tensor a part loads is counted at `dtype`'s element size from its shape in the checkpoint (the tied
    embedding once: it is the embedding, the head adds only the final norm). ModelError when a tensor is missing.
    """
    model_dir = Path(model_dir)
    args = ModelArgs.from_dir(model_dir)
    index = read_tensor_index(model_dir)

    def actual_shape(name: str, expected: tuple[int, ...]) -> tuple[int, ...]:
        if name not in index:
            raise ModelError(f"model folder {model_dir} lacks the tensor {name}; download the model again")
        return index[name].shape

    return _spec(args, element_size(args, dtype), model_dir.name, actual_shape)


def spec_from_args(args: ModelArgs, dtype: str = "auto", name: str = "model") -> ModelSpec:
    """The same figures from the config's shapes alone, with no weights on disk (for remote or what-if plans)."""
    return _spec(args, element_size(args, dtype), name, lambda tensor_name, expected: expected)


def _spec(args: ModelArgs, element_bytes: int, name: str, shape_of) -> ModelSpec:
    def part_bytes(part: PartSpec, skip: set[str] = frozenset()) -> int:
        return sum(prod(shape_of(tensor, shape)) * element_bytes
                   for tensor, shape in expected_shapes(args, part).items() if tensor not in skip)

    layer_bytes = tuple(part_bytes(PartSpec(index, index + 1, False, False)) for index in range(args.num_layers))
    return ModelSpec(
        name=name,
        layer_bytes=layer_bytes,
        embedding_bytes=part_bytes(PartSpec(0, 0, True, False)),
        head_bytes=part_bytes(PartSpec(0, 0, False, True), skip={EMBEDDING}),  # tied: already counted
        kv_bytes_per_token=2 * args.num_kv_heads * args.head_dim * element_bytes,
        hidden_size=args.hidden_size,
    )
