"""The window's menu bar (File, Models, Help) and the About box: the version and where the documentation is."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QAction, QDesktopServices, QKeySequence
from PySide6.QtWidgets import QMainWindow, QMessageBox

REPO = Path(__file__).resolve().parents[2]
DOCS = (("README: installing, pairing, the command line", "README.md"),
        ("The wire protocol", "docs/protocol.md"),
        ("Security and the threat model", "docs/security.md"),
        ("Building the double-click app", "packaging/README.md"))
Slot = Callable[[], object]


def doc_links() -> list[tuple[str, Path]]:
    """The documentation files next to this package (a source checkout has them; an installed app may not)."""
    return [(title, REPO / relative) for title, relative in DOCS if (REPO / relative).is_file()]


def about_text() -> str:
    from cakep2p import __version__

    links = "".join(f"<li><a href='{QUrl.fromLocalFile(str(path)).toString()}'>{title}</a></li>"
                    for title, path in doc_links())
    docs = (f"<p>Documentation:</p><ul>{links}</ul>" if links else
            "<p>The documentation (README.md, docs/) is in the project's source repository.</p>")
    return (f"<h3>cakep2p {__version__}</h3>"
            "<p>Run one large language model across the ordinary machines you own: every machine runs the same app, "
            "they find each other on the local network, and the model's layers are split over the memory each "
            "offers. Models and chats stay on your machines.</p>"
            f"{docs}<p>The headless node: <code>cakep2p --serve</code>; the command line: <code>cakep2p --help</code>."
            "</p><p>MIT license.</p>")


def show_about(window: QMainWindow) -> None:
    box = QMessageBox(window)
    box.setWindowTitle("About cakep2p")
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setText(about_text())
    box.setStandardButtons(QMessageBox.StandardButton.Close)
    box.exec()


def _add(menu, window: QMainWindow, title: str, slot: Slot, shortcut=None) -> QAction:
    action = QAction(title, window)
    if shortcut is not None:
        action.setShortcut(shortcut)
    action.triggered.connect(lambda _checked=False: slot())
    menu.addAction(action)
    return action


def build_menus(window: QMainWindow, *, open_model: Slot, open_folder: Slot, library: Slot, export: Slot,
                new_chat: Slot, node_settings: Slot) -> None:
    keys = QKeySequence.StandardKey
    file_menu = window.menuBar().addMenu("&File")
    _add(file_menu, window, "New chat", new_chat, keys.New)
    _add(file_menu, window, "Open model…", open_model, keys.Open)
    _add(file_menu, window, "Open model folder…", open_folder)
    _add(file_menu, window, "Export chat as Markdown…", export, keys.Save)
    file_menu.addSeparator()
    _add(file_menu, window, "This machine…", node_settings)
    file_menu.addSeparator()
    _add(file_menu, window, "Quit", window.close, keys.Quit)
    models = window.menuBar().addMenu("&Models")
    _add(models, window, "Model library…", library, QKeySequence("Ctrl+L"))
    help_menu = window.menuBar().addMenu("&Help")
    for title, path in doc_links():
        _add(help_menu, window, title, lambda target=path: QDesktopServices.openUrl(QUrl.fromLocalFile(str(target))))
    if doc_links():
        help_menu.addSeparator()
    _add(help_menu, window, "About cakep2p", lambda: show_about(window))
