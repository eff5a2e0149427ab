"""A stage's connections onward, for chained forwards: one CURVE DEALER per next stage it relays hidden states to,
opened on first use, each under a random routing id of its own (never a lease's: a relay owns nothing there). What
comes back on one is a refusal of the relay itself (the next stage answers all else to the initiator): it is passed
on to the initiator's connection the forward came from, so a chain never waits on a refusal nobody sees.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from typing import Awaitable, Callable

import zmq
import zmq.asyncio

from cakep2p import wire
from cakep2p.mesh.curve import configure_client
from cakep2p.network import endpoint
from cakep2p.security import ClusterKeys

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 5.0   # how long a relay waits for its next stage to accept the connection (handshake included)
MAX_RELAYS = 64        # next stages this node keeps a connection to; the least recently used goes first
MAX_PENDING = 1024     # relayed requests remembered for passing a refusal back (the oldest are forgotten first)
RELAY_PREFIX = b"r"


class Unreachable(Exception):
    """The next stage of a chain did not take the message within CONNECT_WAIT_S."""


class Relays:
    """Outgoing connections to the next stages, on the stage server's asyncio context; `answer(peer, message)`
    sends on the server's own socket."""

    def __init__(self, context: zmq.asyncio.Context, keys: ClusterKeys | None,
                 answer: Callable[[bytes, wire.Message], Awaitable[None]]) -> None:
        self._context, self._keys, self._answer = context, keys, answer
        self._sockets: dict[tuple[str, int], zmq.asyncio.Socket] = {}
        self._drains: dict[tuple[str, int], asyncio.Task] = {}
        self._pending: collections.OrderedDict[tuple[tuple[str, int], int], bytes] = collections.OrderedDict()

    async def send(self, address: str, port: int, message: wire.Message, answer_to: bytes) -> None:
        """Send `message` to the stage at address:port; Unreachable if no connection takes it in time. A refusal
        of it goes to `answer_to`."""
        key = (address, port)
        socket = self._socket(key)
        frames = wire.encode(message)
        deadline = time.monotonic() + CONNECT_WAIT_S
        while True:
            try:
                await socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:   # immediate: nothing queues until the connection is up
                if time.monotonic() > deadline:
                    self._close(key)
                    raise Unreachable(f"the next stage at {address}:{port} did not accept a connection within "
                                      f"{CONNECT_WAIT_S:.0f} s") from None
                await asyncio.sleep(0.005)
        self._pending[(key, message.request_id)] = answer_to
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def _socket(self, key: tuple[str, int]) -> zmq.asyncio.Socket:
        socket = self._sockets.pop(key, None)
        if socket is None:
            if len(self._sockets) >= MAX_RELAYS:
                self._close(next(iter(self._sockets)))
            socket = self._context.socket(zmq.DEALER)
            socket.linger = 0
            socket.immediate = 1
            socket.maxmsgsize = 1 << 20    # refusals only ever come back on a relay
            socket.routing_id = RELAY_PREFIX + secrets.token_bytes(16)
            configure_client(socket, self._keys)
            socket.connect(endpoint(*key))
            self._drains[key] = asyncio.get_running_loop().create_task(self._drain(key, socket))
        self._sockets[key] = socket   # most recently used last
        return socket

    async def _drain(self, key: tuple[str, int], socket: zmq.asyncio.Socket) -> None:
        """Pass each refusal of a relayed request back to where the request came from; drop anything else."""
        while True:
            frames = await socket.recv_multipart(copy=False)
            try:
                reply = wire.decode(frames)
            except wire.WireError as error:
                log.debug("dropped a malformed message on a relay connection: %s", error)
                continue
            answer_to = self._pending.pop((key, reply.request_id), None)
            if isinstance(reply, wire.Error) and answer_to is not None:
                await self._answer(answer_to, reply)

    def _close(self, key: tuple[str, int]) -> None:
        drain = self._drains.pop(key, None)
        if drain is not None:
            drain.cancel()
        socket = self._sockets.pop(key, None)
        if socket is not None:
            socket.close(linger=0)

    async def close(self) -> None:
        drains = list(self._drains.values())
        for key in list(self._sockets):
            self._close(key)
        await asyncio.gather(*drains, return_exceptions=True)
