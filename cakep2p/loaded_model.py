"""A model ready to chat with: its tokenizer plus a way to open one pipeline per session.

`LocalModel` holds the whole model on this machine; the node's cluster model (layers spread over
peers) has the same shape, so the terminal chat, the window and the API use either unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cakep2p.engine.config import ModelArgs
from cakep2p.engine.generate import LocalPipeline, Pipeline
from cakep2p.engine.part import ModelPart, PartSpec
from cakep2p.engine.tokenizer import Tokenizer
from cakep2p.errors import ModelError

if TYPE_CHECKING:
    from cakep2p.node import Node
    from cakep2p.planner import Plan

DEFAULT_CONTEXT = 4096


class LoadedModel(Protocol):
    name: str
    model_dir: Path
    args: ModelArgs
    tokenizer: Tokenizer
    max_seq_len: int
    plan: Plan | None      # where the layers run over the cluster; None when the whole model is on this machine
    notices: list[str]     # what happened to the cluster meanwhile (a lost peer), oldest first
    node: Node | None      # the cluster node the model was opened on; None for a model on this machine only

    def new_pipeline(self) -> Pipeline:
        """A fresh session with its own KV cache (sessions share the weights)."""

    def describe(self) -> dict:
        """JSON-able facts for status displays: name, layers, dtype, where the layers run."""

    def close(self) -> None:
        """Free the weights (and, for a cluster model, the peers' parts)."""


def context_length(args: ModelArgs, requested: int | None) -> int:
    """The context to reserve KV cache for: what was asked, capped by what the model supports."""
    limit = args.max_position_embeddings
    if requested is None:
        return min(DEFAULT_CONTEXT, limit)
    if requested < 1:
        raise ModelError(f"context of {requested} tokens is impossible: pass --context 1 or more")
    return min(requested, limit)


class LocalModel:
    """The whole model in this process: no plan, no node, no notices."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "auto", device: str = "auto", context: int | None = None):
        self.plan: Plan | None = None
        self.notices: list[str] = []
        self.node: Node | None = None
        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        self.args = ModelArgs.from_dir(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.max_seq_len = context_length(self.args, context)
        whole = PartSpec(0, self.args.num_layers, has_embedding=True, has_head=True)
        self.part = ModelPart.load(self.model_dir, whole, dtype=dtype, device=device)

    def new_pipeline(self) -> Pipeline:
        return LocalPipeline([self.part], self.max_seq_len)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "layers": self.args.num_layers,
            "dtype": str(self.part.dtype).removeprefix("torch."),
            "context": self.max_seq_len,
            "stages": [{"node": "local", "start": 0, "end": self.args.num_layers}],
        }

    def close(self) -> None:
        self.part = None
