"""Shared fixtures: the reference model, an isolated node home, and the checks that nothing is left running.

    .venv/bin/python -m pytest -m "not slow" -q -p no:cacheprovider   # the fast lane: about a minute on 2 cores
    .venv/bin/python -m pytest -q -p no:cacheprovider                  # everything (`.ci/run`)

`slow` marks a test that takes more than a few seconds (a module's pytestmark marks all of its tests); the fast
lane keeps at least one real test of each part: zeroconf on loopback, ZeroMQ sockets, torch on stories260K, Qt
offscreen, a `cakep2p` child process. The helpers the tests share are in tests/kit/.
"""

import os
import threading
import warnings
from pathlib import Path

import pytest

from tests.kit import seed_benchmark
from tests.kit.leaks import (LeftRunningWarning, child_processes, describe_process, describe_threads, end_processes,
                             left_children, left_threads, must_end, threads_ended)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEST_MODEL = REPO.parent / "shared" / "models" / "stories260K"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The network rule: every node a test starts without --interface (in-process or a child process) stays on
# loopback. Tests that want the all-interfaces default run it inside a network namespace and drop this.
os.environ["CAKEP2P_INTERFACE"] = "127.0.0.1"


@pytest.fixture(autouse=True, scope="session")
def nothing_left_running():
    """At the end of the session: an error naming every child process of pytest still alive (they are ended
    then) and every cakep2p, kit or non-daemon thread the suite started that still runs; a warning naming any other
    thread it started that still runs (a library's process-lifetime threads aside)."""
    threads_before = set(threading.enumerate())
    children_before = {child.pid for child in child_processes()}
    yield
    problems = []
    children = left_children(children_before)
    if children:
        problems.append("child processes still running:\n  " + "\n  ".join(map(describe_process, children)))
        end_processes(children)
    threads = left_threads(threads_before)
    failing = [thread for thread in threads if must_end(thread)]
    others = [thread for thread in threads if not must_end(thread)]
    if failing:
        problems.append(f"threads still running: {describe_threads(failing)}")
    if others:
        warnings.warn(LeftRunningWarning(f"daemon threads the suite started still run at its end: "
                                         f"{describe_threads(others)}"))
    if problems:
        pytest.fail("the test session left things running:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process torch on one thread: the suite shares 2 cores with the node processes it starts."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_leaked_threads():
    """Fail a test that leaves a thread it started running (node loops, zeroconf, servers, browsers, proxies).
    A longer-lived fixture that starts threads lazily during a test needs a narrower check: kit.leaks.threads_ended."""
    with threads_ended():
        yield


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The trained stories260K model; skips when it is not on this machine."""
    path = Path(os.environ.get("CAKEP2P_TEST_MODEL", DEFAULT_TEST_MODEL))
    if not (path / "config.json").is_file():
        pytest.skip(f"test model not found at {path} (set CAKEP2P_TEST_MODEL)")
    return path


@pytest.fixture(scope="module")
def code() -> str:
    """A fresh pairing code for each test module (its nodes form a cluster of their own)."""
    from cakep2p import security

    return security.new_code()


@pytest.fixture(scope="module")
def keys(code):
    """The cluster keys of the module's pairing code."""
    from cakep2p import security

    return security.derive_keys(code)


@pytest.fixture(scope="session")
def smol_transformers():
    """transformers' own float32 SmolLM2 read from the GGUF (the oracle), loaded once for the session: it takes
    half a minute to dequantize."""
    import torch

    from tests.test_gguf_format import SMOL_DIR, SMOL_NAME

    if not (SMOL_DIR / SMOL_NAME).is_file():
        pytest.skip(f"the SmolLM2 GGUF is not at {SMOL_DIR} (set CAKEP2P_TEST_GGUF)")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOL_DIR, gguf_file=SMOL_NAME, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def stories_model(stories_dir):
    """stories260K loaded once in this process (float32, CPU), for tests that only run pipelines on it."""
    from cakep2p.cluster import LocalModel, ModelOptions
    from cakep2p.engine.checkpoint import Checkpoint

    loaded = LocalModel(Checkpoint.open(stories_dir), ModelOptions(dtype="float32", device="cpu"))
    yield loaded
    loaded.close()


@pytest.fixture
def node_home(tmp_path, monkeypatch) -> Path:
    """A private CAKEP2P_HOME so this test's node has its own identity, cache and data."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CAKEP2P_HOME", str(home))
    return home


@pytest.fixture
def seeded_home(node_home) -> Path:
    """node_home with the speed benchmark already stored: a node started there does not spend a second measuring."""
    seed_benchmark(node_home)
    return node_home
