"""The KV cache of one model part: preallocated, static shapes, one K and one V tensor for all its layers."""

from __future__ import annotations

import torch


class KVCache:
    """K and V as [layers, kv_heads, max_seq_len, head_dim]; attention reads views up to the current length."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_kv_heads, max_seq_len, head_dim)
        self.max_seq_len = max_seq_len
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
