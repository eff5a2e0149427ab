"""The cluster side of the window, on the UI thread: the peers table (this machine's row, arrivals, departures, peers
the mesh lost), the left-out notes, the plan in the table's Layers column, this machine's offered memory with the
current model's live fit, the node settings saved for the next start, and the re-plan offer."""

from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import QObject, QTimer

from cakep2p.gui.preferences import Preferences, PreferencesStore
from cakep2p.gui.replan import ReplanOffer
from cakep2p.gui.state import PlanView, planned_nodes, spare_bytes
from cakep2p.gui.widgets import Banner

NOTES_DELAY_MS = 500     # peers often change in bursts: the notes are made again once it is quiet


class ClusterController(QObject):
    def __init__(self, bridge: Any, peers_model: Any, peers_panel: Any, model_panel: Any, offer: Banner,
                 preferences: PreferencesStore, *, reload: Callable[[], None], notice: Callable[[str], None],
                 parent: QObject | None = None):
        super().__init__(parent)
        self.bridge, self.peers_model, self.panel, self.model_panel = bridge, peers_model, peers_panel, model_panel
        self.offer, self.preferences, self.reload, self.notice = offer, preferences, reload, notice
        self.plan: PlanView | None = None
        self.model_name = ""
        self.replan = ReplanOffer(self)
        self.notes_timer = QTimer(self)
        self.notes_timer.setSingleShot(True)
        self.notes_timer.setInterval(NOTES_DELAY_MS)
        self.notes_timer.timeout.connect(bridge.refresh_notes)
        bridge.peerEvent.connect(self._on_peer_event)
        bridge.peersReset.connect(peers_model.clear)
        bridge.ownInfo.connect(self._on_own_info)
        bridge.peerLost.connect(self._on_peer_lost)
        bridge.servingChanged.connect(peers_panel.set_serving)
        bridge.notesChanged.connect(peers_panel.show_notes)
        bridge.nodeStarted.connect(lambda _state: self.notes_timer.start())
        peers_panel.servingRequested.connect(bridge.set_serving)
        peers_panel.codeChangeRequested.connect(bridge.change_cluster)
        peers_panel.showForeignChanged.connect(lambda shown: preferences.update(show_other_clusters=shown))
        peers_panel.offer.offerMoved.connect(self.show_offer_fit)
        peers_panel.offer.offerChosen.connect(self._choose_offer)
        self.replan.offered.connect(self._offer_replan)
        self._offered: list[str] = []          # the nodes of the re-plan offer on show
        offer.dismissed.connect(self._replan_declined)

    # The model's life (the window passes on the bridge's events) ------------------------------------
    def show_plan(self, plan: PlanView | None) -> None:
        """Draw `plan` in the plan bar and the peers table's Layers column, in the same colours."""
        self.plan = plan
        self.model_panel.show_plan(plan)
        layers = plan.layers_by_node() if plan else {}
        bar = self.model_panel.plan_bar
        self.peers_model.set_layers(layers, {node_id: bar.color_of(node_id) for node_id in layers})
        self.replan.plan_changed(planned_nodes(plan))
        self.notes_timer.start()

    def model_loading(self) -> None:
        self.replan.set_model(False, busy=True)
        if self._offered:
            self._offered = []
            self.offer.hide()

    def model_loaded(self, name: str) -> None:
        self.model_name = name
        self.peers_model.clear_lost()          # a new plan: every peer is judged afresh
        self.replan.set_model(True)
        self.show_offer_fit(self.panel.offer.offered_bytes())

    def model_failed(self, still_loaded: bool) -> None:
        self.replan.set_model(still_loaded)

    # Core events ---------------------------------------------------------------------------------
    def _on_peer_event(self, event: str, peer: Any) -> None:
        if event == "removed" and self.plan is not None:
            held = self.plan.layers_by_node().get(peer.node_id)
            if held:
                self.notice(f"{peer.name} (layers {held}) left the cluster.")
        self.peers_model.apply_event(event, peer)
        self.replan.peer_event(event, peer)
        self.show_offer_fit(self.panel.offer.offered_bytes())
        if event == "removed" and peer.node_id in self._offered:   # an offer about machines that left again
            self._offered.remove(peer.node_id)
            if not self._offered:
                self.offer.hide()
        self.notes_timer.start()

    def _on_peer_lost(self, node_id: str) -> None:
        self.peers_model.mark_lost(node_id)
        self.show_offer_fit(self.panel.offer.offered_bytes())

    def _on_own_info(self, info: Any) -> None:
        self.peers_model.set_own(info)
        spare = spare_bytes(self.bridge.node)
        if spare is not None:
            self.panel.offer.set_range(spare, self.bridge.node_options.get("max_memory"))
            self.show_offer_fit(self.panel.offer.offered_bytes())

    # Offered memory and node settings --------------------------------------------------------------
    def show_offer_fit(self, offered: int) -> None:
        """The loaded model's fit if this machine offered `offered` bytes (its peers as they are)."""
        from cakep2p.library.fit import fit

        budgets, sizing = self.bridge.budgets(), self.bridge.sizing
        if budgets is None or sizing is None:
            self.panel.offer.show_fit("", True)
            return
        lost = {peer.node_id for peer in self.peers_model.peers() if self.peers_model.state(peer) == "lost"}
        verdict = fit(sizing[0], sizing[1], budgets.with_own_offer(offered).without(lost))
        self.panel.offer.show_fit(f"{self.model_name}: {verdict.text}", verdict.fits)

    def _choose_offer(self, offer: int | None) -> None:
        self.bridge.set_max_memory(offer)
        self.preferences.update(max_memory=offer)

    def save_node_settings(self, chosen: Preferences) -> None:
        self.preferences.update(node_name=chosen.node_name, interface=chosen.interface, port=chosen.port)
        self.notice("This machine's name, interface and port are saved: they apply the next time cakep2p starts.")

    # The re-plan offer -------------------------------------------------------------------------------
    def _offer_replan(self, question: str, node_ids: list[str]) -> None:
        self._offered = list(node_ids)
        self.offer.show_message(question, "info", actions=(("Spread the model", self._spread),), dismiss="Not now")

    def _spread(self) -> None:
        self.replan.answered(self._offered)
        self._offered = []
        self.reload()

    def _replan_declined(self) -> None:
        self.replan.answered(self._offered)
        self._offered = []
