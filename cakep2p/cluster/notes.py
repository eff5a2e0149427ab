"""What a user should be told about a plan, so that nothing happens silently: machines that were heard but left
out (and why: "slower" gives the predicted speeds), and a context longer than the model allows. The command line
prints these lines, the window shows them; open_model reports the left-out machines through its on_notice as soon
as it has planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from cakep2p import PROTOCOL_VERSION, __version__, planner
from cakep2p.cluster.loaded import context_length
from cakep2p.cluster.planning import PlannedModel
from cakep2p.discovery import PeerInfo
from cakep2p.engine.config import ModelArgs
from cakep2p.node import Node
from cakep2p.units import format_size

Reason = Literal["other_cluster", "incompatible", "unproven", "not_serving", "offers_nothing", "no_answer",
                 "too_small", "slower", "not_needed", "arrived_late"]
REASONS: tuple[Reason, ...] = ("other_cluster", "incompatible", "unproven", "not_serving", "offers_nothing",
                               "no_answer", "too_small", "slower", "not_needed", "arrived_late")
NAMES_SHOWN = 4


@dataclass(frozen=True)
class LeftOut:
    """One machine heard (or, for a static peer, dialled) but holding no part of the model, and why."""

    name: str
    reason: Reason
    detail: str = ""      # the figures behind the reason: "cakep2p 0.2.0, protocol 2", "offers 1 MiB"


def left_out(planned: PlannedModel | None, peers: Iterable[PeerInfo], own_node_id: str,
             silent_static_peers: Iterable[tuple[str, int]] = (), unproven: Iterable[str] = ()) -> list[LeftOut]:
    """Every machine in `peers` (a node's directory) that holds no layers of `planned`, with the reason; without a
    plan, the machines that no plan could use. One entry per machine (mDNS and --peers sightings count once).
    `unproven` names announcements of this cluster that never answered an authenticated ping (never planned)."""
    in_plan = {stage.node_id for stage in planned.plan.stages} if planned is not None else set()
    considered = {budget.node_id: budget for budget in planned.nodes} if planned is not None else {}
    seen: dict[str, PeerInfo] = {}
    for peer in peers:
        if peer.node_id != own_node_id:
            seen.setdefault(peer.node_id, peer)
    found = [entry for peer in seen.values() if peer.node_id not in in_plan
             for entry in [_why(peer, planned, considered)] if entry is not None]
    found += [LeftOut(f"{host}:{port}", "no_answer") for host, port in sorted(silent_static_peers)]
    found += [LeftOut(name, "unproven") for name in sorted(set(unproven))]
    return sorted(found, key=lambda entry: (REASONS.index(entry.reason), entry.name.lower()))


def _why(peer: PeerInfo, planned: PlannedModel | None, considered: dict[str, planner.NodeBudget]) -> LeftOut | None:
    if peer.status == "other_cluster":
        return LeftOut(peer.name, "other_cluster")
    if peer.status == "incompatible":
        return LeftOut(peer.name, "incompatible", f"cakep2p {peer.version or '?'}, protocol {peer.protocol_version}")
    if not peer.serving:
        return LeftOut(peer.name, "not_serving")
    if peer.offered_memory <= 0:
        return LeftOut(peer.name, "offers_nothing")
    if planned is None:
        return None
    budget = considered.get(peer.node_id)
    if budget is None:
        return LeftOut(peer.name, "arrived_late")
    smallest_layer = min(planner.layer_memory(planned.spec, planned.context), default=0)
    if budget.offered_bytes < smallest_layer:
        return LeftOut(peer.name, "too_small", f"offers {format_size(budget.offered_bytes)}")
    return _slower(peer, planned) or LeftOut(peer.name, "not_needed")


def _slower(peer: PeerInfo, planned: PlannedModel) -> LeftOut | None:
    """"slower" when the fastest strategy left the peer out because every plan with it is predicted slower."""
    without = planned.plan.predicted_tokens_per_s
    if planned.plan.strategy != "fastest" or without is None:
        return None
    with_it = planner.fastest_with(planned.spec, planned.nodes, planned.plan.stages[0].node_id, planned.context,
                                   peer.node_id)
    if with_it is None or with_it.predicted_tokens_per_s is None or with_it.predicted_tokens_per_s >= without:
        return None
    return LeftOut(peer.name, "slower", f"predicted {planner.format_rate(with_it.predicted_tokens_per_s)} tok/s "
                                        f"with it, {planner.format_rate(without)} without")


def describe_left_out(entries: Sequence[LeftOut], planned: PlannedModel | None = None) -> list[str]:
    """One sentence per reason, naming the machines and the fix: what `cakep2p generate` prints as notes."""
    lines = []
    for reason in REASONS:
        group = [entry for entry in entries if entry.reason == reason]
        if group:
            lines.append(_sentence(reason, group, planned))
    return lines


def _sentence(reason: Reason, group: list[LeftOut], planned: PlannedModel | None) -> str:
    count, names = len(group), _names(group)
    one = count == 1
    if reason == "other_cluster":
        return (f"heard {'a machine' if one else f'{count} machines'} of another cluster ({names}), left out: to use "
                f"{'it' if one else 'them'}, run `cakep2p code` on one of them and `cakep2p code --set -` here "
                "(paste the code)")
    if reason == "incompatible":
        return (f"heard {names} running another cakep2p protocol ({', '.join(entry.detail for entry in group)}; "
                f"this one is cakep2p {__version__}, protocol {PROTOCOL_VERSION}), left out: install the same "
                "cakep2p version on every machine")
    if reason == "unproven":
        return (f"{names} {'announces' if one else 'announce'} this cluster but did not answer an encrypted ping, "
                "left out: not reachable from here (a firewall?), or not a member at all (anyone on the network "
                "can copy an announcement); run `cakep2p doctor` there")
    if reason == "not_serving":
        return (f"{names} {'is' if one else 'are'} not serving (running a command, or serving is off in the "
                "window), left out: run `cakep2p --serve` there to lend its memory")
    if reason == "offers_nothing":
        return f"{names} {'offers' if one else 'offer'} no memory (see --max-memory there), left out"
    if reason == "no_answer":
        return (f"static peer{'' if one else 's'} {names} {'does' if one else 'do'} not answer: not running, not "
                "reachable, or paired with another cluster (run `cakep2p doctor`)")
    if reason == "too_small":
        need = ""
        if planned is not None:
            smallest = min(planner.layer_memory(planned.spec, planned.context), default=0)
            need = f" ({format_size(smallest)} at a {planned.context}-token context)"
        if one:
            offers = f"it {group[0].detail}, less than one layer needs{need}"
        else:
            each = ", ".join(f"{entry.name} {entry.detail}" for entry in group)
            offers = f"each offers less than one layer needs{need} ({each})"
        return f"{names} left out by the planner: {offers}; offer more memory there, or use a shorter context"
    if reason == "slower":
        if one:
            return f"{names} would slow this model down ({group[0].detail}): left out by the planner"
        each = ", ".join(f"{entry.name} ({entry.detail})" for entry in group[:NAMES_SHOWN])
        return f"{names} would each slow this model down, left out by the planner: {each}"
    if reason == "not_needed":
        if planned is not None and planned.plan.strategy == "fewest":
            why = "the model fits on fewer machines (strategy fewest)"
        else:
            layers = planned.spec.num_layers if planned is not None else 0
            why = f"{'its' if one else 'their'} share of the {layers} layers rounded to none"
        return f"{names} not needed by the planner: {why}"
    return (f"{names} joined after the plan was made: not used by this model (load it again to spread over "
            f"{'it' if one else 'them'})")


def _names(group: list[LeftOut]) -> str:
    shown = ", ".join(entry.name for entry in group[:NAMES_SHOWN])
    return shown if len(group) <= NAMES_SHOWN else f"{shown} and {len(group) - NAMES_SHOWN} more"


def left_out_notes(node: Node, planned: PlannedModel | None = None) -> list[str]:
    """The notes for this node now: who its directory heard but `planned` (or, without one, any plan) leaves out,
    and why, one line per reason. The window and every command show these same lines."""
    entries = left_out(planned, node.directory.peers(), node.node_id, node.silent_static_peers(),
                       node.unproven_peers())
    return describe_left_out(entries, planned)


def context_note(args: ModelArgs, requested: int | None) -> str | None:
    """A line when the context asked for is more than the model allows (it is capped, not refused); else None."""
    if requested is None or requested <= args.max_position_embeddings:
        return None
    return (f"a context of {requested} tokens is more than this model allows: using its maximum, "
            f"{context_length(args, requested)} tokens")
