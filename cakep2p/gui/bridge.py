"""The one QObject between the headless core and Qt: core events become signals (queued to the UI thread), window
intents become jobs on two worker threads (the node's: start, serving, code, memory, checks, notes; the model's:
load, generate, reset), which only emit: they never touch a widget, a model or the window's Transcript."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from PySide6.QtCore import QObject, Signal

from cakep2p.errors import CakeError
from cakep2p.gui.chat_session import ChatSession
from cakep2p.gui.state import (ModelPreview, NodeState, PlanView, cluster_offers, left_out_notes, library_state,
                               model_info, plan_view, planned_nodes, preview_of)

log = logging.getLogger(__name__)


def apply_serving(node: Any, serving: bool, timeout: float = 10.0) -> None:
    """Join or leave the cluster: leaving stops serving others and withdraws the announcement (goodbye packets)."""
    joined = node.set_joined(serving)
    if joined is not None:
        joined.result(timeout)


class Bridge(QObject):
    """Owns the Node, the model and the chat's session; every public method is called on the UI thread and returns
    at once."""

    nodeStarted = Signal(object)          # NodeState
    nodeFailed = Signal(str)
    ownInfo = Signal(object)              # this machine's PeerInfo (its row in the peers table)
    peerEvent = Signal(str, object)       # "added" | "updated" | "removed", PeerInfo
    peerLost = Signal(str)                # node id the mesh declared lost (its layers moved to the others)
    peersReset = Signal()
    servingChanged = Signal(bool)
    notesChanged = Signal(str, object)    # other clusters' note, the other left-out notes (list of str)
    libraryChecked = Signal(object, object, object)   # fits {(key, format): Fit}, {repo: path}, {repo: bytes}
    notice = Signal(str)
    error = Signal(str)
    modelInspected = Signal(object)       # ModelPreview
    inspectFailed = Signal(str)           # why a model cannot be previewed (shown by the model panel only)
    modelLoading = Signal(str)
    modelProgress = Signal(object, object, str)  # bytes done, in all (0: unknown), what (ints beyond 32 bits)
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
        self.sizing: tuple[Any, int] | None = None   # the loaded model's planner.ModelSpec and context
        self.loaded_planned: Any = None        # the cluster.PlannedModel the loaded model runs (None: unknown)
        self._node_jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-node")
        self._model_jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-model")
        self._listener_epoch = 0
        self._generating = False
        self._closed = False
        self.preview: Any = None    # the last plan preview (cluster.PlannedModel): Load uses it while it holds
        self.weights = "auto"       # the weight format to load in (cakep2p.engine.formats.USER_FORMATS)
        self._inspecting: Future | None = None
        self._node_started: Future | None = None
        self._loads: set[Future] = set()

    # Node ----------------------------------------------------------------------------------------
    @property
    def generating(self) -> bool:
        return self._generating

    def start(self) -> Future | None:
        """Start the Node off the UI thread; nodeStarted or nodeFailed follows."""
        self._node_started = self._node_job(self._start_node, self.nodeFailed)
        return self._node_started

    def _start_node(self) -> None:
        from cakep2p.node import Node

        node = Node(**self.node_options)
        node.start()
        self.node = node
        if not bool(node.serving):
            apply_serving(node, False)
        self._attach_directory(node)
        self.nodeStarted.emit(self._node_state())
        self.servingChanged.emit(bool(node.serving))
        self.ownInfo.emit(node.info)

    def _node_state(self) -> NodeState:
        node = self.node
        return NodeState(str(node.name), str(node.node_id), int(node.port or 0), str(node.fingerprint),
                         bool(node.serving), self._current_code())

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

    def set_serving(self, serving: bool) -> Future | None:
        """Join (announce, accept parts) or leave the cluster; a chat this node started keeps going."""
        def job() -> None:
            if self.node is None:
                raise CakeError("the node is not running yet; wait for it to start")
            apply_serving(self.node, bool(serving))
            self.servingChanged.emit(bool(self.node.serving))
            self.ownInfo.emit(self.node.info)
        return self._node_job(job, self.error, after_failure=self._report_serving)

    def _report_serving(self) -> None:
        if self.node is not None:
            self.servingChanged.emit(bool(self.node.serving))

    def set_weights(self, weights: str) -> None:   # the format the next preview and Load use
        self.weights = weights

    def set_max_memory(self, offer: int | None) -> Future | None:
        """What this machine offers to model parts from now on (None: all it can spare); re-announced at once."""
        def job() -> None:
            if offer is None:
                self.node_options.pop("max_memory", None)
            else:
                self.node_options["max_memory"] = int(offer)
            if self.node is not None:
                announced = self.node.set_max_memory(offer)
                if announced is not None:
                    announced.result(10)
                self.ownInfo.emit(self.node.info)
        return self._node_job(job)

    def budgets(self) -> Any:
        """This node's and its usable peers' offers now (library.fit.Budgets; None before the node runs)."""
        return cluster_offers(self.node, self.node_options.get("max_memory"))

    def change_cluster(self, code: str) -> Future | None:
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
                if not bool(node.serving):
                    apply_serving(node, False)
                self.nodeStarted.emit(self._node_state())
            else:  # restart the node with the new code
                self.node_options["serving"] = bool(node.serving) if node is not None else True
                self.node = None
                self._listener_epoch += 1
                if node is not None:
                    node.stop()
                self._start_node()
            self.preview = None
            self.notice.emit("Joined the cluster of the new pairing code.")
        return self._node_job(job)

    def _current_code(self) -> str:
        from cakep2p import security

        node_code = self.node.cluster_code if self.node is not None else None
        return self.node_options.get("cluster_code") or node_code or security.load_or_create_code()

    def refresh_notes(self) -> Future | None:
        """notesChanged with who the directory heard but the current plan (or any plan) leaves out, and why."""
        def job() -> None:
            if self.node is not None:
                self.notesChanged.emit(*left_out_notes(self.node, self.loaded_planned if self.model else None))
        return self._node_job(job)

    def check_library(self, repos: Sequence[str]) -> Future | None:
        """libraryChecked with every catalog model's fit over the offers now, and which `repos` are here."""
        def job() -> None:
            self.libraryChecked.emit(*library_state(self.budgets(), self.node_options.get("max_memory"), repos))
        return self._node_job(job)

    # Model ---------------------------------------------------------------------------------------
    def inspect_model(self, model_dir: str) -> Future | None:
        """Size of the model in `model_dir` and whether this node and its usable peers can hold it."""
        self._inspecting = self._node_job(lambda: self.modelInspected.emit(self._inspect(model_dir)),
                                          self.inspectFailed)
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

        return ModelOptions(max_memory=self.node_options.get("max_memory"), weights=self.weights)

    def load_model(self, model_dir: str) -> Future | None:
        """Open the model (over the cluster when the core can); modelLoaded or modelFailed follows."""
        self.modelLoading.emit(str(model_dir))
        return self._track_load(self._model_job(lambda: self._load(model_dir), self.modelFailed))

    def _track_load(self, future: Future | None) -> Future | None:
        self._loads = {pending for pending in self._loads if not pending.done()} | ({future} if future else set())
        return future

    def model_expected(self) -> bool:
        """A model is loaded or on its way: messages may be queued behind it."""
        return self.model is not None or any(not pending.done() for pending in self._loads)

    def _load(self, model_dir: str) -> None:
        from cakep2p import cluster
        from cakep2p.engine.checkpoint import Checkpoint
        from cakep2p.engine.sizes import model_spec

        checkpoint = Checkpoint.open(model_dir)
        self.modelProgress.emit(0, 0, f"loading {checkpoint.name}")
        if self._node_started is not None:
            self._node_started.result()   # plan over the cluster once the node is up (or has failed)
        if self._inspecting is not None:
            self._inspecting.result()     # the preview being made is the plan to load
        self.chat.close()
        previous, self.model, self.plan = self.model, None, None
        if previous is not None:
            previous.close()
        preview = self.preview if self.preview is not None and self.preview.spec.name == checkpoint.name else None
        options = self.model_options()
        model = cluster.open_model(checkpoint, options, node=self.node, planned=preview,
                                   on_progress=self._on_progress, on_notice=self._on_notice)
        self.model = model
        self.loaded_planned = preview if preview is not None and model.plan in (None, preview.plan) else None
        self.sizing = (model_spec(checkpoint, options.dtype), model.max_seq_len)
        self.chat.open(model, raw=self.completion_mode)   # the user's raw-completion switch outlives a model
        self._publish_plan()
        self.modelLoaded.emit(model_info(checkpoint, model, self.completion_mode))
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
        """A core notice. While a model loads it is a plan's note (a machine left out): the peers panel shows those,
        made again once the plan is known. Mid-chat it is news (a peer lost): said in the chat, and the nodes a
        re-plan dropped are shown lost."""
        if self.model is None:
            log.info("%s", message)
            return
        self.notice.emit(str(message))
        before = planned_nodes(self.plan)
        self._publish_plan()
        own_id = str(self.node.node_id) if self.node is not None else "local"
        for node_id in sorted(before - planned_nodes(self.plan) - {own_id}):
            self.peerLost.emit(node_id)

    # Chat ----------------------------------------------------------------------------------------
    def set_completion_mode(self, enabled: bool) -> None:
        """Raw completion (no chat template) or chat; the window starts a new chat with it."""
        if enabled != self.completion_mode:
            self.completion_mode = enabled
            self._model_job(lambda: self.chat.open(self.model, raw=enabled) if self.model is not None else None)

    def ask(self, history: Sequence[dict[str, str]], params: Any, system_prompt: str | None = None) -> bool:
        """Stream the answer to the last message of `history` (the chat on screen, oldest first, ending with the
        question); False (with an error signal) when no model is loaded or an answer is streaming."""
        if not self.model_expected():
            self.error.emit("Load a model first: open one, or pick one in the model library.")
            return False
        if self._generating:
            self.error.emit("An answer is still streaming: wait for it or press Stop.")
            return False
        self._generating = True
        reply, cancel = self.chat.begin()
        history = [dict(message) for message in history]   # the worker's own copy
        self._model_job(lambda: self._run_reply(history, params, system_prompt, reply, cancel))
        return True

    def stop(self) -> None:
        """End the streaming answer within one token."""
        if self._generating:
            self.chat.stop()

    def set_history(self, history: Sequence[dict[str, str]]) -> Future | None:
        """Another chat is on screen (a stored one, a new one): the session starts over with it, and
        contextChanged says how much of the context it takes."""
        self.stop()
        history = [dict(message) for message in history]

        def job() -> None:
            used = self.chat.set_history(history)
            if used is not None:
                self.contextChanged.emit(*used)
        return self._model_job(job)

    def _run_reply(self, history: list[dict[str, str]], params: Any, system_prompt: str | None, reply: Any,
                   cancel: threading.Event) -> None:
        def ended(signal: Any) -> Callable[..., None]:
            def emit(*args: Any) -> None:
                self._generating = False
                signal.emit(*args)
            return emit

        events = SimpleNamespace(started=self.replyStarted.emit, token=self.tokenArrived.emit,
                                 finished=ended(self.replyFinished), failed=ended(self.replyFailed),
                                 context_full=ended(self.contextFull))
        if self.chat.run(history, params, system_prompt, reply, cancel, events):
            outcome = self.chat.outcome(reply)
            self.contextChanged.emit(outcome.context_used, outcome.max_context)
            if self.model is not None and self.model.plan is not None:
                self._publish_plan()

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
        for name, closing in (("model", self.model), ("node", self.node)):
            try:
                if closing is not None:
                    closing.close() if name == "model" else closing.stop()
            except Exception:
                log.exception("closing the %s failed", name)
        self.model = self.node = None

    def _node_job(self, job: Callable[[], Any], failure: Any = None, **options: Any) -> Future | None:
        """`job` on the node thread, its errors on `failure` (else `error`); nothing once the window closed."""
        return None if self._closed else self._node_jobs.submit(self._guard(job, failure or self.error, **options))

    def _model_job(self, job: Callable[[], Any], failure: Any = None) -> Future | None:
        return None if self._closed else self._model_jobs.submit(self._guard(job, failure or self.error))

    def _guard(self, job: Callable[[], Any], failure: Any, after_failure: Callable[[], None] | None = None):
        """Run `job`, turning any error into one message on the `failure` signal."""
        def run() -> None:
            try:
                job()
            except Exception as error:
                if not isinstance(error, CakeError):
                    log.exception("background job failed")
                failure.emit(str(error) if isinstance(error, CakeError) else f"{type(error).__name__}: {error}")
                if after_failure:
                    after_failure()
        return run
