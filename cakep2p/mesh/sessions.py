"""Whose is what on a stage: the owner of a connection (its lease's client id, lease.py), when each owner was last
heard, and the sessions, each found only under its owner. Pure state; the server decides when to expire.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from cakep2p import wire
from cakep2p.mesh.lease import LEASE_PREFIX, ROUTING_ID_BYTES

Owner = bytes


def owner_of(routing_id: bytes) -> Owner:
    """The owner a connection acts for: the client id in a lease's routing id, else the connection itself (a
    routing id the ROUTER made up, or a client's own; marked so it can never equal a lease's client id)."""
    if len(routing_id) == ROUTING_ID_BYTES and routing_id.startswith(LEASE_PREFIX):
        return routing_id[:-4]
    return b"\x00" + routing_id


def owner_label(owner: Owner) -> str:
    """A short name for logs that says nothing of the client id itself."""
    return "client " + hashlib.sha256(owner).hexdigest()[:8]


class Leases:
    """When each owner was last heard (any frame from any of its connections)."""

    def __init__(self) -> None:
        self._heard: dict[Owner, float] = {}

    def heard(self, owner: Owner, now: float | None = None) -> None:
        self._heard[owner] = time.monotonic() if now is None else now

    def alive(self, owner: Owner, deadline: float) -> bool:
        return self._heard.get(owner, float("-inf")) >= deadline

    def lapsed(self, owners, deadline: float) -> set[Owner]:
        """Those of `owners` not heard since `deadline` (monotonic)."""
        return {owner for owner in owners if not self.alive(owner, deadline)}

    def forget_before(self, deadline: float) -> None:
        """Stop tracking owners silent since `deadline`: their state is gone (or about to be)."""
        for owner in [owner for owner, heard in self._heard.items() if heard < deadline]:
            del self._heard[owner]

    def __len__(self) -> int:
        return len(self._heard)


@dataclass
class Session:
    """One owner's KV cache on one part: positions [0, position) are cached."""

    owner: Owner
    session_id: str
    ref: wire.PartRef
    max_seq_len: int
    kv_bytes: int
    cache: object | None = None
    position: int = 0
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


class Sessions:
    """The sessions of a stage by (owner, session id, part): nobody reaches another owner's session."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[Owner, str, wire.PartRef], Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def get(self, owner: Owner, session_id: str, ref: wire.PartRef) -> Session | None:
        return self._sessions.get((owner, session_id, ref))

    def add(self, session: Session) -> None:
        self._sessions[(session.owner, session.session_id, session.ref)] = session

    def kv_bytes(self) -> int:
        return sum(session.kv_bytes for session in list(self._sessions.values()))

    def owners(self) -> set[Owner]:
        return {key[0] for key in self._sessions}

    def drop(self, owner: Owner | None = None, session_id: str | None = None, ref: wire.PartRef | None = None,
             *, keep_busy: bool = False) -> int:
        """Drop the sessions that match every given key (a busy one stays when keep_busy); returns how many."""
        # comprehensions only: a loop variable left holding a session would keep its KV cache alive
        keys = [key for key, session in self._sessions.items()
                if (owner is None or key[0] == owner) and (session_id is None or key[1] == session_id)
                and (ref is None or key[2] == ref) and not (keep_busy and session.busy)]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def idle_since(self, deadline: float) -> list[tuple[Owner, str, wire.PartRef]]:
        """The keys of sessions not busy and unused since `deadline`."""
        return [key for key, session in self._sessions.items() if not session.busy and session.last_used < deadline]

    def drop_keys(self, keys) -> None:
        for key in keys:
            self._sessions.pop(key, None)
