"""A model part: embedding and/or a contiguous layer range and/or the final norm + LM head, loaded alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cakep2p.engine.checkpoint import load_tensor, read_tensor_index
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.kvcache import KVCache
from cakep2p.engine.model import DecoderLayer, Fill, empty, has_o_bias, linear, pack_for_cpu, rms_norm
from cakep2p.engine.rope import rope_tables
from cakep2p.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

@dataclass(frozen=True)
class PartSpec:
    """Layers [start, end), plus the embedding and/or the final norm + LM head."""

    start: int
    end: int
    has_embedding: bool
    has_head: bool


def resolve_dtype(dtype: str | torch.dtype, args: ModelArgs) -> torch.dtype:
    """'auto' is the checkpoint's torch_dtype; otherwise one of float32, bfloat16, float16."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ModelError(f"dtype {dtype} is not supported; use one of auto, {', '.join(DTYPES)}")
    name = args.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


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


def expected_shapes(args: ModelArgs, part: PartSpec) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor this part needs, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    if part.has_embedding or (part.has_head and args.tie_word_embeddings):
        shapes[EMBEDDING] = (args.vocab_size, args.hidden_size)
    layer = _layer_shapes(args)
    for index in range(part.start, part.end):
        shapes.update({f"model.layers.{index}.{suffix}": shape for suffix, shape in layer.items()})
    if part.has_head:
        shapes[FINAL_NORM] = (args.hidden_size,)
        if not args.tie_word_embeddings:
            shapes[LM_HEAD] = (args.vocab_size, args.hidden_size)
    return shapes


def part_tensor_names(args: ModelArgs, part: PartSpec) -> list[str]:
    """The checkpoint tensor names a part reads (and nothing else)."""
    return list(expected_shapes(args, part))


def _check_part(args: ModelArgs, part: PartSpec) -> None:
    if not 0 <= part.start <= part.end <= args.num_layers:
        raise ModelError(f"part layers [{part.start}, {part.end}) are outside the model's 0..{args.num_layers}")


class ModelPart(torch.nn.Module):
    """Embedding and/or layers [start, end) and/or final norm + head; `forward` runs them in order."""

    def __init__(self, args: ModelArgs, part: PartSpec, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        _check_part(args, part)
        self.args, self.part, self.dtype, self.device = args, part, dtype, device
        needs_embedding = part.has_embedding or (part.has_head and args.tie_word_embeddings)
        self.embedding = empty((args.vocab_size, args.hidden_size), dtype, device) if needs_embedding else None
        self.layers = torch.nn.ModuleList(DecoderLayer(args, dtype, device) for _ in range(part.start, part.end))
        self.final_norm = empty((args.hidden_size,), dtype, device) if part.has_head else None
        self.lm_head = None
        if part.has_head:
            self.lm_head = self.embedding if args.tie_word_embeddings else empty(
                (args.vocab_size, args.hidden_size), dtype, device)
        self._rope_length = 0
        self._cos = self._sin = torch.empty(0)

    @classmethod
    def load(cls, model_dir: str | Path, part: PartSpec, dtype: str = "auto", device: str = "auto") -> "ModelPart":
        """Read config.json and only this part's tensors (memory-mapped, one at a time, into fused weights)."""
        args = ModelArgs.from_dir(model_dir)
        _check_part(args, part)
        index = read_tensor_index(model_dir)
        _check_tensors(str(model_dir), expected_shapes(args, part), {n: i.shape for n, i in index.items()})
        torch_dtype, torch_device = resolve_dtype(dtype, args), resolve_device(device)
        model = cls(args, part, torch_dtype, torch_device)

        def fill(name: str, destination: torch.Tensor) -> None:
            if destination.device.type == "cpu":
                load_tensor(index[name], torch_dtype, out=destination)
            else:
                destination.copy_(load_tensor(index[name], torch_dtype))

        model._fill(fill)
        return model

    @classmethod
    def from_tensors(cls, args: ModelArgs, part: PartSpec, tensors: dict[str, torch.Tensor],
                     dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> "ModelPart":
        """Build from in-memory tensors with HF names (e.g. received from a peer)."""
        _check_part(args, part)
        _check_tensors("the given tensors", expected_shapes(args, part),
                       {name: tuple(tensor.shape) for name, tensor in tensors.items()})
        model = cls(args, part, resolve_dtype(dtype, args), resolve_device(device))
        model._fill(lambda name, destination: destination.copy_(tensors[name]))
        return model

    def _fill(self, fill: Fill) -> None:
        with torch.no_grad():
            if self.embedding is not None:
                fill(EMBEDDING, self.embedding)
            for offset, layer in enumerate(self.layers):
                layer.fill(f"model.layers.{self.part.start + offset}.", fill)
            if self.final_norm is not None:
                fill(FINAL_NORM, self.final_norm)
            if self.lm_head is not None and self.lm_head is not self.embedding:
                fill(LM_HEAD, self.lm_head)
                self.lm_head = pack_for_cpu(self.lm_head)

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every weight this part holds (a tied head counted once)."""
        found: dict[int, torch.Tensor] = {}
        for holder in [self, *self.layers]:
            for key, value in vars(holder).items():
                if isinstance(value, torch.Tensor) and not key.startswith("_"):
                    found[id(value)] = value
        return list(found.values())

    @property
    def weight_bytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.weight_tensors())

    def new_cache(self, max_seq_len: int) -> KVCache:
        """A preallocated cache for this part's layers, and rope tables long enough for it."""
        if max_seq_len > self._rope_length:
            self._cos, self._sin = rope_tables(self.args, max_seq_len, self.dtype, self.device)
            self._rope_length = max_seq_len
        return KVCache(len(self.layers), self.args.num_kv_heads, self.args.head_dim, max_seq_len,
                       self.dtype, self.device)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor, start_pos: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Token ids [T] (with embedding) or hidden [T, hidden] in; float32 logits [T, vocab] or hidden out.

        With `last_only`, the head runs on the last position only (logits [1, vocab]).
        """
        length = inputs.shape[0]
        end = start_pos + length
        if end > cache.max_seq_len:
            raise ValueError(f"positions up to {end} exceed the cache's max_seq_len {cache.max_seq_len}")
        x = F.embedding(inputs.to(self.device), self.embedding) if self.part.has_embedding else inputs.to(
            device=self.device, dtype=self.dtype)
        if self.layers:
            cos = self._cos[start_pos:end].unsqueeze(1)
            sin = self._sin[start_pos:end].unsqueeze(1)
            mask = self._attention_mask(start_pos, length)
            for index, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache.keys[index], cache.values[index], start_pos, mask)
        if not self.part.has_head:
            return x
        if last_only:
            x = x[-1:]
        return linear(rms_norm(x, self.final_norm, self.args.rms_norm_eps), self.lm_head).float()

    def _attention_mask(self, start_pos: int, length: int) -> torch.Tensor | None:
        """Causal (and sliding-window) mask [T, start_pos + T]; None for a single token (it sees everything)."""
        if length == 1:
            return None
        query = torch.arange(start_pos, start_pos + length, device=self.device).unsqueeze(1)
        key = torch.arange(start_pos + length, device=self.device).unsqueeze(0)
        allowed = key <= query
        if self.args.sliding_window is not None:
            allowed &= key > query - self.args.sliding_window
        return allowed


def _check_tensors(source: str, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name not in found:
            raise ModelError(f"model {source} lacks tensor {name}; the checkpoint is incomplete or of another model")
        if tuple(found[name]) != shape:
            raise ModelError(f"model {source}: tensor {name} has shape {list(found[name])}, expected {list(shape)}")
