"""A model ready to chat with: its tokenizer plus a way to open one pipeline per session.

`LocalModel` holds the whole model on this machine; `ClusterModel` (remote.py) spreads the layers over peers and
has the same shape, so the terminal chat, the window and the API use either unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from cakep2p.engine.batching import Batcher
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.config import ModelArgs
from cakep2p.engine.dtypes import name_of
from cakep2p.engine.generate import LocalPipeline, Pipeline
from cakep2p.engine.loading import load_part, whole_model
from cakep2p.engine.tokenizer import Tokenizer
from cakep2p.errors import ModelError
from cakep2p.node import Node
from cakep2p.planner import Plan, Strategy

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ModelOptions:
    """How to run a model, whoever asks (command line, window, API): the same fields, the same defaults."""

    dtype: str = "auto"                 # activations (and 16-bit weights): auto, float32, bfloat16, float16
    weights: str = "auto"               # weight format: auto (the checkpoint's own), bf16, f16, f32, int8, int4
    device: str = "auto"
    strategy: Strategy = "proportional"
    context: int | None = None          # tokens of KV cache; None: min(DEFAULT_CONTEXT, the model's)
    local: bool = False                 # this machine only, no cluster
    max_memory: int | None = None       # cap on what this machine offers
    wait_s: float = 0.0                 # how long to listen for peers before planning


class LoadedModel(Protocol):
    name: str
    checkpoint: Checkpoint
    args: ModelArgs
    tokenizer: Tokenizer
    max_seq_len: int
    plan: Plan | None      # where the layers run; None when they all run in this process
    notices: list[str]     # what happened to the cluster meanwhile (a lost peer), oldest first
    node: Node | None      # the node it was opened on; None for a model on this machine only

    def new_pipeline(self) -> Pipeline:
        """A fresh session with its own KV cache (sessions share the weights)."""

    def describe(self) -> dict:
        """JSON-able facts for status displays: name, layers, dtype, where the layers run."""

    def close(self) -> None:
        """Free the weights (and, for a cluster model, the peers' parts); stop the node if the model owns it."""


def context_length(args: ModelArgs, requested: int | None) -> int:
    """The context to reserve KV cache for: what was asked, capped by what the model supports."""
    limit = args.max_position_embeddings
    if requested is None:
        return min(DEFAULT_CONTEXT, limit)
    if requested < 1:
        raise ModelError(f"context of {requested} tokens is impossible: pass --context 1 or more")
    return min(requested, limit)


class LocalModel:
    """The whole model in this process: no plan (nothing runs elsewhere), no notices.

    Its sessions share one Batcher: concurrent chats decode in one batched forward per step (CAKEP2P_BATCH=0: each
    session alone, as before; benchmarks compare the two)."""

    def __init__(self, checkpoint: Checkpoint, options: ModelOptions, *, node: Node | None = None,
                 owns_node: bool = False) -> None:
        self.checkpoint, self.node, self.owns_node = checkpoint, node, owns_node
        self.plan: Plan | None = None
        self.notices: list[str] = []
        self.name = checkpoint.name
        self.args = checkpoint.args
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        self.max_seq_len = context_length(self.args, options.context)
        self.part = load_part(checkpoint, whole_model(self.args), dtype=options.dtype, device=options.device,
                              weights=options.weights)
        self.batcher = Batcher([self.part])

    def new_pipeline(self) -> Pipeline:
        if os.environ.get("CAKEP2P_BATCH", "1") == "0":
            return LocalPipeline([self.part], self.max_seq_len)
        return self.batcher.pipeline(self.max_seq_len)

    def describe(self) -> dict:
        return {"name": self.name, "layers": self.args.num_layers, "dtype": name_of(self.part.dtype),
                "weights": self.part.weight_format, "kernel": self.part.kernel, "context": self.max_seq_len,
                "stages": [{"node": "local", "name": self.node.name if self.node else "this machine", "start": 0,
                            "end": self.args.num_layers, "bytes": self.part.weight_bytes}]}

    def close(self) -> None:
        self.batcher.close()
        self.part = None
        if self.owns_node and self.node is not None:
            self.node.stop()
