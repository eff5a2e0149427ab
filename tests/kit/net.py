"""Loopback only: free ports on 127.0.0.1 and the MULTICAST flag mDNS needs on lo."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it, so parallel runs rarely collide)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def loopback_multicast_on() -> None:
    """mDNS on 127.0.0.1 needs the MULTICAST flag on lo (`ip link set lo multicast on`); skip if it cannot be set."""
    flags = Path("/sys/class/net/lo/flags")
    if flags.exists() and int(flags.read_text(), 16) & 0x1000:
        return
    try:
        result = subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], capture_output=True, text=True,
                                timeout=10)
    except FileNotFoundError:
        pytest.skip("loopback multicast is off and iproute2 (`ip`) is not installed to enable it")
    if result.returncode != 0:
        pytest.skip(f"loopback multicast is off and cannot be enabled: {result.stderr.strip()}")
