"""The whole forward pass of a model part, in one file: RMSNorm, rotary attention with fused QKV over a preallocated
KV cache, the fused gate/up MLP, and a ModelPart that runs the embedding, its layers and the head in order.

The matrices are whatever their kernel wants (engine/kernels.py: dense, oneDNN-packed, fp16, int8, int4) and are
filled in by cakep2p/engine/loading.py; this file only computes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from cakep2p.engine.config import ModelArgs
from cakep2p.engine.kernels import PreparedLinear, batched_linear, linear, logits
from cakep2p.engine.kvcache import KVCache
from cakep2p.engine.quant import QuantizedWeight
from cakep2p.engine.rope import apply_rope, rope_tables
from cakep2p.planner import LayerRange

Matrix = torch.Tensor | PreparedLinear
PREFILL_CHUNK = 512  # positions per pass: a long prompt's mask and attention temporaries grow with chunk x context


def has_o_bias(args: ModelArgs) -> bool:
    """Llama/Qwen3 attention_bias also biases o_proj; Qwen2 biases only q, k and v."""
    return args.attention_bias and args.architecture != "Qwen2ForCausalLM"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF-exact RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query [heads, 1, head_dim] over keys/values [kv_heads, L, head_dim].

    The query heads that share a KV head ride as a "sequence" of queries over it (no mask needed for
    the last position): the same SDPA arithmetic, but 10x faster on CPU than enable_gqa with one query.
    """
    kv_heads, _, head_dim = keys.shape
    grouped = q.reshape(1, kv_heads, -1, head_dim)
    attended = F.scaled_dot_product_attention(grouped, keys.unsqueeze(0), values.unsqueeze(0), scale=scale)
    return attended.reshape(-1, 1, head_dim)


class DecoderLayer(torch.nn.Module):
    """One transformer block with fused QKV and fused gate/up projections."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.input_norm: torch.Tensor | None = None
        self.post_norm: torch.Tensor | None = None
        self.qkv: Matrix | None = None            # q, k and v stacked by rows
        self.qkv_bias: torch.Tensor | None = None
        self.q_norm: torch.Tensor | None = None   # Qwen3
        self.k_norm: torch.Tensor | None = None
        self.o_proj: Matrix | None = None
        self.o_bias: torch.Tensor | None = None
        self.gate_up: Matrix | None = None        # gate and up stacked by rows
        self.down: Matrix | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, start_pos: int, mask: torch.Tensor | None) -> torch.Tensor:
        args = self.args
        length = x.shape[0]
        end = start_pos + length
        q, k, v = self._project(x, cos, sin, linear)
        keys[:, start_pos:end] = k.transpose(0, 1)
        values[:, start_pos:end] = v.transpose(0, 1)
        if length == 1:
            attended = self._attend_one(q, keys, values, end)
        else:  # the mask is causal (and windowed) over all cached positions
            attended = F.scaled_dot_product_attention(
                q.unsqueeze(0), keys[None, :, :end], values[None, :, :end],
                attn_mask=mask, is_causal=False, scale=args.head_dim ** -0.5,
                enable_gqa=args.num_heads != args.num_kv_heads,
            ).squeeze(0)
        return self._finish(x, attended.transpose(0, 1).reshape(length, self.q_size), linear)

    def decode_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache],
                     index: int, positions: list[int]) -> torch.Tensor:
        """One token of each of B sessions, x [B, hidden]: the matrices run on all rows at once, attention on each
        session's own cache (layer `index`) at its own position; row b has the bits `forward` gives it alone."""
        q, k, v = self._project(x, cos, sin, batched_linear)
        rows = []
        for row, (cache, position) in enumerate(zip(caches, positions)):
            keys, values = cache.keys[index], cache.values[index]
            keys[:, position:position + 1] = k[row:row + 1].transpose(0, 1)
            values[:, position:position + 1] = v[row:row + 1].transpose(0, 1)
            rows.append(self._attend_one(q[:, row:row + 1], keys, values, position + 1))
        attended = torch.cat(rows, dim=1).transpose(0, 1).reshape(x.shape[0], self.q_size)
        return self._finish(x, attended, batched_linear)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 matmul: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [heads, T, head_dim], k [T, kv_heads, head_dim] (both rotated) and v [T, kv_heads, head_dim]."""
        args = self.args
        length = x.shape[0]
        qkv = matmul(rms_norm(x, self.input_norm, args.rms_norm_eps), self.qkv, self.qkv_bias)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(length, args.num_heads, args.head_dim)
        k = k.view(length, args.num_kv_heads, args.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, args.rms_norm_eps)
            k = rms_norm(k, self.k_norm, args.rms_norm_eps)
        v = v.view(length, args.num_kv_heads, args.head_dim)
        return apply_rope(q, cos, sin).transpose(0, 1), apply_rope(k, cos, sin), v

    def _attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int) -> torch.Tensor:
        """The last position's query [heads, 1, head_dim] over the cached keys/values up to `end` (and its window)."""
        first = max(0, end - self.args.sliding_window) if self.args.sliding_window else 0
        return decode_attention(q, keys[:, first:end], values[:, first:end], self.args.head_dim ** -0.5)

    def _finish(self, x: torch.Tensor, attended: torch.Tensor, matmul: Callable) -> torch.Tensor:
        """The output projection, the residuals and the MLP."""
        h = x + matmul(attended, self.o_proj, self.o_bias)
        gate, up = matmul(rms_norm(h, self.post_norm, self.args.rms_norm_eps), self.gate_up).chunk(2, dim=-1)
        return h + matmul(F.silu(gate) * up, self.down)


class ModelPart(torch.nn.Module):
    """Embedding and/or the decoder blocks of `layers` and/or the final norm + head; `forward` runs them in order."""

    def __init__(self, args: ModelArgs, layers: LayerRange, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.args, self.layers, self.dtype, self.device = args, layers, dtype, device
        self.blocks = torch.nn.ModuleList(DecoderLayer(args) for _ in range(layers.num_layers))
        self.embedding: torch.Tensor | QuantizedWeight | None = None   # also what a tied head is made from
        self.final_norm: torch.Tensor | None = None
        self.lm_head: Matrix | None = None
        self.weight_format = ""     # the format its weights came in (engine/formats.py)
        self.kernel = ""            # what runs its matrices (engine/kernels.py kernel_name)
        self._rope_length = 0
        self._cos = self._sin = torch.empty(0)

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every tensor this part's weights keep alive, each once (a tied head shares the embedding)."""
        seen: dict[int, torch.Tensor] = {}
        for holder in [self, *self.blocks]:
            for key, value in vars(holder).items():
                if not key.startswith("_"):
                    seen.update((id(tensor), tensor) for tensor in _storages(value))
        return list(seen.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes of its weights in memory: the tensors, and kernels' opaque packed weights (fbgemm fp16)."""
        opaque = {id(value): value.nbytes for holder in [self, *self.blocks] for value in vars(holder).values()
                  if isinstance(value, PreparedLinear) and value.weight is not None
                  and not isinstance(value.weight, torch.Tensor)}
        return sum(_tensor_bytes(tensor) for tensor in self.weight_tensors()) + sum(opaque.values())

    def new_cache(self, max_seq_len: int) -> KVCache:
        """A preallocated cache for this part's layers, and rope tables long enough for it."""
        if max_seq_len > self._rope_length:
            self._cos, self._sin = rope_tables(self.args, max_seq_len, self.dtype, self.device)
            self._rope_length = max_seq_len
        return KVCache(len(self.blocks), self.args.num_kv_heads, self.args.head_dim, max_seq_len,
                       self.dtype, self.device)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor, start_pos: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Token ids [T] (with embedding) or hidden [T, hidden] in; float32 logits [T, vocab] or hidden out.

        With `last_only`, the head runs on the last position only (logits [1, vocab]). More than PREFILL_CHUNK
        positions run as consecutive chunks of it, from the first position on: the same bits on every node, however
        a pipeline splits the layers (mesh/compute.py cuts a stage's forward the same way).
        """
        length = inputs.shape[0]
        end = start_pos + length
        if end > cache.max_seq_len:
            raise ValueError(f"positions up to {end} exceed the cache's max_seq_len {cache.max_seq_len}")
        if length > PREFILL_CHUNK:
            outputs = [self.forward(inputs[offset:offset + PREFILL_CHUNK], start_pos + offset, cache, last_only)
                       for offset in range(0, length, PREFILL_CHUNK)]
            return outputs[-1] if last_only and self.layers.has_head else torch.cat(outputs)
        if self.layers.has_embedding:
            x = self._embed(inputs.to(self.device))
        else:
            x = inputs.to(device=self.device, dtype=self.dtype)
        if self.blocks:
            cos = self._cos[start_pos:end].unsqueeze(1)
            sin = self._sin[start_pos:end].unsqueeze(1)
            mask = self._attention_mask(start_pos, length)
            for index, block in enumerate(self.blocks):
                x = block(x, cos, sin, cache.keys[index], cache.values[index], start_pos, mask)
        if not self.layers.has_head:
            return x
        if last_only:
            x = x[-1:]
        return logits(rms_norm(x, self.final_norm, self.args.rms_norm_eps), self.lm_head)

    @torch.no_grad()
    def decode_batch(self, inputs: torch.Tensor, positions: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One token of each of B sessions: token ids [B] (with embedding) or hidden [B, hidden] in, session b at
        positions[b] over caches[b]; float32 logits [B, vocab] or hidden out, row b bit-identical to
        `forward(inputs[b:b + 1], positions[b], caches[b], last_only=True)` (tests/test_batching.py)."""
        for position, cache in zip(positions, caches):
            if position >= cache.max_seq_len:
                raise ValueError(f"position {position} exceeds the cache's max_seq_len {cache.max_seq_len}")
        if self.layers.has_embedding:
            x = self._embed(inputs.to(self.device))
        else:
            x = inputs.to(device=self.device, dtype=self.dtype)
        if self.blocks:
            at = torch.tensor(positions, device=self.device)
            cos, sin = self._cos[at].unsqueeze(1), self._sin[at].unsqueeze(1)
            for index, block in enumerate(self.blocks):
                x = block.decode_batch(x, cos, sin, caches, index, positions)
        if not self.layers.has_head:
            return x
        return logits(rms_norm(x, self.final_norm, self.args.rms_norm_eps), self.lm_head, batched=True)

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embedding, QuantizedWeight):
            return self.embedding.rows(token_ids).to(self.dtype)
        return F.embedding(token_ids, self.embedding).to(self.dtype)   # a 16-bit table under float32 compute

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


def _storages(value: object) -> list[torch.Tensor]:
    """The tensors a weight attribute keeps alive."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, QuantizedWeight):
        return [tensor for tensor in (value.codes, value.scales, value.mins) if tensor is not None]
    if isinstance(value, PreparedLinear):
        tensors = [value.weight] if isinstance(value.weight, torch.Tensor) else []
        if value.scales is not None:
            tensors.append(value.scales)
        if value.source is not None:  # the canonical weight serves prompts and lookups
            tensors += _storages(value.source)
        return tensors
    return []


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if tensor.is_mkldnn:
        return tensor.numel() * tensor.element_size()
    return tensor.untyped_storage().nbytes()
