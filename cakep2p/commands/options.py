"""Command-line options shared by every command that talks to the cluster."""

import argparse

from cakep2p.units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    parser.add_argument("--strategy", choices=("proportional", "fewest"), default="proportional",
                        help="proportional: spread layers by offered memory; fewest: as few nodes as possible")
    parser.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                        help="cap on the memory this machine offers for model parts (e.g. 8GB, 512MiB)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to run and how: shared by generate, chat and api."""
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights and activations dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    parser.add_argument("--context", type=int, default=None, metavar="N", help="tokens of KV cache to reserve (default: min(4096, model max))")
    parser.add_argument("--local", action="store_true", help="run on this machine only, no cluster")


def open_model(args: argparse.Namespace):
    """The model the command asked for, as a LoadedModel: local now; over the cluster once the mesh is wired."""
    from cakep2p.loaded_model import LocalModel

    return LocalModel(args.model, dtype=args.dtype, device=args.device, context=args.context)
