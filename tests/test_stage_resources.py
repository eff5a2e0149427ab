"""A stage's resources on real stage processes over loopback: a long prefill's peak memory is that of one chunk,
one member's looping prefills delay another's tokens by a chunk and not a queue, a full disk is said and worked
around, and the parts cache keeps to its cap, least recently used out first."""

import shutil
import subprocess
import threading

import pytest
import torch

from cakep2p import wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.model import PREFILL_CHUNK
from cakep2p.mesh import StageClient, StageRefused
from cakep2p.mesh.lease import Lease
from cakep2p.mesh.parts_cache import cached_part_path
from cakep2p.mesh.transfer import PartOffer, load_part
from cakep2p.planner import LayerRange
from tests.kit import StageProcess, run_cakep2p, child_env, wait_until

MIDDLE = LayerRange(1, 3, False, False)    # hidden states in, hidden states out
LONG = 8192

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny random Llama that allows an 8192-token context."""
    from cakep2p.testing import make_random_model

    return make_random_model(tmp_path_factory.mktemp("long") / "model", "llama", seed=4,
                             max_position_embeddings=LONG)


def client_of(stage: StageProcess, keys, **options) -> StageClient:
    options.setdefault("heartbeat_s", 0.5)
    return StageClient("127.0.0.1", stage.port, keys, lease=options.pop("lease", None) or Lease(), **options)


def offer(model_dir, layers=MIDDLE, weights="f32") -> PartOffer:
    return PartOffer.of(Checkpoint.open(model_dir), layers, weights)


@pytest.mark.slow
def test_a_long_prefill_costs_a_stage_the_memory_of_one_chunk(long_model, tmp_path, keys, code):
    with StageProcess(tmp_path / "stage", code) as stage:
        client = client_of(stage, keys, timeout_s=600)
        try:
            load_part(client, offer(long_model), max_seq_len=LONG, dtype="float32")
            client.forward("warm", offer(long_model).ref, 0, 0, torch.ones(PREFILL_CHUNK, 64))
            before = stage.peak_rss()
            client.forward("long", offer(long_model).ref, 0, 0, torch.randn(LONG, 64))
            grown = stage.peak_rss() - before
        finally:
            client.close()
    print(f"peak memory of an {LONG}-token prefill: +{grown / 2**20:.0f} MiB")
    assert grown < 100 * 2**20   # in one piece: +344 MiB for these two layers (the mask and scores of T x T)


@pytest.mark.slow
def test_one_members_looping_prefills_delay_anothers_tokens_by_a_chunk_not_a_queue(long_model, tmp_path, keys,
                                                                                   code):
    """Counts, not clocks: how many of the hog's prefills (4 chunks each, 4 in flight) finish while the other member
    decodes 8 tokens. First come, first served: about 4 per token; in turn by owner: one chunk per token."""
    ref = offer(long_model).ref
    with StageProcess(tmp_path / "stage", code) as stage:
        hog_lease = Lease()
        hogs = [client_of(stage, keys, lease=hog_lease, timeout_s=600) for _ in range(4)]
        user = client_of(stage, keys, timeout_s=600)
        finished, stop = [0], threading.Event()

        def hog(client: StageClient, index: int) -> None:
            while not stop.is_set():
                client.forward(f"hog-{index}", ref, 0, 0, torch.ones(4 * PREFILL_CHUNK, 64))
                finished[0] += 1

        threads = [threading.Thread(target=hog, args=(client, index), name=f"test-hog-{index}")
                   for index, client in enumerate(hogs)]
        try:
            for client in [*hogs, user]:
                load_part(client, offer(long_model), max_seq_len=LONG, dtype="float32")
            for thread in threads:
                thread.start()
            wait_until(lambda: finished[0] >= 4, 120, message="the hog's first prefills")
            before = finished[0]
            for position in range(8):
                user.forward("user", ref, position, position, torch.ones(1, 64))
            during = finished[0] - before
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
            for client in [*hogs, user]:
                client.close()
    print(f"the hog finished {during} prefills while the other member decoded 8 tokens")
    assert during <= 12   # first come, first served: about 32


def small_disk(size: int, parts_dir) -> tuple[str, ...]:
    """A command prefix that runs a process in its own mount namespace with `size` bytes of disk for its parts."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to give a stage a small disk")
    parts_dir.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(parts_dir)],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small disk here: {probe.stderr.decode().strip()}")
    return ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"', "sh",
            str(size), str(parts_dir))


@pytest.mark.parametrize("disk", ["none", "the spool but not the cache file"])
def test_a_full_disk_keeps_the_part_in_memory_and_sends_it_once(stories_dir, tmp_path, keys, code, disk):
    part = offer(stories_dir, LayerRange(3, 5, False, True))
    room = 8192 if disk == "none" else part.identity.nbytes + part.identity.nbytes // 2
    prefix = small_disk(room, tmp_path / "stage" / "cache" / "parts")
    with StageProcess(tmp_path / "stage", code, "--name", "cramped", prefix=prefix) as stage:
        first, second = client_of(stage, keys), client_of(stage, keys)
        try:
            assert load_part(first, part, max_seq_len=64, dtype="float32").source == "transfer"
            assert first.forward("s", part.ref, 0, 0, torch.ones(3, 64)).shape == (1, 512)
            assert load_part(second, part, max_seq_len=64, dtype="float32").source == "memory"   # not sent again
        finally:
            first.close()
            second.close()
        assert "disk full on cramped" in stage.log()


def test_a_full_disk_without_memory_to_spare_is_refused_as_disk_full(stories_dir, tmp_path, keys, code):
    part = offer(stories_dir, LayerRange(3, 5, False, True))
    prefix = small_disk(8192, tmp_path / "stage" / "cache" / "parts")
    budget = part.identity.nbytes + part.identity.nbytes // 2   # the part fits, the part twice does not
    with StageProcess(tmp_path / "stage", code, "--name", "cramped", "--budget", str(budget),
                      prefix=prefix) as stage:
        client = client_of(stage, keys)
        try:
            with pytest.raises(StageRefused, match="disk full on cramped") as refused:
                load_part(client, part, max_seq_len=64, dtype="float32")
            assert refused.value.code == "disk_full"
            assert client.ping().free_budget == budget   # nothing stays reserved
        finally:
            client.close()


def test_the_parts_cache_keeps_to_its_cap_least_recently_used_out_first(stories_dir, tmp_path, keys, code):
    parts = [offer(stories_dir, LayerRange(3, 5, False, True), weights) for weights in ("f32", "f16", "bf16")]
    cap = parts[0].identity.nbytes + parts[1].identity.nbytes + 64 * 1024   # room for the first two
    parts_dir = tmp_path / "stage" / "cache" / "parts"
    with StageProcess(tmp_path / "stage", code, env={"CAKEP2P_PARTS_CACHE_MAX": str(cap)}) as stage:
        for number, part in enumerate([parts[0], parts[1], parts[0], parts[2]]):
            client = client_of(stage, keys)   # a new member each time: the part comes from the cache or is sent
            try:
                source = load_part(client, part, max_seq_len=64, dtype="float32").source
                assert source == ("cache" if number == 2 else "transfer")
                client.request(wire.Unload(part=part.ref))   # the part leaves memory with its only holder
            finally:
                client.close()
    assert [cached_part_path(part.ref, parts_dir).is_file() for part in parts] == [True, False, True]
    assert sum(path.stat().st_size for path in parts_dir.glob("*.safetensors")) <= cap


@pytest.mark.slow
def test_doctor_shows_the_parts_cache_and_its_cap(tmp_path):
    home = tmp_path / "home"
    (home / "cache" / "parts").mkdir(parents=True)
    (home / "cache" / "parts" / f"{'a' * 64}.safetensors").write_bytes(bytes(300 * 1024))
    result = run_cakep2p("doctor", "--wait", "0", env=child_env(home, CAKEP2P_PARTS_CACHE_MAX="1GiB"))
    assert result.returncode == 0, result.stderr
    assert "parts cache: 1 part, 300 KiB of its 1 GiB cap" in result.stdout
