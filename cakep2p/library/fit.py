"""Whether a model fits this node and its usable peers: the planner run over their offered memory, before anything is
downloaded or loaded (the model library's verdicts, the offered-memory slider's live fit)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from cakep2p import planner
from cakep2p.cluster import context_length
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.sizes import spec_from_args
from cakep2p.library.catalog import CatalogEntry, Variant
from cakep2p.units import format_size


@dataclass(frozen=True)
class Fit:
    """The planner's verdict on one model over some budgets, with the figures behind it."""

    fits: bool
    needed_bytes: int        # weights and the KV cache for `context` tokens, over all nodes
    offered_bytes: int       # what the nodes offer together
    nodes_used: int          # nodes the plan puts layers on (0 when it does not fit)
    nodes_offered: int
    context: int

    @property
    def text(self) -> str:
        """"fits on this machine", "fits over 2 of 3 machines", "too big: needs 15.4 GiB, 8 GiB offered"."""
        if not self.fits:
            return f"too big: needs {format_size(self.needed_bytes)}, {format_size(self.offered_bytes)} offered"
        if self.nodes_used <= 1:
            return "fits on this machine"
        return f"fits over {self.nodes_used} of {self.nodes_offered} machines"


@dataclass(frozen=True)
class Budgets:
    """This node's budget first, then its usable peers': what a plan is made over."""

    nodes: tuple[planner.NodeBudget, ...]

    @property
    def own_id(self) -> str:
        return self.nodes[0].node_id

    def with_own_offer(self, offered_bytes: int) -> "Budgets":
        """The same budgets, this node offering `offered_bytes` (the offered-memory slider, before it applies)."""
        return Budgets((replace(self.nodes[0], offered_bytes=max(0, int(offered_bytes))), *self.nodes[1:]))

    def without(self, node_ids: set[str]) -> "Budgets":
        """The same budgets less the peers in `node_ids` (peers the mesh lost; this node always stays)."""
        return Budgets((self.nodes[0], *(node for node in self.nodes[1:] if node.node_id not in node_ids)))


def this_machine(offered_bytes: int, own_id: str = "local", name: str = "this machine") -> Budgets:
    return Budgets((planner.NodeBudget(own_id, name, max(0, int(offered_bytes))),))


def cluster_budgets(node: Any, max_memory: int | None = None) -> Budgets:
    """The node's offer (capped by `max_memory`) and its usable peers' offers, as cluster.plan_model counts them."""
    own = node.offered_bytes if max_memory is None else min(node.offered_bytes, max_memory)
    capacity = node.capacity
    budgets = [planner.NodeBudget(node.node_id, node.name, own, capacity.gflops, capacity.bandwidth)]
    seen = {node.node_id}
    for peer in node.directory.usable():
        if peer.node_id not in seen and peer.offered_memory > 0:
            seen.add(peer.node_id)
            budgets.append(planner.NodeBudget(peer.node_id, peer.name, peer.offered_memory, peer.gflops,
                                              peer.bandwidth))
    return Budgets(tuple(budgets))


def args_of(entry: CatalogEntry) -> ModelArgs:
    return ModelArgs.from_config(dict(entry.config), source=f"the catalog's {entry.key}")


def spec_of(entry: CatalogEntry, variant: Variant) -> planner.ModelSpec:
    """The planner's figures for `variant`: the config's shapes in 16 bits, weights scaled to the variant's files."""
    spec = spec_from_args(args_of(entry), "bfloat16", entry.title)
    stored = sum(spec.layer_bytes) + spec.embedding_bytes + spec.head_bytes
    if variant.format == "safetensors" or stored <= 0:
        return spec
    ratio = variant.approx_bytes / stored     # a quantized file keeps its blocks: its size is what the layers take
    return replace(spec, layer_bytes=tuple(int(size * ratio) for size in spec.layer_bytes),
                   embedding_bytes=int(spec.embedding_bytes * ratio), head_bytes=int(spec.head_bytes * ratio))


def fit(spec: planner.ModelSpec, context: int, budgets: Budgets) -> Fit:
    """The planner's verdict on `spec` with a KV cache of `context` tokens over `budgets`."""
    offered = sum(node.offered_bytes for node in budgets.nodes)
    needed = planner.initiator_memory(spec) + sum(planner.layer_memory(spec, context))
    try:
        plan = planner.plan(spec, budgets.nodes, budgets.own_id, context)
    except planner.DoesNotFit as error:
        return Fit(False, error.needed_bytes, error.offered_bytes, 0, len(budgets.nodes), context)
    used = sum(1 for stage in plan.stages if stage.layers.num_layers or stage.node_id == budgets.own_id)
    return Fit(True, needed, offered, used, len(budgets.nodes), context)


def catalog_fit(entry: CatalogEntry, variant: Variant, budgets: Budgets) -> Fit:
    """Whether `variant` of `entry` fits `budgets` at the context a load reserves by default."""
    return fit(spec_of(entry, variant), context_length(args_of(entry), None), budgets)


def fits_of(entries: Sequence[CatalogEntry], budgets: Budgets) -> dict[tuple[str, str], Fit]:
    """Every variant's fit, by (entry key, format)."""
    return {(entry.key, variant.format): catalog_fit(entry, variant, budgets)
            for entry in entries for variant in entry.variants}
