"""`cakep2p doctor`: explain, in plain lines, why nodes do or do not see each other."""

from __future__ import annotations

import argparse
import importlib.util
import secrets
import socket
import struct
import time

import psutil

from cakep2p.commands.display import window_problem
from cakep2p.commands.options import port_number, wait_seconds
from cakep2p.discovery import snapshot_peers
from cakep2p.mesh.parts_cache import CAP_ENV, cache_summary, default_parts_dir
from cakep2p.network import (DEFAULT_PORT, announce_addresses, is_virtual_interface, listen_host, port_is_free,
                             resolve_interfaces)
from cakep2p.node import cluster_fingerprint

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
MDNS_DAEMONS = ("avahi-daemon", "mdnsresponder", "systemd-resolved", "mdnsd", "bonjour")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interface", action="append", metavar="IP", default=None,
                        help="check only this interface address (repeatable; default: the ones a node would use)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"mesh port to check (default {DEFAULT_PORT})")
    parser.add_argument("--wait", type=wait_seconds, default=2.0, metavar="SECONDS",
                        help="how long to listen for peers (default 2; 0 skips)")
    parser.add_argument("--cluster", metavar="CODE", default=None, help="cluster code to judge peers against (not stored)")


def _interface_of(address: str) -> str:
    for name, addresses in psutil.net_if_addrs().items():
        if any(item.address == address for item in addresses):
            return name
    return "?"


def interface_lines(interfaces: list[str] | None) -> list[str]:
    """One line per IPv4 interface: used or skipped, and why; multicast flag where the OS reports it."""
    used = set(announce_addresses(interfaces))
    stats = psutil.net_if_stats()
    lines = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        for item in addresses:
            if item.family != socket.AF_INET:
                continue
            stat = stats.get(name)
            flags = getattr(stat, "flags", "") or ""
            multicast = "multicast flag on" if "multicast" in flags else (
                "NO multicast flag" if flags else "multicast flag unknown")
            if item.address in used:
                state = "USED"
            elif interfaces:
                state = "not used (not given with --interface)"
            elif not getattr(stat, "isup", False):
                state = "skipped (down)"
            elif name == "lo" or item.address.startswith("127."):
                state = "skipped (loopback is never announced to the network)"
            elif is_virtual_interface(name):
                state = "skipped (virtual bridge: peers cannot reach it)"
            else:
                state = "skipped (link-local)"
            lines.append(f"interface {name} {item.address}: {state}, {multicast}")
    for address in sorted(used - {item.address for addrs in psutil.net_if_addrs().values() for item in addrs}):
        lines.append(f"interface ? {address}: USED but no local interface has this address -- check --interface")
    return lines


def _mdns_query(token: str) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in f"cakep2p-doctor-{token}.local".split("."))
    return struct.pack("!6H", 0, 0, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!2H", 16, 1)


def multicast_self_test(address: str, timeout_s: float = 1.0) -> str:
    """Send one mDNS query out of `address` and wait to hear it back on port 5353 (the local stack's side only)."""
    token = secrets.token_hex(6)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            receiver.bind(("", MDNS_PORT))
        except OSError as error:
            return f"cannot share UDP port {MDNS_PORT} ({error.strerror}): another program holds it exclusively"
        membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(address)
        try:
            receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        except OSError as error:
            return f"cannot join the mDNS group ({error.strerror}): the interface has no multicast support"
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        try:
            sender.sendto(_mdns_query(token), (MDNS_GROUP, MDNS_PORT))
        except OSError as error:
            return f"cannot send multicast ({error.strerror}): no multicast route on this interface"
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            receiver.settimeout(remaining)
            try:
                data, _ = receiver.recvfrom(9000)
            except (socket.timeout, OSError):
                break
            if token.encode() in data:
                return "ok (sent and heard back an mDNS query; switches or Wi-Fi isolation may still drop it)"
        return "FAILED: sent an mDNS query but never heard it back (multicast loop off or filtered)"
    finally:
        receiver.close()
        sender.close()


def mdns_daemon_lines() -> list[str]:
    """Which system mDNS daemons run beside us (sharing port 5353 is fine; we use SO_REUSEPORT too)."""
    daemons = sorted({process.info["name"] for process in psutil.process_iter(["name"])
                      if (process.info["name"] or "").lower() in MDNS_DAEMONS})
    holders = set()
    try:
        for connection in psutil.net_connections(kind="udp"):
            if connection.laddr and connection.laddr.port == MDNS_PORT and connection.pid:
                try:
                    holders.add(psutil.Process(connection.pid).name())
                except psutil.Error:
                    holders.add(f"pid {connection.pid}")
    except (psutil.AccessDenied, PermissionError):
        holders.add("(unknown: run as administrator to see)")
    lines = [f"system mDNS daemon running: {', '.join(daemons)} (we share UDP {MDNS_PORT} with it; that is fine)"
             if daemons else "no system mDNS daemon found (avahi-daemon / mDNSResponder)"]
    lines.append(f"UDP {MDNS_PORT} is open in: {', '.join(sorted(holders))}" if holders
                 else f"UDP {MDNS_PORT}: no other program has it open")
    return lines


def mesh_port_line(port: int, interfaces: list[str] | None) -> str:
    host = listen_host(interfaces)
    if port_is_free(port, host):
        return f"mesh port {port}: free (a node started now would use it; allow it in your firewall)"
    with socket.socket() as client:
        client.settimeout(0.5)
        listening = client.connect_ex((host or "127.0.0.1", port)) == 0
    return (f"mesh port {port}: in use, something is listening (a cakep2p node already running?)" if listening
            else f"mesh port {port}: taken; `cakep2p --serve` will pick the next free port")


def peer_lines(interfaces: list[str] | None, wait_s: float, code: str | None) -> list[str]:
    peers = snapshot_peers(interfaces, wait_s, cluster_fingerprint(code))
    if not peers:
        return [f"peers: none heard in {wait_s:g} s. On each machine run `cakep2p --serve`; if they run and "
                "still nobody appears, multicast is blocked between them: use --peers HOST:PORT"]
    lines = [f"peers: {len(peers)} heard"]
    for peer in peers:
        with socket.socket() as client:
            client.settimeout(1.0)
            reachable = client.connect_ex((peer.address, peer.port)) == 0
        cluster = {"ok": "same cluster",
                   "other_cluster": "OTHER cluster (different pairing code: to join it, run `cakep2p code` there "
                                    "and `cakep2p code --set CODE` here)",
                   "incompatible": f"INCOMPATIBLE protocol {peer.protocol_version}"}[peer.status]
        tcp = "mesh port reachable" if reachable else "mesh port NOT reachable (firewall, or mesh not running)"
        lines.append(f"  {peer.name} at {peer.address}:{peer.port}: {cluster}, {tcp}")
    return lines


def parts_cache_line() -> str:
    """How much the parts cache (weights received from peers) holds, against its cap."""
    parts_dir = default_parts_dir()
    return f"parts cache: {cache_summary(parts_dir)} in {parts_dir} (least recently used go first; set {CAP_ENV})"


def window_line() -> str:
    """Whether `cakep2p` (no command) can open its window here, and if not, the fix."""
    if importlib.util.find_spec("PySide6") is None:
        return "window: PySide6 is not installed (pip install 'cakep2p[gui]'); headless nodes need none"
    problem = window_problem()
    return f"window: {problem}" if problem else "window: can start here"


def run(args: argparse.Namespace) -> int:
    args.interface = resolve_interfaces(args.interface)
    lines = interface_lines(args.interface)
    used = announce_addresses(args.interface)
    if not used:
        lines.append("no usable network interface is up: only nodes on this machine can be found")
    stats = psutil.net_if_stats()
    for address in used:
        device = _interface_of(address)
        flags = getattr(stats.get(device), "flags", "") or ""
        if flags and "multicast" not in flags:
            lines.append(f"multicast on {address}: OFF on {device} (Linux: `ip link set {device} multicast on`)")
        else:
            lines.append(f"multicast on {address}: {multicast_self_test(address)}")
    lines += mdns_daemon_lines()
    lines.append(mesh_port_line(args.port, args.interface))
    lines.append(parts_cache_line())
    lines.append(window_line())
    if args.wait > 0:
        lines += peer_lines(args.interface, args.wait, args.cluster)
    print("\n".join(lines))
    return 0
