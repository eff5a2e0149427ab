"""Predicted decode seconds per token of a plan, from each node's measured speeds and RTT (see the package doc)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from cakep2p.planner.types import LayerRange, ModelSpec, NodeBudget, Plan

FLOPS_PER_WEIGHT_BYTE = 1.0  # 2 FLOPs per parameter at 2 bytes a parameter (bf16); f32 is 0.5, int8 2
UNKNOWN_BANDWIDTH = 10e9  # bytes/s assumed when no node reports a speed (a laptop's RAM); relative figures still rank
DEFAULT_RTT_S = 0.002  # assumed round trip to a peer whose RTT was never measured: a Wi-Fi hop
DEFAULT_LINK_BYTES_PER_S = 25e6  # assumed network rate for hidden states: 200 Mb/s Wi-Fi
WIRE_BYTES_PER_HIDDEN = 4  # a hidden state travels as float32
LAYER_OVERHEAD_S = 0.0004  # per layer per token besides the weight reads: op dispatch (CPU, bench/heterogeneous_bench)
HOP_OVERHEAD_S = 0.0005  # per message besides the RTT: encoding, the server's dispatch to its compute thread


def predict_seconds_per_token(spec: ModelSpec, result: Plan, nodes: Sequence[NodeBudget], hops: int | None = None,
                              link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S) -> float:
    """Predicted decode seconds per token of one stream: every stage's weight reads, then `hops` network hops
    (default: today's star, 2 per stage off the initiator; chain forwarding passes `len(result.stages)`), each a
    one-way latency (the mean RTT / 2 of the stages off the initiator), HOP_OVERHEAD_S and a hidden state over the
    link. Every layer adds LAYER_OVERHEAD_S: what a small model's speed is made of."""
    return Speeds.of(nodes).seconds_per_token(spec, result, hops, link_bytes_per_s)


@dataclass(frozen=True)
class Speeds:
    """Each node's predicted seconds per weight byte and its RTT, worked out once per plan() call."""

    per_byte: dict[str, float]
    rtt_s: dict[str, float]

    @classmethod
    def of(cls, nodes: Sequence[NodeBudget]) -> "Speeds":
        return cls(_seconds_per_byte(nodes), {node.node_id: _rtt(node) for node in nodes})

    def seconds_per_token(self, spec: ModelSpec, result: Plan, hops: int | None = None,
                          link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S) -> float:
        compute = sum(self.per_byte[stage.node_id] * _weight_bytes(spec, stage.layers) for stage in result.stages)
        compute += spec.num_layers * LAYER_OVERHEAD_S
        remote = result.stages[1:]
        if not remote:
            return compute
        one_way = sum(self.rtt_s[stage.node_id] for stage in remote) / (2 * len(remote))
        hops = 2 * len(remote) if hops is None else hops
        return compute + hops * (one_way + HOP_OVERHEAD_S + spec.hidden_size * WIRE_BYTES_PER_HIDDEN / link_bytes_per_s)


def _seconds_per_byte(nodes: Sequence[NodeBudget]) -> dict[str, float]:
    """Predicted decode seconds per weight byte on each node: the slower of its memory bandwidth and its FLOP rate;
    a node that reports neither is assumed as slow as the slowest that does (UNKNOWN_BANDWIDTH if none does)."""
    def measured(node: NodeBudget) -> float:
        return max(1 / node.bandwidth if node.bandwidth > 0 else 0.0,
                   FLOPS_PER_WEIGHT_BYTE / (node.gflops * 1e9) if node.gflops > 0 else 0.0)
    known = [measured(node) for node in nodes if measured(node) > 0]
    unknown = max(known, default=1 / UNKNOWN_BANDWIDTH)
    return {node.node_id: measured(node) or unknown for node in nodes}


def _rtt(node: NodeBudget) -> float:
    return DEFAULT_RTT_S if node.rtt_s is None else max(0.0, node.rtt_s)


def _weight_bytes(spec: ModelSpec, layers: LayerRange) -> int:
    """Bytes read per decoded token: the range's layer weights, and for the head the LM head matrix (the embedding
    matrix when tied, so the larger of the two)."""
    head = max(spec.head_bytes, spec.embedding_bytes) if layers.has_head else 0
    return sum(spec.layer_bytes[layers.start:layers.end]) + head
