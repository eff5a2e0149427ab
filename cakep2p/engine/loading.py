"""Filling a ModelPart: which checkpoint tensors (Hugging Face names) a layer range needs, with their shapes, and
putting exactly those, in the weight format, into the part's fused matrices in their kernels' layouts."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Callable, Mapping

import torch

from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.dtypes import float_dtype
from cakep2p.engine.formats import FLOAT_FORMATS, Weight, assemble, convert, quantized_bits, resolve_format
from cakep2p.engine.kernels import PreparedLinear, has_bf16_hardware, kernel_name, prepare
from cakep2p.engine.model import DecoderLayer, ModelPart, has_o_bias
from cakep2p.engine.quant import QuantizedWeight
from cakep2p.errors import ModelError
from cakep2p.planner import LayerRange

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
WeightOf = Callable[[str], Weight]  # the named checkpoint tensor, as a float tensor or a QuantizedWeight


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
              device: str | torch.device = "auto", weights: str = "auto") -> ModelPart:
    """Only this range's tensors, read from the checkpoint one at a time, converted to the weight format and filled
    into the part's fused matrices."""
    args = checkpoint.args
    check_range(args, layers)
    check_tensors(str(checkpoint.path), args, layers, {name: info.shape for name, info in checkpoint.tensors.items()})
    format_name = resolve_format(checkpoint, weights, dtype if isinstance(dtype, str) else "auto")
    return build_part(args, layers, format_name, lambda name: convert(checkpoint, name, format_name), dtype, device)


def part_from_tensors(args: ModelArgs, layers: LayerRange, format_name: str, tensors: Mapping[str, torch.Tensor],
                      dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> ModelPart:
    """A part from its served tensors (received from a peer, or read from the parts cache on demand)."""
    check_range(args, layers)
    names = part_tensor_names(args, layers)
    weights = dict(assemble(tensors, names))
    shapes = {name: tuple(weight.shape) for name, weight in weights.items()}
    check_tensors("the given tensors", args, layers, shapes)
    return build_part(args, layers, format_name, weights.__getitem__, dtype, device)


def _held_bits(matrix: object) -> int | None:
    """8 or 4 when a part's matrices are held quantized (a GGUF's own Q8_0 or Q4 blocks), else None."""
    if isinstance(matrix, PreparedLinear) and matrix.kind in ("int8", "int4"):
        return int(matrix.kind.removeprefix("int"))
    return None


def build_part(args: ModelArgs, layers: LayerRange, format_name: str, weight_of: WeightOf,
               dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> ModelPart:
    """Fill a part from `weight_of(checkpoint name)`, a float tensor or a QuantizedWeight, into its kernels'
    layouts. The compute dtype `auto` is the format's float type, and float32 for quantized formats or for 16-bit
    weights on a CPU without bf16 hardware (its fp16 and dequantizing kernels take fp32 in and out)."""
    torch_device = resolve_device(device)
    compute = compute_dtype(format_name, dtype, args, torch_device)
    part = ModelPart(args, layers, compute, torch_device)
    part.weight_format = format_name
    with torch.no_grad():
        _fill_part(part, weight_of)
    matrix = part.blocks[0].gate_up if len(part.blocks) else None
    part.kernel = kernel_name(compute, quantized_bits(format_name) or _held_bits(matrix), torch_device, matrix)
    return_freed_memory()
    return part


def return_freed_memory() -> None:
    """Give the allocator's free pages back to the system: glibc keeps a load's freed temporaries otherwise, and a
    part would look (and be, to the other programs on the machine) a fifth larger than its weights."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to do
            ctypes.CDLL(None).malloc_trim(0)


def compute_dtype(format_name: str, dtype: str | torch.dtype, args: ModelArgs, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return resolve_dtype(dtype, args)
    if format_name in FLOAT_FORMATS:
        chosen = FLOAT_FORMATS[format_name]
        if chosen != torch.float32 and device.type == "cpu" and not has_bf16_hardware():
            return torch.float32
        return chosen
    return torch.bfloat16 if device.type != "cpu" else torch.float32


def _fill_part(part: ModelPart, weight_of: WeightOf) -> None:
    compute, device = part.dtype, part.device

    def vector(name: str) -> torch.Tensor:
        return weight_of(name).to(device=device, dtype=compute)

    needs_embedding = part.layers.has_embedding or (part.layers.has_head and part.args.tie_word_embeddings)
    if needs_embedding:
        embedding = weight_of(EMBEDDING)
        keep = device.type == "cpu" and (isinstance(embedding, QuantizedWeight) or embedding.element_size() == 2)
        part.embedding = embedding if keep else _dense(embedding, compute, device)  # lookups convert their rows
    for offset, block in enumerate(part.blocks):
        _fill_layer(block, f"model.layers.{part.layers.start + offset}.", weight_of, vector, compute, device)
        return_freed_memory()   # each layer's temporaries, before the next one's
    if part.layers.has_head:
        part.final_norm = vector(FINAL_NORM)
        tied_dense = part.args.tie_word_embeddings and isinstance(part.embedding, torch.Tensor)
        head = part.embedding if part.args.tie_word_embeddings else weight_of(LM_HEAD)
        part.lm_head = part.embedding if tied_dense else prepare(head, compute, device)  # tied: one copy
        if not part.layers.has_embedding:
            part.embedding = None  # a tied head keeps only its own layout


def _dense(weight: Weight, compute: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(compute).to(device)
    return weight.to(device=device, dtype=compute)


def _stacked(weights: list[Weight]) -> Weight:
    if isinstance(weights[0], QuantizedWeight):
        return QuantizedWeight.concat(weights)
    return torch.cat([weight.to(weights[0].dtype) for weight in weights])


def _fill_layer(layer: DecoderLayer, prefix: str, weight_of: WeightOf, vector: Callable[[str], torch.Tensor],
                compute: torch.dtype, device: torch.device) -> None:
    """One layer's checkpoint tensors into its fused matrices (q/k/v and gate/up stacked by rows)."""
    def matrix(*names: str):
        return prepare(_stacked([weight_of(prefix + name) for name in names]), compute, device)

    layer.input_norm = vector(prefix + "input_layernorm.weight")
    layer.post_norm = vector(prefix + "post_attention_layernorm.weight")
    if layer.args.attention_bias:
        layer.qkv_bias = torch.cat([vector(prefix + f"self_attn.{x}_proj.bias") for x in "qkv"])
    if layer.args.qk_norm:
        layer.q_norm = vector(prefix + "self_attn.q_norm.weight")
        layer.k_norm = vector(prefix + "self_attn.k_norm.weight")
    if has_o_bias(layer.args):
        layer.o_bias = vector(prefix + "self_attn.o_proj.bias")
    layer.qkv = matrix("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
    layer.o_proj = matrix("self_attn.o_proj.weight")
    layer.gate_up = matrix("mlp.gate_proj.weight", "mlp.up_proj.weight")
    layer.down = matrix("mlp.down_proj.weight")


def check_complete(checkpoint: Checkpoint) -> None:
    """ModelError unless every tensor of the whole model is in the checkpoint with the shape config.json implies."""
    args = checkpoint.args
    check_tensors(str(checkpoint.path), args, whole_model(args),
                  {name: info.shape for name, info in checkpoint.tensors.items()})
