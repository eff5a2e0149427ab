"""The re-plan offer: when usable machines join while a model is loaded and its plan does not use them, the window
asks once ("2 machines joined: spread the model over them?"); accepting loads the model again over the cluster and
keeps the chat. Lives on the UI thread, fed by the bridge's peer events and plans."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

SETTLE_MS = 1500    # machines often arrive together: ask once the directory has been quiet this long


def usable(peer: Any) -> bool:
    return peer.status == "ok" and bool(peer.serving) and peer.offered_memory > 0


class ReplanOffer(QObject):
    offered = Signal(str, object)     # the question, the node ids it is about

    def __init__(self, parent: QObject | None = None, settle_ms: int = SETTLE_MS):
        super().__init__(parent)
        self.peers: dict[str, Any] = {}       # usable peers by node id
        self.in_plan: set[str] = set()        # nodes the loaded model's plan uses
        self.model_loaded = False
        self.busy = False                      # loading: no offer meanwhile
        self._asked: set[str] = set()          # nodes already offered (accepted or not), until they leave
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(settle_ms)
        self._timer.timeout.connect(self._maybe_offer)

    def peer_event(self, event: str, peer: Any) -> None:
        if event == "removed" or not usable(peer):
            self.peers.pop(peer.node_id, None)
            if event == "removed":
                self._asked.discard(peer.node_id)
            return
        if peer.node_id not in self.peers:
            self.peers[peer.node_id] = peer
            self._timer.start()
        else:
            self.peers[peer.node_id] = peer

    def plan_changed(self, nodes: set[str]) -> None:
        self.in_plan = set(nodes)

    def set_model(self, loaded: bool, busy: bool = False) -> None:
        """A model loaded (the peers it was planned over were considered: only later ones are offered), is loading,
        or failed to."""
        self.model_loaded, self.busy = loaded, busy
        if loaded and not busy:
            self._asked |= set(self.peers) - self.in_plan

    def waiting(self) -> list[Any]:
        """Usable peers the loaded model does not use and the user was not asked about yet."""
        return [peer for node_id, peer in sorted(self.peers.items())
                if node_id not in self.in_plan and node_id not in self._asked]

    def answered(self, node_ids: list[str]) -> None:
        self._asked.update(node_ids)

    def _maybe_offer(self) -> None:
        joined = self.waiting()
        if not self.model_loaded or self.busy or not joined:
            return
        names = ", ".join(peer.name for peer in joined[:3]) + (f" and {len(joined) - 3} more" if len(joined) > 3
                                                                 else "")
        count = "1 machine" if len(joined) == 1 else f"{len(joined)} machines"
        self.offered.emit(f"{count} joined ({names}): spread the model over them? The chat stays.",
                          [peer.node_id for peer in joined])
