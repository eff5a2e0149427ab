"""The mesh on real loopback sockets: stage servers with real parts, RemotePipeline, transfers, limits, liveness."""

import contextlib
import logging
import os
import random
import signal
import threading
import weakref

import msgpack
import pytest
import torch
import zmq
from safetensors.torch import load_file

from cakep2p import security, wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.generate import LocalPipeline, generate
from cakep2p.engine.loading import load_part, whole_model
from cakep2p.engine.model import ModelPart
from cakep2p.engine.sampling import SamplingParams
from cakep2p.engine.sizes import kv_cache_bytes, weight_bytes
from cakep2p.errors import MeshError, ProtocolError
from cakep2p.mesh import (RemotePipeline, RemoteStage, ServerThread, StageClient, StageLimits, StageRefused,
                          StageServer, part_ref, stages_for_plan)
from cakep2p.mesh import curve
from cakep2p.mesh.parts_cache import cached_part_path
from cakep2p.mesh.transfer import PartOffer
from cakep2p.mesh.transfer import load_part as load_part_over
from cakep2p.planner import LayerRange
from tests.kit import StageProcess, wait_until
from tests.kit.sniff import SniffingProxy

PROMPT = [1, 403, 407, 261, 378]  # "Once upon a time"
GREEDY = SamplingParams(max_new_tokens=24)
SEQ = 64
THREE_WAY = [LayerRange(0, 2, True, False), LayerRange(2, 4, False, False), LayerRange(4, 5, False, True)]
TWO_WAY = [LayerRange(0, 3, True, False), LayerRange(3, 5, False, True)]

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


@pytest.fixture
def start_servers(tmp_path, keys):
    """start_servers(n, **StageServer/limits options) -> [ServerThread]; all are stopped after the test."""
    started: list[ServerThread] = []

    def start(count: int, *, budget: int = 1 << 30, max_sessions: int = 8, session_idle_s: float = 600.0,
              lease_s: float = 6.0, server_keys=keys, parts_dir=None, **options) -> list[ServerThread]:
        threads = []
        for _ in range(count):
            number = len(started)
            limits = StageLimits(budget_bytes=budget, max_sessions=max_sessions, session_idle_s=session_idle_s,
                                 lease_s=lease_s)
            server = StageServer(node_id=f"node-{number}", name=f"stage-{number}", keys=server_keys, limits=limits,
                                 device="cpu", parts_dir=parts_dir or tmp_path / f"parts-{number}", **options)
            thread = ServerThread(server)
            thread.start()
            started.append(thread)
            threads.append(thread)
        return threads

    yield start
    for thread in started:
        thread.stop()


def offer(model_dir, layers: LayerRange, weights: str = "f32") -> PartOffer:
    """What the initiator offers a stage: these layers of the model, in float32 unless said otherwise."""
    return PartOffer.of(Checkpoint.open(model_dir), layers, weights)


def remote_stages(servers, specs) -> list[RemoteStage]:
    return [RemoteStage("127.0.0.1", server.server.port, spec, f"stage-{index}")
            for index, (server, spec) in enumerate(zip(servers, specs))]


def local_tokens(model_dir, prompt=PROMPT, params=GREEDY) -> list[int]:
    checkpoint = Checkpoint.open(model_dir)
    part = load_part(checkpoint, whole_model(checkpoint.args), dtype="float32", device="cpu")
    pipeline = LocalPipeline([part], len(prompt) + params.max_new_tokens)
    return list(generate(pipeline, prompt, params))


def remote_pipeline(stages, model_dir, keys, max_seq_len=SEQ, **options) -> RemotePipeline:
    options.setdefault("heartbeat_s", 0.2)
    return RemotePipeline(stages, Checkpoint.open(model_dir), max_seq_len, keys, weights="f32", dtype="float32",
                          **options)


# -- token identity -----------------------------------------------------------------------------------------


def test_three_remote_stages_give_the_local_tokens(stories_dir, start_servers, keys):
    servers = start_servers(3)
    pipeline = remote_pipeline(remote_stages(servers, THREE_WAY), stories_dir, keys)
    try:
        assert list(generate(pipeline, PROMPT, GREEDY)) == local_tokens(stories_dir)
    finally:
        pipeline.close()


def test_local_stage_zero_and_a_remote_stage_give_the_local_tokens(stories_dir, start_servers, keys):
    [server] = start_servers(1)
    local_part = load_part(Checkpoint.open(stories_dir), TWO_WAY[0], dtype="float32", device="cpu")
    stages = [local_part, *remote_stages([server], TWO_WAY[1:])]
    pipeline = remote_pipeline(stages, stories_dir, keys)
    try:
        assert list(generate(pipeline, PROMPT, GREEDY)) == local_tokens(stories_dir)
        assert pipeline.load_sources == ["local", "transfer"]
    finally:
        pipeline.close()


def three_node_plan(stories_dir):
    from cakep2p import planner
    from cakep2p.engine.sizes import model_spec

    nodes = [planner.NodeBudget(f"node-{index}", f"stage-{index}", 1 << 30) for index in range(3)]
    return planner.plan(model_spec(Checkpoint.open(stories_dir), "float32"), nodes, "node-0", SEQ)


def test_plan_with_the_initiator_in_process_runs_as_a_ring_and_gives_the_local_tokens(stories_dir, start_servers,
                                                                                      keys):
    plan = three_node_plan(stories_dir)
    assert [stage.layers.num_layers > 0 for stage in plan.stages] == [True, True, True]
    servers = start_servers(3)
    endpoints = {f"node-{index}": ("127.0.0.1", server.server.port) for index, server in enumerate(servers)}
    stages = stages_for_plan(plan, endpoints, "node-0",
                             lambda spec: load_part(Checkpoint.open(stories_dir), spec, dtype="float32", device="cpu"))
    assert [type(stage).__name__ for stage in stages] == ["ModelPart", "RemoteStage", "RemoteStage", "ModelPart"]
    pipeline = remote_pipeline(stages, stories_dir, keys)
    try:
        assert list(generate(pipeline, PROMPT, GREEDY)) == local_tokens(stories_dir)
    finally:
        pipeline.close()


def test_plan_on_remote_nodes_only_gives_the_local_tokens(stories_dir, start_servers, keys):
    servers = start_servers(3)
    endpoints = {f"node-{index}": ("127.0.0.1", server.server.port) for index, server in enumerate(servers)}
    stages = stages_for_plan(three_node_plan(stories_dir), endpoints)
    assert stages[-1].layers == LayerRange(5, 5, False, True) and stages[-1].port == servers[0].server.port
    pipeline = remote_pipeline(stages, stories_dir, keys)
    try:
        assert list(generate(pipeline, PROMPT, GREEDY)) == local_tokens(stories_dir)
    finally:
        pipeline.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_random_model_of_each_family_over_two_stages_gives_the_local_tokens(family, start_servers, keys):
    from cakep2p.testing import cached_random_model

    model_dir = cached_random_model(family, "tiny")
    servers = start_servers(2)
    specs = [LayerRange(0, 2, True, False), LayerRange(2, 4, False, True)]
    pipeline = remote_pipeline(remote_stages(servers, specs), model_dir, keys)
    try:
        assert list(generate(pipeline, [1, 5, 9, 13], GREEDY)) == local_tokens(model_dir, [1, 5, 9, 13])
    finally:
        pipeline.close()


def test_sharded_checkpoint_is_sent_and_gives_the_local_tokens(start_servers, keys, tmp_path):
    from cakep2p.testing import make_random_model

    model_dir = make_random_model(tmp_path / "sharded", "qwen2", shards=3, seed=3)
    servers = start_servers(2)
    specs = [LayerRange(0, 1, True, False), LayerRange(1, 4, False, True)]
    pipeline = remote_pipeline(remote_stages(servers, specs), model_dir, keys)
    try:
        assert pipeline.load_sources == ["transfer", "transfer"]
        assert list(generate(pipeline, [1, 7, 8], GREEDY)) == local_tokens(model_dir, [1, 7, 8])
    finally:
        pipeline.close()


def test_stage_holding_another_dtype_gets_hidden_states_in_its_dtype(stories_dir, start_servers, keys):
    [server] = start_servers(1)
    reply = with_client(server, keys, lambda client: load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ,
                                                                      dtype="bfloat16"))
    assert reply.dtype == "bfloat16"
    front = load_part(Checkpoint.open(stories_dir), TWO_WAY[0], dtype="float32", device="cpu")
    back = load_part(Checkpoint.open(stories_dir), TWO_WAY[1], dtype="bfloat16", device="cpu")
    expected = list(generate(LocalPipeline([front, back], SEQ), PROMPT, GREEDY))
    pipeline = remote_pipeline([front, *remote_stages([server], TWO_WAY[1:])], stories_dir, keys)
    try:
        assert pipeline.load_sources == ["local", "memory"]
        assert list(generate(pipeline, PROMPT, GREEDY)) == expected
    finally:
        pipeline.close()


def test_two_concurrent_sessions_equal_each_alone(stories_dir, start_servers, keys):
    servers = start_servers(2)
    prompts = [PROMPT, [1, 365, 1443 % 512, 289]]
    expected = [local_tokens(stories_dir, prompt) for prompt in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(index: int) -> None:
        try:
            pipeline = remote_pipeline(remote_stages(servers, TWO_WAY), stories_dir, keys)
            barrier.wait(timeout=30)
            try:
                results[index] = list(generate(pipeline, prompts[index], GREEDY))
            finally:
                pipeline.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert [results[0], results[1]] == expected


# -- weights --------------------------------------------------------------------------------------------------


def test_weight_transfer_fills_an_empty_cache_and_the_next_load_sends_nothing(stories_dir, start_servers, keys,
                                                                           tmp_path):
    parts_dir = tmp_path / "receiver-parts"
    [first] = start_servers(1, parts_dir=parts_dir)
    progress: list[tuple[int, int]] = []
    client = StageClient("127.0.0.1", first.server.port, keys)
    try:
        source = load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ, dtype="float32",
                                  on_progress=lambda sent, total: progress.append((sent, total))).source
    finally:
        client.close()
    assert source == "transfer"
    assert progress and progress[-1][0] == progress[-1][1] > 0
    ref = offer(stories_dir, TWO_WAY[1]).ref
    assert cached_part_path(ref, parts_dir).is_file()
    first.stop()

    [second] = start_servers(1, parts_dir=parts_dir)
    progress.clear()
    pipeline = remote_pipeline([load_part(Checkpoint.open(stories_dir), TWO_WAY[0], dtype="float32", device="cpu"),
                                *remote_stages([second], TWO_WAY[1:])], stories_dir, keys,
                               on_progress=lambda *args: progress.append(args))
    try:
        assert pipeline.load_sources == ["local", "cache"]
        assert progress == []
        assert list(generate(pipeline, PROMPT, GREEDY)) == local_tokens(stories_dir)
    finally:
        pipeline.close()


def models_dir_with(model_dir, tmp_path):
    """A models dir holding just this model (the shared one may hold GGUFs that take seconds to open)."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / model_dir.name).symlink_to(model_dir)
    return models


def test_stage_with_the_model_in_its_models_dir_loads_from_disk(stories_dir, start_servers, keys, tmp_path):
    servers = start_servers(2, models_dirs=[models_dir_with(stories_dir, tmp_path)])
    pipeline = remote_pipeline(remote_stages(servers, TWO_WAY), stories_dir, keys)
    try:
        assert pipeline.load_sources == ["models_dir", "models_dir"]
        assert list(generate(pipeline, PROMPT, GREEDY)) == local_tokens(stories_dir)
    finally:
        pipeline.close()


def test_corrupted_cached_part_is_transferred_again(stories_dir, start_servers, keys, tmp_path):
    parts_dir = tmp_path / "receiver-parts"
    [first] = start_servers(1, parts_dir=parts_dir)
    with_client(first, keys, lambda client: load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ))
    first.stop()
    path = cached_part_path(offer(stories_dir, TWO_WAY[1]).ref, parts_dir)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    [second] = start_servers(1, parts_dir=parts_dir)
    reply = with_client(second, keys, lambda client: load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ))
    assert reply.source == "transfer"


def test_load_without_a_copy_and_without_transfer_is_refused(stories_dir, start_servers, keys):
    [server] = start_servers(1)
    with pytest.raises(StageRefused) as refused:
        with_client(server, keys, lambda client: load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ,
                                                                  allow_transfer=False))
    assert refused.value.code == "not_found"


def with_client(server: ServerThread, keys, action, **options):
    options.setdefault("heartbeat_s", 0.2)
    client = StageClient("127.0.0.1", server.server.port, keys, **options)
    try:
        return action(client)
    finally:
        client.close()


# -- resource limits ---------------------------------------------------------------------------------------------


def test_sessions_beyond_the_limit_are_refused(stories_dir, start_servers, keys):
    servers = start_servers(2, max_sessions=1)
    first = remote_pipeline(remote_stages(servers, TWO_WAY), stories_dir, keys)
    second = remote_pipeline(remote_stages(servers, TWO_WAY), stories_dir, keys)
    try:
        first.forward(PROMPT, 0)
        with pytest.raises(StageRefused, match="maximum of 1 sessions") as refused:
            second.forward(PROMPT, 0)
        assert refused.value.code == "too_many_sessions"
        first.close()
        assert second.forward(PROMPT, 0).shape == (512,)
    finally:
        first.close()
        second.close()


def test_kv_cache_beyond_the_memory_budget_is_refused(stories_dir, start_servers, keys):
    args = Checkpoint.open(stories_dir).args
    weights = weight_bytes(args, TWO_WAY[1], "f32")
    kv = kv_cache_bytes(args, TWO_WAY[1], torch.float32, SEQ)
    [server] = start_servers(1, budget=weights + kv // 2)  # the weights fit, a KV cache does not
    local_part = load_part(Checkpoint.open(stories_dir), TWO_WAY[0], dtype="float32", device="cpu")
    pipeline = remote_pipeline([local_part, *remote_stages([server], TWO_WAY[1:])], stories_dir, keys)
    try:
        with pytest.raises(StageRefused, match="exceeds") as refused:
            pipeline.forward(PROMPT, 0)
        assert refused.value.code == "over_budget"
    finally:
        pipeline.close()


def test_load_beyond_the_memory_budget_is_refused(stories_dir, start_servers, keys):
    [server] = start_servers(1, budget=100_000)
    with pytest.raises(StageRefused) as refused:
        with_client(server, keys, lambda client: load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ))
    assert refused.value.code == "over_budget"
    assert server.call(server.server.stats)["used_bytes"] == 0


def test_concurrent_loads_that_fit_only_one_at_a_time_do_not_both_pass_the_budget(stories_dir, start_servers, keys,
                                                                                  tmp_path):
    args = Checkpoint.open(stories_dir).args
    sizes = [weight_bytes(args, spec, "f32") for spec in TWO_WAY]
    budget = sum(sizes) - 1
    [server] = start_servers(1, budget=budget, models_dirs=[models_dir_with(stories_dir, tmp_path)])
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def load(spec: LayerRange) -> None:
        def act(client: StageClient) -> None:
            barrier.wait(timeout=30)
            load_part_over(client, offer(stories_dir, spec), max_seq_len=SEQ, dtype="float32", allow_transfer=False)
        try:
            with_client(server, keys, act)
            outcomes.append("loaded")
        except StageRefused as refused:
            outcomes.append(refused.code)

    threads = [threading.Thread(target=load, args=(spec,)) for spec in TWO_WAY]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["loaded", "over_budget"]
    assert server.call(server.server.used_bytes) <= budget


def test_idle_session_expires_and_its_cache_is_freed(stories_dir, start_servers, keys):
    [server] = start_servers(1, session_idle_s=0.3)
    local_part = load_part(Checkpoint.open(stories_dir), TWO_WAY[0], dtype="float32", device="cpu")
    pipeline = remote_pipeline([local_part, *remote_stages([server], TWO_WAY[1:])], stories_dir, keys)
    try:
        pipeline.forward(PROMPT, 0)
        stats = server.call(server.server.stats)
        assert stats["sessions"] == 1 and stats["kv_bytes"] > 0
        cache = server.call(lambda: weakref.ref(next(iter(server.server.sessions)).cache))
        wait_until(lambda: server.call(server.server.stats)["sessions"] == 0, message="the idle session to expire")
        assert server.call(server.server.stats)["kv_bytes"] == 0
        wait_until(lambda: cache() is None, message="the expired session's cache to be freed")
    finally:
        pipeline.close()


def test_rebuild_after_prefix_reuse_replays_only_what_the_caches_hold(stories_dir, start_servers, keys,
                                                                     monkeypatch):
    servers = start_servers(2)
    params = SamplingParams(max_new_tokens=6)
    pipeline = remote_pipeline(remote_stages(servers, TWO_WAY), stories_dir, keys)
    try:
        first_turn = PROMPT + list(generate(pipeline, PROMPT, params))
        second_prompt = first_turn[:7] + [365, 289, 403]  # the second turn reuses 7 cached positions
        second_turn = second_prompt + list(generate(pipeline, second_prompt, params, start_pos=7))
        replayed: list[tuple[int, int]] = []
        run = pipeline._run
        monkeypatch.setattr(pipeline, "_run", lambda ids, start, *rest: replayed.append((start, len(ids)))
                            or run(ids, start, *rest))
        pipeline.rebuild(pipeline.stages)
        monkeypatch.undo()
        assert pipeline.history == second_turn[:-1]
        starts = [start for start, _ in replayed]
        assert starts == sorted(set(starts)) and replayed[-1][0] + replayed[-1][1] == len(pipeline.history)
        continued = list(generate(pipeline, second_turn, params, start_pos=len(pipeline.history)))
    finally:
        pipeline.close()
    assert continued == local_tokens(stories_dir, second_turn, params)


def test_expired_session_is_replayed_and_generation_continues_identically(stories_dir, start_servers, keys):
    [server] = start_servers(1, session_idle_s=0.3)
    local_part = load_part(Checkpoint.open(stories_dir), TWO_WAY[0], dtype="float32", device="cpu")
    pipeline = remote_pipeline([local_part, *remote_stages([server], TWO_WAY[1:])], stories_dir, keys)
    tokens = []
    try:
        for token in generate(pipeline, PROMPT, GREEDY):
            tokens.append(token)
            if len(tokens) == 8:
                wait_until(lambda: server.call(server.server.stats)["sessions"] == 0, message="the session to expire")
        assert tokens == local_tokens(stories_dir)
        assert pipeline.recoveries and "not on this node" in pipeline.recoveries[0]
    finally:
        pipeline.close()


# -- hostile input ---------------------------------------------------------------------------------------------


def test_forward_of_the_wrong_hidden_size_is_refused_and_the_node_keeps_serving(stories_dir, start_servers, keys):
    [server] = start_servers(1)
    ref = offer(stories_dir, TWO_WAY[1]).ref

    def act(client: StageClient):
        load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ, dtype="float32")
        with pytest.raises(ProtocolError, match=r"\[T, 64\]"):
            client.forward("bad", ref, 0, 0, torch.zeros(3, 65))
        client.forward("gap", ref, 0, 0, torch.zeros(3, 64))
        with pytest.raises(ProtocolError, match="start_pos 5 is beyond the 3 positions"):
            client.forward("gap", ref, 1, 5, torch.zeros(1, 64))
        with pytest.raises(StageRefused, match="not on this node") as refused:
            client.forward("never-started", ref, 0, 3, torch.zeros(1, 64))
        assert refused.value.code == "unknown_session"
        return client.forward("good", ref, 0, 0, torch.zeros(3, 64))

    assert with_client(server, keys, act).shape == (1, 512)


def test_forward_reply_of_the_wrong_shape_or_dtype_is_a_protocol_error():
    """A broken or hostile stage answers with tensors nobody asked for; no real server does, so a bare ROUTER does."""
    middle = part_ref("0" * 16, "0" * 64, LayerRange(1, 2, False, False))
    head = part_ref("0" * 16, "0" * 64, LayerRange(2, 2, False, True))
    cases = [(middle, torch.zeros(3, 65)), (middle, torch.zeros(3, 64, dtype=torch.float16)),
             (middle, torch.zeros(2, 64)), (head, torch.zeros(1, 512, dtype=torch.bfloat16)),
             (head, torch.zeros(3, 512)), (middle, torch.zeros(3, 64))]
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer() -> None:
        for _, tensor in cases:
            while True:
                identity, *body = router.recv_multipart()
                request = wire.decode(body)
                if isinstance(request, wire.Forward):
                    break
            router.send_multipart([identity, *wire.encode(wire.ForwardResult(
                request_id=request.request_id, session_id=request.session_id, step=request.step, tensor=tensor))])

    stage = threading.Thread(target=answer, name="cakep2p-test-bad-stage")
    stage.start()
    client = StageClient("127.0.0.1", port, None, heartbeat_s=0.2, context=context)
    try:
        for step, (ref, _) in enumerate(cases[:-1]):
            with pytest.raises(ProtocolError, match="expected"):
                client.forward("s", ref, step, 0, torch.zeros(3, 64), width=512 if ref.has_head else 64,
                               dtype=torch.float32)
        assert client.forward("s", middle, 9, 0, torch.zeros(3, 64), width=64, dtype=torch.float32).shape == (3, 64)
    finally:
        client.close()
        stage.join(timeout=10)
        router.close(linger=0)
        context.term()


def malformed_messages(rng: random.Random, ref: wire.PartRef):
    """Random bytes, wrong ops, wrong shapes, huge declared sizes, unknown parts and sessions."""
    forward = msgpack.unpackb(wire.encode(wire.Forward(session_id="fuzz", part=ref, step=0, start_pos=0, positions=1,
                                                       tensor=torch.zeros(1, 64)))[0])
    while True:
        kind = rng.randrange(6)
        if kind == 0:
            yield [rng.randbytes(rng.randrange(1, 200)) for _ in range(rng.randint(1, 3))]
        elif kind == 1:
            yield [msgpack.packb({**forward, "type": rng.choice(["pong", "forward_result", "nope", "", 3])})]
        elif kind == 2:
            shape = [rng.randint(1, 4), rng.choice([63, 65, 128, 1])]
            yield [msgpack.packb({**forward, "shape": shape, "positions": shape[0]}), bytes(4 * shape[0] * shape[1])]
        elif kind == 3:
            yield [msgpack.packb({**forward, "shape": [2**31, 2**31]}), bytes(256)]
        elif kind == 4:
            yield [msgpack.packb({**forward, "start_pos": rng.randint(1, 10**6)}), bytes(256)]
        else:
            part = {**forward["part"], "start": rng.randint(0, 4000), "end": 4001}
            yield [msgpack.packb({**forward, "part": part}), bytes(256)]


@pytest.mark.slow
def test_live_node_survives_ten_thousand_malformed_frames_and_still_answers(stories_dir, tmp_path, code, keys):
    with StageProcess(tmp_path / "home", code, "--max-frame-bytes", str(4 << 20)) as stage:
        ref = offer(stories_dir, TWO_WAY[1]).ref
        client = StageClient("127.0.0.1", stage.port, keys, heartbeat_s=0.5)
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        oversize = context.socket(zmq.DEALER)
        try:
            load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ, dtype="float32")
            expected = client.forward("before", ref, 0, 0, torch.ones(3, 64))
            for socket in (dealer, oversize):
                socket.linger = 0
                curve.configure_client(socket, keys)
                socket.connect(f"tcp://127.0.0.1:{stage.port}")
            oversize.send(bytes(8 << 20))  # beyond ZMQ_MAXMSGSIZE: the node drops that connection only
            messages = malformed_messages(random.Random(5), ref)
            replies = 0
            rss_after_warmup = 0
            for batch in range(20):
                for _ in range(500):
                    dealer.send_multipart(next(messages))
                while replies < (batch + 1) * 500 and dealer.poll(10_000):
                    reply = wire.decode(dealer.recv_multipart())
                    assert isinstance(reply, wire.Error)
                    replies += 1
                if batch == 1:
                    rss_after_warmup = stage.rss()
            assert replies == 10_000
            assert stage.rss() - rss_after_warmup < 20 * 2**20
            after = client.forward("after", ref, 0, 0, torch.ones(3, 64))
            assert torch.equal(after, expected)
        finally:
            client.close()
            dealer.close(linger=0)
            oversize.close(linger=0)
            context.term()


# -- security ----------------------------------------------------------------------------------------------------


def test_client_with_another_cluster_code_gets_nothing_done(stories_dir, start_servers, caplog):
    refusals: list[str] = []
    [server] = start_servers(1, on_refused=refusals.append)
    stranger = security.derive_keys(security.new_code())
    caplog.set_level(logging.WARNING, logger="cakep2p")
    with pytest.raises(MeshError, match="could not authenticate: wrong or no pairing code"):
        with_client(server, stranger, lambda client: load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ))
    assert refusals
    assert "wrong cluster code" in caplog.text
    assert server.call(server.server.stats)["parts"] == 0


def test_traffic_between_two_nodes_of_a_cluster_is_encrypted(stories_dir, start_servers, keys):
    [server] = start_servers(1)
    local_part = load_part(Checkpoint.open(stories_dir), TWO_WAY[0], dtype="float32", device="cpu")
    hidden = local_part(torch.tensor(PROMPT), 0, local_part.new_cache(SEQ))
    with SniffingProxy(server.server.port) as proxy:
        stage = RemoteStage("127.0.0.1", proxy.port, TWO_WAY[1])
        pipeline = remote_pipeline([local_part, stage], stories_dir, keys)
        try:
            logits = pipeline.forward(PROMPT, 0)
        finally:
            pipeline.close()
        assert len(proxy.to_server) > 500_000  # the weights went through the proxy
        weight = load_file(stories_dir / "model.safetensors")["model.layers.3.mlp.down_proj.weight"]
        needles = [b"forward", b"load_part", b"tensor_chunk", b"stories260K", b"hidden_size",
                   pipeline.session_id.encode(), Checkpoint.open(stories_dir).fingerprint.encode(),
                   hidden[-1].numpy().tobytes()[:16], logits.numpy().tobytes()[:16],
                   weight.numpy().tobytes()[:16]]
        assert proxy.leaks(needles) == []


# -- liveness ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_heartbeat_detects_a_killed_stage_process(tmp_path, code, keys):
    with StageProcess(tmp_path / "home", code) as stage:
        client = StageClient("127.0.0.1", stage.port, keys, heartbeat_s=0.2, timeout_s=3600)
        try:
            assert client.ping().node_id == "subprocess"
            os.kill(stage.process.pid, signal.SIGKILL)
            with pytest.raises(MeshError, match=f"127.0.0.1:{stage.port} lost: silent"):
                client.ping()  # only the heartbeat can end this wait: the request timeout is an hour
            assert client.lost
        finally:
            client.close()


@pytest.mark.slow
def test_heartbeats_keep_a_slow_forward_alive(stories_dir, start_servers, keys, monkeypatch):
    import cakep2p.mesh.compute

    real_run = cakep2p.mesh.compute._run_chunk
    released = threading.Event()

    def slow_run(*args):
        released.wait(timeout=30)  # a compute that outlasts many heartbeat intervals
        return real_run(*args)

    monkeypatch.setattr(cakep2p.mesh.compute, "_run_chunk", slow_run)
    [server] = start_servers(1)
    ref = offer(stories_dir, TWO_WAY[1]).ref

    def act(client: StageClient):
        load_part_over(client, offer(stories_dir, TWO_WAY[1]), max_seq_len=SEQ, dtype="float32")
        timer = threading.Timer(2.0, released.set)  # 10 heartbeat intervals
        timer.start()
        try:
            return client.forward("slow", ref, 0, 0, torch.zeros(2, 64))
        finally:
            timer.cancel()

    assert with_client(server, keys, act, heartbeat_s=0.2).shape == (1, 512)


@pytest.mark.parametrize("lost_index", [1, 2], ids=["middle", "last"])   # (the last: the chain's answering stage)
def test_lost_stage_is_replaced_and_the_generation_continues_identically(stories_dir, start_servers, keys,
                                                                        lost_index):
    servers = start_servers(3)
    survivors = [server for index, server in enumerate(servers) if index != lost_index]
    lost: list[str] = []

    def replan(error, stages):
        lost.append(str(error))
        return remote_stages(survivors, TWO_WAY)

    pipeline = remote_pipeline(remote_stages(servers, THREE_WAY), stories_dir, keys,
                               heartbeat_s=0.25, on_lost=replan)
    tokens = []
    try:
        for token in generate(pipeline, PROMPT, GREEDY):
            tokens.append(token)
            if len(tokens) == 10:
                servers[lost_index].stop()
        assert tokens == local_tokens(stories_dir)
        assert len(lost) == 1 and "lost" in lost[0]
    finally:
        pipeline.close()


@pytest.mark.slow
def test_sigkilled_stage_mid_generation_is_replaced_and_64_tokens_match(stories_dir, tmp_path, code, keys):
    params = SamplingParams(max_new_tokens=64)
    with contextlib.ExitStack() as stack:
        processes = []
        for index in range(3):   # all three start at once; each is killed however the test ends
            processes.append(StageProcess(tmp_path / f"home-{index}", code))
            stack.callback(processes[-1].kill)
        first, middle, last = [process.ready() for process in processes]

        def stages_on(*nodes: StageProcess, specs=THREE_WAY) -> list[RemoteStage]:
            return [RemoteStage("127.0.0.1", node.port, spec) for node, spec in zip(nodes, specs)]

        lost: list[str] = []
        pipeline = remote_pipeline(stages_on(first, middle, last), stories_dir, keys, max_seq_len=80,
                                   heartbeat_s=0.25, on_lost=lambda error, stages: lost.append(str(error))
                                   or stages_on(first, last, specs=TWO_WAY))
        tokens = []
        try:
            for token in generate(pipeline, PROMPT, params):
                tokens.append(token)
                if len(tokens) == 20:
                    os.kill(middle.process.pid, signal.SIGKILL)
            assert tokens == local_tokens(stories_dir, PROMPT, params)
            assert len(lost) == 1 and f":{middle.port} lost" in lost[0]
        finally:
            pipeline.close()
