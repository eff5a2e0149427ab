"""Which node holds which layers: a pure, deterministic split of a model across nodes' offered memory.

Stdlib only and imports nothing from cakep2p. It raises `DoesNotFit` (a ValueError carrying the figures) when the
model does not fit, and plain ValueError for invalid input; callers (commands, node) turn both into
`cakep2p.errors.PlanError`.

Memory a node needs for layers [start, end) at a context of C tokens:
    sum(layer_bytes[start:end]) + (end - start) * (kv_bytes_per_token * C + activation_margin)
where `activation_margin = ACTIVATION_BYTES * hidden_size * C`, one float32 hidden state per position per layer:
room for the forward pass's temporaries. It scales with the model and the context (131 KiB a layer for
stories260K at 512 tokens, 16 MiB for TinyLlama at 2048). The initiator also holds the embedding and the final
norm + LM head (`embedding_bytes + head_bytes`; when tied, `head_bytes` is the final norm only: counted once).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, Sequence

Strategy = Literal["proportional", "fewest", "compute"]
STRATEGIES: tuple[str, ...] = ("proportional", "fewest", "compute")
ACTIVATION_BYTES = 4  # bytes per hidden unit per position per layer reserved for activations


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about a model, in bytes at the chosen dtype."""

    name: str
    layer_bytes: tuple[int, ...]  # weights of each decoder layer
    embedding_bytes: int
    head_bytes: int  # final norm + LM head; only the final norm when the head is tied to the embedding
    kv_bytes_per_token: int  # per layer, K+V, at the chosen dtype
    hidden_size: int  # for the activation margin

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)


@dataclass(frozen=True)
class NodeBudget:
    """One node's offer: `offered_bytes` is all it gives to model parts (its runtime's base is not deducted)."""

    node_id: str
    name: str
    offered_bytes: int
    gflops: float = 0.0
    bandwidth: float = 0.0


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, end) of a model, plus whether the embedding and/or the final norm + LM head come with them:
    what a node holds, what a model part loads. The one layer-range type above the wire (wire.PartRef)."""

    start: int
    end: int
    has_embedding: bool = False
    has_head: bool = False

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        """`layers 3–5`, `layers 0–11 + embedding + head`, `head`: how every message writes a range."""
        pieces = [describe_layers(self.start, self.end)] if self.num_layers else []
        pieces += [name for name, held in (("embedding", self.has_embedding), ("head", self.has_head)) if held]
        return " + ".join(pieces) or "nothing"


def describe_layers(start: int, end: int) -> str:
    """Half-open [start, end) written for people, first and last inclusive: `layers 3–5`, `layer 4`."""
    if end - start == 1:
        return f"layer {start}"
    return f"layers {start}–{end - 1}"


@dataclass(frozen=True)
class Stage:
    """One node's share of a plan; the initiator's also holds the embedding and the head."""

    node_id: str
    name: str
    layers: LayerRange
    bytes: int


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order: the initiator's first (it embeds and, at the end, applies the head)."""

    stages: tuple[Stage, ...]
    total_bytes: int
    strategy: str

    def table(self) -> str:
        """A human-readable table, one row per stage; what each holds written as LayerRange.describe writes it."""
        rows = [("stage", "node", "holds", "memory")]
        for number, stage in enumerate(self.stages, 1):
            label = stage.name if stage.name == stage.node_id else f"{stage.name} ({stage.node_id[:8]})"
            rows.append((str(number), label, stage.layers.describe(), format_bytes(stage.bytes)))
        layers = sum(stage.layers.num_layers for stage in self.stages)
        nodes = f"{len(self.stages)} node{'' if len(self.stages) == 1 else 's'}, {self.strategy}"
        rows.append(("total", nodes, f"{layers} layer{'' if layers == 1 else 's'}", format_bytes(self.total_bytes)))
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

    def to_json(self) -> dict:
        """A JSON-ready dict: {"stages": [{"node", "name", "start", "end", "bytes", ...}], "total_bytes", "fits"}."""
        return {
            "stages": [
                {"node": stage.node_id, "name": stage.name, "start": stage.layers.start, "end": stage.layers.end,
                 "bytes": stage.bytes, "holds_embedding": stage.layers.has_embedding,
                 "holds_head": stage.layers.has_head}
                for stage in self.stages
            ],
            "total_bytes": self.total_bytes,
            "fits": True,
            "strategy": self.strategy,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        """The inverse of `to_json`; ValueError when `data` is not such a dict."""
        try:
            stages = tuple(
                Stage(str(item["node"]), str(item.get("name", item["node"])),
                      LayerRange(int(item["start"]), int(item["end"]), bool(item.get("holds_embedding", False)),
                                 bool(item.get("holds_head", False))), int(item["bytes"]))
                for item in data["stages"]
            )
            return cls(stages, int(data["total_bytes"]), str(data.get("strategy", "proportional")))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a plan: {error!r}") from None


class DoesNotFit(ValueError):
    """The model needs more memory than the nodes offer; carries the figures for the caller's message."""

    def __init__(self, message: str, missing_bytes: int, offered_bytes: int, needed_bytes: int):
        super().__init__(message)
        self.missing_bytes = missing_bytes
        self.offered_bytes = offered_bytes
        self.needed_bytes = needed_bytes


def format_bytes(num_bytes: int) -> str:
    """`1.5 GiB`, `640 KiB`, `1023 KiB`, `12 B` (as cakep2p.units.format_size, which the planner may not import)."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1023.5 or unit == "TiB":  # 1023.6 KiB would print as 1024 KiB: call it 1 MiB
            if unit == "B" or abs(value) >= 100:
                return f"{value:.0f} {unit}"
            return f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def layer_memory(spec: ModelSpec, context_length: int) -> tuple[int, ...]:
    """Bytes each layer needs on its node: weights + KV cache for the context + the activation margin."""
    per_layer_extra = context_length * (spec.kv_bytes_per_token + ACTIVATION_BYTES * spec.hidden_size)
    return tuple(weights + per_layer_extra for weights in spec.layer_bytes)


def initiator_memory(spec: ModelSpec) -> int:
    """Bytes the initiator holds besides layers: the embedding and the final norm + head (tied: counted once)."""
    return spec.embedding_bytes + spec.head_bytes


def plan(
    spec: ModelSpec,
    nodes: Sequence[NodeBudget],
    initiator_id: str,
    context_length: int,
    strategy: Strategy = "proportional",
) -> Plan:
    """Split `spec`'s layers over `nodes` (which include the initiator); DoesNotFit when they cannot hold it.

    proportional: every node gets layers in proportion to its offered memory, capped by what fits its budget
    (the excess goes to the others, again in proportion), nodes too small for one layer get none; the
    initiator's range comes first, then the others by node_id.
    fewest: the fewest nodes that hold the model (the initiator, then the largest offers), split proportionally.
    compute: as proportional, but in proportion to measured gflops, so faster nodes do more of each token's work
    (falls back to offered memory when any node has no gflops figure); budgets bind just the same.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if context_length < 1:
        raise ValueError(f"context length must be at least 1, not {context_length}")
    by_id = {node.node_id: node for node in nodes}
    if len(by_id) != len(nodes):
        raise ValueError("node ids must be unique")
    if initiator_id not in by_id:
        raise ValueError(f"the initiator {initiator_id!r} is not among the nodes")
    initiator = by_id[initiator_id]
    others = [node for node in nodes if node.node_id != initiator_id]
    costs = layer_memory(spec, context_length)
    prefix = (0, *accumulate(costs))
    fixed = initiator_memory(spec)

    order = [initiator, *sorted(others, key=lambda node: node.node_id)]
    if strategy == "fewest":
        order = [initiator, *sorted(others, key=lambda node: (-node.offered_bytes, node.node_id))]
    available = [max(0, node.offered_bytes) for node in order]
    available[0] -= fixed
    if available[0] < 0 or not _fits(prefix, available):
        raise _does_not_fit(spec, order, prefix, available, fixed, context_length)
    if strategy == "fewest":
        count = 1
        while not _fits(prefix, available[:count]):
            count += 1
        order, available = order[:count], available[:count]

    targets = _proportional_counts(len(costs), _weights(order, strategy),
                                   [_layers_that_fit(available[index], costs) for index in range(len(order))])
    ends = _place(prefix, available, targets)
    stages, start = [], 0
    for index, (node, end) in enumerate(zip(order, ends)):
        if index == 0 or end > start:
            held = prefix[end] - prefix[start] + (fixed if index == 0 else 0)
            stages.append(Stage(node.node_id, node.name, LayerRange(start, end, index == 0, index == 0), held))
        start = end
    return Plan(tuple(stages), sum(stage.bytes for stage in stages), strategy)


def _weights(order: Sequence[NodeBudget], strategy: str) -> list[int]:
    """Integer weights for the split: gflops (to a thousandth) for `compute` when all nodes report it, else memory."""
    if strategy == "compute" and all(node.gflops > 0 for node in order):
        return [max(1, round(node.gflops * 1000)) for node in order]
    return [max(0, node.offered_bytes) for node in order]


def _layers_that_fit(budget: int, costs: tuple[int, ...]) -> int:
    """How many layers of average cost `budget` holds: a target cap only; `_place` enforces the real budget."""
    if not costs:
        return 0
    average = -(-sum(costs) // len(costs))
    return max(0, budget) // average if average else len(costs)


def _proportional_counts(num_layers: int, weights: list[int], caps: list[int]) -> list[int]:
    """Layer counts in proportion to `weights`, each at most its cap, by exact largest-remainder rounding.

    Water-filling: a node whose share exceeds its cap gets its cap and leaves; the rest share what remains.
    Counts may sum to less than num_layers when the caps do (`_place` then decides).
    """
    counts = [0] * len(weights)
    active = [index for index, weight in enumerate(weights) if weight > 0 and caps[index] > 0]
    remaining = num_layers
    while active:
        total = sum(weights[index] for index in active)
        capped = [index for index in active if remaining * weights[index] > caps[index] * total]
        if not capped:
            break
        for index in capped:
            counts[index] = caps[index]
            remaining -= caps[index]
        left_out = set(capped)
        active = [index for index in active if index not in left_out]
    if not active:
        return counts
    total = sum(weights[index] for index in active)
    for index in active:
        counts[index] = remaining * weights[index] // total
    leftover = remaining - sum(counts[index] for index in active)
    by_remainder = sorted(active, key=lambda index: (-(remaining * weights[index] % total), index))
    for index in by_remainder[:leftover]:
        counts[index] += 1
    return counts


def _min_starts(prefix: Sequence[int], available: Sequence[int]) -> list[int]:
    """min_starts[j]: the first layer from which nodes j, j+1, ... (in order) can hold all remaining layers."""
    num_layers = len(prefix) - 1
    min_starts = [num_layers] * (len(available) + 1)
    for index in range(len(available) - 1, -1, -1):
        end = min_starts[index + 1]
        # smallest start with prefix[end] - prefix[start] <= available
        min_starts[index] = min(end, bisect.bisect_left(prefix, prefix[end] - available[index], 0, end + 1))
    return min_starts


def _fits(prefix: Sequence[int], available: Sequence[int]) -> bool:
    return bool(available) and available[0] >= 0 and _min_starts(prefix, available)[0] == 0


def _place(prefix: Sequence[int], available: Sequence[int], targets: Sequence[int]) -> list[int]:
    """Each node's end layer: its target count, moved just enough to stay in budget and let the rest fit."""
    min_starts = _min_starts(prefix, available)
    ends, start = [], 0
    for index, target in enumerate(targets):
        most = bisect.bisect_right(prefix, prefix[start] + available[index]) - 1
        least = max(start, min_starts[index + 1])
        end = min(max(start + target, least), most)
        ends.append(end)
        start = end
    return ends


def _does_not_fit(spec: ModelSpec, order: Sequence[NodeBudget], prefix: Sequence[int],
                  available: Sequence[int], fixed: int, context_length: int) -> DoesNotFit:
    """The error, with what is missing: the bytes of the layers no node could take (and of the head, if so)."""
    offered = sum(max(0, node.offered_bytes) for node in order)
    needed = fixed + prefix[-1]
    start = 0
    for budget in [max(0, available[0]), *available[1:]]:
        start = bisect.bisect_right(prefix, prefix[start] + budget) - 1
    missing = max(0, -available[0]) + prefix[-1] - prefix[start]
    costs = [after - before for before, after in zip(prefix, prefix[1:])] or [0]
    initiator = order[0]
    if available[0] < 0:
        detail = (f"; the initiator {initiator.name} offers {format_bytes(initiator.offered_bytes)} but the"
                  f" embedding and head alone need {format_bytes(fixed)}")
    elif offered >= needed:
        detail = f" but whole layers of {format_bytes(max(costs))} do not pack into them"
    else:
        detail = ""
    return DoesNotFit(
        f"model {spec.name} does not fit: it needs {format_bytes(needed)} ({spec.num_layers} layers for a"
        f" {context_length}-token context + {format_bytes(fixed)} embedding and head) and the {len(order)} node(s)"
        f" offer {format_bytes(offered)}{detail}: {format_bytes(missing)} missing; add a peer, offer more memory"
        f" (--max-memory) or shorten the context (--context)",
        missing_bytes=missing, offered_bytes=offered, needed_bytes=needed,
    )
