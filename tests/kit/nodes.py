"""Nodes in this process: a pre-stored speed benchmark for a node home, Nodes on 127.0.0.1, and a Discovery on its
own loop thread that browses (and can announce) like a peer would."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from tests.kit.net import LOOPBACK, free_port

SEEDED_GFLOPS = 12.5
SEEDED_BANDWIDTH = 3.25e9


def seed_benchmark(home: Path) -> None:
    """Pre-store the speed benchmark in a node home: a fast start, and known gflops/bandwidth to check."""
    from cakep2p.discovery import capacity

    cap = capacity.probe(run_benchmark=False)
    cache = home / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    key = capacity.benchmark_key(cap.accelerator, cap.device_name)
    (cache / capacity.BENCHMARK_FILE).write_text(
        json.dumps({key: {"gflops": SEEDED_GFLOPS, "bandwidth": SEEDED_BANDWIDTH}}))


def start_node(home: Path, monkeypatch, code: str, *, max_memory: int | str | None = None, **options):
    """A started in-process Node on 127.0.0.1 with its own home (CAKEP2P_HOME set through monkeypatch) and a free
    port; the caller stops it."""
    from cakep2p.node import Node
    from cakep2p.units import parse_size

    seed_benchmark(home)
    monkeypatch.setenv("CAKEP2P_HOME", str(home))
    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    options.setdefault("port", free_port())
    options.setdefault("interfaces", [LOOPBACK])
    node = Node(cluster_code=code, max_memory=max_memory, **options)
    node.start()
    return node


class Browser:
    """A Discovery on its own loop thread, on 127.0.0.1 unless told: `directory` shows what it sees, `announce`
    puts a PeerInfo on the network as a serving peer would. close() ends the loop and its thread."""

    def __init__(self, cluster_fingerprint: str, interfaces: list[str] | None = None) -> None:
        from cakep2p.discovery import Discovery, PeerDirectory

        self.directory = PeerDirectory()
        self.events: list[tuple[str, object]] = []
        self.directory.add_listener(lambda event, peer: self.events.append((event, peer)))
        self._discovery = Discovery(self.directory, cluster_fingerprint, interfaces or [LOOPBACK])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-browser-loop", daemon=True)
        self._thread.start()
        try:
            self._run(self._discovery.start())
        except BaseException:
            self._end_loop()
            raise

    def _run(self, coroutine, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def announce(self, peer) -> None:
        self._run(self._discovery.announce(peer))

    def peer(self, name: str):
        return next((peer for peer in self.directory.peers() if peer.name == name), None)

    def ignored(self) -> set[str]:
        """Instance names whose announcements were seen and rejected as not valid cakep2p records."""
        return {name.split(".")[0] for name in list(self._discovery._ignored)}

    def close(self) -> None:
        try:
            self._run(self._discovery.stop())
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
