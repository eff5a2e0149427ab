"""Command-line options shared by every command that talks to the cluster, and opening the model they ask for."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from typing import TYPE_CHECKING, Callable

from cakep2p.units import format_size, parse_size

if TYPE_CHECKING:
    from cakep2p.engine.generate import Pipeline
    from cakep2p.loaded_model import LoadedModel
    from cakep2p.node import Node
    from cakep2p.planner import Plan

DEFAULT_WAIT_S = 2.0
MAX_WAIT_S = 3600.0
MAX_SEED = 2**63 - 1


def size_value(text: str) -> int:
    """argparse type for --max-memory: '8GB', '512MiB', ..."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def port_number(text: str) -> int:
    """argparse type for a TCP port to listen on or check: 1-65535."""
    return _port(text, lowest=1)


def port_or_zero(text: str) -> int:
    """argparse type for a listening port where 0 means 'any free port': 0-65535."""
    return _port(text, lowest=0)


def _port(text: str, lowest: int) -> int:
    text = text.strip()
    if not text.isdigit() or not lowest <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use a number from {lowest} to 65535")
    return int(text)


def wait_seconds(text: str) -> float:
    """argparse type for --wait: seconds from 0 to an hour."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_WAIT_S:  # also refuses nan
        raise argparse.ArgumentTypeError(f"invalid wait {text!r}: use seconds from 0 to {MAX_WAIT_S:g}, e.g. 3")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (--context, --max-sessions)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use a whole number >= 1")
    return value


def seed_number(text: str) -> int:
    """argparse type for --seed: 0 to 2**63-1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: use a whole number from 0 to {MAX_SEED}")
    return value


def _peer_list(text: str) -> list[tuple[str, int]]:
    peers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"invalid peer {item!r}: use host:port, e.g. 192.0.2.7:5770")
        peers.append((host.strip("[]"), int(port)))
    return peers


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """Where to look for peers and which cluster to belong to."""
    parser.add_argument("--interface", action="append", metavar="IP", default=None,
                        help="announce and browse only on this interface address (repeatable; default: all)")
    parser.add_argument("--peers", type=_peer_list, default=[], metavar="HOST:PORT,...",
                        help="static peers, for networks that block multicast")
    parser.add_argument("--cluster", metavar="CODE", default=None,
                        help="pairing code of the cluster to join (stored for next time)")
    parser.add_argument("--insecure-open", action="store_true",
                        help="DEBUG ONLY: no encryption or authentication on the mesh")


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Network options plus how to split a model across the peers."""
    add_network_options(parser)
    parser.add_argument("--strategy", choices=("proportional", "fewest", "compute"), default="proportional",
                        help="proportional: spread layers by offered memory; fewest: as few nodes as possible; "
                             "compute: by measured GFLOP/s (never over anyone's memory budget)")
    parser.add_argument("--max-memory", type=size_value, default=None, metavar="SIZE",
                        help="cap on the memory this machine offers for model parts (e.g. 8GB, 512MiB)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to run and how: shared by generate, chat and api."""
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights and activations dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    parser.add_argument("--context", type=positive_int, default=None, metavar="N", help="tokens of KV cache to reserve (default: min(4096, model max))")
    parser.add_argument("--local", action="store_true", help="run on this machine only, no cluster")
    parser.add_argument("--wait", type=wait_seconds, default=DEFAULT_WAIT_S, metavar="SECONDS",
                        help=f"listen up to this long for peers before planning (default {DEFAULT_WAIT_S:g})")


def open_model(args: argparse.Namespace, *, on_notice: Callable[[str], None] | None = None,
               on_progress: Callable[[str, int, int], None] | None = None) -> "LoadedModel":
    """The model the command asked for, as a LoadedModel: over the cluster, or on this machine with --local.

    For the cluster the initiator node is started here (see start_initiator_node); it listens up to --wait seconds
    for peers, then plans; closing the returned model unloads the peers' parts and stops the node.
    Notices (a lost peer) and finished weight transfers go to stderr unless callbacks are given.
    """
    from cakep2p import cluster
    from cakep2p.loaded_model import LocalModel

    if args.local:
        check_fits_locally(args.model, args.dtype, args.device, args.context, args.max_memory)
        return LocalModel(args.model, dtype=args.dtype, device=args.device, context=args.context)
    check_model_folder(args.model, args.dtype)  # a broken folder fails here, before any network activity
    node = start_initiator_node(args)
    try:
        model = cluster.open_model(node, args.model, dtype=args.dtype, device=args.device,
                                   strategy=args.strategy, context=args.context, max_memory=args.max_memory,
                                   wait_s=args.wait,
                                   on_progress=on_progress or _print_transfers(), on_notice=on_notice or _print_notice)
    except BaseException:
        node.stop()
        raise
    return ModelWithNode(model, node)


def check_fits_locally(model_dir: str, dtype: str, device: str, context: int | None,
                       max_memory: int | None) -> None:
    """PlanError unless the whole model (weights and KV cache) fits what this machine alone offers now.

    Without it a model too big for --local loads until torch fails or the OS kills the process.
    """
    from dataclasses import replace

    from cakep2p import planner
    from cakep2p.capacity import offered_memory, probe
    from cakep2p.engine.config import ModelArgs
    from cakep2p.engine.sizes import model_spec
    from cakep2p.errors import PlanError
    from cakep2p.loaded_model import context_length

    spec = model_spec(model_dir, dtype)
    capacity = probe(run_benchmark=False)
    if device == "cpu" and capacity.accelerator != "cpu":  # the weights go to RAM, not to the accelerator
        capacity = replace(capacity, accelerator="cpu")
    this_machine = planner.NodeBudget("local", "this machine", offered_memory(capacity, max_memory))
    try:
        planner.plan(spec, [this_machine], "local", context_length(ModelArgs.from_dir(model_dir), context))
    except ValueError as error:  # planner.DoesNotFit names the model, the need and the offer
        raise PlanError(f"--local: {error}") from None


def start_initiator_node(args: argparse.Namespace) -> "Node":
    """The started Node of a command that uses the cluster (generate, chat, api, plan); the caller stops it.

    It is NOT serving: a process that only runs a command uses the peers' memory but takes no work from others
    (run `cakep2p --serve` for that). It has a throwaway node id, so a `cakep2p --serve` of the same install on
    this machine is a peer like any other, and its mesh port is whichever the OS picks. With --wait 0 it listens for no one (no mDNS, no static --peers): the
    plan is for this machine alone.
    """
    from cakep2p.node import Node

    if not args.verbose:  # an initiator's user wants the text and notices, not the node's log
        for name in ("cakep2p.node", "cakep2p.stage", "cakep2p.discovery", "cakep2p.cluster", "cakep2p.security"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("cakep2p.mesh").setLevel(logging.ERROR)  # its "moving the session" is our notice
    listen = args.wait > 0
    node = Node(port=0, interfaces=args.interface, max_memory=args.max_memory, cluster_code=args.cluster,
                discovery=listen, serving=False, static_peers=args.peers if listen else [],
                insecure_open=args.insecure_open, node_id=uuid.uuid4().hex)
    node.start()
    return node


def check_model_folder(model_dir: str, dtype: str = "auto") -> None:
    """ModelError unless every tensor of the whole model is in the checkpoint with the shape config.json implies."""
    from cakep2p.engine.checkpoint import read_tensor_index
    from cakep2p.engine.config import ModelArgs
    from cakep2p.engine.part import PartSpec, expected_shapes
    from cakep2p.engine.sizes import model_spec
    from cakep2p.errors import ModelError

    model_spec(model_dir, dtype)  # config, dtype, safetensors headers, missing tensors
    model_args = ModelArgs.from_dir(model_dir)
    index = read_tensor_index(model_dir)
    whole = PartSpec(0, model_args.num_layers, has_embedding=True, has_head=True)
    for name, shape in expected_shapes(model_args, whole).items():
        if tuple(index[name].shape) != tuple(shape):
            raise ModelError(f"model {model_dir}: tensor {name} has shape {list(index[name].shape)}, "
                             f"expected {list(shape)}")


class ModelWithNode:
    """A LoadedModel opened on a node this command started: the model's members, and close() also stops the node."""

    def __init__(self, model: "LoadedModel", node: "Node") -> None:
        self.model, self.node = model, node
        self.name, self.model_dir, self.args = model.name, model.model_dir, model.args
        self.tokenizer, self.max_seq_len = model.tokenizer, model.max_seq_len

    @property
    def plan(self) -> "Plan | None":
        return self.model.plan  # a cluster model re-plans when a peer is lost

    @property
    def notices(self) -> list[str]:
        return self.model.notices

    def new_pipeline(self) -> "Pipeline":
        return self.model.new_pipeline()

    def describe(self) -> dict:
        return self.model.describe()

    def close(self) -> None:
        try:
            self.model.close()
        finally:
            self.node.stop()


def _print_notice(text: str) -> None:
    print(f"cakep2p: note: {text}", file=sys.stderr, flush=True)


def _print_transfers() -> Callable[[str, int, int], None]:
    def progress(label: str, done: int, total: int) -> None:
        if done >= total > 0:
            print(f"cakep2p: sent {format_size(total)} of weights to {label}", file=sys.stderr, flush=True)
    return progress
