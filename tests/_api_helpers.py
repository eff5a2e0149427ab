"""Test kit for the HTTP API: a server on a thread, a paced model wrapper, `cakep2p api` as a child process."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from typing import Callable, Iterator

import torch

from cakep2p.api import BackgroundServer
from cakep2p.engine.conversation import Conversation, Reply, stream_completion
from cakep2p.engine.sampling import SamplingParams
from cakep2p.errors import MeshError
from cakep2p.cluster import LocalModel


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


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


class ApiProcess:
    """`cakep2p api --port 0` as a child process; its stderr is collected by a thread."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="test-api-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def url(self) -> str:
        wait_until(lambda: self.process.poll() is not None or any("serving" in line for line in self.lines), 120)
        found = next((re.search(r"http://\S+/v1", line) for line in self.lines if "serving" in line), None)
        assert found, "".join(self.lines)
        return found.group(0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        self.process.stderr.close()


def stage_sessions(node, keys) -> int:
    from cakep2p.mesh import StageClient

    client = StageClient("127.0.0.1", node.port, keys, heartbeat_s=1.0, timeout_s=10.0)
    try:
        return client.ping(10.0).sessions
    finally:
        client.close()
