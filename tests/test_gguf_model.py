"""A real GGUF chat model end to end: float32 logits equal transformers' own GGUF loader prompt and step by step, the
CLI answers the reference question, and broken files are one line and exit 2."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cakep2p.cluster import LocalModel, ModelOptions
from cakep2p.engine.checkpoint import Checkpoint
from tests import kit
from tests.test_gguf_format import SMOL_DIR, SMOL_NAME, STORIES, patch_tensor_info, write_tiny

pytestmark = pytest.mark.skipif(not (SMOL_DIR / SMOL_NAME).is_file(), reason=f"{SMOL_DIR / SMOL_NAME} is absent")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Name three fruits."}, {"role": "assistant", "content": "Apple, banana, cherry."},
     {"role": "user", "content": "And three vegetables?"}],
]
STEPS = 20


@pytest.fixture(scope="module")
def ours():
    torch.set_num_threads(1)
    model = LocalModel(Checkpoint.open(SMOL_DIR), ModelOptions(dtype="float32", device="cpu"))
    yield model
    model.close()


@pytest.fixture(scope="module")
def theirs(smol_transformers):
    return smol_transformers


def chat_ids(model: LocalModel, messages: list[dict]) -> list[int]:
    tokenizer = model.tokenizer
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_float32_logits_match_transformers_gguf_loader_at_prefill_and_each_greedy_step(ours, theirs, chat):
    prompt = chat_ids(ours, CHATS[chat])
    pipeline = ours.new_pipeline()
    worst = 0.0
    with torch.no_grad():
        logits = pipeline.forward(prompt, 0)
        output = theirs(torch.tensor([prompt]), use_cache=True)
        past, position = output.past_key_values, len(prompt)
        tokens = []
        for step in range(STEPS + 1):
            reference = output.logits[0, -1].float()
            worst = max(worst, float((logits - reference).abs().max()))
            assert int(logits.argmax()) == int(reference.argmax()), f"step {step}"
            token = int(reference.argmax())
            tokens.append(token)
            if step == STEPS:
                break
            logits = pipeline.forward([token], position)
            output = theirs(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, position = output.past_key_values, position + 1
    pipeline.close()
    assert worst < 1e-4, worst
    print(f"chat {chat}: {STEPS} greedy steps, max |logit diff| {worst:.2e}, tokens {tokens[:8]}...")


def run_cakep2p(*arguments: str, home: Path) -> subprocess.CompletedProcess:
    return kit.run_cakep2p(*arguments, env=kit.child_env(home), timeout=300)


@pytest.mark.slow
def test_the_cli_answers_the_capital_of_france_from_the_gguf_folder(tmp_path):
    result = run_cakep2p("generate", "--model", str(SMOL_DIR), "--chat", "--prompt", "What is the capital of France?",
                         "--temperature", "0", "--dtype", "float32", "--wait", "0.5", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."


def broken(kind: str, folder: Path) -> Path:
    """A .gguf broken in one way, in its own folder."""
    folder.mkdir()
    path = folder / "broken.gguf"
    if kind in ("truncated", "bad magic", "unsupported version", "unknown tensor type", "data beyond the end"):
        shutil.copyfile(STORIES, path)
        path.chmod(0o644)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "bad magic":
        with open(path, "r+b") as handle:
            handle.write(b"GGML")
    elif kind == "unsupported version":
        with open(path, "r+b") as handle:
            handle.seek(4)
            handle.write((7).to_bytes(4, "little"))
    elif kind == "unknown tensor type":
        patch_tensor_info(path, "blk.2.attn_v.weight", 4, 99)
    elif kind == "data beyond the end":
        patch_tensor_info(path, "blk.0.attn_q.weight", 5, 1 << 40)
    elif kind == "unsupported architecture":
        write_tiny(path, "gemma2")
    elif kind == "missing tokenizer metadata":
        write_tiny(path, tokenizer=False)
    return path


@pytest.mark.parametrize("kind, phrase", [
    ("truncated", "truncated"), ("bad magic", "is not a GGUF file"), ("unsupported version", "GGUF version 7"),
    ("unknown tensor type", "unknown ggml type 99"), ("unsupported architecture", "architecture 'gemma2'"),
    ("missing tokenizer metadata", "has no tokenizer"), ("data beyond the end", "needs bytes"),
])
@pytest.mark.slow
def test_a_broken_gguf_is_one_line_and_exit_2(tmp_path, kind, phrase):
    result = run_cakep2p("generate", "--local", "--model", str(broken(kind, tmp_path / "model")), "--prompt", "Hi",
                         home=tmp_path / "home")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cakep2p: error: ") and phrase in result.stderr
    assert "Traceback" not in result.stderr
