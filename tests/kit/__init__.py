"""The test kit: one copy of each thing the tests share.

    waits       wait_until (the one poll-until-deadline), pump_until (the same, running Qt meanwhile)
    net         LOOPBACK, free_port, loopback_multicast_on
    reference   reference_rows, reference_greedy: stories260K's REFERENCE.json
    processes   child_env, run_cakep2p, ChildProcess and its kinds that are always killed: ServeProcess
                (start_serve), StageProcess (a bare stage server, stage_server.py), ApiProcess; kill_all
    nodes       seed_benchmark, start_node (an in-process Node on 127.0.0.1), Browser (a Discovery on its own loop)
    leaks       threads_ended (the no_leaked_threads fixture, or narrower), left_threads, left_children: what the
                fixtures and the session check in conftest look for
    cluster     serve_nodes, run_generate, generate_command, greedy_tokens, local_tokens, remote_names
    api         serve, greedy_chat, GatedModel, stage_sessions
    sniff       SniffingProxy: a loopback TCP proxy that keeps every byte

The first five are re-exported here (they import no cakep2p module until called); import the rest from their
modules.
"""

from tests.kit.net import LOOPBACK, free_port, loopback_multicast_on
from tests.kit.nodes import SEEDED_BANDWIDTH, SEEDED_GFLOPS, Browser, seed_benchmark, start_node
from tests.kit.processes import (REPO, ApiProcess, ChildProcess, ServeProcess, StageProcess, cakep2p_command,
                                 child_env, kill_all, run_cakep2p, start_serve)
from tests.kit.reference import reference_greedy, reference_rows
from tests.kit.waits import pump_until, wait_until

__all__ = ["LOOPBACK", "REPO", "SEEDED_BANDWIDTH", "SEEDED_GFLOPS", "ApiProcess", "Browser", "ChildProcess",
           "ServeProcess", "StageProcess", "cakep2p_command", "child_env", "free_port", "kill_all",
           "loopback_multicast_on", "pump_until", "reference_greedy", "reference_rows", "run_cakep2p",
           "seed_benchmark", "start_node", "start_serve", "wait_until"]
