"""GUI test kit: a window over a real Node on 127.0.0.1, pumped waits for module fixtures, reference text."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cakep2p.security import new_code
from tests.kit import pump_until, reference_greedy  # noqa: F401  (the GUI tests import them from here)

CLUSTER_CODE = new_code()   # fresh per run: no other test's nodes share this cluster


def skip_if_qt_broken() -> None:
    """Skip (with the fix in the reason) where PySide6 is missing or known to abort this Python."""
    pytest.importorskip("PySide6", reason="the window needs PySide6: pip install 'cakep2p[gui]'")
    from cakep2p.gui import broken_qt_binding

    reason = broken_qt_binding()
    if reason:
        pytest.skip(reason)


def chat_as_each_holds_it(window) -> dict[str, list[tuple[str, str]]]:
    """The chat on screen as the list model shows it (notices aside), as its log file reads back from disk and as
    the engine's Conversation holds it."""
    from cakep2p.gui.history import ChatLog

    conversation = window.bridge.chat.conversation
    return {"list model": [(row.role, row.text) for row in window.chat_model.messages() if row.role != "notice"],
            "log file": [(message.role, message.content) for message in ChatLog(window.chat_log.path).messages],
            "conversation": [(message["role"], message["content"]) for message in list(conversation.messages)]}


def wait_for_one_chat(window, qtbot, timeout_ms: int = 10000) -> list[tuple[str, str]]:
    """Wait until the list model, the log file and the conversation hold the same chat (the conversation takes
    a stored or new chat on the model thread), and return it."""
    def same() -> None:
        held = chat_as_each_holds_it(window)
        assert held["list model"] == held["log file"] == held["conversation"], held

    qtbot.waitUntil(same, timeout=timeout_ms)
    return chat_as_each_holds_it(window)["list model"]


def peers_json(home: Path, wait_s: float = 2.0) -> list[dict]:
    """What a separate `cakep2p peers --json --interface 127.0.0.1` process sees."""
    import subprocess

    env = {**os.environ, "CAKEP2P_HOME": str(home), "CAKEP2P_CLUSTER_CODE": CLUSTER_CODE, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "cakep2p", "peers", "--json", "--interface", "127.0.0.1",
                             "--wait", str(wait_s)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
