"""A model spread over the cluster: its stages run over the mesh (this node's share in-process), one RemotePipeline
per session, and a re-plan over the remaining peers when one is lost mid-chat or refuses for want of room. What the
stages keep for the model is held under one Lease, renewed by a keeper connection per stage while the model is open.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from cakep2p import planner, wire
from cakep2p.cluster.loaded import ModelOptions
from cakep2p.cluster.planning import Planning, PlannedModel
from cakep2p.discovery import PeerInfo
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.dtypes import name_of
from cakep2p.engine.formats import resolve_format
from cakep2p.engine.loading import load_part
from cakep2p.engine.model import ModelPart
from cakep2p.engine.tokenizer import Tokenizer
from cakep2p.errors import MeshError, PlanError
from cakep2p.mesh import PipelineStage, RemotePipeline, RemoteStage, StageClient, StageRefused, stages_for_plan
from cakep2p.mesh.client import REPLAN_CODES
from cakep2p.mesh.lease import Lease
from cakep2p.mesh.transfer import PartOffer
from cakep2p.node import Node
from cakep2p.planner import LayerRange

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0   # a stage silent for 3 intervals is declared lost
PROBE_TIMEOUT_S = 2.0
Progress = Callable[[str, int, int], None]   # (what, bytes done, bytes in all)
Notice = Callable[[str], None]


class ClusterModel:
    """A LoadedModel whose layers run on the stages of `plan`; one RemotePipeline per session, parts shared."""

    def __init__(self, node: Node, checkpoint: Checkpoint, planning: Planning, planned: PlannedModel, *,
                 owns_node: bool = False, on_progress: Progress | None = None,
                 on_notice: Notice | None = None) -> None:
        self.node, self.checkpoint, self.name, self.owns_node = node, checkpoint, checkpoint.name, owns_node
        self.args = checkpoint.args
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        options: ModelOptions = planning.options
        self.max_seq_len, self.dtype, self.device = planned.context, options.dtype, options.device
        self.weights = resolve_format(checkpoint, options.weights, options.dtype)
        self.on_progress, self.on_notice = on_progress, on_notice
        self.notices: list[str] = []
        self._planning = planning
        self._lock = threading.RLock()
        self._lease = Lease()
        self._keepers: dict[tuple[str, int], StageClient] = {}   # one kept-alive connection per stage endpoint
        self._local_parts: dict[LayerRange, ModelPart] = {}
        self._lost: set[str] = set()   # nodes left out of later plans: lost, or refusing for want of room
        self._peers: dict[str, PeerInfo] = {}
        self._loaded: set[tuple[str, int, LayerRange]] = set()  # remote parts to unload on close
        self._use_plan(planned.plan)

    def _use_plan(self, plan: planner.Plan) -> None:
        self.plan = plan
        planned = {stage.node_id for stage in plan.stages} - {self.node.node_id}
        peers = self._planning.peers(self._lost)
        missing = planned - set(peers) - set(self._peers)
        if missing:
            raise MeshError(f"node {sorted(missing)[0]} left before the model was loaded; try again")
        self._peers.update({node_id: peers[node_id] for node_id in planned if node_id in peers})

    def _local_part(self, layers: LayerRange) -> ModelPart:
        if layers not in self._local_parts:
            self._local_parts[layers] = load_part(self.checkpoint, layers, dtype=self.dtype, device=self.device,
                                                  weights=self.weights)
        return self._local_parts[layers]

    def _stages(self) -> list[PipelineStage]:
        with self._lock:
            endpoints = {node_id: (peer.address, peer.port) for node_id, peer in self._peers.items()}
            stages = stages_for_plan(self.plan, endpoints, self.node.node_id, self._local_part)
            remote = [stage for stage in stages if isinstance(stage, RemoteStage)]
            self._loaded.update((stage.address, stage.port, stage.layers) for stage in remote)
            for stage in remote:
                if (stage.address, stage.port) not in self._keepers:
                    keeper = StageClient(stage.address, stage.port, self.node.keys, name=stage.name,
                                         heartbeat_s=HEARTBEAT_S, timeout_s=PROBE_TIMEOUT_S * 3, lease=self._lease)
                    self._keepers[stage.address, stage.port] = keeper
                    self._lease.keep(keeper)
        return stages

    def new_pipeline(self) -> RemotePipeline:
        """A fresh session over the current plan's stages (loading, or sending, their parts on first use)."""
        stages = self._stages()
        for attempt in range(3):
            try:
                return RemotePipeline(stages, self.checkpoint, self.max_seq_len, self.node.keys, weights=self.weights,
                                      dtype=self.dtype, heartbeat_s=HEARTBEAT_S, on_progress=self.on_progress,
                                      on_lost=self._on_lost, lease=self._lease)
            except StageRefused as refusal:   # no room on a peer now: plan over the others
                replacement = self._on_lost(refusal, stages) if refusal.code in REPLAN_CODES and attempt < 2 else None
                if not replacement:
                    raise
                stages = list(replacement)
            except MeshError as error:  # a peer died between planning and loading: re-plan
                replacement = self._on_lost(error, stages) if attempt < 2 else None
                if not replacement:
                    raise
                stages = list(replacement)
        raise AssertionError("unreachable")

    def _troubled(self, error: MeshError, stages: list[PipelineStage]) -> tuple[list[RemoteStage], str]:
        """The stages to plan without after `error`, and what happened to them: the one that refused for want of
        room, or the ones that no longer answer."""
        if isinstance(error, StageRefused) and error.code in REPLAN_CODES and error.endpoint is not None:
            refusing = [stage for stage in stages
                        if isinstance(stage, RemoteStage) and (stage.address, stage.port) == error.endpoint]
            return refusing, f"refused ({_reason(error)})"
        return [stage for stage in stages if isinstance(stage, RemoteStage) and not _answers(stage, self.node.keys)], \
            "lost"

    def _on_lost(self, error: MeshError, stages: list[PipelineStage]) -> list[PipelineStage] | None:
        """RemotePipeline's on_lost: find the silent (or refusing) stages, re-plan without their nodes, return the
        new stages."""
        dead, what = self._troubled(error, stages)
        if not dead:
            return None
        with self._lock:
            by_endpoint = {(peer.address, peer.port): node_id for node_id, peer in self._peers.items()}
            lost = {by_endpoint.get((stage.address, stage.port), f"{stage.address}:{stage.port}") for stage in dead}
            names = ", ".join(sorted({stage.name or f"{stage.address}:{stage.port}" for stage in dead}))
            self._lost |= lost
            if any(stage.node_id in self._lost for stage in self.plan.stages):
                try:
                    planning = self._planning
                    self._use_plan(planning.plan(planning.budgets(planning.peers(self._lost))).plan)
                except PlanError as failure:
                    raise MeshError(f"peer {names} {what} and the rest of the cluster cannot hold the model: "
                                    f"{failure}") from None
            before = set(self._loaded)
            stages = self._stages()
            wanted = {(stage.address, stage.port, stage.layers) for stage in stages if isinstance(stage, RemoteStage)}
            stale = before - wanted - {entry for entry in before if (entry[0], entry[1]) in self._lost_endpoints()}
            self._loaded -= stale
            remaining = ", ".join(dict.fromkeys(stage.name for stage in self.plan.stages))
        self._drop_keepers(self._lost_endpoints())
        self._unload(stale)  # the survivors' old parts make room for the layers they take over
        self._notice(f"peer {names} {what}; continuing on {remaining}")
        return stages

    def _drop_keepers(self, endpoints) -> None:
        with self._lock:
            dropped = [self._keepers.pop(endpoint) for endpoint in list(endpoints) if endpoint in self._keepers]
        for keeper in dropped:
            keeper.close()

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
            stages.append({"node": stage.node_id, "name": stage.name, "start": stage.layers.start,
                           "end": stage.layers.end, "bytes": stage.bytes, "holds_embedding": stage.layers.has_embedding,
                           "holds_head": stage.layers.has_head, "address": peer.address if peer else "local",
                           "port": peer.port if peer else self.node.port})
        local = next(iter(self._local_parts.values()), None)
        dtype = name_of(local.dtype) if local is not None else self.dtype
        return {"name": self.name, "layers": self.args.num_layers, "dtype": dtype, "weights": self.weights,
                "kernel": local.kernel if local is not None else "", "context": self.max_seq_len,
                "strategy": self.plan.strategy, "stages": stages}

    def close(self) -> None:
        """Unload this model's parts on the peers still alive (their caches on disk stay) and free ours; stop the
        node when the model owns it."""
        with self._lock:
            loaded, self._loaded = self._loaded, set()
            self._local_parts.clear()
        try:
            self._unload(loaded)
        finally:
            self._drop_keepers(list(self._keepers))
            self._lease.close()
            if self.owns_node:
                self.node.stop()

    def _unload(self, parts: set[tuple[str, int, LayerRange]]) -> None:
        lost = self._lost_endpoints()
        for address, port, layers in sorted(parts, key=lambda item: (item[0], item[1], item[2].start)):
            if (address, port) in lost:
                continue
            client = StageClient(address, port, self.node.keys, heartbeat_s=0.5, timeout_s=5.0, lease=self._lease)
            try:
                client.request(wire.Unload(part=PartOffer.of(self.checkpoint, layers, self.weights).ref),
                               timeout_s=5.0)
            except MeshError as error:  # gone or already unloaded: nothing more to free there
                log.info("could not unload %s on %s:%d: %s", layers.describe(), address, port, error)
            finally:
                client.close()


def _reason(refusal: StageRefused) -> str:
    return {"over_budget": "no memory to spare", "too_many_sessions": "too many sessions",
            "disk_full": "disk full"}.get(refusal.code, refusal.code)


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
