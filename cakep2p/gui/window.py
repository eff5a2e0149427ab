"""The main window: the chat list on the left, the streaming chat in the middle, the model and the cluster on the
right.

Widgets only show state and forward intents: core intents to the Bridge, chat intents to the ChatController
(whose Transcript the chat view shows and the history log stores), library intents to the LibraryController, and
the cluster's side (peers, offered memory, the re-plan offer) to the ClusterController. What the window remembers
on this machine is in preferences.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (QFileDialog, QFrame, QHBoxLayout, QLabel, QMainWindow, QProgressBar, QPushButton,
                               QSplitter, QVBoxLayout, QWidget)

from cakep2p.gui.api_switch import ApiPanel, ApiSwitch
from cakep2p.gui.bridge import Bridge
from cakep2p.gui.chat import ChatController
from cakep2p.gui.chat_list import ChatListModel, ChatListPanel
from cakep2p.gui.chat_view import ChatView
from cakep2p.gui.cluster_view import ClusterController
from cakep2p.gui.history import ChatHistory, ChatLog
from cakep2p.gui.library_controller import LibraryController
from cakep2p.gui.menus import build_menus
from cakep2p.gui.model_panel import ModelPanel
from cakep2p.gui.models import ChatModel
from cakep2p.gui.node_panel import NodeSettingsDialog
from cakep2p.gui.peers_model import PeersModel
from cakep2p.gui.peers_panel import PeersPanel
from cakep2p.gui.preferences import PreferencesStore
from cakep2p.gui.recent import RecentModels
from cakep2p.gui.settings import SettingsDrawer
from cakep2p.gui.state import ModelInfo, ModelPreview, NodeState, PlanView
from cakep2p.gui.widgets import Banner, MessageInput

WELCOME = ("Welcome to cakep2p. The model loaded now is stories260K, a tiny demo model that ships with the app: it "
           "only writes short children's stories. For real chats, pick a model in the model library.")


class MainWindow(QMainWindow):
    def __init__(self, node_options: dict | None = None, *, history: ChatHistory | None = None,
                 recent: RecentModels | None = None, preferences: PreferencesStore | None = None,
                 start_node: bool = True, open_demo: bool | None = None):
        """`node_options` win over the ones saved on this machine; `open_demo` None: the demo model opens when no
        model was ever opened here (the first launch)."""
        super().__init__()
        self.setWindowTitle("cakep2p")
        self.resize(1360, 800)
        self.preferences = preferences or PreferencesStore()
        saved = self.preferences.load()
        self.bridge = Bridge({**saved.node_options(), **(node_options or {})}, self)
        self.api_switch = ApiSwitch(self)
        self.peers_model = PeersModel(self)
        self.history = history or ChatHistory()
        self.recent = recent or RecentModels()
        self.model_info: ModelInfo | None = None
        self.plan: PlanView | None = None
        self.settings = SettingsDrawer()
        self.chat = ChatController(self.bridge, self.history, self.settings, self)
        self.chat_model = ChatModel(self.chat.transcript, self)
        self.chat_list_model = ChatListModel(self.history, self)
        self.library = LibraryController(self.bridge, self)
        self._loading_path: str | None = None
        self._load_failure = ""     # what the last failed load said (its preview, arriving later, does not repeat it)
        self._chat_list_timer = QTimer(self)
        self._chat_list_timer.setSingleShot(True)
        self._chat_list_timer.setInterval(300)
        self._chat_list_timer.timeout.connect(self.chat_list_model.refresh)
        self._build(saved.show_other_clusters)
        self.cluster = ClusterController(self.bridge, self.peers_model, self.peers_panel, self.model_panel, self.offer,
                                         self.preferences, reload=self.spread_model, notice=self.show_notice,
                                         parent=self)
        self._connect()
        recent_models = self.recent.load()
        self.model_panel.set_recent(recent_models)
        self.chat_list_model.refresh()
        self.chat_list_model.set_current(self.chat.log.path)
        if start_node:
            self.bridge.start()
        if open_demo or (open_demo is None and not recent_models):
            self.open_demo()

    # Layout --------------------------------------------------------------------------------------
    def _build(self, show_other_clusters: bool) -> None:
        self.chat_list = ChatListPanel(self.chat_list_model)
        self.peers_panel = PeersPanel(self.peers_model, show_other_clusters)
        self.model_panel = ModelPanel()
        self.api_panel = ApiPanel()
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.addWidget(self.model_panel, 0)
        for widget, stretch in ((self.peers_panel, 1), (self.api_panel, 0)):
            line = QFrame()
            line.setFrameShape(QFrame.Shape.HLine)
            line.setStyleSheet("color: #e5e7eb;")
            right_layout.addWidget(line)
            right_layout.addWidget(widget, stretch)

        self.chat_view = ChatView()
        self.chat_view.setModel(self.chat_model)
        self.banner = Banner()          # errors and choices
        self.offer = Banner()           # offers: the demo's welcome, spreading the model over new machines
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
        chat_layout.addWidget(self.offer)
        chat_layout.addWidget(self.chat_view, 1)
        chat_layout.addWidget(self.banner)
        chat_layout.addWidget(self.input)
        chat_layout.addLayout(buttons)
        chat_layout.addLayout(status_row)
        self.settings.setVisible(False)
        middle = QWidget()
        middle_layout = QHBoxLayout(middle)
        middle_layout.setContentsMargins(0, 0, 0, 0)
        middle_layout.addWidget(chat, 1)
        middle_layout.addWidget(self.settings)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        for widget, stretch in ((self.chat_list, 0), (middle, 1), (right, 0)):
            splitter.addWidget(widget)
            splitter.setStretchFactor(splitter.count() - 1, stretch)
        splitter.setChildrenCollapsible(False)
        splitter.setSizes([210, 590, 560])
        self.setCentralWidget(splitter)
        build_menus(self, open_model=self.model_panel.choose_file, open_folder=self.model_panel.choose_folder,
                    library=self.open_library, export=lambda: self.export_chat(), new_chat=self.new_chat,
                    node_settings=self.open_node_settings)

    def _connect(self) -> None:
        bridge = self.bridge
        bridge.nodeStarted.connect(self._on_node_started)
        bridge.nodeFailed.connect(self._on_node_failed)
        bridge.notice.connect(self.show_notice)
        bridge.error.connect(self.show_error)
        bridge.modelInspected.connect(self._on_model_inspected)
        bridge.inspectFailed.connect(self._on_inspect_failed)
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
        chat.transcript.historyChanged.connect(self._chat_list_timer.start)
        self.chat_list.newRequested.connect(self.new_chat)
        self.chat_list.openRequested.connect(self.open_chat)
        self.chat_list.renameRequested.connect(self.rename_chat)
        self.chat_list.deleteRequested.connect(self.delete_chat)
        self.model_panel.inspectRequested.connect(bridge.inspect_model)
        self.model_panel.loadRequested.connect(self.load_model)
        self.model_panel.libraryRequested.connect(self.open_library)
        self.model_panel.weightsChanged.connect(bridge.set_weights)
        self.peers_panel.node_button.clicked.connect(self.open_node_settings)
        self.library.useRequested.connect(self.use_model)
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
    def load_model(self, path: str) -> None:
        """Load the model at `path` (a .gguf or a folder); the chat on screen stays."""
        self.banner.hide()
        self._loading_path = path
        self.bridge.inspect_model(path)
        self.bridge.load_model(path)

    def spread_model(self) -> None:
        """Load the model again over the machines there are now (the re-plan offer); the chat stays."""
        if self.model_info is not None:
            self.load_model(self.model_info.path)

    def use_model(self, path: str) -> None:
        self.model_panel.folder_combo.setEditText(path)
        self.load_model(path)

    def open_demo(self) -> None:
        """Load the demo model that ships inside the package, and say what it is."""
        from cakep2p import paths

        demo = str(paths.embedded_model_dir())
        self.model_panel.folder_combo.setEditText(demo)
        self.load_model(demo)
        self.offer.show_message(WELCOME, "info", actions=(("Open the model library", self.open_library),))

    def open_library(self) -> None:
        self.library.open()

    def open_node_settings(self) -> NodeSettingsDialog:
        dialog = NodeSettingsDialog(self.preferences.load(), self)
        dialog.saved.connect(self.cluster.save_node_settings)
        dialog.show()
        return dialog

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
        self.chat_list_model.set_current(self.chat.log.path)

    def open_chat(self, log: ChatLog) -> None:
        """Show a stored chat and continue it (the model re-reads its text on the next message)."""
        self.banner.hide()
        if log.system_prompt is not None:
            self.settings.system_prompt_edit.setPlainText(log.system_prompt)
        self.chat.open_chat(log)
        self.chat_list_model.set_current(log.path)

    def rename_chat(self, path: str, title: str) -> None:
        log = self.chat.log if Path(path) == self.chat.log.path else self.history.open(path)
        log.rename(title)
        self.chat_list_model.refresh()

    def delete_chat(self, path: str) -> None:
        if Path(path) == self.chat.log.path:
            self.new_chat()
        self.history.delete(path)
        self.chat_list_model.refresh()

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

    def show_plan(self, plan: PlanView | None) -> None:
        """Draw `plan` in the plan bar and the peers table's Layers column, in the same colours."""
        self.cluster.show_plan(plan)

    # Core events ---------------------------------------------------------------------------------
    def _on_node_started(self, state: NodeState) -> None:
        self.setWindowTitle(f"cakep2p — {state.name}")
        self.peers_panel.show_node(state)

    def _on_node_failed(self, message: str) -> None:
        self.peers_panel.show_node_failed()
        self.show_error(f"This machine could not join the network: {message}. You can still chat with a model "
                        "on this machine.")

    def _on_model_inspected(self, preview: ModelPreview) -> None:
        if self._loading_path is None or self.model_info is None:
            self.model_panel.show_preview(preview, loaded=self.model_info is not None)

    def _on_inspect_failed(self, message: str) -> None:
        if self._loading_path is None and message != self._load_failure:   # a load's failure says it (once)
            self.model_panel.show_not_previewed(message)

    def _on_model_loading(self, what: str) -> None:
        self._load_failure = ""
        self.chat.model_loading()
        self.cluster.model_loading()
        self.model_panel.show_loading(what)
        self.api_switch.set_model(None)   # the old model is about to close: stop serving it
        self.api_panel.set_model_ready(False, loading=True)
        self.status_label.setText(f"Loading {Path(what).name or what}… (you can type your message meanwhile)")

    def _on_model_loaded(self, info: ModelInfo) -> None:
        self._loading_path = None
        if not info.demo and self.offer.label.text() == WELCOME:   # a real model now: the welcome has done its job
            self.offer.hide()
        self.model_info = info
        self.model_panel.show_loaded(info)
        self.api_switch.set_model(self.bridge.model)
        self.api_panel.set_model_ready(True)
        self.model_panel.set_recent(self.recent.remember(info.path))
        self.settings.set_model_defaults(info.generation, info.context)
        self.status_label.setText(f"{info.name} ready.")
        self.chat.model_loaded(info.name)
        self.cluster.model_loaded(info.name)

    def _on_model_failed(self, message: str) -> None:
        self._loading_path, self._load_failure = None, message
        queued = self.chat.model_failed()
        if queued:  # give the unsent message back
            self.input.setPlainText(queued)
        self.model_panel.show_failed(self.model_info if self.bridge.model is not None else None)
        self.cluster.model_failed(self.bridge.model is not None)
        self.api_switch.set_model(self.bridge.model)   # the previous model, when the failure left it loaded
        self.api_panel.set_model_ready(self.bridge.model is not None)
        self.show_error(message)
        self.status_label.setText("No model loaded." if self.model_info is None else f"{self.model_info.name} ready.")

    def _on_plan_changed(self, plan: PlanView | None) -> None:
        self.plan = plan
        self.show_plan(plan)

    def _on_completion_mode_changed(self, enabled: bool) -> None:
        from cakep2p.engine.conversation import ConversationMode

        self.bridge.set_completion_mode(enabled)
        self.new_chat()
        if self.model_info is not None:
            template = "none" if enabled else "model" if self.model_info.has_chat_template else "fallback"
            self.model_info = replace(self.model_info, mode=ConversationMode(enabled, template).describe())
            self.model_panel.show_loaded(self.model_info)

    def _on_api_failed(self, message: str) -> None:
        self.api_panel.show_stopped("Off: it could not start (the message above says why).")
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
        self.library.shutdown()
        self.api_switch.shutdown()   # before the bridge closes the model the server uses
        self.bridge.shutdown()
        super().closeEvent(event)
