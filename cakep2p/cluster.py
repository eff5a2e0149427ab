"""A model spread over the cluster: plan its layers over this node and the usable peers, run the stages over the
mesh (this node's share in-process), and re-plan over the remaining peers when one is lost mid-chat.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cakep2p import planner, wire
from cakep2p.discovery import PeerInfo
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.part import ModelPart, PartSpec, resolve_dtype
from cakep2p.engine.sizes import model_spec
from cakep2p.engine.tokenizer import Tokenizer
from cakep2p.errors import CakeError, MeshError, PlanError
from cakep2p.loaded_model import LoadedModel, LocalModel, context_length
from cakep2p.mesh import RemotePipeline, RemoteStage, Stage, StageClient, StageRefused, stages_for_plan
from cakep2p.weights import model_fingerprint, part_ref

if TYPE_CHECKING:
    from cakep2p.node import Node

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0   # a stage silent for 3 intervals is declared lost
QUIET_S = 1.0       # when waiting for peers: plan once the directory has been quiet this long and the model fits
PROBE_TIMEOUT_S = 2.0
Progress = Callable[[str, int, int], None]   # (what, bytes done, bytes in all)
Notice = Callable[[str], None]


def open_model(node: "Node | None", model_dir: str | Path, *, dtype: str = "auto", device: str = "auto",
               strategy: planner.Strategy = "proportional", context: int | None = None, local: bool = False,
               max_memory: int | None = None, wait_s: float = 0.0, on_progress: Progress | None = None,
               on_notice: Notice | None = None) -> LoadedModel:
    """The model in `model_dir`, planned over `node` and its usable peers (waiting up to `wait_s` for peers).

    A plan with one stage on this node (or local=True, or no node) gives a LocalModel, with no network at all;
    otherwise a ClusterModel. PlanError when the model does not fit what the nodes offer.
    """
    model_dir = Path(model_dir)
    if local or node is None:
        return LocalModel(model_dir, dtype=dtype, device=device, context=context)
    planning = _start_planning(node, model_dir, dtype, strategy, context, max_memory)
    plan, _ = planning.wait_for_plan(wait_s)
    if len(plan.stages) == 1 and plan.stages[0].node_id == node.node_id:
        return LocalModel(model_dir, dtype=dtype, device=device, context=context)
    return ClusterModel(node, model_dir, planning, plan, dtype=dtype, device=device, max_seq_len=planning.context,
                        on_progress=on_progress, on_notice=on_notice)


@dataclass(frozen=True)
class PlannedModel:
    """What plan_model decided: the plan, the model's sizes, the context reserved, and every node considered."""

    plan: planner.Plan
    spec: planner.ModelSpec
    context: int
    nodes: tuple[planner.NodeBudget, ...]


def plan_model(node: "Node", model_dir: str | Path, *, dtype: str = "auto",
               strategy: planner.Strategy = "proportional", context: int | None = None,
               max_memory: int | None = None, wait_s: float = 0.0) -> PlannedModel:
    """The plan open_model would use for `model_dir` now, loading nothing (what `cakep2p plan` prints).

    NotEnoughMemory (a PlanError with the figures) when the model does not fit what the nodes offer.
    """
    planning = _start_planning(node, Path(model_dir), dtype, strategy, context, max_memory)
    plan, nodes = planning.wait_for_plan(wait_s)
    return PlannedModel(plan, planning.spec, planning.context, nodes)


class NotEnoughMemory(PlanError):
    """The model needs more memory than this node and its usable peers offer; carries the planner's figures."""

    def __init__(self, message: str, missing_bytes: int, offered_bytes: int, needed_bytes: int):
        super().__init__(message)
        self.missing_bytes, self.offered_bytes, self.needed_bytes = missing_bytes, offered_bytes, needed_bytes


def _start_planning(node: "Node", model_dir: Path, dtype: str, strategy: str, context: int | None,
                    max_memory: int | None) -> "_Planning":
    if node.capacity is None:
        raise CakeError(f"node {node.name} is not running: start() it before planning a model over the cluster")
    max_seq_len = context_length(ModelArgs.from_dir(model_dir), context)
    return _Planning(node, model_spec(model_dir, dtype), max_seq_len, strategy, max_memory)


class _Planning:
    """Budgets from the node and its directory, and planner.plan over them (PlanError when it does not fit)."""

    def __init__(self, node: "Node", spec: planner.ModelSpec, context: int, strategy: str, max_memory: int | None):
        self.node, self.spec, self.context, self.strategy, self.max_memory = node, spec, context, strategy, max_memory

    def peers(self, exclude: set[str] = frozenset()) -> dict[str, PeerInfo]:
        """Usable peers by node id (a node seen both over mDNS and as a static peer counts once)."""
        peers: dict[str, PeerInfo] = {}
        for peer in self.node.directory.usable():
            if peer.node_id != self.node.node_id and peer.node_id not in exclude and peer.offered_memory > 0:
                peers.setdefault(peer.node_id, peer)
        return peers

    def budgets(self, peers: dict[str, PeerInfo]) -> list[planner.NodeBudget]:
        """This node (its offer capped by max_memory) first, then the peers as the directory announces them."""
        own = self.node.offered_bytes
        if self.max_memory is not None:
            own = min(own, self.max_memory)
        capacity = self.node.capacity
        budgets = [planner.NodeBudget(self.node.node_id, self.node.name, own, capacity.gflops, capacity.bandwidth)]
        budgets += [planner.NodeBudget(peer.node_id, peer.name, peer.offered_memory, peer.gflops, peer.bandwidth)
                    for peer in peers.values()]
        return budgets

    def plan(self, peers: dict[str, PeerInfo]) -> planner.Plan:
        return self._plan(self.budgets(peers))

    def _plan(self, budgets: list[planner.NodeBudget]) -> planner.Plan:
        try:
            return planner.plan(self.spec, budgets, self.node.node_id, self.context, self.strategy)
        except planner.DoesNotFit as error:
            raise NotEnoughMemory(str(error), error.missing_bytes, error.offered_bytes, error.needed_bytes) from None
        except ValueError as error:
            raise PlanError(f"cannot plan {self.spec.name}: {error}") from None

    def wait_for_plan(self, wait_s: float) -> tuple[planner.Plan, tuple[planner.NodeBudget, ...]]:
        """Plan once the model fits and no peer came or changed for QUIET_S (or at the deadline: the last error).

        Returns the plan and the nodes it was made over.
        """
        changed = threading.Event()
        listener = lambda event, peer: changed.set()  # noqa: E731
        self.node.directory.add_listener(listener)
        deadline = time.monotonic() + max(0.0, wait_s)
        try:
            while True:
                changed.clear()
                budgets = tuple(self.budgets(self.peers()))
                try:
                    plan, error = self._plan(list(budgets)), None
                except PlanError as failure:
                    plan, error = None, failure
                left = deadline - time.monotonic()
                if left <= 0:
                    if error is not None:
                        raise error
                    return plan, budgets
                quiet = not changed.wait(min(left, QUIET_S))
                if quiet and plan is not None:
                    return plan, budgets
        finally:
            self.node.directory.remove_listener(listener)


class ClusterModel:
    """A LoadedModel whose layers run on the stages of `plan`; one RemotePipeline per session, parts shared."""

    def __init__(self, node: "Node", model_dir: Path, planning: _Planning, plan: planner.Plan, *, dtype: str,
                 device: str, max_seq_len: int, on_progress: Progress | None = None,
                 on_notice: Notice | None = None) -> None:
        self.node, self.model_dir, self.name = node, model_dir, model_dir.name
        self.args = ModelArgs.from_dir(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.max_seq_len, self.dtype, self.device = max_seq_len, dtype, device
        self.fingerprint = model_fingerprint(model_dir)
        self.on_progress, self.on_notice = on_progress, on_notice
        self.notices: list[str] = []
        self._planning = planning
        self._lock = threading.RLock()
        self._local_parts: dict[PartSpec, ModelPart] = {}
        self._lost: set[str] = set()
        self._peers: dict[str, PeerInfo] = {}
        self._loaded: set[tuple[str, int, PartSpec]] = set()  # remote parts to unload on close
        self._use_plan(plan)

    def _use_plan(self, plan: planner.Plan) -> None:
        self.plan = plan
        planned = {stage.node_id for stage in plan.stages} - {self.node.node_id}
        peers = self._planning.peers(self._lost)
        missing = planned - set(peers) - set(self._peers)
        if missing:
            raise MeshError(f"node {sorted(missing)[0]} left before the model was loaded; try again")
        self._peers.update({node_id: peers[node_id] for node_id in planned if node_id in peers})

    def _local_part(self, spec: PartSpec) -> ModelPart:
        if spec not in self._local_parts:
            self._local_parts[spec] = ModelPart.load(self.model_dir, spec, dtype=self.dtype, device=self.device)
        return self._local_parts[spec]

    def _stages(self) -> list[Stage]:
        with self._lock:
            endpoints = {node_id: (peer.address, peer.port) for node_id, peer in self._peers.items()}
            stages = stages_for_plan(self.plan, endpoints, self.node.node_id, self._local_part)
            self._loaded.update((stage.address, stage.port, stage.part) for stage in stages
                                if isinstance(stage, RemoteStage))
        return stages

    def new_pipeline(self) -> RemotePipeline:
        """A fresh session over the current plan's stages (loading, or sending, their parts on first use)."""
        stages = self._stages()
        for attempt in range(2):
            try:
                return RemotePipeline(stages, self.model_dir, self.max_seq_len, self.node.keys, dtype=self.dtype,
                                      heartbeat_s=HEARTBEAT_S, on_progress=self.on_progress, on_lost=self._on_lost)
            except StageRefused:
                raise
            except MeshError as error:  # a peer died between planning and loading: re-plan once
                replacement = self._on_lost(error, stages) if attempt == 0 else None
                if not replacement:
                    raise
                stages = list(replacement)
        raise AssertionError("unreachable")

    def _on_lost(self, error: MeshError, stages: list[Stage]) -> list[Stage] | None:
        """RemotePipeline's on_lost: find the silent stages, re-plan without their nodes, return the new stages."""
        dead = [stage for stage in stages if isinstance(stage, RemoteStage) and not _answers(stage, self.node.keys)]
        if not dead:
            return None
        with self._lock:
            by_endpoint = {(peer.address, peer.port): node_id for node_id, peer in self._peers.items()}
            lost = {by_endpoint.get((stage.address, stage.port), f"{stage.address}:{stage.port}") for stage in dead}
            names = ", ".join(sorted({stage.name or f"{stage.address}:{stage.port}" for stage in dead}))
            self._lost |= lost
            if any(stage.node_id in self._lost for stage in self.plan.stages):
                try:
                    self._use_plan(self._planning.plan(self._planning.peers(self._lost)))
                except PlanError as failure:
                    raise MeshError(f"peer {names} lost and the rest of the cluster cannot hold the model: "
                                    f"{failure}") from None
            before = set(self._loaded)
            stages = self._stages()
            wanted = {(stage.address, stage.port, stage.part) for stage in stages if isinstance(stage, RemoteStage)}
            stale = before - wanted - {entry for entry in before if (entry[0], entry[1]) in self._lost_endpoints()}
            self._loaded -= stale
            remaining = ", ".join(dict.fromkeys(stage.name for stage in self.plan.stages))
        self._unload(stale)  # the survivors' old parts make room for the layers they take over
        self._notice(f"peer {names} lost; continuing on {remaining}")
        return stages

    def _lost_endpoints(self) -> set[tuple[str, int]]:
        return {(peer.address, peer.port) for node_id, peer in self._peers.items() if node_id in self._lost}

    def _notice(self, text: str) -> None:
        self.notices.append(text)
        log.log(logging.INFO if self.on_notice is not None else logging.WARNING, "%s", text)
        if self.on_notice is not None:
            self.on_notice(text)

    def describe(self) -> dict:
        stages = []
        for stage in self.plan.stages:
            peer = self._peers.get(stage.node_id)
            stages.append({"node": stage.node_id, "name": stage.name, "start": stage.start, "end": stage.end,
                           "bytes": stage.bytes, "holds_embedding": stage.holds_embedding,
                           "holds_head": stage.holds_head, "address": peer.address if peer else "local",
                           "port": peer.port if peer else self.node.port})
        dtype = str(resolve_dtype(self.dtype, self.args)).removeprefix("torch.")
        return {"name": self.name, "layers": self.args.num_layers, "dtype": dtype, "context": self.max_seq_len,
                "strategy": self.plan.strategy, "stages": stages}

    def close(self) -> None:
        """Unload this model's parts on the peers still alive (their caches on disk stay) and free ours."""
        with self._lock:
            loaded, self._loaded = self._loaded, set()
            self._local_parts.clear()
        self._unload(loaded)

    def _unload(self, parts: set[tuple[str, int, PartSpec]]) -> None:
        lost = self._lost_endpoints()
        for address, port, spec in sorted(parts, key=lambda item: (item[0], item[1], item[2].start)):
            if (address, port) in lost:
                continue
            client = StageClient(address, port, self.node.keys, heartbeat_s=0.5, timeout_s=5.0)
            try:
                client.request(wire.Unload(part=part_ref(self.fingerprint, spec)), timeout_s=5.0)
            except MeshError as error:  # gone or already unloaded: nothing more to free there
                log.info("could not unload layers %d-%d on %s:%d: %s", spec.start, spec.end, address, port, error)
            finally:
                client.close()


def _answers(stage: RemoteStage, keys) -> bool:
    client = StageClient(stage.address, stage.port, keys, name=stage.name, heartbeat_s=PROBE_TIMEOUT_S / 3,
                         timeout_s=PROBE_TIMEOUT_S)
    try:
        client.ping(PROBE_TIMEOUT_S)
        return True
    except MeshError:
        return False
    finally:
        client.close()
