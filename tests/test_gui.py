"""The desktop window, offscreen, over the real core: peers from real `--serve` processes (arriving, lost, of another
cluster), the Join toggle seen by a real `cakep2p peers`, offered memory, and a streaming chat with the trained
stories260K model."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from types import SimpleNamespace

import pytest

pytest.importorskip("PySide6", reason="the window needs PySide6: pip install 'cakep2p[gui]'")
pytest.importorskip("pytestqt", reason="GUI tests need pytest-qt")

from cakep2p.gui import broken_qt_binding  # noqa: E402

if broken_qt_binding():
    pytest.skip(broken_qt_binding(), allow_module_level=True)

import torch  # noqa: E402
from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication, QDialogButtonBox, QLabel  # noqa: E402

from cakep2p.discovery import PeerInfo  # noqa: E402
from cakep2p.gui.state import PlanSegment, PlanView  # noqa: E402
from cakep2p.gui.history import ChatHistory, ChatLog  # noqa: E402
from cakep2p.gui.models import ChatModel  # noqa: E402
from cakep2p.gui.peers_model import PeersFilter, PeersModel  # noqa: E402
from cakep2p.gui.preferences import PreferencesStore  # noqa: E402
from cakep2p.gui.recent import RecentModels  # noqa: E402
from cakep2p.gui.transcript import Transcript  # noqa: E402
from cakep2p.gui.window import MainWindow  # noqa: E402
from cakep2p.security import new_code  # noqa: E402
from tests.kit import free_port, loopback_multicast_on, seed_benchmark, start_serve  # noqa: E402
from tests._gui_helpers import CLUSTER_CODE, peers_json, pump_until, reference_greedy, wait_for_one_chat  # noqa: E402

RUN = uuid.uuid4().hex[:6]


def make_peer(index: int, **changes) -> PeerInfo:
    fields = dict(name=f"peer-{index}", node_id=f"id-{index}", address="127.0.0.1", port=5770 + index,
                  version="0.1.0", protocol_version=1, cluster_fingerprint="f" * 16, accelerator="cpu",
                  device_name="Test CPU", ram_total=16 << 30, ram_available=8 << 30, vram_total=0, vram_free=0,
                  offered_memory=4 << 30, gflops=10.0, bandwidth=5e9, serving=True, status="ok")
    fields.update(changes)
    return PeerInfo(**fields)


# ---- models --------------------------------------------------------------------------------------------------

def states(model) -> dict[str, str]:
    column = [column.header for column in model.sourceModel().columns].index("State") if isinstance(
        model, PeersFilter) else [column.header for column in model.columns].index("State")
    return {model.index(row, 0).data(): model.index(row, column).data() for row in range(model.rowCount())}


def test_peers_model_passes_qtmodeltester_through_adds_updates_and_removals(qtmodeltester):
    model = PeersModel()
    for index in range(3):
        model.apply_event("added", make_peer(index))
    model.apply_event("updated", make_peer(1, serving=False, status="other_cluster"))
    model.set_layers({"id-0": "0–3", "id-2": "4–7"})
    model.apply_event("removed", make_peer(0))
    qtmodeltester.check(model, force_py=True)
    assert model.node_ids() == ["id-1", "id-2"]
    shown = PeersFilter(model)
    qtmodeltester.check(shown, force_py=True)
    assert [shown.index(row, 0).data() for row in range(shown.rowCount())] == ["peer-2"]   # other clusters folded
    shown.set_show_foreign(True)
    assert states(shown) == {"peer-1": "other cluster", "peer-2": "ok"} and model.foreign_count() == 1
    assert model.index(1, len(model.columns) - 1).data() == "4–7"


def test_this_machines_row_comes_first_and_a_lost_peer_says_so_until_it_leaves(qtmodeltester):
    model = PeersModel()
    qtmodeltester.check(model, force_py=True)
    model.apply_event("added", make_peer(1, name="aardvark"))
    model.apply_event("added", make_peer(2, serving=False))
    model.set_own(make_peer(0, name="zebra-laptop"))
    shown = PeersFilter(model)
    shown.sort(0)
    assert [shown.index(row, 0).data() for row in range(shown.rowCount())] == ["zebra-laptop", "aardvark", "peer-2"]
    assert states(model) == {"zebra-laptop": "this machine", "aardvark": "ok", "peer-2": "not serving"}
    model.mark_lost("id-1")
    model.apply_event("updated", make_peer(1, name="aardvark"))      # its announcement lingers: still lost
    assert states(model)["aardvark"] == "lost"
    model.clear_lost()                                                # a new plan judges it afresh
    assert states(model)["aardvark"] == "ok"
    model.mark_lost("id-1")
    model.apply_event("removed", make_peer(1))
    assert model.node_ids() == ["id-2"] and model.row_of("id-0") == 0


def test_the_replan_offer_asks_once_about_machines_that_joined_after_the_plan(qtbot):
    from cakep2p.gui.replan import ReplanOffer

    offer = ReplanOffer(settle_ms=10)
    offered = []
    offer.offered.connect(lambda question, node_ids: offered.append((question, node_ids)))
    offer.peer_event("added", make_peer(1))                  # there when the model was planned: not offered
    offer.plan_changed({"me"})
    offer.set_model(True)
    for index in (2, 3):
        offer.peer_event("added", make_peer(index))
    offer.peer_event("added", make_peer(4, serving=False))   # not serving: never offered
    qtbot.waitUntil(lambda: bool(offered), timeout=2000)
    assert offered == [("2 machines joined (peer-2, peer-3): spread the model over them? The chat stays.",
                        ["id-2", "id-3"])]
    offer.answered(["id-2", "id-3"])                          # "Not now" (or taken)
    offer.peer_event("added", make_peer(5))
    qtbot.waitUntil(lambda: len(offered) == 2, timeout=2000)
    assert offered[1][1] == ["id-5"]


def test_chat_model_passes_qtmodeltester_while_streaming(qtmodeltester, qtbot):
    transcript = Transcript()
    model = ChatModel(transcript, render_interval_ms=10)
    transcript.append("user", "Hello")
    transcript.append("assistant", "", state="streaming")
    with qtbot.waitSignal(model.dataChanged, timeout=2000):
        for piece in ("Hi", " there", "!"):
            transcript.append_text(piece)
    transcript.finish_streaming("first token 1 ms")
    transcript.append("notice", "peer-2 left the cluster.")
    qtmodeltester.check(model, force_py=True)
    assert [message.text for message in model.messages()] == ["Hello", "Hi there!", "peer-2 left the cluster."]
    assert model.index(1, 0).data(ChatModel.StatusRole) == "first token 1 ms"


def test_chat_model_throttles_view_updates_while_tokens_stream(qtbot):
    transcript = Transcript()
    model = ChatModel(transcript, render_interval_ms=100)
    transcript.append("assistant", "", state="streaming")
    changes = []
    model.dataChanged.connect(lambda *args: changes.append(args))
    for _ in range(200):
        transcript.append_text("x")
    qtbot.waitUntil(lambda: len(changes) == 1, timeout=2000)
    assert model.message(0).text == "x" * 200


def test_chat_model_follows_each_transcript_operation_under_qtmodeltester(qtmodeltester):
    transcript = Transcript()
    model = ChatModel(transcript, render_interval_ms=0)
    qtmodeltester.check(model, force_py=True)            # and it keeps checking every change that follows
    for role, text in (("user", "a"), ("assistant", "b"), ("notice", "peer-2 left"), ("user", "c"), ("assistant", "d")):
        transcript.append(role, text)
    assert transcript.regenerate()
    transcript.append_text("d2")
    transcript.finish_streaming("4 tokens")
    assert transcript.drop_oldest_turn() == 2
    transcript.append("user", "too long")
    transcript.append("assistant", "", state="streaming")
    transcript.withdraw_answer(question_too=True)
    assert [(row.role, row.text) for row in model.messages()] == [("notice", "peer-2 left"), ("user", "c"),
                                                                   ("assistant", "d2")]
    transcript.replace([("user", "x"), ("assistant", "y")])
    assert model.rowCount() == 2 and model.index(1, 0).data() == "y"


def test_failed_answers_and_queued_questions_are_shown_but_not_in_the_history():
    transcript = Transcript()
    transcript.append("user", "a")
    transcript.append("assistant", "half an answ", state="streaming")
    transcript.finish_streaming("failed", failed=True)
    transcript.append("user", "b", state="queued", status="waiting for the model to load…")
    assert len(transcript) == 3 and transcript.history() == [{"role": "user", "content": "a"}]
    transcript.remove_queued()
    assert [row.text for row in transcript.messages()] == ["a", "half an answ"]


# ---- history -------------------------------------------------------------------------------------------------

def test_history_replays_after_a_crash_that_tore_the_last_line(tmp_path):
    log = ChatHistory(tmp_path).new_chat(model="stories260K")
    log.append("user", "Once upon a time")
    log.append("assistant", "there was a cat.")
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"type": "message", "role": "user", "cont')   # the process died mid-write
    reread = ChatHistory(tmp_path).chats()[0]
    assert [(message.role, message.content) for message in reread.messages] == [
        ("user", "Once upon a time"), ("assistant", "there was a cat.")]


def test_history_records_regenerate_and_dropped_turns(tmp_path):
    log = ChatLog(tmp_path / "chat.jsonl")
    for role, text in (("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")):
        log.append(role, text)
    log.truncate(3)
    log.append("assistant", "d2")
    log.drop_first(2)
    assert [message.content for message in ChatLog(tmp_path / "chat.jsonl").messages] == ["c", "d2"]


def test_history_log_follows_a_history_with_the_fewest_records(tmp_path):
    log = ChatLog(tmp_path / "chat.jsonl")
    turns = [{"role": role, "content": text} for role, text in (("user", "a"), ("assistant", "b"),
                                                                ("user", "c"), ("assistant", "d"))]
    log.follow(turns)
    log.follow(turns[2:] + [{"role": "user", "content": "e"}])    # the oldest turn dropped, a question added
    log.follow(turns[2:3])                                          # that question withdrawn, the answer redone
    kinds = [json.loads(line)["type"] for line in log.path.read_text().splitlines()]
    assert kinds == ["meta"] + ["message"] * 4 + ["drop_first", "message", "truncate"]
    assert [message.content for message in ChatLog(log.path).messages] == ["c"]


def test_recent_models_remembers_newest_first_without_duplicates(tmp_path):
    recent = RecentModels(tmp_path / "recent.json")
    for name in ("a", "b", "a"):
        (tmp_path / name).mkdir(exist_ok=True)
        recent.remember(tmp_path / name)
    assert RecentModels(tmp_path / "recent.json").load() == [str(tmp_path / "a"), str(tmp_path / "b")]


# ---- the window over a real node --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gui_home(tmp_path_factory):
    """The window's own CAKEP2P_HOME (identity, pairing code, history), with the speed benchmark pre-seeded."""
    home = tmp_path_factory.mktemp("gui-home")
    seed_benchmark(home)
    previous = os.environ.get("CAKEP2P_HOME")
    os.environ["CAKEP2P_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("CAKEP2P_HOME", None)
    else:
        os.environ["CAKEP2P_HOME"] = previous


@pytest.fixture(scope="module")
def window(qapp, gui_home):
    loopback_multicast_on()
    torch.set_num_threads(1)
    options = {"name": f"gui-{RUN}", "port": free_port(), "interfaces": ["127.0.0.1"], "cluster_code": CLUSTER_CODE}
    main_window = MainWindow(options, history=ChatHistory(gui_home / "chats"),
                             recent=RecentModels(gui_home / "recent.json"),
                             preferences=PreferencesStore(gui_home / "window.json"), open_demo=False)
    failures = []
    main_window.bridge.nodeFailed.connect(failures.append)
    main_window.show()
    try:
        pump_until(lambda: main_window.bridge.node is not None or failures, message="the window's node to start")
        assert not failures, failures
        yield main_window
    finally:
        main_window.close()
        main_window.deleteLater()


@pytest.fixture(scope="module")
def chat_window(window, stories_dir):
    """The window with stories260K loaded (a chat with the plain User/Assistant template: it has none)."""
    window.load_model(str(stories_dir))
    pump_until(lambda: window.model_info is not None, timeout=60, message="stories260K to load")
    return window


@pytest.fixture
def greedy(chat_window, qtbot):
    """A fresh chat at temperature 0 in raw completion (the text continues the prompt: the reference's setting)."""
    chat_window.settings.completion_mode.setChecked(True)
    chat_window.new_chat()
    qtbot.waitUntil(lambda: not chat_window.bridge.generating)
    chat_window.settings.temperature.setValue(0.0)
    return chat_window


def send(window, text: str, max_tokens: int) -> None:
    window.settings.max_tokens.setValue(max_tokens)
    window.input.setPlainText(text)
    window.send_button.click()


def table_names(window) -> set[str]:
    return {peer.name for peer in window.peers_model.peers()}


@pytest.mark.slow   # --serve processes
def test_peers_table_fills_when_serve_nodes_start_and_empties_when_they_stop(window, qtbot, tmp_path):
    names = [f"guipeer-{letter}-{RUN}" for letter in "ab"]
    nodes = [start_serve(tmp_path, name, free_port(), code=CLUSTER_CODE) for name in names]
    try:
        qtbot.waitUntil(lambda: set(names) <= table_names(window), timeout=30000)
        view = window.peers_panel.table
        rows = {view.model().index(row, 0).data(): row for row in range(view.model().rowCount())}
        state_column = [column.header for column in window.peers_model.columns].index("State")
        assert all(view.model().index(rows[name], state_column).data() == "ok" for name in names)
        for node in nodes:
            node.stop()
        qtbot.waitUntil(lambda: not set(names) & table_names(window), timeout=15000)
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.slow
def test_machines_of_another_cluster_fold_into_one_line_with_the_hint_to_pair_them(window, qtbot, tmp_path):
    names = [f"stranger-{letter}-{RUN}" for letter in "ab"]
    strangers = [start_serve(tmp_path, name, free_port(), code=new_code()) for name in names]
    try:
        qtbot.waitUntil(lambda: set(names) <= table_names(window), timeout=30000)
        panel = window.peers_panel
        qtbot.waitUntil(lambda: "cakep2p code" in panel.foreign_label.text(), timeout=10000)
        shown = {panel.table.model().index(row, 0).data() for row in range(panel.table.model().rowCount())}
        assert not set(names) & shown and window.bridge.node.name in shown           # folded away; own row stays
        assert panel.foreign_label.isVisible() and f"{window.peers_model.foreign_count()} machines of other " \
            "clusters</b> (hidden)" in panel.foreign_label.text()
        assert window.peers_model.foreign_count() >= 2     # other projects' test nodes may share the loopback too
        panel.show_foreign.click()
        shown = {panel.table.model().index(row, 0).data() for row in range(panel.table.model().rowCount())}
        assert set(names) <= shown and window.preferences.load().show_other_clusters
        panel.show_foreign.click()
        assert not window.preferences.load().show_other_clusters
    finally:
        for node in strangers:
            node.kill()


def test_the_peers_table_fits_its_pane_and_shows_this_machine_first(window, qtbot):
    for index in range(4):
        window.peers_model.apply_event("added", make_peer(index, name=f"desk-{index}-with-a-long-name"))
    try:
        table = window.peers_panel.table
        qtbot.waitUntil(lambda: table.model().rowCount() >= 5)
        QApplication.processEvents()
        header = table.horizontalHeader()
        last = header.logicalIndex(header.count() - 1)
        assert header.sectionViewportPosition(last) + header.sectionSize(last) <= table.viewport().width()
        assert not table.horizontalScrollBar().isVisible() and header.sectionSize(0) >= 60
        assert table.model().index(0, 0).data() == window.bridge.node.name
        assert states(window.peers_model)[window.bridge.node.name] == "this machine"
    finally:
        for index in range(4):
            window.peers_model.apply_event("removed", make_peer(index))


def test_the_offered_memory_slider_shows_the_live_fit_and_offers_it(chat_window, qtbot):
    offer = chat_window.peers_panel.offer
    node = chat_window.bridge.node
    try:
        offer.slider.setValue(0)                                  # nothing offered: the model cannot run here
        assert "stories260K: too big" in offer.fit_label.text()
        qtbot.waitUntil(lambda: node.offered_memory == 0, timeout=10000)
        qtbot.waitUntil(lambda: chat_window.peers_model.index(0, 3).data() == "—")   # own row: Offers
        assert chat_window.preferences.load().max_memory == 0
        offer.slider.setValue(offer.slider.maximum())              # everything it can spare again
        assert "stories260K: fits" in offer.fit_label.text()
        qtbot.waitUntil(lambda: node.offered_memory > 0 and chat_window.preferences.load().max_memory is None,
                        timeout=10000)
    finally:
        offer.slider.setValue(offer.slider.maximum())


def test_node_settings_are_saved_for_the_next_start(window, gui_home):
    dialog = window.open_node_settings()
    try:
        dialog.name_edit.setText("studio-mac")
        dialog.interface_combo.setCurrentIndex(dialog.interface_combo.findData("127.0.0.1"))
        dialog.port_box.setValue(47123)
        dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Save).click()
        saved = window.preferences.load()
        assert (saved.node_name, saved.interface, saved.port) == ("studio-mac", "127.0.0.1", 47123)
        later = MainWindow(history=ChatHistory(gui_home / "chats"), recent=RecentModels(gui_home / "recent.json"),
                           preferences=PreferencesStore(gui_home / "window.json"), start_node=False, open_demo=False)
        try:
            assert {key: later.bridge.node_options[key] for key in ("name", "interfaces", "port")} == {
                "name": "studio-mac", "interfaces": ["127.0.0.1"], "port": 47123}
        finally:
            later.close()
    finally:
        window.preferences.update(node_name=None, interface=None, port=None)
        dialog.close()


@pytest.mark.slow   # --serve processes
def test_join_toggle_makes_this_node_appear_and_disappear_for_a_peers_process(window, qtbot, tmp_path):
    own_id = window.bridge.node.node_id
    toggle = window.peers_panel.join_toggle
    assert toggle.isChecked()
    assert own_id in {peer["id"] for peer in peers_json(tmp_path / "browser")}
    with qtbot.waitSignal(window.bridge.servingChanged, timeout=10000) as changed:
        toggle.click()
    assert changed.args == [False] and not toggle.isChecked()
    assert own_id not in {peer["id"] for peer in peers_json(tmp_path / "browser")}
    with qtbot.waitSignal(window.bridge.servingChanged, timeout=10000) as changed:
        toggle.click()
    assert changed.args == [True]


def test_loaded_model_shows_its_plan_bar_and_chats_with_the_fallback_template(chat_window):
    plan = chat_window.model_panel.plan_bar.plan
    assert plan is not None and plan.num_layers == 5
    assert [(segment.start, segment.end, segment.is_self) for segment in plan.segments] == [(0, 5, True)]
    assert not chat_window.settings.completion_mode.isChecked() and not chat_window.bridge.chat.conversation.raw
    line = chat_window.model_panel.verdict.text()
    assert "safetensors f32, 1020 KiB" in line and "User/Assistant" in line
    assert chat_window.settings.max_tokens.value() == 512 // 4     # a quarter of the context


def test_chat_streams_the_reference_greedy_tokens_into_the_view(greedy, qtbot, stories_dir):
    reference = reference_greedy(stories_dir)
    pieces = []
    greedy.bridge.tokenArrived.connect(pieces.append)
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000) as finished:
        send(greedy, reference["prompt"], len(reference["new_token_ids"]))
    greedy.bridge.tokenArrived.disconnect(pieces.append)
    outcome = finished.args[0]
    assert list(outcome.reply.token_ids) == reference["new_token_ids"]
    assert len(pieces) > 10 and "".join(pieces) == reference["text"]
    rows = greedy.chat_model.messages()
    assert [(row.role, row.text) for row in rows] == [("user", reference["prompt"]), ("assistant", reference["text"])]
    rendered, *_ = greedy.chat_view.delegate._layout(greedy.chat_model.index(1, 0), greedy.chat_view.viewport().width())
    assert "little girl named Lily" in rendered.toPlainText()
    assert "tok/s" in rows[1].status
    qtbot.waitUntil(lambda: greedy.context_bar.value() == outcome.context_used > len(reference["new_token_ids"]))


def test_streamed_text_reaches_the_transcript_on_the_ui_thread(greedy, qtbot):
    import threading

    threads = set()

    def record(_row: int) -> None:   # a direct connection: it runs on the thread that changed the transcript
        threads.add(threading.current_thread())

    greedy.chat.transcript.changed.connect(record)
    try:
        with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
            send(greedy, "Once upon a time", 16)
    finally:
        greedy.chat.transcript.changed.disconnect(record)
    assert threads == {threading.main_thread()}


def test_stop_ends_generation_within_one_token(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.tokenArrived, timeout=60000):
        send(greedy, "Once upon a time", 400)
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000) as finished:
        greedy.stop_button.click()
    outcome = finished.args[0]
    assert outcome.reply.finish_reason == "cancelled"
    assert outcome.tokens_after_stop is not None and outcome.tokens_after_stop <= 1
    assert "stopped" in greedy.chat_model.messages()[-1].status


def test_event_loop_keeps_a_timer_firing_at_20_hz_during_generation(greedy, qtbot):
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    with qtbot.waitSignal(greedy.bridge.replyStarted, timeout=60000):
        send(greedy, "Once upon a time", 400)
    started = time.monotonic()
    timer.start()
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=120000):
        pass
    timer.stop()
    elapsed = time.monotonic() - started
    assert len(ticks) >= 20 * elapsed - 1, f"{len(ticks)} timer ticks in {elapsed:.2f} s of generation"


def test_history_is_persisted_as_it_goes_and_exports_as_markdown(greedy, qtbot, tmp_path):
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000) as finished:
        send(greedy, "Once upon a time", 16)
    answer = finished.args[0].reply.text
    stored = ChatLog(greedy.chat_log.path)   # read back as a restarted app would
    assert [(message.role, message.content) for message in stored.messages] == [
        ("user", "Once upon a time"), ("assistant", answer)]
    exported = greedy.export_chat(str(tmp_path / "chat.md")).read_text()
    assert "## You\n\nOnce upon a time" in exported and answer.strip() in exported


def test_context_full_offers_new_chat_or_dropping_the_oldest_turn(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.contextFull, timeout=60000):
        send(greedy, "the cat sat on the mat. " * 200, 16)
    assert greedy.banner.isVisible()
    assert greedy.banner.button("New chat") is not None and greedy.banner.button("Drop oldest turn") is not None
    assert greedy.chat_model.rowCount() == 0 and not greedy.bridge.generating


def test_an_answer_that_reaches_the_end_of_the_context_says_so(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000) as finished:
        send(greedy, "the cat sat on the mat. " * 40, 400)       # ~400 prompt tokens of 512: room for fewer than 400
    assert finished.args[0].reply.context_full
    rows = greedy.chat_model.messages()
    assert "stopped at the end of the context" in rows[1].status
    assert rows[-1].role == "notice" and "end of the model's context (512 tokens)" in rows[-1].text


def test_a_folder_without_a_model_shows_its_message_once(window, qtbot, tmp_path):
    with qtbot.waitSignal(window.bridge.modelFailed, timeout=30000) as failed:
        window.load_model(str(tmp_path))
    assert "config.json" in failed.args[0]
    assert window.banner.isVisible() and window.banner.label.text() == failed.args[0]
    qtbot.waitUntil(lambda: window.bridge._inspecting.done())   # the preview failed too, and is not shown again
    qtbot.waitUntil(lambda: not window.bridge._inspecting.running())
    QApplication.processEvents()
    shown = [widget.text() for widget in window.findChildren(QLabel) if widget.isVisible()]
    assert sum("config.json" in text for text in shown) == 1, shown


def test_plan_bar_legend_names_each_node_and_its_layers(qtbot):
    from cakep2p.gui.plan_bar import PlanBar

    bar = PlanBar()
    qtbot.addWidget(bar)
    bar.set_plan(PlanView(22, (PlanSegment("a", "laptop", 0, 12, 3 << 30, True),
                               PlanSegment("b", "desktop", 12, 22, 2 << 30, False))))
    assert bar.legend_lines() == ["laptop (this machine): layers 0–11, 3 GiB", "desktop: layers 12–21, 2 GiB"]
    assert bar.color_of("a") != bar.color_of("b")


def test_markdown_answers_render_code_in_a_monospaced_font(qapp):
    from PySide6.QtGui import QFont

    from cakep2p.gui.chat_view import MONOSPACE_FAMILIES, markdown_document

    document = markdown_document("Run **this**:\n\n```\nprint(1)\n```\n\nthen `x`.", QFont())
    families = {}
    block = document.begin()
    while block.isValid():
        fragments = block.begin()
        while not fragments.atEnd():
            fragment = fragments.fragment()
            families[fragment.text()] = fragment.charFormat().fontFamilies() or []
            fragments += 1
        block = block.next()
    assert families["print(1)"][0] == MONOSPACE_FAMILIES[0] and families["x"][0] == MONOSPACE_FAMILIES[0]
    assert families["this"][:1] != MONOSPACE_FAMILIES[:1]


def test_chat_view_follows_new_text_until_the_user_scrolls_up(qtbot):
    from cakep2p.gui.chat_view import ChatView

    transcript = Transcript()
    model = ChatModel(transcript, render_interval_ms=0)
    view = ChatView()
    view.setModel(model)
    view.resize(400, 300)
    qtbot.addWidget(view)
    view.show()
    scroll_bar = view.verticalScrollBar()
    for index in range(30):
        transcript.append("assistant", f"answer number {index}")
    qtbot.waitUntil(lambda: scroll_bar.maximum() > 0 and scroll_bar.value() == scroll_bar.maximum())
    scroll_bar.setValue(0)                      # the user scrolls up to read
    old_maximum = scroll_bar.maximum()
    for index in range(10):
        transcript.append("assistant", f"later answer {index}")
    qtbot.waitUntil(lambda: scroll_bar.maximum() > old_maximum)
    assert scroll_bar.value() == 0 and not view.follow
    scroll_bar.setValue(scroll_bar.maximum())   # back at the end: following again
    transcript.append("assistant", "newest")
    qtbot.waitUntil(lambda: scroll_bar.value() == scroll_bar.maximum())
    assert view.follow


def test_model_preview_says_when_the_cluster_cannot_hold_the_model(window, qtbot, stories_dir):
    from cakep2p.discovery import STATIC_KEY

    node = window.bridge.node
    window.bridge.node_options["max_memory"] = 200_000     # this machine alone is too small
    try:
        with qtbot.waitSignal(window.bridge.modelInspected, timeout=10000) as inspected:
            window.bridge.inspect_model(str(stories_dir))
        too_small = inspected.args[0]
        helper = make_peer(1, cluster_fingerprint=node.fingerprint, offered_memory=1 << 30)
        node.directory.put(f"{STATIC_KEY}preview-helper", helper)
        with qtbot.waitSignal(window.bridge.modelInspected, timeout=10000) as inspected:
            window.bridge.inspect_model(str(stories_dir))
        roomy = inspected.args[0]
    finally:
        window.bridge.node_options.pop("max_memory")
        node.directory.remove(f"{STATIC_KEY}preview-helper")
    assert not too_small.fits and "too big" in too_small.verdict and too_small.plan is None
    assert roomy.fits and {segment.node_id for segment in roomy.plan.segments} == {node.node_id, "id-1"}
    assert roomy.planned.nodes[1].node_id == "id-1"     # the preview is cluster.plan_model's plan itself


def test_the_settings_take_the_sampling_defaults_of_the_models_generation_config(window, qtbot, stories_dir,
                                                                                 tmp_path):
    import json
    import shutil

    sampling = tmp_path / "sampling-stories"
    shutil.copytree(stories_dir, sampling)
    (sampling / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}))
    loaded = []
    window.bridge.modelLoaded.connect(loaded.append)
    try:
        window.load_model(str(sampling))
        qtbot.waitUntil(lambda: bool(loaded), timeout=60000)
        settings = window.settings
        assert (settings.temperature.value(), settings.top_p.value()) == (0.6, 0.9)
        assert settings.params().top_k == 20 and settings.params().temperature == 0.6
        loaded.clear()
        window.load_model(str(stories_dir))   # greedy by its generation_config.json (no do_sample)
        qtbot.waitUntil(lambda: bool(loaded), timeout=60000)
        assert (settings.temperature.value(), settings.top_p.value(), settings.params().top_k) == (0.0, 1.0, 0)
    finally:
        window.bridge.modelLoaded.disconnect(loaded.append)


def test_the_weights_selector_loads_the_model_in_the_chosen_format(window, qtbot, stories_dir):
    loaded = []
    window.bridge.modelLoaded.connect(loaded.append)
    try:
        window.model_panel.weights_combo.setCurrentText("int8")
        assert window.bridge.weights == "int8"
        window.load_model(str(stories_dir))
        qtbot.waitUntil(lambda: bool(loaded), timeout=60000)
        assert window.bridge.model.describe()["weights"] == "int8"
        assert "runs as int8" in window.model_panel.verdict.text()
    finally:
        window.model_panel.weights_combo.setCurrentText("auto")
        window.bridge.modelLoaded.disconnect(loaded.append)


def test_regenerate_replaces_the_last_answer(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000) as first:
        send(greedy, "Once upon a time", 12)
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000) as second:
        greedy.regenerate_button.click()
    assert second.args[0].reply.text == first.args[0].reply.text        # temperature 0: the same answer again
    assert [row.role for row in greedy.chat_model.messages()] == ["user", "assistant"]
    assert [message.role for message in ChatLog(greedy.chat_log.path).messages] == ["user", "assistant"]


def test_dropping_the_oldest_turn_lets_a_full_chat_continue(greedy, qtbot):
    greedy.settings.completion_mode.setChecked(False)        # chat mode: every turn stays in the prompt
    try:
        for _ in range(2):                                   # ~150 tokens each: two turns fit in 512
            with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
                send(greedy, "the cat sat on the mat. " * 15, 8)
        with qtbot.waitSignal(greedy.bridge.contextFull, timeout=60000):
            send(greedy, "and then? " + "the dog ran to the park. " * 20, 8)
        with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
            greedy.banner.button("Drop oldest turn").click()
        texts = [(row.role, row.text[:9]) for row in greedy.chat_model.messages()]
        assert [role for role, _ in texts] == ["user", "assistant", "user", "assistant"]
        assert texts[2] == ("user", "and then?")
        assert len(ChatLog(greedy.chat_log.path).messages) == 4
    finally:
        greedy.settings.completion_mode.setChecked(True)


def test_losing_a_peer_that_holds_layers_adds_a_notice_and_the_chat_goes_on(greedy, qtbot):
    plan = greedy.cluster.plan
    greedy.cluster.plan = PlanView(5, (PlanSegment("me", "laptop", 0, 3, 0, True),
                                       PlanSegment("id-7", "peer-7", 3, 5, 0, False)))
    try:
        greedy.bridge.peerEvent.emit("removed", make_peer(7))
    finally:
        greedy.cluster.plan = plan
    assert [(row.role, row.text) for row in greedy.chat_model.messages()] == [
        ("notice", "peer-7 (layers 3–4) left the cluster.")]
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        send(greedy, "Once upon a time", 4)
    assert [row.role for row in greedy.chat_model.messages()] == ["notice", "user", "assistant"]


def test_new_chat_while_an_answer_streams_leaves_the_new_chat_empty(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.tokenArrived, timeout=60000):
        send(greedy, "Once upon a time", 400)
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        greedy.new_chat_button.click()
    assert greedy.chat_model.rowCount() == 0 and greedy.chat_log.messages == []
    assert greedy.send_button.isEnabled()


def test_a_message_typed_while_the_model_loads_is_answered_once_it_is_loaded(chat_window, qtbot, stories_dir):
    chat_window.new_chat()
    chat_window.settings.temperature.setValue(0.0)
    with qtbot.waitSignal(chat_window.bridge.replyFinished, timeout=60000):
        chat_window.load_model(str(stories_dir))
        assert chat_window.model_panel.progress.isVisible()
        send(chat_window, "Once upon a time", 8)
    assert [row.role for row in chat_window.chat_model.messages()] == ["user", "assistant"]


def test_an_earlier_chat_reopens_from_history_and_continues(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        send(greedy, "Once upon a time", 8)
    stored_path = greedy.chat_log.path
    greedy.new_chat()
    earlier = next(log for log in greedy.history.chats() if log.path == stored_path)
    greedy.open_chat(earlier)
    assert [row.role for row in greedy.chat_model.messages()] == ["user", "assistant"]
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        send(greedy, "The little dog", 8)
    assert [message.role for message in ChatLog(stored_path).messages] == ["user", "assistant"] * 2


def test_regenerate_leaves_one_chat_in_the_view_the_log_and_the_conversation(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        send(greedy, "Once upon a time", 12)
    greedy.settings.max_tokens.setValue(4)                  # a shorter answer: the new one differs from the old
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000) as again:
        greedy.regenerate_button.click()
    assert wait_for_one_chat(greedy, qtbot) == [("user", "Once upon a time"), ("assistant", again.args[0].reply.text)]


def test_dropping_the_oldest_turn_leaves_one_chat_in_the_view_the_log_and_the_conversation(greedy, qtbot):
    for prompt in ("Once upon a time", "The little dog"):
        with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
            send(greedy, prompt, 6)
    greedy.show_notice("peer-7 (layers 3–4) left the cluster.")
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        greedy.chat.drop_oldest_turn_and_ask("The cat")
    chat = wait_for_one_chat(greedy, qtbot)
    assert [text for role, text in chat if role == "user"] == ["The little dog", "The cat"] and len(chat) == 4
    assert [row.role for row in greedy.chat_model.messages()].count("notice") == 1   # notices stay


def test_restoring_a_stored_chat_leaves_one_chat_and_writes_nothing_to_its_log(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        send(greedy, "Once upon a time", 6)
    stored = greedy.chat_log.path
    written = stored.read_bytes()
    greedy.new_chat()
    greedy.open_chat(ChatLog(stored))
    assert len(wait_for_one_chat(greedy, qtbot)) == 2 and stored.read_bytes() == written
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        send(greedy, "The little dog", 6)
    assert [role for role, _text in wait_for_one_chat(greedy, qtbot)] == ["user", "assistant"] * 2


def test_a_new_chat_leaves_one_empty_chat_and_the_old_one_stored(greedy, qtbot):
    with qtbot.waitSignal(greedy.bridge.replyFinished, timeout=60000):
        send(greedy, "Once upon a time", 6)
    old = greedy.chat_log.path
    written = old.read_bytes()
    greedy.new_chat_button.click()
    assert wait_for_one_chat(greedy, qtbot) == []
    assert greedy.chat_log.path != old and old.read_bytes() == written


def test_without_pyside6_the_app_prints_an_install_hint_and_exits_2(monkeypatch, capsys):
    from cakep2p.gui import run_app

    for module in ("PySide6.QtGui", "PySide6.QtWidgets"):
        monkeypatch.setitem(sys.modules, module, None)   # as if PySide6 were not installed
    assert run_app() == 2
    assert "pip install 'cakep2p[gui]'" in capsys.readouterr().err


def chat_rows(window) -> list[tuple[str, str]]:
    return [(row.role, row.text) for row in window.chat_model.messages() if row.role != "notice"]


@pytest.fixture(scope="module")
def cluster_peers(chat_window, tmp_path_factory, stories_dir):
    """Two `--serve` peers join the window's cluster while stories260K runs on this machine alone; the window offers
    to spread the model over them and the offer is taken (the record says what the chat was before and after).
    Afterwards the peers stop and the model is loaded on this machine alone again, for the tests that follow."""
    names = [f"layerpeer-{letter}-{RUN}" for letter in "ab"]
    base = tmp_path_factory.mktemp("cluster-peers")
    loaded = []
    chat_window.bridge.modelLoaded.connect(loaded.append)
    chat_window.settings.completion_mode.setChecked(True)     # raw: the reference's setting
    chat_window.settings.temperature.setValue(0.0)
    chat_window.new_chat()
    finished = []
    chat_window.bridge.replyFinished.connect(finished.append)
    send(chat_window, "Once upon a time", 6)
    pump_until(lambda: finished, timeout=60, message="a first answer")
    chat_window.bridge.replyFinished.disconnect(finished.append)
    record = SimpleNamespace(chat_before=chat_rows(chat_window))
    nodes = [start_serve(base, name, free_port(), code=CLUSTER_CODE) for name in names]
    offer = chat_window.offer
    try:
        pump_until(lambda: set(names) <= table_names(chat_window), timeout=30, message="the peers in the table")
        pump_until(lambda: offer.isVisible() and offer.button("Spread the model") and all(
            name in offer.label.text() for name in names), timeout=30, message="the offer to spread the model")
        record.question = offer.label.text()
        offer.button("Spread the model").click()
        pump_until(lambda: loaded, timeout=60, message="the model over three nodes")
        record.chat_after = chat_rows(chat_window)
        record.nodes = nodes
        yield record
    finally:
        for node in nodes:
            node.stop(signal.SIGCONT)
            node.stop()
        try:
            pump_until(lambda: not set(names) & table_names(chat_window), timeout=15, message="the peers to go")
            loaded.clear()
            chat_window.load_model(str(stories_dir))
            pump_until(lambda: loaded, timeout=60, message="the model on this machine")
        finally:
            chat_window.bridge.modelLoaded.disconnect(loaded.append)
            for node in nodes:
                node.kill()


@pytest.mark.slow
def test_machines_that_join_are_offered_the_model_and_taking_the_offer_keeps_the_chat(cluster_peers):
    assert cluster_peers.question.startswith("2 machines joined (") and "The chat stays" in cluster_peers.question
    assert cluster_peers.chat_after == cluster_peers.chat_before and len(cluster_peers.chat_before) == 2


@pytest.mark.slow   # --serve processes
def test_a_chat_over_two_serve_peers_spreads_the_layers_and_matches_the_reference(cluster_peers, chat_window,
                                                                                   qtbot, stories_dir):
    reference = reference_greedy(stories_dir)
    plan = chat_window.model_panel.plan_bar.plan
    holders = {segment.name for segment in plan.segments if segment.end > segment.start}
    assert len(holders) == 3, plan
    layers_column = len(chat_window.peers_model.columns) - 1
    peer_rows = [row for row in range(chat_window.peers_model.rowCount())
                 if chat_window.peers_model.index(row, 0).data() in holders]
    assert all(chat_window.peers_model.index(row, layers_column).data() != "—" for row in peer_rows)
    chat_window.new_chat()
    with qtbot.waitSignal(chat_window.bridge.replyFinished, timeout=60000) as finished:
        send(chat_window, reference["prompt"], len(reference["new_token_ids"]))
    assert list(finished.args[0].reply.token_ids) == reference["new_token_ids"]


@pytest.mark.slow   # --serve processes
def test_the_plan_that_loads_is_the_plan_the_preview_showed(cluster_peers, chat_window):
    preview = chat_window.bridge.preview        # made by cluster.plan_model when the model was chosen
    assert preview is not None and chat_window.bridge.model.plan is preview.plan


@pytest.mark.slow   # --serve processes
def test_a_lost_peer_is_shown_lost_at_once_and_the_next_answer_still_comes(cluster_peers, chat_window, qtbot):
    chat_window.new_chat()
    with qtbot.waitSignal(chat_window.bridge.replyFinished, timeout=60000):
        send(chat_window, "Once upon a time", 8)
    lost = next(node for node in cluster_peers.nodes
                if node.name in {segment.name for segment in chat_window.plan.segments if not segment.is_self})
    lost.stop(signal.SIGSTOP)        # frozen: the mesh stops hearing it, its announcement lingers
    with qtbot.waitSignal(chat_window.bridge.replyFinished, timeout=90000) as finished:
        send(chat_window, "The little dog", 8)
    assert finished.args[0].reply.completion_tokens == 8
    notices = [row.text for row in chat_window.chat_model.messages() if row.role == "notice"]
    assert any(lost.name in notice for notice in notices), notices
    assert lost.name not in {segment.name for segment in chat_window.model_panel.plan_bar.plan.segments}
    assert lost.name in table_names(chat_window)                        # still announced…
    assert states(chat_window.peers_model)[lost.name] == "lost"         # …and shown lost now, not in a minute


@pytest.mark.slow
def test_changing_the_pairing_code_moves_this_node_to_the_other_cluster(window, qtbot):
    old_fingerprint = window.bridge.node.fingerprint
    other_code = new_code()
    with qtbot.waitSignal(window.bridge.nodeStarted, timeout=30000) as started:
        window.peers_panel.code_edit.setText(other_code)
        window.peers_panel.join_code_button.setEnabled(True)
        window.peers_panel.join_code_button.click()
    state = started.args[0]
    assert state.code == other_code and state.fingerprint != old_fingerprint
    assert window.peers_panel.code_edit.text() == other_code
