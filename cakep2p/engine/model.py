"""The transformer block math: RMSNorm, fused QKV attention over the KV cache, fused gate/up MLP."""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from cakep2p.engine.config import ModelArgs
from cakep2p.engine.rope import apply_rope

PACK_MIN_ELEMENTS = {torch.float32: 2**20, torch.bfloat16: 2**16}  # measured break-even, one thread
Fill = Callable[[str, torch.Tensor], None]  # copies the named checkpoint tensor into the given destination


def has_o_bias(args: ModelArgs) -> bool:
    """Llama/Qwen3 attention_bias also biases o_proj; Qwen2 biases only q, k and v."""
    return args.attention_bias and args.architecture != "Qwen2ForCausalLM"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised weight storage (plain tensors, not Parameters: this engine only runs inference)."""
    return torch.empty(shape, dtype=dtype, device=device)


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout for a CPU linear weight (~1.4x faster matrix-vector products); else unchanged.

    CAKEP2P_PACK=0 turns it off. The dense tensor is dropped by the caller, so memory does not double.
    """
    worth_it = weight.numel() >= PACK_MIN_ELEMENTS.get(weight.dtype, 2**62)  # small ones: call overhead wins
    if (weight.device.type != "cpu" or not worth_it or os.environ.get("CAKEP2P_PACK", "1") == "0"
            or not torch.backends.mkldnn.is_available()):
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    except (RuntimeError, AttributeError):
        return weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or oneDNN's linear for a weight packed by `pack_for_cpu`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


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

    def __init__(self, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, q_size, kv_size = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.args = args
        self.q_size, self.kv_size = q_size, kv_size
        self.input_norm = empty((hidden,), dtype, device)
        self.qkv = empty((q_size + 2 * kv_size, hidden), dtype, device)
        self.qkv_bias = empty((q_size + 2 * kv_size,), dtype, device) if args.attention_bias else None
        self.q_norm = empty((args.head_dim,), dtype, device) if args.qk_norm else None
        self.k_norm = empty((args.head_dim,), dtype, device) if args.qk_norm else None
        self.o_proj = empty((hidden, q_size), dtype, device)
        self.o_bias = empty((hidden,), dtype, device) if has_o_bias(args) else None
        self.post_norm = empty((hidden,), dtype, device)
        self.gate_up = empty((2 * args.intermediate_size, hidden), dtype, device)
        self.down = empty((hidden, args.intermediate_size), dtype, device)

    def fill(self, prefix: str, fill: Fill) -> None:
        """Copy this layer's checkpoint tensors straight into the fused weights, packing each big one at once."""
        q, kv, inter = self.q_size, self.kv_size, self.args.intermediate_size
        with torch.no_grad():
            fill(prefix + "input_layernorm.weight", self.input_norm)
            fill(prefix + "post_attention_layernorm.weight", self.post_norm)
            if self.qkv_bias is not None:
                fill(prefix + "self_attn.q_proj.bias", self.qkv_bias[:q])
                fill(prefix + "self_attn.k_proj.bias", self.qkv_bias[q:q + kv])
                fill(prefix + "self_attn.v_proj.bias", self.qkv_bias[q + kv:])
            if self.q_norm is not None:
                fill(prefix + "self_attn.q_norm.weight", self.q_norm)
                fill(prefix + "self_attn.k_norm.weight", self.k_norm)
            if self.o_bias is not None:
                fill(prefix + "self_attn.o_proj.bias", self.o_bias)
            fill(prefix + "self_attn.q_proj.weight", self.qkv[:q])
            fill(prefix + "self_attn.k_proj.weight", self.qkv[q:q + kv])
            fill(prefix + "self_attn.v_proj.weight", self.qkv[q + kv:])
            self.qkv = pack_for_cpu(self.qkv)
            fill(prefix + "self_attn.o_proj.weight", self.o_proj)
            self.o_proj = pack_for_cpu(self.o_proj)
            fill(prefix + "mlp.gate_proj.weight", self.gate_up[:inter])
            fill(prefix + "mlp.up_proj.weight", self.gate_up[inter:])
            self.gate_up = pack_for_cpu(self.gate_up)
            fill(prefix + "mlp.down_proj.weight", self.down)
            self.down = pack_for_cpu(self.down)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, start_pos: int, mask: torch.Tensor | None) -> torch.Tensor:
        args = self.args
        length = x.shape[0]
        end = start_pos + length
        qkv = linear(rms_norm(x, self.input_norm, args.rms_norm_eps), self.qkv, self.qkv_bias)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(length, args.num_heads, args.head_dim)
        k = k.view(length, args.num_kv_heads, args.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, args.rms_norm_eps)
            k = rms_norm(k, self.k_norm, args.rms_norm_eps)
        q = apply_rope(q, cos, sin).transpose(0, 1)
        keys[:, start_pos:end] = apply_rope(k, cos, sin).transpose(0, 1)
        values[:, start_pos:end] = v.view(length, args.num_kv_heads, args.head_dim).transpose(0, 1)
        if length == 1:
            first = max(0, end - args.sliding_window) if args.sliding_window else 0
            attended = decode_attention(q, keys[:, first:end], values[:, first:end], args.head_dim ** -0.5)
        else:  # the mask is causal (and windowed) over all cached positions
            attended = F.scaled_dot_product_attention(
                q.unsqueeze(0), keys[None, :, :end], values[None, :, :end],
                attn_mask=mask, is_causal=False, scale=args.head_dim ** -0.5,
                enable_gqa=args.num_heads != args.num_kv_heads,
            ).squeeze(0)
        attended = attended.transpose(0, 1).reshape(length, self.q_size)
        h = x + linear(attended, self.o_proj, self.o_bias)
        gate, up = linear(rms_norm(h, self.post_norm, args.rms_norm_eps), self.gate_up).chunk(2, dim=-1)
        return h + linear(F.silu(gate) * up, self.down)
