"""The model picker: a local folder (dialog + recent list) or a hub id, its size and fit, load progress, plan bar."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton,
                               QSizePolicy, QVBoxLayout, QWidget)

from cakep2p.gui.state import ModelInfo, ModelPreview, PlanView
from cakep2p.gui.plan_bar import PlanBar

HUB_HELP = ("Downloading from the Hugging Face Hub needs the optional huggingface_hub package and an internet "
            "connection; offline, copy the model folder here and choose it instead.")


class ModelPanel(QWidget):
    inspectRequested = Signal(str)
    loadRequested = Signal(str)
    downloadRequested = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.folder_combo = QComboBox()
        self.folder_combo.setEditable(True)
        self.folder_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.folder_combo.lineEdit().setPlaceholderText("a Hugging Face model folder (config.json, *.safetensors)")
        self.folder_combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.folder_combo.activated.connect(lambda _row: self._inspect_current())
        self.folder_combo.lineEdit().returnPressed.connect(self._inspect_current)
        self.browse_button = QPushButton("Choose folder…")
        self.browse_button.clicked.connect(self.choose_folder)
        self.load_button = QPushButton("Load")
        self.load_button.setDefault(True)
        self.load_button.clicked.connect(self._request_load)

        self.hub_edit = QLineEdit()
        self.hub_edit.setPlaceholderText("or a Hugging Face id, e.g. Qwen/Qwen3-0.6B")
        self.hub_edit.returnPressed.connect(self._request_download)
        self.download_button = QPushButton("Download")
        self.download_button.setToolTip(HUB_HELP)
        self.download_button.clicked.connect(self._request_download)
        self.hub_help = QLabel(HUB_HELP)
        self.hub_help.setWordWrap(True)
        self.hub_help.setStyleSheet("color: #6b7280; font-size: 11px;")

        self.verdict = QLabel("Choose a model to see its size and whether the cluster can hold it.")
        self.verdict.setWordWrap(True)
        self._transfers: dict[str, tuple[int, int]] = {}
        self._loading = False
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setVisible(False)
        self.plan_bar = PlanBar()

        title = QLabel("Model")
        title.setStyleSheet("font-size: 15px; font-weight: 700;")
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_combo, 1)
        folder_row.addWidget(self.browse_button)
        folder_row.addWidget(self.load_button)
        hub_row = QHBoxLayout()
        hub_row.addWidget(self.hub_edit, 1)
        hub_row.addWidget(self.download_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(title)
        layout.addLayout(folder_row)
        layout.addLayout(hub_row)
        layout.addWidget(self.hub_help)
        layout.addWidget(self.verdict)
        layout.addWidget(self.progress)
        layout.addWidget(self.plan_bar)

    def folder(self) -> str:
        return self.folder_combo.currentText().strip()

    def set_recent(self, folders: list[str]) -> None:
        current = self.folder()
        self.folder_combo.clear()
        self.folder_combo.addItems(folders)
        self.folder_combo.setEditText(current or (folders[0] if folders else ""))

    def set_folder(self, folder: str) -> None:
        self.folder_combo.setEditText(folder)
        self._inspect_current()

    def choose_folder(self) -> None:
        start = self.folder() or str(Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Choose a Hugging Face model folder", start)
        if folder:
            self.set_folder(folder)

    def show_preview(self, preview: ModelPreview, loaded: bool) -> None:
        color = "#2e7d32" if preview.fits else "#c62828"
        self.verdict.setText(f"<b>{preview.name}</b> ({preview.architecture}): "
                             f"<span style='color:{color}'>{preview.verdict}</span>")
        if not loaded:
            self.plan_bar.set_plan(preview.plan)

    def show_loading(self, what: str) -> None:
        self._transfers = {}
        self._loading = True
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)
        self.progress.setFormat(f"Loading {Path(what).name or what}…")
        self.load_button.setEnabled(False)
        self.download_button.setEnabled(False)

    def show_progress(self, done: int, total: int, what: str) -> None:
        """One part's progress (`what` names it, e.g. the peer a part goes to); the bar shows all parts summed."""
        self.progress.setVisible(True)
        if total > 0:
            self._transfers[what] = (min(done, total), total)
            done_sum = sum(part_done for part_done, _ in self._transfers.values())
            total_sum = sum(part_total for _, part_total in self._transfers.values())
            scale = max(1, total_sum // 1_000_000)   # QProgressBar holds ints
            self.progress.setRange(0, total_sum // scale)
            self.progress.setValue(done_sum // scale)
            self.progress.setFormat(f"Loading parts ({', '.join(self._transfers)}): %p%")
            if not self._loading and done_sum >= total_sum:   # a re-plan's transfers after loading: done
                self._transfers = {}
                self.progress.setVisible(False)
        else:
            self.progress.setRange(0, 0)
            self.progress.setFormat(f"{what}…")

    def show_loaded(self, info: ModelInfo) -> None:
        self._idle()
        mode = "chat" if info.has_chat_template else "raw completion (the model has no chat template)"
        self.verdict.setText(f"<b>{info.name}</b> loaded: {info.num_layers} layers, context {info.context} "
                             f"tokens, {mode}.")

    def show_failed(self, message: str) -> None:
        self._idle()
        self.verdict.setText(f"<span style='color:#c62828'>{message}</span>")

    def show_plan(self, plan: PlanView | None) -> None:
        self.plan_bar.set_plan(plan)

    def _idle(self) -> None:
        self._loading = False
        self._transfers = {}
        self.progress.setVisible(False)
        self.load_button.setEnabled(True)
        self.download_button.setEnabled(True)

    def _inspect_current(self) -> None:
        if self.folder():
            self.inspectRequested.emit(self.folder())

    def _request_load(self) -> None:
        if self.folder():
            self.loadRequested.emit(self.folder())
        else:
            self.choose_folder()

    def _request_download(self) -> None:
        self.downloadRequested.emit(self.hub_edit.text().strip())
