"""The window's "Serve OpenAI API" switch, offscreen: the real openai client against the server it starts on
127.0.0.1 for the loaded stories260K, a busy port as a message, and the port closed when the switch goes off."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests._gui_helpers import pump_until, skip_if_qt_broken

skip_if_qt_broken()
pytest.importorskip("pytestqt", reason="GUI tests need pytest-qt")

import openai  # noqa: E402
import torch  # noqa: E402

from cakep2p.gui.history import ChatHistory  # noqa: E402
from cakep2p.gui.preferences import PreferencesStore  # noqa: E402
from cakep2p.gui.recent import RecentModels  # noqa: E402
from cakep2p.gui.window import MainWindow  # noqa: E402
from tests.kit import free_port  # noqa: E402

MODEL = "stories260K"


def accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def api_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate()
            if thread.name.startswith(("cakep2p-api", "cakep2p-gui-api"))]


@pytest.fixture(scope="module")
def window(qapp, tmp_path_factory):
    """A window without a node (the model runs on this machine), closed at the end: no API thread may remain."""
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("gui-api-home")
    main_window = MainWindow(start_node=False, history=ChatHistory(home / "chats"),
                             recent=RecentModels(home / "recent.json"),
                             preferences=PreferencesStore(home / "window.json"), open_demo=False)
    main_window.show()
    try:
        yield main_window
    finally:
        main_window.close()
        main_window.deleteLater()
        pump_until(lambda: not api_threads(), timeout=10, message="the API threads to end")


@pytest.fixture(scope="module")
def loaded(window, stories_dir):
    window.load_model(str(stories_dir))
    pump_until(lambda: window.model_info is not None, timeout=60, message="stories260K to load")
    return window


def switch_on(window, qtbot, port: int) -> str:
    window.api_panel.port_box.setValue(port)
    started = time.perf_counter()
    with qtbot.waitSignal(window.api_switch.serverStarted, timeout=30000) as signal:
        window.api_panel.switch.click()
        clicked = time.perf_counter()
    print(f"switch on: click returned in {(clicked - started) * 1000:.1f} ms, "
          f"server up after {(time.perf_counter() - started) * 1000:.0f} ms")
    return signal.args[0]


def switch_off(window, qtbot) -> None:
    started = time.perf_counter()
    with qtbot.waitSignal(window.api_switch.serverStopped, timeout=30000):
        window.api_panel.switch.click()
        clicked = time.perf_counter()
    print(f"switch off: click returned in {(clicked - started) * 1000:.1f} ms, "
          f"server down after {(time.perf_counter() - started) * 1000:.0f} ms")


def test_api_switch_is_disabled_with_a_hint_until_a_model_is_loaded(window):
    if window.model_info is not None:
        pytest.skip("runs before the model is loaded")
    assert not window.api_panel.switch.isEnabled()
    assert "Load a model" in window.api_panel.hint.text()


def test_api_switch_serves_the_reference_completion_and_off_closes_the_port(loaded, qtbot, stories_dir):
    reference = json.loads((stories_dir / "REFERENCE.json").read_text())["greedy"][0]
    port = free_port()
    url = switch_on(loaded, qtbot, port)
    try:
        assert url == f"http://127.0.0.1:{port}/v1" == loaded.api_panel.url()
        with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60) as client:
            result = client.completions.create(model=MODEL, prompt=reference["prompt"], max_tokens=64, temperature=0)
        assert result.choices[0].text == reference["text"]
    finally:
        switch_off(loaded, qtbot)
    assert not accepts_connections(port)
    assert loaded.api_panel.url() == "" and not loaded.api_panel.copy_button.isEnabled()


def test_copy_puts_the_api_url_on_the_clipboard(loaded, qtbot):
    from PySide6.QtGui import QGuiApplication

    url = switch_on(loaded, qtbot, free_port())
    try:
        loaded.api_panel.copy_button.click()
        assert QGuiApplication.clipboard().text() == url
    finally:
        switch_off(loaded, qtbot)


def test_a_busy_port_shows_a_message_and_turns_the_switch_off(loaded, qtbot):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        loaded.api_panel.port_box.setValue(port)
        with qtbot.waitSignal(loaded.api_switch.serverFailed, timeout=30000) as failed:
            loaded.api_panel.switch.click()
    assert f"127.0.0.1:{port}" in failed.args[0] and "another port" in failed.args[0]
    assert loaded.banner.isVisible() and "another port" in loaded.banner.label.text()
    assert not loaded.api_panel.switch.isChecked() and loaded.api_panel.port_box.isEnabled()


def test_loading_the_model_again_restarts_the_server_on_the_same_port(loaded, qtbot, stories_dir):
    port = free_port()
    switch_on(loaded, qtbot, port)
    try:
        with qtbot.waitSignal(loaded.api_switch.serverStopped, timeout=30000):
            with qtbot.waitSignal(loaded.api_switch.serverStarted, timeout=60000) as restarted:
                loaded.load_model(str(stories_dir))
        assert restarted.args[0] == f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=restarted.args[0], api_key="none", max_retries=0, timeout=60) as client:
            assert [card.id for card in client.models.list().data] == [MODEL]
    finally:
        switch_off(loaded, qtbot)
