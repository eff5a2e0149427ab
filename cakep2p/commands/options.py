"""Command-line options shared by every command that talks to the cluster, and loading the model they ask for."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from typing import TYPE_CHECKING, Callable

from cakep2p.errors import CakeError
from cakep2p.paths import EMBEDDED_MODEL_NAME, EMBEDDED_MODEL_NOTE, embedded_model_dir
from cakep2p.units import format_size, parse_size

if TYPE_CHECKING:
    from cakep2p.cluster import LoadedModel, ModelOptions
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.sampling import SamplingParams
    from cakep2p.node import Node

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
    """argparse type for counts that must be at least 1 (--context, --max-sessions, --max-new-tokens)."""
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


def add_network_options(parser: argparse.ArgumentParser, cluster_help: str = "pairing code of the cluster to join "
                        "(stored for next time)") -> None:
    """Where to look for peers and which cluster to belong to."""
    parser.add_argument("--interface", action="append", metavar="IP", default=None,
                        help="announce and browse only on this interface address (repeatable; default: all)")
    parser.add_argument("--peers", type=_peer_list, default=[], metavar="HOST:PORT,...",
                        help="static peers, for networks that block multicast")
    parser.add_argument("--cluster", metavar="CODE", default=None, help=cluster_help)
    parser.add_argument("--insecure-open", action="store_true",
                        help="DEBUG ONLY: no encryption or authentication on the mesh")


def add_cluster_options(parser: argparse.ArgumentParser, **network: str) -> None:
    """Network options (`cluster_help` rewords --cluster) plus how to split a model across the peers."""
    add_network_options(parser, **network)
    parser.add_argument("--strategy", choices=("proportional", "fewest", "compute", "fastest"),
                        default="proportional",
                        help="proportional: spread layers by offered memory; fewest: as few nodes as possible; "
                             "compute: by measured GFLOP/s; fastest: the best predicted decode tok/s from measured "
                             "memory bandwidth and RTTs (never over anyone's memory budget)")
    parser.add_argument("--max-memory", type=size_value, default=None, metavar="SIZE",
                        help="cap on the memory this machine offers for model parts (e.g. 8GB, 512MiB)")


def sampling_from_args(args: argparse.Namespace, checkpoint: "Checkpoint",
                       max_new_tokens: int | None = None) -> "SamplingParams":
    """SamplingParams from the flags on top of the model's generation_config.json defaults (`max_new_tokens` where
    --max-new-tokens was not given); a bad flag is one line naming it ("--top-p must be in (0, 1], got 0.0")."""
    from cakep2p.engine.sampling import sampling_params

    try:
        chosen = args.max_new_tokens if args.max_new_tokens is not None else max_new_tokens
        return sampling_params(checkpoint.generation, max_new_tokens=chosen,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as error:  # SamplingParams names the field: "top_p must be in (0, 1], got 0.0"
        field_name, _, rest = str(error).partition(" ")
        raise CakeError(f"--{field_name.replace('_', '-')} {rest}") from None


WEIGHT_FORMATS = ("auto", "bf16", "f16", "f32", "int8", "int4")


def add_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default="auto", choices=WEIGHT_FORMATS,
                        help="weight format in memory and on the wire: auto keeps a quantized checkpoint (GGUF) "
                             "quantized and a 16-bit one at 16 bits; int8 and int4 hold 2-4x more model per machine")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """--model, optional: without it the demo model that ships with cakep2p runs (and says so)."""
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a .gguf file, or a folder: Hugging Face (config.json, *.safetensors, tokenizer.json) "
                             f"or holding one .gguf (default: {EMBEDDED_MODEL_NAME}, a tiny demo model that ships "
                             "with cakep2p)")


def open_checkpoint(args: argparse.Namespace) -> "Checkpoint":
    """The checkpoint of --model, or of the demo model when none was given (one note on stderr says which)."""
    from cakep2p.engine.checkpoint import Checkpoint

    if args.model is not None:
        return Checkpoint.open(args.model)
    if not getattr(args, "quiet", False):
        print_notice(f"no --model given: {EMBEDDED_MODEL_NOTE}; pass --model PATH (a Hugging Face folder or a "
                     ".gguf) for a real model, or pick one in the window's model library")
    return Checkpoint.open(embedded_model_dir())


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to run and how: shared by generate, chat and api."""
    add_model_argument(parser)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights and activations dtype (auto: the checkpoint's; float32 on a GGUF dequantizes "
                             "it exactly)")
    add_weights_option(parser)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    parser.add_argument("--context", type=positive_int, default=None, metavar="N",
                        help="tokens of KV cache to reserve (default: min(4096, model max); more than the model's "
                             "maximum is capped to it, with a note)")
    parser.add_argument("--local", action="store_true", help="run on this machine only, no cluster")
    parser.add_argument("--wait", type=wait_seconds, default=DEFAULT_WAIT_S, metavar="SECONDS",
                        help=f"listen up to this long for peers before planning (default {DEFAULT_WAIT_S:g})")


def model_options(args: argparse.Namespace) -> "ModelOptions":
    """The command's model flags as the ModelOptions every way of opening a model takes."""
    from cakep2p.cluster import ModelOptions

    return ModelOptions(dtype=args.dtype, weights=args.weights, device=args.device, strategy=args.strategy,
                        context=args.context, local=args.local, max_memory=args.max_memory, wait_s=args.wait)


def load_model(args: argparse.Namespace, checkpoint: "Checkpoint", *,
               on_notice: Callable[[str], None] | None = None,
               on_progress: Callable[[str, int, int], None] | None = None) -> "LoadedModel":
    """The model the command asked for (cluster.open_model): over the cluster, or on this machine with --local.

    The checkpoint is checked first, so a broken model fails before any network activity. For the
    cluster an initiator node is started (see start_initiator_node) that the model owns: closing the model unloads
    the peers' parts and stops it. Notices (a lost peer) and finished transfers go to stderr unless callbacks are
    given.
    """
    from cakep2p.cluster import open_model
    from cakep2p.engine.loading import check_complete

    check_complete(checkpoint)
    options = model_options(args)
    quiet = getattr(args, "quiet", False)
    on_notice = on_notice or (_ignore if quiet else print_notice)
    if options.local:
        return open_model(checkpoint, options, on_notice=on_notice)
    node = start_initiator_node(args)
    try:
        return open_model(checkpoint, options, node=node, owns_node=True,
                          on_progress=on_progress or (None if quiet else _print_transfers()), on_notice=on_notice)
    except BaseException:
        node.stop()
        raise


def start_initiator_node(args: argparse.Namespace, store_code: bool = True) -> "Node":
    """The started Node of a command that uses the cluster (generate, chat, api, plan); the caller stops it.

    It is NOT serving: a process that only runs a command uses the peers' memory but takes no work from others
    (run `cakep2p --serve` for that). It has a throwaway node id, so a `cakep2p --serve` of the same install on
    this machine is a peer like any other, and its mesh port is whichever the OS picks. With --wait 0 it listens
    for no one (no mDNS, no static --peers): the plan is for this machine alone. Without `store_code`, a --cluster
    code is used for this run only.
    """
    from cakep2p.node import Node

    if not args.verbose:  # an initiator's user wants the text and notices, not the node's log
        for name in ("cakep2p.node", "cakep2p.mesh.server", "cakep2p.discovery", "cakep2p.cluster", "cakep2p.mesh.curve"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("cakep2p.mesh.pipeline").setLevel(logging.ERROR)  # its "moving the session" is our notice
    listen = args.wait > 0
    node = Node(port=0, interfaces=args.interface, max_memory=args.max_memory, cluster_code=args.cluster,
                discovery=listen, serving=False, static_peers=args.peers if listen else [],
                insecure_open=args.insecure_open, node_id=uuid.uuid4().hex, store_code=store_code)
    node.start()
    return node


def print_notice(text: str) -> None:
    """A note for the user on stderr: `cakep2p: note: ...`."""
    print(f"cakep2p: note: {text}", file=sys.stderr, flush=True)


def _ignore(text: str) -> None:
    """--quiet: notes are not shown."""


def _print_transfers() -> Callable[[str, int, int], None]:
    def progress(label: str, done: int, total: int) -> None:
        if done >= total > 0:
            print(f"cakep2p: sent {format_size(total)} of weights to {label}", file=sys.stderr, flush=True)
    return progress
