"""The core both shells share: one node's identity, capacity, cluster keys, discovery and asyncio loop thread.

`cakep2p --serve` calls `Node.run_forever()`; the window calls `start()`/`stop()` and listens to
`node.directory`. The mesh plugs in here (see `Node`'s docstring for the seam).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import signal
import socket
import threading
from dataclasses import replace

import psutil

from cakep2p import PROTOCOL_VERSION, __version__, identity, paths
from cakep2p.capacity import Capacity, offered_memory, probe
from cakep2p.discovery import Discovery, PeerDirectory, PeerInfo, announce_addresses
from cakep2p.errors import CakeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 5770
PORT_SEARCH_SPAN = 100


def port_is_free(port: int, host: str = "") -> bool:
    """True when a TCP listener could bind host:port now (SO_REUSEADDR, as ZeroMQ binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe_socket.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def choose_port(requested: int | None, host: str = "") -> int:
    """The requested port if free (CakeError otherwise), else the first free one from DEFAULT_PORT up."""
    if requested is not None:
        if not port_is_free(requested, host):
            raise CakeError(f"port {requested} is already in use on {host or 'this machine'}: "
                            f"choose another with --port, or omit --port to pick a free one")
        return requested
    for port in range(DEFAULT_PORT, DEFAULT_PORT + PORT_SEARCH_SPAN):
        if port_is_free(port, host):
            return port
    raise CakeError(f"no free TCP port in {DEFAULT_PORT}-{DEFAULT_PORT + PORT_SEARCH_SPAN - 1}: pass --port")


def resolve_interfaces(interfaces: list[str] | None) -> list[str] | None:
    """--interface values (IPv4 addresses or interface names such as eth0) -> this machine's IPv4 addresses."""
    if not interfaces:
        return None
    local = {name: [item.address for item in items if item.family == socket.AF_INET]
             for name, items in psutil.net_if_addrs().items()}
    resolved = []
    for item in interfaces:
        if item in local and local[item]:
            resolved += local[item]
        elif any(item in addresses for addresses in local.values()):
            resolved.append(item)
        else:
            known = ", ".join(f"{name} {' '.join(addresses)}" for name, addresses in sorted(local.items()) if addresses)
            raise CakeError(f"no network interface here has the address or name {item!r}: "
                            f"use one of: {known} (see `cakep2p doctor`)")
    return list(dict.fromkeys(resolved))


def cluster_fingerprint(code: str | None) -> str:
    """The announced fingerprint of the cluster whose pairing code is `code` (or the stored one)."""
    from cakep2p.security import cluster_keys

    return cluster_keys(code).fingerprint


class Node:
    """One node's life: identity, capacity, cluster fingerprint, discovery, one asyncio loop in its own thread.

    Seam for the mesh (added by the mesh work, on `self.loop`): bind the ROUTER on `self.port` in `_main`
    before announcing; `static_peers` to dial for capabilities (TODO until the mesh exists: they are only
    logged); methods `load_part(...)`, `forward(...)`, `end_session(...)`, `unload(...)` and the initiator's
    `open_pipeline(plan)`; stop the mesh in `_main`'s finally before discovery says goodbye.
    """

    def __init__(self, name: str | None = None, port: int | None = None, interfaces: list[str] | None = None,
                 max_memory: int | None = None, cluster_code: str | None = None, discovery: bool = True,
                 serving: bool = True, static_peers: list[tuple[str, int]] | None = None) -> None:
        self.name = identity.clean_node_name(name) if name else identity.default_node_name()
        if not self.name:
            raise CakeError(f"node name {name!r} has no usable characters: pass --name with letters or digits")
        self.interfaces = resolve_interfaces(interfaces)
        self.port = choose_port(port, self.interfaces[0] if self.interfaces else "")
        self.max_memory = max_memory
        self.cluster_code = cluster_code
        self.discovery_enabled = discovery
        self.static_peers = list(static_peers or [])
        self.directory = PeerDirectory()
        self.config_dir = paths.config_dir()
        self.node_id = identity.node_id(self.config_dir)
        self.capacity: Capacity | None = None
        self.fingerprint = ""
        self.info: PeerInfo | None = None
        self.discovery: Discovery | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._serving = serving
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ---- life cycle -------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Probe, derive the cluster fingerprint, start the loop thread and announce; returns once announced."""
        self.capacity = probe(self.max_memory)
        self.fingerprint = cluster_fingerprint(self.cluster_code)
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
            if self.discovery_enabled:
                self.discovery = Discovery(self.directory, self.fingerprint, self.interfaces,
                                           on_duplicate_id=self._on_duplicate_id,
                                           on_addresses_changed=self._on_addresses_changed)
                await self.discovery.start()
                await self.discovery.announce(self.info)
                self.name = self.discovery.instance_name or self.name
                self.info = replace(self.info, name=self.name, address=self.discovery.addresses[0],
                                    addresses=tuple(self.discovery.addresses))
            for host, port in self.static_peers:
                log.info("static peer %s:%d noted (contacted over the mesh once it exists)", host, port)
            self._ready.set()
            await self._stopping.wait()
        finally:
            if self.discovery is not None:
                await self.discovery.stop()

    # ---- state changes (thread-safe) ----------------------------------------------------------------------------

    def set_serving(self, serving: bool) -> concurrent.futures.Future | None:
        """Offer (or stop offering) this node for other nodes' plans; peers see the change within a second."""
        self._serving = serving
        return self._reannounce()

    def set_max_memory(self, max_memory: int | None) -> concurrent.futures.Future | None:
        """Change the --max-memory cap; the offered memory is re-announced."""
        self.max_memory = max_memory
        return self._reannounce()

    def refresh_capacity(self) -> concurrent.futures.Future | None:
        """Re-measure free RAM/VRAM (the cached benchmark is kept) and re-announce."""
        current = probe(self.max_memory, run_benchmark=False)
        if self.capacity is not None:
            current = replace(current, gflops=self.capacity.gflops, bandwidth=self.capacity.bandwidth)
        self.capacity = current
        return self._reannounce()

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def offered_memory(self) -> int | None:
        return self.info.offered_memory if self.info is not None else None

    def peers(self) -> list[PeerInfo]:
        return self.directory.peers()

    def call(self, coroutine, timeout: float | None = None):
        """Run a coroutine on the node's loop from another thread and wait for its result."""
        if self.loop is None:
            raise CakeError(f"node {self.name} is not running: call start() first")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _reannounce(self) -> concurrent.futures.Future | None:
        if self.capacity is None:
            return None
        self.info = replace(self._own_info(), name=self.name)
        if self.discovery is None or self.loop is None or self.loop.is_closed():
            return None
        return asyncio.run_coroutine_threadsafe(self._announce(), self.loop)

    async def _announce(self) -> None:
        """(Re-)announce self.info; after a withdraw the name is probed again and may change."""
        await self.discovery.announce(self.info)
        if self.discovery.instance_name and self.discovery.instance_name != self.name:
            self.name = self.discovery.instance_name
            self.info = replace(self.info, name=self.name)

    def _on_duplicate_id(self, clone: PeerInfo) -> None:
        old_id, self.node_id = self.node_id, identity.regenerate_node_id(self.config_dir)
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
        from cakep2p.units import format_size

        info = self.info
        assert info is not None
        endpoint = f"{info.address}:{info.port}"
        how = ("other machines running `cakep2p --serve` on this network join automatically; "
               if self.discovery_enabled else "discovery is off (--no-discovery); ")
        return (f"node {info.name!r} (id {info.node_id[:8]}) serving at {endpoint}, offering "
                f"{format_size(info.offered_memory)} ({info.accelerator}: {info.device_name}), cluster "
                f"{info.cluster_fingerprint}; {how}where multicast is blocked use --peers {endpoint}")
