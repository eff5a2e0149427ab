"""Capacity probe, offered memory, the cached speed benchmark, node identity and the mesh port choice."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import psutil
import pytest

from cakep2p import paths
from cakep2p.discovery import capacity, identity
from cakep2p.discovery.capacity import Capacity, offered_memory
from cakep2p.errors import CakeError
from cakep2p.network import DEFAULT_PORT, choose_port, port_is_free, resolve_interfaces

GiB = 1 << 30


def cpu_capacity(**changes) -> Capacity:
    values = dict(ram_total=16 * GiB, ram_available=10 * GiB, accelerator="cpu", device_name="test CPU",
                  vram_total=0, vram_free=0, cpu_cores=4, gflops=10.0, bandwidth=1e10, os="Linux")
    values.update(changes)
    return Capacity(**values)


def test_probe_reports_this_machines_memory_and_cores(node_home):
    cap = capacity.probe(run_benchmark=False)
    assert cap.ram_total == psutil.virtual_memory().total
    assert 0 < cap.ram_available <= cap.ram_total
    assert cap.accelerator in ("cuda", "mps", "cpu") and cap.device_name
    assert cap.cpu_cores >= 1 and cap.os
    assert (cap.vram_total > 0) == (cap.accelerator != "cpu")


def test_benchmark_measures_positive_rates():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    gflops, bandwidth = capacity.run_benchmark("cpu", budget_s=0.05)
    assert gflops > 0 and bandwidth > 0


def test_benchmark_is_cached_per_machine(node_home, monkeypatch):
    calls = []
    monkeypatch.setattr(capacity, "run_benchmark", lambda accelerator: calls.append(accelerator) or (42.0, 7e9))
    first = capacity.probe()
    second = capacity.probe()
    assert (first.gflops, first.bandwidth) == (second.gflops, second.bandwidth) == (42.0, 7e9)
    assert len(calls) == 1
    stored = json.loads(capacity.benchmark_cache_path().read_text())
    assert list(stored) == [capacity.benchmark_key(first.accelerator, first.device_name)]


def test_corrupt_benchmark_cache_is_measured_again(node_home, monkeypatch):
    capacity.benchmark_cache_path().write_text("{not json")
    monkeypatch.setattr(capacity, "run_benchmark", lambda accelerator: (3.0, 4.0))
    assert capacity.probe().gflops == 3.0


def test_cpu_offer_keeps_a_safety_margin():
    assert offered_memory(cpu_capacity(), None) == 10 * GiB - int(16 * GiB * 0.10)
    small = cpu_capacity(ram_total=4 * GiB, ram_available=3 * GiB)
    assert offered_memory(small, None) == 2 * GiB            # the 1 GiB minimum margin


def test_offer_is_capped_by_max_memory():
    assert offered_memory(cpu_capacity(), 512 << 20) == 512 << 20


def test_offer_is_never_negative():
    assert offered_memory(cpu_capacity(ram_available=100 << 20), None) == 0


def test_gpu_offer_uses_free_vram():
    gpu = cpu_capacity(accelerator="cuda", vram_total=24 * GiB, vram_free=20 * GiB)
    assert offered_memory(gpu, None) == 20 * GiB - int(24 * GiB * 0.05)
    assert offered_memory(replace(gpu, vram_free=0), None) == 0


def test_node_id_is_made_once_and_kept(node_home):
    first = identity.node_id()
    assert len(first) == 32 and identity.node_id() == first
    assert (node_home / "config" / "node_id").read_text().strip() == first


def test_regenerated_node_id_replaces_the_stored_one(node_home):
    old = identity.node_id()
    new = identity.regenerate_node_id()
    assert new != old and identity.node_id() == new


def test_separate_homes_have_separate_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert identity.node_id(tmp_path / "a") != identity.node_id(tmp_path / "b")


def test_corrupt_node_id_file_is_replaced(node_home):
    (paths.config_dir() / "node_id").write_text("not an id\n")
    assert len(identity.node_id()) == 32


def test_node_names_lose_dots_and_stay_short():
    assert identity.clean_node_name("my.host.lan") == "my-host-lan"
    assert len(identity.clean_node_name("x" * 200).encode()) == identity.MAX_NAME_LENGTH
    assert identity.default_node_name()


def test_choose_port_prefers_the_default_and_skips_taken_ports():
    port = choose_port(None, "127.0.0.1")
    assert DEFAULT_PORT <= port < DEFAULT_PORT + 100 and port_is_free(port, "127.0.0.1")


def test_choose_port_refuses_a_requested_port_in_use():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(CakeError, match="already in use"):
            choose_port(listener.getsockname()[1], "127.0.0.1")


def test_interface_names_resolve_to_their_addresses():
    assert resolve_interfaces(["lo"]) == ["127.0.0.1"]
    assert resolve_interfaces(["127.0.0.1", "lo"]) == ["127.0.0.1"]



def test_without_interfaces_the_environment_default_applies_else_all(monkeypatch):
    monkeypatch.setenv("CAKEP2P_INTERFACE", "lo")
    assert resolve_interfaces(None) == ["127.0.0.1"]
    monkeypatch.delenv("CAKEP2P_INTERFACE")
    assert resolve_interfaces(None) is None


def test_unknown_interface_is_refused_with_the_choices():
    with pytest.raises(CakeError, match="no network interface here has the address or name '10.254.254.254'"):
        resolve_interfaces(["10.254.254.254"])
