"""The main window: cluster panel and model picker on the left, the streaming chat on the right.

Widgets only show state and forward intents: core intents to the Bridge, chat intents to the ChatController,
whose Transcript the chat view shows (through ChatModel) and the history log stores.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeyEvent, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QFrame, QHBoxLayout, QLabel, QMainWindow, QPlainTextEdit, QProgressBar,
                               QPushButton, QSplitter, QVBoxLayout, QWidget)

from cakep2p.gui.api_switch import ApiPanel, ApiSwitch
from cakep2p.gui.bridge import Bridge
from cakep2p.gui.chat import ChatController
from cakep2p.gui.state import ModelInfo, ModelPreview, NodeState, PlanView
from cakep2p.gui.chat_view import ChatView
from cakep2p.gui.history import ChatHistory, ChatLog
from cakep2p.gui.model_panel import ModelPanel
from cakep2p.gui.models import ChatModel, PeersModel
from cakep2p.gui.peers_panel import PeersPanel
from cakep2p.gui.recent import RecentModels
from cakep2p.gui.settings import SettingsDrawer

BANNER_STYLE = {"error": "background:#fdecea; color:#8a1c1c; border-radius:6px; padding:6px;",
                "choice": "background:#fff7e6; color:#5c3d00; border-radius:6px; padding:6px;"}


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
    """A dismissable message line, optionally with action buttons."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(6, 2, 6, 2)
        self._layout.addWidget(self.label, 1)
        self._buttons: list[QPushButton] = []
        self.setVisible(False)

    def show_message(self, text: str, kind: str = "error", actions: tuple[tuple[str, object], ...] = ()) -> None:
        for button in self._buttons:
            button.deleteLater()
        self._buttons = []
        for title, callback in (*actions, ("Dismiss", None)):
            button = QPushButton(title)
            button.clicked.connect(self.hide)
            if callback is not None:
                button.clicked.connect(callback)
            self._layout.addWidget(button)
            self._buttons.append(button)
        self.setStyleSheet(f"Banner {{ {BANNER_STYLE[kind]} }}")
        self.label.setText(text)
        self.setVisible(True)

    def button(self, title: str) -> QPushButton | None:
        return next((button for button in self._buttons if button.text() == title), None)


class MainWindow(QMainWindow):
    def __init__(self, node_options: dict | None = None, *, history: ChatHistory | None = None,
                 recent: RecentModels | None = None, start_node: bool = True):
        super().__init__()
        self.setWindowTitle("cakep2p")
        self.resize(1280, 780)
        self.bridge = Bridge(node_options, self)
        self.api_switch = ApiSwitch(self)
        self.peers_model = PeersModel(self)
        self.history = history or ChatHistory()
        self.recent = recent or RecentModels()
        self.model_info: ModelInfo | None = None
        self.plan: PlanView | None = None
        self.settings = SettingsDrawer()
        self.chat = ChatController(self.bridge, self.history, self.settings, self)
        self.chat_model = ChatModel(self.chat.transcript, self)
        self._build()
        self._connect()
        self.model_panel.set_recent(self.recent.load())
        if start_node:
            self.bridge.start()

    # Layout --------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.peers_panel = PeersPanel(self.peers_model)
        self.model_panel = ModelPanel()
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.addWidget(self.peers_panel, 3)
        line = QFrame()
        line.setFrameShape(QFrame.Shape.HLine)
        line.setStyleSheet("color: #e5e7eb;")
        left_layout.addWidget(line)
        left_layout.addWidget(self.model_panel, 0)
        self.api_panel = ApiPanel()
        left_layout.addWidget(self.api_panel, 0)

        self.chat_view = ChatView()
        self.chat_view.setModel(self.chat_model)
        self.banner = Banner()
        self.input = MessageInput()
        self.input.setPlaceholderText("Message the model… (Enter sends, Shift+Enter for a new line)")
        self.input.setFixedHeight(64)
        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop")
        self.regenerate_button = QPushButton("Regenerate")
        self.new_chat_button = QPushButton("New chat")
        self.settings_button = QPushButton("Settings")
        self.settings_button.setCheckable(True)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Save this chat as a Markdown file")
        self.stop_button.setEnabled(False)
        self.regenerate_button.setEnabled(False)
        self.status_label = QLabel("No model loaded.")
        self.status_label.setStyleSheet("color: #4b5563;")
        self.context_bar = QProgressBar()
        self.context_bar.setFixedWidth(220)
        self.context_bar.setRange(0, 1)
        self.context_bar.setValue(0)
        self.context_bar.setFormat("context: no model")
        self.context_bar.setTextVisible(True)

        buttons = QHBoxLayout()
        for button in (self.send_button, self.stop_button, self.regenerate_button, self.new_chat_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.settings_button)
        status_row = QHBoxLayout()
        status_row.addWidget(self.status_label, 1)
        status_row.addWidget(self.context_bar)
        chat = QWidget()
        chat_layout = QVBoxLayout(chat)
        chat_layout.addWidget(self.chat_view, 1)
        chat_layout.addWidget(self.banner)
        chat_layout.addWidget(self.input)
        chat_layout.addLayout(buttons)
        chat_layout.addLayout(status_row)
        self.settings.setVisible(False)
        right = QWidget()
        right_layout = QHBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(chat, 1)
        right_layout.addWidget(self.settings)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([640, 640])
        self.setCentralWidget(splitter)

        menu = self.menuBar().addMenu("&File")
        keys = QKeySequence.StandardKey
        for title, shortcut, slot in (("Open model folder…", keys.Open, self.model_panel.choose_folder),
                                      ("Export chat as Markdown…", keys.Save, lambda: self.export_chat()),
                                      ("New chat", keys.New, self.new_chat),
                                      ("Quit", keys.Quit, self.close)):
            action = QAction(title, self)
            action.setShortcut(shortcut)
            action.triggered.connect(slot)
            menu.addAction(action)
        self.chats_menu = menu.addMenu("Earlier chats")
        self.chats_menu.aboutToShow.connect(self._fill_chats_menu)

    def _connect(self) -> None:
        bridge = self.bridge
        bridge.nodeStarted.connect(self._on_node_started)
        bridge.nodeFailed.connect(self._on_node_failed)
        bridge.peerEvent.connect(self._on_peer_event)
        bridge.peersReset.connect(self.peers_model.clear)
        bridge.servingChanged.connect(self.peers_panel.set_serving)
        bridge.notice.connect(self.show_notice)
        bridge.error.connect(self.show_error)
        bridge.modelInspected.connect(self._on_model_inspected)
        bridge.modelLoading.connect(self._on_model_loading)
        bridge.modelProgress.connect(self.model_panel.show_progress)
        bridge.modelLoaded.connect(self._on_model_loaded)
        bridge.modelFailed.connect(self._on_model_failed)
        bridge.planChanged.connect(self._on_plan_changed)
        bridge.contextChanged.connect(self._on_context_changed)
        chat = self.chat
        chat.errorRaised.connect(self.show_error)
        chat.choiceOffered.connect(self._offer_choice)
        chat.busyChanged.connect(self._set_generating)
        chat.statusChanged.connect(self.status_label.setText)
        for changed in (chat.transcript.inserted, chat.transcript.removed, chat.transcript.replaced):
            changed.connect(self._update_regenerate)
        self.peers_panel.servingRequested.connect(bridge.set_serving)
        self.peers_panel.codeChangeRequested.connect(bridge.change_cluster)
        self.model_panel.inspectRequested.connect(bridge.inspect_model)
        self.model_panel.loadRequested.connect(self.load_model)
        self.model_panel.downloadRequested.connect(bridge.download_model)
        self.settings.completionModeChanged.connect(self._on_completion_mode_changed)
        self.api_panel.switchToggled.connect(self.api_switch.set_enabled)
        self.api_switch.serverStarted.connect(self.api_panel.show_serving)
        self.api_switch.serverStopped.connect(self.api_panel.show_stopped)
        self.api_switch.serverFailed.connect(self._on_api_failed)
        self.settings_button.toggled.connect(self.settings.setVisible)
        self.input.submitted.connect(self.send)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(bridge.stop)
        self.regenerate_button.clicked.connect(chat.regenerate)
        self.new_chat_button.clicked.connect(self.new_chat)
        self.export_button.clicked.connect(lambda: self.export_chat())

    # Intents -------------------------------------------------------------------------------------
    def load_model(self, folder: str) -> None:
        self.banner.hide()
        self.bridge.inspect_model(folder)
        self.bridge.load_model(folder)

    @property
    def chat_log(self) -> ChatLog:
        """The log of the chat on screen."""
        return self.chat.log

    def send(self) -> None:
        text = self.input.toPlainText().strip()
        if not text:
            return
        self.banner.hide()
        if self.chat.send(text):
            self.input.clear()

    def new_chat(self) -> None:
        self.banner.hide()
        self.chat.new_chat()

    def open_chat(self, log: ChatLog) -> None:
        """Show a stored chat and continue it (the model re-reads its text on the next message)."""
        self.banner.hide()
        if log.system_prompt is not None:
            self.settings.system_prompt_edit.setPlainText(log.system_prompt)
        self.chat.open_chat(log)

    def _fill_chats_menu(self) -> None:
        self.chats_menu.clear()
        chats = [log for log in self.history.chats() if log.messages][:15]
        if not chats:
            self.chats_menu.addAction("(no stored chats)").setEnabled(False)
        for log in chats:
            action = self.chats_menu.addAction(log.title)
            action.triggered.connect(lambda _checked=False, chosen=log: self.open_chat(chosen))

    def export_chat(self, target: str | None = None) -> Path | None:
        if not target:
            target, _filter = QFileDialog.getSaveFileName(self, "Export chat as Markdown",
                                                          str(Path.home() / "chat.md"), "Markdown (*.md)")
        if not target:
            return None
        try:
            return self.chat_log.export_markdown(target)
        except OSError as error:
            self.show_error(f"Could not write {target}: {error.strerror or error}")
            return None

    def show_error(self, message: str) -> None:
        self.banner.show_message(message, "error")

    def show_notice(self, message: str) -> None:
        self.chat.add_notice(message)

    # Core events ---------------------------------------------------------------------------------
    def _on_node_started(self, state: NodeState) -> None:
        self.setWindowTitle(f"cakep2p — {state.name}")
        self.peers_panel.show_node(state)

    def _on_node_failed(self, message: str) -> None:
        self.peers_panel.show_node_failed(message)
        self.show_error(f"This machine could not join the network: {message}. You can still chat with a model "
                        "on this machine.")

    def _on_peer_event(self, event: str, peer) -> None:
        if event == "removed" and self.plan is not None:
            held = self.plan.layers_by_node().get(peer.node_id)
            if held:
                self.show_notice(f"{peer.name} (layers {held}) left the cluster.")
        self.peers_model.apply_event(event, peer)

    def _on_model_inspected(self, preview: ModelPreview) -> None:
        self.model_panel.show_preview(preview, loaded=self.model_info is not None)

    def _on_model_loading(self, what: str) -> None:
        self.chat.model_loading()
        self.model_panel.show_loading(what)
        self.api_switch.set_model(None)   # the old model is about to close: stop serving it
        self.api_panel.set_model_ready(False, loading=True)
        self.status_label.setText(f"Loading {Path(what).name or what}… (you can type your message meanwhile)")

    def _on_model_loaded(self, info: ModelInfo) -> None:
        self.model_info = info
        self.model_panel.show_loaded(info)
        self.api_switch.set_model(self.bridge.model)
        self.api_panel.set_model_ready(True)
        self.model_panel.set_recent(self.recent.remember(info.path))
        self.settings.set_completion_mode(not info.has_chat_template)
        self.settings.set_model_defaults(info.generation, info.context)
        self.status_label.setText(f"{info.name} ready.")
        self.chat.model_loaded(info.name)

    def _on_model_failed(self, message: str) -> None:
        queued = self.chat.model_failed()
        if queued:  # give the unsent message back
            self.input.setPlainText(queued)
        self.model_panel.show_failed(message)
        self.api_switch.set_model(self.bridge.model)   # the previous model, when the failure left it loaded
        self.api_panel.set_model_ready(self.bridge.model is not None)
        self.show_error(message)
        self.status_label.setText("No model loaded." if self.model_info is None else f"{self.model_info.name} ready.")

    def _on_plan_changed(self, plan: PlanView | None) -> None:
        self.plan = plan
        self.show_plan(plan)

    def show_plan(self, plan: PlanView | None) -> None:
        """Draw `plan` in the plan bar and the peers table's Layers column, in the same colours."""
        self.model_panel.show_plan(plan)
        layers = plan.layers_by_node() if plan else {}
        bar = self.model_panel.plan_bar
        self.peers_model.set_layers(layers, {node_id: bar.color_of(node_id) for node_id in layers})

    def _on_completion_mode_changed(self, enabled: bool) -> None:
        self.bridge.set_completion_mode(enabled)
        self.new_chat()

    def _on_api_failed(self, message: str) -> None:
        self.api_panel.show_stopped(message)
        self.show_error(message)

    def _offer_choice(self, message: str, question: str) -> None:
        self.banner.show_message(
            f"The chat no longer fits the model's context ({message}). Choose how to continue:", "choice",
            actions=(("New chat", lambda: self.chat.ask_in_new_chat(question)),
                     ("Drop oldest turn", lambda: self.chat.drop_oldest_turn_and_ask(question))))

    def _on_context_changed(self, used: int, maximum: int) -> None:
        self.context_bar.setRange(0, max(1, maximum))
        self.context_bar.setValue(min(used, maximum))
        self.context_bar.setFormat("context %v / %m tokens")
        self.context_bar.setToolTip("Tokens the conversation takes of the model's context; when it is full you "
                                    "choose between a new chat and dropping the oldest turn.")

    def _set_generating(self, generating: bool) -> None:
        self.stop_button.setEnabled(generating)
        self.send_button.setEnabled(not generating)
        self._update_regenerate()

    def _update_regenerate(self, *_changed) -> None:
        self.regenerate_button.setEnabled(not self.bridge.generating and self.chat.transcript.can_regenerate())

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt naming)
        self.api_switch.shutdown()   # before the bridge closes the model the server uses
        self.bridge.shutdown()
        super().closeEvent(event)
