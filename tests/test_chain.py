"""Chain forwarding on real loopback sockets: stages pass hidden states straight on to the next, the last answers;
the same tokens and logits as the star and as one machine, fewer bytes back to the initiator, grants checked."""

import dataclasses

import pytest
import torch
import zmq

from cakep2p import wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.generate import generate
from cakep2p.engine.sampling import SamplingParams
from cakep2p.mesh import RemoteStage, curve, part_ref
from cakep2p.mesh.chain import chainable, relay_address
from cakep2p.mesh.lease import chain_grant, owner_tag
from cakep2p.planner import LayerRange
from tests.kit.sniff import SniffingProxy
from tests.test_mesh import (GREEDY, PROMPT, THREE_WAY, local_tokens, remote_pipeline, remote_stages,
                             start_servers)  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


def test_chain_and_star_give_the_local_tokens_and_the_chain_sends_no_hidden_state_back(stories_dir, start_servers,
                                                                                        keys):
    servers = start_servers(3)
    bytes_back = {}
    for chain in (True, False):
        with SniffingProxy(servers[0].server.port) as first, SniffingProxy(servers[1].server.port) as middle:
            stages = [RemoteStage("127.0.0.1", port, spec, f"stage-{index}") for index, (port, spec) in
                      enumerate(zip([first.port, middle.port, servers[2].server.port], THREE_WAY))]
            pipeline = remote_pipeline(stages, stories_dir, keys, chain=chain, heartbeat_s=5.0)
            try:
                assert pipeline._runs == ([(0, 2)] if chain else [(0, 0), (1, 1), (2, 2)])
                assert list(generate(pipeline, PROMPT, GREEDY)) == local_tokens(stories_dir)
            finally:
                pipeline.close()
            bytes_back[chain] = len(first.to_client) + len(middle.to_client)
    hidden_states = (len(PROMPT) + GREEDY.max_new_tokens) * 64 * 4 * 2   # float32, hidden size 64, two stages
    assert bytes_back[False] > hidden_states > 2 * bytes_back[True]


def test_every_position_forward_over_a_chain_has_the_bits_of_forwarding_each_alone(stories_dir, start_servers,
                                                                                      keys):
    """One request through the chain verifies all positions (speculative decoding's pass); each position's logits
    are those the star path gives it forwarded alone."""
    checkpoint = Checkpoint.open(stories_dir)
    chained = remote_pipeline(remote_stages(start_servers(3), THREE_WAY), stories_dir, keys, chain=True)
    alone = remote_pipeline(remote_stages(start_servers(3), THREE_WAY), stories_dir, keys, chain=False)
    try:
        every = chained.forward_all(PROMPT, 0)
        assert every.shape == (len(PROMPT), checkpoint.args.vocab_size)
        one_by_one = torch.stack([alone.forward([token], position) for position, token in enumerate(PROMPT)])
        assert torch.equal(every, one_by_one)
    finally:
        chained.close()
        alone.close()


def test_speculative_decoding_over_a_chain_gives_the_plain_tokens(stories_dir, start_servers, keys):
    prompt = PROMPT + PROMPT[1:] + PROMPT[1:]   # repeats: prompt lookup drafts from it
    params = SamplingParams(max_new_tokens=24)
    pipeline = remote_pipeline(remote_stages(start_servers(3), THREE_WAY), stories_dir, keys, max_seq_len=96)
    try:
        assert list(generate(pipeline, prompt, params, speculate=True)) == local_tokens(stories_dir, prompt, params)
    finally:
        pipeline.close()


def relayed_forward(pipeline, stage: int, owner: bytes, session_id: str, grant_session: str | None = None,
                    request_id: int = 7) -> wire.Forward:
    """A forward to `stage` as the previous stage would relay it, its grant made with `owner` for `grant_session`."""
    part = pipeline._refs[stage]
    grant = chain_grant(owner, grant_session or session_id, part.digest, part.start, part.end)
    return wire.Forward(request_id=request_id, session_id=session_id, part=part, step=99, start_pos=len(PROMPT),
                        positions=1, owner_tag=owner_tag(pipeline.lease.owner), grant=grant,
                        tensor=torch.zeros(1, 64))


def test_relayed_forward_with_a_forged_grant_is_refused_and_the_session_goes_on(stories_dir, start_servers, keys):
    servers = start_servers(3)
    pipeline = remote_pipeline(remote_stages(servers, THREE_WAY), stories_dir, keys)
    context = zmq.Context()
    intruder = context.socket(zmq.DEALER)   # a member of the cluster (it has the keys) but not the session's owner
    intruder.linger = 0
    curve.configure_client(intruder, keys)
    intruder.connect(f"tcp://127.0.0.1:{servers[1].server.port}")
    try:
        pipeline.forward(PROMPT, 0)
        session = pipeline.session_id
        forgeries = [(relayed_forward(pipeline, 1, b"not-the-owner", session), "bad_request", "granted"),
                     (relayed_forward(pipeline, 1, pipeline.lease.owner, session, grant_session="another"),
                      "bad_request", "granted"),
                     (dataclasses.replace(relayed_forward(pipeline, 1, pipeline.lease.owner, session),
                                          owner_tag=owner_tag(b"nobody-here")), "unknown_part", "holds nothing")]
        for forgery, code, words in forgeries:
            intruder.send_multipart(wire.encode(forgery))
            assert intruder.poll(10_000)
            reply = wire.decode(intruder.recv_multipart())
            assert isinstance(reply, wire.Error) and reply.code == code and words in reply.message
        alone = local_tokens(stories_dir, PROMPT, SamplingParams(max_new_tokens=1))
        assert int(pipeline.forward([alone[0]], len(PROMPT)).argmax()) == local_tokens(stories_dir)[1]
    finally:
        intruder.close(linger=0)
        context.term()
        pipeline.close()


def test_stages_chain_only_where_each_can_reach_the_next():
    assert chainable(["127.0.0.1", "127.0.0.2"]) and chainable(["192.168.1.4", "10.0.0.7", "fe80::1"])
    assert not chainable(["127.0.0.1", "192.168.1.4"])    # loopback means another machine over there
    assert not chainable(["192.168.1.4", None])
    assert relay_address("localhost") in ("127.0.0.1", "::1")
    assert relay_address("10.1.2.3") == "10.1.2.3"
    assert relay_address("no-such-host.invalid") is None


@pytest.mark.parametrize("hop_change", [{"address": "stage.local"}, {"port": 0}, {"port": 70000},
                                        {"dtype": "int3"}, {"answer_on": -1}])
def test_a_forward_with_a_malformed_route_is_refused_before_use(hop_change):
    part = part_ref("0" * 16, "0" * 64, LayerRange(0, 2, False, False))
    hop = {"address": "127.0.0.1", "port": 5555, "part": part, "dtype": "float32", "grant": "0" * 64, "answer_on": 1}
    good = wire.Forward(session_id="s", part=part, step=0, start_pos=0, positions=1, route=(wire.Hop(**hop),),
                        tensor=torch.zeros(1, 64))
    assert wire.decode(wire.encode(good)).route == good.route
    with pytest.raises(wire.WireError):
        bad = dataclasses.replace(good, route=(wire.Hop(**{**hop, **hop_change}),))
        wire.decode(wire.encode(bad))


def test_relayed_forwards_renew_the_owners_lease_on_every_stage_of_the_chain(stories_dir, start_servers, keys):
    """Only the first stage hears the initiator's own connection while a chain decodes back to back; the others
    must count the owner's granted relays as word from it, or they drop its parts mid-generation."""
    servers = start_servers(3, lease_s=0.3)
    params = SamplingParams(max_new_tokens=200)
    pipeline = remote_pipeline(remote_stages(servers, THREE_WAY), stories_dir, keys, max_seq_len=256,
                               heartbeat_s=5.0)
    try:
        assert list(generate(pipeline, PROMPT, params, speculate=False)) == local_tokens(stories_dir, PROMPT,
                                                                                         params)
        assert pipeline.recoveries == []
    finally:
        pipeline.close()


def test_a_restarted_stage_mid_chain_refuses_the_relay_and_the_initiator_hears_it_and_replays(stories_dir,
                                                                                             start_servers, keys):
    first, middle, last = start_servers(3)
    port = last.server.port
    pipeline = remote_pipeline(remote_stages([first, middle, last], THREE_WAY), stories_dir, keys, heartbeat_s=0.25,
                               timeout_s=60)
    tokens = []
    try:
        for token in generate(pipeline, PROMPT, GREEDY, speculate=False):
            tokens.append(token)
            if len(tokens) == 8:
                last.stop()
                start_servers(1, port=port)   # the same node, restarted: it holds nothing of ours
        assert tokens == local_tokens(stories_dir)
        assert any("replaying" in line for line in pipeline.recoveries)
    finally:
        pipeline.close()
