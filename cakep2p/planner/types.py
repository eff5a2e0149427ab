"""The planner's values: a model's sizes, a node's offer, a layer range, a plan (with its JSON form), DoesNotFit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cakep2p.units import format_size as format_bytes   # pure, like the planner

Strategy = Literal["proportional", "fewest", "compute", "fastest"]
STRATEGIES: tuple[str, ...] = ("proportional", "fewest", "compute", "fastest")


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about a model, in bytes at the chosen dtype."""

    name: str
    layer_bytes: tuple[int, ...]  # weights of each decoder layer
    embedding_bytes: int
    head_bytes: int  # final norm + LM head; only the final norm when the head is tied to the embedding
    kv_bytes_per_token: int  # per layer, K+V, at the chosen dtype
    hidden_size: int  # for the activation margin

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)


@dataclass(frozen=True)
class NodeBudget:
    """One node's offer: `offered_bytes` is all it gives to model parts (its runtime's base is not deducted)."""

    node_id: str
    name: str
    offered_bytes: int
    gflops: float = 0.0        # float32 matmul GFLOP/s; 0: not measured
    bandwidth: float = 0.0     # memory bandwidth, bytes/s; 0: not measured
    rtt_s: float | None = None  # round trip from the initiator, seconds; None: not measured (DEFAULT_RTT_S)


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, end) of a model, plus whether the embedding and/or the final norm + LM head come with them:
    what a node holds, what a model part loads. The one layer-range type above the wire (wire.PartRef)."""

    start: int
    end: int
    has_embedding: bool = False
    has_head: bool = False

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        """`layers 3–5`, `layers 0–11 + embedding + head`, `head`: how every message writes a range."""
        pieces = [describe_layers(self.start, self.end)] if self.num_layers else []
        pieces += [name for name, held in (("embedding", self.has_embedding), ("head", self.has_head)) if held]
        return " + ".join(pieces) or "nothing"


def describe_layers(start: int, end: int) -> str:
    """Half-open [start, end) written for people, first and last inclusive: `layers 3–5`, `layer 4`."""
    if end - start == 1:
        return f"layer {start}"
    return f"layers {start}–{end - 1}"


@dataclass(frozen=True)
class Stage:
    """One node's share of a plan; the initiator's also holds the embedding and the head."""

    node_id: str
    name: str
    layers: LayerRange
    bytes: int


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order: the initiator's first (it embeds and, at the end, applies the head)."""

    stages: tuple[Stage, ...]
    total_bytes: int
    strategy: str
    predicted_tokens_per_s: float | None = None  # decode, one stream, today's star topology

    def table(self) -> str:
        """A human-readable table, one row per stage; what each holds written as LayerRange.describe writes it."""
        rows = [("stage", "node", "holds", "memory")]
        for number, stage in enumerate(self.stages, 1):
            label = stage.name if stage.name == stage.node_id else f"{stage.name} ({stage.node_id[:8]})"
            rows.append((str(number), label, stage.layers.describe(), format_bytes(stage.bytes)))
        layers = sum(stage.layers.num_layers for stage in self.stages)
        nodes = f"{len(self.stages)} node{'' if len(self.stages) == 1 else 's'}, {self.strategy}"
        rows.append(("total", nodes, f"{layers} layer{'' if layers == 1 else 's'}", format_bytes(self.total_bytes)))
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

    def to_json(self) -> dict:
        """A JSON-ready dict: {"stages": [{"node", "name", "start", "end", "bytes", ...}], "total_bytes", "fits"}."""
        return {
            "stages": [
                {"node": stage.node_id, "name": stage.name, "start": stage.layers.start, "end": stage.layers.end,
                 "bytes": stage.bytes, "holds_embedding": stage.layers.has_embedding,
                 "holds_head": stage.layers.has_head}
                for stage in self.stages
            ],
            "total_bytes": self.total_bytes,
            "fits": True,
            "strategy": self.strategy,
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        """The inverse of `to_json`; ValueError when `data` is not such a dict."""
        try:
            stages = tuple(
                Stage(str(item["node"]), str(item.get("name", item["node"])),
                      LayerRange(int(item["start"]), int(item["end"]), bool(item.get("holds_embedding", False)),
                                 bool(item.get("holds_head", False))), int(item["bytes"]))
                for item in data["stages"]
            )
            speed = data.get("predicted_tokens_per_s")
            if speed is not None and not 0 < float(speed) < float("inf"):
                raise ValueError(f"predicted_tokens_per_s {speed!r} is not a positive number")
            return cls(stages, int(data["total_bytes"]), str(data.get("strategy", "proportional")),
                       None if speed is None else float(speed))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a plan: {error!r}") from None


class DoesNotFit(ValueError):
    """The model needs more memory than the nodes offer; carries the figures for the caller's message."""

    def __init__(self, message: str, missing_bytes: int, offered_bytes: int, needed_bytes: int):
        super().__init__(message)
        self.missing_bytes = missing_bytes
        self.offered_bytes = offered_bytes
        self.needed_bytes = needed_bytes


def format_rate(tokens_per_s: float | None) -> str:
    """`4.1`, `63.0`, `1235`: a predicted speed in tok/s, never in scientific notation; `?` when unknown."""
    if tokens_per_s is None:
        return "?"
    return f"{tokens_per_s:.1f}" if tokens_per_s < 100 else f"{tokens_per_s:.0f}"
