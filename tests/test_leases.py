"""Leases on real stage processes over loopback: sessions and parts belong to the lease (client id) that opened or
loaded them, nobody else continues, ends or sees them, and they go within seconds once their owner falls silent,
however it died; a session's KV cache is capped by the model's context whoever re-loads the part."""

import subprocess
import sys
import time

import pytest
import torch

from cakep2p import security
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.errors import MeshError, ProtocolError
from cakep2p.mesh import StageClient, StageRefused
from cakep2p.mesh.lease import Lease
from cakep2p.mesh.transfer import PartOffer, load_part
from cakep2p.planner import LayerRange
from tests.kit import REPO, ChildProcess, StageProcess, child_env, kill_all, wait_until

TAIL = LayerRange(3, 5, False, True)      # stories260K's last two layers and the head: hidden states in
BUDGET = 64 << 20                         # a KV cache of 2^20 positions for TAIL (512 MiB) does not fit
HIDDEN = torch.ones(3, 64)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


def member(stage: StageProcess, keys, lease: Lease | None = None, **options) -> StageClient:
    """Another member with the code: its own lease (client id) unless given one."""
    options.setdefault("heartbeat_s", 0.3)
    return StageClient("127.0.0.1", stage.port, keys, lease=lease or Lease(), **options)


def offer(stories_dir, layers=TAIL, weights="f32") -> PartOffer:
    return PartOffer.of(Checkpoint.open(stories_dir), layers, weights)


def test_another_member_can_neither_continue_end_nor_see_a_session(stories_dir, tmp_path, keys, code):
    with StageProcess(tmp_path / "stage", code) as stage:
        owner, other = member(stage, keys), member(stage, keys)
        try:
            ref = offer(stories_dir).ref
            load_part(owner, offer(stories_dir), max_seq_len=64, dtype="float32")
            owner.forward("twin", ref, 0, 0, HIDDEN)
            expected = owner.forward("twin", ref, 1, 3, HIDDEN)   # what continuing a session gives
            owner.forward("chat", ref, 0, 0, HIDDEN)          # the owner's session: 3 positions cached
            assert other.ping().loaded_parts == ()            # what the owner holds is not shown to others
            with pytest.raises(StageRefused) as refused:
                other.forward("chat", ref, 1, 3, HIDDEN)     # it holds no part here
            assert refused.value.code == "unknown_part"
            load_part(other, offer(stories_dir), max_seq_len=64, dtype="float32")   # now it does (from memory)
            with pytest.raises(StageRefused) as refused:
                other.forward("chat", ref, 1, 3, HIDDEN)     # but the owner's session is not its own
            assert refused.value.code == "unknown_session"
            other.end_session("chat")                         # ends nothing of the owner's
            assert torch.equal(owner.forward("chat", ref, 1, 3, HIDDEN), expected)
        finally:
            owner.close()
            other.close()


def test_a_reload_with_a_huge_context_does_not_cap_other_members_sessions(stories_dir, tmp_path, keys, code):
    with StageProcess(tmp_path / "stage", code, "--budget", str(BUDGET)) as stage:
        running, greedy = member(stage, keys), member(stage, keys)
        try:
            ref = offer(stories_dir).ref
            load_part(running, offer(stories_dir), max_seq_len=64, dtype="float32")
            running.forward("first", ref, 0, 0, HIDDEN)
            load_part(greedy, offer(stories_dir), max_seq_len=1 << 20, dtype="float32")
            assert running.forward("second", ref, 0, 0, HIDDEN).shape == (1, 512)   # its own 64-token cache
            assert greedy.forward("big", ref, 0, 0, HIDDEN).shape == (1, 512)      # capped at the model's 512
            with pytest.raises(ProtocolError, match="max_seq_len 512"):
                greedy.forward("big", ref, 1, 3, torch.ones(600, 64))
        finally:
            running.close()
            greedy.close()


@pytest.mark.slow
def test_a_kept_lease_outlives_silence_and_an_unkept_one_lapses(stories_dir, tmp_path, keys, code):
    with StageProcess(tmp_path / "stage", code, "--lease-s", "1") as stage:
        kept_lease = Lease(keep_alive_s=0.2)
        kept, forgotten = member(stage, keys, kept_lease), member(stage, keys)
        kept_lease.keep(kept)
        try:
            ref = offer(stories_dir).ref
            for client in (kept, forgotten):
                load_part(client, offer(stories_dir), max_seq_len=64, dtype="float32")
                client.forward("idle", ref, 0, 0, HIDDEN)
            time.sleep(2.5)   # more than twice the stage's lease time without a request from either
            assert kept.forward("idle", ref, 1, 3, HIDDEN).shape == (1, 512)
            with pytest.raises(StageRefused) as refused:
                forgotten.forward("idle", ref, 1, 3, HIDDEN)
            assert refused.value.code == "unknown_part"    # its part went with its lease, and the session too
        finally:
            kept.close()
            forgotten.close()


INITIATOR = """
import sys, time, torch
from cakep2p import security
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.mesh import RemotePipeline, RemoteStage, StageClient
from cakep2p.mesh.transfer import PartOffer
from cakep2p.planner import LayerRange
from cakep2p import wire
port, mode, model = int(sys.argv[1]), sys.argv[2], sys.argv[3]
keys = security.derive_keys(sys.argv[4])
checkpoint = Checkpoint.open(model)
if mode == "session":
    pipeline = RemotePipeline([RemoteStage("127.0.0.1", port, LayerRange(0, 5, True, True))], checkpoint, 64, keys,
                              weights="f32", dtype="float32", heartbeat_s=0.5)
    pipeline.forward([1, 403, 407], 0)
else:   # a transfer that never ends: load_part, one chunk, then nothing
    offer = PartOffer.of(checkpoint, LayerRange(0, 5, True, True), "f16")
    client = StageClient("127.0.0.1", port, keys)
    reply = client.request(wire.LoadPart(part=offer.ref, model_name="stuck", weights="f16",
                                         weight_bytes=offer.identity.nbytes, max_seq_len=64, source="transfer",
                                         config_json=checkpoint.config_text))
    assert reply.status == "send", reply
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_eight_sigkilled_initiators_leave_nothing_behind_ten_seconds_later(stories_dir, tmp_path, keys, code):
    with StageProcess(tmp_path / "stage", code, "--budget", str(BUDGET)) as stage:
        observer = member(stage, keys)
        initiators = []
        try:
            assert observer.ping().free_budget == BUDGET
            for mode in ["session"] * 6 + ["transfer"] * 2:
                initiators.append(ChildProcess([sys.executable, "-c", INITIATOR, str(stage.port), mode,
                                                str(stories_dir), code], env=child_env(tmp_path / "initiators"),
                                               role=f"initiator ({mode})", cwd=REPO, stdout=subprocess.PIPE,
                                               text=True))
            for initiator in initiators:
                assert initiator.process.stdout.readline().strip() == "ready"
            pong = observer.ping()
            assert pong.sessions == 6 and pong.free_budget < BUDGET
            kill_all(initiators)   # SIGKILL: no end_session, no unload, no goodbye
            killed = time.monotonic()
            wait_until(lambda: (lambda pong: pong.sessions == 0 and pong.free_budget == BUDGET)(observer.ping()),
                       10, interval=0.25, message=lambda: f"the stage to drop what they held: {observer.ping()}")
            print(f"8 SIGKILLed initiators: nothing of theirs left {time.monotonic() - killed:.1f} s later")
        finally:
            kill_all(initiators)
            observer.close()


@pytest.mark.slow
def test_a_stranger_without_the_code_is_told_to_check_the_pairing_code(tmp_path, code):
    with StageProcess(tmp_path / "stage", code) as stage:
        stranger = member(stage, security.derive_keys(security.new_code()))
        try:
            with pytest.raises(MeshError, match="could not authenticate: wrong or no pairing code"):
                stranger.ping(5)
        finally:
            stranger.close()
