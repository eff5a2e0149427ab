"""Decode speed of one process vs 2 and 3 loopback nodes on a random TinyLlama-shaped model, and each stage's memory.

Usage: python bench/mesh_bench.py [--dtype bfloat16|float32] [--weights auto|int8|int4|...] [--new-tokens 32]
                                  [--prompt-tokens 16] [--nodes 1,2,3]
                                  [--threads 2] [--rounds 2] [--load disk|transfer] [--gomp-spincount N]
The initiator (this process) holds stage 0 with the embedding and the head; the other stages are stage servers in
their own subprocesses on 127.0.0.1 (own CAKEP2P_HOME, CURVE on), split as planner.plan does with equal budgets.
Configurations run in lockstep (one token each in turn, so they share the machine's load) on the same greedy prompt;
the best round of each is reported.
Only one stage computes at a time in a pipeline, so every process gets --threads threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cakep2p import OPENMP_DEFAULTS  # noqa: E402  (no torch: safe before GOMP_SPINCOUNT is set)

MIB = 2**20
BUDGET_BYTES = 8 << 30  # what every node offers: equal, and large enough that the split is the proportional one


def status_bytes(pid: int | str, key: str) -> int:
    """A `VmRSS:`/`VmHWM:` line of /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def prompt_ids(count: int, vocab_size: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(1234)
    return [1] + torch.randint(3, vocab_size, (count - 1,), generator=generator).tolist()


# -- the stage server subprocess ------------------------------------------------------------------------------


def serve_stage(options: argparse.Namespace) -> None:
    """Run one stage server on 127.0.0.1 until killed; prints {"port": N} once it listens."""
    import torch

    from cakep2p import security
    from cakep2p.mesh import StageLimits, StageServer

    torch.set_num_threads(options.threads)
    keys = security.derive_keys(os.environ["CAKEP2P_CLUSTER_CODE"])
    models_dirs = [options.model_dir] if options.model_dir else []

    async def serve() -> None:
        server = StageServer(node_id=options.stage_server, name=options.stage_server, keys=keys,
                             limits=StageLimits(budget_bytes=BUDGET_BYTES), address="127.0.0.1", port=0,
                             models_dirs=models_dirs, device="cpu")
        port = await server.start()
        print(json.dumps({"port": port, "threads": torch.get_num_threads()}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


def _die_with_parent() -> None:
    """preexec_fn: the stage is SIGKILLed if this benchmark dies (Linux); elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class StageProcess:
    """A stage server subprocess with its own CAKEP2P_HOME; kill() always reaps it."""

    def __init__(self, node_id: str, home: Path, code: str, threads: int, model_dir: Path | None) -> None:
        self.node_id = node_id
        env = dict(os.environ, CAKEP2P_HOME=str(home), CAKEP2P_CLUSTER_CODE=code, PYTHONPATH=str(REPO),
                   OMP_NUM_THREADS=str(threads))
        command = [sys.executable, str(Path(__file__).resolve()), "--stage-server", node_id,
                   "--threads", str(threads)]
        if model_dir is not None:
            command += ["--model-dir", str(model_dir)]
        self.log_path = home / "stage.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.port = 0
        self.idle_rss = 0

    def wait_listening(self) -> None:
        line = self.process.stdout.readline()
        try:
            self.port = json.loads(line)["port"]
        except (ValueError, KeyError):
            raise RuntimeError(f"stage {self.node_id} did not start:\n{self.log_path.read_text()[-2000:]}") from None
        self.idle_rss = status_bytes(self.process.pid, "VmRSS:")

    def peak_rss(self) -> int:
        return status_bytes(self.process.pid, "VmHWM:")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process.stdout.close()
        self._log.close()


# -- the configurations -----------------------------------------------------------------------------------------


@dataclass
class Config:
    """One way to run the model, its pipeline, and what each round measured."""

    nodes: int
    pipeline: object
    layout: str
    remote: list[tuple[StageProcess, object]] = field(default_factory=list)  # (process, its LayerRange)
    rounds: list[dict] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def build_single(model_dir: Path, dtype: str, weights: str, max_seq_len: int) -> Config:
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.generate import LocalPipeline
    from cakep2p.engine.loading import load_part, whole_model

    checkpoint = Checkpoint.open(model_dir)
    layers = checkpoint.args.num_layers
    part = load_part(checkpoint, whole_model(checkpoint.args), dtype=dtype, device="cpu", weights=weights)
    return Config(1, LocalPipeline([part], max_seq_len), f"[0-{layers} emb head]")


def build_mesh(nodes: int, model_dir: Path, dtype: str, weights: str, max_seq_len: int,
               processes: list[StageProcess], keys, load: str) -> Config:
    from cakep2p import planner
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.formats import resolve_format
    from cakep2p.engine.loading import load_part
    from cakep2p.engine.model import ModelPart
    from cakep2p.engine.sizes import model_spec
    from cakep2p.mesh import RemotePipeline, RemoteStage, stages_for_plan

    checkpoint = Checkpoint.open(model_dir)
    budgets = [planner.NodeBudget("node-0", "initiator", BUDGET_BYTES)]
    budgets += [planner.NodeBudget(process.node_id, process.node_id, BUDGET_BYTES) for process in processes]
    plan = planner.plan(model_spec(checkpoint, dtype, weights), budgets, "node-0", max_seq_len)
    if len(plan.stages) != nodes:
        raise RuntimeError(f"the plan uses {len(plan.stages)} of {nodes} nodes:\n{plan.table()}")
    endpoints = {process.node_id: ("127.0.0.1", process.port) for process in processes}
    stages = stages_for_plan(plan, endpoints, "node-0",
                             lambda layers: load_part(checkpoint, layers, dtype=dtype, device="cpu", weights=weights))
    pipeline = RemotePipeline(stages, checkpoint, max_seq_len, keys, weights=resolve_format(checkpoint, weights, dtype),
                              dtype=dtype, allow_transfer=load == "transfer")
    by_port = {process.port: process for process in processes}
    remote = [(by_port[stage.port], stage.layers) for stage in stages if isinstance(stage, RemoteStage)]
    layout = " ".join(_describe(stage.layers, "local" if isinstance(stage, ModelPart) else stage.name)
                      for stage in stages)
    if load == "disk" and set(pipeline.load_sources) - {"local", "models_dir"}:
        raise RuntimeError(f"stages loaded from {pipeline.load_sources}, expected their own models dir")
    return Config(nodes, pipeline, layout, remote)


def _describe(spec, where: str) -> str:
    extras = (" emb" if spec.has_embedding else "") + (" head" if spec.has_head else "")
    layers = f"{spec.start}-{spec.end}" if spec.end > spec.start else "-"
    return f"[{layers}{extras} {where}]"


def run_round(configs: list[Config], prompt: list[int], new_tokens: int) -> list[dict]:
    """Generate with every configuration in lockstep, one token each in turn, so they share the machine's load."""
    from cakep2p.engine.generate import generate
    from cakep2p.engine.sampling import SamplingParams

    runs = []
    for config in configs:
        pipeline = config.pipeline
        if hasattr(pipeline, "stage_seconds"):
            pipeline.stage_seconds = [0.0] * len(pipeline.stage_seconds)
        tokens = generate(pipeline, prompt, SamplingParams(max_new_tokens=new_tokens), speculate=False)  # step by step
        runs.append(dict(generator=tokens, pipeline=pipeline, durations=[], tokens=[], after_prefill=[]))
    for step in range(new_tokens):
        for run in runs:
            began = time.perf_counter()
            run["tokens"].append(next(run["generator"]))  # step 0: the prefill; later: one decode forward each
            run["durations"].append(time.perf_counter() - began)
            if step == 0:
                run["after_prefill"] = list(getattr(run["pipeline"], "stage_seconds", []))
    results = []
    for run in runs:
        decode = run["durations"][1:]
        totals = getattr(run["pipeline"], "stage_seconds", [])
        results.append(dict(tokens=run["tokens"], prefill_s=run["durations"][0],
                            decode_tok_s=len(decode) / sum(decode) if decode else 0.0,
                            decode_steps=decode, steps=len(decode),
                            decode_stage_s=[total - first for total, first in zip(totals, run["after_prefill"])]))
    return results


def ping_rtt(process: StageProcess, keys, count: int = 200) -> float:
    """Median round trip of a ping to a stage (the fixed cost of one hop, without compute)."""
    from cakep2p.mesh import StageClient

    client = StageClient("127.0.0.1", process.port, keys, name=process.node_id)
    try:
        client.ping()
        samples = []
        for _ in range(count):
            began = time.perf_counter()
            client.ping()
            samples.append(time.perf_counter() - began)
        return statistics.median(samples)
    finally:
        client.close()


# -- report -----------------------------------------------------------------------------------------------------


def report(configs: list[Config], prompt: list[int], options: argparse.Namespace, spec) -> bool:
    """Print the speed table, the token check and each stage's memory; True when the tokens are identical."""

    best = {config.nodes: max(config.rounds, key=lambda result: result["decode_tok_s"]) for config in configs}
    steps = {config.nodes: [step for result in config.rounds for step in result["decode_steps"]] for config in configs}
    median = {nodes: 1.0 / statistics.median(durations) for nodes, durations in steps.items()}
    paired = {nodes: 1.0 / statistics.median([mine / theirs for mine, theirs in zip(durations, steps[1])])
              for nodes, durations in steps.items()} if 1 in steps else {}
    print(f"\n{'config':8} {'prefill s':>9} {'best round tok/s':>16} {'vs 1':>6} {'median tok/s':>12} {'vs 1':>6} "
          f"{'paired vs 1':>11}  {'each round tok/s':16}  layout")
    for config in configs:
        nodes, result = config.nodes, best[config.nodes]
        rounds = " ".join(f"{r['decode_tok_s']:.2f}" for r in config.rounds)
        versus = (f"{result['decode_tok_s'] / best[1]['decode_tok_s']:5.3f}x {median[nodes]:12.2f} "
                  f"{median[nodes] / median[1]:5.3f}x {paired[nodes]:10.3f}x") if paired else f"{median[nodes]:12.2f}"
        print(f"{nodes} node{'s' if nodes > 1 else ' '}  {result['prefill_s']:9.2f} {result['decode_tok_s']:16.2f} "
              f"{versus}  {rounds:16}  {config.layout}")
    print("(best round: new tokens / decode time of the fastest round; median: 1 / median step over all rounds; "
          "paired: 1 / median of this config's step time over the 1-node step taken just before it)")
    for config in configs:
        if config.nodes > 1:
            count = sum(result["steps"] for result in config.rounds)
            seconds = [sum(values) for values in zip(*(result["decode_stage_s"] for result in config.rounds))]
            per_token = ", ".join(f"{total / count * 1000:.1f}" for total in seconds)
            print(f"{config.nodes} nodes: mean ms per token in each stage (remote ones include the hop): {per_token}")

    reference = configs[0].tokens[0]
    identical = all(tokens == reference for config in configs for tokens in config.tokens)
    print(f"\ngreedy tokens identical across configurations and rounds: {identical}")
    if not identical:
        for config in configs:
            print(f"  {config.nodes} node(s): {config.tokens[0]}")

    print(f"\n{'stage':10} {'layers':>7} {'weights MB':>10} {'KV MB':>6} {'idle base MB':>12} {'peak RSS MB':>11} "
          f"{'(peak-base)/weights':>19} {'<= 1.2x+base':>12}")
    memory_ok = True
    for config in configs:
        for process, part in config.remote:
            share = (sum(spec.layer_bytes[part.start:part.end])  # the planner's figures for what the stage holds
                     + spec.embedding_bytes * part.has_embedding + spec.head_bytes * part.has_head)
            kv = spec.kv_bytes_per_token * (part.end - part.start) * (len(prompt) + options.new_tokens)
            peak, base = process.peak_rss(), process.idle_rss
            within = peak <= 1.2 * share + base
            memory_ok &= within
            print(f"{process.node_id:10} {f'{part.start}-{part.end}':>7} {share / MIB:10.0f} {kv / MIB:6.1f} "
                  f"{base / MIB:12.0f} {peak / MIB:11.0f} {(peak - base) / share:19.3f} {str(within):>12}")
    print(f"initiator (all local parts of every configuration): peak RSS {status_bytes('self', 'VmHWM:') / MIB:.0f} MB")
    if 3 in paired:
        print(f"\ngoal 3 nodes >= 0.9x single decode (paired): {paired[3] >= 0.9} ({paired[3]:.3f}x; best rounds "
              f"{best[3]['decode_tok_s'] / best[1]['decode_tok_s']:.3f}x, medians {median[3] / median[1]:.3f}x)")
    print(f"stage peak RSS <= 1.2x weights + idle base: {memory_ok}")
    return identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--weights", default="auto", help="weight format (engine/formats.py): auto, int8, int4...")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--nodes", default="1,2,3", help="comma-separated node counts to compare")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds per configuration")
    parser.add_argument("--load", default="disk", choices=["disk", "transfer"],
                        help="stages load from their own copy (disk) or receive the tensors over the mesh")
    parser.add_argument("--gomp-spincount", type=int, default=int(OPENMP_DEFAULTS["GOMP_SPINCOUNT"]),
                        help="GOMP_SPINCOUNT for every process (default: what `cakep2p` sets; 0 = libgomp's own)")
    parser.add_argument("--preset", default="tinyllama")
    parser.add_argument("--stage-server", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.stage_server:
        serve_stage(options)
        return
    if options.gomp_spincount:  # before torch loads libgomp here and in the stages
        os.environ["GOMP_SPINCOUNT"] = str(options.gomp_spincount)
    sys.exit(0 if bench(options) else 1)


def bench(options: argparse.Namespace) -> bool:
    import torch

    from cakep2p import security
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.formats import resolve_format
    from cakep2p.engine.sizes import model_spec
    from cakep2p.testing import cached_random_model

    torch.set_num_threads(options.threads)
    node_counts = sorted({int(count) for count in options.nodes.split(",")})
    started = time.perf_counter()
    model_dir = cached_random_model("llama", options.preset, dtype=options.dtype)
    checkpoint = Checkpoint.open(model_dir)
    args = checkpoint.args
    spec = model_spec(checkpoint, options.dtype, options.weights)
    prompt = prompt_ids(options.prompt_tokens, args.vocab_size)
    max_seq_len = options.prompt_tokens + options.new_tokens
    print(f"model {model_dir.name} ({time.perf_counter() - started:.1f} s); {options.dtype} compute, "
          f"{resolve_format(checkpoint, options.weights, options.dtype)} weights, {options.threads} threads "
          f"per process, prompt {len(prompt)} tokens, {options.new_tokens} new tokens greedy, {options.rounds} rounds, "
          f"stages load from {options.load}; GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f}")

    code = security.new_code()
    keys = security.derive_keys(code)
    processes: list[StageProcess] = []
    configs: list[Config] = []
    with tempfile.TemporaryDirectory(prefix="cakep2p-mesh-bench-") as scratch:
        try:
            for count in node_counts:
                group = []
                for index in range(1, count):
                    home = Path(scratch, f"n{count}-{index}")
                    home.mkdir()
                    group.append(StageProcess(f"n{count}-stage{index}", home, code, options.threads,
                                              model_dir if options.load == "disk" else None))
                    processes.append(group[-1])
                for process in group:
                    process.wait_listening()
                began = time.perf_counter()
                if count == 1:
                    configs.append(build_single(model_dir, options.dtype, options.weights, max_seq_len))
                else:
                    configs.append(build_mesh(count, model_dir, options.dtype, options.weights, max_seq_len, group,
                                              keys, options.load))
                print(f"{count} node(s) loaded in {time.perf_counter() - began:.1f} s: {configs[-1].layout}",
                      flush=True)
            if processes:
                rtt = ping_rtt(processes[0], keys)
                print(f"ping round trip to a stage (CURVE, loopback): {rtt * 1e6:.0f} us median")
            run_round(configs, prompt[: min(8, len(prompt))], 4)  # warm-up: oneDNN primitives, first sessions
            for number in range(options.rounds):
                results = run_round(configs, prompt, options.new_tokens)
                for config, result in zip(configs, results):
                    config.rounds.append(result)
                    config.tokens.append(result["tokens"])
                speeds = ", ".join(f"{config.nodes}: {result['decode_tok_s']:.2f}"
                                   for config, result in zip(configs, results))
                print(f"round {number + 1} decode tok/s by node count {speeds}; load average "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
            return report(configs, prompt, options, spec)
        finally:
            for config in configs:
                try:
                    config.pipeline.close()
                except Exception as error:  # the stages are killed next anyway
                    print(f"closing {config.nodes} node(s): {error}", file=sys.stderr)
            for process in processes:
                process.kill()


if __name__ == "__main__":
    main()
