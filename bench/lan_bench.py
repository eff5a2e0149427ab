"""Decode speed over an emulated LAN: 3 stage servers, each behind a DelayLink (tests/kit/links.py) of --delay-ms one
way, star vs chain forwarding against the prediction from compute per token; speculative decoding over the chain.

Usage: python bench/lan_bench.py [--preset tinyllama|tiny] [--delay-ms 2] [--new-tokens 32] [--prompt-tokens 16]
                                 [--rounds 3] [--spec-tokens 64] [--spec-rounds 2] [--spec-model DIR] [--threads 2]
                                 [--dtype bfloat16|float32] [--weights auto|int8|...]
This process is the initiator and holds no layers: stage 0 (embedding and the first layers), 1 and 2 (the last
layers and the head) are bench/mesh_bench.py's stage servers in their own subprocesses, loading from their own
copy. Every message into and out of a stage crosses its link, so a token costs 2 x stages delays on the star
(initiator <-> each stage) and stages + 1 on the chain (each stage passes its hidden state on; the last answers).
Configurations run in lockstep as in mesh_bench; tok/s is 1 / the median decode step over all rounds. The chain
without delay (direct ports) gives the compute per token of the prediction 1 / (compute + (stages + 1) x delay).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cakep2p import OPENMP_DEFAULTS  # noqa: E402  (no torch: safe before GOMP_SPINCOUNT is set)

STAGES = 3


def even_split(num_layers: int, stages: int) -> list:
    """Contiguous layer ranges, the embedding on the first and the head on the last."""
    from cakep2p.planner import LayerRange

    bounds = [round(index * num_layers / stages) for index in range(stages + 1)]
    return [LayerRange(start, end, index == 0, index == stages - 1)
            for index, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def repetitive_prompt(vocab_size: int) -> list[int]:
    """bench/speculative_bench.py's prompt: a random paragraph twice, then its first half again."""
    import torch

    paragraph = torch.randint(3, vocab_size, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    return [1] + paragraph + paragraph + paragraph[:24]


def pipeline_over(ports: list[int], layers: list, checkpoint, max_seq_len: int, keys, options, chain: bool):
    """A RemotePipeline over the stages at these loopback ports, chained or the star."""
    from cakep2p.engine.formats import resolve_format
    from cakep2p.mesh import RemotePipeline, RemoteStage

    stages = [RemoteStage("127.0.0.1", port, part, f"stage{index}")
              for index, (port, part) in enumerate(zip(ports, layers))]
    pipeline = RemotePipeline(stages, checkpoint, max_seq_len, keys, allow_transfer=False, dtype=options.dtype,
                              weights=resolve_format(checkpoint, options.weights, options.dtype), chain=chain)
    if set(pipeline.load_sources) - {"models_dir", "memory"}:   # their own copy, or already held from it
        raise RuntimeError(f"stages loaded from {pipeline.load_sources}, expected their own models dir")
    return pipeline


def median_step(config) -> float:
    return statistics.median(step for result in config.rounds for step in result["decode_steps"])


def paired_ratio(slow, fast) -> float:
    """Median of slow/fast over the steps taken side by side (lockstep): how many times faster `fast` is."""
    pairs = [(mine, theirs) for a, b in zip(slow.rounds, fast.rounds)
             for mine, theirs in zip(a["decode_steps"], b["decode_steps"])]
    return statistics.median(mine / theirs for mine, theirs in pairs)


def decode_speeds(ports: dict[str, list[int]], layers, checkpoint, keys, options, chain: bool) -> bool:
    """Star and chain over the delayed links, and the undelayed reference (the star's when not `chain`), in
    lockstep; prints the table, the ratio and the predictions. True when every configuration gave the same tokens."""
    from bench.mesh_bench import Config, prompt_ids, run_round

    delay = options.delay_ms / 1000
    prompt = prompt_ids(options.prompt_tokens, checkpoint.args.vocab_size)
    max_seq_len = options.prompt_tokens + options.new_tokens
    wanted = [("star", "delayed", False), ("chain", "delayed", True), ("chain", "direct", True)] if chain else \
        [("star", "delayed", False), ("star", "direct", False)]
    configs = []
    try:
        for path, link, chained in wanted:
            pipeline = pipeline_over(ports[link], layers, checkpoint, max_seq_len, keys, options, chained)
            delay_text = f"{options.delay_ms:g} ms" if link == "delayed" else "0 ms"
            configs.append(Config(STAGES, pipeline, f"{path}, {delay_text}"))
        run_round(configs, prompt[: min(8, len(prompt))], 4)   # warm-up
        for number in range(options.rounds):
            for config, result in zip(configs, run_round(configs, prompt, options.new_tokens)):
                config.rounds.append(result)
                config.tokens.append(result["tokens"])
            speeds = ", ".join(f"{config.layout}: {config.rounds[-1]['decode_tok_s']:.2f}" for config in configs)
            print(f"round {number + 1} decode tok/s {speeds}; load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for config in configs:
            config.pipeline.close()

    print(f"\n{'config':16} {'median tok/s':>12} {'median step ms':>14} {'prefill s':>9}")
    for config in configs:
        prefill = min(result["prefill_s"] for result in config.rounds)
        print(f"{config.layout:16} {1 / median_step(config):12.2f} {median_step(config) * 1000:14.2f} {prefill:9.2f}")
    star_config, delayed, direct = (configs[0], configs[1], configs[2]) if chain else (configs[0], None, configs[1])
    compute = median_step(direct)
    print(f"compute per token ({direct.layout}): {compute * 1000:.2f} ms")
    predict_star, measured_star = 1 / (compute + 2 * STAGES * delay), 1 / median_step(star_config)
    print(f"star: measured {measured_star:.2f} tok/s, predicted 1/(compute + {2 * STAGES} x delay) "
          f"{predict_star:.2f}: {measured_star / predict_star:.3f}x")
    if delayed is None:
        print("chain: not measured (--no-chain): star path only")
    else:
        ratio, paired = median_step(star_config) / median_step(delayed), paired_ratio(star_config, delayed)
        predicted = 1 / (compute + (STAGES + 1) * delay)
        measured = 1 / median_step(delayed)
        print(f"chain/star: {ratio:.3f}x (paired {paired:.3f}x); goal >= 1.3x: {ratio >= 1.3}")
        print(f"chain: measured {measured:.2f} tok/s, predicted 1/(compute + {STAGES + 1} x delay) {predicted:.2f}: "
              f"{measured / predicted:.3f}x; goal within 15%: {abs(measured / predicted - 1) <= 0.15}")
    reference = configs[0].tokens[0]
    identical = all(tokens == reference for config in configs for tokens in config.tokens)
    print(f"greedy tokens identical across configurations and rounds: {identical}")
    return identical


PARAGRAPH = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. Every "
             "evening the keeper climbed the narrow stairs, trimmed the wick and watched the ships pass far out on "
             "the grey sea.")
REAL_MODEL = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct-Q4_1"


def real_prompt(checkpoint) -> list[int]:
    """The issue's repetitive request through the model's own chat template: repeat a paragraph, one word changed."""
    from cakep2p.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    request = f"Repeat this paragraph exactly, changing only the word 'grey' to 'blue':\n\n{PARAGRAPH}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": request}])
    return tokenizer.encode(text, add_special_tokens=False)


def speculation(ports: list[int], layers, checkpoint, keys, options, chain: bool) -> bool:
    """Greedy decode of a repetitive prompt over the delayed links with and without speculation, alternating, on
    the chain (`chain` True) or the star; prints the ratio. True when the tokens are identical. With --spec-model
    (a real instruction-tuned model, sent to the stages) the prompt asks it to repeat a paragraph; else the random
    model gets bench/speculative_bench.py's paragraph-twice prompt."""
    from bench.speculative_bench import timed
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.formats import resolve_format
    from cakep2p.mesh import RemotePipeline, RemoteStage

    if options.spec_model:
        checkpoint = Checkpoint.open(options.spec_model)
        layers = even_split(checkpoint.args.num_layers, STAGES)
        prompt = real_prompt(checkpoint)
        stages = [RemoteStage("127.0.0.1", port, part, f"stage{index}")
                  for index, (port, part) in enumerate(zip(ports, layers))]
        pipeline = RemotePipeline(stages, checkpoint, len(prompt) + options.spec_tokens, keys, dtype="auto",
                                  weights=resolve_format(checkpoint, "auto", "auto"), chain=chain)
    else:
        prompt = repetitive_prompt(checkpoint.args.vocab_size)
        pipeline = pipeline_over(ports, layers, checkpoint, len(prompt) + options.spec_tokens, keys, options, chain)
    runs: dict[bool, list[tuple[list[int], float, int]]] = {False: [], True: []}   # (tokens, tok/s, verify passes)
    try:
        timed(pipeline, prompt, 4, speculate=False)   # warm-up
        for _ in range(options.spec_rounds):
            for speculate in (False, True):
                runs[speculate].append(timed(pipeline, prompt, options.spec_tokens, speculate))
    finally:
        pipeline.close()
    plain, drafted = (statistics.median(rate for _, rate, _ in runs[speculate]) for speculate in (False, True))
    identical = all(tokens == runs[False][0][0] for either in runs.values() for tokens, _, _ in either)
    rounds = " / ".join(", ".join(f"{rate:.2f}" for _, rate, _ in runs[speculate]) for speculate in (False, True))
    print(f"\nspeculation over the {'chain' if chain else 'star'}, {options.delay_ms:g} ms links, "
          f"{checkpoint.name}, {len(prompt)}-token repetitive prompt, {options.spec_tokens} new tokens: without "
          f"{plain:.2f} tok/s, with {drafted:.2f} tok/s (rounds without / with: {rounds}); {runs[True][-1][2]} "
          f"verify passes in the last run")
    print(f"speculation ratio {drafted / plain:.3f}x; goal >= 1.5x: {drafted / plain >= 1.5}; "
          f"identical tokens: {identical}")
    return identical


def bench(options: argparse.Namespace) -> bool:
    import torch

    from bench.mesh_bench import StageProcess, ping_rtt
    from cakep2p import security
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.formats import resolve_format
    from cakep2p.testing import cached_random_model
    from tests.kit.links import DelayLink

    torch.set_num_threads(options.threads)
    model_dir = cached_random_model("llama", options.preset, dtype=options.dtype)
    checkpoint = Checkpoint.open(model_dir)
    layers = even_split(checkpoint.args.num_layers, STAGES)
    chain = not options.no_chain
    weights = resolve_format(checkpoint, options.weights, options.dtype)
    print(f"model {model_dir.name}; {options.dtype} compute, {weights} weights; {STAGES} stages "
          f"{' '.join(part.describe() for part in layers)}; links {options.delay_ms:g} ms one way; {options.threads} "
          f"threads per process; chain forwarding {'on' if chain else 'off'}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    code = security.new_code()
    keys = security.derive_keys(code)
    processes, links = [], []
    with tempfile.TemporaryDirectory(prefix="cakep2p-lan-bench-") as scratch:
        try:
            for index in range(STAGES):
                home = Path(scratch, f"stage{index}")
                home.mkdir()
                processes.append(StageProcess(f"stage{index}", home, code, options.threads, model_dir))
            for process in processes:
                process.wait_listening()
                links.append(DelayLink("127.0.0.1", process.port, options.delay_ms / 1000).start())
            ports = {"direct": [process.port for process in processes], "delayed": [link.port for link in links]}
            direct_rtt = ping_rtt(processes[0], keys, count=50)
            linked_rtt = ping_rtt(SimpleNamespace(node_id="stage0", port=links[0].port), keys, count=50)
            print(f"ping round trip to stage0: direct {direct_rtt * 1000:.2f} ms, through its link "
                  f"{linked_rtt * 1000:.2f} ms (2 x delay = {2 * options.delay_ms:g} ms)", flush=True)
            same = decode_speeds(ports, layers, checkpoint, keys, options, chain)
            if options.spec_rounds:
                same &= speculation(ports["delayed"], layers, checkpoint, keys, options, chain)
            return same
        finally:
            for link in links:
                link.stop()
            for process in processes:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama", help="cakep2p.testing preset: tinyllama, tiny")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="one-way delay of every stage's link")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--weights", default="auto", help="weight format (engine/formats.py): auto, int8, int4...")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per configuration")
    parser.add_argument("--spec-tokens", type=int, default=64, help="new tokens of each speculation run")
    parser.add_argument("--spec-rounds", type=int, default=2, help="runs with and without speculation (0: none)")
    parser.add_argument("--spec-model", type=Path, default=REAL_MODEL if REAL_MODEL.is_dir() else None,
                        help="a real model folder for the speculation runs (default: the shared SmolLM2 when there)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    parser.add_argument("--no-chain", action="store_true", help="the star path only, even where chain is there")
    options = parser.parse_args()
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_DEFAULTS["GOMP_SPINCOUNT"])  # as `cakep2p` sets it, stages too
    started = time.perf_counter()
    ok = bench(options)
    print(f"({time.perf_counter() - started:.0f} s)")
    if not ok:
        sys.exit("tokens differ between configurations")


if __name__ == "__main__":
    main()
