"""Greedy decode with and without prompt-lookup speculation on a repetitive prompt, one process and over loopback
stages, on a random TinyLlama-shaped model; asserts identical tokens.

Usage: python bench/speculative_bench.py [--new-tokens 64] [--nodes 1,3] [--threads 2] [--link-delay-ms 0]
The prompt is a random paragraph twice, then its first half again. Over the mesh the initiator holds the embedding
and head, stage servers (bench/mesh_bench.py's) the layers. --link-delay-ms sleeps that long before each request
and after each reply in this process (a user-space stand-in for netem, which this machine lacks).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Counting:
    """A pipeline wrapper counting verify passes and the tokens they produced."""

    def __init__(self, inner) -> None:
        self.inner, self.max_seq_len, self.verifies = inner, inner.max_seq_len, 0

    def forward(self, token_ids, start_pos):
        return self.inner.forward(token_ids, start_pos)

    def forward_all(self, token_ids, start_pos):
        self.verifies += 1
        return self.inner.forward_all(token_ids, start_pos)


def timed(pipeline, prompt: list[int], new_tokens: int, speculate: bool) -> tuple[list[int], float, int]:
    """(tokens, decode tok/s after the first token, verify passes)."""
    from cakep2p.engine.generate import generate
    from cakep2p.engine.sampling import SamplingParams

    counting = Counting(pipeline)
    tokens, began = [], 0.0
    for token in generate(counting, prompt, SamplingParams(max_new_tokens=new_tokens), speculate=speculate):
        tokens.append(token)
        if len(tokens) == 1:
            began = time.perf_counter()
    return tokens, (len(tokens) - 1) / (time.perf_counter() - began), counting.verifies


def delay_links(seconds: float) -> None:
    """Every StageClient request waits `seconds` before sending and after its reply."""
    from cakep2p.mesh.client import StageClient

    request = StageClient.request

    def delayed(self, *args, **kwargs):
        time.sleep(seconds)
        reply = request(self, *args, **kwargs)
        time.sleep(seconds)
        return reply

    StageClient.request = delayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--nodes", default="1,3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--link-delay-ms", type=float, default=0.0)
    options = parser.parse_args()

    import torch

    from cakep2p import planner, security
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.generate import LocalPipeline
    from cakep2p.engine.loading import load_part, whole_model
    from cakep2p.engine.sizes import model_spec
    from cakep2p.mesh import RemotePipeline, stages_for_plan
    from cakep2p.testing import cached_random_model
    from bench.mesh_bench import BUDGET_BYTES, StageProcess

    torch.set_num_threads(options.threads)
    if options.link_delay_ms:
        delay_links(options.link_delay_ms / 1000)
    model_dir = cached_random_model("llama", "tinyllama", dtype="bfloat16")
    checkpoint = Checkpoint.open(model_dir)
    paragraph = torch.randint(3, checkpoint.args.vocab_size, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    prompt = [1] + paragraph + paragraph + paragraph[:24]
    max_seq_len = len(prompt) + options.new_tokens
    code = security.new_code()
    keys = security.derive_keys(code)
    ok = True
    with tempfile.TemporaryDirectory(prefix="cakep2p-spec-bench-") as scratch:
        for nodes in sorted({int(count) for count in options.nodes.split(",")}):
            processes = []
            for index in range(1, nodes):
                home = Path(scratch, f"n{nodes}-{index}")
                home.mkdir()
                processes.append(StageProcess(f"n{nodes}-stage{index}", home, code, options.threads, model_dir))
            try:
                for process in processes:
                    process.wait_listening()
                if nodes == 1:
                    part = load_part(checkpoint, whole_model(checkpoint.args), dtype="bfloat16", device="cpu")
                    make = lambda: LocalPipeline([part], max_seq_len)
                else:
                    budgets = [planner.NodeBudget("node-0", "initiator", BUDGET_BYTES)]
                    budgets += [planner.NodeBudget(p.node_id, p.node_id, BUDGET_BYTES) for p in processes]
                    plan = planner.plan(model_spec(checkpoint, "bfloat16"), budgets, "node-0", max_seq_len)
                    endpoints = {p.node_id: ("127.0.0.1", p.port) for p in processes}
                    stages = stages_for_plan(plan, endpoints, "node-0", lambda layers: load_part(
                        checkpoint, layers, dtype="bfloat16", device="cpu"))
                    make = lambda: RemotePipeline(stages, checkpoint, max_seq_len, keys, weights="bf16",
                                                  dtype="bfloat16")
                results = {}
                for speculate in (False, True):
                    pipeline = make()
                    try:
                        results[speculate] = timed(pipeline, prompt, options.new_tokens, speculate)
                    finally:
                        pipeline.close()
                (plain, plain_rate, _), (drafted, rate, verifies) = results[False], results[True]
                same = plain == drafted
                ok &= same
                accepted = (len(drafted) - 1) / max(1, verifies) if verifies else 0.0
                print(f"{nodes} stage(s), link delay {options.link_delay_ms} ms: without {plain_rate:.2f} tok/s, "
                      f"with {rate:.2f} tok/s, ratio {rate / plain_rate:.2f}x; {verifies} verify passes, "
                      f"{accepted:.2f} new tokens per verify pass; identical tokens: {same}", flush=True)
            finally:
                for process in processes:
                    process.kill()
    if not ok:
        sys.exit("tokens differ with speculation")


if __name__ == "__main__":
    main()
