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
    facts: str = ""                  # "GGUF Q4_1, 93.8 MiB": its format, storage and size on disk
    mode: str = ""                   # how the chat reads it: "chat, with the model's chat template", …
    demo: bool = False               # the tiny demo model that ships inside the package


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


def planned_nodes(plan: PlanView | None) -> set[str]:
    """The nodes holding layers (or the embedding and head) in `plan`."""
    return {segment.node_id for segment in plan.segments} if plan is not None else set()


def preview_of(checkpoint: Any, planned: Any, own_id: str, failure: str | None = None) -> ModelPreview:
    """What the model panel shows before loading: the checkpoint's size and the plan cluster.plan_model made for it
    (`planned`, a PlannedModel, the very plan open_model then loads), or why it does not fit (`failure`)."""
    from cakep2p.library.local import facts_of
    from cakep2p.units import format_size

    args = checkpoint.args
    weights = checkpoint.weight_bytes()
    name, path = checkpoint.name, str(checkpoint.path)
    facts = f"{facts_of(checkpoint).text}, {args.num_layers} layers"
    if planned is None:
        verdict = facts + (f" — {failure}" if failure else "")
        return ModelPreview(path, name, args.architecture, args.num_layers, weights, failure is None, verdict, None)
    plan = planned.plan
    nodes = len({stage.node_id for stage in plan.stages if stage.layers.num_layers})
    where = "this machine would hold it" if nodes <= 1 else f"{nodes} of {len(planned.nodes)} machines would hold it"
    verdict = f"{facts} — fits: {where} ({format_size(planned.offered_bytes)} offered)"
    view = plan_view(plan, own_id, args.num_layers, caption="plan preview")
    return ModelPreview(path, name, args.architecture, args.num_layers, weights, True, verdict, view, planned)


def spare_bytes(node: Any) -> int | None:
    """What the node's machine could offer at most (its memory's spare part), once the node has probed it."""
    from cakep2p.discovery.capacity import offered_memory

    return offered_memory(node.capacity, None) if node is not None and node.capacity is not None else None


def left_out_notes(node: Any, planned: Any) -> tuple[str, list[str]]:
    """The core's notes on who `node` heard but `planned` (or any plan) leaves out: the other clusters' sentence
    (empty when there are none) and the other reasons' sentences."""
    from cakep2p import cluster

    entries = cluster.left_out(planned, node.directory.peers(), node.node_id, node.silent_static_peers(),
                               node.unproven_peers())
    foreign = [entry for entry in entries if entry.reason == "other_cluster"]
    others = [entry for entry in entries if entry.reason != "other_cluster"]
    return " ".join(cluster.describe_left_out(foreign, planned)), cluster.describe_left_out(others, planned)


def library_state(budgets: Any, max_memory: int | None, repos: Sequence[str]) -> tuple[dict, dict, dict]:
    """The catalog's fits over `budgets` (this machine alone when None), the `repos` downloaded here (their paths)
    and the ones partly downloaded (their bytes)."""
    from cakep2p.discovery.capacity import offered_memory, probe
    from cakep2p.library import catalog, download, fit

    if budgets is None:
        budgets = fit.this_machine(offered_memory(probe(run_benchmark=False), max_memory))
    local = {repo: str(path) for repo in repos for path in [download.downloaded(repo)] if path is not None}
    partial = {repo: size for repo in repos if repo not in local for size in [download.partial_bytes(repo)] if size}
    return fit.fits_of(catalog.CATALOG, budgets), local, partial


def cluster_offers(node: Any, max_memory: int | None) -> Any:
    """The node's and its usable peers' offers now (library.fit.Budgets), None before the node runs. It reads the
    directory only: no network, so the UI thread may ask (the offered-memory slider's live fit)."""
    from cakep2p.library.fit import cluster_budgets

    return cluster_budgets(node, max_memory) if node is not None and node.capacity is not None else None


def model_info(checkpoint: Any, model: Any, raw: bool = False) -> ModelInfo:
    """What the window shows of a loaded model (cluster.LoadedModel) opened from `checkpoint`, chatting or `raw`."""
    from cakep2p import paths
    from cakep2p.engine.conversation import conversation_mode
    from cakep2p.library.local import facts_of

    return ModelInfo(model.name, str(checkpoint.path), model.args.num_layers, model.max_seq_len,
                     model.tokenizer.has_chat_template, model.describe(), checkpoint.generation,
                     facts=facts_of(checkpoint).text, mode=conversation_mode(model.tokenizer, raw).describe(),
                     demo=paths.is_embedded_model(checkpoint.path))
