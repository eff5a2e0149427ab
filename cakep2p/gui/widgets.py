"""Small widgets the window is made of: the message input and the dismissable banners (errors, choices, offers)."""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QWidget

BANNER_STYLE = {"error": "background:#fdecea; color:#8a1c1c; border-radius:6px; padding:6px;",
                "choice": "background:#fff7e6; color:#5c3d00; border-radius:6px; padding:6px;",
                "info": "background:#e8f0fe; color:#1e3a8a; border-radius:6px; padding:6px;"}


class MessageInput(QPlainTextEdit):
    """Enter sends, Shift+Enter starts a new line."""

    submitted = Signal()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 (Qt naming)
        shifted = event.modifiers() & Qt.KeyboardModifier.ShiftModifier
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not shifted:
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class Banner(QFrame):
    """A dismissable message line, optionally with action buttons; one message at a time (a new one replaces it)."""

    dismissed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(6, 2, 6, 2)
        self._layout.addWidget(self.label, 1)
        self._buttons: list[QPushButton] = []
        self.kind = ""
        self.setVisible(False)

    def show_message(self, text: str, kind: str = "error",
                     actions: tuple[tuple[str, Callable[[], object]], ...] = (), dismiss: str = "Dismiss") -> None:
        for button in self._buttons:
            button.deleteLater()
        self._buttons = []
        for title, callback in (*actions, (dismiss, None)):
            button = QPushButton(title)
            button.clicked.connect(self.hide)
            button.clicked.connect(self.dismissed if callback is None else callback)
            self._layout.addWidget(button)
            self._buttons.append(button)
        self.kind = kind
        self.setStyleSheet(f"Banner {{ {BANNER_STYLE[kind]} }}")
        self.label.setText(text)
        self.setVisible(True)

    def button(self, title: str) -> QPushButton | None:
        return next((button for button in self._buttons if button.text() == title), None)
