"""The one QObject between the headless core and Qt: core events become signals, window intents become jobs.

Core callbacks arrive on the node's threads and are re-emitted as signals (queued to the UI thread);
intents run on two worker threads — one for the node (start, serving, cluster code, model checks),
one for the model (load, generate, reset) — so the UI thread never waits on the network or on torch.
The worker threads only emit: they never touch a widget, a model or the window's Transcript. A chat
reaches the engine as the history the window hands `ask` (see chat_session.py).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from PySide6.QtCore import QObject, Signal

from cakep2p.errors import CakeError
from cakep2p.gui.chat_session import ChatSession
from cakep2p.gui.downloads import download, why_not_downloadable
from cakep2p.gui.state import ModelInfo, ModelPreview, NodeState, PlanView, plan_view, preview_of

log = logging.getLogger(__name__)


def apply_serving(node: Any, serving: bool, timeout: float = 10.0) -> None:
    """Join or leave the cluster: leaving stops serving others and withdraws the announcement (goodbye packets)."""
    joined = node.set_joined(serving)
    if joined is not None:
        joined.result(timeout)


def is_serving(node: Any) -> bool:
    return bool(node.serving)


class Bridge(QObject):
    """Owns the Node, the model and the chat's session; every public method is called on the UI thread and returns
    at once."""

    nodeStarted = Signal(object)          # NodeState
    nodeFailed = Signal(str)
    peerEvent = Signal(str, object)       # "added" | "updated" | "removed", PeerInfo
    peersReset = Signal()
    servingChanged = Signal(bool)
    notice = Signal(str)
    error = Signal(str)
    modelInspected = Signal(object)       # ModelPreview
    modelLoading = Signal(str)
    modelProgress = Signal(int, int, str)  # done, total (0: unknown), what
    modelLoaded = Signal(object)          # ModelInfo
    modelFailed = Signal(str)
    planChanged = Signal(object)          # PlanView | None
    replyStarted = Signal()
    tokenArrived = Signal(str)
    replyFinished = Signal(object)        # ReplyOutcome
    replyFailed = Signal(str)
    contextFull = Signal(str, str)        # message, the question that did not fit
    contextChanged = Signal(int, int)     # used, max

    def __init__(self, node_options: dict | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.node_options = dict(node_options or {})
        self.node: Any = None
        self.model: Any = None
        self.chat = ChatSession()             # the loaded model's Conversation, used on the model thread
        self.completion_mode = False
        self.plan: PlanView | None = None
        self._node_jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-node")
        self._model_jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-model")
        self._listener_epoch = 0
        self._generating = False
        self._closed = False
        self.preview: Any = None    # the last plan preview (cluster.PlannedModel): Load uses it while it holds
        self._inspecting: Future | None = None
        self._node_started: Future | None = None
        self._loads: set[Future] = set()

    # Node ----------------------------------------------------------------------------------------
    @property
    def generating(self) -> bool:
        return self._generating

    def start(self) -> Future:
        """Start the Node off the UI thread; nodeStarted or nodeFailed follows."""
        self._node_started = self._node_jobs.submit(self._guard(self._start_node, self.nodeFailed))
        return self._node_started

    def _start_node(self) -> None:
        from cakep2p.node import Node

        node = Node(**self.node_options)
        node.start()
        self.node = node
        if not is_serving(node):
            apply_serving(node, False)
        self._attach_directory(node)
        self.nodeStarted.emit(self._node_state())
        self.servingChanged.emit(is_serving(node))

    def _node_state(self) -> NodeState:
        node = self.node
        return NodeState(str(node.name), str(node.node_id), int(node.port or 0), str(node.fingerprint),
                         is_serving(node), self._current_code())

    def _attach_directory(self, node: Any) -> None:
        self._listener_epoch += 1
        epoch = self._listener_epoch
        own_id = node.node_id

        def on_peer(event: str, peer: Any) -> None:   # runs on the core's discovery thread
            if epoch == self._listener_epoch and peer.node_id != own_id:
                self.peerEvent.emit(event, peer)

        node.directory.add_listener(on_peer)
        for peer in node.directory.peers():
            on_peer("added", peer)

    def set_serving(self, serving: bool) -> Future:
        """Join (announce, accept parts) or leave the cluster; a chat this node started keeps going."""
        def job() -> None:
            if self.node is None:
                raise CakeError("the node is not running yet; wait for it to start")
            apply_serving(self.node, bool(serving))
            self.servingChanged.emit(is_serving(self.node))
        return self._node_jobs.submit(self._guard(job, self.error, after_failure=self._report_serving))

    def _report_serving(self) -> None:
        if self.node is not None:
            self.servingChanged.emit(is_serving(self.node))

    def change_cluster(self, code: str) -> Future:
        """Join the cluster of another pairing code (stored for next time); a malformed code gives a message."""
        def job() -> None:
            from cakep2p import security

            normalized = security.normalize_code(code)
            if self.node is not None and normalized == self._current_code():
                return
            self.node_options["cluster_code"] = normalized
            node = self.node
            self.peersReset.emit()
            if node is not None and hasattr(node, "set_cluster_code"):
                switched = node.set_cluster_code(normalized)
                if switched is not None:
                    switched.result(30)
                if not is_serving(node):
                    apply_serving(node, False)
                self.nodeStarted.emit(self._node_state())
            else:  # restart the node with the new code
                self.node_options["serving"] = is_serving(node) if node is not None else True
                self.node = None
                self._listener_epoch += 1
                if node is not None:
                    node.stop()
                self._start_node()
            self.preview = None
            self.notice.emit("Joined the cluster of the new pairing code."
                             + (" Load the model again to spread it over this cluster." if self.model else ""))
        return self._node_jobs.submit(self._guard(job, self.error))

    def _current_code(self) -> str:
        from cakep2p import security

        node_code = self.node.cluster_code if self.node is not None else None
        return self.node_options.get("cluster_code") or node_code or security.load_or_create_code()

    # Model ---------------------------------------------------------------------------------------
    def inspect_model(self, model_dir: str) -> Future:
        """Size of the model in `model_dir` and whether this node and its usable peers can hold it."""
        self._inspecting = self._node_jobs.submit(
            self._guard(lambda: self.modelInspected.emit(self._inspect(model_dir)), self.modelFailed))
        return self._inspecting

    def _inspect(self, model_dir: str) -> ModelPreview:
        """The plan cluster.plan_model makes now (the one Load uses while the peers stay as they are)."""
        from cakep2p import cluster
        from cakep2p.engine.checkpoint import Checkpoint
        from cakep2p.errors import PlanError

        checkpoint = Checkpoint.open(model_dir)
        if self._node_started is not None:
            self._node_started.result()
        if self.node is None:
            try:
                cluster.check_fits_locally(checkpoint, self.model_options())
            except PlanError as error:
                return preview_of(checkpoint, None, "local", failure=f"too big for this machine: {error}")
            return preview_of(checkpoint, None, "local")
        try:
            planned = cluster.plan_model(self.node, checkpoint, self.model_options())
        except PlanError as error:
            return preview_of(checkpoint, None, self.node.node_id, failure=f"too big for the cluster: {error}")
        self.preview = planned
        return preview_of(checkpoint, planned, self.node.node_id)

    def model_options(self) -> Any:
        from cakep2p.cluster import ModelOptions

        return ModelOptions(max_memory=self.node_options.get("max_memory"))

    def load_model(self, model_dir: str) -> Future:
        """Open the model (over the cluster when the core can); modelLoaded or modelFailed follows."""
        self.modelLoading.emit(str(model_dir))
        return self._track_load(self._model_jobs.submit(self._guard(lambda: self._load(model_dir), self.modelFailed)))

    def _track_load(self, future: Future) -> Future:
        self._loads = {pending for pending in self._loads if not pending.done()} | {future}
        return future

    def model_expected(self) -> bool:
        """A model is loaded or on its way: messages may be queued behind it."""
        return self.model is not None or any(not pending.done() for pending in self._loads)

    def _load(self, model_dir: str) -> None:
        from cakep2p import cluster
        from cakep2p.engine.checkpoint import Checkpoint

        checkpoint = Checkpoint.open(model_dir)
        self.modelProgress.emit(0, 0, f"loading {checkpoint.name}")
        if self._node_started is not None:
            self._node_started.result()   # plan over the cluster once the node is up (or has failed)
        if self._inspecting is not None:
            self._inspecting.result()     # the preview being made is the plan to load
        self.chat.close()
        previous, self.model = self.model, None
        if previous is not None:
            previous.close()
        preview = self.preview if self.preview is not None and self.preview.spec.name == checkpoint.name else None
        model = cluster.open_model(checkpoint, self.model_options(), node=self.node, planned=preview,
                                   on_progress=self._on_progress, on_notice=self._on_notice)
        self.model = model
        has_template = model.tokenizer.has_chat_template
        self.completion_mode = not has_template
        self.chat.open(model, raw=self.completion_mode)
        self._publish_plan()
        description = model.describe()
        self.modelLoaded.emit(ModelInfo(model.name, str(checkpoint.path), model.args.num_layers, model.max_seq_len,
                                        has_template, description, checkpoint.generation))
        self.contextChanged.emit(0, model.max_seq_len)

    def _publish_plan(self) -> None:
        model = self.model
        if model is None:
            self.plan = None
        else:
            own_id = str(self.node.node_id) if self.node is not None else "local"
            source = model.plan or model.describe().get("stages", ())  # no plan: the whole model on this machine
            own_name = str(self.node.name) if self.node is not None else "this machine"
            self.plan = plan_view(source, own_id, model.args.num_layers, caption=model.name, own_name=own_name)
        self.planChanged.emit(self.plan)

    def _on_progress(self, what: str, done: int, total: int) -> None:
        self.modelProgress.emit(done, total, what)

    def _on_notice(self, message: str) -> None:
        self.notice.emit(str(message))
        if self.model is not None:
            self._publish_plan()

    def download_model(self, hub_id: str) -> Future | None:
        """Fetch a Hugging Face Hub model (needs huggingface_hub and a network), then load it."""
        hub_id = hub_id.strip()
        refusal = why_not_downloadable(hub_id)
        if refusal:
            self.modelFailed.emit(refusal)
            return None
        self.modelLoading.emit(hub_id)
        return self._track_load(self._model_jobs.submit(self._guard(lambda: self._download(hub_id), self.modelFailed)))

    def _download(self, hub_id: str) -> None:
        self.modelProgress.emit(0, 0, f"downloading {hub_id}")
        self._load(download(hub_id))

    # Chat ----------------------------------------------------------------------------------------
    def set_completion_mode(self, enabled: bool) -> None:
        """Raw completion (no chat template) or chat; the window starts a new chat with it."""
        if enabled != self.completion_mode:
            self.completion_mode = enabled
            self._submit_chat(lambda: self.chat.open(self.model, raw=enabled) if self.model is not None else None)

    def ask(self, history: Sequence[dict[str, str]], params: Any, system_prompt: str | None = None) -> bool:
        """Stream the answer to the last message of `history` (the chat on screen, oldest first, ending with the
        question); False (with an error signal) when no model is loaded or an answer is streaming."""
        if not self.model_expected():
            self.error.emit("Load a model first: choose a model folder above.")
            return False
        if self._generating:
            self.error.emit("An answer is still streaming: wait for it or press Stop.")
            return False
        self._generating = True
        reply, cancel = self.chat.begin()
        history = [dict(message) for message in history]   # the worker's own copy
        self._model_jobs.submit(self._run_reply, history, params, system_prompt, reply, cancel)
        return True

    def stop(self) -> None:
        """End the streaming answer within one token."""
        if self._generating:
            self.chat.stop()

    def set_history(self, history: Sequence[dict[str, str]]) -> Future:
        """Another chat is on screen (a stored one, a new one): the session starts over with it, and
        contextChanged says how much of the context it takes."""
        self.stop()
        history = [dict(message) for message in history]

        def job() -> None:
            used = self.chat.set_history(history)
            if used is not None:
                self.contextChanged.emit(*used)
        return self._submit_chat(job)

    def _submit_chat(self, job: Callable[[], Any]) -> Future:
        return self._model_jobs.submit(self._guard(job, self.error))

    def _run_reply(self, history: list[dict[str, str]], params: Any, system_prompt: str | None, reply: Any,
                   cancel: threading.Event) -> None:
        from cakep2p.engine.conversation import ContextFull

        try:
            events = self.chat.answer(history, params, system_prompt, reply, cancel)
            self.replyStarted.emit()
            for event in events:
                if event.text:
                    self.tokenArrived.emit(event.text)
            outcome = self.chat.outcome(reply)
            self._generating = False
            self.replyFinished.emit(outcome)
            self.contextChanged.emit(outcome.context_used, outcome.max_context)
            if self.model is not None and self.model.plan is not None:
                self._publish_plan()
        except ContextFull as error:
            self._generating = False
            self.contextFull.emit(str(error), history[-1]["content"])
        except CakeError as error:
            self._generating = False
            self.replyFailed.emit(str(error))
        except Exception as error:  # the window shows it; it never takes the app down
            log.exception("generation failed")
            self._generating = False
            self.replyFailed.emit(f"generation failed: {error}")
        finally:
            self.chat.finished(reply)

    # Life ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop generating, free the model and stop the node (blocks briefly; called when the window closes)."""
        if self._closed:
            return
        self._closed = True
        self._listener_epoch += 1
        self.chat.cancel()
        self._model_jobs.shutdown(wait=True, cancel_futures=True)
        self._node_jobs.shutdown(wait=True, cancel_futures=True)
        self.chat.close()
        if self.model is not None:
            try:
                self.model.close()
            except Exception:
                log.exception("closing the model failed")
            self.model = None
        if self.node is not None:
            try:
                self.node.stop()
            except Exception:
                log.exception("stopping the node failed")
            self.node = None

    def _guard(self, job: Callable[[], Any], failure: Any, after_failure: Callable[[], None] | None = None):
        """Run `job`, turning any error into one message on the `failure` signal."""
        def run() -> None:
            try:
                job()
            except CakeError as error:
                failure.emit(str(error))
                if after_failure:
                    after_failure()
            except Exception as error:
                log.exception("background job failed")
                failure.emit(f"{type(error).__name__}: {error}")
                if after_failure:
                    after_failure()
        return run
