"""This machine on the network: its interfaces and addresses (which to announce, which peer address to dial), free
TCP ports for the mesh, and ZeroMQ endpoint strings. Helpers over psutil and socket.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

import psutil

from cakep2p.errors import CakeError

DEFAULT_PORT = 5770
PORT_SEARCH_SPAN = 100
INTERFACE_ENV = "CAKEP2P_INTERFACE"
VIRTUAL_INTERFACE_PREFIXES = ("docker", "virbr", "veth", "br-", "cni", "flannel", "vboxnet", "vmnet", "podman")


# -- endpoints ---------------------------------------------------------------------------------------------------

def endpoint(host: str, port: int) -> str:
    """The ZeroMQ TCP endpoint of host:port (IPv6 literals in brackets; "", 0.0.0.0 and * mean every interface)."""
    if host in ("", "0.0.0.0", "*"):
        host = "*"
    elif ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def peer_address_of(file_descriptor: int) -> str:
    """Best effort: 'host:port' of the remote end of a connected socket's descriptor ('' when it is already gone)."""
    try:
        duplicate = os.dup(file_descriptor)
    except (OSError, TypeError):
        return ""
    try:
        connection = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return ""
    with connection:
        try:
            host, port, *_ = connection.getpeername()
        except (OSError, ValueError):
            return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- ports -------------------------------------------------------------------------------------------------------

def port_is_free(port: int, host: str = "") -> bool:
    """True when a TCP listener could bind host:port now (SO_REUSEADDR, as ZeroMQ binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe_socket.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def choose_port(requested: int | None, host: str = "") -> int:
    """The requested port if free (CakeError otherwise), else the first free one from DEFAULT_PORT up."""
    if requested is not None:
        if not port_is_free(requested, host):
            raise CakeError(f"port {requested} is already in use on {host or 'this machine'}: "
                               f"choose another with --port, or omit --port to pick a free one")
        return requested
    for port in range(DEFAULT_PORT, DEFAULT_PORT + PORT_SEARCH_SPAN):
        if port_is_free(port, host):
            return port
    raise CakeError(f"no free TCP port in {DEFAULT_PORT}-{DEFAULT_PORT + PORT_SEARCH_SPAN - 1}: pass --port")


# -- interfaces and addresses ------------------------------------------------------------------------------------

def listen_host(interfaces: list[str] | None) -> str:
    """Where the mesh server binds: the one --interface address, else all interfaces ("").

    With several --interface addresses discovery announces each of them, so a peer may dial any; the server
    listens on all interfaces rather than on the first address only (listening sends nothing).
    """
    return interfaces[0] if interfaces and len(interfaces) == 1 else ""


def resolve_interfaces(interfaces: list[str] | None) -> list[str] | None:
    """--interface values (IPv4 addresses or interface names such as eth0) -> this machine's IPv4 addresses.

    Without --interface, $CAKEP2P_INTERFACE (comma-separated) applies if set — the test suite pins it to
    127.0.0.1 so no test process ever announces beyond loopback — else None: all interfaces.
    """
    if not interfaces:
        interfaces = [item.strip() for item in os.environ.get(INTERFACE_ENV, "").split(",") if item.strip()]
    if not interfaces:
        return None
    local = {name: [item.address for item in items if item.family == socket.AF_INET]
             for name, items in psutil.net_if_addrs().items()}
    resolved = []
    for item in interfaces:
        if item in local and local[item]:
            resolved += local[item]
        elif any(item in addresses for addresses in local.values()):
            resolved.append(item)
        else:
            known = ", ".join(f"{name} {' '.join(addresses)}" for name, addresses in sorted(local.items()) if addresses)
            raise CakeError(f"no network interface here has the address or name {item!r}: "
                               f"use one of: {known} (see `cakep2p doctor`)")
    return list(dict.fromkeys(resolved))


def is_virtual_interface(name: str) -> bool:
    return name == "lo" or name.startswith(VIRTUAL_INTERFACE_PREFIXES)


def announce_addresses(interfaces: list[str] | None) -> list[str]:
    """IPv4 addresses to announce: the pinned ones, else every up, non-loopback, non-virtual interface's."""
    if interfaces:
        return list(interfaces)
    stats = psutil.net_if_stats()
    found = []
    for interface, addresses in sorted(psutil.net_if_addrs().items()):
        if is_virtual_interface(interface) or not getattr(stats.get(interface), "isup", False):
            continue
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith(("127.", "169.254.")):
                found.append(address.address)
    return found


def _local_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and address.netmask:
                networks.append(ipaddress.IPv4Network(f"{address.address}/{address.netmask}", strict=False))
    return networks


def pick_address(addresses: list[str]) -> str:
    """The address of a peer to dial: one on a local subnet first, loopback last."""
    if not addresses:
        return ""
    networks = _local_networks()

    def rank(text: str) -> int:
        address = ipaddress.ip_address(text)
        if address.is_loopback:
            return 2
        return 0 if any(address in network for network in networks) else 1
    return min(addresses, key=rank)
