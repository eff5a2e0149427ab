"""Filling a ModelPart: which checkpoint tensors (Hugging Face names) a layer range needs, with their shapes, and
copying exactly those into the part's fused weights, one tensor at a time."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.dtypes import float_dtype
from cakep2p.engine.model import DecoderLayer, ModelPart, has_o_bias, pack_for_cpu
from cakep2p.errors import ModelError
from cakep2p.planner import LayerRange

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
Fill = Callable[[str, torch.Tensor], None]  # copies the named checkpoint tensor into the given destination


def resolve_dtype(dtype: str | torch.dtype, args: ModelArgs) -> torch.dtype:
    """'auto' is the checkpoint's torch_dtype; otherwise one of float32, bfloat16, float16."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return float_dtype(args.torch_dtype if dtype == "auto" else dtype)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks cuda, then mps, then cpu."""
    if str(device) != "auto":
        try:
            return torch.device(device)
        except RuntimeError:
            raise ModelError(f"device {device!r} is not understood; use auto, cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def whole_model(args: ModelArgs) -> LayerRange:
    return LayerRange(0, args.num_layers, has_embedding=True, has_head=True)


def _layer_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor suffixes of one decoder layer and their expected shapes."""
    hidden, q_size, kv_size = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (q_size, hidden),
        "self_attn.k_proj.weight": (kv_size, hidden),
        "self_attn.v_proj.weight": (kv_size, hidden),
        "self_attn.o_proj.weight": (hidden, q_size),
        "mlp.gate_proj.weight": (args.intermediate_size, hidden),
        "mlp.up_proj.weight": (args.intermediate_size, hidden),
        "mlp.down_proj.weight": (hidden, args.intermediate_size),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    if args.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q_size,), "self_attn.k_proj.bias": (kv_size,),
                       "self_attn.v_proj.bias": (kv_size,)})
        if has_o_bias(args):
            shapes["self_attn.o_proj.bias"] = (hidden,)
    if args.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (args.head_dim,), "self_attn.k_norm.weight": (args.head_dim,)})
    return shapes


def expected_shapes(args: ModelArgs, layers: LayerRange) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor this layer range needs, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    if layers.has_embedding or (layers.has_head and args.tie_word_embeddings):
        shapes[EMBEDDING] = (args.vocab_size, args.hidden_size)
    layer = _layer_shapes(args)
    for index in range(layers.start, layers.end):
        shapes.update({f"model.layers.{index}.{suffix}": shape for suffix, shape in layer.items()})
    if layers.has_head:
        shapes[FINAL_NORM] = (args.hidden_size,)
        if not args.tie_word_embeddings:
            shapes[LM_HEAD] = (args.vocab_size, args.hidden_size)
    return shapes


def part_tensor_names(args: ModelArgs, layers: LayerRange) -> list[str]:
    """The checkpoint tensor names a part reads (and nothing else), in the order it reads them."""
    return list(expected_shapes(args, layers))


def check_range(args: ModelArgs, layers: LayerRange) -> None:
    """ModelError unless the range lies within the model's layers."""
    if not 0 <= layers.start <= layers.end <= args.num_layers:
        raise ModelError(f"part layers [{layers.start}, {layers.end}) are outside the model's 0..{args.num_layers}")


def check_tensors(source: str, args: ModelArgs, layers: LayerRange,
                  found: Mapping[str, tuple[int, ...]]) -> None:
    """ModelError naming the first tensor of the range that is missing from `found` or has another shape."""
    for name, shape in expected_shapes(args, layers).items():
        if name not in found:
            raise ModelError(f"model {source} lacks tensor {name}; the checkpoint is incomplete or of another model")
        if tuple(found[name]) != shape:
            raise ModelError(f"model {source}: tensor {name} has shape {list(found[name])}, expected {list(shape)}")


def load_part(checkpoint: Checkpoint, layers: LayerRange, dtype: str | torch.dtype = "auto",
              device: str | torch.device = "auto") -> ModelPart:
    """Only this range's tensors, read from the checkpoint one at a time into the part's fused weights."""
    args = checkpoint.args
    check_range(args, layers)
    check_tensors(str(checkpoint.path), args, layers, {name: info.shape for name, info in checkpoint.tensors.items()})
    part = ModelPart(args, layers, resolve_dtype(dtype, args), resolve_device(device))

    def fill(name: str, destination: torch.Tensor) -> None:
        if destination.device.type == "cpu":
            checkpoint.load(name, part.dtype, out=destination)
        else:
            destination.copy_(checkpoint.load(name, part.dtype))

    _fill_part(part, fill)
    return part


def part_from_tensors(args: ModelArgs, layers: LayerRange, tensors: Mapping[str, torch.Tensor],
                      dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> ModelPart:
    """A part from tensors with HF names (received from a peer, or read from the parts cache on demand)."""
    check_range(args, layers)
    check_tensors("the given tensors", args, layers, {name: tuple(tensor.shape) for name, tensor in tensors.items()})
    part = ModelPart(args, layers, resolve_dtype(dtype, args), resolve_device(device))
    _fill_part(part, lambda name, destination: destination.copy_(tensors[name]))
    return part


def _fill_part(part: ModelPart, fill: Fill) -> None:
    with torch.no_grad():
        if part.embedding is not None:
            fill(EMBEDDING, part.embedding)
        for offset, block in enumerate(part.blocks):
            _fill_layer(block, f"model.layers.{part.layers.start + offset}.", fill)
        if part.final_norm is not None:
            fill(FINAL_NORM, part.final_norm)
        if part.lm_head is not None and part.lm_head is not part.embedding:
            fill(LM_HEAD, part.lm_head)
            part.lm_head = pack_for_cpu(part.lm_head)


def _fill_layer(layer: DecoderLayer, prefix: str, fill: Fill) -> None:
    """Copy one layer's checkpoint tensors straight into its fused weights, packing each big one at once."""
    q, kv, inter = layer.q_size, layer.kv_size, layer.args.intermediate_size
    fill(prefix + "input_layernorm.weight", layer.input_norm)
    fill(prefix + "post_attention_layernorm.weight", layer.post_norm)
    if layer.qkv_bias is not None:
        fill(prefix + "self_attn.q_proj.bias", layer.qkv_bias[:q])
        fill(prefix + "self_attn.k_proj.bias", layer.qkv_bias[q:q + kv])
        fill(prefix + "self_attn.v_proj.bias", layer.qkv_bias[q + kv:])
    if layer.q_norm is not None:
        fill(prefix + "self_attn.q_norm.weight", layer.q_norm)
        fill(prefix + "self_attn.k_norm.weight", layer.k_norm)
    if layer.o_bias is not None:
        fill(prefix + "self_attn.o_proj.bias", layer.o_bias)
    fill(prefix + "self_attn.q_proj.weight", layer.qkv[:q])
    fill(prefix + "self_attn.k_proj.weight", layer.qkv[q:q + kv])
    fill(prefix + "self_attn.v_proj.weight", layer.qkv[q + kv:])
    layer.qkv = pack_for_cpu(layer.qkv)
    fill(prefix + "self_attn.o_proj.weight", layer.o_proj)
    layer.o_proj = pack_for_cpu(layer.o_proj)
    fill(prefix + "mlp.gate_proj.weight", layer.gate_up[:inter])
    fill(prefix + "mlp.up_proj.weight", layer.gate_up[inter:])
    layer.gate_up = pack_for_cpu(layer.gate_up)
    fill(prefix + "mlp.down_proj.weight", layer.down)
    layer.down = pack_for_cpu(layer.down)


def check_complete(checkpoint: Checkpoint) -> None:
    """ModelError unless every tensor of the whole model is in the checkpoint with the shape config.json implies."""
    args = checkpoint.args
    check_tensors(str(checkpoint.path), args, whole_model(args),
                  {name: info.shape for name, info in checkpoint.tensors.items()})
