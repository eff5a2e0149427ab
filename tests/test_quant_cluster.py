"""Quantized formats over real `cakep2p --serve` nodes on 127.0.0.1: the same tokens as one machine in that format,
and peers that receive their share of the quantized bytes (a quarter to a half of 16-bit), not the whole model."""

from __future__ import annotations

import re
import subprocess

import pytest

from cakep2p.cluster import LocalModel, ModelOptions
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.sizes import model_spec
from cakep2p.security import new_code
from tests.kit.cluster import initiator_env, run_generate, serve_nodes
from tests.kit.processes import REPO, cakep2p_command
from tests.test_gguf_format import SMOL_DIR, SMOL_NAME

pytestmark = pytest.mark.slow
SENT = re.compile(r"sent ([\d.]+) (B|KiB|MiB|GiB) of weights to (\S+)")
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def sent_bytes(stderr: str) -> dict[str, float]:
    """What each peer received, from the initiator's `sent N of weights to PEER` lines."""
    return {peer: float(size) * UNITS[unit] for size, unit, peer in SENT.findall(stderr)}


def local_tokens(model_dir, weights: str, count: int) -> list[int]:
    from tests.kit.cluster import greedy_tokens

    loaded = LocalModel(Checkpoint.open(model_dir), ModelOptions(weights=weights, device="cpu"))
    try:
        return greedy_tokens(loaded, count)
    finally:
        loaded.close()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_three_nodes_in_a_format_give_its_single_node_tokens_for_200_steps(tmp_path, stories_dir, weights):
    code = new_code()
    with serve_nodes(tmp_path, code, [f"{weights}-{name}" for name in "abc"], args=("--max-memory", "1MiB")):
        result, stderr = run_generate(tmp_path / "initiator", code, stories_dir, "--weights", weights,
                                      "--max-new-tokens", "200", "--max-memory", "200KiB")
    holders = {stage["name"] for stage in result["stages"] if stage["end"] > stage["start"] and stage["port"]}
    assert len(holders) == 3 and result["weights"] == weights, result["stages"]
    assert result["tokens"] == local_tokens(stories_dir, weights, 200)
    sixteen_bit = sum(model_spec(Checkpoint.open(stories_dir), weights="bf16").layer_bytes)
    assert sum(sent_bytes(stderr).values()) < 0.6 * sixteen_bit, stderr


@pytest.mark.skipif(not (SMOL_DIR / SMOL_NAME).is_file(), reason="the SmolLM2 GGUF is not on this machine")
def test_a_gguf_chat_over_three_empty_nodes_equals_local_and_each_gets_its_share(tmp_path):
    code = new_code()
    question = ["--chat", "--context", "256", "--prompt", "What is the capital of France?", "--max-new-tokens", "24"]
    local = subprocess.run(cakep2p_command("generate", "--model", str(SMOL_DIR), "--local", "--json", *question),
                           cwd=REPO, env=initiator_env(tmp_path / "local", code), capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr
    with serve_nodes(tmp_path, code, ["gguf-a", "gguf-b", "gguf-c"], args=("--max-memory", "64MiB")):
        result, stderr = run_generate(tmp_path / "initiator", code, SMOL_DIR, *question, "--max-memory", "30MiB",
                                      timeout=300)
    import json

    assert result["tokens"] == json.loads(local.stdout)["tokens"] and result["weights"] == "gguf"
    assert result["text"].startswith("The capital of France is Paris")
    received = sent_bytes(stderr)
    file_bytes = (SMOL_DIR / SMOL_NAME).stat().st_size
    shares = {stage["name"]: stage["end"] - stage["start"] for stage in result["stages"]
              if stage["name"] in received}
    print("bytes received per peer:", {peer: f"{size / 2**20:.1f} MiB for {shares.get(peer)} layers"
                                       for peer, size in received.items()}, f"(file {file_bytes / 2**20:.1f} MiB)")
    assert len(received) >= 2 and all(size < 0.6 * file_bytes for size in received.values())
    assert sum(received.values()) < file_bytes
