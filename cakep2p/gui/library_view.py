"""The model library: the recommended models (cakep2p.library.catalog), one row per format, with its size, whether
this cluster can hold it (the planner's verdict over this machine's and its usable peers' offers) and whether it is
on this machine; Download (with progress, Cancel, resume), Use, and a field for any other hub model."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QHBoxLayout, QHeaderView, QLabel, QLineEdit, QProgressBar,
                               QPushButton, QTableView, QVBoxLayout, QWidget)

from cakep2p.library import catalog
from cakep2p.library.catalog import CatalogEntry, Variant
from cakep2p.units import format_size

AnyIndex = QModelIndex | QPersistentModelIndex
HEADERS = ("Model", "Size", "Format", "This cluster", "On this machine")
INTRO = ("Recommended instruction-tuned models. Sizes are approximate; “This cluster” is the planner's verdict over "
         "the memory this machine and its peers offer now, at a 4096-token context.")
HUB_HELP = ("Downloads come from the Hugging Face Hub (or $HF_ENDPOINT) into this machine's models folder; a "
            "cancelled download continues where it stopped.")


def approx(size: int) -> str:
    """"≈105 MB", "≈4.7 GB": the decimal units the hub shows."""
    return f"≈{size / 1e9:.2g} GB" if size >= 1e9 else f"≈{size / 1e6:.3g} MB"


class LibraryModel(QAbstractTableModel):
    """(entry, variant) rows; the window feeds it fits and what is on this machine."""

    EntryRole = Qt.ItemDataRole.UserRole + 1
    VariantRole = Qt.ItemDataRole.UserRole + 2

    def __init__(self, entries: tuple[CatalogEntry, ...] = catalog.CATALOG, parent=None):
        super().__init__(parent)
        self.rows: list[tuple[CatalogEntry, Variant]] = [(entry, variant) for entry in entries
                                                           for variant in entry.variants]
        self.fits: dict[tuple[str, str], Any] = {}       # (entry key, format) -> library.fit.Fit
        self.local: dict[str, str] = {}                   # repo -> its path here (downloaded)
        self.partial: dict[str, int] = {}                 # repo -> bytes of an unfinished download
        self.progress: dict[str, tuple[int, int]] = {}    # repo -> (done, total) while it downloads

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(HEADERS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return HEADERS[section] if 0 <= section < len(HEADERS) else None
        return None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self.rows):
            return None
        entry, variant = self.rows[index.row()]
        column = HEADERS[index.column()]
        if role == self.EntryRole:
            return entry
        if role == self.VariantRole:
            return variant
        fit = self.fits.get((entry.key, variant.format))
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(column, entry, variant, fit)
        if role == Qt.ItemDataRole.ForegroundRole and column == "This cluster" and fit is not None:
            return QBrush(QColor("#2e7d32" if fit.fits else "#c62828"))
        if role == Qt.ItemDataRole.ForegroundRole and column == "On this machine" and variant.repo in self.local:
            return QBrush(QColor("#1d4ed8"))
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{entry.title}: {entry.summary}\n{variant.repo} ({entry.license})"
        return None

    def _text(self, column: str, entry: CatalogEntry, variant: Variant, fit: Any) -> str:
        if column == "Model":
            return entry.title
        if column == "Size":
            return approx(variant.approx_bytes)
        if column == "Format":
            return variant.label
        if column == "This cluster":
            return "…" if fit is None else fit.text
        return self.state_text(variant.repo)

    def state_text(self, repo: str) -> str:
        if repo in self.progress:
            done, total = self.progress[repo]
            return f"downloading {done * 100 // max(1, total)}%"
        if repo in self.local:
            return "downloaded"
        if self.partial.get(repo):
            return f"{format_size(self.partial[repo])} here: Download continues"
        return "—"

    # Fed by the window --------------------------------------------------------------------------------
    def set_fits(self, fits: dict[tuple[str, str], Any]) -> None:
        self.fits = dict(fits)
        self._column_changed("This cluster")

    def set_local(self, local: dict[str, str], partial: dict[str, int]) -> None:
        self.local, self.partial = dict(local), dict(partial)
        self._column_changed("On this machine")

    def set_progress(self, repo: str, done: int | None, total: int = 0) -> None:
        if done is None:
            self.progress.pop(repo, None)
        else:
            self.progress[repo] = (done, total)
        self._column_changed("On this machine")

    def repos(self) -> list[str]:
        return list(dict.fromkeys(variant.repo for _entry, variant in self.rows))

    def _column_changed(self, header: str) -> None:
        if self.rows:
            column = HEADERS.index(header)
            self.dataChanged.emit(self.index(0, column), self.index(len(self.rows) - 1, column))


class LibraryDialog(QDialog):
    """The library window: the table, the chosen model's details, and its actions."""

    downloadRequested = Signal(str, object)   # repo, patterns
    cancelRequested = Signal()
    useRequested = Signal(str)                # a downloaded model's path
    shown = Signal()

    def __init__(self, model: LibraryModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Model library")
        self.resize(860, 560)
        self.model = model
        self.downloading: str | None = None
        self.table = QTableView()
        self.table.setModel(model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 10)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(HEADERS.index("This cluster"), QHeaderView.ResizeMode.Stretch)
        self.table.selectionModel().currentRowChanged.connect(lambda *_: self._show_selected())
        self.table.doubleClicked.connect(lambda *_: self._primary())
        self._build_actions()
        self._layout()
        for signal in (model.dataChanged, model.modelReset):
            signal.connect(lambda *_: self._show_selected())
        self.table.selectRow(0)

    def _build_actions(self) -> None:
        self.details = QLabel()
        self.details.setWordWrap(True)
        self.details.setTextFormat(Qt.TextFormat.RichText)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.download_button = QPushButton("Download")
        self.download_button.clicked.connect(self._download_selected)
        self.cancel_button = QPushButton("Cancel download")
        self.cancel_button.clicked.connect(self.cancelRequested)
        self.use_button = QPushButton("Use this model")
        self.use_button.setDefault(True)
        self.use_button.clicked.connect(self._use_selected)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.setVisible(False)
        self.load_now_button = QPushButton("Load it now")
        self.load_now_button.setVisible(False)
        self.load_now_button.clicked.connect(lambda: self.useRequested.emit(self.downloaded_path))
        self.downloaded_path = ""
        self.hub_edit = QLineEdit()
        self.hub_edit.setPlaceholderText("any other model on the hub: owner/name, e.g. Qwen/Qwen3-0.6B")
        self.hub_edit.returnPressed.connect(self._download_other)
        self.hub_button = QPushButton("Download")
        self.hub_button.clicked.connect(self._download_other)

    def _layout(self) -> None:
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        intro.setStyleSheet("color: #4b5563;")
        help_label = QLabel(HUB_HELP)
        help_label.setWordWrap(True)
        help_label.setStyleSheet("color: #6b7280; font-size: 11px;")
        actions = QHBoxLayout()
        actions.addWidget(self.progress, 1)
        actions.addWidget(self.download_button)
        actions.addWidget(self.cancel_button)
        actions.addWidget(self.use_button)
        other = QHBoxLayout()
        other.addWidget(self.hub_edit, 1)
        other.addWidget(self.hub_button)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.details)
        message_row = QHBoxLayout()
        message_row.addWidget(self.message, 1)
        message_row.addWidget(self.load_now_button)
        layout.addLayout(message_row)
        layout.addLayout(actions)
        layout.addLayout(other)
        layout.addWidget(help_label)

    def selected(self) -> tuple[CatalogEntry, Variant] | None:
        index = self.table.currentIndex()
        if not index.isValid():
            return None
        return index.data(LibraryModel.EntryRole), index.data(LibraryModel.VariantRole)

    def select(self, key: str, model_format: str) -> None:
        for row, (entry, variant) in enumerate(self.model.rows):
            if entry.key == key and variant.format == model_format:
                self.table.selectRow(row)

    def show_progress(self, repo: str, done: int, total: int) -> None:
        self.downloading = repo
        self.progress.setVisible(True)
        scale = max(1, total // 1_000_000)
        self.progress.setRange(0, max(1, total // scale))
        self.progress.setValue(done // scale)
        self.progress.setFormat(f"{repo.rpartition('/')[2]}: {format_size(done)} of {format_size(total)} (%p%)")
        self._show_selected()

    def show_message(self, text: str, kind: str = "info", downloaded: str = "") -> None:
        """One line under the details: a download's end (done, with a button to load it; stopped) or why it could
        not go on."""
        color = {"error": "#8a1c1c", "info": "#1e3a8a"}[kind]
        self.message.setText(text)
        self.message.setStyleSheet(f"color: {color};")
        self.message.setVisible(bool(text))
        self.downloaded_path = downloaded
        self.load_now_button.setVisible(bool(downloaded))

    def show_ended(self) -> None:
        self.downloading = None
        self.progress.setVisible(False)
        self._show_selected()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        super().showEvent(event)
        self.shown.emit()

    def _show_selected(self) -> None:
        chosen = self.selected()
        self.cancel_button.setVisible(self.downloading is not None)
        if chosen is None:
            return
        entry, variant = chosen
        fit = self.model.fits.get((entry.key, variant.format))
        here = self.model.local.get(variant.repo)
        self.details.setText(
            f"<b>{entry.title}</b> · {entry.parameters} parameters · {variant.label}, {approx(variant.approx_bytes)} · "
            f"{entry.license}<br>{entry.summary}<br><span style='color:#6b7280'>{variant.repo}"
            f"{' · here: ' + here if here else ''}</span>"
            + (f"<br>This cluster: <b>{fit.text}</b>" if fit is not None else ""))
        self.use_button.setEnabled(here is not None)
        self.download_button.setEnabled(here is None and self.downloading is None)
        self.download_button.setText("Continue download" if self.model.partial.get(variant.repo) else "Download")
        self.hub_button.setEnabled(self.downloading is None)

    def _primary(self) -> None:
        chosen = self.selected()
        if chosen is not None and chosen[1].repo in self.model.local:
            self._use_selected()
        else:
            self._download_selected()

    def _download_selected(self) -> None:
        chosen = self.selected()
        if chosen is not None and self.downloading is None:
            self.downloadRequested.emit(chosen[1].repo, chosen[1].patterns)

    def _download_other(self) -> None:
        repo = self.hub_edit.text().strip()
        if self.downloading is None:
            gguf = repo.lower().endswith("gguf")   # a GGUF repository: its Q4_K_M file, else a Hugging Face folder
            self.downloadRequested.emit(repo, catalog.GGUF_Q4_K_M if gguf else catalog.SAFETENSORS_FILES)

    def _use_selected(self) -> None:
        chosen = self.selected()
        if chosen is not None and chosen[1].repo in self.model.local:
            self.useRequested.emit(self.model.local[chosen[1].repo])
