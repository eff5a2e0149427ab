"""The initiator's end of one stage: a DEALER with request ids, heartbeats, liveness and capped reconnect backoff,
under a Lease (lease.py) that makes the stage's state for us ours; the async ping that discovery and static peers
use; and the wire's names for layer ranges (PartRef).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from typing import Iterator

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from cakep2p import wire
from cakep2p.errors import MeshError, ProtocolError
from cakep2p.mesh.curve import configure_client
from cakep2p.mesh.lease import Lease, process_lease
from cakep2p.network import endpoint
from cakep2p.planner import LayerRange
from cakep2p.security import ClusterKeys

log = logging.getLogger(__name__)

PROTOCOL_CODES = ("bad_request", "unsupported_version", "shape_mismatch")
REPLAN_CODES = ("over_budget", "too_many_sessions", "disk_full")  # refusals another plan may route around
HANDSHAKE_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
UNAUTHENTICATED = "could not authenticate: wrong or no pairing code?"


class StageRefused(MeshError):
    """A stage answered with an error reply; `code` is the wire error code, `endpoint` the stage's (address, port)."""

    def __init__(self, message: str, code: str, endpoint: tuple[str, int] | None = None):
        super().__init__(message)
        self.code = code
        self.endpoint = endpoint


def part_ref(fingerprint: str, digest: str, layers: LayerRange) -> wire.PartRef:
    """The wire's name for a layer range of the model with this fingerprint, whose weights have this digest."""
    return wire.PartRef(model_fingerprint=fingerprint, digest=digest, start=layers.start, end=layers.end,
                        has_embedding=layers.has_embedding, has_head=layers.has_head)


def layer_range(ref: wire.PartRef) -> LayerRange:
    return LayerRange(ref.start, ref.end, ref.has_embedding, ref.has_head)


class StageClient:
    """A DEALER connected to one stage server; request/response with ids, heartbeats and timeouts.

    Thread-safe (one request at a time). Liveness: any frame from the stage counts; while waiting, a heartbeat is
    sent every `heartbeat_s` of silence and the stage is declared lost after `liveness` silent intervals. What the
    stage keeps for us belongs to `lease` (by default the process's); keep_alive() renews it between requests.
    """

    def __init__(self, address: str, port: int, keys: ClusterKeys | None, *, name: str = "",
                 heartbeat_s: float = 1.0, liveness: int = 3, timeout_s: float = 300.0,
                 context: zmq.Context | None = None, lease: Lease | None = None) -> None:
        self.address, self.port, self.keys = address, port, keys
        self.label = name or f"{address}:{port}"
        self.heartbeat_s, self.liveness, self.timeout_s = heartbeat_s, liveness, timeout_s
        self.lease = lease or process_lease()
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._routing_id = b""
        self._monitor: zmq.Socket | None = None
        self._handshake = {"connected": False, "authenticated": False}
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._backoff_s = 0.0
        self._reconnect_at = 0.0
        self._last_sent = 0.0
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
            socket.routing_id = self._routing_id = self.lease.routing_id()
            configure_client(socket, self.keys)
            self._monitor = socket.get_monitor_socket(HANDSHAKE_EVENTS)
            self._handshake = {"connected": False, "authenticated": False}
            socket.connect(endpoint(self.address, self.port))
            self._socket = socket
        return self._socket

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def _drop(self) -> None:
        self._close_socket()
        self.lost = True
        self._backoff_s = min(2.0, max(0.1, self._backoff_s * 2))
        self._reconnect_at = time.monotonic() + self._backoff_s

    def close(self) -> None:
        self.lease.release(self)
        with self._lock:
            self._close_socket()

    def keep_alive(self, idle_s: float) -> None:
        """Renew our lease on the stage with a heartbeat when this connection has sent nothing for `idle_s`; never
        waits for a request in progress (it renews the lease itself) and drops the heartbeats' answers."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._last_sent < idle_s or time.monotonic() < self._reconnect_at:
                return
            socket = self._connect()
            try:
                socket.send_multipart(wire.encode(wire.Heartbeat(request_id=0)), flags=zmq.NOBLOCK)
            except zmq.Again:  # a stage gone for long: its queue is full; the next request finds out
                return
            self._last_sent = time.monotonic()
            while socket.poll(0):
                socket.recv_multipart(copy=False)
        finally:
            self._lock.release()

    def _authenticated(self) -> bool | None:
        """Whether this connection's CURVE handshake completed: True, False (TCP connected, never authenticated),
        None (never even connected)."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            self._handshake["connected"] |= event == zmq.EVENT_CONNECTED
            self._handshake["authenticated"] |= event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        if self._handshake["authenticated"]:
            return True
        return False if self._handshake["connected"] else None

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
            self._last_sent = time.monotonic()
            reply = self._await_reply(socket, request_id, timeout_s or self.timeout_s, message.type)
        if isinstance(reply, wire.Error):
            raise self.reply_error(message.type, reply)
        return reply

    def _await_reply(self, socket: zmq.Socket, request_id: int, timeout_s: float, op: str) -> wire.Message:
        started = last_heard = time.monotonic()
        while True:
            now = time.monotonic()
            if now - started > timeout_s:
                raise self.timed_out(op, timeout_s)
            if now - last_heard > self.liveness * self.heartbeat_s:
                raise self.declare_lost(now - last_heard)
            if not socket.poll(int(self.heartbeat_s * 1000)):
                self.heartbeat(socket)
                continue
            reply = self.receive(socket)
            last_heard = time.monotonic()
            if reply.request_id == request_id and not isinstance(reply, wire.Heartbeat):
                return reply

    # -- the pieces of a wait, for requests answered on other connections too (chain.py) ---------------------

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[zmq.Socket]:
        """`with client.exclusive() as socket:` this connection, for one request at a time."""
        with self._lock:
            yield self._connect()

    def connection_number(self) -> int:
        """The number that ends this connection's routing id (a chain's stages answer us on it); 0 before any."""
        return int.from_bytes(self._routing_id[-4:], "big") if self._routing_id else 0

    def heartbeat(self, socket: zmq.Socket) -> None:
        socket.send_multipart(wire.encode(wire.Heartbeat(request_id=0)))
        self._last_sent = time.monotonic()

    def sent(self) -> None:
        self._last_sent = time.monotonic()

    def receive(self, socket: zmq.Socket) -> wire.Message:
        """The next message on `socket` (it has one waiting), which counts as hearing from the stage."""
        frames = socket.recv_multipart(copy=False)
        self._backoff_s, self.lost = 0.0, False
        try:
            return wire.decode(frames)
        except wire.WireError as error:
            raise ProtocolError(f"stage {self.label} sent a malformed reply ({error}); "
                                "run the same cakep2p version on every node") from None

    def timed_out(self, op: str, timeout_s: float) -> MeshError:
        return MeshError(f"stage {self.label} at {self.address}:{self.port} lost: no reply to {op} "
                         f"within {timeout_s:.0f} s")

    def declare_lost(self, silent_s: float) -> MeshError:
        """Drop the connection of a stage silent for `silent_s`; the error that says so."""
        authenticated = self._authenticated()
        self._drop()
        if authenticated is False:
            return MeshError(f"stage {self.label} at {self.address}:{self.port} {UNAUTHENTICATED} (it "
                             "accepts connections but the encrypted handshake never completed)")
        return MeshError(f"stage {self.label} at {self.address}:{self.port} lost: silent for {silent_s:.1f} s")

    def ping(self, timeout_s: float | None = None) -> wire.Pong:
        reply = self.request(wire.Ping(), timeout_s)
        if not isinstance(reply, wire.Pong):
            raise ProtocolError(f"stage {self.label} answered ping with {reply.type}")
        return reply

    def forward(self, session_id: str, part: wire.PartRef, step: int, start_pos: int, inputs: torch.Tensor,
                *, width: int | None = None, dtype: torch.dtype | None = None,
                every_position: bool = False) -> torch.Tensor:
        """Run `inputs` through the stage's part. The reply must be float32 logits [1, width] from a head ([positions,
        width] with every_position), else hidden states [positions, width] in `dtype` (width and dtype checked when
        given); ProtocolError if not."""
        request = wire.Forward(session_id=session_id, part=part, step=step, start_pos=start_pos,
                               positions=inputs.shape[0], every_position=every_position, tensor=inputs)
        return checked_result(self, request, self.request(request), width, dtype)

    def reply_error(self, op: str, reply: wire.Error) -> MeshError:
        text = f"stage {self.label} refused {op}: {reply.message}"
        if reply.code in PROTOCOL_CODES:
            return ProtocolError(text)
        return StageRefused(text, reply.code, (self.address, self.port))

    def end_session(self, session_id: str, timeout_s: float | None = None) -> None:
        self.request(wire.EndSession(session_id=session_id), timeout_s)


def checked_result(client: StageClient, request: wire.Forward, reply: wire.Message, width: int | None,
                   dtype: torch.dtype | None) -> torch.Tensor:
    """The tensor of `client`'s reply to `request` if it is what the request's part must answer; ProtocolError else."""
    if (not isinstance(reply, wire.ForwardResult) or reply.session_id != request.session_id
            or reply.step != request.step):
        raise ProtocolError(f"stage {client.label} answered forward with {reply.type} for another request")
    part, rows = request.part, request.positions
    if part.has_head:
        rows, dtype = (rows if request.every_position else 1), torch.float32
    tensor = reply.tensor
    if (tensor.shape[0] != rows or (width is not None and tensor.shape[1] != width)
            or (dtype is not None and tensor.dtype != dtype)):
        expected = f"{wire.DTYPE_NAMES[dtype] if dtype is not None else ''}[{rows}, {width or 'width'}]"
        raise ProtocolError(f"stage {client.label} answered forward with {wire.DTYPE_NAMES[tensor.dtype]}"
                            f"{list(tensor.shape)}, expected {expected}; run the same model on every node")
    return tensor


async def ping(context, address: str, port: int, keys: ClusterKeys | None, timeout_s: float) -> wire.Pong | None:
    """Ask a stage server for its capabilities from an asyncio loop (`context` is a zmq.asyncio.Context); None when it
    does not answer in time, answers garbage, or refuses our keys (a failed CURVE handshake simply never answers)."""
    pong, _ = await timed_ping(context, address, port, keys, timeout_s, rounds=1)
    return pong


async def timed_ping(context, address: str, port: int, keys: ClusterKeys | None, timeout_s: float,
                     rounds: int = 3) -> tuple[wire.Pong | None, float | None]:
    """`ping`, then `rounds - 1` more pings on the same connection: (the first Pong, the fastest later round trip in
    seconds). The first round also pays for the TCP connection and the CURVE handshake, so it is not an RTT; the
    RTT is None when only one round answered."""
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.maxmsgsize = 1 << 20
    first, fastest = None, None
    try:
        configure_client(socket, keys)
        socket.connect(endpoint(address, port))
        deadline = time.monotonic() + timeout_s
        for request_id in range(1, rounds + 1):
            started = time.perf_counter()
            pong = await _pong(socket, request_id, deadline)
            if pong is None:
                break
            if first is None:
                first = pong
            else:
                elapsed = time.perf_counter() - started
                fastest = elapsed if fastest is None else min(fastest, elapsed)
        return first, fastest
    except zmq.ZMQError as error:
        log.debug("ping %s:%d failed: %s", address, port, error)
        return first, fastest
    finally:
        socket.close(linger=0)


async def _pong(socket, request_id: int, deadline: float) -> wire.Pong | None:
    """Send a Ping and wait until `deadline` for its Pong; None on silence or garbage."""
    await socket.send_multipart(wire.encode(wire.Ping(request_id=request_id)))
    while (left := deadline - time.monotonic()) > 0:
        if not await socket.poll(int(left * 1000) + 1):
            return None
        try:
            reply = wire.decode(await socket.recv_multipart())
        except wire.WireError:
            return None
        if isinstance(reply, wire.Pong) and reply.request_id == request_id:
            return reply
    return None
