"""The plan bar: a model's layers as one horizontal bar coloured by the node holding them, with a legend."""

from __future__ import annotations

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPaintEvent
from PySide6.QtWidgets import QSizePolicy, QWidget

from cakep2p.gui.state import PlanView
from cakep2p.units import format_size

NODE_COLORS = ("#4f7cff", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#ec4899", "#84cc16")
BAR_HEIGHT = 26
LEGEND_ROW = 20


class PlanBar(QWidget):
    """Draws a PlanView; `set_plan(None)` shows an empty placeholder."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.plan: PlanView | None = None
        self._colors: dict[str, QColor] = {}
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMinimumHeight(BAR_HEIGHT + LEGEND_ROW + 8)

    def set_plan(self, plan: PlanView | None) -> None:
        self.plan = plan
        if plan is not None:
            for segment in plan.segments:
                if segment.node_id not in self._colors:
                    self._colors[segment.node_id] = QColor(NODE_COLORS[len(self._colors) % len(NODE_COLORS)])
        self.updateGeometry()
        self.setFixedHeight(self.sizeHint().height())
        self.update()

    def color_of(self, node_id: str) -> QColor:
        return self._colors.get(node_id, QColor("#9ca3af"))

    def legend_lines(self) -> list[str]:
        if self.plan is None:
            return []
        lines = []
        for segment in self.plan.segments:
            count = segment.end - segment.start
            layers = (f"layer {segment.start}" if count == 1 else f"layers {segment.start}–{segment.end - 1}" if count
                      else "embedding + head only")
            who = segment.name
            if segment.is_self and segment.name != "this machine":
                who += " (this machine)"
            size = f", {format_size(segment.bytes)}" if segment.bytes else ""
            lines.append(f"{who}: {layers}{size}")
        return lines

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        rows = max(1, len(self.legend_lines()))
        return QSize(400, BAR_HEIGHT + 6 + rows * LEGEND_ROW)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt naming)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        bar = QRectF(0.5, 0.5, self.width() - 1.0, BAR_HEIGHT)
        painter.setPen(QColor("#d1d5db"))
        painter.setBrush(QColor("#f3f4f6"))
        painter.drawRoundedRect(bar, 6, 6)
        plan = self.plan
        if plan is None or plan.num_layers <= 0:
            painter.setPen(QColor("#6b7280"))
            painter.drawText(bar, int(Qt.AlignmentFlag.AlignCenter), "no model loaded")
            return
        per_layer = bar.width() / plan.num_layers
        small = QFont(self.font())
        small.setPointSizeF(max(6.0, small.pointSizeF() * 0.9))
        painter.setFont(small)
        for segment in plan.segments:
            if segment.end <= segment.start:
                continue
            rect = QRectF(bar.left() + segment.start * per_layer, bar.top(),
                          (segment.end - segment.start) * per_layer, bar.height())
            painter.setPen(QColor("white"))
            painter.setBrush(self.color_of(segment.node_id))
            painter.drawRect(rect)
            label = str(segment.start) if segment.end - segment.start == 1 else f"{segment.start}–{segment.end - 1}"
            if painter.fontMetrics().horizontalAdvance(label) + 6 < rect.width():
                painter.drawText(rect, int(Qt.AlignmentFlag.AlignCenter), label)
        painter.setPen(QColor("#9ca3af"))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawRoundedRect(bar, 6, 6)
        top = BAR_HEIGHT + 6
        for segment, line in zip(plan.segments, self.legend_lines()):
            swatch = QRectF(2, top + 4, 12, 12)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(self.color_of(segment.node_id))
            painter.drawRoundedRect(swatch, 3, 3)
            painter.setPen(QColor("#1f2328"))
            painter.drawText(QRectF(20, top, self.width() - 20, LEGEND_ROW),
                             int(Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft), line)
            top += LEGEND_ROW
