"""plan(): the strategies that split a model over nodes, `fastest` among them, and the plans it compares."""

from __future__ import annotations

import bisect
from dataclasses import replace
from itertools import accumulate
from typing import Iterator, Sequence

from cakep2p.planner.memory import (check_fits, fits, initiator_memory, layer_memory, layers_that_fit, place,
                                    proportional_counts)
from cakep2p.planner.speed import Speeds
from cakep2p.planner.types import STRATEGIES, DoesNotFit, LayerRange, ModelSpec, NodeBudget, Plan, Stage, Strategy

PATIENCE = 4  # `fastest` stops growing a candidate set after this many sizes in a row that beat nothing


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
        check_fits(spec, order, prefix, fixed, context_length)
        return min(_candidates(spec, nodes, initiator, prefix, fixed, context_length), key=_speed_order)
    if strategy == "fewest":
        order = [initiator, *sorted(others, key=lambda node: (-node.offered_bytes, node.node_id))]
    available = check_fits(spec, order, prefix, fixed, context_length)
    if strategy == "fewest":
        count = 1
        while not fits(prefix, available[:count]):
            count += 1
        order, available = order[:count], available[:count]

    targets = proportional_counts(len(costs), _weights(order, strategy),
                                  [layers_that_fit(available[index], costs) for index in range(len(order))])
    return _split(spec, Speeds.of(nodes), order, prefix, fixed, targets, strategy)


def _weights(order: Sequence[NodeBudget], strategy: str) -> list[int]:
    """Integer weights for the split: gflops (to a thousandth) for `compute` when all nodes report it, else memory."""
    if strategy == "compute" and all(node.gflops > 0 for node in order):
        return [max(1, round(node.gflops * 1000)) for node in order]
    return [max(0, node.offered_bytes) for node in order]


def _split(spec: ModelSpec, speeds: Speeds, order: Sequence[NodeBudget], prefix: Sequence[int],
           fixed: int, targets: Sequence[int], strategy: str) -> Plan:
    """The plan that gives each node in `order` its target layer count, moved just enough to fit the budgets."""
    available = [max(0, node.offered_bytes) for node in order]
    available[0] -= fixed
    ends = place(prefix, available, targets)
    stages, start = [], 0
    for index, (node, end) in enumerate(zip(order, ends)):
        if index == 0 or end > start:
            held = prefix[end] - prefix[start] + (fixed if index == 0 else 0)
            stages.append(Stage(node.node_id, node.name, LayerRange(start, end, index == 0, index == 0), held))
        start = end
    result = Plan(tuple(stages), sum(stage.bytes for stage in stages), strategy)
    seconds = speeds.seconds_per_token(spec, result)
    return replace(result, predicted_tokens_per_s=1 / seconds if seconds > 0 else None)


def best_single_node(spec: ModelSpec, nodes: Sequence[NodeBudget], initiator_id: str,
                     context_length: int) -> Plan | None:
    """The fastest plan whose layers all run on one machine (the initiator alone, or one peer with every layer
    while the initiator keeps the embedding and head); None when no machine holds them all."""
    by_id = {node.node_id: node for node in nodes}
    costs = layer_memory(spec, context_length)
    prefix, fixed = (0, *accumulate(costs)), initiator_memory(spec)
    plans = [_split(spec, Speeds.of(nodes), order, prefix, fixed, targets, "single node")
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
    speeds = Speeds.of(nodes)
    per_byte, rtts = speeds.per_byte, speeds.rtt_s
    costs = tuple(after - before for before, after in zip(prefix, prefix[1:]))
    others = [node for node in nodes if node.node_id != initiator.node_id]
    rankings = (lambda node: (per_byte[node.node_id], rtts[node.node_id], node.node_id),
                lambda node: (rtts[node.node_id], per_byte[node.node_id], node.node_id))
    plans = [_split(spec, speeds, order, prefix, fixed, targets, "single node")
             for order, targets in _single_node_splits(nodes, initiator, prefix, fixed)]
    plans += [replace(other, strategy="fastest") for other in _other_strategies(spec, nodes, initiator, context_length)]
    for ranking in rankings:
        ranked, best, stale = sorted(others, key=ranking), min(plans, key=_speed_order), 0
        budgets = [max(0, initiator.offered_bytes) - fixed, *(max(0, node.offered_bytes) for node in ranked)]
        smallest = bisect.bisect_left(range(len(ranked) + 1), True,  # a node more never stops the others fitting
                                      key=lambda count: fits(prefix, budgets[:count + 1]))
        for count in range(smallest, len(ranked) + 1):
            order, available = [initiator, *ranked[:count]], budgets[:count + 1]
            caps = [layers_that_fit(budget, costs) for budget in available]
            shares = [max(1, round(1e-6 / per_byte[node.node_id])) for node in order]  # MB/s
            found = [_split(spec, speeds, order, prefix, fixed, targets, "fastest")
                     for initiator_share in (True, False)
                     for targets in (_fastest_first(len(costs), order, caps, per_byte, initiator_share),
                                     proportional_counts(len(costs), shares if initiator_share else [0, *shares[1:]],
                                                          caps))]
            plans += found
            improved = min(found, key=_speed_order)
            stale = 0 if _speed_order(improved) < _speed_order(best) else stale + 1
            best = min(best, improved, key=_speed_order)
            if stale >= PATIENCE:
                break
    return [replace(candidate, strategy="fastest") for candidate in plans]


def _other_strategies(spec: ModelSpec, nodes: Sequence[NodeBudget], initiator: NodeBudget,
                      context_length: int) -> Iterator[Plan]:
    """The other strategies' plans, those that fit: their own node order may not (fewest's, largest offers first, can
    leave a big layer with no room where the order by id fits)."""
    for strategy in ("proportional", "compute", "fewest"):
        try:
            yield plan(spec, nodes, initiator.node_id, context_length, strategy)
        except DoesNotFit:
            continue


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


def _single_node_splits(nodes: Sequence[NodeBudget], initiator: NodeBudget, prefix: Sequence[int],
                        fixed: int) -> Iterator[tuple[list[NodeBudget], list[int]]]:
    """(order, targets) for every machine that holds all layers alone: the initiator, or a peer beside it."""
    num_layers = len(prefix) - 1
    if initiator.offered_bytes - fixed >= prefix[-1]:
        yield [initiator], [num_layers]
    if initiator.offered_bytes >= fixed:
        for node in sorted(nodes, key=lambda node: node.node_id):
            if node.node_id != initiator.node_id and node.offered_bytes >= prefix[-1]:
                yield [initiator, node], [0, num_layers]
