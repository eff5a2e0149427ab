"""Screenshots of the real window, as a user meets it: docs/screenshots/*.png and the README's docs/screenshot.png.

Usage: python packaging/screenshot.py [--out docs/screenshots] [--readme docs/screenshot.png] [--gguf DIR]
Run it on a display; on a machine without one, under Xvfb with Qt's xcb platform:
    Xvfb :99 -screen 0 1600x1000x24 & DISPLAY=:99 QT_QPA_PLATFORM=xcb python packaging/screenshot.py
(tests/test_window_xvfb.py does exactly that and checks the facts it prints).

The scenes, in order: the first launch chatting with the embedded demo model; the note on two machines of another
cluster, heard while this machine is unpaired; the model library, downloading; a GGUF chat with its template (when
--gguf is there); pairing with two more machines and the chat spread over three nodes; one of them frozen, shown lost
at once. Every node runs on 127.0.0.1 with its own CAKEP2P_HOME in a temporary folder and the library downloads from
a fake hub on 127.0.0.1: nothing leaves this machine. Prints one line `SCENES {json}` with what each scene saw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct-Q4_1"
STRANGERS = (("neighbours-nas", "2GB"), ("lab-pc", "2GB"))        # another household's cluster
PAIRED = (("studio-desktop", "3GB"), ("old-laptop", "2GB"))       # this user's other machines
WAIT_S = 120.0


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_peers(base: Path, peers: tuple[tuple[str, str], ...], code: str) -> list[subprocess.Popen]:
    from tests.kit import seed_benchmark   # a stored speed figure: no benchmark run at each start

    processes = []
    for name, offer in peers:
        home = base / name
        home.mkdir(parents=True)
        seed_benchmark(home)
        env = {**os.environ, "CAKEP2P_HOME": str(home), "CAKEP2P_CLUSTER_CODE": code, "OMP_NUM_THREADS": "1",
               "QT_QPA_PLATFORM": "offscreen"}
        command = [sys.executable, "-m", "cakep2p", "--serve", "--interface", "127.0.0.1", "--name", name,
                   "--port", str(free_port()), "--max-memory", offer]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
    return processes


def stop_peers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class Scenes:
    """The window and what the scenes saw; every wait runs the Qt event loop."""

    def __init__(self, app, window, out: Path, base: Path):
        self.app, self.window, self.out, self.base = app, window, out, base
        self.facts: dict[str, dict] = {}
        self.peers: list[subprocess.Popen] = []

    def wait(self, condition, what: str, timeout: float = WAIT_S) -> None:
        from PySide6.QtCore import QEventLoop

        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"screenshot: timed out waiting for {what}")
            self.app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)

    def settle(self, seconds: float = 0.6) -> None:
        end = time.monotonic() + seconds
        self.wait(lambda: time.monotonic() > end, "the window to settle")

    def shoot(self, widget, name: str) -> Path:
        """What the screen shows of `widget`'s window (the X server's pixels, not a widget render)."""
        self.settle()
        frame = widget.window().frameGeometry()
        image = widget.window().screen().grabWindow(0, frame.x(), frame.y(), frame.width(), frame.height())
        path = self.out / f"{name}.png"
        if not image.save(str(path)):
            raise SystemExit(f"screenshot: could not write {path}")
        return path

    def ask(self, text: str, max_tokens: int) -> object:
        finished = []
        window = self.window
        window.bridge.replyFinished.connect(finished.append)
        try:
            window.settings.max_tokens.setValue(max_tokens)
            window.input.setPlainText(text)
            window.send()
            self.wait(lambda: finished, f"the answer to {text!r}")
        finally:
            window.bridge.replyFinished.disconnect(finished.append)
        return finished[0].reply

    def loaded(self, name_start: str) -> None:
        self.wait(lambda: self.window.model_info is not None and self.window.model_info.name.startswith(name_start)
                  and not self.window.bridge.generating and self.window._loading_path is None, f"{name_start}")

    # The scenes ------------------------------------------------------------------------------------
    def first_launch(self) -> None:
        window = self.window
        self.loaded("stories260K")
        welcome = window.offer.isVisible() and "tiny demo model" in window.offer.label.text()
        reply = self.ask("Once upon a time, a little fox", 40)
        self.shoot(window, "first-launch")
        self.facts["first_launch"] = {"demo": window.model_info.demo, "welcome": welcome,
                                      "answer_tokens": reply.completion_tokens}

    def other_cluster(self) -> None:
        panel = self.window.peers_panel
        names = {name for name, _offer in STRANGERS}
        self.wait(lambda: names <= {peer.name for peer in self.window.peers_model.peers()}, "the strangers")
        self.wait(lambda: "cakep2p code" in panel.foreign_label.text(), "the other-cluster note")
        table = panel.table.model()
        hidden = not names & {table.index(row, 0).data() for row in range(table.rowCount())}
        note = panel.foreign_label.text()
        panel.show_foreign.click()               # "Show them": the rows, listed and never used
        self.wait(lambda: names <= {table.index(row, 0).data() for row in range(table.rowCount())}, "their rows")
        self.shoot(self.window, "other-cluster-note")
        panel.show_foreign.click()
        self.facts["other_cluster"] = {"note": note, "hidden": hidden}

    def library(self) -> None:
        from tests.fake_hub import fake_hub

        gate = threading.Event()
        weights = {"SmolLM2-135M-Instruct-Q4_K_M.gguf": bytes(9 << 20)}
        with fake_hub({"bartowski/SmolLM2-135M-Instruct-GGUF": weights}) as hub:
            hub.gate, hub.gate_after = gate, 4 << 20
            os.environ["HF_ENDPOINT"] = hub.url
            controller = self.window.library
            dialog = controller.open()
            dialog.move(self.window.x() + 250, self.window.y() + 120)
            self.wait(lambda: len(controller.model.fits) == len(controller.model.rows), "the library's fits")
            dialog.select("smollm2-135m", "gguf")
            progress = []
            controller.downloads.progressed.connect(lambda repo, done, total: progress.append(done))
            dialog.download_button.click()
            self.wait(lambda: any(progress), "the download to start")
            self.shoot(dialog, "model-library")
            cancelled = []
            controller.downloads.cancelled.connect(lambda repo, message: cancelled.append(message))
            dialog.cancel_button.click()
            gate.set()
            self.wait(lambda: cancelled, "the download to stop")
            self.facts["library"] = {"rows": len(controller.model.rows), "downloaded": max(progress),
                                     "stopped": dialog.message.text()}
            dialog.hide()
        os.environ.pop("HF_ENDPOINT", None)

    def gguf(self, folder: Path) -> None:
        window = self.window
        window.new_chat()
        window.use_model(str(folder))
        self.loaded("SmolLM2")
        window.settings.temperature.setValue(0.0)
        window.settings.system_prompt_edit.setPlainText("You are a helpful assistant.")
        answers = [self.ask(question, 64).text for question in (
            "What is the capital of France?", "And of Italy?", "Write a Python function that adds two numbers.")]
        self.shoot(window, "gguf-chat")
        self.facts["gguf"] = {"line": window.model_panel.verdict.text(), "answers": answers}

    def three_nodes(self, code: str) -> None:
        from cakep2p import paths

        window = self.window
        window.new_chat()
        window.settings.system_prompt_edit.setPlainText("")
        window.use_model(str(paths.embedded_model_dir()))
        self.loaded("stories260K")
        window.settings.completion_mode.setChecked(True)      # the story model continues the text as written
        self.peers = start_peers(self.base, PAIRED, code)
        window.peers_panel.code_edit.setText(code)             # pairing, as a user pastes the code
        window.peers_panel.join_code_button.setEnabled(True)
        window.peers_panel.join_code_button.click()
        names = {name for name, _offer in PAIRED}
        self.wait(lambda: window.offer.isVisible() and window.offer.button("Spread the model") is not None
                  and all(name in window.offer.label.text() for name in names), "the offer to spread the model")
        offer = window.offer.label.text()
        self.shoot(window, "spread-offer")
        window.offer.button("Spread the model").click()
        self.wait(lambda: window.plan is not None and len({segment.node_id for segment in window.plan.segments
                                                           if segment.end > segment.start}) == 3, "three holders")
        self.loaded("stories260K")
        window.settings.temperature.setValue(0.0)
        self.ask("Once upon a time", 48)
        self.ask("The little dog", 40)
        self.shoot(window, "three-node-chat")
        self.facts["three_nodes"] = {"offer": offer, "holders": sorted(segment.name for segment in window.plan.segments)}

    def peer_lost(self) -> None:
        window = self.window
        held = {segment.name for segment in window.plan.segments if not segment.is_self and segment.end > segment.start}
        victim_name = sorted(held)[0]
        victim = self.peers[[name for name, _offer in PAIRED].index(victim_name)]
        victim.send_signal(signal.SIGSTOP)                     # frozen: the mesh stops hearing it
        reply = self.ask("The cat", 24)
        state = {window.peers_model.index(row, 0).data(): window.peers_model.index(row, 4).data()
                 for row in range(window.peers_model.rowCount())}
        self.shoot(window, "peer-lost")
        notices = [row.text for row in window.chat_model.messages() if row.role == "notice"]
        self.facts["peer_lost"] = {"lost": victim_name, "state": state.get(victim_name), "notices": notices,
                                   "answer_tokens": reply.completion_tokens}


def render(out: Path, readme: Path | None, gguf: Path | None, base: Path) -> dict:
    from PySide6.QtWidgets import QApplication

    from tests.kit import seed_benchmark

    os.environ["CAKEP2P_HOME"] = str(base / "window")
    seed_benchmark(base / "window")
    app = QApplication.instance() or QApplication([])
    from cakep2p.gui import broken_qt_binding
    from cakep2p.gui.window import MainWindow
    from cakep2p.security import new_code

    if broken_qt_binding():
        raise SystemExit(f"screenshot: {broken_qt_binding()}")
    app.setApplicationName("cakep2p")
    strangers = start_peers(base, STRANGERS, new_code())
    window = MainWindow({"name": "my-laptop", "port": free_port(), "interfaces": ["127.0.0.1"],
                         "max_memory": 1 << 30})
    scenes = Scenes(app, window, out, base)
    window.resize(1500, 900)
    window.move(0, 0)
    window.show()
    try:
        scenes.first_launch()
        scenes.other_cluster()
        scenes.library()
        if gguf is not None and gguf.is_dir():
            scenes.gguf(gguf)
        scenes.three_nodes(new_code())
        if readme is not None:
            readme.write_bytes((out / "three-node-chat.png").read_bytes())
        scenes.peer_lost()
        return scenes.facts
    finally:
        window.close()
        stop_peers(strangers + scenes.peers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--readme", type=Path, default=None, help="also save the 3-node chat here")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], capture_output=True)
    os.environ["CAKEP2P_INTERFACE"] = "127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="cakep2p-screenshot-") as temporary:
        facts = render(args.out, args.readme, args.gguf, Path(temporary))
    print("SCENES " + json.dumps(facts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
