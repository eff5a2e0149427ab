"""This machine's node controls: the offered-memory slider (with the current model's live fit) and the settings that
apply at the next start (name, interface, port). They only show values and forward intents; the window saves them
per machine and the bridge applies the offer to the running node."""

from __future__ import annotations

import socket

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                               QPushButton, QSlider, QSpinBox, QVBoxLayout, QWidget)

from cakep2p.gui.preferences import Preferences
from cakep2p.mesh.parts_cache import cache_summary
from cakep2p.units import format_size

STEP_BYTES = 64 * 1024 * 1024      # the slider moves in 64 MiB steps
APPLY_DELAY_MS = 400               # a new offer applies once the slider rests this long


def interface_choices() -> list[tuple[str, str]]:
    """(label, IPv4 address) for every interface with one; the address is what --interface takes."""
    import psutil

    choices = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        for address in addresses:
            if address.family == socket.AF_INET:
                choices.append((f"{name} ({address.address})", address.address))
    return choices


class OfferSlider(QWidget):
    """"Offers [slider] 4 GiB of 20.1 GiB" and the current model's fit at that offer."""

    offerChosen = Signal(object)      # bytes, or None for "all it can spare" (applied after the slider rests)
    offerMoved = Signal(object)       # bytes (an int beyond 32 bits), while it moves (for the live fit)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.spare = 0
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setEnabled(False)
        self.slider.setToolTip("How much memory this machine lends to model parts (yours and the cluster's).\n"
                               "All the way right: everything it can spare now.")
        self.value_label = QLabel("—")
        self.value_label.setMinimumWidth(150)
        self.fit_label = QLabel("")
        self.fit_label.setWordWrap(True)
        self.fit_label.setStyleSheet("color: #4b5563;")
        self._apply = QTimer(self)
        self._apply.setSingleShot(True)
        self._apply.setInterval(APPLY_DELAY_MS)
        self._apply.timeout.connect(lambda: self.offerChosen.emit(self.offer()))
        self.slider.valueChanged.connect(self._moved)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Offers"))
        row.addWidget(self.slider, 1)
        row.addWidget(self.value_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.fit_label)

    def set_range(self, spare: int, offer: int | None) -> None:
        """What the machine can spare, and what it offers now (None: all of it); moves no offer."""
        self.spare = max(STEP_BYTES, spare)
        self.slider.blockSignals(True)
        self.slider.setRange(0, self.spare // STEP_BYTES)
        self.slider.setValue(self.slider.maximum() if offer is None else min(offer, self.spare) // STEP_BYTES)
        self.slider.blockSignals(False)
        self.slider.setEnabled(True)
        self._show_value()

    def offer(self) -> int | None:
        """Bytes offered, or None when the slider is at its end (whatever the machine can spare, now and later)."""
        if self.slider.value() >= self.slider.maximum():
            return None
        return self.slider.value() * STEP_BYTES

    def offered_bytes(self) -> int:
        offer = self.offer()
        return self.spare if offer is None else offer

    def set_value(self, offered: int | None) -> None:
        """Move the slider as the user would (the offer applies after the pause)."""
        self.slider.setValue(self.slider.maximum() if offered is None else offered // STEP_BYTES)

    def show_fit(self, text: str, fits: bool) -> None:
        color = "#2e7d32" if fits else "#c62828"
        self.fit_label.setText(f"<span style='color:{color}'>{text}</span>" if text else "")

    def _moved(self, _value: int) -> None:
        self._show_value()
        self.offerMoved.emit(self.offered_bytes())
        self._apply.start()

    def _show_value(self) -> None:
        shown = "all it can spare" if self.offer() is None else format_size(self.offered_bytes())
        self.value_label.setText(f"{shown} of {format_size(self.spare)}")


class NodeSettingsDialog(QDialog):
    """Name, interface and port of this machine's node, saved for the next start."""

    saved = Signal(object)            # Preferences

    def __init__(self, preferences: Preferences, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("This machine")
        self.preferences = preferences
        self.name_edit = QLineEdit(preferences.node_name or "")
        self.name_edit.setPlaceholderText(socket.gethostname())
        self.interface_combo = QComboBox()
        self.interface_combo.addItem("every interface", None)
        for label, address in interface_choices():
            self.interface_combo.addItem(label, address)
        found = self.interface_combo.findData(preferences.interface)
        if preferences.interface and found < 0:
            self.interface_combo.addItem(f"{preferences.interface} (not on this machine now)", preferences.interface)
            found = self.interface_combo.count() - 1
        self.interface_combo.setCurrentIndex(max(0, found))
        self.port_box = QSpinBox()
        self.port_box.setRange(0, 65535)
        self.port_box.setSpecialValueText("default (a free one if taken)")
        self.port_box.setValue(preferences.port or 0)
        note = QLabel("These apply the next time cakep2p starts. The memory this machine offers changes at once "
                      "with the slider in the Cluster panel.")
        note.setWordWrap(True)
        note.setStyleSheet("color: #6b7280;")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self._save)
        buttons.rejected.connect(self.reject)
        form = QFormLayout()
        form.addRow("Name", self.name_edit)
        form.addRow("Interface", self.interface_combo)
        form.addRow("Port", self.port_box)
        form.addRow("Parts cache", QLabel(cache_summary()))   # weights received from peers, least recent go first
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(buttons)

    def chosen(self) -> Preferences:
        from dataclasses import replace

        return replace(self.preferences, node_name=self.name_edit.text().strip() or None,
                       interface=self.interface_combo.currentData(), port=self.port_box.value() or None)

    def _save(self) -> None:
        self.saved.emit(self.chosen())
        self.accept()


def settings_button() -> QPushButton:
    button = QPushButton("This machine…")
    button.setToolTip("Name, network interface and port of this machine's node (they apply at the next start)")
    return button
