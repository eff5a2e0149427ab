"""Decode and prefill speed of our engine vs transformers' generate on a random TinyLlama-shaped model.

Usage: python bench/engine_bench.py [--dtype float32|bfloat16|both] [--new-tokens N] [--prompt-tokens N]

The model (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000) is written once
into $CAKEP2P_MODEL_CACHE (default ~/.cache/cakep2p-models) in bfloat16: 2.2 GB of disk; float32 runs
upcast it at load. Each side is its own subprocess: they load one after the other (load peak RSS is the
VmHWM growth during each load), then stay loaded and take turns, round by round, so both meet the same
machine load on shared cores (RAM: ~2 x 4.4 GB in float32). Same weights, dtype and threads (2), greedy.
Decode tok/s is 1 / median step time (and 1 / fastest step); prefill tok/s is prompt tokens / time to
the first new token, best round. CAKEP2P_PACK=0 disables our oneDNN weight packing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def prompt_ids(count: int, vocab_size: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(1234)
    return [1] + torch.randint(3, vocab_size, (count - 1,), generator=generator).tolist()


class OursSide:
    """Our engine: one whole-model part, a fresh LocalPipeline (KV cache) per timed round."""

    def __init__(self, model_dir: str, dtype: str) -> None:
        from cakep2p.engine.checkpoint import Checkpoint
        from cakep2p.engine.loading import load_part, whole_model

        checkpoint = Checkpoint.open(model_dir)
        self.part = load_part(checkpoint, whole_model(checkpoint.args), dtype=dtype, device="cpu")
        self.weights = self.part.weight_bytes

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        from cakep2p.engine.generate import LocalPipeline, generate
        from cakep2p.engine.sampling import SamplingParams

        pipeline = LocalPipeline([self.part], len(prompt) + new_tokens)
        times, tokens = [], []
        started = time.perf_counter()
        for token in generate(pipeline, prompt, SamplingParams(max_new_tokens=new_tokens), speculate=False):
            times.append(time.perf_counter())
            tokens.append(token)
        return dict(tokens=tokens, first_s=times[0] - started, steps=[b - a for a, b in zip(times, times[1:])])


class TransformersSide:
    """transformers' AutoModelForCausalLM.generate, greedy, its default cache; a streamer stamps each token."""

    def __init__(self, model_dir: str, dtype: str) -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.weights = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        clock = Clock()
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, streamer=clock,
                                         do_sample=False, eos_token_id=None, pad_token_id=0,
                                         return_dict_in_generate=True, output_logits=True)
        times = clock.times[1:]  # the first put() is the prompt
        margins = [float(logits[0].topk(2).values[0] - logits[0].topk(2).values[1]) for logits in output.logits]
        return dict(tokens=output.sequences[0, len(prompt):].tolist(), first_s=times[0] - started,
                    steps=[b - a for a, b in zip(times, times[1:])], margins=margins)


def worker(options: argparse.Namespace) -> None:
    """Load, report the load figures, then run one timed generation per 'run' line on stdin."""
    import torch

    torch.set_num_threads(options.threads)
    from cakep2p.engine.checkpoint import Checkpoint

    prompt = prompt_ids(options.prompt_tokens, Checkpoint.open(options.model_dir).args.vocab_size)
    before = rss_bytes("VmRSS:")
    started = time.perf_counter()
    side = (OursSide if options.worker == "ours" else TransformersSide)(options.model_dir, options.dtype)
    load = dict(load_s=time.perf_counter() - started, load_peak=rss_bytes("VmHWM:") - before, weights=side.weights)
    side.run(prompt[:16], 4)  # warm-up
    print(json.dumps(load), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(side.run(prompt, options.new_tokens)), flush=True)


def start_worker(side: str, model_dir: Path, dtype: str, options: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    command = [sys.executable, __file__, "--worker", side, "--model-dir", str(model_dir), "--dtype", dtype,
               "--new-tokens", str(options.new_tokens), "--prompt-tokens", str(options.prompt_tokens),
               "--threads", str(options.threads)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line:
        process.wait()
        sys.exit(f"{side} worker failed to load the model (exit {process.returncode})")
    return process, json.loads(line)


def measure(model_dir: Path, dtype: str, options: argparse.Namespace) -> dict[str, dict]:
    """Load each side in turn (clean load RSS), then alternate timed rounds so both meet the same machine load."""
    sides = options.sides.split(",")
    workers, results = {}, {}
    try:
        for side in sides:
            workers[side], results[side] = start_worker(side, model_dir, dtype, options)
            results[side].update(firsts=[], steps=[])
        for round_index in range(options.repeats):
            order = sides if round_index % 2 == 0 else sides[::-1]
            for side in order:
                workers[side].stdin.write("run\n")
                workers[side].stdin.flush()
                run = json.loads(workers[side].stdout.readline())
                results[side]["firsts"].append(run.pop("first_s"))
                results[side]["steps"] += run.pop("steps")
                results[side].update(run)
    finally:
        for process in workers.values():
            process.stdin.close()
            process.wait(timeout=120)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side, alternating sides")
    parser.add_argument("--preset", default="tinyllama")
    parser.add_argument("--sides", default="ours,transformers")
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return

    from cakep2p.testing import cached_random_model

    started = time.perf_counter()
    model_dir = cached_random_model("llama", options.preset, dtype="bfloat16")
    print(f"model: {model_dir} (ready in {time.perf_counter() - started:.1f} s)")
    print(f"threads {options.threads}, prompt {options.prompt_tokens} tokens, {options.new_tokens} new tokens, "
          f"greedy, CAKEP2P_PACK={os.environ.get('CAKEP2P_PACK', '1')}")
    dtypes = ["float32", "bfloat16"] if options.dtype == "both" else [options.dtype]
    header = (f"{'dtype':9} {'side':12} {'prefill tok/s':>13} {'decode tok/s':>12} {'(best step)':>11} "
              f"{'load s':>7} {'load peak MB':>12} {'weights MB':>10}")
    print(header, flush=True)
    for dtype in dtypes:
        rows: list[str] = []
        results = measure(model_dir, dtype, options)
        for side, result in results.items():
            result.update(prefill=options.prompt_tokens / min(result["firsts"]),
                          decode=1.0 / statistics.median(result["steps"]), best=1.0 / min(result["steps"]))
            rows.append(f"{dtype:9} {side:12} {result['prefill']:13.1f} {result['decode']:12.2f} "
                        f"{result['best']:11.2f} {result['load_s']:7.1f} {result['load_peak'] / 2**20:12.0f} "
                        f"{result['weights'] / 2**20:10.0f}")
        if len(results) == 2:
            ours, theirs = results["ours"], results["transformers"]
            rows.append(f"{dtype:9} {'ratio':12} {ours['prefill'] / theirs['prefill']:12.2f}x "
                        f"{ours['decode'] / theirs['decode']:11.2f}x {ours['best'] / theirs['best']:10.2f}x "
                        f"  load peak / weights: {ours['load_peak'] / ours['weights']:.2f} (ours)")
            rows.append(f"{'':9} greedy tokens identical: {ours['tokens'] == theirs['tokens']}")
            if ours["tokens"] != theirs["tokens"]:
                first = next(i for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"])) if a != b)
                rows.append(f"{'':9} first difference at new token {first}: transformers' top-2 logit margin there "
                            f"is {theirs['margins'][first]:.4f} (a near-tie of random weights)")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
