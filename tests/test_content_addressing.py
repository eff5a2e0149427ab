"""Parts named by their content, end to end on `cakep2p --serve` nodes over 127.0.0.1: two fine-tunes with the same
shapes (hence the same model fingerprint) never share a part, and a member pushing other bytes under a real
model's part name poisons nothing."""

import os

import pytest
import torch

from cakep2p import security, wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.digests import content_digest, tensor_entry
from cakep2p.engine.formats import resolve_format, served_tensors
from cakep2p.engine.loading import part_tensor_names
from cakep2p.engine.dtypes import name_of
from cakep2p.mesh import StageClient, StageRefused, part_ref
from cakep2p.mesh.lease import Lease
from cakep2p.mesh.transfer import PartOffer, load_part
from cakep2p.planner import LayerRange
from cakep2p.testing import make_random_model
from tests.kit import loopback_multicast_on, reference_greedy
from tests.kit.cluster import remote_names, run_generate, serve_nodes

SUFFIX = f"-{os.getpid()}"
TRIO = [f"delta{SUFFIX}", f"echo{SUFFIX}", f"foxtrot{SUFFIX}"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trio(tmp_path_factory, code):
    loopback_multicast_on()
    with serve_nodes(tmp_path_factory.mktemp("trio"), code, TRIO) as nodes:
        yield nodes


def generated(tmp_path, code, model) -> list[int]:
    result, _ = run_generate(tmp_path, code, model, "--max-new-tokens", "40")
    assert remote_names(result) == set(TRIO)
    return result["tokens"]


def alone(tmp_path, code, model) -> list[int]:
    result, _ = run_generate(tmp_path, code, model, "--max-new-tokens", "40", "--local", "--max-memory", "1GiB")
    return result["tokens"]


def test_fine_tune_b_after_a_on_the_same_peers_equals_b_alone(trio, code, tmp_path):
    model_a = make_random_model(tmp_path / "a", "llama", seed=11)
    model_b = make_random_model(tmp_path / "b", "llama", seed=12)   # same shapes, other weights
    assert Checkpoint.open(model_a).fingerprint == Checkpoint.open(model_b).fingerprint
    assert generated(tmp_path / "run-a", code, model_a) == alone(tmp_path / "alone-a", code, model_a)
    b_alone = alone(tmp_path / "alone-b", code, model_b)
    assert b_alone != alone(tmp_path / "alone-a2", code, model_a)
    assert generated(tmp_path / "run-b", code, model_b) == b_alone


def push_zeros(client: StageClient, checkpoint: Checkpoint, layers: LayerRange, weights: str, *,
               under_the_real_name: bool) -> wire.Message:
    """Send zeros of the part's exact shapes, named as the real part (a lie) or by their own content."""
    real = PartOffer.of(checkpoint, layers, weights)
    zeros = [(name, torch.zeros_like(tensor))
             for name, tensor in served_tensors(checkpoint, part_tensor_names(checkpoint.args, layers), weights)]
    digest = real.identity.digest if under_the_real_name else content_digest(tensor_entry(*item) for item in zeros)
    ref = part_ref(checkpoint.fingerprint, digest, layers)
    reply = client.request(wire.LoadPart(part=ref, model_name=checkpoint.name, weights=weights,
                                         weight_bytes=real.identity.nbytes, max_seq_len=64, source="transfer",
                                         config_json=checkpoint.config_text))
    if reply.status != "send":
        return reply
    for name, tensor in zeros:
        data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        client.request(wire.TensorChunk(part=ref, name=name, dtype=name_of(tensor.dtype), shape=tuple(tensor.shape),
                                        offset=0, total=len(data), data=data))
    return client.request(wire.TransferEnd(part=ref, tensor_count=len(zeros)))


def test_zero_weights_pushed_under_a_real_models_part_names_are_refused_and_later_users_get_the_right_answer(
        trio, code, stories_dir, tmp_path):
    checkpoint = Checkpoint.open(stories_dir)
    weights = resolve_format(checkpoint, "auto", "auto")   # what `generate` will ask the peers for
    ranges = [LayerRange(start, end, False, False) for start in range(5) for end in range(start + 1, 6)]
    keys, lease = security.derive_keys(code), Lease()
    refused = accepted = 0
    for node in trio:
        client = StageClient("127.0.0.1", node.port, keys, lease=lease, heartbeat_s=0.5)
        try:
            for layers in ranges:
                with pytest.raises(StageRefused, match="not the part's content") as refusal:
                    push_zeros(client, checkpoint, layers, weights, under_the_real_name=True)
                refused += refusal.value.code == "transfer_failed"
                if layers.num_layers <= 2:   # what fits: zeros under their own name are just another part
                    reply = push_zeros(client, checkpoint, layers, weights, under_the_real_name=False)
                    accepted += reply.status == "ready"
                    client.request(wire.Unload(part=client.ping().loaded_parts[0]))
        finally:
            client.close()
    assert refused == 3 * len(ranges) and accepted == 3 * 9
    result, _ = run_generate(tmp_path / "later-user", code, stories_dir)
    assert result["tokens"] == reference_greedy(stories_dir, "Once upon a time")["new_token_ids"]
    assert remote_names(result) == set(TRIO)
