"""Times plan() for 100 peers and 128 layers (goal: well under 10 ms); prints min and median per strategy."""

from __future__ import annotations

import argparse
import random
import statistics
import time

from cakep2p.planner import ModelSpec, NodeBudget, initiator_memory, layer_memory, plan


def cluster(num_peers: int, spec: ModelSpec, context: int, seed: int) -> list[NodeBudget]:
    """`num_peers` nodes offering 0.5 to 3 layers' worth each, so most of them get layers."""
    rng = random.Random(seed)
    per_layer = layer_memory(spec, context)[0]
    nodes = [NodeBudget(f"{rng.getrandbits(128):032x}", f"peer{index}", int(per_layer * rng.uniform(0.5, 3.0)),
                        gflops=rng.uniform(20, 2000)) for index in range(num_peers)]
    nodes[0] = NodeBudget(nodes[0].node_id, "initiator", nodes[0].offered_bytes + initiator_memory(spec), 100.0)
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    options = parser.parse_args()
    context = 4096
    spec = ModelSpec("bench", (200_000_000,) * options.layers, 500_000_000, 500_000_000, 131_072, 8192)
    nodes = cluster(options.peers, spec, context, seed=0)
    for strategy in ("proportional", "fewest", "compute", "fastest"):
        timings = []
        for _ in range(options.repeats):
            started = time.perf_counter()
            result = plan(spec, nodes, nodes[0].node_id, context, strategy)
            timings.append(time.perf_counter() - started)
        print(f"{strategy:12s} {options.peers} peers x {options.layers} layers -> {len(result.stages)} stages: "
              f"min {min(timings) * 1e3:.3f} ms, median {statistics.median(timings) * 1e3:.3f} ms "
              f"(goal < 10 ms)")


if __name__ == "__main__":
    main()
