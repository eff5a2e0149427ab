"""Discovery test kit: loopback multicast, `cakep2p --serve` subprocesses that are always killed, wait-until helpers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from cakep2p.discovery import Discovery, PeerDirectory, PeerInfo

REPO = Path(__file__).resolve().parents[1]
SEEDED_GFLOPS = 12.5
SEEDED_BANDWIDTH = 3.25e9


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> object:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def loopback_multicast_on() -> None:
    """mDNS on 127.0.0.1 needs the MULTICAST flag on lo (`ip link set lo multicast on`); skip if we cannot set it."""
    flags = Path("/sys/class/net/lo/flags")
    if flags.exists() and int(flags.read_text(), 16) & 0x1000:
        return
    result = subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"loopback multicast is off and cannot be enabled: {result.stderr.strip()}")


def seed_benchmark(home: Path) -> None:
    """Pre-store the speed benchmark in a node home: fast start, and known gflops/bandwidth to check."""
    from cakep2p.discovery import capacity

    cap = capacity.probe(run_benchmark=False)
    cache = home / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    key = capacity.benchmark_key(cap.accelerator, cap.device_name)
    (cache / capacity.BENCHMARK_FILE).write_text(
        json.dumps({key: {"gflops": SEEDED_GFLOPS, "bandwidth": SEEDED_BANDWIDTH}}))


@dataclass
class ServeProcess:
    name: str
    home: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    address: str = "127.0.0.1"
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def joined(self, name: str) -> re.Match | None:
        return re.search(rf"peer joined: '{re.escape(name)}' \(id \w+\) at ([\d.]+):(\d+)", self.log())

    def started(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"node {self.name} exited with {self.process.returncode}:\n{self.log()}")
        return "serving at" in self.log()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass


def start_serve(tmp_path: Path, name: str | None, port: int | None, *, interface: str = "127.0.0.1", code: str,
                args: tuple[str, ...] = (), env: dict | None = None, netns: str | None = None,
                home: Path | None = None) -> ServeProcess:
    """Start `python -m cakep2p --serve` with its own CAKEP2P_HOME; the caller must kill() it (use serve_nodes)."""
    home = home or tmp_path / f"home-{name or 'default'}"
    home.mkdir(parents=True, exist_ok=True)
    seed_benchmark(home)
    log_path = tmp_path / f"{name or 'default'}.log"
    child_env = {**os.environ, "CAKEP2P_HOME": str(home), "CAKEP2P_CLUSTER_CODE": code, "PYTHONUNBUFFERED": "1",
                 "OMP_NUM_THREADS": "1", **(env or {})}
    if not interface:  # the all-interfaces default: announced only inside a namespace the test made
        assert netns or "--no-discovery" in args, "a node on all interfaces must run in a test network namespace"
        child_env.pop("CAKEP2P_INTERFACE", None)
    command = [sys.executable, "-m", "cakep2p", "--serve", *args]
    command += ["--name", name] if name else []
    command += ["--port", str(port)] if port else []
    if interface:
        command += ["--interface", interface]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=child_env, stdout=log_file, stderr=subprocess.STDOUT)
    return ServeProcess(name or "", home, port or 0, process, log_path, address=interface or "")


class Browser:
    """An in-process Discovery on its own loop thread that only browses; `directory` shows what it sees."""

    def __init__(self, cluster_fingerprint: str, interfaces: list[str] | None = None) -> None:
        self.directory = PeerDirectory()
        self.events: list[tuple[str, PeerInfo]] = []
        self.directory.add_listener(lambda event, peer: self.events.append((event, peer)))
        self._discovery = Discovery(self.directory, cluster_fingerprint, interfaces or ["127.0.0.1"])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._discovery.start(), self._loop).result(10)

    def peer(self, name: str) -> PeerInfo | None:
        return next((peer for peer in self.directory.peers() if peer.name == name), None)

    def ignored(self) -> set[str]:
        """Instance names whose announcements were seen and rejected as not valid cakep2p records."""
        return {name.split(".")[0] for name in list(self._discovery._ignored)}

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._discovery.stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it, so parallel tests rarely collide)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_leaked_threads():
    """Fail a test that leaves threads running (node loops, zeroconf loops, browsers)."""
    before = set(threading.enumerate())
    yield
    def leaked() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
    deadline = time.monotonic() + 5
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaked(), f"threads left running: {[thread.name for thread in leaked()]}"
