"""The chat on screen, kept once: the list model shows it, the history log stores it, the engine is handed it.

A Transcript lives on the UI thread. Every change goes through one of its operations, which announces itself
with signals the way a Qt item model does (about-to / done pairs, so a view adapter can follow row by row) and
says when the history changed: the user and assistant messages the model reads and the log keeps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Literal

from PySide6.QtCore import QObject, Signal

ChatRole = Literal["user", "assistant", "notice"]
MessageState = Literal["done", "streaming", "queued", "failed"]


@dataclass(frozen=True)
class ChatMessage:
    """One row of the chat; `status` carries an answer's timing line or how it ended.

    `state`: "done" (part of the history), "streaming" (an answer arriving), "queued" (a question typed while the
    model loads) or "failed" (an answer that broke off: shown, never sent to the model again).
    """

    role: ChatRole
    text: str
    state: MessageState = "done"
    status: str = ""

    @property
    def streaming(self) -> bool:
        return self.state == "streaming"

    @property
    def in_history(self) -> bool:
        """Whether the model reads it and the log keeps it."""
        return self.role != "notice" and self.state == "done"


class Transcript(QObject):
    """User and assistant messages plus inline notices, in order; changed only on the UI thread."""

    aboutToInsert = Signal(int, int)    # first, last row
    inserted = Signal(int, int)
    aboutToRemove = Signal(int, int)
    removed = Signal(int, int)
    aboutToReplace = Signal()
    replaced = Signal()
    changed = Signal(int)               # a row's text, state or status
    historyChanged = Signal()           # the messages `history()` returns are others now

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._messages: list[ChatMessage] = []

    # Reading ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._messages)

    def messages(self) -> list[ChatMessage]:
        return list(self._messages)

    def message(self, row: int) -> ChatMessage:
        return self._messages[row]

    def history(self) -> list[dict[str, str]]:
        """The chat as the engine's Conversation and the log take it: user and assistant messages, oldest first."""
        return [{"role": message.role, "content": message.text} for message in self._messages if message.in_history]

    def streaming_row(self) -> int:
        return next((row for row in range(len(self._messages) - 1, -1, -1) if self._messages[row].streaming), -1)

    def can_regenerate(self) -> bool:
        return self._answer_to_regenerate() >= 0

    # One operation each ------------------------------------------------------------------------------
    def append(self, role: ChatRole, text: str = "", *, state: MessageState = "done", status: str = "") -> int:
        row = len(self._messages)
        message = ChatMessage(role, text, state, status)
        self.aboutToInsert.emit(row, row)
        self._messages.append(message)
        self.inserted.emit(row, row)
        if message.in_history:
            self.historyChanged.emit()
        return row

    def append_text(self, text: str) -> None:
        """Streamed text for the answer being generated."""
        row = self.streaming_row()
        if row >= 0 and text:
            message = self._messages[row]
            self._set(row, dataclasses.replace(message, text=message.text + text))

    def finish_streaming(self, status: str = "", text: str | None = None, *, failed: bool = False) -> None:
        """The streamed answer ended: its final text and status line; a failed one stays out of the history."""
        row = self.streaming_row()
        if row >= 0:
            message = self._messages[row]
            self._set(row, dataclasses.replace(message, text=message.text if text is None else text,
                                               state="failed" if failed else "done", status=status))

    def regenerate(self) -> bool:
        """The last answer streams again in its place; False when there is no answer to a question to redo."""
        row = self._answer_to_regenerate()
        if row >= 0:
            self._set(row, ChatMessage("assistant", "", "streaming"))
        return row >= 0

    def withdraw_answer(self, question_too: bool = False) -> None:
        """The streaming answer leaves the chat, and with `question_too` the question it answers (it did not fit)."""
        row = self.streaming_row()
        if row < 0:
            return
        rows = [row]
        question = next((earlier for earlier in range(row - 1, -1, -1) if self._messages[earlier].role == "user"), -1)
        if question_too and question >= 0:
            rows.append(question)
        self._remove(rows)

    def drop_oldest_turn(self) -> int:
        """Forget the oldest question and its answers, up to the next question (notices stay); how many went."""
        rows: list[int] = []
        for row, message in enumerate(self._messages):
            if message.role == "notice":
                continue
            if rows and message.role == "user":
                break
            rows.append(row)
        self._remove(rows)
        return len(rows)

    def remove_queued(self) -> None:
        """A question typed while the model loaded leaves again (the model did not load)."""
        self._remove([row for row, message in enumerate(self._messages) if message.state == "queued"])

    def replace(self, messages: Iterable[tuple[ChatRole, str]] = ()) -> None:
        """Show another chat: a stored one (its messages) or a new, empty one."""
        self.aboutToReplace.emit()
        self._messages = [ChatMessage(role, text) for role, text in messages]
        self.replaced.emit()
        self.historyChanged.emit()

    # Inside ------------------------------------------------------------------------------------------
    def _answer_to_regenerate(self) -> int:
        """The row of the last answer when it ends the chat (notices aside) and answers a question, else -1."""
        rows = [row for row, message in enumerate(self._messages) if message.role != "notice"]
        if not rows or self._messages[rows[-1]].role != "assistant" or self._messages[rows[-1]].state == "streaming":
            return -1
        asked = [self._messages[row] for row in rows[:-1] if self._messages[row].in_history]
        return rows[-1] if asked and asked[-1].role == "user" else -1

    def _set(self, row: int, message: ChatMessage) -> None:
        before = self._messages[row]
        self._messages[row] = message
        self.changed.emit(row)
        if before.in_history or message.in_history:
            self.historyChanged.emit()

    def _remove(self, rows: list[int]) -> None:
        """Remove `rows` (any order), as runs of neighbouring rows from the end."""
        history_changes = any(self._messages[row].in_history for row in rows)
        for first, last in _runs(sorted(set(rows), reverse=True)):
            self.aboutToRemove.emit(first, last)
            del self._messages[first:last + 1]
            self.removed.emit(first, last)
        if history_changes:
            self.historyChanged.emit()


def _runs(descending: list[int]) -> list[tuple[int, int]]:
    """[7, 6, 3] -> [(6, 7), (3, 3)]: runs of neighbouring rows, the last run first."""
    runs: list[tuple[int, int]] = []
    for row in descending:
        if runs and runs[-1][0] == row + 1:
            runs[-1] = (row, runs[-1][1])
        else:
            runs.append((row, row))
    return runs
