"""The one way to turn a model into a running LoadedModel, for the command line, the window and the API alike."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from cakep2p.cluster.loaded import LoadedModel, LocalModel, ModelOptions
from cakep2p.cluster.notes import context_note, left_out_notes
from cakep2p.cluster.planning import Planning, PlannedModel, check_fits_locally
from cakep2p.cluster.remote import ClusterModel
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.node import Node

Progress = Callable[[str, int, int], None]   # (what, bytes done, bytes in all)
Notice = Callable[[str], None]
log = logging.getLogger(__name__)


def open_model(source: str | Path | Checkpoint, options: ModelOptions = ModelOptions(), *, node: Node | None = None,
               planned: PlannedModel | None = None, owns_node: bool = False, on_progress: Progress | None = None,
               on_notice: Notice | None = None) -> LoadedModel:
    """The model, planned over `node` and its usable peers (waiting up to options.wait_s for them).

    With no node, or options.local, it is a LocalModel on this machine (checked to fit first). A plan with one stage
    on this node also gives a LocalModel (plan None: no network at all); otherwise a ClusterModel. `planned` (a preview
    from plan_model) is used as it is when the nodes it was made over are still the usable ones, so the preview is
    the plan that loads. With `owns_node`, closing the model stops the node. PlanError when it does not fit.

    What the user should know first (machines heard but left out, a context capped at the model's maximum: see
    notes.py) goes to `on_notice` (else the log) and opens the model's `notices`.
    """
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    notes = list(filter(None, [context_note(checkpoint.args, options.context)]))
    if options.local or node is None:
        check_fits_locally(checkpoint, options)
        return _told(LocalModel(checkpoint, options, node=node, owns_node=owns_node), notes, on_notice)
    planning = Planning(node, checkpoint, options)
    if planned is None or planned.nodes != planning.budgets(planning.peers()) or planned.spec != planning.spec:
        planned = planning.wait_for_plan(options.wait_s)
    notes += left_out_notes(node, planned)
    _tell(notes, on_notice)   # before the weights travel: who is left out is known while a transfer runs
    stages = planned.plan.stages
    if len(stages) == 1 and stages[0].node_id == node.node_id:
        model: LoadedModel = LocalModel(checkpoint, options, node=node, owns_node=owns_node)
    else:
        model = ClusterModel(node, checkpoint, planning, planned, owns_node=owns_node, on_progress=on_progress,
                             on_notice=on_notice)
    model.notices[:0] = notes
    return model


def _told(model: LoadedModel, notes: list[str], on_notice: Notice | None) -> LoadedModel:
    _tell(notes, on_notice)
    model.notices[:0] = notes
    return model


def _tell(notes: list[str], on_notice: Notice | None) -> None:
    for note in notes:
        if on_notice is not None:
            on_notice(note)
        else:
            log.warning("%s", note)
