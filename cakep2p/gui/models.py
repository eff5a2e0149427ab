"""Qt item models the window's views show: the live peers table and the chat.

Both change on the UI thread only: the peers model by the bridge's signals, the chat model by following its
Transcript. They hold display state only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from PySide6.QtCore import (QAbstractListModel, QAbstractTableModel, QModelIndex, QPersistentModelIndex,
                            QSortFilterProxyModel, Qt, QTimer)
from PySide6.QtGui import QBrush, QColor

from cakep2p.gui.transcript import ChatMessage, Transcript
from cakep2p.units import format_size

STATUS_TEXT = {"ok": "ok", "other_cluster": "other cluster", "incompatible": "incompatible"}
STATUS_COLOR = {"ok": "#2e7d32", "other_cluster": "#b26a00", "incompatible": "#c62828"}
AnyIndex = QModelIndex | QPersistentModelIndex
HEADER_TIPS = {
    "RAM": "free / total memory", "VRAM": "free / total GPU memory", "Offers": "memory it lends to model parts",
    "Serving": "whether it accepts parts of models (its Join toggle)",
    "Cluster": "ok: same pairing code and protocol; others are listed but never used",
    "Layers": "the layers it holds in the current plan",
}


def _size_or_dash(num_bytes: int | None) -> str:
    return format_size(num_bytes) if num_bytes else "—"


def _free_of_total(free: int, total: int) -> str:
    """`22.1/23.5 GiB` (free of total), or `—` when there is none."""
    if not total:
        return "—"
    free_text, total_text = format_size(free), format_size(total)
    free_number, _, free_unit = free_text.partition(" ")
    same_unit = free_unit == total_text.partition(" ")[2]
    return f"{free_number if same_unit else free_text}/{total_text}"


def _ram(peer: Any) -> str:
    return _free_of_total(peer.ram_available, peer.ram_total)


def _vram(peer: Any) -> str:
    return _free_of_total(peer.vram_free, peer.vram_total)


@dataclass(frozen=True)
class PeerColumn:
    header: str
    text: Callable[[Any], str]


class PeersModel(QAbstractTableModel):
    """One row per discovered peer (keyed by node id), plus the layers each holds in the current plan."""

    NodeIdRole = Qt.ItemDataRole.UserRole + 1
    PeerRole = Qt.ItemDataRole.UserRole + 2

    def __init__(self, parent=None):
        super().__init__(parent)
        self._peers: list[Any] = []           # PeerInfo, in arrival order
        self._layers: dict[str, str] = {}     # node id -> "0–11" in the current plan
        self._layer_colors: dict[str, QColor] = {}   # node id -> its colour in the plan bar
        self.columns: tuple[PeerColumn, ...] = (
            PeerColumn("Name", lambda peer: peer.name),
            PeerColumn("Address", lambda peer: f"{peer.address}:{peer.port}"),
            PeerColumn("Device", lambda peer: peer.accelerator or "?"),
            PeerColumn("RAM", _ram),
            PeerColumn("VRAM", _vram),
            PeerColumn("Offers", lambda peer: _size_or_dash(peer.offered_memory)),
            PeerColumn("Serving", lambda peer: "yes" if peer.serving else "no"),
            PeerColumn("Cluster", lambda peer: STATUS_TEXT.get(peer.status, str(peer.status))),
            PeerColumn("Layers", lambda peer: self._layers.get(peer.node_id, "—")),
        )

    # Qt model interface -------------------------------------------------------------------------
    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._peers)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role == Qt.ItemDataRole.ToolTipRole and orientation == Qt.Orientation.Horizontal:
            return HEADER_TIPS.get(self.columns[section].header) if 0 <= section < len(self.columns) else None
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return self.columns[section].header if 0 <= section < len(self.columns) else None
        return str(section + 1)

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._peers):
            return None
        peer = self._peers[index.row()]
        column = self.columns[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return column.text(peer)
        if role == Qt.ItemDataRole.ToolTipRole:
            return (f"{peer.name} — node {peer.node_id}\n{peer.accelerator}: {peer.device_name}\n"
                    f"cakep2p {peer.version}, protocol {peer.protocol_version}\n"
                    f"{peer.gflops:.1f} GFLOP/s, {peer.bandwidth / 1e9:.1f} GB/s memory bandwidth")
        if role == Qt.ItemDataRole.DecorationRole and column.header == "Layers":
            return self._layer_colors.get(peer.node_id)
        if role == Qt.ItemDataRole.ForegroundRole and column.header == "Cluster":
            return QBrush(QColor(STATUS_COLOR.get(peer.status, "#000000")))
        if role == self.NodeIdRole:
            return peer.node_id
        if role == self.PeerRole:
            return peer
        return None

    def roleNames(self) -> dict[int, bytes]:
        names = dict(super().roleNames())
        names[self.NodeIdRole] = b"nodeId"
        names[self.PeerRole] = b"peer"
        return names

    # Fed by the bridge ----------------------------------------------------------------------------
    def peers(self) -> list[Any]:
        return list(self._peers)

    def node_ids(self) -> list[str]:
        return [peer.node_id for peer in self._peers]

    def row_of(self, node_id: str) -> int:
        for row, peer in enumerate(self._peers):
            if peer.node_id == node_id:
                return row
        return -1

    def apply_event(self, event: str, peer: Any) -> None:
        """A directory event: "added" / "updated" insert or refresh the row, "removed" drops it."""
        if event == "removed":
            self.remove_peer(peer.node_id)
        else:
            self.upsert_peer(peer)

    def upsert_peer(self, peer: Any) -> None:
        row = self.row_of(peer.node_id)
        if row < 0:
            self.beginInsertRows(QModelIndex(), len(self._peers), len(self._peers))
            self._peers.append(peer)
            self.endInsertRows()
        else:
            self._peers[row] = peer
            self.dataChanged.emit(self.index(row, 0), self.index(row, len(self.columns) - 1))

    def remove_peer(self, node_id: str) -> None:
        row = self.row_of(node_id)
        if row >= 0:
            self.beginRemoveRows(QModelIndex(), row, row)
            del self._peers[row]
            self.endRemoveRows()

    def clear(self) -> None:
        self.beginResetModel()
        self._peers.clear()
        self.endResetModel()

    def set_layers(self, layers: dict[str, str], colors: dict[str, QColor] | None = None) -> None:
        """Which layers each node holds in the current plan ({} when no model is loaded), and the plan bar's colours."""
        self._layers = dict(layers)
        self._layer_colors = dict(colors or {})
        if self._peers:
            column = len(self.columns) - 1
            self.dataChanged.emit(self.index(0, column), self.index(len(self._peers) - 1, column))


class PeersFilter(QSortFilterProxyModel):
    """The peers table's view of PeersModel: sortable, and nodes of other clusters shown only on request."""

    def __init__(self, source: PeersModel, parent=None):
        super().__init__(parent)
        self.show_foreign = True
        self.setSourceModel(source)

    def set_show_foreign(self, show: bool) -> None:
        if hasattr(self, "beginFilterChange"):   # Qt >= 6.10
            self.beginFilterChange()
            self.show_foreign = show
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self.show_foreign = show
            self.invalidateFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: AnyIndex) -> bool:  # noqa: N802 (Qt naming)
        peer = self.sourceModel().index(source_row, 0, source_parent).data(PeersModel.PeerRole)
        return self.show_foreign or peer is None or peer.status == "ok"


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
