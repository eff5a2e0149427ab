"""Memory: what each layer and the initiator need, and contiguous layer ranges placed within every budget.

Counts are integers throughout (largest-remainder rounding, water-filling at the caps).
"""

from __future__ import annotations

import bisect
from typing import Sequence

from cakep2p.planner.types import DoesNotFit, ModelSpec, NodeBudget, format_bytes

ACTIVATION_BYTES = 4  # bytes per hidden unit per position per layer reserved for activations


def layer_memory(spec: ModelSpec, context_length: int) -> tuple[int, ...]:
    """Bytes each layer needs on its node: weights + KV cache for the context + the activation margin."""
    per_layer_extra = context_length * (spec.kv_bytes_per_token + ACTIVATION_BYTES * spec.hidden_size)
    return tuple(weights + per_layer_extra for weights in spec.layer_bytes)


def initiator_memory(spec: ModelSpec) -> int:
    """Bytes the initiator holds besides layers: the embedding and the final norm + head (tied: counted once)."""
    return spec.embedding_bytes + spec.head_bytes


def check_fits(spec: ModelSpec, order: Sequence[NodeBudget], prefix: Sequence[int], fixed: int,
               context_length: int) -> list[int]:
    """What each node in `order` has for layers (the initiator, first, less the embedding and head); DoesNotFit
    when they cannot hold the model in that order."""
    available = [max(0, node.offered_bytes) for node in order]
    available[0] -= fixed
    if available[0] < 0 or not fits(prefix, available):
        raise _does_not_fit(spec, order, prefix, available, fixed, context_length)
    return available


def layers_that_fit(budget: int, costs: tuple[int, ...]) -> int:
    """How many layers of average cost `budget` holds: a target cap only; `place` enforces the real budget."""
    if not costs:
        return 0
    average = -(-sum(costs) // len(costs))
    return max(0, budget) // average if average else len(costs)


def proportional_counts(num_layers: int, weights: list[int], caps: list[int]) -> list[int]:
    """Layer counts in proportion to `weights`, each at most its cap, by exact largest-remainder rounding.

    Water-filling: a node whose share exceeds its cap gets its cap and leaves; the rest share what remains.
    Counts may sum to less than num_layers when the caps do (`place` then decides).
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


def fits(prefix: Sequence[int], available: Sequence[int]) -> bool:
    """Whether the nodes, in this order, can each take one contiguous range (maybe empty) that covers all layers."""
    return bool(available) and available[0] >= 0 and _min_starts(prefix, available)[0] == 0


def place(prefix: Sequence[int], available: Sequence[int], targets: Sequence[int]) -> list[int]:
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
