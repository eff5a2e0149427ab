"""The window's chat: its turns on the one Transcript, which the list model shows and the history log follows.

A ChatController turns the window's chat intents (send, regenerate, new chat, an earlier chat, drop the oldest
turn) into single operations on its Transcript, hands the bridge the transcript's history for each answer,
and applies the bridge's reply signals to the transcript. It lives on the UI thread; the widgets only forward
intents to it and show what it says.
"""

from __future__ import annotations

from typing import Any, Protocol

from PySide6.QtCore import QObject, Signal

from cakep2p.gui.history import ChatHistory, ChatLog
from cakep2p.gui.state import ReplyOutcome
from cakep2p.gui.transcript import Transcript

QUEUED_STATUS = "waiting for the model to load…"
TOO_LONG = "this message alone is longer than the context: shorten it, or load the model with a larger context"


class ChatSettings(Protocol):
    """Where the sampling and the system prompt for the next answer come from (the settings drawer)."""

    def params(self) -> Any: ...

    def system_prompt(self) -> str | None: ...


class ChatController(QObject):
    """One chat at a time: its Transcript, the ChatLog that stores it, and the turn being answered."""

    errorRaised = Signal(str)
    choiceOffered = Signal(str, str)    # why the chat no longer fits, the question to ask again
    busyChanged = Signal(bool)          # an answer is streaming
    statusChanged = Signal(str)         # the last answer's summary line

    def __init__(self, bridge: Any, history: ChatHistory, settings: ChatSettings, parent: QObject | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.history = history
        self.settings = settings
        self.transcript = Transcript(self)
        self.log: ChatLog = history.new_chat()
        self.model_name: str | None = None   # the loaded model's
        self._loading = False
        self._queued: str | None = None      # a question typed while the model loads
        self.transcript.historyChanged.connect(self._store)
        bridge.tokenArrived.connect(self.transcript.append_text)
        bridge.replyFinished.connect(self._on_reply_finished)
        bridge.replyFailed.connect(self._on_reply_failed)
        bridge.contextFull.connect(self._on_context_full)

    # Intents ---------------------------------------------------------------------------------------
    def send(self, text: str) -> bool:
        """Ask `text` now, or once the model being loaded is there; False (with an error) when it cannot be asked."""
        refusal = self._refusal()
        if refusal:
            self.errorRaised.emit(refusal)
            return False
        if self._loading:
            self._queued = text
            self.transcript.append("user", text, state="queued", status=QUEUED_STATUS)
        else:
            self._ask(text)
        return True

    def regenerate(self) -> None:
        """The last answer is answered again, in its place."""
        if not self.bridge.generating and self.transcript.regenerate():
            self._request_answer(question_too=False)

    def new_chat(self) -> None:
        self._queued = None
        self._start(self.history.new_chat(model=self.model_name or "", system_prompt=self.settings.system_prompt()))

    def open_chat(self, log: ChatLog) -> None:
        """Show a stored chat and continue it (the model re-reads its text on the next message)."""
        self._queued = None
        self._start(log)

    def ask_in_new_chat(self, question: str) -> None:
        self.new_chat()
        self.send(question)

    def drop_oldest_turn_and_ask(self, question: str) -> None:
        """After the chat outgrew the context: forget its oldest question and answer, then ask `question` again."""
        if self.bridge.generating:
            self.errorRaised.emit("An answer is still streaming: wait for it or press Stop.")
        elif not self.transcript.drop_oldest_turn():
            self.errorRaised.emit(TOO_LONG)
        else:
            self.send(question)

    def add_notice(self, text: str) -> None:
        self.transcript.append("notice", text)

    # The model's life (the window passes on the bridge's events) ------------------------------------
    def model_loading(self) -> None:
        self._loading = True

    def model_loaded(self, name: str) -> None:
        """A model (another one, or the same spread over more machines): the chat on screen goes on with it, and the
        question typed meanwhile is asked."""
        self._loading = False
        self.model_name = name
        queued, self._queued = self._queued, None
        self.transcript.remove_queued()
        self.bridge.set_history(self.transcript.history())
        if queued:
            self.send(queued)

    def model_failed(self) -> str | None:
        """The model did not load: the question typed meanwhile leaves the chat and is returned."""
        self._loading = False
        queued, self._queued = self._queued, None
        self.transcript.remove_queued()
        return queued

    # Inside ------------------------------------------------------------------------------------------
    def _refusal(self) -> str | None:
        if self.bridge.generating:
            return "An answer is still streaming: wait for it or press Stop."
        if self.model_name is None and not self._loading:
            return "Load a model first: open one (a .gguf file or a model folder), or pick one in the model library."
        return None

    def _ask(self, question: str) -> None:
        self.transcript.append("user", question)
        self.transcript.append("assistant", "", state="streaming")
        self._request_answer(question_too=True)

    def _request_answer(self, question_too: bool) -> None:
        """The bridge answers the transcript's history; if it refuses (it says why), the turn leaves the chat."""
        settings = self.settings
        if self.bridge.ask(self.transcript.history(), settings.params(), settings.system_prompt()):
            self.busyChanged.emit(True)
        else:
            self.transcript.withdraw_answer(question_too=question_too)

    def _start(self, log: ChatLog) -> None:
        """Show `log`'s chat (a new one is empty): the log first, so that it only sees its own messages; the bridge
        stops an answer still streaming for the chat before and starts the session over with this one."""
        self.log = log
        self.transcript.replace((message.role, message.content) for message in log.messages
                                if message.role in ("user", "assistant"))
        self.bridge.set_history(self.transcript.history())

    def _store(self) -> None:
        self.log.follow(self.transcript.history())

    def _on_reply_finished(self, outcome: ReplyOutcome) -> None:
        # No streaming row: the chat was replaced while this answer streamed, and it belongs to no chat now.
        if self.transcript.streaming_row() >= 0:
            reply = outcome.reply
            status = reply.summary() if reply.done else ""
            self.transcript.finish_streaming(status, text=reply.text)
            self.statusChanged.emit(status)
            if reply.context_full:
                self.add_notice(f"The answer stopped at the end of the model's context ({outcome.max_context} "
                                "tokens): start a new chat to go on.")
        self.busyChanged.emit(False)

    def _on_reply_failed(self, message: str) -> None:
        self.transcript.finish_streaming("failed", failed=True)
        self.errorRaised.emit(message)
        self.busyChanged.emit(False)

    def _on_context_full(self, message: str, question: str) -> None:
        answered = self.transcript.streaming_row() >= 0
        self.transcript.withdraw_answer(question_too=bool(question))
        self.busyChanged.emit(False)
        if not answered:
            return
        if question:
            self.choiceOffered.emit(message, question)
        else:
            self.errorRaised.emit(message)
