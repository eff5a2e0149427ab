"""What the window shows, as plain records built off the UI thread: node state, plans, model previews, replies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cakep2p.planner import Plan


@dataclass(frozen=True)
class NodeState:
    name: str
    node_id: str
    port: int
    fingerprint: str
    serving: bool
    code: str


@dataclass(frozen=True)
class PlanSegment:
    node_id: str
    name: str
    start: int
    end: int
    bytes: int
    is_self: bool


@dataclass(frozen=True)
class PlanView:
    """What the plan bar draws: layer ranges per node, in pipeline order."""

    num_layers: int
    segments: tuple[PlanSegment, ...]
    caption: str = ""

    def layers_by_node(self) -> dict[str, str]:
        return {segment.node_id: str(segment.start) if segment.end - segment.start == 1
                else f"{segment.start}–{segment.end - 1}" for segment in self.segments if segment.end > segment.start}


@dataclass(frozen=True)
class ModelPreview:
    """A model folder checked before loading: its size and whether the cluster can hold it."""

    path: str
    name: str
    architecture: str
    num_layers: int
    weight_bytes: int
    fits: bool
    verdict: str
    plan: PlanView | None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    num_layers: int
    context: int
    has_chat_template: bool
    description: dict


@dataclass(frozen=True)
class ReplyOutcome:
    text: str
    token_ids: tuple[int, ...]
    completion_tokens: int
    stats: Any                       # cakep2p.conversation.ReplyStats
    context_used: int
    max_context: int
    tokens_after_stop: int | None    # tokens produced after Stop was pressed (None: not stopped)


def plan_view(plan: Plan | Sequence[dict] | None, own_id: str, num_layers: int, caption: str = "",
              own_name: str = "this machine") -> PlanView:
    """A PlanView from a planner.Plan, or from LoadedModel.describe()["stages"] dicts (node "local" is this one)."""
    segments = []
    for stage in (plan.stages if isinstance(plan, Plan) else plan) or ():
        if isinstance(stage, dict):
            node_id = str(stage.get("node", "local"))
            node_id = own_id if node_id == "local" else node_id
            name = str(stage.get("name") or (own_name if node_id == own_id else node_id))
            segments.append(PlanSegment(node_id, name, int(stage["start"]), int(stage["end"]),
                                        int(stage.get("bytes") or 0), node_id == own_id))
        else:
            segments.append(PlanSegment(stage.node_id, stage.name, stage.start, stage.end, stage.bytes,
                                        stage.node_id == own_id))
    return PlanView(num_layers, tuple(segments), caption)


def preview_model(model_dir: str | Path, own: Any, peers: list[Any]) -> ModelPreview:
    """Size of the model in `model_dir` and the plan this node (`own`, a NodeBudget) and usable `peers` would get."""
    from cakep2p import planner
    from cakep2p.engine.config import ModelArgs
    from cakep2p.engine.sizes import model_spec
    from cakep2p.errors import ModelError, PlanError
    from cakep2p.loaded_model import context_length
    from cakep2p.units import format_size

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder: it has no config.json "
                         "(choose the folder that holds config.json and *.safetensors)")
    args = ModelArgs.from_dir(path)
    spec = model_spec(path)
    weights = sum(spec.layer_bytes) + spec.embedding_bytes + spec.head_bytes
    budgets = [own] + [planner.NodeBudget(peer.node_id, peer.name, peer.offered_memory, peer.gflops, peer.bandwidth)
                       for peer in peers if peer.node_id != own.node_id]
    offered = sum(budget.offered_bytes for budget in budgets)
    try:
        plan = planner.plan(spec, budgets, own.node_id, context_length(args, None))
    except (PlanError, ValueError) as error:
        verdict = (f"{format_size(weights)} of weights — too big for the cluster "
                   f"({len(budgets)} node(s) offer {format_size(offered)}): {error}")
        return ModelPreview(str(path), path.name, args.architecture, args.num_layers, weights, False, verdict, None)
    nodes = len({stage.node_id for stage in plan.stages if stage.end > stage.start})
    verdict = (f"{format_size(weights)} of weights, {args.num_layers} layers — fits: "
               f"{nodes} of {len(budgets)} node(s) would hold it ({format_size(offered)} offered)")
    view = plan_view(plan, own.node_id, args.num_layers, caption="plan preview")
    return ModelPreview(str(path), path.name, args.architecture, args.num_layers, weights, True, verdict, view)
