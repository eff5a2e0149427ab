"""`cakep2p plan`: show how a model's layers would be split across this machine and the peers visible now."""

from __future__ import annotations

import argparse
import json

from cakep2p.commands.options import (DEFAULT_WAIT_S, add_cluster_options, add_model_argument, add_weights_option,
                                      open_checkpoint, positive_int, print_notice, wait_seconds)
from cakep2p.errors import PlanError
from cakep2p.planner import Plan, format_rate
from cakep2p.units import format_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--context", type=positive_int, default=None, metavar="N",
                        help="tokens of KV cache to reserve (default and cap: what generate and chat use; more than "
                             "the model's maximum is capped to it, with a note)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="element type the parts would be loaded in (auto: the checkpoint's)")
    add_weights_option(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--wait", type=wait_seconds, default=DEFAULT_WAIT_S, metavar="SECONDS",
                        help="how long to listen for peers, over mDNS and --peers (0: plan for this machine alone)")
    add_cluster_options(parser, cluster_help="judge peers against this cluster code and plan over its machines, "
                                             "for this run only (not stored: `cakep2p code --set` pairs this machine)")


def run(args: argparse.Namespace) -> int:
    """Plan exactly as `generate` would (the same initiator node, the same peers, cluster.plan_model), load nothing."""
    from cakep2p import cluster
    from cakep2p.commands.options import start_initiator_node
    from cakep2p.engine.sizes import model_spec

    if args.context is not None and args.context < 1:
        raise PlanError(f"--context must be at least 1 token, not {args.context}")
    checkpoint = open_checkpoint(args)
    model_spec(checkpoint, args.dtype)  # a broken model fails here, before any network activity
    capped = cluster.context_note(checkpoint.args, args.context)
    if capped:
        print_notice(capped)
    options = cluster.ModelOptions(dtype=args.dtype, weights=args.weights, strategy=args.strategy,
                                   context=args.context,
                                   max_memory=args.max_memory, wait_s=args.wait)
    node = start_initiator_node(args, store_code=False)
    try:
        try:
            planned = cluster.plan_model(node, checkpoint, options)
        except cluster.NotEnoughMemory as error:
            for note in cluster.left_out_notes(node):  # who might have helped, had they been usable
                print_notice(note)
            if args.json:
                print(json.dumps({"fits": False, "missing_bytes": error.missing_bytes,
                                  "offered_bytes": error.offered_bytes, "needed_bytes": error.needed_bytes}, indent=2))
            raise
        notes = cluster.left_out_notes(node, planned)
    finally:
        node.stop()
    alternatives = planned.alternatives()
    if args.json:
        print(json.dumps(planned.plan.to_json() | {"alternatives": {
            label: other.predicted_tokens_per_s if other is not None else None
            for label, other in alternatives.items()}}, indent=2))
    else:
        spec, offered, count = planned.spec, planned.offered_bytes, len(planned.nodes)
        print(f"model {spec.name}: {spec.num_layers} layers, context {planned.context} tokens, "
              f"{count} node{'' if count == 1 else 's'} offering {format_size(offered)}")
        print(planned.plan.table())
        print(predictions(planned.plan, alternatives))
    for note in notes:
        print_notice(note)
    return 0


def predictions(chosen: Plan, alternatives: dict[str, Plan | None]) -> str:
    """`predicted 6.3 tok/s (one stream); proportional 4.1, compute 4.8, fewest 6.3, single node 6.3`."""
    compared = ", ".join(f"{label} {'does not fit' if other is None else format_rate(other.predicted_tokens_per_s)}"
                         for label, other in alternatives.items() if label != chosen.strategy)
    return f"predicted {format_rate(chosen.predicted_tokens_per_s)} tok/s decode (one stream); compared: {compared}"
