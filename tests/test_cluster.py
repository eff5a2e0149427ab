"""The cluster end to end: `cakep2p --serve` processes on 127.0.0.1, `cakep2p generate` planning over them, weights
sent to nodes that lack them, a stage SIGKILLed mid-generation, concurrent sessions, static peers, serving off."""

import contextlib
import json
import os
import signal
import subprocess
import threading

import pytest

from cakep2p import cli, cluster, security
from cakep2p import node as node_module
from cakep2p.engine.generate import generate
from cakep2p.planner import LayerRange
from cakep2p.engine.sampling import SamplingParams
from cakep2p.errors import MeshError, PlanError
from cakep2p.cluster import LocalModel
from cakep2p.mesh import StageClient, StageRefused
from cakep2p.testing import cached_random_model
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.mesh.transfer import PartOffer
from cakep2p.mesh.transfer import load_part as load_part_over
from cakep2p.cluster import ModelOptions
from tests.kit import ChildProcess, loopback_multicast_on, reference_greedy, seed_benchmark, start_node, wait_until
from tests.kit.cluster import (INITIATOR_MEMORY, generate_command, greedy_tokens, initiator_env, local_tokens,
                               remote_names, run_generate, serve_nodes)

SUFFIX = f"-{os.getpid()}"
TRIO = [f"alpha{SUFFIX}", f"bravo{SUFFIX}", f"charlie{SUFFIX}"]




@pytest.fixture(scope="module")
def trio(tmp_path_factory, code):
    loopback_multicast_on()
    with serve_nodes(tmp_path_factory.mktemp("trio"), code, TRIO) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def reference(stories_dir) -> dict:
    return reference_greedy(stories_dir, "Once upon a time")


@pytest.fixture(scope="module")
def first_run(trio, code, stories_dir, tmp_path_factory) -> tuple[dict, str]:
    """The first stories260K generation over the trio (the nodes have no copy of the model yet)."""
    return run_generate(tmp_path_factory.mktemp("initiator"), code, stories_dir)


@pytest.mark.slow
def test_generate_over_three_serve_nodes_gives_the_reference_tokens(first_run, reference):
    result, _ = first_run
    assert result["tokens"] == reference["new_token_ids"]
    assert remote_names(result) == set(TRIO)


@pytest.fixture(scope="module")
def initiator(trio, code, tmp_path_factory):
    """An in-process initiator Node (not serving) that sees the trio."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        node = start_node(tmp_path_factory.mktemp("in-process"), monkeypatch, code, serving=False,
                          max_memory=INITIATOR_MEMORY)
    try:
        wait_until(lambda: {peer.name for peer in node.directory.usable()} >= set(TRIO), 15, message="the trio")
        yield node
    finally:
        node.stop()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.slow
def test_random_model_of_each_family_over_three_nodes_gives_the_local_tokens(family, first_run, initiator):
    path = cached_random_model(family, "tiny")
    model = cluster.open_model(path, ModelOptions(wait_s=2), node=initiator)
    try:
        assert greedy_tokens(model) == local_tokens(path)
        assert {stage.name for stage in model.plan.stages if stage.layers.num_layers} == set(TRIO)
    finally:
        model.close()


@pytest.mark.slow
def test_nodes_without_the_model_receive_its_tensors_and_a_second_run_sends_nothing(first_run, trio, code,
                                                                                   stories_dir, tmp_path):
    result, stderr = first_run
    remote_sources = [stage["source"] for stage in result["stages"] if stage["address"]]
    assert remote_sources == ["transfer"] * 3 and stderr.count("of weights to") == 3
    assert all(list((node.home / "cache" / "parts").glob("*.safetensors")) for node in trio)
    again, stderr = run_generate(tmp_path / "initiator", code, stories_dir)
    assert {stage["source"] for stage in again["stages"] if stage["address"]} <= {"cache", "memory"}
    assert "of weights to" not in stderr and again["tokens"] == result["tokens"]


@pytest.mark.slow
def test_two_concurrent_sessions_through_the_same_stages_equal_each_alone(first_run, initiator, stories_dir,
                                                                        no_leaked_threads):
    prompts = [[1, 403, 407, 261, 378], [1, 365, 289, 401]]
    params = SamplingParams(max_new_tokens=24)
    whole = LocalModel(Checkpoint.open(stories_dir), ModelOptions(device="cpu", context=64))
    expected = []
    for prompt in prompts:
        pipeline = whole.new_pipeline()
        expected.append(list(generate(pipeline, prompt, params)))
        pipeline.close()
    model = cluster.open_model(stories_dir, ModelOptions(context=64, wait_s=2), node=initiator)
    try:
        assert isinstance(model, cluster.ClusterModel)
        results: dict[int, list[int]] = {}
        barrier = threading.Barrier(2)

        def run(index: int) -> None:
            pipeline = model.new_pipeline()
            try:
                barrier.wait(30)
                results[index] = list(generate(pipeline, prompts[index], params))
            finally:
                pipeline.close()

        threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [results.get(0), results.get(1)] == expected
    finally:
        model.close()


@pytest.mark.slow
def test_sigkilled_stage_mid_generation_is_replaced_and_the_text_is_unchanged(first_run, trio, code, stories_dir,
                                                                            reference, tmp_path):
    """Kills one of the trio: keep it the LAST test in this file that uses the trio."""
    victim = trio[1]
    with ChildProcess(generate_command(stories_dir), env=initiator_env(tmp_path / "initiator", code),
                      role="cakep2p generate", stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0) as child:
        process = child.process
        first = os.read(process.stdout.fileno(), 4096)  # the first streamed text: generation has begun
        still_generating = process.poll() is None
        os.kill(victim.pid, signal.SIGKILL)
        rest, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert still_generating and first
    assert (first + rest).decode() == reference["text"] + "\n"
    assert f"peer {victim.name} lost; continuing on" in stderr.decode()


@pytest.mark.slow
def test_static_peer_with_discovery_off_is_used_by_generate(stories_dir, reference, tmp_path):
    loopback_multicast_on()
    other_code = security.new_code()
    with serve_nodes(tmp_path, other_code, [f"static{SUFFIX}"], args=("--no-discovery", "--max-memory", "8MiB"),
                     see_each_other=False) as [static]:
        result, _ = run_generate(tmp_path / "initiator", other_code, stories_dir, "--peers", f"127.0.0.1:{static.port}")
    assert result["tokens"] == reference["new_token_ids"]
    assert remote_names(result) == {static.name}


@pytest.mark.slow
def test_plan_command_puts_layers_on_a_static_peer_with_discovery_off(stories_dir, tmp_path, monkeypatch, capsys,
                                                                      no_leaked_threads):
    shared_code = security.new_code()
    lender = start_node(tmp_path / "lender", monkeypatch, shared_code, name=f"planned{SUFFIX}", max_memory="8MiB",
                        discovery=False)
    try:
        seed_benchmark(tmp_path / "planner")
        monkeypatch.setenv("CAKEP2P_HOME", str(tmp_path / "planner"))
        assert cli.main(["plan", "--model", str(stories_dir), "--json", "--interface", "127.0.0.1", "--wait", "5",
                         "--cluster", shared_code, "--max-memory", INITIATOR_MEMORY,
                         "--peers", f"127.0.0.1:{lender.port}"]) == 0
    finally:
        lender.stop()
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [(stage["name"], stage["start"], stage["end"]) for stage in stages][-1] == (lender.name, 0, 5)


def test_static_peer_is_listed_from_its_pong_and_dropped_when_it_stops_answering(tmp_path, monkeypatch,
                                                                                 no_leaked_threads):
    monkeypatch.setattr(node_module, "STATIC_PEER_REFRESH_S", 0.2)
    monkeypatch.setattr(node_module, "STATIC_PEER_TIMEOUT_S", 0.5)
    shared_code = security.new_code()
    lender = start_node(tmp_path / "lender", monkeypatch, shared_code, name=f"pinged{SUFFIX}", max_memory="8MiB",
                        discovery=False)
    asker = start_node(tmp_path / "asker", monkeypatch, shared_code, discovery=False, serving=False,
                       max_memory=INITIATOR_MEMORY, static_peers=[("127.0.0.1", lender.port)])
    try:
        peer = wait_until(lambda: asker.directory.get(lender.node_id), 10, message="the static peer")
        assert (peer.name, peer.port, peer.serving, peer.offered_memory) == (lender.name, lender.port, True, 8 << 20)
        assert 0 < asker.rtt_s(lender.node_id) < 0.5  # timed on the connection after the CURVE handshake
        lender.stop()
        wait_until(lambda: asker.directory.get(lender.node_id) is None, 10, message="the static peer to be dropped")
    finally:
        asker.stop()
        lender.stop()


@pytest.mark.slow
def test_node_with_serving_off_refuses_new_work_and_is_not_planned(stories_dir, tmp_path, monkeypatch,
                                                                  no_leaked_threads):
    loopback_multicast_on()
    other_code = security.new_code()
    lender = start_node(tmp_path / "lender", monkeypatch, other_code, name=f"lender{SUFFIX}", max_memory="8MiB")
    initiator = start_node(tmp_path / "initiator", monkeypatch, other_code, serving=False, max_memory=INITIATOR_MEMORY)
    client = StageClient("127.0.0.1", lender.port, lender.keys)
    try:
        wait_until(lambda: lender.node_id in {peer.node_id for peer in initiator.directory.usable()}, 15,
                   message="the initiator to see the lender")
        lender.set_serving(False).result(10)
        wait_until(lambda: lender.node_id not in {peer.node_id for peer in initiator.directory.usable()}, 15,
                   message="the initiator to see the lender stop serving")
        with pytest.raises(PlanError):
            cluster.open_model(stories_dir, ModelOptions(context=64), node=initiator)
        with pytest.raises(StageRefused, match="serving off"):
            load_part_over(client, PartOffer.of(Checkpoint.open(stories_dir), LayerRange(0, 2, False, False), "f32"),
                           max_seq_len=64)
        assert client.ping().max_sessions == 0
    finally:
        client.close()
        initiator.stop()
        lender.stop()


@pytest.mark.slow
def test_new_cluster_code_restarts_the_mesh_with_the_new_keys(tmp_path, monkeypatch, no_leaked_threads):
    loopback_multicast_on()
    old_code, new_code = security.new_code(), security.new_code()
    node = start_node(tmp_path / "node", monkeypatch, old_code, max_memory="8MiB")
    try:
        node.set_cluster_code(new_code).result(30)
        assert node.fingerprint == security.derive_keys(new_code).fingerprint
        with contextlib.closing(StageClient("127.0.0.1", node.port, security.derive_keys(new_code))) as member:
            assert member.ping(10).node_id == node.node_id
        with contextlib.closing(StageClient("127.0.0.1", node.port, security.derive_keys(old_code),
                                            heartbeat_s=0.2)) as stranger:
            with pytest.raises(MeshError):
                stranger.ping(2)
    finally:
        node.stop()
