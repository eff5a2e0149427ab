"""Discovery with real zeroconf on 127.0.0.1: separate `cakep2p --serve` processes, TXT updates, goodbyes,
expiry, garbage records, duplicate ids and names, and the `peers` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import time

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import ServiceInfo, Zeroconf

from cakep2p import PROTOCOL_VERSION, __version__
from cakep2p.discovery import identity
from cakep2p.discovery import SERVICE_TYPE
from cakep2p.discovery.records import REQUIRED_KEYS, PeerInfo, encode_txt, parse_txt, peer_from_txt
from cakep2p.node import Node
from cakep2p.security import cluster_keys
from tests.kit import (SEEDED_BANDWIDTH, SEEDED_GFLOPS, Browser, child_env, free_port, kill_all,
                       loopback_multicast_on, run_cakep2p, start_node as start_in_process, start_serve,
                       wait_until)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

SUFFIX = f"-{os.getpid()}"        # node names unique to this run: other test runs may share loopback
FLEET_STARTED = [0.0]
BETA_TTL_S = 3  # short enough to watch refreshes and expiry; long enough that a loaded CI box answers in time
TRIO = {"alpha": 1_000_000_000, "beta": 2_000_000_000, "gamma": 3_000_000_000}   # name -> --max-memory


@pytest.fixture(scope="module")
def fingerprint(code) -> str:
    return cluster_keys(code).fingerprint


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, code):
    """The `cakep2p --serve` processes the slow tests share, started at once (they share the start-up cost):
    alpha/beta/gamma on 127.0.0.1 with memory caps (beta's records have a BETA_TTL_S TTL, so refreshes are exercised
    all along; the last tests SIGTERM gamma and SIGKILL beta)."""
    loopback_multicast_on()
    tmp_path = tmp_path_factory.mktemp("fleet")
    nodes = {}
    try:
        for name, cap in TRIO.items():
            env = {"CAKEP2P_MDNS_TTL": str(BETA_TTL_S)} if name == "beta" else {}
            nodes[name] = start_serve(tmp_path, name + SUFFIX, free_port(), code=code,
                                      args=("--max-memory", str(cap)), env=env)
        for node in nodes.values():
            wait_until(node.started, 90, message=f"{node.name} to start")
        FLEET_STARTED[0] = time.monotonic()
        yield nodes
    finally:
        kill_all(nodes.values())


@pytest.fixture(scope="module")
def trio(fleet):
    return [fleet[name] for name in TRIO]


@pytest.fixture
def browser(fingerprint):
    loopback_multicast_on()
    observer = Browser(fingerprint)
    try:
        yield observer
    finally:
        observer.close()


@pytest.fixture
def start_node(tmp_path, monkeypatch, code):
    """Start in-process Nodes on 127.0.0.1, each with its own home; all are stopped at the end."""
    loopback_multicast_on()
    nodes = []

    def start(name: str, home=None, **kwargs) -> Node:
        node = start_in_process(home or tmp_path / f"node-{name}-{len(nodes)}", monkeypatch, code, name=name, **kwargs)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


def fake_peer(**changes) -> PeerInfo:
    values = dict(name="fake", node_id="f" * 32, address="127.0.0.1", port=5999, version=__version__,
                  protocol_version=PROTOCOL_VERSION, cluster_fingerprint="0" * 16, accelerator="cpu",
                  device_name="test", ram_total=8 << 30, ram_available=4 << 30, vram_total=0, vram_free=0,
                  offered_memory=1 << 30, gflops=1.0, bandwidth=1e9, serving=True)
    values.update(changes)
    return PeerInfo(**values)


def register_raw(zeroconf: Zeroconf, name: str, properties, port: int = 5999) -> None:
    info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port, properties=properties,
                       server=f"raw-{name}.local.", parsed_addresses=["127.0.0.1"])
    # no probing (these names are ours) and no waiting for the three announcements
    asyncio.run_coroutine_threadsafe(zeroconf.async_register_service(info, cooperating_responders=True),
                                     zeroconf.loop).result(5)


# ---- TXT parsing -------------------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=1600))
def test_parse_txt_raises_only_value_error_on_random_bytes(raw):
    try:
        parse_txt(raw)
    except ValueError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(REQUIRED_KEYS + ("x",)), st.text(max_size=30), max_size=20))
def test_peer_from_txt_rejects_bad_values_with_value_or_key_error(properties):
    try:
        peer, _ = peer_from_txt("n", properties, ["127.0.0.1"], 5770, "fp")
    except (ValueError, KeyError):
        return
    assert peer.ram_total >= 0 and 0 < peer.port < 65536


def test_txt_roundtrip_keeps_every_field():
    peer = fake_peer(name="round", cluster_fingerprint="abc", addresses=("127.0.0.1",))
    raw = b"".join(bytes([len(item)]) + item for item in
                   (f"{key}={value}".encode() for key, value in encode_txt(peer, 1234).items()))
    decoded, started_at = peer_from_txt("round", parse_txt(raw), ["127.0.0.1"], 5999, "abc")
    assert decoded == peer and started_at == 1234


# ---- separate processes ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_processes_see_each_other_at_their_ports(trio):
    for node in trio:
        for other in trio:
            if other is not node:
                match = wait_until(lambda: node.joined(other.name), 10, message=f"{node.name} to see {other.name}")
                assert match.groups() == ("127.0.0.1", str(other.port))


@pytest.mark.slow
def test_announced_capacity_matches_each_process(trio, browser):
    from cakep2p.discovery.capacity import probe

    local = probe(run_benchmark=False)
    wait_until(lambda: all(browser.peer(node.name) for node in trio), 10, message="all three nodes")
    for node in trio:
        id_file = node.home / "config" / "node_id"
        peer = wait_until(lambda: (peer := browser.peer(node.name)) and
                          peer.node_id == id_file.read_text().strip() and peer, 10, message=f"{node.name}'s id")
        assert (peer.address, peer.port, peer.status, peer.serving) == ("127.0.0.1", node.port, "ok", True)
        assert peer.offered_memory == TRIO[node.name.removesuffix(SUFFIX)]
        assert (peer.gflops, peer.bandwidth) == (SEEDED_GFLOPS, SEEDED_BANDWIDTH)
        assert (peer.accelerator, peer.device_name) == (local.accelerator, local.device_name)
        assert peer.ram_total == psutil.virtual_memory().total and 0 < peer.ram_available <= peer.ram_total
        assert (peer.version, peer.protocol_version) == (__version__, PROTOCOL_VERSION)


@pytest.mark.slow
def test_serve_logs_how_to_connect_without_the_pairing_code(trio, code, fingerprint):
    log = trio[0].log()
    line = re.search(rf"node '{trio[0].name}' \(id (\w{{8}})\) serving at 127\.0\.0\.1:(\d+), offering .*",
                     log).group(0)
    assert str(trio[0].port) in line and fingerprint in line and "join automatically" in line and "--peers" in line
    assert "run `cakep2p code` on this machine" in line
    assert code not in log


@pytest.mark.slow
def test_peers_json_lists_background_nodes(trio, tmp_path, code):
    result = run_cakep2p("peers", "--json", "--interface", "127.0.0.1", "--wait", "3",
                         env=child_env(tmp_path / "cli", code), timeout=60)
    assert result.returncode == 0, result.stderr
    listed = {peer["name"]: peer for peer in json.loads(result.stdout)}
    for node in trio:
        peer = listed[node.name]
        assert (peer["address"], peer["port"], peer["cluster_ok"], peer["serving"]) == ("127.0.0.1", node.port,
                                                                                        True, True)
        for key in ("id", "accelerator", "ram_total", "ram_available", "vram_total", "vram_free",
                    "offered_memory", "gflops", "bandwidth", "version", "status"):
            assert key in peer


@pytest.mark.slow
def test_peers_table_lists_each_node_on_one_line(trio, browser):
    from cakep2p.commands.peers import format_table

    wait_until(lambda: all(browser.peer(node.name) for node in trio), 10, message="the trio")
    table = format_table(browser.directory.peers())
    for node in trio:
        assert re.search(rf"^{node.name}\s+127\.0\.0\.1:{node.port}\s+", table, re.MULTILINE)


@pytest.mark.slow
def test_doctor_explains_interfaces_multicast_port_and_peers(trio, node_home, code, capsys):
    from cakep2p.commands import doctor

    port = free_port()
    doctor.run(argparse.Namespace(interface=["127.0.0.1"], port=port, wait=2.0, cluster=code))
    report = capsys.readouterr().out
    assert re.search(r"^interface lo 127\.0\.0\.1: USED", report, re.MULTILINE)
    assert "multicast on 127.0.0.1: ok" in report
    assert f"mesh port {port}: free" in report and "UDP 5353" in report
    assert re.search(rf"^  {trio[0].name} at 127\.0\.0\.1:{trio[0].port}: same cluster", report, re.MULTILINE)


@pytest.mark.slow
def test_serving_toggle_reaches_another_process(trio, start_node):
    node = start_node("delta" + SUFFIX)
    alpha = trio[0]
    wait_until(lambda: alpha.joined(node.name), 10, message="alpha to see delta")
    node.set_serving(False).result(5)
    wait_until(lambda: re.search(rf"peer updated: '{node.name}' .*not serving", alpha.log()), 10,
               message="alpha to log delta's serving change")


@pytest.mark.slow
def test_withdrawn_node_disappears_and_can_announce_again(start_node, browser):
    node = start_node("rejoin" + SUFFIX)
    wait_until(lambda: browser.peer(node.name), 10, message="the node")
    node.call(node.discovery.withdraw(), 10)
    wait_until(lambda: browser.peer(node.name) is None, 5, message="the goodbye")
    node.set_serving(True).result(10)
    wait_until(lambda: browser.peer(node.name), 10, message="the node to be back")


@pytest.mark.slow
def test_left_node_stays_withdrawn_after_a_memory_change_until_it_joins_again(start_node, browser):
    node = start_node("leaver" + SUFFIX, max_memory=1_000_000_000)
    wait_until(lambda: browser.peer(node.name), 10, message="the node")
    node.set_joined(False).result(10)
    wait_until(lambda: browser.peer(node.name) is None, 5, message="the goodbye")
    assert node.set_max_memory(500_000_000) is None           # nothing re-announced
    node.call(asyncio.sleep(0), 5)                            # whatever the change scheduled on the loop has run
    assert node.discovery.full_name is None and not node.serving and not node.server.serving
    node.set_joined(True).result(10)
    peer = wait_until(lambda: browser.peer(node.name), 10, message="the node to be back")
    assert (peer.offered_memory, peer.serving) == (500_000_000, True)


@pytest.mark.slow
def test_cloned_identity_is_regenerated_by_the_later_node(tmp_path, start_node, browser):
    first = start_node("original" + SUFFIX)
    clone_home = tmp_path / "clone-home" / "config"
    clone_home.mkdir(parents=True)
    (clone_home / "node_id").write_text(first.node_id)
    shared_id = first.node_id
    second = start_node("clone" + SUFFIX, home=clone_home.parent)
    wait_until(lambda: second.node_id != shared_id, 10, message="the later node to take a new id")
    assert first.node_id == shared_id
    assert (clone_home / "node_id").read_text().strip() == second.node_id
    wait_until(lambda: (peer := browser.peer(second.name)) and peer.node_id == second.node_id, 10,
               message="the new id on the network")


@pytest.mark.slow
def test_serve_without_flags_picks_host_name_and_default_port(tmp_path, code):
    with start_serve(tmp_path, None, None, interface="", code=code, args=("--no-discovery",)) as node:
        wait_until(node.started, 90, message="the node with no flags to start")
        match = re.search(r"node '(.+?)' \(id \w{8}\) serving at ([\d.]+):(\d+)", node.log())
        assert match.group(1) == identity.default_node_name()
        assert 5770 <= int(match.group(3)) < 5870
        assert "discovery is off" in node.log()
        node.stop(signal.SIGINT)
        assert node.process.wait(10) == 0


# ---- in-process nodes and raw zeroconf ------------------------------------------------------------------------

def test_malformed_and_foreign_txt_records_are_ignored(start_node, browser, fingerprint):
    good = fake_peer(cluster_fingerprint=fingerprint)
    garbage = {
        "missing-keys": {"id": "abc", "pv": str(PROTOCOL_VERSION)},
        "non-numeric": {**encode_txt(good, 1), "rt": "lots"},
        "negative": {**encode_txt(good, 1), "om": "-5"},
        "non-utf8": b"\x06\xff\xfe=\x80\x81\x82",
        "bad-length": b"\x09id=ab",
        "huge": {f"k{index}": "x" * 200 for index in range(8)},
        "printer": {"rp": "queue", "ty": "Some Printer"},
        "empty": {},
    }
    raw = Zeroconf(interfaces=["127.0.0.1"])
    try:
        for name, properties in garbage.items():
            register_raw(raw, name + SUFFIX, properties)
        node = start_node("valid" + SUFFIX)
        wait_until(lambda: browser.peer(node.name), 10, message="the valid node")
        wait_until(lambda: {name + SUFFIX for name in garbage} <= browser.ignored(), 10,
                   message="every garbage service to be rejected")
        seen = {peer.name for peer in browser.directory.peers()} | {peer.name for peer in node.peers()}
        assert node.name in seen and not seen & {name + SUFFIX for name in garbage}
    finally:
        raw.close()


@pytest.mark.parametrize("key, value", [("dn", "GPU\nINFO fake log line"), ("ac", "cpu\x1b[31m"),
                                        ("v", "1" * 33), ("dn", "x" * 97)])
def test_peer_from_txt_rejects_unprintable_or_long_text(key, value):
    properties = {**encode_txt(fake_peer(), 1), key: value}
    with pytest.raises(ValueError, match="printable"):
        peer_from_txt("fake", properties, ["127.0.0.1"], 5999, "0" * 16)


def test_peer_from_txt_rejects_unprintable_instance_name():
    with pytest.raises(ValueError, match="printable"):
        peer_from_txt("evil\rname", encode_txt(fake_peer(), 1), ["127.0.0.1"], 5999, "0" * 16)


def test_announcement_with_newline_in_device_name_is_ignored(browser, fingerprint):
    raw = Zeroconf(interfaces=["127.0.0.1"])
    try:
        forged, honest = "forged" + SUFFIX, "honest" + SUFFIX
        register_raw(raw, forged, {**encode_txt(fake_peer(node_id="c" * 32, cluster_fingerprint=fingerprint), 1),
                                   "dn": "GPU\n12:00:00 INFO cakep2p.serve: peer joined: 'mallory'"})
        register_raw(raw, honest, encode_txt(fake_peer(node_id="d" * 32, cluster_fingerprint=fingerprint), 1))
        wait_until(lambda: forged in browser.ignored() and browser.peer(honest), 10,
                   message="the forged service rejected and the honest one listed")
        assert browser.peer(forged) is None
    finally:
        raw.close()


def test_other_cluster_and_other_protocol_are_listed_but_never_usable(browser, fingerprint):
    raw = Zeroconf(interfaces=["127.0.0.1"])
    try:
        foreign, future_name = "foreign" + SUFFIX, "future" + SUFFIX
        register_raw(raw, foreign, encode_txt(fake_peer(node_id="a" * 32, cluster_fingerprint="beef"), 1))
        future = {**encode_txt(fake_peer(node_id="b" * 32, cluster_fingerprint=fingerprint), 1), "pv": "99"}
        register_raw(raw, future_name, {key: value for key, value in future.items() if key not in ("rt", "gf")})
        wait_until(lambda: browser.peer(foreign) and browser.peer(future_name), 10, message="both services")
        assert browser.peer(foreign).status == "other_cluster"
        assert browser.peer(future_name).status == "incompatible"
        assert not {foreign, future_name} & {peer.name for peer in browser.directory.usable()}
    finally:
        raw.close()


def test_node_with_two_interface_addresses_answers_on_both(tmp_path, monkeypatch, code):
    import zmq.asyncio

    from cakep2p import node as node_module
    from cakep2p.mesh import ping

    # 127.0.0.2 answers on Linux's lo (all of 127/8 is local) but is not a listed address, and adding one to the
    # shared loopback would change every other test's view of the interfaces: take the pair as given.
    monkeypatch.setattr(node_module, "resolve_interfaces", lambda interfaces: interfaces)
    node = start_in_process(tmp_path / "two-addresses", monkeypatch, code, name="pair" + SUFFIX,
                            interfaces=["127.0.0.1", "127.0.0.2"], discovery=False)
    context = zmq.asyncio.Context()
    try:
        for address in ("127.0.0.1", "127.0.0.2"):
            pong = node.call(ping(context, address, node.port, node.keys, 5.0), 10)
            assert pong is not None and pong.node_id == node.node_id, address
    finally:
        node.stop()
        context.destroy(linger=0)


@pytest.mark.slow
def test_nodes_sharing_a_name_get_distinct_instance_names(start_node, browser):
    twin = "twin" + SUFFIX
    first = start_node(twin)
    second = start_node(twin)
    assert {first.name, second.name} == {twin, twin + "-2"}
    wait_until(lambda: browser.peer(twin) and browser.peer(twin + "-2"), 10, message="both twins")


# ---- last: these end fleet processes ------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_sends_goodbye_and_peer_disappears(fleet, browser):
    gamma = fleet["gamma"]
    wait_until(lambda: browser.peer(gamma.name), 10, message="gamma to appear")
    gamma.stop(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: browser.peer(gamma.name) is None, 5, message="gamma's goodbye")
    print(f"SIGTERM -> removed in {time.monotonic() - signalled:.2f} s")
    assert gamma.process.wait(10) == 0
    wait_until(lambda: f"peer left: '{gamma.name}'" in fleet["alpha"].log(), 5, message="alpha to log gamma leaving")


@pytest.mark.slow
def test_sigkill_peer_is_kept_while_alive_then_dropped_after_ttl(fleet, browser):
    beta, alpha = fleet["beta"], fleet["alpha"]
    wait_until(lambda: browser.peer(beta.name), 10, message="beta to appear")
    assert alpha.joined(beta.name), "alpha never saw beta"
    wait_until(lambda: time.monotonic() - FLEET_STARTED[0] > 3 * BETA_TTL_S, 15, message="three TTLs of observation")
    assert f"peer left: '{beta.name}'" not in alpha.log(), "a live peer with a short TTL was dropped: refresh failed"
    beta.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: browser.peer(beta.name) is None, 10 + BETA_TTL_S, message="beta's records to expire")
    print(f"SIGKILL -> removed in {time.monotonic() - killed:.2f} s (TTL {BETA_TTL_S} s)")
    wait_until(lambda: f"peer left: '{beta.name}'" in alpha.log(), 10, message="alpha to drop beta")
