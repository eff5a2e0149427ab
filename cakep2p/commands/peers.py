"""`cakep2p peers`: browse the network for a few seconds and list the nodes seen (a table, or --json)."""

from __future__ import annotations

import argparse
import json

from cakep2p.commands.options import wait_seconds
from cakep2p.discovery import PeerInfo, snapshot_peers
from cakep2p.network import resolve_interfaces
from cakep2p.node import cluster_fingerprint
from cakep2p.units import format_size

STATUS_TEXT = {"ok": "ok", "other_cluster": "other cluster", "incompatible": "incompatible"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of peers")
    parser.add_argument("--wait", type=wait_seconds, default=2.0, metavar="SECONDS",
                        help="how long to listen for announcements (default 2)")
    parser.add_argument("--interface", action="append", metavar="IP", default=None,
                        help="browse only on this interface (address or name; repeatable; default: all)")
    parser.add_argument("--cluster", metavar="CODE", default=None,
                        help="judge peers against this cluster code, without storing it (default: this machine's code)")


def format_table(peers: list[PeerInfo]) -> str:
    if not peers:
        return ("no peers seen; run `cakep2p doctor` to check multicast, or start nodes with "
                "`cakep2p --serve` on this network")
    rows = [("NAME", "ADDRESS", "ACCEL", "RAM FREE/TOTAL", "VRAM FREE/TOTAL", "OFFERS", "GFLOP/S", "SERVING", "STATUS")]
    for peer in peers:
        vram = f"{format_size(peer.vram_free)}/{format_size(peer.vram_total)}" if peer.vram_total else "-"
        rows.append((peer.name, f"{peer.address}:{peer.port}", peer.accelerator,
                     f"{format_size(peer.ram_available)}/{format_size(peer.ram_total)}", vram,
                     format_size(peer.offered_memory), f"{peer.gflops:.1f}", "yes" if peer.serving else "no",
                     STATUS_TEXT.get(peer.status, peer.status)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def run(args: argparse.Namespace) -> int:
    peers = snapshot_peers(resolve_interfaces(args.interface), args.wait, cluster_fingerprint(args.cluster))
    if args.json:
        print(json.dumps([peer.to_json() for peer in peers], indent=2))
    else:
        print(format_table(peers))
    return 0
