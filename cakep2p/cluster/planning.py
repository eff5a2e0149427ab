"""Planning a model over this node and its usable peers: their budgets, planner.plan over them, waiting until the
peers settle, and the one plan preview (what `cakep2p plan` prints and the window shows before loading)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

from cakep2p import planner
from cakep2p.cluster.loaded import ModelOptions, context_length
from cakep2p.discovery import PeerInfo
from cakep2p.discovery.capacity import offered_memory, probe
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.sizes import model_spec
from cakep2p.errors import CakeError, PlanError
from cakep2p.node import Node

QUIET_S = 1.0  # when waiting for peers: plan once the directory has been quiet this long and the model fits


class NotEnoughMemory(PlanError):
    """The model needs more memory than this node and its usable peers offer; carries the planner's figures."""

    def __init__(self, message: str, missing_bytes: int, offered_bytes: int, needed_bytes: int):
        super().__init__(message)
        self.missing_bytes, self.offered_bytes, self.needed_bytes = missing_bytes, offered_bytes, needed_bytes


@dataclass(frozen=True)
class PlannedModel:
    """A plan and what it was made from: the model's sizes, the context reserved and every node considered."""

    plan: planner.Plan
    spec: planner.ModelSpec
    context: int
    nodes: tuple[planner.NodeBudget, ...]

    @property
    def offered_bytes(self) -> int:
        return sum(node.offered_bytes for node in self.nodes)

    def alternatives(self) -> dict[str, planner.Plan | None]:
        """What the other strategies, and the best single machine, would plan from the same budgets (None: it does
        not fit): the plans `cakep2p plan` compares the chosen one's predicted speed with."""
        initiator_id = self.plan.stages[0].node_id
        found: dict[str, planner.Plan | None] = {}
        for strategy in ("proportional", "compute", "fewest", "fastest"):
            try:
                found[strategy] = planner.plan(self.spec, self.nodes, initiator_id, self.context, strategy)
            except ValueError:  # DoesNotFit in that strategy's order
                found[strategy] = None
        found["single node"] = planner.best_single_node(self.spec, self.nodes, initiator_id, self.context)
        return found


class Planning:
    """Budgets from the node and its directory, and planner.plan over them (PlanError when it does not fit)."""

    def __init__(self, node: Node, checkpoint: Checkpoint, options: ModelOptions) -> None:
        if node.capacity is None:
            raise CakeError(f"node {node.name} is not running: start() it before planning a model over the cluster")
        self.node, self.options = node, options
        self.spec = model_spec(checkpoint, options.dtype, options.weights)
        self.context = context_length(checkpoint.args, options.context)

    def peers(self, exclude: set[str] = frozenset()) -> dict[str, PeerInfo]:
        """Usable peers by node id (a node seen both over mDNS and as a static peer counts once)."""
        peers: dict[str, PeerInfo] = {}
        for peer in self.node.directory.usable():
            if peer.node_id != self.node.node_id and peer.node_id not in exclude and peer.offered_memory > 0:
                peers.setdefault(peer.node_id, peer)
        return peers

    def budgets(self, peers: dict[str, PeerInfo]) -> tuple[planner.NodeBudget, ...]:
        """This node (its offer capped by max_memory) first, then the peers as the directory announces them, each
        with the RTT this node's pings measured (for the planner's speed prediction)."""
        own = self.node.offered_bytes
        if self.options.max_memory is not None:
            own = min(own, self.options.max_memory)
        capacity = self.node.capacity
        budgets = [planner.NodeBudget(self.node.node_id, self.node.name, own, capacity.gflops, capacity.bandwidth)]
        budgets += [planner.NodeBudget(peer.node_id, peer.name, peer.offered_memory, peer.gflops, peer.bandwidth,
                                       self.node.rtt_s(peer.node_id))
                    for peer in peers.values()]
        return tuple(budgets)

    def plan(self, budgets: tuple[planner.NodeBudget, ...]) -> PlannedModel:
        try:
            plan = planner.plan(self.spec, budgets, self.node.node_id, self.context, self.options.strategy)
        except planner.DoesNotFit as error:
            raise NotEnoughMemory(str(error), error.missing_bytes, error.offered_bytes, error.needed_bytes) from None
        except ValueError as error:
            raise PlanError(f"cannot plan {self.spec.name}: {error}") from None
        return PlannedModel(plan, self.spec, self.context, budgets)

    def wait_for_plan(self, wait_s: float) -> PlannedModel:
        """Plan once the model fits, no peer came or changed for QUIET_S and no announcement is on its first check
        (or at the deadline: the last plan, or the last error)."""
        changed = threading.Event()
        listener = lambda event, peer: changed.set()  # noqa: E731
        self.node.directory.add_listener(listener)
        deadline = time.monotonic() + max(0.0, wait_s)
        try:
            while True:
                changed.clear()
                try:
                    planned, error = self.plan(self.budgets(self.peers())), None
                except PlanError as failure:
                    planned, error = None, failure
                left = deadline - time.monotonic()
                if left <= 0:
                    if error is not None:
                        raise error
                    return planned
                quiet = not changed.wait(min(left, QUIET_S))
                if quiet and planned is not None and not self.node.proving_peers():
                    return planned
        finally:
            self.node.directory.remove_listener(listener)


def plan_model(node: Node, checkpoint: Checkpoint, options: ModelOptions) -> PlannedModel:
    """The plan open_model would use now (waiting options.wait_s for peers), loading nothing: what `cakep2p plan`
    prints and the window previews. NotEnoughMemory (with the figures) when the model does not fit."""
    return Planning(node, checkpoint, options).wait_for_plan(options.wait_s)


def check_fits_locally(checkpoint: Checkpoint, options: ModelOptions) -> None:
    """PlanError unless the whole model (weights and KV cache) fits what this machine alone offers now.

    Without it a model too big for --local loads until torch fails or the OS kills the process.
    """
    capacity = probe(run_benchmark=False)
    if options.device == "cpu" and capacity.accelerator != "cpu":  # the weights go to RAM, not to the accelerator
        capacity = replace(capacity, accelerator="cpu")
    this_machine = planner.NodeBudget("local", "this machine", offered_memory(capacity, options.max_memory))
    try:
        planner.plan(model_spec(checkpoint, options.dtype, options.weights), [this_machine], "local",
                     context_length(checkpoint.args, options.context))
    except ValueError as error:  # planner.DoesNotFit names the model, the need and the offer
        raise PlanError(f"--local: {error}") from None
