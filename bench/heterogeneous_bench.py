"""Each strategy's plan measured on a heterogeneous loopback cluster, side by side in one run, with the prediction.

Usage: python bench/heterogeneous_bench.py [--preset tinyllama] [--dtype auto] [--new-tokens 8] [--quota 0.25]
                                          [--offer-layers N]  (each node offers room for N layers: 0 = 8 GiB)
This process is the initiator; 3 stage servers run in subprocesses on 127.0.0.1 (bench/mesh_bench.py's), and the
last is throttled to --quota of a core with cgroup v1 (cpu.cfs_quota_us; needs root). Each node's speed is measured
sustained (bytes or FLOPs over wall time for a second, in its cgroup): the capacity benchmark's best-of-bursts
would not see a CPU quota. RTTs come from the authenticated pings (`timed_ping`). Then every distinct plan of
proportional, compute, fewest, fastest and the best single node decodes the same greedy prompt, and the measured
tok/s is printed beside the predicted one. Issue 14 asks: fastest >= 0.95x the best other, prediction within 25%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mesh_bench import StageProcess, prompt_ids  # noqa: E402  (bench/ is this script's own folder)

CGROUP = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
OFFER_BYTES = 8 << 30
MEASURE_S = 1.0


def sustained_speed(seconds: float, dtype: str) -> tuple[float, float]:
    """(float32 matmul GFLOP/s, decode weight-read bytes/s), each as work over wall time for `seconds`: what a quota
    allows. The read rate is cakep2p.discovery.capacity's: one token's matrix-vector product through the engine's
    kernel for the checkpoint's weights in the compute dtype the stages will use (`dtype`; auto as loading picks)."""
    import torch

    from cakep2p.engine.kernels import has_bf16_hardware, linear, prepare

    def rate(step, work: float) -> float:
        step()
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            step()
            done += 1
        return done * work / (time.perf_counter() - began)

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    stored = torch.float32 if dtype == "float32" else torch.bfloat16
    compute = torch.bfloat16 if dtype == "bfloat16" or (dtype == "auto" and has_bf16_hardware()) else torch.float32
    weight = (torch.randn(8192, 4096) * 0.02).to(stored)
    prepared, x = prepare(weight, compute, torch.device("cpu")), torch.randn(1, 4096).to(compute)
    with torch.inference_mode():
        reads = rate(lambda: linear(x, prepared), weight.numel() * weight.element_size())
    return rate(lambda: torch.mm(a, b), 2 * 512**3 / 1e9), reads


class Throttle:
    """A cgroup v1 cpu group limited to `quota` of one core; processes join it by pid, and leave it on close()."""

    def __init__(self, quota: float) -> None:
        self.path = CGROUP / f"cakep2p-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (self.path / "cpu.cfs_quota_us").write_text(str(int(PERIOD_US * quota)))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (CGROUP / "cgroup.procs").write_text(pid)
            except OSError:  # it has exited meanwhile
                pass
        self.path.rmdir()


def measure_in(throttle: Throttle | None, threads: int, dtype: str) -> tuple[float, float]:
    """sustained_speed in a fresh process (in `throttle`'s group when given), as a stage would see it."""
    command = [sys.executable, __file__, "--measure", "--threads", str(threads), "--dtype", dtype]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if throttle is not None:
        throttle.add(process.pid)
    output, _ = process.communicate("go\n", timeout=120)
    gflops, bandwidth = json.loads(output)
    return gflops, bandwidth


def measure_rtts(processes: list[StageProcess], keys) -> dict[str, float | None]:
    import zmq.asyncio

    from cakep2p.mesh import timed_ping

    async def all_of() -> list:
        context = zmq.asyncio.Context()
        try:
            return [await timed_ping(context, "127.0.0.1", process.port, keys, 5.0, rounds=20)
                    for process in processes]
        finally:
            context.destroy(linger=0)
    return {process.node_id: rtt for process, (_, rtt) in zip(processes, asyncio.run(all_of()))}


def decode_speed(plan, model_dir: Path, processes: list[StageProcess], keys, options, prompt: list[int]) -> float:
    """Load `plan` on the stages, decode --new-tokens greedy tokens and return the decode tok/s (prefill left out)."""
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.formats import resolve_format
    from cakep2p.engine.generate import generate
    from cakep2p.engine.loading import load_part
    from cakep2p.engine.sampling import SamplingParams
    from cakep2p.mesh import RemotePipeline, stages_for_plan

    checkpoint = Checkpoint.open(model_dir)
    endpoints = {process.node_id: ("127.0.0.1", process.port) for process in processes}
    stages = stages_for_plan(plan, endpoints, "initiator", lambda layers: load_part(
        checkpoint, layers, dtype=options.dtype, device="cpu", weights="auto"))
    pipeline = RemotePipeline(stages, checkpoint, len(prompt) + options.new_tokens + 2, keys,
                              weights=resolve_format(checkpoint, "auto", options.dtype), dtype=options.dtype,
                              allow_transfer=False)
    try:
        list(generate(pipeline, prompt[:4], SamplingParams(max_new_tokens=2), speculate=False))  # warm-up
        steps, began = [], time.perf_counter()
        for _ in generate(pipeline, prompt, SamplingParams(max_new_tokens=options.new_tokens + 1), speculate=False):
            steps.append(time.perf_counter() - began)
            began = time.perf_counter()
        return options.new_tokens / sum(steps[1:])
    finally:
        pipeline.close()


def bench(options: argparse.Namespace) -> None:
    import torch

    from cakep2p import planner, security
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.sizes import model_spec
    from cakep2p.testing import cached_random_model

    torch.set_num_threads(options.threads)
    stored = "float32" if options.dtype == "float32" else "bfloat16"
    model_dir = cached_random_model("llama", options.preset, dtype=stored)
    checkpoint = Checkpoint.open(model_dir)
    spec = model_spec(checkpoint, options.dtype)
    prompt = prompt_ids(8, checkpoint.args.vocab_size)
    code = security.new_code()
    keys = security.derive_keys(code)
    throttle = Throttle(options.quota)
    processes: list[StageProcess] = []
    with tempfile.TemporaryDirectory(prefix="cakep2p-hetero-bench-") as scratch:
        try:
            for index in range(1, 4):
                home = Path(scratch, f"stage{index}")
                home.mkdir()
                processes.append(StageProcess(f"stage{index}", home, code, options.threads, model_dir))
            for process in processes:
                process.wait_listening()
            slow = processes[-1]
            throttle.add(slow.process.pid)
            fast = measure_in(None, options.threads, options.dtype)
            throttled = measure_in(throttle, options.threads, options.dtype)
            rtts = measure_rtts(processes, keys)
            print(f"model {model_dir.name}: {spec.num_layers} layers, {options.dtype}; sustained speed "
                  f"{fast[0]:.1f} GFLOP/s {fast[1] / 1e9:.2f} GB/s, throttled to {options.quota:.0%} of a core "
                  f"({slow.node_id}): {throttled[0]:.1f} GFLOP/s {throttled[1] / 1e9:.2f} GB/s; RTTs "
                  + ", ".join(f"{name} {rtt * 1e6:.0f} us" for name, rtt in rtts.items()), flush=True)
            context = len(prompt) + options.new_tokens + 2
            offer = (planner.layer_memory(spec, context)[0] * options.offer_layers if options.offer_layers
                     else OFFER_BYTES)
            budgets = [planner.NodeBudget("initiator", "initiator", offer + planner.initiator_memory(spec), *fast,
                                          rtt_s=0.0)]
            budgets += [planner.NodeBudget(process.node_id, process.node_id, offer,
                                           *(throttled if process is slow else fast), rtt_s=rtts[process.node_id])
                        for process in processes]
            plans = {strategy: planner.plan(spec, budgets, "initiator", context, strategy)
                     for strategy in ("proportional", "compute", "fewest", "fastest")}
            single = planner.best_single_node(spec, budgets, "initiator", context)
            if single is not None:
                plans["single node"] = single
            measured: dict[tuple, float] = {}
            results = {}
            for label, plan in plans.items():
                layout = tuple((stage.node_id, stage.layers.start, stage.layers.end) for stage in plan.stages)
                if layout not in measured:
                    measured[layout] = decode_speed(plan, model_dir, processes, keys, options, prompt)
                results[label] = (plan, measured[layout])
                print(f"{label:13s} predicted {plan.predicted_tokens_per_s:7.2f} tok/s, measured "
                      f"{measured[layout]:7.2f} tok/s (error {measured[layout] / plan.predicted_tokens_per_s - 1:+.0%})"
                      f"  {' '.join(f'{node}[{start}-{end})' for node, start, end in layout)}", flush=True)
            best_other = max(speed for label, (_, speed) in results.items() if label != "fastest")
            plan, speed = results["fastest"]
            print(f"fastest / best other, measured: {speed / best_other:.2f}x (goal >= 0.95); prediction error "
                  f"{abs(speed / plan.predicted_tokens_per_s - 1):.0%} (goal <= 25%)")
        finally:
            for process in processes:
                process.kill()
            throttle.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="compute dtype of every stage (auto: as loading picks it on this CPU)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    parser.add_argument("--quota", type=float, default=0.25, help="CPU share of the throttled stage, of one core")
    parser.add_argument("--offer-layers", type=int, default=0, help="room each node offers, in layers (0: 8 GiB)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        import torch

        torch.set_num_threads(options.threads)
        sys.stdin.readline()  # wait until the parent has put this process in its cgroup
        print(json.dumps(sustained_speed(MEASURE_S, options.dtype)))
        return
    bench(options)


if __name__ == "__main__":
    main()
