"""The transcript view: a QListView over ChatModel whose delegate draws each message as a Markdown bubble, with a
Copy button on every code block (and "Copy message" in the view's context menu).

Documents are cached per row and rebuilt only when the model says a row changed (the model throttles
that while streaming); the view follows new text unless the user has scrolled up.
"""

from __future__ import annotations

from PySide6.QtCore import QEvent, QModelIndex, QPersistentModelIndex, QPointF, QRect, QRectF, QSize, Qt, QTimer
from PySide6.QtGui import QAbstractTextDocumentLayout, QColor, QFont, QGuiApplication, QPainter, QPalette
from PySide6.QtGui import QTextCharFormat, QTextCursor, QTextDocument, QTextFormat
from PySide6.QtWidgets import (QAbstractItemView, QListView, QMenu, QStyledItemDelegate, QStyleOptionViewItem,
                               QWidget)

from cakep2p.gui.models import ChatModel

MONOSPACE_FAMILIES = ["DejaVu Sans Mono", "Menlo", "Consolas", "Liberation Mono", "monospace"]
BUBBLE_COLORS = {"user": "#dbeafe", "assistant": "#f4f4f5", "notice": "#fff7e6"}
MARGIN = 8          # around a bubble
PADDING = 10        # inside a bubble
STATUS_GAP = 2
CURSOR = " ▍"
CODE_BACKGROUND = "#e6e7eb"
COPIED_SHOWN_MS = 1500


def code_blocks(document: QTextDocument) -> list[tuple[QRectF, str]]:
    """Each code block of a rendered Markdown document: its area (document coordinates) and its text."""
    found: list[tuple[QRectF, str]] = []
    layout = document.documentLayout()
    block, previous_was_code = document.begin(), False
    while block.isValid():
        is_code = block.blockFormat().hasProperty(QTextFormat.Property.BlockCodeFence)
        if is_code:
            area = layout.blockBoundingRect(block)
            if previous_was_code:
                last_area, text = found[-1]
                found[-1] = (last_area.united(area), f"{text}\n{block.text()}")
            else:
                found.append((area, block.text()))
        previous_was_code = is_code
        block = block.next()
    return found


def markdown_document(text: str, font: QFont, *, markdown: bool = True) -> QTextDocument:
    """A QTextDocument of `text` rendered as Markdown, with code (inline and blocks) in a monospaced font."""
    document = QTextDocument()
    document.setDefaultFont(font)
    document.setDocumentMargin(0)
    if markdown:
        document.setMarkdown(text, QTextDocument.MarkdownFeature.MarkdownDialectGitHub)
        _monospace_code(document)
    else:
        document.setPlainText(text)
    return document


def _monospace_code(document: QTextDocument) -> None:
    code_format = QTextCharFormat()
    code_format.setFontFamilies(MONOSPACE_FAMILIES)
    code_format.setFontFixedPitch(True)
    inline_format = QTextCharFormat(code_format)
    inline_format.setBackground(QColor(CODE_BACKGROUND))
    block = document.begin()
    while block.isValid():
        is_code_block = block.blockFormat().hasProperty(QTextFormat.Property.BlockCodeFence) or \
            block.blockFormat().nonBreakableLines()
        iterator = block.begin()
        while not iterator.atEnd():
            fragment = iterator.fragment()
            if fragment.isValid() and (is_code_block or fragment.charFormat().fontFixedPitch()):
                cursor = QTextCursor(document)
                cursor.setPosition(fragment.position())
                cursor.setPosition(fragment.position() + fragment.length(), QTextCursor.MoveMode.KeepAnchor)
                cursor.mergeCharFormat(code_format if is_code_block else inline_format)
            iterator += 1
        if is_code_block:
            block_format = block.blockFormat()
            block_format.setBackground(QColor(CODE_BACKGROUND))
            cursor = QTextCursor(block)
            cursor.setBlockFormat(block_format)
        block = block.next()


class MessageDelegate(QStyledItemDelegate):
    """Paints one ChatModel row: user bubbles right, assistant bubbles left (Markdown), notices centred."""

    def __init__(self, view: QListView):
        super().__init__(view)
        self.view = view
        self._documents: dict[int, tuple[tuple, QTextDocument]] = {}
        self.copied: tuple[int, int] | None = None     # (row, code block) whose text was just copied
        self._copied_timer = QTimer(self)
        self._copied_timer.setSingleShot(True)
        self._copied_timer.setInterval(COPIED_SHOWN_MS)
        self._copied_timer.timeout.connect(self._forget_copied)

    def forget(self, *_args) -> None:
        self._documents.clear()

    def copy_buttons(self, index: QModelIndex | QPersistentModelIndex, rect: QRect) -> list[tuple[QRectF, str]]:
        """The Copy buttons of the row at `rect` (view coordinates) and the code each copies."""
        document, _width, role, _status = self._layout(index, rect.width())
        if role != "assistant":
            return []
        bubble = self._bubble(rect, document, role)
        metrics = self.view.fontMetrics()
        width, height = metrics.horizontalAdvance("Copied") + 14, metrics.height() + 4
        origin = QPointF(bubble.left() + PADDING, bubble.top() + PADDING)
        return [(QRectF(origin.x() + area.right() - width - 4, origin.y() + area.top() + 3, width, height), text)
                for area, text in code_blocks(document)]

    def editorEvent(self, event: QEvent, model, option: QStyleOptionViewItem,  # noqa: N802 (Qt naming)
                    index: QModelIndex | QPersistentModelIndex) -> bool:
        if event.type() == QEvent.Type.MouseButtonRelease and event.button() == Qt.MouseButton.LeftButton:
            for number, (button, text) in enumerate(self.copy_buttons(index, option.rect)):
                if button.contains(event.position()):
                    self.copy(index.row(), number, text)
                    return True
        return super().editorEvent(event, model, option, index)

    def copy(self, row: int, number: int, text: str) -> None:
        QGuiApplication.clipboard().setText(text)
        self.copied = (row, number)
        self._copied_timer.start()
        self.view.viewport().update()

    def _forget_copied(self) -> None:
        self.copied = None
        self.view.viewport().update()

    def _bubble(self, rect: QRect, document: QTextDocument, role: str) -> QRectF:
        bubble = QRectF(0, 0, document.textWidth() + 2 * PADDING, document.size().height() + 2 * PADDING)
        top = rect.top() + MARGIN
        if role == "user":
            bubble.moveTo(rect.right() - MARGIN - bubble.width(), top)
        elif role == "notice":
            bubble.moveTo(rect.left() + (rect.width() - bubble.width()) / 2, top)
        else:
            bubble.moveTo(rect.left() + MARGIN, top)
        return bubble

    def _layout(self, index: QModelIndex | QPersistentModelIndex, width: int) -> tuple[QTextDocument, int, str, str]:
        role = index.data(ChatModel.RoleRole) or "assistant"
        text = index.data(Qt.ItemDataRole.DisplayRole) or ""
        streaming = bool(index.data(ChatModel.StreamingRole))
        status = index.data(ChatModel.StatusRole) or ""
        shown = text + CURSOR if streaming else text
        bubble_width = max(80, int(width * (0.78 if role == "user" else 1.0)) - 2 * MARGIN)
        key = (shown, bubble_width, role)
        cached = self._documents.get(index.row())
        if cached is None or cached[0] != key:
            font = QFont(self.view.font())
            if role == "notice":
                font.setItalic(True)
            document = markdown_document(shown or " ", font, markdown=(role == "assistant"))
            document.setTextWidth(bubble_width - 2 * PADDING)
            if role != "assistant":  # shrink short user messages and notices to their text
                document.setTextWidth(min(bubble_width - 2 * PADDING, document.idealWidth() + 1))
            self._documents[index.row()] = (key, document)
            cached = self._documents[index.row()]
        return cached[1], bubble_width, role, status

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex) -> QSize:
        width = self.view.viewport().width()
        document, _bubble_width, _role, status = self._layout(index, width)
        height = int(document.size().height()) + 2 * PADDING + 2 * MARGIN
        if status:
            height += self.view.fontMetrics().height() + STATUS_GAP
        return QSize(width, height)

    def paint(self, painter: QPainter, option: QStyleOptionViewItem,
              index: QModelIndex | QPersistentModelIndex) -> None:
        document, _bubble_width, role, status = self._layout(index, option.rect.width())
        bubble = self._bubble(option.rect, document, role)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(BUBBLE_COLORS.get(role, "#f4f4f5")))
        painter.drawRoundedRect(bubble, 10, 10)
        painter.translate(bubble.left() + PADDING, bubble.top() + PADDING)
        context = QAbstractTextDocumentLayout.PaintContext()
        context.palette.setColor(QPalette.ColorRole.Text, QColor("#8a6100" if role == "notice" else "#1f2328"))
        document.documentLayout().draw(painter, context)
        painter.restore()
        self._paint_copy_buttons(painter, option, index)
        if status:
            painter.save()
            small = QFont(self.view.font())
            small.setPointSizeF(max(6.0, small.pointSizeF() * 0.85))
            painter.setFont(small)
            painter.setPen(QColor("#6b7280"))
            status_rect = QRectF(bubble.left() + 4, bubble.bottom() + STATUS_GAP,
                                 option.rect.width() - 2 * MARGIN, self.view.fontMetrics().height())
            alignment = Qt.AlignmentFlag.AlignRight if role == "user" else Qt.AlignmentFlag.AlignLeft
            if role == "user":
                status_rect.moveRight(bubble.right() - 4)
            painter.drawText(status_rect, int(alignment | Qt.AlignmentFlag.AlignVCenter), status)
            painter.restore()


    def _paint_copy_buttons(self, painter: QPainter, option: QStyleOptionViewItem,
                            index: QModelIndex | QPersistentModelIndex) -> None:
        buttons = self.copy_buttons(index, option.rect)
        if not buttons:
            return
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        for number, (button, _text) in enumerate(buttons):
            painter.setPen(QColor("#c4c7cc"))
            painter.setBrush(QColor("white"))
            painter.drawRoundedRect(button, 4, 4)
            painter.setPen(QColor("#374151"))
            label = "Copied" if self.copied == (index.row(), number) else "Copy"
            painter.drawText(button, int(Qt.AlignmentFlag.AlignCenter), label)
        painter.restore()


class ChatView(QListView):
    """Shows a ChatModel; keeps the newest text in view until the user scrolls up, and again once back at the end."""

    FOLLOW_SLACK_PX = 24

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setUniformItemSizes(False)
        self.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.setWordWrap(True)
        self.setSpacing(0)
        self.setStyleSheet("QListView { background: white; border: none; }")
        self.delegate = MessageDelegate(self)
        self.setItemDelegate(self.delegate)
        self.follow = True
        scroll_bar = self.verticalScrollBar()
        scroll_bar.valueChanged.connect(self._on_scrolled)
        scroll_bar.rangeChanged.connect(self._on_range_changed)

    def setModel(self, model: ChatModel) -> None:  # noqa: N802 (Qt naming)
        super().setModel(model)
        model.dataChanged.connect(self._on_data_changed)
        model.rowsInserted.connect(self._on_rows_changed)
        model.rowsRemoved.connect(self._on_rows_changed)
        model.modelReset.connect(self._on_reset)

    def _on_data_changed(self, top_left: QModelIndex, _bottom_right: QModelIndex, _roles=()) -> None:
        self.delegate.sizeHintChanged.emit(top_left)

    def _on_rows_changed(self, *_args) -> None:
        self.delegate.forget()

    def _on_reset(self) -> None:
        self.delegate.forget()
        self.follow = True

    def _on_scrolled(self, value: int) -> None:
        self.follow = value >= self.verticalScrollBar().maximum() - self.FOLLOW_SLACK_PX

    def _on_range_changed(self, _minimum: int, maximum: int) -> None:
        if self.follow:
            self.verticalScrollBar().setValue(maximum)

    def contextMenuEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        index = self.indexAt(event.pos())
        if not index.isValid():
            return
        menu = QMenu(self)
        menu.addAction("Copy message", lambda: QGuiApplication.clipboard().setText(index.data() or ""))
        menu.exec(event.globalPos())

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        self.delegate.forget()
        super().resizeEvent(event)
