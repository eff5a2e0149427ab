"""Shared fixtures: the reference model, an isolated node home, and a leak check for processes."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEST_MODEL = REPO.parent / "shared" / "models" / "stories260K"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The network rule: every node a test starts without --interface (in-process or a child process) stays on
# loopback. Tests that want the all-interfaces default run it inside a network namespace and drop this.
os.environ["CAKEP2P_INTERFACE"] = "127.0.0.1"


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process torch on one thread: the suite shares 2 cores with the node processes it starts."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The trained stories260K model; skips when it is not on this machine."""
    path = Path(os.environ.get("CAKEP2P_TEST_MODEL", DEFAULT_TEST_MODEL))
    if not (path / "config.json").is_file():
        pytest.skip(f"test model not found at {path} (set CAKEP2P_TEST_MODEL)")
    return path


@pytest.fixture
def node_home(tmp_path, monkeypatch) -> Path:
    """A private CAKEP2P_HOME so this test's node has its own identity, cache and data."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CAKEP2P_HOME", str(home))
    return home
