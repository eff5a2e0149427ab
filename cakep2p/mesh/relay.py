"""A stage's connections onward, for chained forwards: one CURVE DEALER per next stage it relays hidden states to,
opened on first use, each under a random routing id of its own (never a lease's: a relay owns nothing there).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import zmq
import zmq.asyncio

from cakep2p import wire
from cakep2p.mesh.curve import configure_client
from cakep2p.network import endpoint
from cakep2p.security import ClusterKeys

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 5.0   # how long a relay waits for its next stage to accept the connection (handshake included)
MAX_RELAYS = 64        # next stages this node keeps a connection to; the least recently used goes first
RELAY_PREFIX = b"r"


class Unreachable(Exception):
    """The next stage of a chain did not take the message within CONNECT_WAIT_S."""


class Relays:
    """Outgoing connections to the next stages, on the stage server's asyncio context."""

    def __init__(self, context: zmq.asyncio.Context, keys: ClusterKeys | None) -> None:
        self._context, self._keys = context, keys
        self._sockets: dict[tuple[str, int], zmq.asyncio.Socket] = {}
        self._drains: dict[tuple[str, int], asyncio.Task] = {}

    async def send(self, address: str, port: int, message: wire.Message) -> None:
        """Send `message` to the stage at address:port; Unreachable if no connection takes it in time."""
        socket = self._socket(address, port)
        frames = wire.encode(message)
        deadline = time.monotonic() + CONNECT_WAIT_S
        while True:
            try:
                await socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:   # immediate: nothing queues until the connection is up
                if time.monotonic() > deadline:
                    self._close((address, port))
                    raise Unreachable(f"the next stage at {address}:{port} did not accept a connection within "
                                      f"{CONNECT_WAIT_S:.0f} s") from None
                await asyncio.sleep(0.005)

    def _socket(self, address: str, port: int) -> zmq.asyncio.Socket:
        key = (address, port)
        socket = self._sockets.pop(key, None)
        if socket is None:
            if len(self._sockets) >= MAX_RELAYS:
                self._close(next(iter(self._sockets)))
            socket = self._context.socket(zmq.DEALER)
            socket.linger = 0
            socket.immediate = 1
            socket.maxmsgsize = 1 << 20    # nothing useful ever comes back on a relay
            socket.routing_id = RELAY_PREFIX + secrets.token_bytes(16)
            configure_client(socket, self._keys)
            socket.connect(endpoint(address, port))
            self._drains[key] = asyncio.get_running_loop().create_task(_drain(socket))
        self._sockets[key] = socket   # most recently used last
        return socket

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


async def _drain(socket: zmq.asyncio.Socket) -> None:
    """Read and drop what a next stage sends back on a relay (its answers go to the initiator, not here)."""
    while True:
        frames = await socket.recv_multipart(copy=False)
        log.debug("dropped a %d-frame message on a relay connection", len(frames))
