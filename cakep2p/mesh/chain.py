"""Chained forwards: the initiator sends a step to the first of a run of remote stages, with the route of the rest;
each stage sends its hidden states straight on to the next, and the last one answers. That is stages + 1 messages
per token instead of 2 x stages. While we wait, every stage of the run is heartbeated and watched, and any of them
may answer with a refusal (relayed requests are answered on our own connection to each stage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import os
import socket as sockets
import time
from typing import Sequence

import torch
import zmq

from cakep2p import wire
from cakep2p.errors import ProtocolError
from cakep2p.mesh.client import StageClient, checked_result
from cakep2p.mesh.lease import chain_grant

CHAIN_REQUEST_IDS = itertools.count((1 << 62) + 1)  # never one a client's own counter reaches: no stale match


def chain_enabled() -> bool:
    """Chain forwarding unless CAKEP2P_CHAIN=0 (then the initiator relays every hidden state itself, the star)."""
    return os.environ.get("CAKEP2P_CHAIN", "1") != "0"


def relay_address(address: str) -> str | None:
    """The IP literal a stage can reach another stage at, as we know it (a host name resolved here); None if none."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    try:
        return sockets.getaddrinfo(address, None, type=sockets.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return None


def chainable(addresses: Sequence[str | None]) -> bool:
    """Whether stages at these addresses can pass hidden states on among themselves: each has an IP, and they are
    all loopback or none is (a loopback address means something else on another machine)."""
    if any(address is None for address in addresses):
        return False
    loopback = {ipaddress.ip_address(address).is_loopback for address in addresses}
    return len(loopback) == 1


def forward_chain(clients: Sequence[StageClient], addresses: Sequence[str], parts: Sequence[wire.PartRef],
                  dtypes: Sequence[torch.dtype], owner: bytes, session_id: str, step: int, start_pos: int,
                  inputs: torch.Tensor, *, width: int, every_position: bool = False,
                  timeout_s: float = 300.0) -> torch.Tensor:
    """`inputs` through the parts on `clients` in order, each stage relaying to the next at its address (its
    relay_address) in the dtype it takes and answers in; the last stage's checked answer. `owner` is our lease's:
    it signs the grants."""
    with contextlib.ExitStack() as held:
        connections = [held.enter_context(client.exclusive()) for client in clients]
        route = tuple(wire.Hop(address=address, port=client.port, part=part, dtype=wire.DTYPE_NAMES[dtype],
                               answer_on=client.connection_number(),
                               grant=chain_grant(owner, session_id, part.digest, part.start, part.end))
                      for client, address, part, dtype in zip(clients[1:], addresses[1:], parts[1:], dtypes[1:]))
        first = wire.Forward(request_id=next(CHAIN_REQUEST_IDS), session_id=session_id, part=parts[0], step=step,
                             start_pos=start_pos, positions=inputs.shape[0], every_position=every_position,
                             route=route, tensor=inputs)
        try:
            frames = wire.encode(first)
        except wire.WireError as error:
            raise ProtocolError(f"cannot send forward to stage {clients[0].label}: {error}") from None
        connections[0].send_multipart(frames, copy=False)
        clients[0].sent()
        reply = _await_last(clients, connections, first.request_id, timeout_s)
    answered = dataclasses.replace(first, part=parts[-1], route=())
    return checked_result(clients[-1], answered, reply, width, dtypes[-1])


def _await_last(clients: Sequence[StageClient], connections: Sequence[zmq.Socket], request_id: int,
                timeout_s: float) -> wire.Message:
    """The last stage's answer to request `request_id`; a refusal from any stage, or the silence of one, raises."""
    poller = zmq.Poller()
    for connection in connections:
        poller.register(connection, zmq.POLLIN)
    index_of = {connection: index for index, connection in enumerate(connections)}
    started = time.monotonic()
    heard = [started] * len(clients)
    pinged = [started] * len(clients)
    interval_s = min(client.heartbeat_s for client in clients)
    while True:
        now = time.monotonic()
        if now - started > timeout_s:
            raise clients[-1].timed_out("forward", timeout_s)
        for index, client in enumerate(clients):
            silent_s = now - heard[index]
            if silent_s > client.liveness * client.heartbeat_s:
                raise client.declare_lost(silent_s)
            if silent_s >= client.heartbeat_s and now - pinged[index] >= client.heartbeat_s:
                client.heartbeat(connections[index])
                pinged[index] = now
        for connection, _ in poller.poll(max(1, int(interval_s * 250))):
            index = index_of[connection]
            reply = clients[index].receive(connection)
            heard[index] = time.monotonic()
            if reply.request_id != request_id or isinstance(reply, wire.Heartbeat):
                continue
            if isinstance(reply, wire.Error):
                raise clients[index].reply_error("forward", reply)
            if index != len(clients) - 1:
                raise ProtocolError(f"stage {clients[index].label} answered a forward it was to pass on")
            return reply
