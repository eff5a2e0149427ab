"""The live peers table's models: PeersModel (this machine's row, then one row per peer the directory lists, with
the layers each holds and whether the mesh declared it lost) and PeersFilter (sorting, other clusters folded away).

Both change on the UI thread only, fed by the bridge's signals; they hold display state only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QBrush, QColor, QFont

from cakep2p.units import format_size

AnyIndex = QModelIndex | QPersistentModelIndex
STATE_TEXT = {"self": "this machine", "ok": "ok", "not_serving": "not serving", "lost": "lost",
              "other_cluster": "other cluster", "incompatible": "incompatible"}
STATE_COLOR = {"self": "#1d4ed8", "ok": "#2e7d32", "not_serving": "#6b7280", "lost": "#c62828",
               "other_cluster": "#b26a00", "incompatible": "#c62828"}
FOREIGN = ("other_cluster", "incompatible")
HEADER_TIPS = {
    "Device": "cpu, cuda or mps: where its share of a model runs",
    "Memory": "free / total memory (GPU memory when it has a GPU)",
    "Offers": "memory it lends to model parts",
    "State": "ok: same pairing code, serving; lost: the mesh stopped hearing it mid-chat; "
             "machines of other clusters are listed, never used",
    "Layers": "the layers it holds in the current plan",
}


def _free_of_total(free: int, total: int) -> str:
    """`22.1/23.5 GiB` (free of total), or `—` when there is none."""
    if not total:
        return "—"
    free_text, total_text = format_size(free), format_size(total)
    free_number, _, free_unit = free_text.partition(" ")
    same_unit = free_unit == total_text.partition(" ")[2]
    return f"{free_number if same_unit else free_text}/{total_text}"


def _memory(peer: Any) -> str:
    if peer.vram_total:
        return _free_of_total(peer.vram_free, peer.vram_total)
    return _free_of_total(peer.ram_available, peer.ram_total)


@dataclass(frozen=True)
class PeerColumn:
    header: str
    text: Callable[[Any], str]


class PeersModel(QAbstractTableModel):
    """This machine's row first (once the node runs), then the peers by arrival; rows keyed by node id."""

    NodeIdRole = Qt.ItemDataRole.UserRole + 1
    PeerRole = Qt.ItemDataRole.UserRole + 2
    StateRole = Qt.ItemDataRole.UserRole + 3

    def __init__(self, parent=None):
        super().__init__(parent)
        self._own: Any = None                 # this machine's PeerInfo
        self._peers: list[Any] = []           # PeerInfo, in arrival order
        self._lost: set[str] = set()          # node ids the mesh declared lost (until they leave or a model loads)
        self._layers: dict[str, str] = {}     # node id -> "0–11" in the current plan
        self._layer_colors: dict[str, QColor] = {}
        self.columns: tuple[PeerColumn, ...] = (
            PeerColumn("Name", lambda peer: peer.name),
            PeerColumn("Device", lambda peer: peer.accelerator or "?"),
            PeerColumn("Memory", _memory),
            PeerColumn("Offers", lambda peer: format_size(peer.offered_memory) if peer.offered_memory else "—"),
            PeerColumn("State", lambda peer: STATE_TEXT.get(self.state(peer), self.state(peer))),
            PeerColumn("Layers", lambda peer: self._layers.get(peer.node_id, "—")),
        )

    # Qt model interface -------------------------------------------------------------------------
    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows())

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(self.columns):
            return str(section + 1) if role == Qt.ItemDataRole.DisplayRole else None
        if role == Qt.ItemDataRole.ToolTipRole:
            return HEADER_TIPS.get(self.columns[section].header)
        return self.columns[section].header if role == Qt.ItemDataRole.DisplayRole else None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        rows = self._rows()
        if not index.isValid() or not 0 <= index.row() < len(rows):
            return None
        peer, column = rows[index.row()], self.columns[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return column.text(peer)
        if role == Qt.ItemDataRole.ToolTipRole:
            return (f"{peer.name} — node {peer.node_id}\n{peer.accelerator}: {peer.device_name}\n"
                    f"at {peer.address}:{peer.port}, cakep2p {peer.version}, protocol {peer.protocol_version}\n"
                    f"{peer.gflops:.1f} GFLOP/s, {peer.bandwidth / 1e9:.1f} GB/s memory bandwidth")
        if role == Qt.ItemDataRole.DecorationRole and column.header == "Layers":
            return self._layer_colors.get(peer.node_id)
        if role == Qt.ItemDataRole.ForegroundRole and column.header == "State":
            return QBrush(QColor(STATE_COLOR.get(self.state(peer), "#000000")))
        if role == Qt.ItemDataRole.FontRole and peer is self._own:
            font = QFont()
            font.setBold(True)
            return font
        return {self.NodeIdRole: peer.node_id, self.PeerRole: peer, self.StateRole: self.state(peer)}.get(role)

    def roleNames(self) -> dict[int, bytes]:
        names = dict(super().roleNames())
        names.update({self.NodeIdRole: b"nodeId", self.PeerRole: b"peer", self.StateRole: b"state"})
        return names

    # Reading ---------------------------------------------------------------------------------------
    def state(self, peer: Any) -> str:
        """self, lost, other_cluster, incompatible, not_serving or ok."""
        if peer is self._own:
            return "self"
        if peer.node_id in self._lost:
            return "lost"
        if peer.status != "ok":
            return str(peer.status)
        return "ok" if peer.serving else "not_serving"

    def peers(self) -> list[Any]:
        """The other machines (this machine's row aside)."""
        return list(self._peers)

    def node_ids(self) -> list[str]:
        return [peer.node_id for peer in self._peers]

    def foreign_count(self) -> int:
        """Machines of other clusters (or another protocol) in the table."""
        return sum(1 for peer in self._peers if peer.status in FOREIGN)

    def row_of(self, node_id: str) -> int:
        return next((row for row, peer in enumerate(self._rows()) if peer.node_id == node_id), -1)

    # Fed by the bridge ----------------------------------------------------------------------------
    def set_own(self, info: Any) -> None:
        """This machine's row: inserted first, or refreshed."""
        if self._own is None:
            self.beginInsertRows(QModelIndex(), 0, 0)
            self._own = info
            self.endInsertRows()
        else:
            self._own = info
            self._changed(0)

    def apply_event(self, event: str, peer: Any) -> None:
        """A directory event: "added" / "updated" insert or refresh the row, "removed" drops it."""
        if event == "removed":
            self.remove_peer(peer.node_id)
        else:
            if event == "added":
                self._lost.discard(peer.node_id)   # it announced itself again
            self.upsert_peer(peer)

    def upsert_peer(self, peer: Any) -> None:
        index = next((number for number, known in enumerate(self._peers) if known.node_id == peer.node_id), -1)
        if index < 0:
            row = len(self._rows())
            self.beginInsertRows(QModelIndex(), row, row)
            self._peers.append(peer)
            self.endInsertRows()
        else:
            self._peers[index] = peer
            self._changed(self.row_of(peer.node_id))

    def remove_peer(self, node_id: str) -> None:
        row = self.row_of(node_id)
        if row >= 0 and self._rows()[row] is not self._own:
            self.beginRemoveRows(QModelIndex(), row, row)
            self._peers = [peer for peer in self._peers if peer.node_id != node_id]
            self._lost.discard(node_id)
            self.endRemoveRows()

    def mark_lost(self, node_id: str) -> None:
        """The mesh declared this peer lost: its row says so now, not when its announcement expires."""
        self._lost.add(node_id)
        row = self.row_of(node_id)
        if row >= 0:
            self._changed(row)

    def clear_lost(self) -> None:
        """A new plan: every peer is judged afresh."""
        lost, self._lost = self._lost, set()
        for node_id in lost:
            if self.row_of(node_id) >= 0:
                self._changed(self.row_of(node_id))

    def clear(self) -> None:
        """Peers of another cluster are about to be listed (this machine's row stays)."""
        self.beginResetModel()
        self._peers.clear()
        self._lost.clear()
        self.endResetModel()

    def set_layers(self, layers: dict[str, str], colors: dict[str, QColor] | None = None) -> None:
        """Which layers each node holds in the current plan ({} when no model is loaded), and the plan bar's colours."""
        self._layers = dict(layers)
        self._layer_colors = dict(colors or {})
        if self._rows():
            column = len(self.columns) - 1
            self.dataChanged.emit(self.index(0, column), self.index(len(self._rows()) - 1, column))

    def _rows(self) -> list[Any]:
        return ([self._own] if self._own is not None else []) + self._peers

    def _changed(self, row: int) -> None:
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(self.columns) - 1))


class PeersFilter(QSortFilterProxyModel):
    """The peers table's view of PeersModel: sortable with this machine first, other clusters shown on request."""

    def __init__(self, source: PeersModel, parent=None):
        super().__init__(parent)
        self.show_foreign = False
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
        state = self.sourceModel().index(source_row, 0, source_parent).data(PeersModel.StateRole)
        return self.show_foreign or state not in FOREIGN

    def lessThan(self, left: AnyIndex, right: AnyIndex) -> bool:  # noqa: N802 (Qt naming)
        left_self = left.data(PeersModel.StateRole) == "self"
        right_self = right.data(PeersModel.StateRole) == "self"
        if left_self != right_self:   # this machine first, whichever way the column sorts
            return left_self != (self.sortOrder() == Qt.SortOrder.DescendingOrder)
        return str(left.data() or "").lower() < str(right.data() or "").lower()
