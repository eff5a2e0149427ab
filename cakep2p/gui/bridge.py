"""The one QObject between the headless core and Qt: core events become signals, window intents become jobs.

Core callbacks arrive on the node's threads and are re-emitted as signals (queued to the UI thread);
intents run on two worker threads — one for the node (start, serving, cluster code, model checks),
one for the model (load, generate, reset) — so the UI thread never waits on the network or on torch.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from PySide6.QtCore import QObject, Signal

from cakep2p.errors import CakeError
from cakep2p.gui.state import ModelInfo, ModelPreview, NodeState, PlanView, ReplyOutcome, plan_view, preview_of

log = logging.getLogger(__name__)

DOWNLOAD_NEEDS = ("Downloading a model needs the huggingface_hub package (pip install huggingface_hub) "
                  "and a connection to huggingface.co. Without them, copy the model folder to this machine "
                  "and pick it with “Choose folder…”.")


def apply_serving(node: Any, serving: bool, timeout: float = 10.0) -> None:
    """Join or leave the cluster: leaving stops serving others and withdraws the announcement (goodbye packets)."""
    joined = node.set_joined(serving)
    if joined is not None:
        joined.result(timeout)


def is_serving(node: Any) -> bool:
    return bool(node.serving)


class Bridge(QObject):
    """Owns the Node and the chat session; every public method is called on the UI thread and returns at once."""

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
    turnDropped = Signal(int)             # messages dropped from the start of the chat

    def __init__(self, node_options: dict | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.node_options = dict(node_options or {})
        self.node: Any = None
        self.model: Any = None
        self.session: Any = None
        self.completion_mode = False
        self.plan: PlanView | None = None
        self._node_jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-node")
        self._model_jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-model")
        self._listener_epoch = 0
        self._cancel = threading.Event()
        self._current_reply: Any = None
        self._tokens_at_stop: int | None = None
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
        self._close_session()
        previous, self.model = self.model, None
        if previous is not None:
            previous.close()
        preview = self.preview if self.preview is not None and self.preview.spec.name == checkpoint.name else None
        model = cluster.open_model(checkpoint, self.model_options(), node=self.node, planned=preview,
                                   on_progress=self._on_progress, on_notice=self._on_notice)
        self.model = model
        has_template = model.tokenizer.has_chat_template
        self.completion_mode = not has_template
        self.session = self._new_session()
        self._publish_plan()
        description = model.describe()
        self.modelLoaded.emit(ModelInfo(model.name, str(checkpoint.path), model.args.num_layers, model.max_seq_len,
                                        has_template, description, checkpoint.generation))
        self.contextChanged.emit(0, model.max_seq_len)

    def _new_session(self) -> Any:
        """A chat (or raw completion) over a fresh pipeline: its own KV cache, its own remote sessions."""
        from cakep2p.engine.conversation import Conversation

        return Conversation(self.model.new_pipeline(), self.model.tokenizer, raw=self.completion_mode)

    def _replace_session(self) -> None:
        """A new session in the new mode; the old one is swapped out only once the new one exists."""
        if self.model is None:
            return
        old, self.session = self.session, self._new_session()
        if old is not None:
            self._close_pipeline(old)

    def _close_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            self._close_pipeline(session)

    @staticmethod
    def _close_pipeline(session: Any) -> None:
        try:
            session.pipeline.close()
        except Exception:  # a lost peer cannot be told; the session is gone either way
            log.debug("closing the chat pipeline failed", exc_info=True)

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
        try:
            import huggingface_hub  # noqa: F401  (optional dependency)
            del huggingface_hub
        except ImportError:
            self.modelFailed.emit(DOWNLOAD_NEEDS)
            return None
        if not hub_id or hub_id.count("/") != 1:
            self.modelFailed.emit(f"“{hub_id}” is not a hub id: use the form owner/name, e.g. Qwen/Qwen3-0.6B")
            return None
        self.modelLoading.emit(hub_id)
        return self._track_load(self._model_jobs.submit(self._guard(lambda: self._download(hub_id), self.modelFailed)))

    def _download(self, hub_id: str) -> None:
        from huggingface_hub import snapshot_download

        self.modelProgress.emit(0, 0, f"downloading {hub_id}")
        try:
            folder = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
        except Exception as error:  # any hub/network failure becomes one message
            raise CakeError(f"could not download {hub_id}: {str(error).splitlines()[0] if str(error) else error!r}. "
                            + DOWNLOAD_NEEDS) from None
        self._load(folder)

    # Chat ----------------------------------------------------------------------------------------
    def set_completion_mode(self, enabled: bool) -> None:
        """Raw completion (no chat template) or chat; switching starts a new chat."""
        if enabled != self.completion_mode:
            self.completion_mode = enabled
            self._submit_chat(self._replace_session)

    def ask(self, text: str, params: Any, system_prompt: str | None = None) -> bool:
        """Stream an answer to `text`; False (with an error signal) when no model is loaded or one is streaming."""
        return self._start_reply(lambda session, reply, cancel: session.ask(text, params, reply, cancel),
                                 system_prompt, question=text)

    def regenerate(self, params: Any, system_prompt: str | None = None) -> bool:
        return self._start_reply(lambda session, reply, cancel: session.regenerate(params, reply, cancel),
                                 system_prompt, question="")

    def drop_oldest_turn_and_ask(self, text: str, params: Any, system_prompt: str | None = None) -> bool:
        """After ContextFull: forget the oldest user message and its answer, then ask again."""
        def start(session: Any, reply: Any, cancel: threading.Event):
            messages = session.messages
            if not messages:
                from cakep2p.engine.conversation import ContextFull

                raise ContextFull("this message alone is longer than the context: shorten it, "
                                  "or load the model with a larger context")
            count = 1
            while count < len(messages) and messages[count]["role"] != "user":
                count += 1
            del messages[:count]
            self.turnDropped.emit(count)
            return session.ask(text, params, reply, cancel)
        return self._start_reply(start, system_prompt, question=text)

    def stop(self) -> None:
        """End the streaming answer within one token."""
        reply = self._current_reply
        if self._generating and reply is not None and not self._cancel.is_set():
            self._tokens_at_stop = len(reply.token_ids)
            self._cancel.set()

    def new_chat(self) -> None:
        self.stop()
        self._submit_chat(lambda: self.session.reset() if self.session is not None else None)
        if self.model is not None:
            self.contextChanged.emit(0, self.model.max_seq_len)

    def restore_chat(self, messages: list[dict[str, str]]) -> Future:
        """Continue a stored chat: a new session whose history is `messages` (text only; the cache refills)."""
        self.stop()

        def job() -> None:
            if self.session is not None:
                self.session.reset()
                self.session.messages.extend(dict(message) for message in messages)
                self.contextChanged.emit(self.session.context_used(), self.session.max_context)
        return self._submit_chat(job)

    def _submit_chat(self, job: Callable[[], Any]) -> Future:
        return self._model_jobs.submit(self._guard(job, self.error))

    def _start_reply(self, start: Callable, system_prompt: str | None, question: str) -> bool:
        from cakep2p.engine.conversation import Reply

        if not self.model_expected():
            self.error.emit("Load a model first: choose a model folder above.")
            return False
        if self._generating:
            self.error.emit("An answer is still streaming: wait for it or press Stop.")
            return False
        self._generating = True
        self._cancel = threading.Event()
        self._tokens_at_stop = None
        self._current_reply = Reply()
        self._model_jobs.submit(self._run_reply, start, self._current_reply, self._cancel, system_prompt, question)
        return True

    def _run_reply(self, start: Callable, reply: Any, cancel: threading.Event, system_prompt: str | None,
                   question: str) -> None:
        from cakep2p.engine.conversation import ContextFull

        session = self.session
        try:
            if session is None:
                raise CakeError("no model is loaded: choose a model folder and press Load")
            session.system_prompt = system_prompt or None
            self.replyStarted.emit()
            for event in start(session, reply, cancel):
                if event.text:
                    self.tokenArrived.emit(event.text)
            after_stop = None if self._tokens_at_stop is None else len(reply.token_ids) - self._tokens_at_stop
            outcome = ReplyOutcome(reply, session.context_used(), session.max_context, after_stop)
            self._generating = False
            self.replyFinished.emit(outcome)
            self.contextChanged.emit(outcome.context_used, outcome.max_context)
            if self.model is not None and self.model.plan is not None:
                self._publish_plan()
        except ContextFull as error:
            self._generating = False
            self.contextFull.emit(str(error), question)
        except CakeError as error:
            self._generating = False
            self.replyFailed.emit(str(error))
        except Exception as error:  # the window shows it; it never takes the app down
            log.exception("generation failed")
            self._generating = False
            self.replyFailed.emit(f"generation failed: {error}")
        finally:
            if self._current_reply is reply:
                self._current_reply = None

    # Life ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop generating, free the model and stop the node (blocks briefly; called when the window closes)."""
        if self._closed:
            return
        self._closed = True
        self._listener_epoch += 1
        self._cancel.set()
        self._model_jobs.shutdown(wait=True, cancel_futures=True)
        self._node_jobs.shutdown(wait=True, cancel_futures=True)
        self._close_session()
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
