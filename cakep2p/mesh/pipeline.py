"""The engine's Pipeline over remote stages (and optionally this node's own parts): one session, its KV caches on
the stages, token by token through them in order, consecutive remote stages passing hidden states straight on to
one another (chain.py); on a lost stage, or one that refuses for want of room, it moves to new stages and replays
exactly. What the stages keep for it is held under a Lease (lease.py).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import zmq

from cakep2p import planner, wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.generate import decode_each
from cakep2p.engine.model import ModelPart
from cakep2p.engine.speculative import MAX_DRAFT
from cakep2p.errors import MeshError
from cakep2p.mesh.chain import chain_enabled, chainable, forward_chain, relay_address
from cakep2p.mesh.client import REPLAN_CODES, StageClient, StageRefused
from cakep2p.mesh.lease import Lease
from cakep2p.mesh.transfer import PartOffer, load_part
from cakep2p.planner import LayerRange
from cakep2p.security import ClusterKeys

log = logging.getLogger(__name__)
REMOTE_MAX_DRAFT = 8   # draft tokens per verify pass over remote stages (see RemotePipeline.max_draft)


@dataclass(frozen=True)
class RemoteStage:
    """A stage on a StageServer: which layers (and embedding/head) it runs, and where it listens."""

    address: str
    port: int
    layers: LayerRange
    name: str = ""


PipelineStage = RemoteStage | ModelPart  # a ModelPart runs in-process (the initiator's own share)
# (why, stages) -> new stages; `why` is a lost stage's MeshError or a StageRefused with a code in REPLAN_CODES
Replan = Callable[[MeshError, list[PipelineStage]], Sequence[PipelineStage] | None]


class RemotePipeline:
    """The engine's Pipeline over remote (and optionally local) stages; one session, its caches on the stages.

    `history` is the token ids now in the caches; `rebuild(new_stages)` reloads the model on a new set of stages
    and replays that history (in the same chunks, so the caches are bit-identical) to continue a generation.
    Without a `lease` the pipeline has its own, renewed while it is open; with one (a model's), its holder renews it.
    `chain` (default: unless CAKEP2P_CHAIN=0): consecutive remote stages relay to one another, and a run of them
    counts as one in `stage_seconds` (its time is on its first stage); else every hidden state comes back here.
    """

    def __init__(self, stages: Sequence[PipelineStage], checkpoint: Checkpoint, max_seq_len: int,
                 keys: ClusterKeys | None, *, weights: str, dtype: str = "auto", heartbeat_s: float = 1.0,
                 timeout_s: float = 300.0,
                 allow_transfer: bool = True, on_progress: Callable[[str, int, int], None] | None = None,
                 on_lost: Replan | None = None, max_recoveries: int = 3, context: zmq.Context | None = None,
                 lease: Lease | None = None, chain: bool | None = None) -> None:
        self.checkpoint = checkpoint
        self.chain = chain_enabled() if chain is None else chain
        self.fingerprint = checkpoint.fingerprint
        self.args = checkpoint.args  # the shapes stage replies are checked against
        self.max_seq_len = max_seq_len
        self.keys, self.dtype, self.weights = keys, dtype, weights
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self.allow_transfer, self.on_progress = allow_transfer, on_progress
        self.on_lost, self.max_recoveries = on_lost, max_recoveries
        self.recoveries: list[str] = []  # one line per recovery, for the caller's notice
        self._context = context
        self._own_lease = lease is None   # kept alive here while open; a given lease is its holder's to keep
        self.lease = lease or Lease()
        self.session_id = uuid.uuid4().hex
        self.load_sources: list[str] = []
        self.stage_seconds: list[float] = []
        self._chunks: list[tuple[int, list[int], bool]] = []  # (start_pos, token ids, every_position), in order
        self._history: list[int] = []
        self._step = 0
        self._stages: list[PipelineStage] = []
        self._clients: list[StageClient | None] = []
        self._caches: list[object | None] = []
        self._dtypes: list[torch.dtype | None] = []  # each stage's compute dtype: hidden states are sent in it
        self._refs: list[wire.PartRef | None] = []   # each remote stage's part, by content
        self._runs: list[tuple[int, int]] = []       # (first, last) stage indexes run by one request (or in-process)
        self._relay_addresses: list[str | None] = []  # each remote stage's IP as the others reach it (chain.py)
        self._attach(stages)

    @property
    def history(self) -> list[int]:
        """The token ids whose keys and values are in the caches now, position by position."""
        return list(self._history)

    @property
    def stages(self) -> list[PipelineStage]:
        return list(self._stages)

    def _attach(self, stages: Sequence[PipelineStage]) -> None:
        _check_stages(stages)
        self._stages, self._clients, self._caches, self._dtypes, self.load_sources = [], [], [], [], []
        self._refs = []
        try:
            for stage in stages:
                self._stages.append(stage)
                if isinstance(stage, ModelPart):
                    self._clients.append(None)
                    self._caches.append(stage.new_cache(self.max_seq_len))
                    self._dtypes.append(stage.dtype)
                    self._refs.append(None)
                    self.load_sources.append("local")
                    continue
                client = StageClient(stage.address, stage.port, self.keys, name=stage.name,
                                     heartbeat_s=self.heartbeat_s, timeout_s=self.timeout_s, context=self._context,
                                     lease=self.lease)
                self._clients.append(client)
                if self._own_lease:
                    self.lease.keep(client)
                self._caches.append(None)
                self._dtypes.append(None)
                progress = None
                if self.on_progress is not None:
                    progress = lambda sent, total, label=client.label: self.on_progress(label, sent, total)
                offer = PartOffer.of(self.checkpoint, stage.layers, self.weights)
                self._refs.append(offer.ref)
                reply = load_part(client, offer, max_seq_len=self.max_seq_len, dtype=self.dtype,
                                  allow_transfer=self.allow_transfer, on_progress=progress)
                self.load_sources.append(reply.source)
                self._dtypes[-1] = wire.DTYPES[reply.dtype]
        except BaseException:
            self._close_clients(end_session=False)
            raise
        self.stage_seconds = [0.0] * len(self._stages)
        self._runs = self._plan_runs()

    def _plan_runs(self) -> list[tuple[int, int]]:
        """Each in-process stage alone; consecutive remote ones as one run when they can relay to one another."""
        self._relay_addresses = [relay_address(client.address) if client is not None else None
                                 for client in self._clients]   # names resolved once, not per token
        runs: list[tuple[int, int]] = []
        for index, client in enumerate(self._clients):
            if runs and client is not None and self.chain and self._clients[runs[-1][1]] is not None:
                if chainable(self._relay_addresses[runs[-1][0]:index + 1]):
                    runs[-1] = (runs[-1][0], index)
                    continue
            runs.append((index, index))
        return runs

    def forward(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        return self._forward(token_ids, start_pos, every_position=False)[-1]

    @property
    def max_draft(self) -> int:
        """Draft tokens speculation proposes per verify pass: more than in-process, where a pass costs round trips
        (SmolLM2 over 2 ms links: 1.54x with 4, bench/lan_bench.py)."""
        return REMOTE_MAX_DRAFT if any(client is not None for client in self._clients) else MAX_DRAFT

    def forward_all(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        """Float32 logits [T, vocab] of every position, each with the bits of forwarding it alone, in one pass:
        every stage runs all positions at once (engine decode_each; a remote one in an every-position forward)."""
        return self._forward(token_ids, start_pos, every_position=True)

    def _forward(self, token_ids: list[int], start_pos: int, every_position: bool) -> torch.Tensor:
        if not token_ids:
            raise ValueError("forward needs at least one token")
        if start_pos < 0 or start_pos + len(token_ids) > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + len(token_ids)} exceed the context "
                             f"of {self.max_seq_len} tokens")
        if start_pos > len(self._history):
            raise ValueError(f"start_pos {start_pos} is beyond the {len(self._history)} tokens in the caches")
        self._forget_from(start_pos)  # a reused prefix: what follows it is overwritten, never to be replayed
        move_to: Sequence[PipelineStage] | None = None
        for attempt in itertools.count():
            try:
                if move_to is not None:
                    self.rebuild(move_to)
                logits = self._run(list(token_ids), start_pos, every_position)
                break
            except StageRefused as refusal:
                if refusal.code in REPLAN_CODES:   # no room there now: another plan may have some
                    move_to = self._recover(refusal, attempt)
                    continue
                if refusal.code not in ("unknown_session", "unknown_part") or attempt >= self.max_recoveries:
                    raise
                self.recoveries.append(f"{refusal}; replaying the session on the same stages")
                move_to = self.stages  # the stage restarted or expired the session: refill its cache
            except MeshError as error:
                move_to = self._recover(error, attempt)
        self._chunks.append((start_pos, list(token_ids), every_position))
        self._history.extend(token_ids)
        return logits

    def _recover(self, error: MeshError, attempt: int) -> Sequence[PipelineStage]:
        """The stages on_lost offers after `error`; raises `error` when there is no way on."""
        recoverable = self.on_lost is not None and attempt < self.max_recoveries
        move_to = self.on_lost(error, self.stages) if recoverable else None
        if not move_to:
            raise error
        self.recoveries.append(f"{error}; continuing on {len(move_to)} stages")
        log.warning("%s; moving the session to %d stages", error, len(move_to))
        return move_to

    def _forget_from(self, position: int) -> None:
        """Drop the history from `position` on, and every recorded chunk that starts there or later. A chunk across
        `position` is kept whole: replayed as it ran, it writes the same bits below `position` (a shorter chunk
        might not), and the next forward overwrites what it writes from `position` on."""
        del self._history[position:]
        self._chunks = [chunk for chunk in self._chunks if chunk[0] < position]

    def _run(self, token_ids: list[int], start_pos: int, every_position: bool = False) -> torch.Tensor:
        """Logits [T, vocab] of every position with `every_position`, else [1, vocab] of the last."""
        x = torch.tensor(token_ids, dtype=torch.int64)
        self._step += 1
        for first, last in self._runs:
            began = time.perf_counter()
            stage = self._stages[first]
            if self._clients[first] is None and every_position:
                x = decode_each(stage, x, start_pos, self._caches[first])
            elif self._clients[first] is None:
                x = stage(x, start_pos, self._caches[first], last_only=stage.layers.has_head)
            else:
                if not stage.layers.has_embedding and x.dtype != self._dtypes[first]:
                    x = x.to(self._dtypes[first])  # stages may hold different dtypes (e.g. a GPU in bf16)
                x = self._remote_forward(first, last, start_pos, x, every_position)
            self.stage_seconds[first] += time.perf_counter() - began
        return x.float()

    def _remote_forward(self, first: int, last: int, start_pos: int, x: torch.Tensor,
                        every_position: bool) -> torch.Tensor:
        width = self.args.vocab_size if self._stages[last].layers.has_head else self.args.hidden_size
        if first == last:
            return self._clients[first].forward(self.session_id, self._refs[first], self._step, start_pos, x,
                                                width=width, dtype=self._dtypes[first], every_position=every_position)
        span = slice(first, last + 1)
        return forward_chain(self._clients[span], self._relay_addresses[span], self._refs[span], self._dtypes[span],
                             self.lease.owner, self.session_id, self._step, start_pos, x, width=width,
                             every_position=every_position, timeout_s=self.timeout_s)

    def rebuild(self, new_stages: Sequence[PipelineStage], exact: bool = True) -> None:
        """Move the session to `new_stages` (e.g. after a peer was lost): load the parts, then refill the caches.

        exact=True replays every forward in its original chunks (caches bit-identical to an undisturbed run, so
        greedy output is too); exact=False replays the history as one prefill (faster, may differ in the last bits).
        """
        self._close_clients(end_session=True)
        self.session_id = uuid.uuid4().hex
        self._attach(new_stages)
        if not exact and self._history:
            self._chunks = [(0, list(self._history), False)]
        for start_pos, token_ids, every_position in self._chunks:
            self._run(token_ids, start_pos, every_position)

    def close(self) -> None:
        self._close_clients(end_session=True)
        self._caches = []

    def _close_clients(self, end_session: bool) -> None:
        for client in self._clients:
            if client is None:
                continue
            self.lease.release(client)
            if end_session and not client.lost:
                try:
                    client.end_session(self.session_id, timeout_s=min(5.0, self.timeout_s))
                except MeshError as error:  # the stage may be gone; its session expires by itself
                    log.info("could not end session on %s: %s", client.label, error)
            client.close()
        self._clients = []


def stages_for_plan(plan: planner.Plan, endpoints: Mapping[str, tuple[str, int]], local_node_id: str | None = None,
                    load_local: Callable[[LayerRange], ModelPart] | None = None) -> list[PipelineStage]:
    """The pipeline stages of a planner.Plan, in order.

    `endpoints` maps node ids to the (address, port) their StageServer listens on. The planner gives the initiator's
    stage both the embedding and the head (a ring): its head becomes a last, layer-less stage on the same node, so
    the hidden state comes back to it. Stages on `local_node_id` run in-process as `load_local(layers)` when given.
    """
    stages: list[PipelineStage] = []
    tail: list[PipelineStage] = []
    num_layers = max(stage.layers.end for stage in plan.stages)
    for index, stage in enumerate(plan.stages):
        last = index == len(plan.stages) - 1
        held = stage.layers
        layers = LayerRange(held.start, held.end, held.has_embedding, held.has_head and last)
        stages.append(_plan_stage(stage, layers, endpoints, local_node_id, load_local))
        if held.has_head and not last:
            tail.append(_plan_stage(stage, LayerRange(num_layers, num_layers, False, True), endpoints, local_node_id,
                                    load_local))
    return stages + tail


def _plan_stage(stage: planner.Stage, layers: LayerRange, endpoints: Mapping[str, tuple[str, int]],
                local_node_id: str | None, load_local: Callable[[LayerRange], ModelPart] | None) -> PipelineStage:
    if stage.node_id == local_node_id and load_local is not None:
        return load_local(layers)
    if stage.node_id not in endpoints:
        raise MeshError(f"no address known for node {stage.name}; check `cakep2p peers` and re-plan")
    address, port = endpoints[stage.node_id]
    return RemoteStage(address, port, layers, stage.name)


def _check_stages(stages: Sequence[PipelineStage]) -> None:
    ranges = [stage.layers for stage in stages]
    if not ranges or not ranges[0].has_embedding or not ranges[-1].has_head:
        raise MeshError("a pipeline's first stage must hold the embedding and its last the head; re-plan")
    for before, after in zip(ranges, ranges[1:]):
        if before.has_head or after.has_embedding or before.end != after.start:
            raise MeshError(f"stages {before.describe()} and {after.describe()} do not follow one another; re-plan")
