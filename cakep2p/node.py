"""The core both shells share: one node's identity, capacity, cluster keys, discovery, mesh server and loop thread.

`cakep2p --serve` calls `Node.run_forever()`; the window calls `start()`/`stop()` and listens to `node.directory`;
cakep2p/cluster/ opens models over the node and its peers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import zmq.asyncio

from cakep2p import PROTOCOL_VERSION, __version__, paths
from cakep2p.discovery import STATIC_KEY, Discovery, PeerDirectory, PeerInfo, identity
from cakep2p.discovery.capacity import Capacity, offered_memory, probe
from cakep2p.errors import CakeError
from cakep2p.mesh import StageLimits, StageServer, timed_ping
from cakep2p.mesh.parts_cache import default_parts_dir
from cakep2p.network import announce_addresses, choose_port, listen_host, resolve_interfaces
from cakep2p.security import ClusterKeys, cluster_keys, derive_keys, load_or_create_code
from cakep2p.units import format_size

log = logging.getLogger(__name__)

STATIC_PEER_REFRESH_S = 2.0   # how often static --peers are pinged over the mesh
STATIC_PEER_TIMEOUT_S = 3.0   # a ping unanswered this long is a miss; two misses in a row drop the peer
STATIC_PEER_MISSES = 2
VERIFY_TIMEOUT_S = 2.0        # an announced peer must answer an authenticated ping this fast to join plans


def cluster_fingerprint(code: str | None) -> str:
    """The announced fingerprint of the cluster whose pairing code is `code` (or the stored one).

    A given code only judges peers here: it is not stored, so this machine keeps its own pairing code.
    """
    return cluster_keys().fingerprint if code is None else derive_keys(code).fingerprint


class Node:
    """One node's life: identity, capacity, cluster keys, discovery, the mesh's StageServer, one asyncio loop.

    The StageServer (cakep2p/mesh/server.py) listens on `port` at the one --interface address (else all interfaces) with the
    cluster's CURVE keys, lends at most the offered memory and refuses new work while `serving` is off. Static
    `--peers` are pinged over the mesh and kept in `directory` beside the peers mDNS finds.
    """

    def __init__(self, name: str | None = None, port: int | None = None, interfaces: list[str] | None = None,
                 max_memory: int | None = None, cluster_code: str | None = None, discovery: bool = True,
                 serving: bool = True, static_peers: list[tuple[str, int]] | None = None,
                 insecure_open: bool = False, models_dirs: list[str | Path] | None = None,
                 node_id: str | None = None, store_code: bool = True) -> None:
        self.name = identity.clean_node_name(name) if name else identity.default_node_name()
        if not self.name:
            raise CakeError(f"node name {name!r} has no usable characters: pass --name with letters or digits")
        self.interfaces = resolve_interfaces(interfaces)
        self.port = choose_port(port, listen_host(self.interfaces))
        self.max_memory = max_memory
        self.cluster_code = cluster_code
        self.store_code = store_code   # False: an explicit cluster_code is used, not stored (`cakep2p plan --cluster`)
        self.discovery_enabled = discovery
        self.static_peers = list(static_peers or [])
        self.insecure_open = insecure_open
        self.models_dirs = [paths.data_dir() / "models", *(Path(path) for path in models_dirs or [])]
        self.keys: ClusterKeys | None = None
        self.server: StageServer | None = None
        self.directory = PeerDirectory()
        self.config_dir = paths.config_dir()
        self.node_id = node_id or identity.node_id(self.config_dir)  # an explicit id: a throwaway identity
        self._stored_identity = node_id is None
        self.capacity: Capacity | None = None
        self.fingerprint = ""
        self.info: PeerInfo | None = None
        self.discovery: Discovery | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._serving = serving
        self._joined = True
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._static_task: asyncio.Task | None = None
        self._silent_static: frozenset[tuple[str, int]] = frozenset()   # static --peers whose last ping went unanswered
        self._mesh_context: zmq.asyncio.Context | None = None   # for pings: static peers and proving announcements
        self._rtts: dict[str, float] = {}   # node id -> the latest round trip its authenticated pings measured, s

    # ---- life cycle -------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Probe, derive the cluster fingerprint, start the loop thread and announce; returns once announced."""
        self.capacity = probe(self.max_memory)
        self._use_cluster(self.cluster_code)
        self.info = self._own_info()
        self._thread = threading.Thread(target=self._run_loop, name=f"cakep2p-node-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise CakeError(f"node {self.name} did not start within {timeout:.0f} s: run `cakep2p doctor`")
        if self._error is not None:
            raise CakeError(f"node {self.name} could not start: {self._error}") from self._error

    def stop(self, timeout: float = 10.0) -> None:
        """Say goodbye on the network, stop the loop and join its thread; safe to call twice."""
        loop, stopping = self.loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:      # the loop already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_forever(self) -> None:
        """Headless shell: start, then wait for SIGINT/SIGTERM in the main thread and stop cleanly."""
        stop_requested = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop_requested.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            log.info("%s", self.startup_message())
            while not stop_requested.wait(0.5):
                if self._thread is None or not self._thread.is_alive():
                    raise CakeError(f"node {self.name} stopped unexpectedly: see the log above")
            log.info("stopping: saying goodbye to peers")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_loop(self) -> None:
        try:
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                runner.run(self._main())
        except BaseException as error:  # reported to start(); the thread must not die silently
            self._error = error
            log.debug("node loop ended with an error", exc_info=True)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self._start_services()
            self._ready.set()
            await self._stopping.wait()
        finally:
            await self._stop_services()

    async def _start_services(self) -> None:
        """The mesh server first (peers may dial as soon as we announce), then discovery, then static peers."""
        self.server = StageServer(node_id=self.node_id, name=self.name, keys=self.keys,
                                  limits=StageLimits(budget_bytes=self.info.offered_memory),
                                  address=listen_host(self.interfaces), port=self.port,
                                  models_dirs=self.models_dirs, parts_dir=default_parts_dir(),
                                  serving=self._serving)
        self.port = await self.server.start()   # port 0 (a throwaway initiator): the one the OS picked
        self.info = replace(self.info, port=self.port)
        self._mesh_context = zmq.asyncio.Context()
        if self.discovery_enabled:
            self.discovery = Discovery(self.directory, self.fingerprint, self.interfaces,
                                       on_duplicate_id=self._on_duplicate_id,
                                       on_addresses_changed=self._on_addresses_changed,
                                       verify=self._proves_membership if self.keys is not None else None)
            await self.discovery.start()
            if self._joined:
                await self.discovery.announce(self.info)
            self.name = self.server.name = self.discovery.instance_name or self.name
            self.info = replace(self.info, name=self.name, address=self.discovery.addresses[0],
                                addresses=tuple(self.discovery.addresses))
        if self.static_peers:
            self._static_task = asyncio.get_running_loop().create_task(self._poll_static_peers())

    async def _stop_services(self) -> None:
        """The reverse of _start_services: static peers, the mesh server, then discovery's goodbye."""
        if self._static_task is not None:
            self._static_task.cancel()
            await asyncio.gather(self._static_task, return_exceptions=True)
            self._static_task = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
        if self._mesh_context is not None:
            self._mesh_context.destroy(linger=0)
            self._mesh_context = None

    async def _proves_membership(self, peer: PeerInfo) -> bool:
        """Whether an announced peer answers an authenticated ping as the node it claims to be: CURVE lets only a
        holder of the cluster key finish the handshake, so an announcement copied from the LAN proves nothing."""
        pong, rtt = await timed_ping(self._mesh_context, peer.address, peer.port, self.keys, VERIFY_TIMEOUT_S)
        proven = pong is not None and pong.node_id == peer.node_id
        if proven and rtt is not None:
            self._rtts[peer.node_id] = rtt
        return proven

    async def _poll_static_peers(self) -> None:
        """Ping each --peers host:port over the mesh, each on its own: one that answers is usable at once, however
        long another takes to time out."""
        await asyncio.gather(*(self._poll_static_peer(host, port) for host, port in self.static_peers))

    async def _poll_static_peer(self, host: str, port: int) -> None:
        """Answers become a directory entry, silence (STATIC_PEER_MISSES pings in a row) removes it."""
        key, misses = f"{STATIC_KEY}{host}:{port}", 0
        while True:
            pong, rtt = await timed_ping(self._mesh_context, host, port, self.keys, STATIC_PEER_TIMEOUT_S)
            misses = 0 if pong is not None else misses + 1
            if pong is not None and rtt is not None:
                self._rtts[pong.node_id] = rtt
            if pong is not None and pong.node_id != self.node_id:
                self.directory.put(key, self._static_peer_info(host, port, pong))
            elif pong is not None or misses >= STATIC_PEER_MISSES:
                if self.directory.remove(key) is not None:
                    log.info("static peer %s:%d stopped answering", host, port)
            silent = {(host, port)} if pong is None else set()
            self._silent_static = frozenset((self._silent_static - {(host, port)}) | silent)
            await asyncio.sleep(STATIC_PEER_REFRESH_S)

    def _static_peer_info(self, host: str, port: int, pong) -> PeerInfo:
        """A static peer as the directory lists it: what its Pong says (a successful CURVE ping proves the cluster)."""
        return PeerInfo(
            name=pong.name or f"{host}:{port}", node_id=pong.node_id, address=host, port=port, version="",
            protocol_version=pong.protocol_version, cluster_fingerprint=self.fingerprint, accelerator="unknown",
            device_name="static peer", ram_total=0, ram_available=0, vram_total=0, vram_free=0,
            offered_memory=pong.free_budget, gflops=0.0, bandwidth=0.0, serving=pong.max_sessions > 0,
            status="ok", addresses=(host,))

    def _use_cluster(self, code: str | None) -> None:
        keys = derive_keys(code) if code is not None and not self.store_code else cluster_keys(code)
        self.cluster_code, self.fingerprint = code, keys.fingerprint
        self.keys = None if self.insecure_open else keys

    # ---- state changes (thread-safe) ----------------------------------------------------------------------------

    def set_serving(self, serving: bool) -> concurrent.futures.Future | None:
        """Offer (or stop offering) this node for other nodes' plans; peers see the change within a second.

        Off: the announcement says "not serving" (never planned) and the StageServer refuses new loads and
        sessions from others; this node's own chats run in-process and are not disturbed.
        """
        self._serving = serving
        if self.server is not None:
            self.server.serving = serving
        return self._reannounce()

    def set_joined(self, joined: bool) -> concurrent.futures.Future | None:
        """Join the cluster (announce and serve) or leave it (goodbye packets, refuse new work from others).

        The window's "Join this cluster" toggle. Leaving is more than set_serving(False): peers drop this node from
        their lists at once, and nothing re-announces it (a --max-memory change, a new node id, a new address)
        until set_joined(True). This node's own chats keep running either way.
        """
        self._joined = joined
        self._serving = joined
        if self.server is not None:
            self.server.serving = joined
        if self.capacity is not None:
            self.info = replace(self._own_info(), name=self.name)
        if self.discovery is None or self.loop is None or self.loop.is_closed():
            return None
        return asyncio.run_coroutine_threadsafe(self._announce() if joined else self.discovery.withdraw(), self.loop)

    def set_cluster_code(self, code: str) -> concurrent.futures.Future | None:
        """Join the cluster of `code` (stored for next time): new keys, so the mesh server and discovery restart."""
        code = load_or_create_code(code)
        if self.loop is None or self.loop.is_closed():
            self.cluster_code = code
            return None

        async def switch() -> None:
            await self._stop_services()
            for key in self.directory.keys():   # judged against the old cluster's fingerprint
                self.directory.remove(key)
            self._use_cluster(code)
            self.info = replace(self._own_info(), name=self.name)
            await self._start_services()
        return asyncio.run_coroutine_threadsafe(switch(), self.loop)

    def set_max_memory(self, max_memory: int | None) -> concurrent.futures.Future | None:
        """Change the --max-memory cap; the offered memory is re-announced."""
        self.max_memory = max_memory
        return self._reannounce()

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def joined(self) -> bool:
        """False after set_joined(False): not announced (peers do not list it) and not serving."""
        return self._joined

    @property
    def offered_memory(self) -> int | None:
        return self.info.offered_memory if self.info is not None else None

    def peers(self) -> list[PeerInfo]:
        return self.directory.peers()

    def rtt_s(self, node_id: str) -> float | None:
        """The round trip to a peer, in seconds, from its latest authenticated ping (proof of an announcement, or a
        static peer's poll); None when none measured it. The planner predicts each hop's latency from it."""
        return self._rtts.get(node_id)

    def silent_static_peers(self) -> set[tuple[str, int]]:
        """Static --peers (host, port) whose last ping went unanswered: down, unreachable, or of another cluster
        (CURVE lets no stranger in, and says nothing to one)."""
        return set(self._silent_static)

    def unproven_peers(self) -> list[str]:
        """Names announced with this cluster's fingerprint that did not (yet) answer an authenticated ping: anyone on
        the LAN can copy the fingerprint, so these are never planned."""
        return self.discovery.unproven() if self.discovery is not None else []

    def proving_peers(self) -> bool:
        """Whether an announcement of this cluster is still on its first authenticated ping (planning waits)."""
        return self.discovery is not None and self.discovery.proving()

    def call(self, coroutine, timeout: float | None = None):
        """Run a coroutine on the node's loop from another thread and wait for its result."""
        if self.loop is None:
            raise CakeError(f"node {self.name} is not running: call start() first")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _reannounce(self) -> concurrent.futures.Future | None:
        if self.capacity is None:
            return None
        self.info = replace(self._own_info(), name=self.name)
        if self.server is not None:
            self.server.set_budget(self.info.offered_memory)
        if self.discovery is None or self.loop is None or self.loop.is_closed() or not self._joined:
            return None   # a node that left the cluster stays withdrawn until set_joined(True)
        return asyncio.run_coroutine_threadsafe(self._announce(), self.loop)

    @property
    def offered_bytes(self) -> int:
        """What this node lends to model parts now (its --max-memory cap applied)."""
        assert self.capacity is not None, "start() first"
        return offered_memory(self.capacity, self.max_memory)

    async def _announce(self) -> None:
        """(Re-)announce self.info; after a withdraw the name is probed again and may change."""
        if not self._joined or self.discovery is None:   # left meanwhile (set_joined(False) raced a re-announce)
            return
        await self.discovery.announce(self.info)
        if self.discovery.instance_name and self.discovery.instance_name != self.name:
            self.name = self.discovery.instance_name
            if self.server is not None:
                self.server.name = self.name
            self.info = replace(self.info, name=self.name)

    def _on_duplicate_id(self, clone: PeerInfo) -> None:
        old_id = self.node_id
        self.node_id = identity.regenerate_node_id(self.config_dir) if self._stored_identity else uuid.uuid4().hex
        if self.server is not None:
            self.server.node_id = self.node_id
        log.warning("node id %s is also used by %r (%s): this node now has id %s", old_id[:8], clone.name,
                    clone.address, self.node_id[:8])
        self._reannounce()

    def _on_addresses_changed(self, addresses: list[str]) -> None:
        if self.info is not None:
            self.info = replace(self.info, address=addresses[0], addresses=tuple(addresses))

    def _own_info(self) -> PeerInfo:
        assert self.capacity is not None
        addresses = (self.discovery.addresses if self.discovery else announce_addresses(self.interfaces)) \
            or ["127.0.0.1"]
        cap = self.capacity
        return PeerInfo(
            name=self.name, node_id=self.node_id, address=addresses[0], port=self.port, version=__version__,
            protocol_version=PROTOCOL_VERSION, cluster_fingerprint=self.fingerprint,
            accelerator=cap.accelerator, device_name=cap.device_name, ram_total=cap.ram_total,
            ram_available=cap.ram_available, vram_total=cap.vram_total, vram_free=cap.vram_free,
            offered_memory=offered_memory(cap, self.max_memory), gflops=cap.gflops, bandwidth=cap.bandwidth,
            serving=self._serving, status="ok", addresses=tuple(addresses))

    def startup_message(self) -> str:
        """One line: who we are, where, what we offer, and how other machines join."""
        info = self.info
        assert info is not None
        endpoint = f"{info.address}:{info.port}"
        security_mode = "INSECURE, no encryption" if self.keys is None else "CURVE-encrypted"
        listening = listen_host(self.interfaces) or "all interfaces"
        how = ("other machines running `cakep2p --serve` on this network with this cluster's pairing code join "
               "automatically; " if self.discovery_enabled else "discovery is off (--no-discovery); ")
        return (f"node {info.name!r} (id {info.node_id[:8]}) serving at {endpoint}, offering "
                f"{format_size(info.offered_memory)} ({info.accelerator}: {info.device_name}), cluster "
                f"{info.cluster_fingerprint}; mesh on {listening} port {info.port} ({security_mode}); {how}"
                f"where multicast is blocked use --peers {endpoint}; "
                f"pairing code: run `cakep2p code` on this machine, then `cakep2p code --set CODE` on the others")
