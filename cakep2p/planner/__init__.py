"""Which node holds which layers: a pure, deterministic split of a model across nodes, and its predicted speed.

Stdlib only and imports nothing from cakep2p outside this package. It raises `DoesNotFit` (a ValueError carrying
the figures) when the model does not fit, and plain ValueError for invalid input; callers (commands, node) turn
both into `cakep2p.errors.PlanError`. types.py holds the values, memory.py the budgets, speed.py the prediction,
strategies.py `plan()`.

Memory a node needs for layers [start, end) at a context of C tokens:
    sum(layer_bytes[start:end]) + (end - start) * (kv_bytes_per_token * C + activation_margin)
where `activation_margin = ACTIVATION_BYTES * hidden_size * C`, one float32 hidden state per position per layer:
room for the forward pass's temporaries. It scales with the model and the context (131 KiB a layer for
stories260K at 512 tokens, 16 MiB for TinyLlama at 2048). The initiator also holds the embedding and the final
norm + LM head (`embedding_bytes + head_bytes`; when tied, `head_bytes` is the final norm only: counted once).

Predicted decode time per token (`predict_seconds_per_token`): decode reads every weight once per token, so each
stage costs the larger of its weight bytes over the node's memory bandwidth and its FLOPs (about one per weight
byte: 2 per parameter at 2 bytes each) over its GFLOP/s; then each network hop costs a one-way latency (RTT / 2)
plus the hidden state's bytes over the link rate. Today's star topology is 2 hops per remote stage
(initiator -> stage -> initiator); chain forwarding is one hop per stage, the initiator's included.
"""

from cakep2p.planner.memory import ACTIVATION_BYTES, initiator_memory, layer_memory
from cakep2p.planner.speed import DEFAULT_LINK_BYTES_PER_S, DEFAULT_RTT_S, predict_seconds_per_token
from cakep2p.planner.strategies import best_single_node, fastest_with, plan
from cakep2p.planner.types import (STRATEGIES, DoesNotFit, LayerRange, ModelSpec, NodeBudget, Plan, Stage, Strategy,
                                   describe_layers, format_bytes, format_rate)

__all__ = ["ACTIVATION_BYTES", "DEFAULT_LINK_BYTES_PER_S", "DEFAULT_RTT_S", "STRATEGIES", "DoesNotFit", "LayerRange",
           "ModelSpec", "NodeBudget", "Plan", "Stage", "Strategy", "best_single_node", "describe_layers",
           "fastest_with", "format_bytes", "format_rate", "initiator_memory", "layer_memory", "plan",
           "predict_seconds_per_token"]
