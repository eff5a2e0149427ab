"""Aggregate decode speed of two pinned stage servers serving 1 session vs N concurrent sessions (issue 14).

Usage: python bench/overlap_bench.py [--sessions 2,4] [--new-tokens 32] [--prompt-tokens 16] [--rounds 3]
                                     [--preset tinyllama|tiny] [--dtype bfloat16|float32] [--weights auto|int8|...]
                                     [--cpus 0,1] [--lease shared|own] [--chain on|off]
Two stage servers (bench/mesh_bench.py's StageProcess) run in their own subprocesses, each pinned to one core with
one torch thread: stage 0 holds layers [0, n/2) and the embedding, stage 1 [n/2, n) and the head. This process is
only the initiator (no model compute): one session is one RemotePipeline, with its own KV caches on both stages,
decoded greedily by its own thread. Why N sessions overlap: a single session's token goes through stage 0, then
stage 1, so each core idles while the other computes; with two or more sessions in flight stage 0 computes session
B's step while stage 1 computes session A's, and both cores stay busy (at best 2x the aggregate of one session).
Sessions share one Lease, as cluster/remote.py's ClusterModel opens all of a model's sessions under one (its
keeper connections renew it); --lease own gives each pipeline its own. Configurations alternate within each round
(the order reversed every other round); the table shows medians over rounds, and every concurrent session's greedy
tokens are checked against the same prompt decoded alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh_bench import StageProcess  # noqa: E402  (puts the repository on sys.path too)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GOAL = 1.7


@contextlib.contextmanager
def pinned(cpu: int):
    """This thread on `cpu` only for the block: a process started inside inherits the mask from its first
    instruction, so every thread it ever makes (zmq's, asyncio's, the compute executor's) is pinned too."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def thread_cpus(pid: int) -> set[str]:
    """The distinct Cpus_allowed_list of every thread of `pid`."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    lists.add(line.split()[1])
    return lists


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def session_prompt(index: int, count: int, vocab_size: int) -> list[int]:
    """A random prompt of `count` tokens (BOS first), a different one for each session index."""
    import torch

    generator = torch.Generator().manual_seed(1234 + index)
    return [1] + torch.randint(3, vocab_size, (count - 1,), generator=generator).tolist()


# -- one concurrent run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run of `sessions` concurrent greedy decodes measured."""

    sessions: int
    tokens: list[list[int]]
    wall_s: float
    decode_tokens: int
    stage_cpu: list[float]   # each stage's CPU seconds / wall seconds during the decode
    initiator_cpu: float

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.wall_s


def run_sessions(pipelines: list, prompts: list[list[int]], new_tokens: int, stage_pids: list[int]) -> Run:
    """Greedy decode prompts[i] on pipelines[i], one thread each; every session prefills first, then all decode
    from one barrier: the decode's wall time (to the last session's end) and each stage's CPU time over it."""
    from cakep2p.engine.generate import generate
    from cakep2p.engine.sampling import SamplingParams

    count = len(pipelines)
    barrier = threading.Barrier(count + 1)
    tokens: list[list[int]] = [[] for _ in range(count)]
    ended = [0.0] * count
    errors: list[BaseException] = []

    def decode(index: int) -> None:
        try:
            steps = generate(pipelines[index], prompts[index], SamplingParams(max_new_tokens=new_tokens),
                             speculate=False)
            tokens[index].append(next(steps))   # the prefill
            barrier.wait()
            tokens[index].extend(steps)        # one forward per token
            ended[index] = time.perf_counter()
        except BaseException as error:  # reported by the main thread; the others must not wait forever
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=decode, args=(index,), name=f"session-{index}") for index in range(count)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    cpu_before = [cpu_seconds(pid) for pid in stage_pids]
    own_before = time.process_time()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    wall = max(ended) - began
    stage_cpu = [(cpu_seconds(pid) - before) / wall for pid, before in zip(stage_pids, cpu_before)]
    return Run(count, tokens, wall, sum(len(session) - 1 for session in tokens), stage_cpu,
               (time.process_time() - own_before) / wall)


# -- the cluster: two pinned stages, pipelines over them ----------------------------------------------------------


@dataclass
class Cluster:
    """The two stage processes, the lease the pipelines share, its keepers, and the pipelines (one per session)."""

    processes: list[StageProcess]
    lease: object | None
    keepers: list = field(default_factory=list)
    pipelines: list = field(default_factory=list)

    def close(self) -> None:
        for pipeline in self.pipelines:
            with contextlib.suppress(Exception):  # the stages are killed next anyway
                pipeline.close()
        for keeper in self.keepers:
            keeper.close()
        if self.lease is not None:
            self.lease.close()
        for process in self.processes:
            process.kill()


def open_pipelines(cluster: Cluster, count: int, model_dir: Path, options: argparse.Namespace, keys,
                   max_seq_len: int) -> None:
    """`count` RemotePipelines over stage 0 [0, n/2) + embedding and stage 1 [n/2, n) + head."""
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.formats import resolve_format
    from cakep2p.mesh import RemotePipeline, RemoteStage, StageClient
    from cakep2p.planner import LayerRange

    checkpoint = Checkpoint.open(model_dir)
    layers = checkpoint.args.num_layers
    ranges = [LayerRange(0, layers // 2, True, False), LayerRange(layers // 2, layers, False, True)]
    stages = [RemoteStage("127.0.0.1", process.port, part, process.node_id)
              for process, part in zip(cluster.processes, ranges)]
    if cluster.lease is not None:   # as ClusterModel: one kept-alive connection per stage renews the shared lease
        for stage in stages:
            keeper = StageClient(stage.address, stage.port, keys, name=stage.name, lease=cluster.lease)
            cluster.lease.keep(keeper)
            cluster.keepers.append(keeper)
    weights = resolve_format(checkpoint, options.weights, options.dtype)
    for _ in range(count):
        cluster.pipelines.append(RemotePipeline(stages, checkpoint, max_seq_len, keys, weights=weights,
                                                dtype=options.dtype, allow_transfer=False, lease=cluster.lease))


# -- report -------------------------------------------------------------------------------------------------------


def report(runs: dict[int, list[Run]], references: list[list[int]], mismatches: list[str]) -> bool:
    """Print the table and the goal lines; True when every session's tokens matched its solo run."""
    solo = runs[1]
    median = {count: statistics.median(run.tok_s for run in rounds) for count, rounds in runs.items()}
    print(f"\n{'sessions':>8} {'median agg tok/s':>16} {'vs 1':>6} {'paired vs 1':>11} {'per session':>11} "
          f"{'stage CPU use':>13} {'CPU ms/token':>12} {'initiator CPU':>13}  each round tok/s")
    for count, rounds in runs.items():
        paired = statistics.median(run.tok_s / alone.tok_s for run, alone in zip(rounds, solo))
        use = "/".join(f"{statistics.median(run.stage_cpu[stage] for run in rounds):.2f}" for stage in (0, 1))
        cost = "/".join(f"{statistics.median(run.stage_cpu[stage] / run.tok_s for run in rounds) * 1000:.1f}"
                        for stage in (0, 1))
        initiator = statistics.median(run.initiator_cpu for run in rounds)
        each = " ".join(f"{run.tok_s:.2f}" for run in rounds)
        print(f"{count:8} {median[count]:16.2f} {median[count] / median[1]:5.2f}x {paired:10.2f}x "
              f"{median[count] / count:11.2f} {use:>13} {cost:>12} {initiator:13.2f}  {each}")
    print("(agg tok/s: decode tokens of all sessions / wall time from the common start to the last one's end; paired: "
          "median over rounds of this config's round / the solo run of the same round; CPU use: CPU seconds / wall "
          "seconds, 1.00 = a core busy all the time; CPU ms/token: each stage's CPU time per decoded token, which "
          "rises with sessions only when the two busy cores slow each other down, e.g. sharing memory bandwidth)")
    for count in runs:
        if count >= 2:
            ratio = median[count] / median[1]
            print(f"goal {count} sessions >= {GOAL}x one session: {ratio >= GOAL} ({ratio:.2f}x)")
    matched = not mismatches
    print(f"every concurrent session's greedy tokens equal its solo run: {matched}")
    for line in mismatches:
        print(f"  {line}")
    return matched


def check_tokens(run: Run, references: list[list[int]], label: str) -> list[str]:
    return [f"{label} session {index}: {tokens} != solo {references[index]}"
            for index, tokens in enumerate(run.tokens) if tokens != references[index]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="2,4", help="comma-separated concurrent session counts (vs 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="tinyllama", help="cakep2p.testing preset: tinyllama, or tiny (quick)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--weights", default="auto", help="weight format (engine/formats.py): auto, int8, int4...")
    parser.add_argument("--cpus", default="0,1", help="the core of stage 0 and of stage 1")
    parser.add_argument("--lease", default="shared", choices=["shared", "own"],
                        help="one Lease for every session (as ClusterModel), or each pipeline its own")
    parser.add_argument("--chain", default="on", choices=["on", "off"],
                        help="stage 0 relays to stage 1 (on), or every hidden state comes back here (CAKEP2P_CHAIN)")
    options = parser.parse_args()
    sys.exit(0 if bench(options) else 1)


def bench(options: argparse.Namespace) -> bool:
    from cakep2p import security
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.mesh.lease import Lease
    from cakep2p.testing import cached_random_model

    os.environ["CAKEP2P_CHAIN"] = "1" if options.chain == "on" else "0"
    counts = sorted({int(count) for count in options.sessions.split(",")} | {1})
    cpus = [int(cpu) for cpu in options.cpus.split(",")]
    if len(cpus) != 2 or not set(cpus) <= os.sched_getaffinity(0):
        raise SystemExit(f"--cpus must name two of this process's cores {sorted(os.sched_getaffinity(0))}")
    started = time.perf_counter()
    model_dir = cached_random_model("llama", options.preset, dtype=options.dtype)
    args = Checkpoint.open(model_dir).args
    prompts = [session_prompt(index, options.prompt_tokens, args.vocab_size) for index in range(max(counts))]
    print(f"model {model_dir.name} ({args.num_layers} layers, {time.perf_counter() - started:.1f} s); "
          f"{options.dtype} compute, {options.weights} weights; stages pinned to cores {cpus}, 1 torch thread each; "
          f"sessions {counts}, prompt {options.prompt_tokens} tokens, {options.new_tokens} new tokens greedy, "
          f"{options.rounds} rounds; {options.lease} lease, chain {options.chain}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    code = security.new_code()
    keys = security.derive_keys(code)
    with tempfile.TemporaryDirectory(prefix="cakep2p-overlap-bench-") as scratch:
        processes = []
        cluster = Cluster(processes, Lease() if options.lease == "shared" else None)
        try:
            for index, cpu in enumerate(cpus):
                home = Path(scratch, f"stage{index}")
                home.mkdir()
                with pinned(cpu):
                    processes.append(StageProcess(f"stage{index}", home, code, 1, model_dir))
            for process in processes:
                process.wait_listening()
            for index, process in enumerate(processes):
                print(f"stage{index} pid {process.process.pid} port {process.port}: Cpus_allowed_list of its "
                      f"threads {sorted(thread_cpus(process.process.pid))}")
            began = time.perf_counter()
            open_pipelines(cluster, max(counts), model_dir, options, keys, options.prompt_tokens + options.new_tokens)
            print(f"{len(cluster.pipelines)} sessions opened in {time.perf_counter() - began:.1f} s", flush=True)
            return measure(cluster, counts, prompts, options)
        finally:
            cluster.close()


def measure(cluster: Cluster, counts: list[int], prompts: list[list[int]], options: argparse.Namespace) -> bool:
    pids = [process.process.pid for process in cluster.processes]
    pipelines = cluster.pipelines
    run_sessions(pipelines, prompts, 4, pids)   # warm-up: every session at once, a few tokens
    references = [run_sessions(pipelines[index:index + 1], prompts[index:index + 1], options.new_tokens,
                               pids).tokens[0] for index in range(max(counts))]   # each prompt alone
    runs: dict[int, list[Run]] = {count: [] for count in counts}
    mismatches: list[str] = []
    for number in range(options.rounds):
        order = counts if number % 2 == 0 else counts[::-1]
        for count in order:
            first = number % max(counts) if count == 1 else 0   # the solo run takes each prompt in turn
            run = run_sessions(pipelines[first:first + count], prompts[first:first + count], options.new_tokens, pids)
            runs[count].append(run)
            mismatches += check_tokens(run, references[first:first + count], f"round {number + 1}, {count} sessions:")
        speeds = ", ".join(f"{count}: {runs[count][-1].tok_s:.2f}" for count in counts)
        print(f"round {number + 1} aggregate decode tok/s by sessions {speeds}; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
    for index, process in enumerate(cluster.processes):
        print(f"stage{index} after the runs: Cpus_allowed_list of its threads "
              f"{sorted(thread_cpus(process.process.pid))}")
    return report(runs, references, mismatches)


if __name__ == "__main__":
    main()
