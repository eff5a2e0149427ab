"""`cakep2p plan`: show how a model's layers would be split across this machine and the peers visible now."""

from __future__ import annotations

import argparse
import json
import sys

from cakep2p import planner
from cakep2p.commands.options import add_cluster_options
from cakep2p.errors import PlanError
from cakep2p.units import format_size

DEFAULT_WAIT_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder (safetensors)")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="tokens of KV cache to reserve (default and cap: what generate and chat use)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="element type the parts would be loaded in (auto: the checkpoint's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                        help="how long to listen for peers (0: plan for this machine alone)")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from cakep2p.engine.config import ModelArgs
    from cakep2p.engine.sizes import model_spec
    from cakep2p.loaded_model import context_length

    if args.context is not None and args.context < 1:
        raise PlanError(f"--context must be at least 1 token, not {args.context}")
    context = context_length(ModelArgs.from_dir(args.model), args.context)
    spec = model_spec(args.model, args.dtype)
    me = local_budget(args.max_memory)
    nodes = [me, *peer_budgets(args, exclude=me.node_id)]
    try:
        result = planner.plan(spec, nodes, me.node_id, context, args.strategy)
    except planner.DoesNotFit as error:
        if args.json:
            print(json.dumps({"fits": False, "missing_bytes": error.missing_bytes,
                              "offered_bytes": error.offered_bytes, "needed_bytes": error.needed_bytes}, indent=2))
        raise PlanError(str(error)) from None
    except ValueError as error:
        raise PlanError(f"cannot plan {spec.name}: {error}") from None
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"model {spec.name}: {spec.num_layers} layers, context {context} tokens, "
              f"{len(nodes)} node(s) offering {format_size(sum(node.offered_bytes for node in nodes))}")
        print(result.table())
    return 0


def local_budget(max_memory: int | None) -> planner.NodeBudget:
    """This machine as a planner node: what it offers (capped by --max-memory), its id and name."""
    from cakep2p.capacity import offered_memory, probe
    from cakep2p.identity import default_node_name, node_id

    capacity = probe(max_memory, run_benchmark=False)
    return planner.NodeBudget(node_id(), default_node_name(), offered_memory(capacity, max_memory),
                              capacity.gflops, capacity.bandwidth)


def peer_budgets(args: argparse.Namespace, exclude: str) -> list[planner.NodeBudget]:
    """Usable peers (same cluster, serving) seen by mDNS within --wait seconds; none when --wait is 0."""
    if args.peers:
        print("cakep2p: note: plan does not query static --peers yet; it uses mDNS only", file=sys.stderr)
    if args.wait <= 0:
        return []
    from cakep2p.discovery import snapshot_peers
    from cakep2p.node import resolve_interfaces
    from cakep2p.security import cluster_keys

    fingerprint = cluster_keys(args.cluster).fingerprint
    budgets: dict[str, planner.NodeBudget] = {}
    for peer in snapshot_peers(resolve_interfaces(args.interface), args.wait, fingerprint):
        if peer.status != "ok" or not peer.serving or peer.node_id == exclude or peer.node_id in budgets:
            continue
        budgets[peer.node_id] = planner.NodeBudget(peer.node_id, peer.name, int(peer.offered_memory),
                                                   float(peer.gflops), float(peer.bandwidth))
    return list(budgets.values())
