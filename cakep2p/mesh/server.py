"""A stage server: hosts model parts behind a CURVE ZeroMQ ROUTER and runs forward passes for remote initiators,
with compute on one thread shared fairly between them (compute.py) so pings and heartbeats keep flowing. What it
keeps belongs to an owner, the lease of the connection that asked (sessions.py): nobody else reaches it, and it
all goes within seconds once its owner falls silent. The parts themselves are in its PartStore.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import zmq
import zmq.asyncio

from cakep2p import wire
from cakep2p.engine.sizes import kv_cache_bytes
from cakep2p.errors import CakeError
from cakep2p.mesh.client import layer_range
from cakep2p.mesh.compute import DecodeBatches, FairCompute, checked_inputs, run_forward
from cakep2p.mesh.curve import Authenticator, configure_server
from cakep2p.mesh.lease import chain_grant, owner_tag
from cakep2p.mesh.part_store import TRANSFER_STALL_S, LoadedPart, PartStore, Refusal
from cakep2p.mesh.parts_cache import cache_cap, default_parts_dir
from cakep2p.mesh.relay import Relays, Unreachable
from cakep2p.mesh.sessions import Leases, Owner, Session, Sessions, owner_label, owner_of
from cakep2p.network import endpoint
from cakep2p.security import ClusterKeys, insecure_warning

log = logging.getLogger(__name__)

MAX_EXTRA_TASKS = 8  # requests in flight beyond one per session (loads, transfers) before refusing more
NOT_SERVING = "{op}: this node does not take work now (its owner turned serving off); re-plan without it"
RECEIVE_QUEUE_MESSAGES = 4  # per peer, with ZMQ_MAXMSGSIZE: bounds what a peer can make this node buffer unread
SEND_QUEUE_MESSAGES = 1000  # per peer; a client may pipeline hundreds of requests (tests/test_mesh.py reads 500)


@dataclass(frozen=True)
class StageLimits:
    """What a node lends: memory for weights + KV caches + transfers, how many sessions it keeps, and how long an
    owner may be silent before its sessions, parts and transfers go (lease_s) or a session unused (session_idle_s)."""

    budget_bytes: int
    max_sessions: int = 8
    session_idle_s: float = 600.0
    lease_s: float = 6.0
    max_frame_bytes: int = wire.MAX_FRAME_BYTES


class StageServer:
    """Serves model parts on tcp://address:port; lives on one asyncio loop (start/stop from that loop)."""

    def __init__(self, *, node_id: str, name: str, keys: ClusterKeys | None, limits: StageLimits,
                 address: str = "127.0.0.1", port: int = 0, models_dirs: Sequence[str | Path] = (),
                 parts_dir: str | Path | None = None, device: str = "auto",
                 on_refused: Callable[[str], None] | None = None, serving: bool = True,
                 parts_cache_cap: int | None = None) -> None:
        self.node_id, self.name, self.keys, self.limits = node_id, name, keys, limits
        self.address, self.port = address, port
        self.on_refused = on_refused
        self.serving = serving  # False: refuse new loads, transfers and sessions (running sessions go on)
        self.refused_requests = 0  # malformed or refused messages answered with an error
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-compute")
        self._compute = FairCompute(self._executor)
        # different sessions' one-token steps on a part, waiting together, run as one forward (CAKEP2P_BATCH=0: not)
        self.batches = DecodeBatches() if os.environ.get("CAKEP2P_BATCH", "1") != "0" else None
        self.store = PartStore(parts_dir=Path(parts_dir) if parts_dir is not None else default_parts_dir(),
                               models_dirs=[Path(path) for path in models_dirs], device=device,
                               free_bytes=self.free_bytes, compute=self._compute.run, node_name=lambda: self.name,
                               cache_cap=cache_cap() if parts_cache_cap is None else parts_cache_cap)
        self.sessions = Sessions()
        self.leases = Leases()
        self._tasks: set[asyncio.Task] = set()
        self._owner_tasks: collections.Counter[Owner] = collections.Counter()
        self._context: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._relays: Relays | None = None
        self._authenticator: Authenticator | None = None
        self._log_budget = _LogLimiter()

    # -- life -----------------------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind the ROUTER (CURVE server unless keys is None) and start serving; returns the bound port."""
        self._context = zmq.asyncio.Context()
        router = self._context.socket(zmq.ROUTER)
        router.linger = 0
        router.maxmsgsize = self.limits.max_frame_bytes
        router.sndhwm, router.rcvhwm = SEND_QUEUE_MESSAGES, RECEIVE_QUEUE_MESSAGES
        router.router_handover = 1  # a lease's reconnecting DEALER takes its routing id back at once
        if self.keys is not None:
            self._authenticator = Authenticator(self._context, self.keys, self.on_refused)
        else:
            log.warning(insecure_warning())
        configure_server(router, self.keys)
        if self._authenticator is not None:
            self._authenticator.watch(router)
        try:
            if self.port:
                router.bind(endpoint(self.address, self.port))
            else:
                self.port = router.bind_to_random_port(endpoint(self.address, 0).rsplit(":", 1)[0])
        except zmq.ZMQError as error:
            router.close(linger=0)
            self._shutdown_context()
            raise CakeError(f"cannot listen on {self.address}:{self.port} ({error}); pick another --port") from None
        self._router = router
        self._relays = Relays(self._context, self.keys, self._send)
        self._spawn(self._receive_loop())
        self._spawn(self._expiry_loop())
        log.info("stage server %s listening on %s:%d (%s)", self.name, self.address, self.port,
                 "CURVE" if self.keys else "INSECURE")
        return self.port

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._compute.stop()
        if self._relays is not None:
            await self._relays.close()
            self._relays = None
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        self._shutdown_context()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        self.sessions.drop()

    def _shutdown_context(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def _spawn(self, coroutine, owner: Owner | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if owner is not None:
            self._owner_tasks[owner] += 1
            task.add_done_callback(lambda _: self._owner_tasks.subtract([owner]))

    # -- accounting -----------------------------------------------------------------------------------------

    def set_budget(self, budget_bytes: int) -> None:
        """A new offered memory (e.g. --max-memory changed); applies to later loads and sessions."""
        self.limits = dataclasses.replace(self.limits, budget_bytes=budget_bytes)

    def used_bytes(self) -> int:
        return self.store.used_bytes() + self.sessions.kv_bytes()

    def free_bytes(self) -> int:
        return max(0, self.limits.budget_bytes - self.used_bytes())

    def stats(self) -> dict:
        """A snapshot for status displays and tests."""
        return {"parts": len(self.store.parts), "sessions": len(self.sessions), "kv_bytes": self.sessions.kv_bytes(),
                "used_bytes": self.used_bytes(), "free_bytes": self.free_bytes(),
                "transfers": len(self.store.transfers), "refused_requests": self.refused_requests,
                "owners": len(self.store.owners() | self.sessions.owners())}

    # -- the socket -----------------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._router.recv_multipart(copy=False)
            peer, body = frames[0].bytes, frames[1:]
            owner = owner_of(peer)
            self.leases.heard(owner)   # any frame renews the owner's lease
            try:
                message = wire.decode(body)
            except wire.WireError as error:
                await self._refuse(peer, error.request_id, error.code, f"malformed request: {error}")
                continue
            try:
                await self._dispatch(peer, owner, message)
            except wire.WireError as error:  # e.g. a reply that fails to encode: answer, keep serving
                await self._refuse(peer, message.request_id, error.code, str(error))
            except Exception as error:  # noqa: BLE001  (one request's failure must not end the server)
                log.exception("stage server failed on %s", message.type)
                await self._refuse(peer, message.request_id, "internal", f"{message.type} failed: "
                                                                          f"{type(error).__name__}")

    async def _send(self, peer: bytes, message: wire.Message) -> None:
        if self._router is not None:
            await self._router.send_multipart([peer, *wire.encode(message)], copy=False)

    async def _refuse(self, peer: bytes, request_id: int, code: str, text: str) -> None:
        self.refused_requests += 1
        self._log_budget.warning("refused a request from %s: %s", owner_label(owner_of(peer)), text)
        text = "".join(char if char.isprintable() else " " for char in text)[:300]
        await self._send(peer, wire.Error(request_id=request_id, code=code, message=text))

    async def _dispatch(self, peer: bytes, owner: Owner, message: wire.Message) -> None:
        if isinstance(message, wire.Heartbeat):
            await self._send(peer, wire.Heartbeat(request_id=message.request_id))
        elif isinstance(message, wire.Ping):
            await self._send(peer, self._pong(owner, message.request_id))
        elif isinstance(message, (wire.LoadPart, wire.TensorChunk, wire.TransferEnd)) and not self.serving:
            await self._refuse(peer, message.request_id, "over_budget", NOT_SERVING.format(op=message.type))
        elif isinstance(message, wire.Forward) and message.owner_tag:
            await self._relayed(peer, message)
        elif isinstance(message, (wire.Forward, wire.LoadPart, wire.TransferEnd)):
            everyone = self.limits.max_sessions + MAX_EXTRA_TASKS
            if len(self._tasks) >= everyone or self._owner_tasks[owner] >= max(2, everyone // 2):
                await self._refuse(peer, message.request_id, "over_budget",
                                   f"{message.type}: this node is busy with too many requests; retry later")
                return
            handler = {"forward": self._forward, "load_part": self._load, "transfer_end": self._finish_transfer}
            self._spawn(self._guarded(peer, message, handler[message.type](peer, owner, message)), owner)
        elif isinstance(message, wire.TensorChunk):
            try:
                self.store.accept(owner, message)
            except Refusal as refusal:
                await self._refuse(peer, message.request_id, refusal.code, str(refusal))
                return
            await self._send(peer, wire.Ack(request_id=message.request_id))
        elif isinstance(message, wire.EndSession):
            self.sessions.drop(owner, message.session_id)
            await self._send(peer, wire.Ack(request_id=message.request_id))
        elif isinstance(message, wire.Unload):
            if not self.store.unload(owner, message.part):
                await self._refuse(peer, message.request_id, "unknown_part", "unload: you hold no such part here")
                return
            self.sessions.drop(owner, ref=message.part)
            await self._send(peer, wire.Ack(request_id=message.request_id))
        else:
            await self._refuse(peer, message.request_id, "bad_request", f"{message.type} is not a request")

    async def _relayed(self, relay: bytes, message: wire.Forward) -> None:
        """A forward relayed by the previous stage of a chain: served as its owner's if the owner's grant for this
        session and part is good (which renews the owner's lease: it is at work), answered (results and refusals
        alike) on the owner's own connection. Refusals of the relay itself go back to it, which passes them on."""
        owner = next((owner for owner in self.store.owners() | self.sessions.owners()
                      if hmac.compare_digest(owner_tag(owner), message.owner_tag)), None)
        if owner is None:
            await self._refuse(relay, message.request_id, "unknown_part", "relayed forward: the session's owner "
                               "holds nothing on this node (its lease lapsed, or the node restarted); load again")
            return
        part = message.part
        expected = chain_grant(owner, message.session_id, part.digest, part.start, part.end)
        if not hmac.compare_digest(expected, message.grant):
            await self._refuse(relay, message.request_id, "bad_request",
                               "relayed forward: its owner granted no such session on this part")
            return
        self.leases.heard(owner)
        reply_to = owner + message.answer_on.to_bytes(4, "big")   # the owner's connection it named (sessions.py)
        await self._dispatch(reply_to, owner, dataclasses.replace(message, owner_tag="", grant="", answer_on=0))

    async def _guarded(self, peer: bytes, request: wire.Message, work) -> None:
        try:
            await work
        except Refusal as refusal:
            await self._refuse(peer, request.request_id, refusal.code, str(refusal))
        except (CakeError, ValueError) as error:
            await self._refuse(peer, request.request_id, "bad_request", f"{request.type}: {error}")
        except Exception as error:
            log.exception("stage server failed on %s", request.type)
            await self._refuse(peer, request.request_id, "internal", f"{request.type} failed: {type(error).__name__}")

    def _pong(self, owner: Owner, request_id: int) -> wire.Pong:
        """Capabilities, and the parts the asker holds here; a node that is not serving offers no memory and no
        sessions (max_sessions 0)."""
        return wire.Pong(request_id=request_id, node_id=self.node_id, name=self.name[:64],
                         loaded_parts=tuple(self.store.parts_of(owner))[:wire.MAX_PARTS_LISTED],
                         free_budget=self.free_bytes() if self.serving else 0, sessions=len(self.sessions),
                         max_sessions=self.limits.max_sessions if self.serving else 0)

    # -- loading (the store answers, the server sends) -------------------------------------------------------------

    async def _load(self, peer: bytes, owner: Owner, request: wire.LoadPart) -> None:
        await self._send(peer, await self.store.load(owner, request))

    async def _finish_transfer(self, peer: bytes, owner: Owner, end: wire.TransferEnd) -> None:
        await self._send(peer, await self.store.finish(owner, end))

    # -- forward --------------------------------------------------------------------------------------------

    async def _forward(self, peer: bytes, owner: Owner, request: wire.Forward) -> None:
        loaded = self.store.held(owner, request.part)
        if loaded is None:
            raise Refusal("unknown_part", "forward: you hold no such part on this node; send load_part first")
        inputs = checked_inputs(loaded.model, request.tensor)
        session = self.sessions.get(owner, request.session_id, request.part)
        if session is None and request.start_pos > 0:
            raise Refusal("unknown_session", f"forward: session {request.session_id} is not on this node "
                                              "(expired or never started); replay it from position 0")
        max_seq_len = session.max_seq_len if session is not None else loaded.context_for(owner)
        if request.start_pos + request.positions > max_seq_len:
            raise Refusal("bad_request", f"forward: positions up to {request.start_pos + request.positions} "
                                          f"exceed the session's max_seq_len {max_seq_len}")
        session = session or self._new_session(owner, request.session_id, request.part, loaded)
        if session.busy:
            raise Refusal("bad_request", f"forward: session {request.session_id} is already computing")
        if request.start_pos > session.position:
            raise Refusal("bad_request", f"forward: start_pos {request.start_pos} is beyond the "
                                          f"{session.position} positions cached for the session")
        session.busy = True
        try:
            output = await run_forward(self._compute.for_owner(owner), loaded.model, session, inputs,
                                       request.start_pos, request.every_position, self.batches)
        finally:
            session.busy = False
            session.last_used = time.monotonic()
        session.position = request.start_pos + request.positions
        if request.route:
            await self._relay(peer, owner, request, output)
            return
        await self._send(peer, wire.ForwardResult(request_id=request.request_id, session_id=request.session_id,
                                                  step=request.step, tensor=output))

    async def _relay(self, peer: bytes, owner: Owner, request: wire.Forward, output) -> None:
        """Send a chained forward's hidden states on to its next stage, in the dtype that stage takes; a refusal
        from it comes back to `peer` (the owner's connection here)."""
        hop, rest = request.route[0], request.route[1:]
        onward = dataclasses.replace(request, part=hop.part, route=rest, owner_tag=owner_tag(owner), grant=hop.grant,
                                     answer_on=hop.answer_on, tensor=output.to(wire.DTYPES[hop.dtype]))
        try:
            await self._relays.send(hop.address, hop.port, onward, answer_to=peer)
        except Unreachable as error:
            raise Refusal("unreachable", f"forward: {error}") from None

    def _new_session(self, owner: Owner, session_id: str, ref: wire.PartRef, loaded: LoadedPart) -> Session:
        if not self.serving:
            raise Refusal("over_budget", NOT_SERVING.format(op="forward"))
        if len(self.sessions) >= self.limits.max_sessions:
            raise Refusal("too_many_sessions", f"this node already serves its maximum of "
                                                f"{self.limits.max_sessions} sessions; retry when one ends")
        model, max_seq_len = loaded.model, loaded.context_for(owner)
        kv_bytes = kv_cache_bytes(model.args, model.layers, model.dtype, max_seq_len)
        if kv_bytes > self.free_bytes():
            raise Refusal("over_budget", f"a KV cache of {kv_bytes} bytes exceeds the {self.free_bytes()} "
                                          "bytes this node still offers")
        session = Session(owner, session_id, ref, max_seq_len, kv_bytes)
        self.sessions.add(session)
        return session

    # -- leases and expiry ------------------------------------------------------------------------------------

    async def _expiry_loop(self) -> None:
        interval = max(0.05, min(0.5, self.limits.lease_s / 4, self.limits.session_idle_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.expire(time.monotonic())

    def expire(self, now: float) -> None:
        """Drop what belongs to owners silent for lease_s, sessions unused for session_idle_s and transfers
        without a chunk for TRANSFER_STALL_S."""
        deadline = now - self.limits.lease_s
        for owner in self.leases.lapsed(self.store.owners() | self.sessions.owners(), deadline):
            sessions = self.sessions.drop(owner, keep_busy=True)
            parts = self.store.release(owner)
            log.info("lease of %s lapsed: dropped %d sessions and %d parts", owner_label(owner), sessions, len(parts))
        self.leases.forget_before(deadline)
        idle = self.sessions.idle_since(now - self.limits.session_idle_s)
        self.sessions.drop_keys(idle)
        for key in idle:
            log.info("session %s expired after %.0f s idle", key[1], self.limits.session_idle_s)
        for ref in self.store.drop_stalled(now - min(TRANSFER_STALL_S, self.limits.session_idle_s)):
            log.info("stalled weight transfer of %s dropped", layer_range(ref).describe())


class _LogLimiter:
    """At most `burst` warnings per `window_s`; then one summary line per window with the count suppressed."""

    def __init__(self, burst: int = 20, window_s: float = 10.0):
        self.burst, self.window_s = burst, window_s
        self.window_start, self.count, self.suppressed = time.monotonic(), 0, 0

    def warning(self, text: str, *args) -> None:
        now = time.monotonic()
        if now - self.window_start > self.window_s:
            if self.suppressed:
                log.warning("... %d more refused requests in the last %.0f s", self.suppressed, self.window_s)
            self.window_start, self.count, self.suppressed = now, 0, 0
        self.count += 1
        if self.count <= self.burst:
            log.warning(text, *args)
        else:
            self.suppressed += 1
