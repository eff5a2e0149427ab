"""GUI test kit: a window over a real Node on 127.0.0.1, pumped waits for module fixtures, reference text."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from cakep2p.security import new_code

CLUSTER_CODE = new_code()   # fresh per run: no other test's nodes share this cluster


def skip_if_qt_broken() -> None:
    """Skip (with the fix in the reason) where PySide6 is missing or known to abort this Python."""
    pytest.importorskip("PySide6", reason="the window needs PySide6: pip install 'cakep2p[gui]'")
    from cakep2p.gui import broken_qt_binding

    reason = broken_qt_binding()
    if reason:
        pytest.skip(reason)


def pump_until(condition: Callable[[], object], timeout: float = 20.0, message: str = "condition") -> object:
    """Run the Qt event loop until `condition()` is truthy (for module-scoped fixtures, where qtbot is absent)."""
    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance()
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {message}")
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)


def reference_greedy(model_dir: Path, index: int = 0) -> dict:
    """One greedy row of the model's REFERENCE.json: prompt, new_token_ids, text."""
    return json.loads((Path(model_dir) / "REFERENCE.json").read_text())["greedy"][index]


def peers_json(home: Path, wait_s: float = 2.0) -> list[dict]:
    """What a separate `cakep2p peers --json --interface 127.0.0.1` process sees."""
    import subprocess

    env = {**os.environ, "CAKEP2P_HOME": str(home), "CAKEP2P_CLUSTER_CODE": CLUSTER_CODE, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "cakep2p", "peers", "--json", "--interface", "127.0.0.1",
                             "--wait", str(wait_s)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
