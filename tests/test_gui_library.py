"""The window, offscreen, without a node: the first launch with the embedded demo model, the model library against a
fake hub on 127.0.0.1 (fits, progress, cancel, resume, offline, a missing package, then loading what arrived), a GGUF
chat with its own template, the chat list, code blocks with a Copy button, and Help/About."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import pytest

from tests._gui_helpers import pump_until, skip_if_qt_broken

skip_if_qt_broken()
pytest.importorskip("pytestqt", reason="GUI tests need pytest-qt")

import torch  # noqa: E402
from PySide6.QtCore import QPoint, Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

from cakep2p import paths  # noqa: E402
from cakep2p.gui.history import ChatHistory, ChatLog  # noqa: E402
from cakep2p.gui.preferences import PreferencesStore  # noqa: E402
from cakep2p.gui.recent import RecentModels  # noqa: E402
from cakep2p.gui.window import MainWindow  # noqa: E402
from cakep2p.library import catalog, download  # noqa: E402
from tests.fake_hub import fake_hub  # noqa: E402
from tests.kit import free_port  # noqa: E402

GGUF_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct-Q4_1"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("library-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAKEP2P_HOME", str(path))
        yield path


def make_window(home: Path, **options) -> MainWindow:
    window = MainWindow(history=ChatHistory(home / "chats"), recent=RecentModels(home / "recent.json"),
                        preferences=PreferencesStore(home / "window.json"), start_node=False, **options)
    window.show()
    return window


@pytest.fixture(scope="module")
def first_launch(qapp, home):
    """The window as a new user first sees it: no model ever opened here, so the demo model loads by itself."""
    torch.set_num_threads(1)
    window = make_window(home)
    try:
        pump_until(lambda: window.model_info is not None, timeout=60, message="the demo model to load")
        yield window
    finally:
        window.close()
        window.deleteLater()


def ask(window, qtbot, text: str, max_tokens: int = 12):
    window.settings.max_tokens.setValue(max_tokens)
    window.input.setPlainText(text)
    with qtbot.waitSignal(window.bridge.replyFinished, timeout=90000) as finished:
        window.send_button.click()
    return finished.args[0].reply


# ---- first launch ---------------------------------------------------------------------------------------------

def test_the_first_launch_opens_the_demo_model_and_says_what_it_is(first_launch, qtbot):
    info = first_launch.model_info
    assert info.demo and Path(info.path) == paths.embedded_model_dir() and info.name == "stories260K"
    assert first_launch.offer.isVisible() and "tiny demo model" in first_launch.offer.label.text()
    assert first_launch.offer.button("Open the model library") is not None
    assert "tiny demo model" in first_launch.model_panel.verdict.text()
    reply = ask(first_launch, qtbot, "Once upon a time")
    assert reply.completion_tokens > 0 and [row.role for row in first_launch.chat_model.messages()][-2:] == [
        "user", "assistant"]


def test_a_later_launch_does_not_open_the_demo_again(first_launch, home):
    later = make_window(home)
    try:
        assert later.model_info is None and not later.bridge.model_expected() and not later.offer.isVisible()
        assert later.model_panel.folder() == str(paths.embedded_model_dir())    # the recent list offers it
    finally:
        later.close()


# ---- the model library ------------------------------------------------------------------------------------------

@pytest.fixture
def hub(first_launch, stories_dir, monkeypatch):
    """A fake hub serving the stories260K folder as acme/stories-mini and a big GGUF for cancel and resume."""
    pytest.importorskip("huggingface_hub", reason="downloads need the optional huggingface_hub package")
    files = {path.name: path.read_bytes() for path in stories_dir.iterdir() if path.is_file()}
    with fake_hub({"acme/stories-mini": files, "acme/Big-GGUF": {"Big-Q4_K_M.gguf": bytes(3 << 20)}}) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        yield served
    for repo in ("acme/stories-mini", "acme/Big-GGUF"):
        shutil.rmtree(download.target_dir(repo), ignore_errors=True)


def test_the_library_lists_each_model_per_format_with_its_size_and_fit(first_launch, qtbot):
    dialog = first_launch.library.open()
    model = first_launch.library.model
    qtbot.waitUntil(lambda: len(model.fits) == len(model.rows) == 2 * len(catalog.CATALOG), timeout=20000)
    rows = {(model.index(row, 0).data(), model.index(row, 2).data()): model.index(row, 3).data()
            for row in range(model.rowCount())}
    assert model.index(0, 1).data().startswith("≈") and "GGUF Q4_K_M" in {format for _, format in rows}
    assert all(verdict.startswith(("fits", "too big")) for verdict in rows.values())
    dialog.select("qwen2.5-7b", "safetensors")
    assert "Qwen2.5 7B Instruct" in dialog.details.text() and "Qwen/Qwen2.5-7B-Instruct" in dialog.details.text()
    dialog.hide()


def test_a_hub_model_downloads_with_progress_and_then_loads(first_launch, hub, qtbot):
    dialog = first_launch.library.open()
    seen = []
    first_launch.library.downloads.progressed.connect(lambda repo, done, total: seen.append((done, total)))
    with qtbot.waitSignal(first_launch.library.downloads.finished, timeout=30000):
        dialog.hub_edit.setText("acme/stories-mini")
        dialog.hub_button.click()
    assert seen and seen[-1][0] == seen[-1][1] > 1_000_000
    assert dialog.load_now_button.isVisible() and "is downloaded" in dialog.message.text()
    with qtbot.waitSignal(first_launch.bridge.modelLoaded, timeout=60000) as loaded:
        dialog.load_now_button.click()
    assert loaded.args[0].name == "stories-mini" and not dialog.isVisible()


def test_a_cancelled_download_continues_where_it_stopped(first_launch, hub, qtbot):
    downloads, dialog = first_launch.library.downloads, first_launch.library.open()
    hub.gate = threading.Event()              # the file stops after its first MiB until the gate opens
    first_chunk = []
    downloads.progressed.connect(lambda repo, done, total: first_chunk.append(done) if done else None)
    try:
        dialog.hub_edit.setText("acme/Big-GGUF")
        dialog.hub_button.click()
        qtbot.waitUntil(lambda: bool(first_chunk), timeout=20000)
        assert dialog.progress.isVisible() and dialog.cancel_button.isVisible()
        with qtbot.waitSignal(downloads.cancelled, timeout=20000):
            dialog.cancel_button.click()
            hub.gate.set()
    finally:
        hub.gate.set()
    kept = download.partial_bytes("acme/Big-GGUF")
    assert 0 < kept < 3 << 20 and "kept to continue" in dialog.message.text()
    hub.gate = None
    with qtbot.waitSignal(downloads.finished, timeout=30000) as finished:
        dialog.hub_button.click()
    assert hub.ranges()[-1] == f"bytes={kept}-" and Path(finished.args[1]).stat().st_size == 3 << 20


def test_offline_the_library_says_the_hub_cannot_be_reached_once(first_launch, qtbot, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")      # nothing listens there
    dialog = first_launch.library.open()
    first_launch.banner.hide()
    with qtbot.waitSignal(first_launch.library.downloads.failed, timeout=30000):
        dialog.select("smollm2-135m", "gguf")
        dialog.download_button.click()
    assert dialog.message.text().startswith("Could not reach 127.0.0.1:") and "offline" in dialog.message.text()
    assert "huggingface_hub" not in dialog.message.text() and not first_launch.banner.isVisible()
    dialog.hide()


def test_without_huggingface_hub_the_library_names_the_package(first_launch, qtbot, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # as if the optional package were not installed
    dialog = first_launch.library.open()
    with qtbot.waitSignal(first_launch.library.downloads.failed, timeout=10000):
        dialog.hub_edit.setText("Qwen/Qwen3-0.6B")
        dialog.hub_button.click()
    assert "pip install huggingface_hub" in dialog.message.text()
    dialog.hide()


# ---- GGUF -------------------------------------------------------------------------------------------------------

@pytest.fixture
def gguf_window(first_launch):
    if not GGUF_DIR.is_dir():
        pytest.skip(f"the SmolLM2 GGUF test model is not at {GGUF_DIR}")
    first_launch.load_model(str(GGUF_DIR))
    pump_until(lambda: first_launch.model_info is not None and first_launch.model_info.name.startswith("SmolLM2"),
               timeout=120, message="the GGUF to load")
    first_launch.new_chat()
    yield first_launch


@pytest.mark.slow   # loads a 135M-parameter model
def test_a_gguf_shows_its_real_size_and_quantization_and_chats_with_its_template(gguf_window, qtbot):
    window = gguf_window
    assert "GGUF Q4_1, 93.8 MiB" in window.model_panel.verdict.text()
    assert "model's chat template" in window.model_panel.verdict.text()
    window.settings.temperature.setValue(0.0)
    window.settings.system_prompt_edit.setPlainText("You are a helpful assistant.")
    pieces = []
    window.bridge.tokenArrived.connect(pieces.append)
    try:
        first = ask(window, qtbot, "What is the capital of France?", 16)
        second = ask(window, qtbot, "And of Italy?", 16)
    finally:
        window.bridge.tokenArrived.disconnect(pieces.append)
    assert "Paris" in first.text and "Rome" in second.text and len(pieces) > 4
    conversation = window.bridge.chat.conversation
    prompt = conversation.tokenizer.decode(conversation.prompt_ids())
    assert prompt.index("You are a helpful assistant.") < prompt.index(
        "What is the capital of France?") < prompt.index("Paris") < prompt.index("And of Italy?")
    assert Path(window.recent.load()[0]) == next(GGUF_DIR.glob("*.gguf")).resolve()


def test_the_model_picker_takes_a_gguf_file_or_its_folder(first_launch):
    from cakep2p.gui.model_panel import FILE_FILTER, chosen_model

    gguf = GGUF_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "*.gguf" in FILE_FILTER and chosen_model(str(gguf)) == str(gguf)
    assert chosen_model(str(paths.embedded_model_dir() / "config.json")) == str(paths.embedded_model_dir())


# ---- the chat list, code blocks, About ---------------------------------------------------------------------------

def test_the_chat_list_shows_switches_renames_and_deletes_chats(first_launch, qtbot):
    window = first_launch
    window.new_chat()
    ask(window, qtbot, "Tell me about a fox", 4)
    fox = window.chat_log.path
    window.new_chat()
    ask(window, qtbot, "Tell me about a cat", 4)
    listed = window.chat_list_model
    qtbot.waitUntil(lambda: [log.title for log in listed.logs()][:2] == ["Tell me about a cat", "Tell me about a fox"])
    row = listed.row_of(fox)
    window.chat_list.list.clicked.emit(listed.index(row))
    assert window.chat_log.path == fox and window.chat_model.messages()[0].text == "Tell me about a fox"
    window.chat_list.renameRequested.emit(str(fox), "The fox chat")
    assert listed.logs()[listed.row_of(fox)].title == "The fox chat" == ChatLog(fox).title == window.chat_log.title
    window.chat_list.deleteRequested.emit(str(fox))
    assert not fox.exists() and listed.row_of(fox) < 0 and window.chat_log.path != fox


def test_every_code_block_has_a_copy_button(first_launch, qtbot):
    window = first_launch
    window.new_chat()
    window.chat.transcript.append("assistant", "Run this:\n\n```python\nprint('hi')\nprint(2)\n```\n\nand `x`.")
    view = window.chat_view
    index = window.chat_model.index(0, 0)
    qtbot.waitUntil(lambda: view.visualRect(index).height() > 40)
    buttons = view.delegate.copy_buttons(index, view.visualRect(index))
    assert [text for _rect, text in buttons] == ["print('hi')\nprint(2)"]
    QTest.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     buttons[0][0].center().toPoint())
    assert QGuiApplication.clipboard().text() == "print('hi')\nprint(2)" and view.delegate.copied == (0, 0)
    QTest.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(5, 5))
    window.new_chat()


def test_about_names_the_version_and_links_the_docs():
    from cakep2p import __version__
    from cakep2p.gui.menus import about_text, doc_links

    text = about_text()
    assert f"cakep2p {__version__}" in text and "--serve" in text
    assert {path.name for _title, path in doc_links()} >= {"README.md", "protocol.md", "security.md"}
    assert all(path.as_uri() in text for _title, path in doc_links())


def test_the_library_and_chat_list_models_pass_qtmodeltester(qtmodeltester, tmp_path):
    from cakep2p.gui.chat_list import ChatListModel
    from cakep2p.gui.library_view import LibraryModel
    from cakep2p.library.fit import Fit

    library = LibraryModel()
    qtmodeltester.check(library, force_py=True)
    library.set_fits({("smollm2-135m", "gguf"): Fit(True, 1, 2, 1, 1, 4096)})
    library.set_local({"bartowski/SmolLM2-135M-Instruct-GGUF": "/models/x.gguf"}, {"Qwen/Qwen2.5-7B-Instruct": 5})
    library.set_progress("Qwen/Qwen2.5-7B-Instruct", 50, 100)
    assert library.index(0, 3).data() == "fits on this machine" and library.index(0, 4).data() == "downloaded"
    assert library.state_text("Qwen/Qwen2.5-7B-Instruct") == "downloading 50%"
    history = ChatHistory(tmp_path / "chats")
    for question in ("first", "second"):
        history.new_chat().append("user", question)
    chats = ChatListModel(history)
    qtmodeltester.check(chats, force_py=True)
    chats.refresh()
    chats.set_current(chats.logs()[0].path)
    assert sorted(chats.index(row).data() for row in range(chats.rowCount())) == ["first", "second"]
