"""What the window shows, as plain records built off the UI thread: node state, plans, model previews, replies."""

from __future__ import annotations

from dataclasses import dataclass
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
    planned: Any = None              # cakep2p.cluster.PlannedModel: what loading this model will use


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    num_layers: int
    context: int
    has_chat_template: bool
    description: dict
    generation: Any = None           # cakep2p.engine.generation_config.GenerationDefaults: the model's sampling


@dataclass(frozen=True)
class ReplyOutcome:
    """A reply that ended, with the chat's context use after it."""

    reply: Any                       # cakep2p.engine.conversation.Reply
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
            segments.append(PlanSegment(stage.node_id, stage.name, stage.layers.start, stage.layers.end, stage.bytes,
                                        stage.node_id == own_id))
    return PlanView(num_layers, tuple(segments), caption)


def preview_of(checkpoint: Any, planned: Any, own_id: str, failure: str | None = None) -> ModelPreview:
    """What the model panel shows before loading: the checkpoint's size and the plan cluster.plan_model made for it
    (`planned`, a PlannedModel, the very plan open_model then loads), or why it does not fit (`failure`)."""
    from cakep2p.units import format_size

    args = checkpoint.args
    weights = checkpoint.weight_bytes()
    name, path = checkpoint.name, str(checkpoint.path)
    if planned is None:
        verdict = f"{format_size(weights)} of weights, {args.num_layers} layers" + (f" — {failure}" if failure else "")
        return ModelPreview(path, name, args.architecture, args.num_layers, weights, failure is None, verdict, None)
    plan = planned.plan
    nodes = len({stage.node_id for stage in plan.stages if stage.layers.num_layers})
    verdict = (f"{format_size(weights)} of weights, {args.num_layers} layers — fits: {nodes} of "
               f"{len(planned.nodes)} node(s) would hold it ({format_size(planned.offered_bytes)} offered)")
    view = plan_view(plan, own_id, args.num_layers, caption="plan preview")
    return ModelPreview(path, name, args.architecture, args.num_layers, weights, True, verdict, view, planned)
