"""Clusters on 127.0.0.1: `cakep2p --serve` groups that are always killed, `cakep2p generate` as the initiator, and
the greedy tokens a run must equal."""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from tests.kit.net import LOOPBACK, free_port
from tests.kit.nodes import seed_benchmark
from tests.kit.processes import REPO, ServeProcess, cakep2p_command, child_env, kill_all, start_serve
from tests.kit.waits import wait_until

PROMPT = "Once upon a time"
NODE_MEMORY = "2MiB"         # each serve node: room for any 2 of stories260K's 5 layers, so 2 nodes hold it all
INITIATOR_MEMORY = "256KiB"  # the initiator: embedding and head only, no layers: every layer goes to the peers


def initiator_env(home: Path, code: str) -> dict[str, str]:
    """The environment of an initiator process with its own home (its speed benchmark pre-stored)."""
    seed_benchmark(home)
    return child_env(home, code)


@contextlib.contextmanager
def serve_nodes(tmp_path: Path, code: str, names: list[str], *, args: tuple[str, ...] = (),
                see_each_other: bool = True) -> Iterator[list[ServeProcess]]:
    """One `cakep2p --serve --interface 127.0.0.1 --max-memory NODE_MEMORY` per name (own home, own port), started
    and (unless told) seeing each other; all killed on exit."""
    nodes: list[ServeProcess] = []
    try:
        for name in names:
            nodes.append(start_serve(tmp_path, name, free_port(), code=code, args=("--max-memory", NODE_MEMORY, *args)))
        for node in nodes:
            wait_until(node.started, 60, message=f"node {node.name} to start")
        if see_each_other:
            for node in nodes:
                for other in nodes:
                    if other is not node:
                        wait_until(lambda: node.joined(other.name), 15, message=f"{node.name} to see {other.name}")
        yield nodes
    finally:
        kill_all(nodes)


def generate_command(model: Path, *extra: str, max_new_tokens: int = 64) -> list[str]:
    """`cakep2p generate` of PROMPT at temperature 0 as an initiator that holds no layers."""
    return cakep2p_command("generate", "--model", str(model), "--prompt", PROMPT, "--temperature", "0",
                           "--max-new-tokens", str(max_new_tokens), "--interface", LOOPBACK,
                           "--max-memory", INITIATOR_MEMORY, *extra)


def run_generate(home: Path, code: str, model: Path, *extra: str, timeout: float = 120) -> tuple[dict, str]:
    """`cakep2p generate ... --json` as the initiator: (its JSON object, its stderr); fails the test on exit != 0."""
    result = subprocess.run(generate_command(model, "--json", *extra), cwd=REPO, env=initiator_env(home, code),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"generate exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout), result.stderr


def greedy_tokens(loaded, max_new_tokens: int = 64) -> list[int]:
    """What `generate --prompt PROMPT --temperature 0` gives on a LoadedModel (local or cluster), in this process."""
    import argparse

    from cakep2p.commands.options import sampling_from_args
    from cakep2p.engine.generate import generate

    flags = argparse.Namespace(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                               repetition_penalty=None, seed=None)
    pipeline = loaded.new_pipeline()
    try:
        params = replace(sampling_from_args(flags, loaded.checkpoint), stop_token_ids=loaded.tokenizer.eos_ids)
        return list(generate(pipeline, loaded.tokenizer.encode(PROMPT), params))
    finally:
        pipeline.close()


def local_tokens(model: Path) -> list[int]:
    """Greedy tokens of the whole model on this machine: what `generate --local` prints."""
    from cakep2p.cluster import LocalModel, ModelOptions
    from cakep2p.engine.checkpoint import Checkpoint

    loaded = LocalModel(Checkpoint.open(model), ModelOptions(dtype="auto", device="cpu"))
    try:
        return greedy_tokens(loaded)
    finally:
        loaded.close()


def remote_names(result: dict) -> set[str]:
    """Names of the nodes the plan gave at least one layer, besides the initiator."""
    return {stage["name"] for stage in result["plan"]["stages"][1:] if stage["end"] > stage["start"]}
