"""`cakep2p --serve`: run a headless node until SIGINT/SIGTERM, logging peers as they join and leave."""

from __future__ import annotations

import argparse
import logging

from cakep2p.commands.options import add_network_options, port_number, size_value
from cakep2p.discovery import PeerInfo
from cakep2p.node import Node
from cakep2p.units import format_size

log = logging.getLogger("cakep2p.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=None, help="node name shown to peers (default: this machine's host name)")
    parser.add_argument("--port", type=port_number, default=None,
                        help="mesh port (default: 5770, or the next free one)")
    parser.add_argument("--max-memory", type=size_value, default=None, metavar="SIZE",
                        help="cap on the memory this machine offers for model parts (e.g. 8GB, 512MiB)")
    parser.add_argument("--no-discovery", action="store_true",
                        help="do not announce or browse over mDNS (use --peers on the other machines)")
    parser.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                        help="also look here for models a peer asks for (default: the data dir's models/)")
    add_network_options(parser)


def describe_peer(peer: PeerInfo) -> str:
    state = "serving" if peer.serving else "not serving"
    if peer.status == "other_cluster":
        state += ", OTHER CLUSTER (never planned)"
    elif peer.status == "incompatible":
        state += f", INCOMPATIBLE protocol {peer.protocol_version} (never planned)"
    return (f"{peer.name!r} (id {peer.node_id[:8]}) at {peer.address}:{peer.port}: {peer.accelerator}, "
            f"offers {format_size(peer.offered_memory)}, {peer.gflops:.1f} GFLOP/s, {state}")


def _log_peer_event(event: str, peer: PeerInfo) -> None:
    if event == "added":
        log.info("peer joined: %s", describe_peer(peer))
    elif event == "removed":
        log.info("peer left: %r (id %s) at %s:%d", peer.name, peer.node_id[:8], peer.address, peer.port)
    else:
        log.info("peer updated: %s", describe_peer(peer))


def run(args: argparse.Namespace) -> int:
    if args.insecure_open:
        log.warning("--insecure-open: the mesh will accept anyone on this network; DEBUG ONLY")
    node = Node(name=args.name, port=args.port, interfaces=args.interface, max_memory=args.max_memory,
                cluster_code=args.cluster, discovery=not args.no_discovery, static_peers=args.peers,
                insecure_open=args.insecure_open, models_dirs=args.models_dir)
    node.directory.add_listener(_log_peer_event)
    node.run_forever()
    return 0
