"""The model picker: a .gguf file or a Hugging Face model folder (a dialog, the recent list, or the model library),
its format, size and fit, load progress, and the plan bar."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QHBoxLayout, QLabel, QProgressBar, QPushButton, QSizePolicy,
                               QVBoxLayout, QWidget)

from cakep2p.engine.formats import USER_FORMATS
from cakep2p.gui.plan_bar import PlanBar
from cakep2p.gui.state import ModelInfo, ModelPreview, PlanView

FILE_FILTER = "Models (*.gguf config.json);;GGUF files (*.gguf);;Hugging Face folders (config.json);;All files (*)"
DEMO_NOTE = ("a tiny demo model that ships with cakep2p: it only writes short children's stories. For real chats, "
             "pick a model in the <a href='library'>model library</a>.")


def chosen_model(path: str) -> str:
    """The model a picked file stands for: a .gguf is itself, a config.json (or any file) its folder."""
    picked = Path(path)
    return str(picked) if picked.suffix.lower() == ".gguf" or picked.is_dir() else str(picked.parent)


WEIGHTS_TIP = ("The weight format to load in: auto keeps a GGUF's own quantization and a 16-bit model at 16 bits;\n"
               "int8 holds about twice as much model per machine, int4 about four times.")


class ModelPanel(QWidget):
    inspectRequested = Signal(str)
    loadRequested = Signal(str)
    libraryRequested = Signal()
    weightsChanged = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.folder_combo = QComboBox()
        self.folder_combo.setEditable(True)
        self.folder_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.folder_combo.lineEdit().setPlaceholderText("a .gguf file or a Hugging Face model folder")
        self.folder_combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.folder_combo.setToolTip("Recently used models; type or paste a path, or use Open…")
        self.folder_combo.activated.connect(lambda _row: self._inspect_current())
        self.folder_combo.lineEdit().returnPressed.connect(self._inspect_current)
        self.browse_button = QPushButton("Open…")
        self.browse_button.setToolTip("Open a .gguf file, or the config.json of a Hugging Face model folder")
        self.browse_button.clicked.connect(self.choose_file)
        self.library_button = QPushButton("Library…")
        self.library_button.setToolTip("Recommended models: sizes, whether this cluster can hold them, downloads")
        self.library_button.clicked.connect(self.libraryRequested)
        self.weights_combo = QComboBox()
        self.weights_combo.addItems(USER_FORMATS)
        self.weights_combo.setToolTip(WEIGHTS_TIP)
        self.weights_combo.currentTextChanged.connect(self._weights_changed)
        self.load_button = QPushButton("Load")
        self.load_button.setDefault(True)
        self.load_button.clicked.connect(self._request_load)
        self.verdict = QLabel("Open a model, or pick one in the model library, to see its size and whether the "
                              "cluster can hold it.")
        self.verdict.setWordWrap(True)
        self.verdict.linkActivated.connect(lambda _link: self.libraryRequested.emit())
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
        folder_row.addWidget(self.library_button)
        folder_row.addWidget(self.weights_combo)
        folder_row.addWidget(self.load_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(title)
        layout.addLayout(folder_row)
        layout.addWidget(self.verdict)
        layout.addWidget(self.progress)
        layout.addWidget(self.plan_bar)

    def _weights_changed(self, weights: str) -> None:
        self.weightsChanged.emit(weights)
        self._inspect_current()   # the fit and the plan depend on the format

    def folder(self) -> str:
        """The model chosen: a .gguf file or a model folder."""
        return self.folder_combo.currentText().strip()

    def set_recent(self, models: list[str]) -> None:
        current = self.folder()
        self.folder_combo.clear()
        self.folder_combo.addItems(models)
        self.folder_combo.setEditText(current or (models[0] if models else ""))

    def set_folder(self, model: str) -> None:
        self.folder_combo.setEditText(model)
        self._inspect_current()

    def choose_file(self) -> None:
        start = self.folder() or str(Path.home())
        picked, _filter = QFileDialog.getOpenFileName(self, "Open a model (.gguf, or a folder's config.json)", start,
                                                      FILE_FILTER)
        if picked:
            self.set_folder(chosen_model(picked))

    def choose_folder(self) -> None:
        start = self.folder() or str(Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Open a model folder (Hugging Face, or one holding a .gguf)",
                                                  start)
        if folder:
            self.set_folder(folder)

    def show_preview(self, preview: ModelPreview, loaded: bool) -> None:
        color = "#2e7d32" if preview.fits else "#c62828"
        self.verdict.setText(f"<b>{preview.name}</b> ({preview.architecture}): "
                             f"<span style='color:{color}'>{preview.verdict}</span>")
        if not loaded:
            self.plan_bar.set_plan(preview.plan)

    def show_not_previewed(self, message: str) -> None:
        """The chosen path is no model (yet): said here, beside the path, not as an error."""
        self.verdict.setText(f"<span style='color:#b26a00'>{message}</span>")

    def show_loading(self, what: str) -> None:
        self._transfers = {}
        self._loading = True
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)
        self.progress.setFormat(f"Loading {Path(what).name or what}…")
        self.load_button.setEnabled(False)

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
        demo = f"<br><span style='color:#1e3a8a'>{DEMO_NOTE}</span>" if info.demo else ""
        running = info.description.get("weights", "")
        kernel = info.description.get("kernel", "")
        runs = f" · runs as {running}" + (f" ({kernel})" if kernel else "") if running else ""
        self.verdict.setText(f"<b>{info.name}</b> loaded — {info.facts}{runs} · {info.num_layers} layers · context "
                             f"{info.context} tokens · {info.mode}{demo}")

    def show_failed(self, previous: ModelInfo | None) -> None:
        """Loading failed (the banner says why): the line shows what is still loaded."""
        self._idle()
        if previous is not None:
            self.show_loaded(previous)
        else:
            self.verdict.setText("No model loaded.")

    def show_plan(self, plan: PlanView | None) -> None:
        self.plan_bar.set_plan(plan)

    def _idle(self) -> None:
        self._loading = False
        self._transfers = {}
        self.progress.setVisible(False)
        self.load_button.setEnabled(True)

    def _inspect_current(self) -> None:
        if self.folder():
            self.inspectRequested.emit(self.folder())

    def _request_load(self) -> None:
        if self.folder():
            self.loadRequested.emit(self.folder())
        else:
            self.choose_file()
