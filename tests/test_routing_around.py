"""Planning that routes around trouble, end to end on 127.0.0.1: a stage that refuses for want of room is planned
around with the same output, a dead static peer hides no live one, and spoofed announcements (the real cluster
fingerprint in TXT, no key) neither fail nor slow a run, nor make a member rotate its identity."""

import asyncio
import os
import secrets
import time

import pytest
import torch
from zeroconf import ServiceInfo, Zeroconf

from cakep2p import PROTOCOL_VERSION, security
from cakep2p.discovery import SERVICE_TYPE
from cakep2p.discovery.records import PeerInfo, encode_txt
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.mesh import StageClient
from cakep2p.mesh.lease import Lease
from cakep2p.mesh.transfer import PartOffer, load_part
from cakep2p.planner import LayerRange
from tests.kit import Browser, StageProcess, free_port, loopback_multicast_on, reference_greedy, wait_until
from tests.kit.cluster import remote_names, run_generate, serve_nodes

SUFFIX = f"-{os.getpid()}"
TRIO = [f"able{SUFFIX}", f"baker{SUFFIX}", f"cable{SUFFIX}"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(stories_dir) -> dict:
    return reference_greedy(stories_dir, "Once upon a time")


def fill(port: int, keys, stories_dir, lease: Lease, below: int) -> StageClient:
    """Take a node's memory as another member would: parts of stories260K in other weight formats (other content,
    so nobody else shares them) and sessions on them, under a kept lease, until less than `below` bytes are free."""
    client = StageClient("127.0.0.1", port, keys, heartbeat_s=0.5, lease=lease)
    lease.keep(client)
    checkpoint = Checkpoint.open(stories_dir)
    big = [(LayerRange(number % 5, 5, False, True), weights, 512)
           for number, weights in enumerate(["f16", "bf16", "int8", "int4"] * 2)]
    small = [(LayerRange(layer, layer + 1, False, False), weights, 64)    # for what is left: a CPU without bf16
             for weights in ["int4", "int8", "f16", "bf16"] for layer in range(5)]   # keeps f32 caches, larger
    for number, (layers, weights, max_seq_len) in enumerate(big + small):
        offer = PartOffer.of(checkpoint, layers, weights)
        if client.ping().free_budget < below:
            break
        try:
            load_part(client, offer, max_seq_len=max_seq_len)
            for session in range(3):
                if client.ping().free_budget >= below:
                    client.forward(f"fill-{number}-{session}", offer.ref, 0, 0, torch.ones(1, 64))
        except Exception:  # noqa: BLE001  (full already: that is the point)
            pass
    assert client.ping().free_budget < below
    return client


def test_a_stage_refusing_for_want_of_room_is_planned_around_with_the_same_output(stories_dir, tmp_path, code,
                                                                                   reference):
    loopback_multicast_on()
    keys = security.derive_keys(code)
    with serve_nodes(tmp_path, code, TRIO) as nodes:
        lease = Lease(keep_alive_s=0.5)
        filler = fill(nodes[2].port, keys, stories_dir, lease, below=100_000)
        try:
            result, stderr = run_generate(tmp_path / "initiator", code, stories_dir)
        finally:
            filler.close()
            lease.close()
    assert result["tokens"] == reference["new_token_ids"]
    assert remote_names(result) == set(TRIO[:2])
    assert f"peer {TRIO[2]} refused (no memory to spare); continuing on" in stderr


def test_a_dead_static_peer_does_not_hide_a_live_one(stories_dir, tmp_path, reference):
    other_code = security.new_code()
    dead = free_port()   # nothing listens there: its pings never come back
    with serve_nodes(tmp_path, other_code, [f"live{SUFFIX}"], args=("--no-discovery", "--max-memory", "8MiB"),
                     see_each_other=False) as [live]:
        result, _ = run_generate(tmp_path / "initiator", other_code, stories_dir, "--wait", "2",
                                 "--peers", f"127.0.0.1:{dead},127.0.0.1:{live.port}")
    assert result["tokens"] == reference["new_token_ids"]
    assert remote_names(result) == {live.name}


def spoof(zeroconf: Zeroconf, name: str, peer: PeerInfo) -> None:
    """Announce `peer` as a stranger would: the cluster fingerprint copied from the LAN, no key."""
    info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=peer.port, properties=encode_txt(peer, 1),
                       server=f"spoof-{name}.local.", parsed_addresses=["127.0.0.1"])
    asyncio.run_coroutine_threadsafe(zeroconf.async_register_service(info, cooperating_responders=True),
                                     zeroconf.loop).result(5)


def test_spoofed_announcements_neither_fail_nor_slow_a_run_nor_rotate_an_identity(stories_dir, tmp_path, code,
                                                                                   reference):
    loopback_multicast_on()
    fingerprint = security.derive_keys(code).fingerprint
    with serve_nodes(tmp_path, code, TRIO) as nodes, \
            StageProcess(tmp_path / "stranger", security.new_code()) as stranger:
        member_id = (nodes[0].home / "config" / "node_id").read_text().strip()
        started = time.monotonic()
        clean, _ = run_generate(tmp_path / "clean", code, stories_dir)
        clean_s = time.monotonic() - started
        raw = Zeroconf(interfaces=["127.0.0.1"])
        try:
            for index in range(12):   # sorting before every real name, offering a terabyte each
                port = stranger.port if index % 2 else free_port()   # a node of another cluster, or nobody
                node_id = member_id if index == 0 else secrets.token_hex(16)
                spoof(raw, f"aaa-spoof-{index}{SUFFIX}", PeerInfo(
                    name=f"aaa-spoof-{index}", node_id=node_id, address="127.0.0.1", port=port, version="0.1.0",
                    protocol_version=PROTOCOL_VERSION, cluster_fingerprint=fingerprint, accelerator="cuda",
                    device_name="spoof", ram_total=1 << 40, ram_available=1 << 40, vram_total=1 << 40,
                    vram_free=1 << 40, offered_memory=1 << 40, gflops=1e6, bandwidth=1e12, serving=True))
            with Browser(fingerprint) as browser:   # a listener that believes anything: the spoofs are out there
                wait_until(lambda: sum(peer.name.startswith("aaa-spoof-") for peer in browser.directory.peers()) == 12,
                           15, message="the 12 spoofed announcements on the network")
            started = time.monotonic()
            spoofed, stderr = run_generate(tmp_path / "spoofed", code, stories_dir)
            spoofed_s = time.monotonic() - started
        finally:
            raw.close()
        print(f"generate: {clean_s:.1f} s clean, {spoofed_s:.1f} s beside 12 spoofed announcements")
        assert spoofed["tokens"] == clean["tokens"] == reference["new_token_ids"]
        assert remote_names(spoofed) == set(TRIO) and "lost" not in stderr
        assert (nodes[0].home / "config" / "node_id").read_text().strip() == member_id
        assert not any("shares our node id" in node.log() for node in nodes)
