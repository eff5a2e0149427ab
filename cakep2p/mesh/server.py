"""A stage server: hosts model parts behind a CURVE ZeroMQ ROUTER and runs forward passes for remote initiators,
with compute in an executor thread so pings and heartbeats keep flowing; sessions and limits here, the parts
themselves in its PartStore.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import zmq
import zmq.asyncio

from cakep2p import wire
from cakep2p.engine.dtypes import name_of
from cakep2p.engine.model import ModelPart
from cakep2p.engine.sizes import kv_cache_bytes
from cakep2p.errors import CakeError
from cakep2p.mesh.client import layer_range
from cakep2p.mesh.curve import Authenticator, configure_server
from cakep2p.mesh.part_store import LoadedPart, PartStore, Refusal
from cakep2p.mesh.parts_cache import default_parts_dir
from cakep2p.network import endpoint
from cakep2p.security import ClusterKeys, insecure_warning

log = logging.getLogger(__name__)

MAX_EXTRA_TASKS = 8  # requests in flight beyond one per session (loads, transfers) before refusing more
NOT_SERVING = "{op}: this node does not take work now (its owner turned serving off); re-plan without it"
RECEIVE_QUEUE_MESSAGES = 4  # per peer, with ZMQ_MAXMSGSIZE: bounds what a peer can make this node buffer unread
SEND_QUEUE_MESSAGES = 1000  # per peer; a client may pipeline hundreds of requests (tests/test_mesh.py reads 500)


# -- server state ------------------------------------------------------------------------------------------


@dataclass
class _Session:
    session_id: str
    ref: wire.PartRef
    max_seq_len: int
    kv_bytes: int
    cache: object | None = None
    position: int = 0
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class StageLimits:
    """What a node lends: memory for weights + KV caches + transfers, and how many sessions it keeps."""

    budget_bytes: int
    max_sessions: int = 8
    session_idle_s: float = 600.0
    max_frame_bytes: int = wire.MAX_FRAME_BYTES


class StageServer:
    """Serves model parts on tcp://address:port; lives on one asyncio loop (start/stop from that loop)."""

    def __init__(self, *, node_id: str, name: str, keys: ClusterKeys | None, limits: StageLimits,
                 address: str = "127.0.0.1", port: int = 0, models_dirs: Sequence[str | Path] = (),
                 parts_dir: str | Path | None = None, device: str = "auto",
                 on_refused: Callable[[str], None] | None = None, serving: bool = True) -> None:
        self.node_id, self.name, self.keys, self.limits = node_id, name, keys, limits
        self.address, self.port = address, port
        self.on_refused = on_refused
        self.serving = serving  # False: refuse new loads, transfers and sessions (running sessions go on)
        self.refused_requests = 0  # malformed or refused messages answered with an error
        self.store = PartStore(parts_dir=Path(parts_dir) if parts_dir is not None else default_parts_dir(),
                               models_dirs=[Path(path) for path in models_dirs], device=device,
                               free_bytes=self.free_bytes, compute=self._compute)
        self._sessions: dict[tuple[str, wire.PartRef], _Session] = {}
        self._tasks: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-compute")
        self._context: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
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
        self._spawn(self._receive_loop())
        self._spawn(self._expiry_loop())
        log.info("stage server %s listening on %s:%d (%s)", self.name, self.address, self.port,
                 "CURVE" if self.keys else "INSECURE")
        return self.port

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        self._shutdown_context()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        self._sessions.clear()

    def _shutdown_context(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- accounting -----------------------------------------------------------------------------------------

    def set_budget(self, budget_bytes: int) -> None:
        """A new offered memory (e.g. --max-memory changed); applies to later loads and sessions."""
        self.limits = dataclasses.replace(self.limits, budget_bytes=budget_bytes)

    def used_bytes(self) -> int:
        return self.store.used_bytes() + sum(session.kv_bytes for session in self._sessions.values())

    def free_bytes(self) -> int:
        return max(0, self.limits.budget_bytes - self.used_bytes())

    def stats(self) -> dict:
        """A snapshot for status displays and tests."""
        return {"parts": len(self.store.parts), "sessions": len(self._sessions),
                "kv_bytes": sum(session.kv_bytes for session in list(self._sessions.values())),
                "used_bytes": self.used_bytes(), "free_bytes": self.free_bytes(),
                "transfers": len(self.store.transfers), "refused_requests": self.refused_requests}

    # -- the socket -----------------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._router.recv_multipart(copy=False)
            peer, body = frames[0].bytes, frames[1:]
            try:
                message = wire.decode(body)
            except wire.WireError as error:
                await self._refuse(peer, error.request_id, error.code, f"malformed request: {error}")
                continue
            try:
                await self._dispatch(peer, message)
            except wire.WireError as error:  # e.g. a reply that fails to encode: answer, keep serving
                await self._refuse(peer, message.request_id, error.code, str(error))

    async def _send(self, peer: bytes, message: wire.Message) -> None:
        if self._router is not None:
            await self._router.send_multipart([peer, *wire.encode(message)], copy=False)

    async def _refuse(self, peer: bytes, request_id: int, code: str, text: str) -> None:
        self.refused_requests += 1
        self._log_budget.warning("refused a request from peer %s: %s", peer.hex()[:10], text)
        text = "".join(char if char.isprintable() else " " for char in text)[:300]
        await self._send(peer, wire.Error(request_id=request_id, code=code, message=text))

    async def _dispatch(self, peer: bytes, message: wire.Message) -> None:
        if isinstance(message, wire.Heartbeat):
            await self._send(peer, wire.Heartbeat(request_id=message.request_id))
        elif isinstance(message, wire.Ping):
            await self._send(peer, self._pong(message.request_id))
        elif isinstance(message, (wire.LoadPart, wire.TensorChunk, wire.TransferEnd)) and not self.serving:
            await self._refuse(peer, message.request_id, "over_budget", NOT_SERVING.format(op=message.type))
        elif isinstance(message, (wire.Forward, wire.LoadPart, wire.TransferEnd)):
            if len(self._tasks) >= self.limits.max_sessions + MAX_EXTRA_TASKS:
                await self._refuse(peer, message.request_id, "over_budget",
                                   f"{message.type}: this node is busy with too many requests; retry later")
                return
            handler = {"forward": self._forward, "load_part": self._load, "transfer_end": self._finish_transfer}
            self._spawn(self._guarded(peer, message, handler[message.type](peer, message)))
        elif isinstance(message, wire.TensorChunk):
            try:
                self.store.accept(peer, message)
            except Refusal as refusal:
                await self._refuse(peer, message.request_id, refusal.code, str(refusal))
                return
            await self._send(peer, wire.Ack(request_id=message.request_id))
        elif isinstance(message, wire.EndSession):
            for key in [key for key in self._sessions if key[0] == message.session_id]:
                del self._sessions[key]
            await self._send(peer, wire.Ack(request_id=message.request_id))
        elif isinstance(message, wire.Unload):
            if not self.store.unload(message.part):
                await self._refuse(peer, message.request_id, "unknown_part", "unload: this node lacks that part")
                return
            for key in [key for key in self._sessions if key[1] == message.part]:
                del self._sessions[key]
            await self._send(peer, wire.Ack(request_id=message.request_id))
        else:
            await self._refuse(peer, message.request_id, "bad_request", f"{message.type} is not a request")

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

    def _pong(self, request_id: int) -> wire.Pong:
        """Capabilities; a node that is not serving offers no memory and no sessions (max_sessions 0)."""
        return wire.Pong(request_id=request_id, node_id=self.node_id, name=self.name[:64],
                         loaded_parts=tuple(self.store.parts)[:wire.MAX_PARTS_LISTED],
                         free_budget=self.free_bytes() if self.serving else 0, sessions=len(self._sessions),
                         max_sessions=self.limits.max_sessions if self.serving else 0)

    async def _compute(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- loading (the store answers, the server sends) -------------------------------------------------------------

    async def _load(self, peer: bytes, request: wire.LoadPart) -> None:
        await self._send(peer, await self.store.load(peer, request))

    async def _finish_transfer(self, peer: bytes, end: wire.TransferEnd) -> None:
        await self._send(peer, await self.store.finish(peer, end))

    # -- forward --------------------------------------------------------------------------------------------

    async def _forward(self, peer: bytes, request: wire.Forward) -> None:
        loaded = self.store.parts.get(request.part)
        if loaded is None:
            raise Refusal("unknown_part", "forward: this node does not hold that part; send load_part first")
        inputs = _checked_inputs(loaded.model, request.tensor)
        session = self._sessions.get((request.session_id, request.part))
        if session is None and request.start_pos > 0:
            raise Refusal("unknown_session", f"forward: session {request.session_id} is not on this node "
                                              "(expired or never started); replay it from position 0")
        max_seq_len = session.max_seq_len if session is not None else loaded.max_seq_len
        if request.start_pos + request.positions > max_seq_len:
            raise Refusal("bad_request", f"forward: positions up to {request.start_pos + request.positions} "
                                          f"exceed the session's max_seq_len {max_seq_len}")
        session = session or self._new_session(request.session_id, request.part, loaded)
        if session.busy:
            raise Refusal("bad_request", f"forward: session {request.session_id} is already computing")
        if request.start_pos > session.position:
            raise Refusal("bad_request", f"forward: start_pos {request.start_pos} is beyond the "
                                          f"{session.position} positions cached for the session")
        session.busy = True
        try:
            output = await self._compute(_run_part, loaded, session, inputs, request.start_pos)
        finally:
            session.busy = False
            session.last_used = time.monotonic()
        session.position = request.start_pos + request.positions
        await self._send(peer, wire.ForwardResult(request_id=request.request_id, session_id=request.session_id,
                                                  step=request.step, tensor=output))

    def _new_session(self, session_id: str, ref: wire.PartRef, loaded: LoadedPart) -> _Session:
        if not self.serving:
            raise Refusal("over_budget", NOT_SERVING.format(op="forward"))
        if len(self._sessions) >= self.limits.max_sessions:
            raise Refusal("too_many_sessions", f"this node already serves its maximum of "
                                                f"{self.limits.max_sessions} sessions; retry when one ends")
        model = loaded.model
        kv_bytes = kv_cache_bytes(model.args, model.layers, model.dtype, loaded.max_seq_len)
        if kv_bytes > self.free_bytes():
            raise Refusal("over_budget", f"a KV cache of {kv_bytes} bytes exceeds the {self.free_bytes()} "
                                          "bytes this node still offers")
        session = _Session(session_id, ref, loaded.max_seq_len, kv_bytes)
        self._sessions[(session_id, ref)] = session
        return session

    async def _expiry_loop(self) -> None:
        interval = max(0.05, min(1.0, self.limits.session_idle_s / 4))
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self.limits.session_idle_s
            # comprehensions only: a loop variable left holding a session would keep its KV cache alive
            for key in [key for key, session in self._sessions.items()
                        if not session.busy and session.last_used < deadline]:
                del self._sessions[key]
                log.info("session %s expired after %.0f s idle", key[0], self.limits.session_idle_s)
            for ref in self.store.drop_abandoned(deadline):
                log.info("abandoned weight transfer of %s dropped", layer_range(ref).describe())


def _checked_inputs(model: ModelPart, tensor: torch.Tensor) -> torch.Tensor:
    args = model.args
    if model.layers.has_embedding:
        if tensor.dim() != 1 or tensor.dtype != torch.int64:
            raise Refusal("shape_mismatch", f"forward: this part takes int64 token ids [T], got "
                                             f"{wire.DTYPE_NAMES[tensor.dtype]}{list(tensor.shape)}")
        if int(tensor.min()) < 0 or int(tensor.max()) >= args.vocab_size:
            raise Refusal("shape_mismatch", f"forward: token ids must lie in [0, {args.vocab_size})")
        return tensor
    if tensor.dim() != 2 or tensor.shape[1] != args.hidden_size or tensor.dtype != model.dtype:
        raise Refusal("shape_mismatch", f"forward: this part takes {name_of(model.dtype)} hidden states "
                                         f"[T, {args.hidden_size}], got {wire.DTYPE_NAMES[tensor.dtype]}"
                                         f"{list(tensor.shape)}")
    return tensor


def _run_part(loaded: LoadedPart, session: _Session, inputs: torch.Tensor, start_pos: int) -> torch.Tensor:
    if session.cache is None:
        session.cache = loaded.model.new_cache(session.max_seq_len)
    return loaded.model(inputs, start_pos, session.cache, last_only=loaded.model.layers.has_head)


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


class ServerThread:
    """A StageServer on its own asyncio loop in a background thread (for tests and headless hosts)."""

    def __init__(self, server: StageServer) -> None:
        self.server = server
        self._loop = asyncio.SelectorEventLoop()  # zmq.asyncio needs a selector loop (Windows too)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cakep2p-stage-{server.name}", daemon=True)

    def start(self) -> int:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.server.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as error:
            self._error = error
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.stop())
        self._loop.close()

    def call(self, function: Callable, *args):
        """Run function(*args) on the server's loop and return its result (for inspection in tests)."""
        async def run():
            return function(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
