"""The planner: properties over random clusters and models, table-driven cases, real size tables, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import replace
from math import prod

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cakep2p import cli, testing
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.kernels import has_bf16_hardware
from cakep2p.planner.speed import HOP_OVERHEAD_S, LAYER_OVERHEAD_S
from cakep2p.engine.sizes import model_spec, spec_from_args
from cakep2p.planner import (ACTIVATION_BYTES, DoesNotFit, ModelSpec, NodeBudget, Plan, best_single_node,
                             fastest_with, initiator_memory, layer_memory, plan, predict_seconds_per_token)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAFETENSORS_CODES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


# ---------------------------------------------------------------- helpers


def uniform_spec(num_layers: int, layer_weights: int, embedding: int = 0, head: int = 0,
                 kv_per_token: int = 0, hidden: int = 0) -> ModelSpec:
    return ModelSpec("test", (layer_weights,) * num_layers, embedding, head, kv_per_token, hidden)


def nodes_of(*offers: int) -> list[NodeBudget]:
    """Nodes n0, n1, ... offering the given bytes; n0 is the initiator in these tests."""
    return [NodeBudget(f"n{index}", f"node{index}", offer) for index, offer in enumerate(offers)]


def counts(result: Plan) -> dict[str, int]:
    return {stage.node_id: stage.layers.end - stage.layers.start for stage in result.stages}


def check_valid(result: Plan, spec: ModelSpec, nodes: list[NodeBudget], initiator_id: str, context: int) -> None:
    """Every layer exactly once, one contiguous range per node in pipeline order, nobody over budget."""
    costs = layer_memory(spec, context)
    budgets = {node.node_id: node.offered_bytes for node in nodes}
    first, *rest = result.stages
    assert first.node_id == initiator_id and first.layers.has_embedding and first.layers.has_head
    assert not any(stage.layers.has_embedding or stage.layers.has_head for stage in rest)
    assert all(stage.layers.end > stage.layers.start for stage in rest)
    assert len({stage.node_id for stage in result.stages}) == len(result.stages)
    assert first.layers.start == 0 and result.stages[-1].layers.end == spec.num_layers
    for before, after in zip(result.stages, result.stages[1:]):
        assert before.layers.end == after.layers.start
    for stage in result.stages:
        expected = sum(costs[stage.layers.start:stage.layers.end]) + (initiator_memory(spec) if stage.layers.has_embedding else 0)
        assert stage.bytes == expected
        assert stage.bytes <= budgets[stage.node_id]
    assert result.total_bytes == sum(stage.bytes for stage in result.stages)


def layer_capacity(node: NodeBudget, initiator_id: str, spec: ModelSpec, cost: int) -> int:
    """Whole layers of a uniform model a node can hold beside what it must hold anyway."""
    spare = node.offered_bytes - (initiator_memory(spec) if node.node_id == initiator_id else 0)
    return spare // cost if spare >= 0 else -1


def coverable_in_order(costs: tuple[int, ...], budgets: list[int]) -> bool:
    """Brute force: can the nodes, in this order, each take one (maybe empty) contiguous range covering all layers?"""
    reachable = {0}
    for budget in budgets:
        reachable = {end for start in reachable for end in range(start, len(costs) + 1)
                     if sum(costs[start:end]) <= budget}
    return len(costs) in reachable


# ---------------------------------------------------------------- hypothesis strategies


@st.composite
def uniform_cases(draw, max_nodes: int = 8):
    """A uniform-layer model (what every supported architecture has), a cluster, an initiator and a context."""
    spec = uniform_spec(draw(st.integers(1, 40)), draw(st.integers(1, 2000)), draw(st.integers(0, 3000)),
                        draw(st.integers(0, 500)), draw(st.integers(0, 16)), draw(st.integers(0, 8)))
    context = draw(st.integers(1, 64))
    per_layer = layer_memory(spec, context)[0]
    num_nodes = draw(st.integers(1, max_nodes))
    most_layers = draw(st.sampled_from([1, -(-spec.num_layers // num_nodes) + 1, spec.num_layers]))
    # offers near whole-layer boundaries: a number of layers plus a random part of one more
    offers = [draw(st.integers(0, most_layers)) * per_layer + draw(st.integers(0, per_layer - 1))
              for _ in range(num_nodes)]
    ids = draw(st.permutations([f"id{index:02d}" for index in range(num_nodes)]))
    speeds = draw(st.lists(st.sampled_from([0.0, 0.5, 10.0, 123.4]), min_size=num_nodes, max_size=num_nodes))
    initiator_index = draw(st.integers(0, num_nodes - 1))
    if draw(st.booleans()):  # usually give the initiator room for the embedding and head too
        offers[initiator_index] += initiator_memory(spec)
    nodes = [NodeBudget(node_id, f"name-{node_id}", offer, gflops=speed)
             for node_id, offer, speed in zip(ids, offers, speeds)]
    return spec, nodes, ids[initiator_index], context


@st.composite
def uneven_cases(draw):
    """Small models whose layers differ in size, for brute-force checks."""
    weights = tuple(draw(st.lists(st.integers(0, 50), min_size=1, max_size=7)))
    spec = ModelSpec("uneven", weights, draw(st.integers(0, 30)), draw(st.integers(0, 10)), 0, 0)
    offers = draw(st.lists(st.integers(0, 150), min_size=1, max_size=4))
    nodes = [NodeBudget(f"id{index}", f"n{index}", offer) for index, offer in enumerate(offers)]
    return spec, nodes, draw(st.sampled_from([node.node_id for node in nodes]))


strategies = st.sampled_from(["proportional", "fewest", "compute", "fastest"])


# ---------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(uniform_cases(), strategies)
def test_plan_is_valid_or_fails_exactly_when_layers_exceed_what_nodes_can_take(case, strategy):
    spec, nodes, initiator_id, context = case
    cost = layer_memory(spec, context)[0]
    capacities = [layer_capacity(node, initiator_id, spec, cost) for node in nodes]
    initiator_capacity = capacities[[node.node_id for node in nodes].index(initiator_id)]
    fits = initiator_capacity >= 0 and sum(max(0, capacity) for capacity in capacities) >= spec.num_layers
    if not fits:
        with pytest.raises(DoesNotFit) as raised:
            plan(spec, nodes, initiator_id, context, strategy)
        needed = initiator_memory(spec) + cost * spec.num_layers
        assert raised.value.missing_bytes >= max(1, needed - raised.value.offered_bytes)
        return
    check_valid(plan(spec, nodes, initiator_id, context, strategy), spec, nodes, initiator_id, context)


@PROPERTY_SETTINGS
@given(uneven_cases(), strategies)
def test_uneven_layers_plan_is_valid_or_no_contiguous_split_exists(case, strategy):
    spec, nodes, initiator_id = case
    costs = layer_memory(spec, 1)
    initiator = next(node for node in nodes if node.node_id == initiator_id)
    others = [node for node in nodes if node.node_id != initiator_id]
    key = (lambda node: node.node_id) if strategy != "fewest" else (lambda node: (-node.offered_bytes,
                                                                                    node.node_id))
    budgets = [initiator.offered_bytes - initiator_memory(spec), *(node.offered_bytes for node in sorted(others,
                                                                                                         key=key))]
    if budgets[0] < 0 or not coverable_in_order(costs, budgets):
        with pytest.raises(DoesNotFit):
            plan(spec, nodes, initiator_id, 1, strategy)
        return
    check_valid(plan(spec, nodes, initiator_id, 1, strategy), spec, nodes, initiator_id, 1)


@PROPERTY_SETTINGS
@given(uniform_cases())
def test_proportional_share_is_within_one_layer_whenever_budgets_allow(case):
    spec, nodes, initiator_id, context = case
    cost = layer_memory(spec, context)[0]
    total_offer = sum(node.offered_bytes for node in nodes)
    if total_offer == 0:
        return
    shares = {node.node_id: spec.num_layers * node.offered_bytes / total_offer for node in nodes}
    allowed = all(layer_capacity(node, initiator_id, spec, cost) >= -(-spec.num_layers * node.offered_bytes
                                                                      // total_offer) for node in nodes)
    if not allowed:
        return
    held = counts(plan(spec, nodes, initiator_id, context))
    for node in nodes:
        assert abs(held.get(node.node_id, 0) - shares[node.node_id]) < 1


@PROPERTY_SETTINGS
@given(uniform_cases(max_nodes=6))
def test_fewest_uses_no_more_nodes_than_the_smallest_set_that_holds_the_model(case):
    spec, nodes, initiator_id, context = case
    cost = layer_memory(spec, context)[0]
    capacity = {node.node_id: layer_capacity(node, initiator_id, spec, cost) for node in nodes}
    if capacity[initiator_id] < 0:
        return
    others = [node_id for node_id in capacity if node_id != initiator_id]
    smallest = next((size + 1 for size in range(len(others) + 1) for subset in itertools.combinations(others, size)
                     if capacity[initiator_id] + sum(capacity[node_id] for node_id in subset) >= spec.num_layers),
                    None)
    if smallest is None:
        return
    assert len(plan(spec, nodes, initiator_id, context, "fewest").stages) == smallest


@PROPERTY_SETTINGS
@given(uniform_cases(), strategies, st.randoms(use_true_random=False))
def test_same_input_gives_the_same_plan_whatever_the_node_order(case, strategy, random):
    spec, nodes, initiator_id, context = case
    shuffled = list(nodes)
    random.shuffle(shuffled)
    try:
        first = plan(spec, nodes, initiator_id, context, strategy)
    except DoesNotFit as error:
        with pytest.raises(DoesNotFit, match="missing") as again:
            plan(spec, shuffled, initiator_id, context, strategy)
        assert str(again.value) == str(error)
        return
    assert plan(spec, nodes, initiator_id, context, strategy) == first
    assert plan(spec, shuffled, initiator_id, context, strategy) == first


# ---------------------------------------------------------------- table-driven cases


@pytest.mark.parametrize(("offers", "expected"), [
    ((100, 100, 100), {"n0": 4, "n1": 3, "n2": 3}),          # tie: the leftover layer goes to the first in order
    ((100, 100), {"n0": 5, "n1": 5}),
    ((300, 100), {"n0": 8, "n1": 2}),                        # 7.5 / 2.5: equal remainders, first in order wins
    ((100, 200, 700), {"n0": 1, "n1": 2, "n2": 7}),
])
def test_proportional_counts(offers, expected):
    spec = uniform_spec(10, 10)
    assert counts(plan(spec, nodes_of(*(offer * 10 for offer in offers)), "n0", 1)) == expected


def test_a_node_too_small_for_one_layer_gets_none():
    result = plan(uniform_spec(6, 100), nodes_of(1000, 99, 1000), "n0", 1)
    assert counts(result) == {"n0": 3, "n2": 3}


def test_a_capped_node_leaves_its_excess_to_the_others_in_proportion():
    # n0 would get 4 of 12 by offer, but the 500-byte embedding leaves it room for 2; 10 left: 4.29 / 5.71
    spec = uniform_spec(12, 100, embedding=500)
    result = plan(spec, nodes_of(700, 600, 800), "n0", 1)
    assert counts(result) == {"n0": 2, "n1": 4, "n2": 6}


def test_initiator_with_no_room_for_layers_still_holds_embedding_and_head_first():
    spec = uniform_spec(4, 100, embedding=300, head=50)
    result = plan(spec, nodes_of(350, 1000), "n0", 1)
    assert [(stage.node_id, stage.layers.start, stage.layers.end, stage.bytes) for stage in result.stages] == [
        ("n0", 0, 0, 350), ("n1", 0, 4, 400)]


def test_stages_after_the_initiator_follow_node_id_order():
    nodes = [NodeBudget("c", "c", 1000), NodeBudget("a", "a", 1000), NodeBudget("b", "b", 1000)]
    result = plan(uniform_spec(9, 100), nodes, "b", 1)
    assert [stage.node_id for stage in result.stages] == ["b", "a", "c"]


def test_fewest_runs_on_the_initiator_alone_when_it_fits():
    result = plan(uniform_spec(10, 100), nodes_of(1000, 5000, 5000), "n0", 1, "fewest")
    assert [(stage.node_id, stage.layers.start, stage.layers.end) for stage in result.stages] == [("n0", 0, 10)]


def test_fewest_adds_the_largest_peers_first():
    result = plan(uniform_spec(10, 100), nodes_of(300, 400, 800, 500), "n0", 1, "fewest")
    assert [stage.node_id for stage in result.stages] == ["n0", "n2"]


def test_compute_strategy_splits_by_gflops_within_budgets():
    nodes = [NodeBudget("n0", "slow", 10_000, gflops=10.0), NodeBudget("n1", "fast", 10_000, gflops=30.0),
             NodeBudget("n2", "fast-small", 300, gflops=60.0)]
    assert counts(plan(uniform_spec(10, 100), nodes, "n0", 1, "compute")) == {"n0": 2, "n1": 5, "n2": 3}


def test_compute_strategy_falls_back_to_memory_when_a_node_has_no_gflops():
    nodes = [NodeBudget("n0", "a", 1000, gflops=10.0), NodeBudget("n1", "b", 3000, gflops=0.0)]
    assert counts(plan(uniform_spec(8, 100), nodes, "n0", 1, "compute")) == {"n0": 2, "n1": 6}


def test_does_not_fit_names_missing_and_offered_memory():
    spec = uniform_spec(10, 1_000_000)
    with pytest.raises(DoesNotFit) as raised:
        plan(spec, nodes_of(3_000_000, 4_000_000), "n0", 1)
    assert (raised.value.missing_bytes, raised.value.offered_bytes) == (3_000_000, 7_000_000)
    assert "2.86 MiB missing" in str(raised.value) and "offer 6.68 MiB" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_does_not_fit_when_the_initiator_cannot_hold_the_embedding():
    with pytest.raises(DoesNotFit, match="embedding and head alone need"):
        plan(uniform_spec(2, 10, embedding=1000), nodes_of(999, 10**9), "n0", 1)


def test_tied_embedding_is_counted_once_on_the_initiator(stories_dir):
    spec = model_spec(Checkpoint.open(stories_dir))
    assert spec.embedding_bytes == 512 * 64 * 4
    assert spec.head_bytes == 64 * 4  # the final norm only: the head is the embedding
    result = plan(spec, nodes_of(10**9), "n0", 512)
    assert result.stages[0].bytes == sum(layer_memory(spec, 512)) + 512 * 64 * 4 + 64 * 4


def test_per_layer_memory_is_weights_kv_cache_and_activation_margin():
    spec = ModelSpec("m", (1000, 2000), 0, 0, kv_bytes_per_token=16, hidden_size=8)
    assert layer_memory(spec, 100) == (1000 + 1600 + 100 * 8 * ACTIVATION_BYTES, 2000 + 1600 + 3200)


def test_plan_json_has_the_documented_shape_and_round_trips():
    result = plan(uniform_spec(4, 100), nodes_of(250, 250), "n0", 1)
    data = json.loads(json.dumps(result.to_json()))
    assert data["fits"] is True and data["total_bytes"] == 400 and data["strategy"] == "proportional"
    assert [(item["node"], item["name"], item["start"], item["end"], item["bytes"]) for item in data["stages"]] == [
        ("n0", "node0", 0, 2, 200), ("n1", "node1", 2, 4, 200)]
    assert Plan.from_json(data) == result


def test_table_lists_each_stage_with_layers_and_memory():
    table = plan(uniform_spec(4, 1024), nodes_of(2048, 2048), "n0", 1).table().splitlines()
    assert len(table) == 4
    assert "node0" in table[1] and "layers 0–1 + embedding + head" in table[1] and "2 KiB" in table[1]
    assert "node1" in table[2] and "layers 2–3" in table[2]
    assert table[3].startswith("total")


@pytest.mark.parametrize("bad", [
    dict(initiator_id="nobody"),
    dict(context_length=0),
    dict(strategy="quickest"),
    dict(nodes=nodes_of(10, 10) + nodes_of(10)),
])
def test_invalid_input_is_a_value_error(bad):
    arguments = dict(spec=uniform_spec(2, 1), nodes=nodes_of(10, 10), initiator_id="n0", context_length=1,
                     strategy="proportional") | bad
    with pytest.raises(ValueError):
        plan(**arguments)


# ---------------------------------------------------------------- predicted speed


GB = 1e9


@st.composite
def speed_cases(draw):
    """A uniform case whose nodes also report memory bandwidth (sometimes none) and an RTT (sometimes unmeasured)."""
    spec, nodes, initiator_id, context = draw(uniform_cases())
    nodes = [replace(node, bandwidth=draw(st.sampled_from([0.0, 1 * GB, 5 * GB, 20 * GB])),
                     rtt_s=draw(st.sampled_from([None, 0.0, 0.0005, 0.005, 0.05])))
             for node in nodes]
    return spec, nodes, initiator_id, context


def speed(result: Plan | None) -> float:
    return result.predicted_tokens_per_s or float("inf") if result is not None else 0.0


def fitting_plans(spec, nodes, initiator_id, context) -> dict[str, Plan]:
    found = {}
    for strategy in ("proportional", "fewest", "compute", "fastest"):
        try:
            found[strategy] = plan(spec, nodes, initiator_id, context, strategy)
        except DoesNotFit:
            pass
    return found


def laptops(*figures: tuple[int, float, float | None]) -> list[NodeBudget]:
    """Nodes n0 (the initiator), n1, ... from (offered bytes, bandwidth in GB/s, rtt_s)."""
    return [NodeBudget(f"n{index}", f"node{index}", offer, bandwidth=bandwidth * GB, rtt_s=rtt)
            for index, (offer, bandwidth, rtt) in enumerate(figures)]


@PROPERTY_SETTINGS
@given(speed_cases())
def test_fastest_is_never_predicted_slower_than_another_strategy_or_the_best_single_node(case):
    spec, nodes, initiator_id, context = case
    found = fitting_plans(spec, nodes, initiator_id, context)
    if not found:
        return
    fastest = found.pop("fastest")
    check_valid(fastest, spec, nodes, initiator_id, context)
    for other in [*found.values(), best_single_node(spec, nodes, initiator_id, context)]:
        assert speed(fastest) >= speed(other)


@PROPERTY_SETTINGS
@given(speed_cases(), st.data())
def test_prediction_is_monotone_in_bandwidth_and_rtt(case, data):
    spec, nodes, initiator_id, context = case
    try:
        result = plan(spec, nodes, initiator_id, context, "proportional")
    except DoesNotFit:
        return
    index = data.draw(st.integers(0, len(nodes) - 1))
    node = nodes[index]
    faster = [*nodes[:index], replace(node, bandwidth=node.bandwidth * 2), *nodes[index + 1:]]  # 0 stays unknown
    closer = [*nodes[:index], replace(node, rtt_s=(node.rtt_s or 0.0) / 2), *nodes[index + 1:]]
    farther = [*nodes[:index], replace(node, rtt_s=(node.rtt_s or 0.001) * 3), *nodes[index + 1:]]
    base = predict_seconds_per_token(spec, result, [replace(item, gflops=0.0) for item in nodes])
    assert predict_seconds_per_token(spec, result, [replace(item, gflops=0.0) for item in faster]) <= base
    measured = predict_seconds_per_token(spec, result, nodes)
    assert predict_seconds_per_token(spec, result, closer) <= measured <= predict_seconds_per_token(
        spec, result, farther)


def test_prediction_adds_weight_reads_and_two_hops_per_remote_stage():
    spec = ModelSpec("m", (1000,) * 4, 100, 100, 0, hidden_size=10)
    nodes = [NodeBudget("n0", "a", 10_000, bandwidth=1e6), NodeBudget("n1", "b", 10_000, bandwidth=2e6, rtt_s=0.01)]
    result = plan(spec, nodes, "n0", 1, "proportional")
    reads = 2000 / 1e6 + 100 / 1e6 + 2000 / 2e6 + 4 * LAYER_OVERHEAD_S  # n0: layers 0-1 and the head; n1: 2-3
    hop = 0.01 / 2 + HOP_OVERHEAD_S + 10 * 4 / 25e6     # half the RTT, a message, a float32 hidden state at 200 Mb/s
    assert predict_seconds_per_token(spec, result, nodes) == pytest.approx(reads + 2 * hop)
    assert predict_seconds_per_token(spec, result, nodes, hops=3) == pytest.approx(reads + 3 * hop)  # a chain
    assert result.predicted_tokens_per_s == pytest.approx(1 / (reads + 2 * hop))


def test_a_slow_laptop_is_left_out_when_it_costs_more_than_it_gives():
    spec = uniform_spec(10, 1000)
    nodes = laptops((8000, 20, None), (8000, 20, 0.001), (8000, 1, 0.001))  # n2 reads 20 times slower
    assert counts(plan(spec, nodes, "n0", 1, "proportional"))["n2"] > 0
    fastest = plan(spec, nodes, "n0", 1, "fastest")
    assert "n2" not in counts(fastest) and sum(counts(fastest).values()) == 10
    with_it = fastest_with(spec, nodes, "n0", 1, "n2")
    assert with_it is not None and speed(with_it) < speed(fastest)


def test_a_far_peer_is_left_out_when_this_node_holds_the_model_alone():
    spec = uniform_spec(10, 100_000_000)   # 1 GB: 100 ms a token at 10 GB/s
    nodes = laptops((2 << 30, 10, None), (2 << 30, 40, 0.5))   # 4x the bandwidth, half a second away
    assert [stage.node_id for stage in plan(spec, nodes, "n0", 1, "fastest").stages] == ["n0"]
    near = laptops((2 << 30, 10, None), (2 << 30, 40, 0.0001))
    assert counts(plan(spec, near, "n0", 1, "fastest")) == {"n0": 0, "n1": 10}  # the best single node: the peer


def test_fastest_fills_the_faster_node_first_within_budgets():
    spec = uniform_spec(10, 1000)
    nodes = laptops((4000, 5, None), (7000, 20, 0.0001))
    assert counts(plan(spec, nodes, "n0", 1, "fastest")) == {"n0": 3, "n1": 7}


def test_fastest_ties_go_to_fewer_stages_then_node_ids():
    spec = uniform_spec(4, 1000)
    nodes = laptops((8000, 10, None), (8000, 10, 0.0), (8000, 10, 0.0))
    assert [stage.node_id for stage in plan(spec, nodes, "n0", 1, "fastest").stages] == ["n0"]


def test_best_single_node_is_none_when_no_machine_holds_the_model():
    assert best_single_node(uniform_spec(10, 1000), laptops((6000, 10, None), (6000, 10, None)), "n0", 1) is None


def test_a_plan_with_its_prediction_round_trips_through_json_and_old_json_has_none():
    result = plan(uniform_spec(4, 100), laptops((250, 1, None), (250, 2, 0.001)), "n0", 1, "fastest")
    data = json.loads(json.dumps(result.to_json()))
    assert data["predicted_tokens_per_s"] == result.predicted_tokens_per_s > 0
    assert Plan.from_json(data) == result
    del data["predicted_tokens_per_s"]
    assert Plan.from_json(data).predicted_tokens_per_s is None
    with pytest.raises(ValueError):
        Plan.from_json(data | {"predicted_tokens_per_s": -1})


# ---------------------------------------------------------------- real size tables


def test_stories260k_spec_matches_its_config_and_plans_within_a_few_megabytes(stories_dir):
    spec = model_spec(Checkpoint.open(stories_dir))
    args = Checkpoint.open(stories_dir).args
    assert spec == spec_from_args(args, name=stories_dir.name)
    assert spec.layer_bytes == (181_760,) * 5  # 45,440 float32 weights per layer
    assert spec.kv_bytes_per_token == 2 * 4 * 8 * 4
    result = plan(spec, nodes_of(10**9), "n0", args.max_position_embeddings)
    assert 1_000_000 < result.total_bytes < 4_000_000


def test_stories260k_splits_over_two_small_nodes(stories_dir):
    spec = model_spec(Checkpoint.open(stories_dir), "bfloat16")
    per_layer = layer_memory(spec, 512)[0]
    offers = (initiator_memory(spec) + 2 * per_layer, 3 * per_layer)
    result = plan(spec, nodes_of(*offers), "n0", 512)
    assert counts(result) == {"n0": 2, "n1": 3}
    with pytest.raises(DoesNotFit):
        plan(spec, nodes_of(offers[0], offers[1] - 1), "n0", 512)


def write_header_only_checkpoint(model_dir, config: dict, dtype: str) -> None:
    """A real safetensors file for `config` whose data region is a sparse hole: full size, no disk used."""
    code, element_size = SAFETENSORS_CODES[dtype]
    header, offset = {}, 0
    for name, shape in testing.tensor_shapes(config).items():
        size = prod(shape) * element_size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    with open(model_dir / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        handle.truncate(8 + len(encoded) + offset)


@pytest.fixture(scope="module")
def tinyllama_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tinyllama") / "tinyllama-shaped"
    write_header_only_checkpoint(model_dir, testing.model_config("llama", "tinyllama", dtype="bfloat16"), "bfloat16")
    return model_dir


def test_tinyllama_spec_counts_1_1_billion_parameters(tinyllama_dir):
    spec = model_spec(Checkpoint.open(tinyllama_dir))
    per_layer = 2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 5632 * 2048 + 2 * 2048
    assert spec.layer_bytes == (per_layer * 2,) * 22
    assert spec.embedding_bytes == spec.head_bytes - 2048 * 2 == 32000 * 2048 * 2  # untied: head counted apart
    assert spec.kv_bytes_per_token == 2 * 4 * 64 * (2 if has_bf16_hardware() else 4)  # the KV cache's dtype: the
                                                                                       # compute's on this CPU
    assert 1.0e9 < (sum(spec.layer_bytes) + spec.embedding_bytes + spec.head_bytes) / 2 < 1.2e9
    assert spec == spec_from_args(Checkpoint.open(tinyllama_dir).args, name=tinyllama_dir.name)


def test_tinyllama_spreads_over_three_laptops_in_proportion(tinyllama_dir):
    spec = model_spec(Checkpoint.open(tinyllama_dir))
    gib = 1 << 30
    result = plan(spec, nodes_of(1 * gib, 1 * gib, 2 * gib), "n0", 2048)
    assert counts(result) == {"n0": 6, "n1": 5, "n2": 11}  # 5.5 / 5.5 / 11: the tie goes to the initiator
    check_valid(result, spec, nodes_of(1 * gib, 1 * gib, 2 * gib), "n0", 2048)
    assert plan(spec, nodes_of(4 * gib, 2 * gib), "n0", 2048, "fewest").stages[0].layers.end == 22
    with pytest.raises(DoesNotFit, match="missing"):
        plan(spec, nodes_of(1 * gib, 1 * gib), "n0", 2048)


def test_tinyllama_float32_cached_checkpoint_matches_the_config_shapes():
    cached = testing.model_cache_root() / f"llama-tinyllama-seed0-float32-{testing.CACHE_VERSION}"
    if not (cached / "config.json").is_file():
        pytest.skip(f"no cached TinyLlama-shaped checkpoint at {cached} (not generated here: 4 GB)")
    assert model_spec(Checkpoint.open(cached)) == spec_from_args(Checkpoint.open(cached).args, name=cached.name)


# ---------------------------------------------------------------- the command


def test_plan_command_prints_a_table_for_this_machine(stories_dir, seeded_home, capsys):
    assert cli.main(["plan", "--model", str(stories_dir), "--wait", "0", "--max-memory", "64MB"]) == 0
    output = capsys.readouterr().out
    assert "stories260K" in output and "layers 0–4 + embedding + head" in output


def test_plan_command_json(stories_dir, seeded_home, capsys):
    assert cli.main(["plan", "--model", str(stories_dir), "--wait", "0", "--json", "--context", "64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True
    assert [(stage["start"], stage["end"]) for stage in data["stages"]] == [(0, 5)]


def test_plan_command_offers_the_compute_strategy(stories_dir, seeded_home, capsys):
    assert cli.main(["plan", "--model", str(stories_dir), "--wait", "0", "--json", "--strategy", "compute"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "compute"


def test_plan_command_prints_the_predicted_speed_of_its_plan_and_of_the_alternatives(stories_dir, seeded_home,
                                                                                      capsys):
    assert cli.main(["plan", "--model", str(stories_dir), "--wait", "0", "--strategy", "fastest"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("predicted "))
    assert " tok/s decode (one stream); compared: proportional " in line
    assert all(f"{label} " in line for label in ("compute", "fewest", "single node")) and "e+" not in line


def test_plan_command_json_gives_the_predicted_speed_of_its_plan_and_of_the_alternatives(stories_dir, seeded_home,
                                                                                         capsys):
    assert cli.main(["plan", "--model", str(stories_dir), "--wait", "0", "--json", "--strategy", "fastest"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "fastest" and data["predicted_tokens_per_s"] > 0
    assert set(data["alternatives"]) == {"proportional", "compute", "fewest", "fastest", "single node"}
    assert data["alternatives"]["single node"] == data["predicted_tokens_per_s"]  # alone, this machine is the plan


def test_plan_command_reports_missing_memory_on_one_line(stories_dir, seeded_home, capsys):
    assert cli.main(["plan", "--model", str(stories_dir), "--wait", "0", "--max-memory", "1MB"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("cakep2p: error: model stories260K does not fit") and "missing" in error
    assert error.count("\n") == 1


def test_plan_command_json_says_what_is_missing_when_it_does_not_fit(stories_dir, seeded_home, capsys):
    assert cli.main(["plan", "--model", str(stories_dir), "--wait", "0", "--json", "--max-memory", "1MB"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("{"), captured.err
    data = json.loads(captured.out)
    assert data["fits"] is False and data["offered_bytes"] == 1_000_000
    assert data["missing_bytes"] >= data["needed_bytes"] - data["offered_bytes"] > 0


@pytest.fixture
def serving_peer(seeded_home, stories_dir, tmp_path):
    """A real `cakep2p --serve` on loopback, in a cluster of its own, offering 3 stories260K layers."""
    from cakep2p import security
    from tests.kit.cluster import serve_nodes

    code = security.new_code()
    offer = 3 * layer_memory(model_spec(Checkpoint.open(stories_dir)), 512)[0] + 1000
    with serve_nodes(tmp_path, code, [f"peer-one-{os.getpid()}"], args=("--max-memory", str(offer))) as (peer,):
        yield code, peer


@pytest.mark.slow
def test_plan_command_spreads_layers_onto_a_discovered_peer(stories_dir, serving_peer, capsys):
    code, peer = serving_peer
    spec = model_spec(Checkpoint.open(stories_dir))
    offer = initiator_memory(spec) + 2 * layer_memory(spec, 512)[0]  # 2.17 of 5 layers by offer; the peer 2.83
    argv = ["plan", "--model", str(stories_dir), "--json", "--interface", "127.0.0.1", "--wait", "3",
            "--cluster", code, "--max-memory", str(offer)]
    assert cli.main(argv) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [(stage["start"], stage["end"]) for stage in stages] == [(0, 2), (2, 5)]
    assert stages[1]["name"] == peer.name
