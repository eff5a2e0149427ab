"""The HTTP API under test: a server on a thread that always stops, the single-node greedy chat answer, a model
whose pipelines pause (or fail) on cue, and how many sessions a stage holds."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from cakep2p.api import BackgroundServer
from cakep2p.cluster import LocalModel
from cakep2p.engine.conversation import Conversation, Reply, stream_completion
from cakep2p.engine.sampling import SamplingParams
from cakep2p.errors import MeshError
from tests.kit.net import LOOPBACK


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` on a free loopback port in a thread; yields the base URL and always shuts the server down."""
    server = BackgroundServer(app)
    try:
        yield server.start()
    finally:
        server.stop()
        assert not server.running, "the API server did not stop"


def greedy_chat(model: LocalModel, messages: list[dict], max_tokens: int) -> Reply:
    """The single-node greedy answer for `messages`, rendered as the rest of cakep2p renders chats."""
    pipeline = model.new_pipeline()
    try:
        prompt_ids = Conversation(pipeline, model.tokenizer).prompt_ids(messages)
        reply = Reply()
        for _ in stream_completion(pipeline, model.tokenizer, prompt_ids, SamplingParams(max_new_tokens=max_tokens),
                                   reply, trim_start=True):  # a chat answer starts with its first word
            pass
        return reply
    finally:
        pipeline.close()


class GatedModel:
    """The real model, but every session's pipeline pauses before its third token until `gate` is set.

    With `fail_at`, that forward call raises MeshError instead, as when a peer holding layers is lost.
    """

    def __init__(self, model: LocalModel, fail_at: int | None = None):
        self.inner = model
        self.fail_at = fail_at
        self.name, self.checkpoint, self.args = model.name, model.checkpoint, model.args
        self.tokenizer, self.max_seq_len, self.node = model.tokenizer, model.max_seq_len, model.node
        self.gate = threading.Event()
        self.opened = self.closed = self.forwards = 0

    def new_pipeline(self):
        self.opened += 1
        return GatedPipeline(self, self.inner.new_pipeline())

    def describe(self) -> dict:
        return self.inner.describe()

    def close(self) -> None:
        pass


class GatedPipeline:
    def __init__(self, owner: GatedModel, inner):
        self.owner, self.inner, self.max_seq_len, self.calls = owner, inner, inner.max_seq_len, 0

    def forward(self, token_ids: list[int], start_pos: int) -> torch.Tensor:
        self.calls += 1
        self.owner.forwards += 1
        if self.calls == self.owner.fail_at:
            raise MeshError("peer 192.0.2.7 stopped answering; it was lost")
        if self.calls > 2:
            assert self.owner.gate.wait(timeout=30), "the test never opened the gate"
        return self.inner.forward(token_ids, start_pos)

    def close(self) -> None:
        self.inner.close()
        self.owner.closed += 1


def stage_sessions(node, keys) -> int:
    """How many sessions the stage server of `node` (anything with a .port on 127.0.0.1) holds now."""
    from cakep2p.mesh import StageClient

    client = StageClient(LOOPBACK, node.port, keys, heartbeat_s=1.0, timeout_s=10.0)
    try:
        return client.ping(10.0).sessions
    finally:
        client.close()
