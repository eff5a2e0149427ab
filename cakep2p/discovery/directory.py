"""The live peers: what discovery (mDNS) and the node's static-peer pinger found, keyed by where they came from;
thread-safe, with listeners for the window and the planner."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Literal

from cakep2p.discovery.records import PeerInfo

log = logging.getLogger(__name__)

Event = Literal["added", "updated", "removed"]
STATIC_KEY = "static "  # keys of static --peers entries start with this; mDNS keys are instance names


class PeerDirectory:
    """Peers by key: mDNS instance names (Discovery manages those through mdns_keys/put/remove) and static
    --peers entries (STATIC_KEY + host:port, which only the node's pinger adds and removes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, PeerInfo] = {}
        self._listeners: list[Callable[[str, PeerInfo], None]] = []

    def add_listener(self, callback: Callable[[str, PeerInfo], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str, PeerInfo], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def peers(self) -> list[PeerInfo]:
        with self._lock:
            return sorted(self._peers.values(), key=lambda peer: (peer.name.lower(), peer.node_id))

    def usable(self) -> list[PeerInfo]:
        """Peers that may be planned: same cluster, same protocol, serving."""
        return [peer for peer in self.peers() if peer.status == "ok" and peer.serving]

    def get(self, node_id: str) -> PeerInfo | None:
        return next((peer for peer in self.peers() if peer.node_id == node_id), None)

    def put(self, key: str, peer: PeerInfo) -> Event | None:
        with self._lock:
            previous = self._peers.get(key)
            if previous == peer:
                return None
            self._peers[key] = peer
        event: Event = "added" if previous is None else "updated"
        self._notify(event, peer)
        return event

    def remove(self, key: str) -> PeerInfo | None:
        with self._lock:
            peer = self._peers.pop(key, None)
        if peer is not None:
            self._notify("removed", peer)
        return peer

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._peers)

    def mdns_keys(self) -> list[str]:
        return [key for key in self.keys() if not key.startswith(STATIC_KEY)]

    def _notify(self, event: Event, peer: PeerInfo) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event, peer)
            except Exception:  # a broken listener must not break discovery
                log.exception("peer listener %r failed on %s %s", listener, event, peer.name)
