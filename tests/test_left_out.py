"""Nothing silent: every machine heard but left out of a plan is named with its reason (other cluster, another
protocol, an announcement nobody proved, not serving, no memory, not answering, too small, slower, not needed, too
late), in the core and on the command line."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest

from cakep2p import PROTOCOL_VERSION, planner
from cakep2p.cluster import LeftOut, PlannedModel, describe_left_out, left_out
from cakep2p.discovery import PeerInfo
from cakep2p.security import new_code
from tests.kit import child_env, free_port, run_cakep2p, seed_benchmark, start_node
from tests.kit.cluster import serve_nodes

OWN = "me"
SPEC = planner.ModelSpec("tiny", (1000,) * 4, 100, 100, 1, 1)   # a layer needs 1000 B + 5 B at a 1-token context


def peer(name: str, **changes) -> PeerInfo:
    values = dict(name=name, node_id=f"id-{name}", address="127.0.0.1", port=5770, version="0.1.0",
                  protocol_version=PROTOCOL_VERSION, cluster_fingerprint="ours", accelerator="cpu", device_name="cpu",
                  ram_total=1 << 30, ram_available=1 << 29, vram_total=0, vram_free=0, offered_memory=1 << 20,
                  gflops=1.0, bandwidth=1.0, serving=True, status="ok")
    values.update(changes)
    return PeerInfo(**values)


def planned_over(peers: list[PeerInfo], own_bytes: int = 10_000, strategy: str = "proportional") -> PlannedModel:
    budgets = (planner.NodeBudget(OWN, "laptop", own_bytes),
               *(planner.NodeBudget(item.node_id, item.name, item.offered_memory) for item in peers))
    return PlannedModel(planner.plan(SPEC, budgets, OWN, 1, strategy), SPEC, 1, budgets)


def reasons(entries: list[LeftOut]) -> dict[str, str]:
    return {entry.name: entry.reason for entry in entries}


# -- the reasons -------------------------------------------------------------------------------------------------

def test_machines_no_plan_can_use_are_named_without_a_plan():
    heard = [peer("a", status="other_cluster"), peer("b", status="incompatible", protocol_version=9, version="9.0"),
             peer("c", serving=False), peer("d", offered_memory=0), peer("e")]
    assert reasons(left_out(None, heard, OWN)) == {"a": "other_cluster", "b": "incompatible", "c": "not_serving",
                                                   "d": "offers_nothing"}


def test_a_peer_in_the_plan_and_this_node_itself_are_not_left_out():
    helper = peer("helper", offered_memory=100_000)
    planned = planned_over([helper], own_bytes=500)
    assert any(stage.node_id == helper.node_id for stage in planned.plan.stages)
    assert left_out(planned, [helper, peer("me", node_id=OWN)], OWN) == []


def test_a_peer_too_small_for_one_layer_is_left_out_by_the_planner_with_its_offer():
    small = peer("small", offered_memory=500)
    (entry,) = left_out(planned_over([small]), [small], OWN)
    assert (entry.reason, entry.detail) == ("too_small", "offers 500 B")


def test_a_peer_the_fewest_strategy_does_not_need_is_not_needed():
    spare = peer("spare", offered_memory=100_000)
    assert reasons(left_out(planned_over([spare], strategy="fewest"), [spare], OWN)) == {"spare": "not_needed"}


def test_a_peer_the_fastest_plan_leaves_out_as_slower_is_named_with_both_predictions():
    spec = planner.ModelSpec("tiny", (1_000_000,) * 4, 100, 100, 1, 1)
    near, slow = peer("near"), peer("slow")
    budgets = (planner.NodeBudget(OWN, "laptop", 2_100_000, bandwidth=10e9),
               planner.NodeBudget(near.node_id, near.name, 5_000_000, bandwidth=10e9, rtt_s=0.0001),
               planner.NodeBudget(slow.node_id, slow.name, 5_000_000, bandwidth=0.1e9, rtt_s=0.0001))
    planned = PlannedModel(planner.plan(spec, budgets, OWN, 1, "fastest"), spec, 1, budgets)
    entries = left_out(planned, [near, slow], OWN)
    assert reasons(entries) == {"slow": "slower"}
    with_it = planner.fastest_with(spec, budgets, OWN, 1, slow.node_id).predicted_tokens_per_s
    without = planned.plan.predicted_tokens_per_s
    assert with_it < without
    assert describe_left_out(entries, planned) == [
        f"slow would slow this model down (predicted {planner.format_rate(with_it)} tok/s with it, "
        f"{planner.format_rate(without)} without): left out by the planner"]


def test_a_peer_heard_after_planning_arrived_late():
    late = peer("late")
    assert reasons(left_out(planned_over([]), [late], OWN)) == {"late": "arrived_late"}


def test_a_static_peer_that_does_not_answer_is_named_by_its_address():
    assert reasons(left_out(None, [], OWN, {("192.0.2.7", 5770)})) == {"192.0.2.7:5770": "no_answer"}


def test_an_announcement_that_never_proved_itself_is_named():
    assert reasons(left_out(None, [], OWN, unproven=["ghost"])) == {"ghost": "unproven"}


def test_a_machine_seen_over_mdns_and_as_a_static_peer_counts_once():
    twice = [peer("a", status="other_cluster"), peer("a", status="other_cluster", address="192.0.2.7")]
    assert len(left_out(None, twice, OWN)) == 1


# -- the sentences ---------------------------------------------------------------------------------------------

def test_other_cluster_machines_are_one_line_with_the_pairing_hint():
    heard = [peer(name, status="other_cluster") for name in ("beta", "alpha")]
    (line,) = describe_left_out(left_out(None, heard, OWN))
    assert line.startswith("heard 2 machines of another cluster (alpha, beta), left out")
    assert "`cakep2p code --set -`" in line and "\n" not in line


def test_one_line_per_reason_in_a_fixed_order():
    heard = [peer("x", serving=False), peer("y", status="other_cluster"), peer("z", status="incompatible")]
    lines = describe_left_out(left_out(None, heard, OWN))
    assert [line.split(" ", 2)[:2] for line in lines] == [["heard", "a"], ["heard", "z"], ["x", "is"]]
    assert "protocol" in lines[1] and "install the same cakep2p version" in lines[1]
    assert "`cakep2p --serve` there" in lines[2]


def test_many_machines_are_counted_not_all_named():
    heard = [peer(f"node-{index}", status="other_cluster") for index in range(7)]
    (line,) = describe_left_out(left_out(None, heard, OWN))
    assert "heard 7 machines" in line and "node-0, node-1, node-2, node-3 and 3 more" in line


def test_the_planner_lines_give_the_figures():
    small, spare = peer("small", offered_memory=500), peer("spare", offered_memory=100_000)
    planned = planned_over([small, spare], strategy="fewest")
    lines = describe_left_out(left_out(planned, [small, spare], OWN), planned)
    assert lines[0] == ("small left out by the planner: it offers 500 B, less than one layer needs (1005 B at a "
                        "1-token context); offer more memory there, or use a shorter context")
    assert lines[1] == "spare not needed by the planner: the model fits on fewer machines (strategy fewest)"


# -- the node's view, and the command line -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_static_peer_nobody_answers_at_is_reported_silent(tmp_path, monkeypatch, no_leaked_threads):
    from cakep2p.cluster import left_out_notes
    from tests.kit import wait_until

    silent = ("127.0.0.1", free_port())
    node = start_node(tmp_path / "home", monkeypatch, new_code(), static_peers=[silent], discovery=False)
    try:
        wait_until(lambda: node.silent_static_peers() == {silent}, 20, message="the unanswered ping")
        (line,) = left_out_notes(node)
    finally:
        node.stop()
    assert line.startswith(f"static peer {silent[0]}:{silent[1]} does not answer")


@pytest.mark.slow
def test_an_unpaired_initiator_names_two_serving_peers_of_another_cluster(tmp_path):
    """Two `cakep2p --serve` of cluster B; `cakep2p generate` of cluster A hears them, runs alone and says why."""
    suffix = secrets.token_hex(2)
    names = [f"aa-other-{suffix}-1", f"aa-other-{suffix}-2"]   # "aa": listed first even beside other runs' nodes
    with serve_nodes(tmp_path, new_code(), names):
        home = tmp_path / "initiator"
        seed_benchmark(home)
        result = run_cakep2p("generate", "--prompt", "Once upon a time", "--max-new-tokens", "4", "--wait", "5",
                             "--interface", "127.0.0.1", env=child_env(home, new_code()))
    assert result.returncode == 0, result.stderr
    note = next((line for line in result.stderr.splitlines() if "of another cluster" in line), "")
    assert note.startswith("cakep2p: note: heard "), result.stderr
    assert all(name in note for name in names), note
    assert "run `cakep2p code` on one of them and `cakep2p code --set -` here" in note
    assert "· 1 node" in result.stderr   # it ran alone, and said so


@pytest.mark.slow
def test_plan_names_the_machines_it_leaves_out(tmp_path, monkeypatch, capsys):
    """`cakep2p plan` prints the same notes after its table: here a real serving peer too small for one layer, and
    an announcement of this cluster that nobody stands behind (it never answers the encrypted ping)."""
    from cakep2p.cli import main
    from cakep2p.node import cluster_fingerprint
    from tests.kit import Browser

    home = tmp_path / "home"
    seed_benchmark(home)
    monkeypatch.setenv("CAKEP2P_HOME", str(home))
    code = new_code()
    monkeypatch.setenv("CAKEP2P_CLUSTER_CODE", code)
    fingerprint = cluster_fingerprint(code)
    suffix = secrets.token_hex(2)
    ghost = replace(peer(f"aa-ghost-{suffix}"), node_id=secrets.token_hex(8), cluster_fingerprint=fingerprint,
                    port=free_port())
    with serve_nodes(tmp_path, code, [f"aa-tiny-{suffix}"], args=("--max-memory", "1KiB")) as (tiny,), \
            Browser(fingerprint) as browser:
        browser.announce(ghost)
        assert main(["plan", "--wait", "3", "--interface", "127.0.0.1"]) == 0
    err = capsys.readouterr().err
    assert f"{tiny.name} left out by the planner: it offers 1 KiB, less than one layer needs" in err, err
    assert f"{ghost.name} announces this cluster but did not answer an encrypted ping, left out" in err, err
