"""The initiator's lease: what a stage keeps for us (sessions, loaded parts, transfers) stays ours only while we
are heard.

A Lease is a random 128-bit client id. Every DEALER opened under it carries the id in its ZeroMQ routing id (`l` +
16 bytes + a 4-byte connection number), which travels inside the CURVE handshake: the other members never learn
it, so none of them can continue, end or inspect what is ours. A stage counts any frame from any of our connections
as a renewal and drops everything of ours once we have been silent for its lease time (a few seconds). While a
pipeline or a model is open, a keeper thread sends a heartbeat on each of its idle connections every KEEP_ALIVE_S.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import logging
import secrets
import threading
from typing import Protocol

log = logging.getLogger(__name__)

LEASE_PREFIX = b"l"
TOKEN_BYTES = 16
ROUTING_ID_BYTES = len(LEASE_PREFIX) + TOKEN_BYTES + 4
KEEP_ALIVE_S = 1.0


class Kept(Protocol):
    """A connection the keeper heartbeats (StageClient)."""

    def keep_alive(self, idle_s: float) -> None: ...


class Lease:
    """One client id, the routing ids of its connections, and a keeper thread for the connections kept alive."""

    def __init__(self, keep_alive_s: float = KEEP_ALIVE_S) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.keep_alive_s = keep_alive_s
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._kept: list[Kept] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lease({len(self._kept)} kept)"   # never the token: it is what makes our state ours

    @property
    def owner(self) -> bytes:
        """What a stage knows us by: our routing ids less their connection number (sessions.owner_of)."""
        return LEASE_PREFIX + self.token

    def routing_id(self) -> bytes:
        """A fresh routing id for one connection under this lease."""
        with self._lock:
            number = next(self._numbers) % (1 << 32)
        return LEASE_PREFIX + self.token + number.to_bytes(4, "big")

    def keep(self, client: Kept) -> None:
        """Heartbeat `client` whenever it has been idle for keep_alive_s, until released."""
        with self._lock:
            if client not in self._kept:
                self._kept.append(client)
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name="cakep2p-lease-keeper",
                                                daemon=True)
                self._thread.start()

    def release(self, client: Kept) -> None:
        """Stop heartbeating `client`; the keeper thread ends with the last one."""
        with self._lock:
            if client in self._kept:
                self._kept.remove(client)
            thread = self._thread if not self._kept else None
            if thread is not None:
                self._thread = None
                self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def close(self) -> None:
        """Release every kept connection (the stages drop our state once the lease time passes)."""
        with self._lock:
            kept = list(self._kept)
        for client in kept:
            self.release(client)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.keep_alive_s):
            with self._lock:
                kept = list(self._kept)
            for client in kept:
                try:
                    client.keep_alive(self.keep_alive_s)
                except Exception:  # one broken connection must not end the others' lease
                    log.debug("keep-alive of %r failed", client, exc_info=True)


@functools.lru_cache(maxsize=1024)   # a stage matches every relayed forward against its owners' tags
def owner_tag(owner: bytes) -> str:
    """How a relayed forward names its owner: a hash that a stage holding the owner's state can match, and from which
    nobody learns the owner (so a relaying member cannot act as the owner anywhere)."""
    return hashlib.sha256(b"cakep2p owner tag " + owner).hexdigest()


def chain_grant(owner: bytes, session_id: str, part_digest: str, start: int, end: int) -> str:
    """The owner's permission for whoever relays to drive one session on one part of one stage: an HMAC under the
    owner that only the owner can make and any stage knowing the owner can check."""
    message = f"chain {session_id} {part_digest} {start} {end}".encode()
    return hmac.new(owner, message, hashlib.sha256).hexdigest()


_process_lease: Lease | None = None
_process_lock = threading.Lock()


def process_lease() -> Lease:
    """The lease of clients opened without one (probes, tools): one per process, kept alive only by requests."""
    global _process_lease
    with _process_lock:
        if _process_lease is None:
            _process_lease = Lease()
        return _process_lease
