"""The model library's flow on the UI thread: the dialog (made when first opened), its model, the downloads, and the
bridge's checks of what fits and what is here. The window only opens it and loads what the user picks."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QWidget

from cakep2p.gui.downloads import Downloads
from cakep2p.gui.library_view import LibraryDialog, LibraryModel


class LibraryController(QObject):
    useRequested = Signal(str)            # a downloaded model to load

    def __init__(self, bridge: Any, window: QWidget):
        super().__init__(window)
        self.bridge = bridge
        self.window = window
        self.model = LibraryModel(parent=self)
        self.downloads = Downloads(self)
        self.dialog: LibraryDialog | None = None
        bridge.libraryChecked.connect(self._on_checked)
        self.downloads.progressed.connect(self._on_progress)
        self.downloads.finished.connect(self._on_finished)
        self.downloads.cancelled.connect(lambda repo, message: self._on_ended(repo, message, "info"))
        self.downloads.failed.connect(lambda repo, message: self._on_ended(repo, message, "error"))

    def open(self) -> LibraryDialog:
        """Show the library (made on first use), with fresh fits and download states."""
        if self.dialog is None:
            self.dialog = LibraryDialog(self.model, self.window)
            self.dialog.downloadRequested.connect(self.download)
            self.dialog.cancelRequested.connect(self.downloads.cancel)
            self.dialog.useRequested.connect(self._use)
            self.dialog.shown.connect(self.refresh)
        self.dialog.show()
        self.dialog.raise_()
        self.dialog.activateWindow()
        return self.dialog

    def refresh(self) -> None:
        """Ask the bridge again what fits the cluster now and what is on this machine."""
        self.bridge.check_library(self.model.repos())

    def download(self, repo: str, patterns: Any) -> None:
        self._say("")
        if self.downloads.start(repo, patterns) is not None and self.dialog is not None:
            self.dialog.show_progress(repo, 0, 1)

    def shutdown(self) -> None:
        self.downloads.shutdown()

    def _on_checked(self, fits: dict, local: dict, partial: dict) -> None:
        self.model.set_fits(fits)
        self.model.set_local(local, partial)

    def _on_progress(self, repo: str, done: int, total: int) -> None:
        self.model.set_progress(repo, done, total)
        if self.dialog is not None:
            self.dialog.show_progress(repo, done, total)

    def _on_finished(self, repo: str, path: str) -> None:
        self.model.set_progress(repo, None)
        self.model.set_local({**self.model.local, repo: path}, {key: value for key, value in self.model.partial.items()
                                                                 if key != repo})
        self._say(f"{repo} is downloaded ({path}).", "info", downloaded=path)
        if self.dialog is not None:
            self.dialog.show_ended()
        self.refresh()

    def _on_ended(self, repo: str, message: str, kind: str) -> None:
        self.model.set_progress(repo, None)
        self._say(message[:1].upper() + message[1:], kind)
        if self.dialog is not None:
            self.dialog.show_ended()
        self.refresh()

    def _say(self, text: str, kind: str = "info", downloaded: str = "") -> None:
        if self.dialog is not None:
            self.dialog.show_message(text, kind, downloaded)

    def _use(self, path: str) -> None:
        self.useRequested.emit(path)
        if self.dialog is not None:
            self.dialog.hide()
