"""Discovery across network namespaces on a private bridge (10.231.0.0/24 exists only inside namespaces this
module creates), and coexistence with a real avahi-daemon on the same network stack as one of our nodes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from cakep2p.security import new_code
from tests.kit import ChildProcess, kill_all, start_serve, wait_until

SUBNET = "10.231.0"
NODE_COUNT = 4          # three pinned nodes, plus `roamer` (no --interface) in the last namespace
AVAHI_PID_FILE = Path("/run/avahi-daemon/pid")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (`ip`) is not installed"),
]

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/> <allow own="*"/> <allow send_destination="*"/> <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONFIG = """[server]
host-name=cakep2p-test-avahi
use-ipv4=yes
use-ipv6=no
allow-interfaces={interface}
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
"""


def ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", "netns", "exec", namespace, "ip", *args] if namespace else ["ip", *args]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=10)


class Namespaces:
    """A hub namespace holding bridge br0 and one namespace per node, each joined to the bridge by a veth pair."""

    def __init__(self, prefix: str, count: int) -> None:
        self.hub = f"{prefix}h"
        self.nodes = [f"{prefix}n{index}" for index in range(count)]
        self.addresses = [f"{SUBNET}.{11 + index}" for index in range(count)]
        self.interface = "v0"
        self.created: list[str] = []

    def create(self) -> None:
        for name in [self.hub, *self.nodes]:
            ip("netns", "add", name)
            self.created.append(name)
            ip("link", "set", "lo", "up", namespace=name)
        ip("link", "add", "br0", "type", "bridge", namespace=self.hub)
        ip("link", "set", "br0", "up", namespace=self.hub)
        for index, (name, address) in enumerate(zip(self.nodes, self.addresses)):
            port = f"p{index}"
            ip("link", "add", self.interface, "netns", name, "type", "veth", "peer", "name", port, "netns", self.hub)
            ip("link", "set", port, "master", "br0", namespace=self.hub)
            ip("link", "set", port, "up", namespace=self.hub)
            ip("addr", "add", f"{address}/24", "dev", self.interface, namespace=name)
            ip("link", "set", self.interface, "up", namespace=name)

    def delete(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def _pid_alive(pid_file: Path) -> bool:
    try:
        return psutil.pid_exists(int(pid_file.read_text().strip()))
    except (OSError, ValueError):
        return False


def _avahi_unavailable() -> str | None:
    missing = [tool for tool in ("avahi-daemon", "avahi-browse", "dbus-daemon") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install avahi-daemon avahi-utils dbus)"
    if AVAHI_PID_FILE.exists() and _pid_alive(AVAHI_PID_FILE):
        return f"an avahi-daemon already runs on this machine ({AVAHI_PID_FILE}); not starting a second one"
    return None


def _start_avahi(tmp_path: Path, namespace: str, interface: str, processes: list) -> dict:
    """A private system bus plus avahi-daemon inside `namespace`; returns the env that reaches them."""
    socket_path = tmp_path / "system_bus"
    (tmp_path / "bus.conf").write_text(BUS_CONFIG.format(socket=socket_path))
    (tmp_path / "avahi.conf").write_text(AVAHI_CONFIG.format(interface=interface))
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket_path}"}
    with open(tmp_path / "dbus.log", "wb") as bus_log:
        processes.append(ChildProcess(["dbus-daemon", "--nofork", f"--config-file={tmp_path / 'bus.conf'}"],
                                      env=dict(os.environ), role="dbus-daemon", stdout=bus_log,
                                      stderr=subprocess.STDOUT))
    wait_until(socket_path.exists, 10, message="the private D-Bus socket")
    AVAHI_PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    avahi_log_path = tmp_path / "avahi.log"
    with open(avahi_log_path, "wb") as avahi_log:
        processes.append(ChildProcess(
            ["ip", "netns", "exec", namespace, "avahi-daemon", "-f", str(tmp_path / "avahi.conf"),
             "--no-drop-root", "--no-chroot", "--no-rlimits"], env=env, role="avahi-daemon", stdout=avahi_log,
            stderr=subprocess.STDOUT))
    wait_until(lambda: "Server startup complete" in avahi_log_path.read_text(errors="replace")
               or not processes[-1].alive(), 15, message="avahi-daemon to start")
    if not processes[-1].alive():
        pytest.skip(f"avahi-daemon could not start: {avahi_log_path.read_text(errors='replace')[-300:]}")
    return env


@pytest.fixture(scope="module")
def namespace_cluster(tmp_path_factory):
    """Three namespaces on a bridge, avahi-daemon (when available) beside the node in the first, then one
    `cakep2p --serve --interface <namespace address>` per namespace."""
    tmp_path = tmp_path_factory.mktemp("netns")
    namespaces = Namespaces(f"ck{os.getpid() % 100000}", NODE_COUNT)
    helpers: list[ChildProcess] = []
    nodes = []
    try:
        try:
            namespaces.create()
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot create network namespaces: {error.stderr.strip()}")
        avahi_reason = _avahi_unavailable()
        avahi_env = None
        if avahi_reason is None:
            avahi_env = _start_avahi(tmp_path, namespaces.nodes[0], namespaces.interface, helpers)
        code = new_code()
        roamer_namespace = namespaces.nodes[-1]
        # a virtual bridge like docker0 beside the roamer's real interface: it must never be announced
        ip("link", "add", "docker0", "type", "bridge", namespace=roamer_namespace)
        ip("addr", "add", "10.232.0.1/24", "dev", "docker0", namespace=roamer_namespace)
        ip("link", "set", "docker0", "up", namespace=roamer_namespace)
        for index, (name, address) in enumerate(zip(namespaces.nodes[:-1], namespaces.addresses)):
            nodes.append(start_serve(tmp_path, f"ns{index}", 5770, interface=address, code=code, netns=name))
        # default interfaces = every interface of its namespace (safe: the namespace is ours)
        roamer = start_serve(tmp_path, "roamer", 5770, interface="", code=code, netns=roamer_namespace)
        nodes.append(roamer)
        roamer.address = namespaces.addresses[-1]
        for node in nodes:
            wait_until(node.started, 90, message=f"{node.name} to start")
        yield {"nodes": nodes[:-1], "roamer": roamer, "roamer_namespace": roamer_namespace, "avahi_env": avahi_env,
               "avahi_reason": avahi_reason}
    finally:
        try:
            kill_all(nodes)
            for helper in reversed(helpers):
                helper.terminate()
        finally:
            namespaces.delete()


def test_each_namespace_node_sees_the_other_two_at_their_addresses(namespace_cluster):
    nodes = namespace_cluster["nodes"]
    for node in nodes:
        for other in nodes:
            if other is not node:
                match = wait_until(lambda: node.joined(other.name), 15, message=f"{node.name} to see {other.name}")
                assert match.groups() == (other.address, "5770")


def test_nodes_coexist_with_avahi_and_avahi_browse_sees_them(namespace_cluster):
    if namespace_cluster["avahi_env"] is None:
        pytest.skip(namespace_cluster["avahi_reason"])
    nodes = namespace_cluster["nodes"]
    for node in nodes:                       # ns0 shares its UDP 5353 with avahi-daemon
        for other in nodes:
            if other is not node:
                wait_until(lambda: node.joined(other.name), 15, message=f"{node.name} to see {other.name}")

    def browse() -> dict[str, str]:
        result = subprocess.run(["avahi-browse", "-rpt", "_cakep2p._tcp"], env=namespace_cluster["avahi_env"],
                                capture_output=True, text=True, timeout=20)
        resolved = [line.split(";") for line in result.stdout.splitlines() if line.startswith("=")]
        return {fields[3]: f"{fields[7]}:{fields[8]}" for fields in resolved if len(fields) > 9}

    seen = wait_until(lambda: len(found := browse()) > len(nodes) and found, 20, interval=0.5,
                      message="avahi-browse to resolve every node")
    assert seen == {node.name: f"{node.address}:5770" for node in [*nodes, namespace_cluster["roamer"]]}


def test_default_interfaces_skip_loopback_and_virtual_bridges_and_follow_address_changes(namespace_cluster):
    roamer, observer = namespace_cluster["roamer"], namespace_cluster["nodes"][0]
    match = wait_until(lambda: observer.joined("roamer"), 15, message="ns0 to see the roamer")
    assert match.groups() == (roamer.address, "5770")          # not 127.0.0.1, not docker0's 10.232.0.1
    assert "10.232.0.1" not in observer.log() and "serving at 127.0.0.1" not in roamer.log()
    new_address = f"{SUBNET}.99"
    # like a DHCP renumbering (deleting the primary address first would also drop a secondary one)
    ip("addr", "del", f"{roamer.address}/24", "dev", "v0", namespace=namespace_cluster["roamer_namespace"])
    ip("addr", "add", f"{new_address}/24", "dev", "v0", namespace=namespace_cluster["roamer_namespace"])
    wait_until(lambda: re.search(rf"peer updated: 'roamer' \(id \w+\) at {re.escape(new_address)}:5770",
                                 observer.log()), 20, message=f"the roamer's new address to reach ns0:\n{roamer.log()}")
