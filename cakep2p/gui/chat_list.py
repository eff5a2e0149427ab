"""The chat list sidebar: the stored chats, most recent first (ChatListModel over ChatHistory), to switch to, rename
or delete; the chat on screen is highlighted. The panel only forwards intents; the window carries them out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractListModel, QModelIndex, QPersistentModelIndex, QPoint, Qt, Signal
from PySide6.QtGui import QAction, QFont
from PySide6.QtWidgets import (QAbstractItemView, QInputDialog, QLabel, QListView, QMenu, QMessageBox, QPushButton,
                               QVBoxLayout, QWidget)

from cakep2p.gui.history import ChatHistory, ChatLog

AnyIndex = QModelIndex | QPersistentModelIndex


def when(timestamp: float, now: float | None = None) -> str:
    """"14:05" today, "Mon 14:05" this week, "2024-03-01" before."""
    now = time.time() if now is None else now
    moment, today = time.localtime(timestamp), time.localtime(now)
    if moment[:3] == today[:3]:
        return time.strftime("%H:%M", moment)
    if now - timestamp < 6 * 86400:
        return time.strftime("%a %H:%M", moment)
    return time.strftime("%Y-%m-%d", moment)


class ChatListModel(QAbstractListModel):
    """One row per stored chat (ChatLog), most recently changed first; `current` is the path on screen."""

    PathRole = Qt.ItemDataRole.UserRole + 1
    LogRole = Qt.ItemDataRole.UserRole + 2

    def __init__(self, history: ChatHistory, parent=None):
        super().__init__(parent)
        self.history = history
        self.current: Path | None = None
        self._logs: list[ChatLog] = []

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._logs)

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._logs):
            return None
        log = self._logs[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return log.title
        if role == Qt.ItemDataRole.ToolTipRole:
            details = [part for part in (log.model, when(log.updated)) if part]
            return f"{log.title}\n{' · '.join(details)}\n{len(log.messages)} messages"
        if role == Qt.ItemDataRole.FontRole and log.path == self.current:
            font = QFont()
            font.setBold(True)
            return font
        return {self.PathRole: str(log.path), self.LogRole: log}.get(role)

    def roleNames(self) -> dict[int, bytes]:
        names = dict(super().roleNames())
        names.update({self.PathRole: b"path", self.LogRole: b"log"})
        return names

    def logs(self) -> list[ChatLog]:
        return list(self._logs)

    def row_of(self, path: str | Path) -> int:
        return next((row for row, log in enumerate(self._logs) if log.path == Path(path)), -1)

    def refresh(self) -> None:
        """Read the stored chats again (a new chat's first message, a rename, a delete)."""
        self.beginResetModel()
        self._logs = [log for log in self.history.chats() if log.messages]
        self.endResetModel()

    def set_current(self, path: str | Path | None) -> None:
        self.current = Path(path) if path is not None else None
        if self._logs:
            self.dataChanged.emit(self.index(0), self.index(len(self._logs) - 1))


class ChatListPanel(QWidget):
    """"New chat" and the list of stored chats; a click opens one, its context menu renames or deletes it."""

    newRequested = Signal()
    openRequested = Signal(object)               # ChatLog
    renameRequested = Signal(str, str)           # path, title
    deleteRequested = Signal(str)                # path

    def __init__(self, model: ChatListModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = model
        self.new_button = QPushButton("+  New chat")
        self.new_button.setStyleSheet("QPushButton { padding: 6px; font-weight: 600; }")
        self.new_button.clicked.connect(self.newRequested)
        self.list = QListView()
        self.list.setModel(model)
        self.list.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setUniformItemSizes(True)
        self.list.setWordWrap(False)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setStyleSheet("QListView { border: none; background: transparent; } "
                                "QListView::item { padding: 6px 4px; }")
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.list.clicked.connect(self._open)
        self.empty = QLabel("Your chats appear here.")
        self.empty.setStyleSheet("color: #6b7280; padding: 6px;")
        self.empty.setWordWrap(True)
        title = QLabel("Chats")
        title.setStyleSheet("font-size: 15px; font-weight: 700;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 0, 8)
        layout.addWidget(title)
        layout.addWidget(self.new_button)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.empty)
        for signal in (model.modelReset, model.rowsInserted, model.rowsRemoved):
            signal.connect(self._update_empty)
        self._update_empty()

    def _open(self, index: QModelIndex) -> None:
        log = index.data(ChatListModel.LogRole)
        if log is not None:
            self.openRequested.emit(log)

    def _menu(self, position: QPoint) -> None:
        index = self.list.indexAt(position)
        if not index.isValid():
            return
        menu = QMenu(self)
        for title, slot in (("Open", lambda: self._open(index)), ("Rename…", lambda: self.ask_rename(index)),
                            ("Delete…", lambda: self.ask_delete(index))):
            action = QAction(title, menu)
            action.triggered.connect(slot)
            menu.addAction(action)
        menu.exec(self.list.viewport().mapToGlobal(position))

    def ask_rename(self, index: QModelIndex) -> None:
        old = str(index.data() or "")
        title, accepted = QInputDialog.getText(self, "Rename chat", "Name:", text=old)
        if accepted:
            self.renameRequested.emit(str(index.data(ChatListModel.PathRole)), title)

    def ask_delete(self, index: QModelIndex) -> None:
        answer = QMessageBox.question(self, "Delete chat", f"Delete “{index.data()}” for good?")
        if answer == QMessageBox.StandardButton.Yes:
            self.deleteRequested.emit(str(index.data(ChatListModel.PathRole)))

    def _update_empty(self, *_args) -> None:
        self.empty.setVisible(self.model.rowCount() == 0)
