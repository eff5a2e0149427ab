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

Predicted decode time per token (`predict_seconds_per_token`): decode reads every weight once per token, so each
stage costs the larger of its weight bytes over the node's memory bandwidth and its FLOPs (about one per weight
byte: 2 per parameter at 2 bytes each) over its GFLOP/s; then each network hop costs a one-way latency (RTT / 2)
plus the hidden state's bytes over the link rate. Today's star topology is 2 hops per remote stage
(initiator -> stage -> initiator); chain forwarding is one hop per stage, the initiator's included.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Literal, Sequence

Strategy = Literal["proportional", "fewest", "compute", "fastest"]
STRATEGIES: tuple[str, ...] = ("proportional", "fewest", "compute", "fastest")
ACTIVATION_BYTES = 4  # bytes per hidden unit per position per layer reserved for activations
FLOPS_PER_WEIGHT_BYTE = 1.0  # 2 FLOPs per parameter at 2 bytes a parameter (bf16); f32 is 0.5, int8 2
UNKNOWN_BANDWIDTH = 10e9  # bytes/s assumed when no node reports a speed (a laptop's RAM); relative figures still rank
DEFAULT_RTT_S = 0.002  # assumed round trip to a peer whose RTT was never measured: a Wi-Fi hop
DEFAULT_LINK_BYTES_PER_S = 25e6  # assumed network rate for hidden states: 200 Mb/s Wi-Fi
WIRE_BYTES_PER_HIDDEN = 4  # a hidden state travels as float32
PATIENCE = 4  # `fastest` stops growing a candidate set after this many sizes in a row that beat nothing


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
    gflops: float = 0.0        # float32 matmul GFLOP/s; 0: not measured
    bandwidth: float = 0.0     # memory bandwidth, bytes/s; 0: not measured
    rtt_s: float | None = None  # round trip from the initiator, seconds; None: not measured (DEFAULT_RTT_S)


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
    predicted_tokens_per_s: float | None = None  # decode, one stream, today's star topology

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
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
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
            speed = data.get("predicted_tokens_per_s")
            if speed is not None and not 0 < float(speed) < float("inf"):
                raise ValueError(f"predicted_tokens_per_s {speed!r} is not a positive number")
            return cls(stages, int(data["total_bytes"]), str(data.get("strategy", "proportional")),
                       None if speed is None else float(speed))
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
    fastest: the plan with the best predicted decode speed among bounded candidates (see `_candidates`), never
    slower than the best single node nor than the other strategies; ties go to fewer stages, then node ids.
    Every plan carries its `predicted_tokens_per_s`.
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
    if strategy == "fastest":
        _check_fits(spec, order, prefix, fixed, context_length)
        return min(_candidates(spec, nodes, initiator, prefix, fixed, context_length), key=_speed_order)
    if strategy == "fewest":
        order = [initiator, *sorted(others, key=lambda node: (-node.offered_bytes, node.node_id))]
    available = _check_fits(spec, order, prefix, fixed, context_length)
    if strategy == "fewest":
        count = 1
        while not _fits(prefix, available[:count]):
            count += 1
        order, available = order[:count], available[:count]

    targets = _proportional_counts(len(costs), _weights(order, strategy),
                                   [_layers_that_fit(available[index], costs) for index in range(len(order))])
    return _split(spec, _Speeds.of(nodes), order, prefix, fixed, targets, strategy)


def _check_fits(spec: ModelSpec, order: Sequence[NodeBudget], prefix: Sequence[int], fixed: int,
                context_length: int) -> list[int]:
    """What each node in `order` has for layers (the initiator, first, less the embedding and head); DoesNotFit
    when they cannot hold the model in that order."""
    available = [max(0, node.offered_bytes) for node in order]
    available[0] -= fixed
    if available[0] < 0 or not _fits(prefix, available):
        raise _does_not_fit(spec, order, prefix, available, fixed, context_length)
    return available


def _split(spec: ModelSpec, speeds: "_Speeds", order: Sequence[NodeBudget], prefix: Sequence[int],
           fixed: int, targets: Sequence[int], strategy: str) -> Plan:
    """The plan that gives each node in `order` its target layer count, moved just enough to fit the budgets."""
    available = [max(0, node.offered_bytes) for node in order]
    available[0] -= fixed
    ends = _place(prefix, available, targets)
    stages, start = [], 0
    for index, (node, end) in enumerate(zip(order, ends)):
        if index == 0 or end > start:
            held = prefix[end] - prefix[start] + (fixed if index == 0 else 0)
            stages.append(Stage(node.node_id, node.name, LayerRange(start, end, index == 0, index == 0), held))
        start = end
    result = Plan(tuple(stages), sum(stage.bytes for stage in stages), strategy)
    seconds = speeds.seconds_per_token(spec, result)
    return replace(result, predicted_tokens_per_s=1 / seconds if seconds > 0 else None)


def predict_seconds_per_token(spec: ModelSpec, result: Plan, nodes: Sequence[NodeBudget], hops: int | None = None,
                              link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S) -> float:
    """Predicted decode seconds per token of one stream: every stage's weight reads, then `hops` network hops
    (default: today's star, 2 per stage off the initiator; chain forwarding passes `len(result.stages)`), each a
    one-way latency (the mean RTT / 2 of the stages off the initiator) plus a hidden state over the link."""
    return _Speeds.of(nodes).seconds_per_token(spec, result, hops, link_bytes_per_s)


@dataclass(frozen=True)
class _Speeds:
    """Each node's predicted seconds per weight byte and its RTT, worked out once per plan() call."""

    per_byte: dict[str, float]
    rtt_s: dict[str, float]

    @classmethod
    def of(cls, nodes: Sequence[NodeBudget]) -> "_Speeds":
        return cls(_seconds_per_byte(nodes), {node.node_id: _rtt(node) for node in nodes})

    def seconds_per_token(self, spec: ModelSpec, result: Plan, hops: int | None = None,
                          link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S) -> float:
        compute = sum(self.per_byte[stage.node_id] * _weight_bytes(spec, stage.layers) for stage in result.stages)
        remote = result.stages[1:]
        if not remote:
            return compute
        one_way = sum(self.rtt_s[stage.node_id] for stage in remote) / (2 * len(remote))
        hops = 2 * len(remote) if hops is None else hops
        return compute + hops * (one_way + spec.hidden_size * WIRE_BYTES_PER_HIDDEN / link_bytes_per_s)


def best_single_node(spec: ModelSpec, nodes: Sequence[NodeBudget], initiator_id: str,
                     context_length: int) -> Plan | None:
    """The fastest plan whose layers all run on one machine (the initiator alone, or one peer with every layer
    while the initiator keeps the embedding and head); None when no machine holds them all."""
    by_id = {node.node_id: node for node in nodes}
    costs = layer_memory(spec, context_length)
    prefix, fixed = (0, *accumulate(costs)), initiator_memory(spec)
    plans = [_split(spec, _Speeds.of(nodes), order, prefix, fixed, targets, "single node")
             for order, targets in _single_node_splits(nodes, by_id[initiator_id], prefix, fixed)]
    return min(plans, key=_speed_order, default=None)


def fastest_with(spec: ModelSpec, nodes: Sequence[NodeBudget], initiator_id: str, context_length: int,
                 node_id: str) -> Plan | None:
    """The fastest candidate `fastest` compared in which `node_id` holds layers; None when none gives it any."""
    by_id = {node.node_id: node for node in nodes}
    costs = layer_memory(spec, context_length)
    prefix, fixed = (0, *accumulate(costs)), initiator_memory(spec)
    holding = [candidate for candidate in _candidates(spec, nodes, by_id[initiator_id], prefix, fixed, context_length)
               if any(stage.node_id == node_id and stage.layers.num_layers for stage in candidate.stages)]
    return min(holding, key=_speed_order, default=None)


def _speed_order(candidate: Plan) -> tuple:
    """Fastest first; ties to fewer stages, then to the node ids and ranges in order (deterministic)."""
    speed = candidate.predicted_tokens_per_s
    return (-(speed if speed is not None else float("inf")), len(candidate.stages),
            tuple((stage.node_id, stage.layers.start, stage.layers.end) for stage in candidate.stages))


def _candidates(spec: ModelSpec, nodes: Sequence[NodeBudget], initiator: NodeBudget, prefix: Sequence[int],
                fixed: int, context_length: int) -> list[Plan]:
    """What `fastest` compares: the initiator plus the k best peers for each k (ranked by speed, and by RTT; a
    ranking stops after PATIENCE sizes in a row that beat nothing), each split by filling the fastest node first
    (best for one stream: stages run one after another) and in proportion to speed, with and without layers on
    the initiator; plus the other strategies' plans and every single-node plan. All within every budget."""
    speeds = _Speeds.of(nodes)
    per_byte, rtts = speeds.per_byte, speeds.rtt_s
    costs = tuple(after - before for before, after in zip(prefix, prefix[1:]))
    others = [node for node in nodes if node.node_id != initiator.node_id]
    rankings = (lambda node: (per_byte[node.node_id], rtts[node.node_id], node.node_id),
                lambda node: (rtts[node.node_id], per_byte[node.node_id], node.node_id))
    plans = [_split(spec, speeds, order, prefix, fixed, targets, "single node")
             for order, targets in _single_node_splits(nodes, initiator, prefix, fixed)]
    plans += [replace(plan(spec, nodes, initiator.node_id, context_length, strategy), strategy="fastest")
              for strategy in ("proportional", "compute", "fewest")]
    for ranking in rankings:
        ranked, best, stale = sorted(others, key=ranking), min(plans, key=_speed_order), 0
        budgets = [max(0, initiator.offered_bytes) - fixed, *(max(0, node.offered_bytes) for node in ranked)]
        smallest = bisect.bisect_left(range(len(ranked) + 1), True,  # a node more never stops the others fitting
                                      key=lambda count: _fits(prefix, budgets[:count + 1]))
        for count in range(smallest, len(ranked) + 1):
            order, available = [initiator, *ranked[:count]], budgets[:count + 1]
            caps = [_layers_that_fit(budget, costs) for budget in available]
            shares = [max(1, round(1e-6 / per_byte[node.node_id])) for node in order]  # MB/s
            found = [_split(spec, speeds, order, prefix, fixed, targets, "fastest")
                     for initiator_share in (True, False)
                     for targets in (_fastest_first(len(costs), order, caps, per_byte, initiator_share),
                                     _proportional_counts(len(costs), shares if initiator_share else [0, *shares[1:]],
                                                          caps))]
            plans += found
            improved = min(found, key=_speed_order)
            stale = 0 if _speed_order(improved) < _speed_order(best) else stale + 1
            best = min(best, improved, key=_speed_order)
            if stale >= PATIENCE:
                break
    return [replace(candidate, strategy="fastest") for candidate in plans]


def _fastest_first(num_layers: int, order: Sequence[NodeBudget], caps: Sequence[int], per_byte: dict[str, float],
                   initiator_share: bool) -> list[int]:
    """Layer counts that fill the fastest node to its cap, then the next (the initiator last when it is to hold
    none but must); the total per-token read time is then the least these nodes allow."""
    ranked = sorted(range(len(order)), key=lambda index: (index == 0 and not initiator_share,
                                                           per_byte[order[index].node_id], order[index].node_id))
    counts, remaining = [0] * len(order), num_layers
    for index in ranked:
        counts[index] = min(caps[index], remaining)
        remaining -= counts[index]
    return counts


def _single_node_splits(nodes: Sequence[NodeBudget], initiator: NodeBudget, prefix: Sequence[int], fixed: int):
    """(order, targets) for every machine that holds all layers alone: the initiator, or a peer beside it."""
    num_layers = len(prefix) - 1
    if initiator.offered_bytes - fixed >= prefix[-1]:
        yield [initiator], [num_layers]
    if initiator.offered_bytes >= fixed:
        for node in sorted(nodes, key=lambda node: node.node_id):
            if node.node_id != initiator.node_id and node.offered_bytes >= prefix[-1]:
                yield [initiator, node], [0, num_layers]


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
