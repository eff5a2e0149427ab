"""The initiator's side of the mesh: a DEALER per stage (heartbeats, timeouts) and RemotePipeline, the engine's
Pipeline over remote stages. What both sides share about weights (fingerprints, the parts cache) is in weights.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import zmq

from cakep2p import security, wire
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.part import ModelPart, PartSpec
from cakep2p.errors import MeshError, ProtocolError
from cakep2p.security import ClusterKeys
from cakep2p.weights import Progress, model_fingerprint, part_ref, send_part_tensors

__all__ = ["StageRefused", "StageClient", "RemoteStage", "Stage", "RemotePipeline", "stages_for_plan", "ping"]

log = logging.getLogger(__name__)

PROTOCOL_CODES = ("bad_request", "unsupported_version", "shape_mismatch")


class StageRefused(MeshError):
    """A stage answered with an error reply; `code` is the wire error code."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class StageClient:
    """A DEALER connected to one stage server; request/response with ids, heartbeats and timeouts.

    Thread-safe (one request at a time). Liveness: any frame from the stage counts; while waiting, a heartbeat is
    sent every `heartbeat_s` of silence and the stage is declared lost after `liveness` silent intervals.
    """

    def __init__(self, address: str, port: int, keys: ClusterKeys | None, *, name: str = "",
                 heartbeat_s: float = 1.0, liveness: int = 3, timeout_s: float = 300.0,
                 context: zmq.Context | None = None) -> None:
        self.address, self.port, self.keys = address, port, keys
        self.label = name or f"{address}:{port}"
        self.heartbeat_s, self.liveness, self.timeout_s = heartbeat_s, liveness, timeout_s
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._backoff_s = 0.0
        self._reconnect_at = 0.0
        self.lost = False  # declared dead (silent for `liveness` intervals) and not heard from since

    def __repr__(self) -> str:
        return f"StageClient({self.label!r})"

    # -- connection -----------------------------------------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            wait = self._reconnect_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # capped exponential backoff after a lost connection
            socket = self._context.socket(zmq.DEALER)
            socket.linger = 0
            socket.reconnect_ivl = 100
            socket.reconnect_ivl_max = 2000
            socket.maxmsgsize = wire.MAX_FRAME_BYTES
            security.configure_client(socket, self.keys)
            host = f"[{self.address}]" if ":" in self.address else self.address
            socket.connect(f"tcp://{host}:{self.port}")
            self._socket = socket
        return self._socket

    def _drop(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self.lost = True
        self._backoff_s = min(2.0, max(0.1, self._backoff_s * 2))
        self._reconnect_at = time.monotonic() + self._backoff_s

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None

    # -- requests -------------------------------------------------------------------------------------------

    def request(self, message: wire.Message, timeout_s: float | None = None) -> wire.Message:
        """Send `message` and return the stage's reply; MeshError if the stage is lost or too slow,
        StageRefused (or ProtocolError for malformed-request codes) if it answers with an error."""
        with self._lock:
            socket = self._connect()
            request_id = next(self._request_ids)
            try:
                frames = wire.encode(dataclasses.replace(message, request_id=request_id))
            except wire.WireError as error:
                raise ProtocolError(f"cannot send {message.type} to stage {self.label}: {error}") from None
            socket.send_multipart(frames, copy=False)
            reply = self._await_reply(socket, request_id, timeout_s or self.timeout_s, message.type)
        if isinstance(reply, wire.Error):
            text = f"stage {self.label} refused {message.type}: {reply.message}"
            if reply.code in PROTOCOL_CODES:
                raise ProtocolError(text)
            raise StageRefused(text, reply.code)
        return reply

    def _await_reply(self, socket: zmq.Socket, request_id: int, timeout_s: float, op: str) -> wire.Message:
        started = last_heard = time.monotonic()
        while True:
            now = time.monotonic()
            if now - started > timeout_s:
                raise MeshError(f"stage {self.label} at {self.address}:{self.port} lost: no reply to {op} "
                                f"within {timeout_s:.0f} s")
            if now - last_heard > self.liveness * self.heartbeat_s:
                self._drop()
                raise MeshError(f"stage {self.label} at {self.address}:{self.port} lost: silent for "
                                f"{now - last_heard:.1f} s")
            if not socket.poll(int(self.heartbeat_s * 1000)):
                socket.send_multipart(wire.encode(wire.Heartbeat(request_id=0)))
                continue
            frames = socket.recv_multipart(copy=False)
            last_heard = time.monotonic()
            self._backoff_s, self.lost = 0.0, False
            try:
                reply = wire.decode(frames)
            except wire.WireError as error:
                raise ProtocolError(f"stage {self.label} sent a malformed reply ({error}); "
                                    "run the same cakep2p version on every node") from None
            if reply.request_id == request_id and not isinstance(reply, wire.Heartbeat):
                return reply

    def ping(self, timeout_s: float | None = None) -> wire.Pong:
        reply = self.request(wire.Ping(), timeout_s)
        if not isinstance(reply, wire.Pong):
            raise ProtocolError(f"stage {self.label} answered ping with {reply.type}")
        return reply

    def forward(self, session_id: str, part: wire.PartRef, step: int, start_pos: int, inputs: torch.Tensor,
                *, width: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Run `inputs` through the stage's part. The reply must be float32 logits [1, width] from a head, else
        hidden states [positions, width] in `dtype` (width and dtype checked when given); ProtocolError if not."""
        reply = self.request(wire.Forward(session_id=session_id, part=part, step=step, start_pos=start_pos,
                                          positions=inputs.shape[0], tensor=inputs))
        if not isinstance(reply, wire.ForwardResult) or reply.session_id != session_id or reply.step != step:
            raise ProtocolError(f"stage {self.label} answered forward with {reply.type} for another request")
        rows, dtype = (1, torch.float32) if part.has_head else (inputs.shape[0], dtype)
        tensor = reply.tensor
        if (tensor.shape[0] != rows or (width is not None and tensor.shape[1] != width)
                or (dtype is not None and tensor.dtype != dtype)):
            expected = f"{wire.DTYPE_NAMES[dtype] if dtype is not None else ''}[{rows}, {width or 'width'}]"
            raise ProtocolError(f"stage {self.label} answered forward with {wire.DTYPE_NAMES[tensor.dtype]}"
                                f"{list(tensor.shape)}, expected {expected}; run the same model on every node")
        return tensor

    def end_session(self, session_id: str, timeout_s: float | None = None) -> None:
        self.request(wire.EndSession(session_id=session_id), timeout_s)

    def unload(self, part: wire.PartRef) -> None:
        self.request(wire.Unload(part=part))

    def load_part(self, model_dir: str | Path, spec: PartSpec, *, max_seq_len: int, dtype: str = "auto",
                  fingerprint: str | None = None, allow_transfer: bool = True,
                  on_progress: Progress | None = None) -> wire.LoadReply:
        """Make the stage hold `spec` of the model in `model_dir` (a local folder of the initiator).

        The stage uses its own copy when it has one; otherwise (if allowed) exactly the part's tensors are streamed
        to it. The reply says where its weights came from (memory, cache, models_dir, transfer) and their dtype.
        """
        model_dir = Path(model_dir)
        fingerprint = fingerprint or model_fingerprint(model_dir)
        ref = part_ref(fingerprint, spec)
        config_json = (model_dir / "config.json").read_text(encoding="utf-8") if allow_transfer else ""
        model_name = "".join(char for char in model_dir.name if char.isprintable())[:128]
        reply = self.request(wire.LoadPart(part=ref, model_name=model_name, dtype=dtype,
                                           max_seq_len=max_seq_len, source="transfer" if allow_transfer else "local",
                                           config_json=config_json))
        if isinstance(reply, wire.LoadReply) and reply.status == "send":
            reply = send_part_tensors(self, model_dir, ref, on_progress)
        if not isinstance(reply, wire.LoadReply) or reply.status != "ready":
            raise ProtocolError(f"stage {self.label} did not confirm loading layers {ref.start}-{ref.end}")
        return reply


# -- the pipeline ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteStage:
    """A stage on a StageServer: which layers (and embedding/head) it runs, and where it listens."""

    address: str
    port: int
    part: PartSpec
    name: str = ""


Stage = RemoteStage | ModelPart  # a ModelPart runs in-process (the initiator's own share)
Replan = Callable[[MeshError, list[Stage]], Sequence[Stage] | None]  # (why, current stages) -> new stages


class RemotePipeline:
    """The engine's Pipeline over remote (and optionally local) stages; one session, its caches on the stages.

    `history` is the token ids now in the caches; `rebuild(new_stages)` reloads the model on a new set of stages
    and replays that history (in the same chunks, so the caches are bit-identical) to continue a generation.
    """

    def __init__(self, stages: Sequence[Stage], model_dir: str | Path, max_seq_len: int, keys: ClusterKeys | None,
                 *, dtype: str = "auto", heartbeat_s: float = 1.0, timeout_s: float = 300.0,
                 allow_transfer: bool = True, on_progress: Callable[[str, int, int], None] | None = None,
                 on_lost: Replan | None = None, max_recoveries: int = 3, context: zmq.Context | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.fingerprint = model_fingerprint(self.model_dir)
        self.args = ModelArgs.from_dir(self.model_dir)  # the shapes stage replies are checked against
        self.max_seq_len = max_seq_len
        self.keys, self.dtype = keys, dtype
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self.allow_transfer, self.on_progress = allow_transfer, on_progress
        self.on_lost, self.max_recoveries = on_lost, max_recoveries
        self.recoveries: list[str] = []  # one line per recovery, for the caller's notice
        self._context = context
        self.session_id = uuid.uuid4().hex
        self.load_sources: list[str] = []
        self.stage_seconds: list[float] = []
        self._chunks: list[tuple[int, list[int]]] = []  # (start_pos, token ids) of each forward, in order
        self._history: list[int] = []
        self._step = 0
        self._stages: list[Stage] = []
        self._clients: list[StageClient | None] = []
        self._caches: list[object | None] = []
        self._dtypes: list[torch.dtype | None] = []  # each stage's weight dtype: hidden states are sent in it
        self._attach(stages)

    @property
    def history(self) -> list[int]:
        """The token ids whose keys and values are in the caches now, position by position."""
        return list(self._history)

    @property
    def stages(self) -> list[Stage]:
        return list(self._stages)

    def _attach(self, stages: Sequence[Stage]) -> None:
        _check_stages(stages)
        self._stages, self._clients, self._caches, self._dtypes, self.load_sources = [], [], [], [], []
        try:
            for stage in stages:
                self._stages.append(stage)
                if isinstance(stage, ModelPart):
                    self._clients.append(None)
                    self._caches.append(stage.new_cache(self.max_seq_len))
                    self._dtypes.append(stage.dtype)
                    self.load_sources.append("local")
                    continue
                client = StageClient(stage.address, stage.port, self.keys, name=stage.name,
                                     heartbeat_s=self.heartbeat_s, timeout_s=self.timeout_s, context=self._context)
                self._clients.append(client)
                self._caches.append(None)
                self._dtypes.append(None)
                progress = None
                if self.on_progress is not None:
                    progress = lambda sent, total, label=client.label: self.on_progress(label, sent, total)
                reply = client.load_part(self.model_dir, stage.part, max_seq_len=self.max_seq_len, dtype=self.dtype,
                                         fingerprint=self.fingerprint, allow_transfer=self.allow_transfer,
                                         on_progress=progress)
                self.load_sources.append(reply.source)
                self._dtypes[-1] = wire.DTYPES[reply.dtype]
        except BaseException:
            self._close_clients(end_session=False)
            raise
        self.stage_seconds = [0.0] * len(self._stages)

    def forward(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        if not token_ids:
            raise ValueError("forward needs at least one token")
        if start_pos < 0 or start_pos + len(token_ids) > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + len(token_ids)} exceed the context "
                             f"of {self.max_seq_len} tokens")
        if start_pos > len(self._history):
            raise ValueError(f"start_pos {start_pos} is beyond the {len(self._history)} tokens in the caches")
        self._forget_from(start_pos)  # a reused prefix: what follows it is overwritten, never to be replayed
        move_to: Sequence[Stage] | None = None
        for attempt in itertools.count():
            try:
                if move_to is not None:
                    self.rebuild(move_to)
                logits = self._run(list(token_ids), start_pos)
                break
            except StageRefused as refusal:
                if refusal.code not in ("unknown_session", "unknown_part") or attempt >= self.max_recoveries:
                    raise
                self.recoveries.append(f"{refusal}; replaying the session on the same stages")
                move_to = self.stages  # the stage restarted or expired the session: refill its cache
            except MeshError as error:
                recoverable = self.on_lost is not None and attempt < self.max_recoveries
                move_to = self.on_lost(error, self.stages) if recoverable else None
                if not move_to:
                    raise
                self.recoveries.append(f"{error}; continuing on {len(move_to)} stages")
                log.warning("%s; moving the session to %d stages", error, len(move_to))
        self._chunks.append((start_pos, list(token_ids)))
        self._history.extend(token_ids)
        return logits

    def _forget_from(self, position: int) -> None:
        """Drop the history from `position` on, and every recorded chunk that starts there or later. A chunk across
        `position` is kept whole: replayed as it ran, it writes the same bits below `position` (a shorter chunk
        might not), and the next forward overwrites what it writes from `position` on."""
        del self._history[position:]
        self._chunks = [(start_pos, token_ids) for start_pos, token_ids in self._chunks if start_pos < position]

    def _run(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        x = torch.tensor(token_ids, dtype=torch.int64)
        self._step += 1
        for index, (stage, client) in enumerate(zip(self._stages, self._clients)):
            began = time.perf_counter()
            if client is None:
                x = stage(x, start_pos, self._caches[index], last_only=stage.part.has_head)
            else:
                if not stage.part.has_embedding and x.dtype != self._dtypes[index]:
                    x = x.to(self._dtypes[index])  # stages may hold different dtypes (e.g. a GPU in bf16)
                width = self.args.vocab_size if stage.part.has_head else self.args.hidden_size
                x = client.forward(self.session_id, part_ref(self.fingerprint, stage.part), self._step, start_pos, x,
                                   width=width, dtype=self._dtypes[index])
            self.stage_seconds[index] += time.perf_counter() - began
        return x[-1].float()

    def rebuild(self, new_stages: Sequence[Stage], exact: bool = True) -> None:
        """Move the session to `new_stages` (e.g. after a peer was lost): load the parts, then refill the caches.

        exact=True replays every forward in its original chunks (caches bit-identical to an undisturbed run, so
        greedy output is too); exact=False replays the history as one prefill (faster, may differ in the last bits).
        """
        self._close_clients(end_session=True)
        self.session_id = uuid.uuid4().hex
        self._attach(new_stages)
        if not exact and self._history:
            self._chunks = [(0, list(self._history))]
        for start_pos, token_ids in self._chunks:
            self._run(token_ids, start_pos)

    def close(self) -> None:
        self._close_clients(end_session=True)
        self._caches = []

    def _close_clients(self, end_session: bool) -> None:
        for client in self._clients:
            if client is None:
                continue
            if end_session and not client.lost:
                try:
                    client.end_session(self.session_id, timeout_s=min(5.0, self.timeout_s))
                except MeshError as error:  # the stage may be gone; its session expires by itself
                    log.info("could not end session on %s: %s", client.label, error)
            client.close()
        self._clients = []


def stages_for_plan(plan, endpoints: Mapping[str, tuple[str, int]], local_node_id: str | None = None,
                    load_local: Callable[[PartSpec], ModelPart] | None = None) -> list[Stage]:
    """The pipeline stages of a planner.Plan, in order.

    `endpoints` maps node ids to the (address, port) their StageServer listens on. The planner gives the initiator's
    stage both the embedding and the head (a ring): its head becomes a last, layer-less stage on the same node, so
    the hidden state comes back to it. Stages on `local_node_id` run in-process as `load_local(spec)` when given.
    """
    stages: list[Stage] = []
    tail: list[Stage] = []
    num_layers = max(stage.end for stage in plan.stages)
    for index, stage in enumerate(plan.stages):
        last = index == len(plan.stages) - 1
        spec = PartSpec(stage.start, stage.end, stage.holds_embedding, stage.holds_head and last)
        stages.append(_plan_stage(stage, spec, endpoints, local_node_id, load_local))
        if stage.holds_head and not last:
            tail.append(_plan_stage(stage, PartSpec(num_layers, num_layers, False, True), endpoints, local_node_id,
                                    load_local))
    return stages + tail


def _plan_stage(stage, spec: PartSpec, endpoints: Mapping[str, tuple[str, int]], local_node_id: str | None,
                load_local: Callable[[PartSpec], ModelPart] | None) -> Stage:
    if stage.node_id == local_node_id and load_local is not None:
        return load_local(spec)
    if stage.node_id not in endpoints:
        raise MeshError(f"no address known for node {stage.name}; check `cakep2p peers` and re-plan")
    address, port = endpoints[stage.node_id]
    return RemoteStage(address, port, spec, stage.name)


def _check_stages(stages: Sequence[Stage]) -> None:
    specs = [stage.part for stage in stages]
    if not specs or not specs[0].has_embedding or not specs[-1].has_head:
        raise MeshError("a pipeline's first stage must hold the embedding and its last the head; re-plan")
    for before, after in zip(specs, specs[1:]):
        if before.has_head or after.has_embedding or before.end != after.start:
            raise MeshError(f"stages {before} and {after} do not follow one another; re-plan")


async def ping(context, address: str, port: int, keys: ClusterKeys | None, timeout_s: float) -> wire.Pong | None:
    """Ask a stage server for its capabilities from an asyncio loop (`context` is a zmq.asyncio.Context); None when it
    does not answer in time, answers garbage, or refuses our keys (a failed CURVE handshake simply never answers)."""
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.maxmsgsize = 1 << 20
    try:
        security.configure_client(socket, keys)
        socket.connect(f"tcp://{f'[{address}]' if ':' in address else address}:{port}")
        await socket.send_multipart(wire.encode(wire.Ping(request_id=1)))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not await socket.poll(int(left * 1000) + 1):
                break
            try:
                reply = wire.decode(await socket.recv_multipart())
            except wire.WireError:
                return None
            if isinstance(reply, wire.Pong):
                return reply
        return None
    except zmq.ZMQError as error:
        log.debug("ping %s:%d failed: %s", address, port, error)
        return None
    finally:
        socket.close(linger=0)
