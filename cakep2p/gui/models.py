"""The chat's Qt item model: the list the chat view shows, following the window's Transcript on the UI thread (the
peers table's models are in peers_model.py). It holds display state only.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractListModel, QModelIndex, QPersistentModelIndex, Qt, QTimer

from cakep2p.gui.transcript import ChatMessage, Transcript

AnyIndex = QModelIndex | QPersistentModelIndex


class ChatModel(QAbstractListModel):
    """The list views show of a Transcript: one row per message, following the transcript's changes as they come.

    It holds no messages of its own. Streamed text is in the transcript at once, but `dataChanged` for the
    streaming row is emitted at most every `render_interval_ms`, so views re-render Markdown a few times a
    second, never once per token.
    """

    RoleRole = Qt.ItemDataRole.UserRole + 1
    StreamingRole = Qt.ItemDataRole.UserRole + 2
    StatusRole = Qt.ItemDataRole.UserRole + 3

    def __init__(self, transcript: Transcript, parent=None, render_interval_ms: int = 100):
        super().__init__(parent)
        self.transcript = transcript
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.setInterval(render_interval_ms)
        self._flush_timer.timeout.connect(self._flush)
        self._dirty_row = -1
        transcript.aboutToInsert.connect(self._before_insert)
        transcript.inserted.connect(self._after_insert)
        transcript.aboutToRemove.connect(self._before_remove)
        transcript.removed.connect(self._after_remove)
        transcript.aboutToReplace.connect(self._before_replace)
        transcript.replaced.connect(self._after_replace)
        transcript.changed.connect(self._on_changed)

    # Qt model interface -------------------------------------------------------------------------
    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.transcript)

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self.transcript) or index.column() != 0:
            return None
        message = self.transcript.message(index.row())
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return message.text
        if role == Qt.ItemDataRole.ToolTipRole:
            return message.status or None
        if role == self.RoleRole:
            return message.role
        if role == self.StreamingRole:
            return message.streaming
        if role == self.StatusRole:
            return message.status
        return None

    def roleNames(self) -> dict[int, bytes]:
        names = dict(super().roleNames())
        names.update({self.RoleRole: b"role", self.StreamingRole: b"streaming", self.StatusRole: b"status"})
        return names

    # Reading the transcript -------------------------------------------------------------------------
    def messages(self) -> list[ChatMessage]:
        return self.transcript.messages()

    def message(self, row: int) -> ChatMessage:
        return self.transcript.message(row)

    # Following the transcript -----------------------------------------------------------------------
    def _before_insert(self, first: int, last: int) -> None:
        self._flush()
        self.beginInsertRows(QModelIndex(), first, last)

    def _after_insert(self, _first: int, _last: int) -> None:
        self.endInsertRows()

    def _before_remove(self, first: int, last: int) -> None:
        self._flush()
        self.beginRemoveRows(QModelIndex(), first, last)

    def _after_remove(self, _first: int, _last: int) -> None:
        self.endRemoveRows()

    def _before_replace(self) -> None:
        self._flush_timer.stop()
        self._dirty_row = -1
        self.beginResetModel()

    def _after_replace(self) -> None:
        self.endResetModel()

    def _on_changed(self, row: int) -> None:
        """A streaming row is re-shown at the next throttle tick; any other change at once."""
        if self._dirty_row not in (-1, row):
            self._flush()
        self._dirty_row = row
        if not self.transcript.message(row).streaming:
            self._flush()
        elif not self._flush_timer.isActive():
            self._flush_timer.start()

    def _flush(self) -> None:
        self._flush_timer.stop()
        row, self._dirty_row = self._dirty_row, -1
        if 0 <= row < len(self.transcript):
            index = self.index(row, 0)
            self.dataChanged.emit(index, index)
