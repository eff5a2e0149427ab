"""The cluster panel: this machine (its "Join this cluster" toggle, offered memory and settings), the pairing code,
the live peers table (this machine's row first; other clusters folded into one line) and what was left out, why."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QPushButton, QTableView, QVBoxLayout, QWidget)

from cakep2p.gui.node_panel import OfferSlider, settings_button
from cakep2p.gui.peers_model import PeersFilter, PeersModel
from cakep2p.gui.state import NodeState

FOREIGN_HINT = "listed, never used"
WINDOW_PAIRING_HINT = "In this window: paste their pairing code into Pairing code and press Join."

TOGGLE_STYLE = """
QCheckBox { font-weight: 600; spacing: 8px; }
QCheckBox::indicator { width: 34px; height: 18px; border-radius: 9px; background: #cbd5e1; }
QCheckBox::indicator:checked { background: #22c55e; }
"""


class PeersPanel(QWidget):
    servingRequested = Signal(bool)
    codeChangeRequested = Signal(str)
    showForeignChanged = Signal(bool)

    def __init__(self, peers_model: PeersModel, show_foreign: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        self.peers_model = peers_model
        self.current_code = ""
        self.foreign_hint = ""
        self._make_membership()
        self._make_code_row()
        self._make_table(peers_model, show_foreign)

        title = QLabel("Cluster")
        title.setStyleSheet("font-size: 15px; font-weight: 700;")
        top = QHBoxLayout()
        top.addWidget(title)
        top.addStretch(1)
        top.addWidget(self.node_button)
        top.addWidget(self.join_toggle)
        code_row = QHBoxLayout()
        code_row.addWidget(QLabel("Pairing code:"))
        code_row.addWidget(self.code_edit, 1)
        code_row.addWidget(self.copy_button)
        code_row.addWidget(self.join_code_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.self_label)
        layout.addWidget(self.offer)
        layout.addLayout(code_row)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.empty_hint)
        foreign_row = QHBoxLayout()
        foreign_row.addWidget(self.foreign_label, 1)
        foreign_row.addWidget(self.show_foreign, 0, Qt.AlignmentFlag.AlignTop)
        layout.addLayout(foreign_row)
        layout.addWidget(self.notes_label)

    def _make_membership(self) -> None:
        """This machine's line and the "Join this cluster" toggle."""
        self.self_label = QLabel("Starting this node…")
        self.self_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.join_toggle = QCheckBox("Join this cluster")
        self.join_toggle.setStyleSheet(TOGGLE_STYLE)
        self.join_toggle.setEnabled(False)
        self.join_toggle.setToolTip("On: this machine announces itself and holds parts of models for the cluster.\n"
                                    "Off: it stops announcing and refuses new work; your own chat keeps running.")
        self.join_toggle.toggled.connect(self._on_toggled)
        self.node_button = settings_button()
        self.offer = OfferSlider()

    def _make_code_row(self) -> None:
        """The pairing code: shown, copied, or replaced by another cluster's."""
        self.code_edit = QLineEdit()
        self.code_edit.setPlaceholderText("pairing code, e.g. amber-falcon-river-tulip-maple-orbit-048213")
        self.code_edit.setToolTip("Every machine of one cluster uses the same pairing code.\n"
                                  "Paste another cluster's code and press Join to move this machine there.")
        self.code_edit.textEdited.connect(self._on_code_edited)
        self.code_edit.returnPressed.connect(self._request_code_change)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the pairing code, to type or paste it on your other machines")
        self.copy_button.clicked.connect(self.copy_code)
        self.join_code_button = QPushButton("Join")
        self.join_code_button.setToolTip("Join the cluster of the code typed here")
        self.join_code_button.setEnabled(False)
        self.join_code_button.clicked.connect(self._request_code_change)

    def _make_table(self, peers_model: PeersModel, show_foreign: bool) -> None:
        """The live peers table (fitting its pane), its fold for other clusters, the left-out notes, the empty hint."""
        self.peers_filter = PeersFilter(peers_model, self)
        self.peers_filter.set_show_foreign(show_foreign)
        self.table = QTableView()
        self.table.setModel(self.peers_filter)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.show_foreign = QCheckBox("Show them")
        self.show_foreign.setChecked(show_foreign)
        self.show_foreign.setToolTip("Machines on this network with another pairing code: listed, never used")
        self.show_foreign.toggled.connect(self.peers_filter.set_show_foreign)
        self.show_foreign.toggled.connect(self.showForeignChanged)
        self.show_foreign.toggled.connect(self._update_hint)
        self.foreign_label = QLabel()
        self.foreign_label.setWordWrap(True)
        self.foreign_label.setStyleSheet("color: #b26a00;")
        self.notes_label = QLabel()
        self.notes_label.setWordWrap(True)
        self.notes_label.setStyleSheet("color: #6b7280;")
        self.notes_label.setVisible(False)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideRight)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)   # the name takes what is left, elided
        header.setMinimumSectionSize(36)
        self.empty_hint = QLabel("No other machines yet. Start cakep2p on another computer of this network "
                                 "with the same pairing code, and it appears here.")
        self.empty_hint.setWordWrap(True)
        self.empty_hint.setStyleSheet("color: #6b7280;")
        for signal in (peers_model.rowsInserted, peers_model.rowsRemoved, peers_model.modelReset,
                       peers_model.dataChanged):
            signal.connect(self._update_hint)
        self._update_hint()

    def show_node(self, state: NodeState) -> None:
        self.self_label.setText(f"This machine: <b>{state.name}</b> · port {state.port} · "
                                f"cluster {state.fingerprint}")
        self.current_code = state.code
        self.code_edit.setText(state.code)
        self.code_edit.setCursorPosition(0)
        self.join_code_button.setEnabled(False)
        self.join_toggle.setEnabled(True)

    def show_node_failed(self) -> None:
        """The node did not start (the banner says why): this machine chats alone."""
        self.self_label.setText("<span style='color:#c62828'>This machine is not in a cluster.</span>")

    def show_notes(self, foreign: str, others: list[str]) -> None:
        """What was heard but left out, and why (the core's notes): the other clusters' hint goes on their folded
        line, every other reason below it."""
        self.foreign_hint = foreign
        self.notes_label.setText("\n".join(f"• {note}" for note in others))
        self.notes_label.setVisible(bool(others))
        self._update_hint()

    def set_serving(self, serving: bool) -> None:
        """Reflect the core's state without echoing a request back."""
        self.join_toggle.blockSignals(True)
        self.join_toggle.setChecked(serving)
        self.join_toggle.blockSignals(False)
        self.join_toggle.setEnabled(True)

    def copy_code(self) -> None:
        QGuiApplication.clipboard().setText(self.code_edit.text().strip())

    def _on_toggled(self, checked: bool) -> None:
        self.join_toggle.setEnabled(False)  # until the core confirms
        self.servingRequested.emit(checked)

    def _on_code_edited(self, text: str) -> None:
        self.join_code_button.setEnabled(bool(text.strip()) and text.strip() != self.current_code)

    def _request_code_change(self) -> None:
        code = self.code_edit.text().strip()
        if code and code != self.current_code:
            self.join_code_button.setEnabled(False)
            self.codeChangeRequested.emit(code)

    def _update_hint(self, *_args) -> None:
        self.empty_hint.setVisible(not self.peers_model.peers())
        foreign = self.peers_model.foreign_count()
        machines = "1 machine" if foreign == 1 else f"{foreign} machines"
        hidden = "" if self.show_foreign.isChecked() else " (hidden)"
        self.foreign_label.setText(f"<b>{machines} of other clusters</b>{hidden}: "
                                   f"{self.foreign_hint.rstrip('.') if self.foreign_hint else FOREIGN_HINT}. "
                                   f"{WINDOW_PAIRING_HINT}")
        self.foreign_label.setVisible(foreign > 0)
        self.show_foreign.setVisible(foreign > 0)
