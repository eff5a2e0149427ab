"""Render the window offscreen with 3 loopback peers and a short chat into docs/screenshot.png (for the README).

Usage: python packaging/screenshot.py [--model DIR] [--out docs/screenshot.png]
Needs PySide6, the stories260K test model (or --model) and multicast on lo (`ip link set lo multicast on`).
Every node runs on 127.0.0.1 with its own CAKEP2P_HOME under a temporary folder; all are stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "stories260K"
CLUSTER_CODE = "amber-falcon-river-tulip-maple-orbit-048213"
PEERS = (("studio-desktop", "6GB"), ("old-laptop", "3GB"), ("mini-pc", "2GB"))
PROMPTS = ("Once upon a time", "The little dog")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_peers(base: Path) -> list[subprocess.Popen]:
    processes = []
    for name, offer in PEERS:
        home = base / name
        home.mkdir(parents=True)
        env = {**os.environ, "CAKEP2P_HOME": str(home), "CAKEP2P_CLUSTER_CODE": CLUSTER_CODE, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "cakep2p", "--serve", "--interface", "127.0.0.1", "--name", name,
                   "--port", str(free_port()), "--max-memory", offer]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
    return processes


def stop_peers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def pump_until(app, condition, timeout: float, what: str) -> None:
    from PySide6.QtCore import QEventLoop

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshot: timed out waiting for {what}")
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)


def render(model_dir: Path, out: Path, base: Path) -> None:
    from PySide6.QtWidgets import QApplication

    os.environ["CAKEP2P_HOME"] = str(base / "window")
    app = QApplication.instance() or QApplication([])
    from cakep2p.gui import broken_qt_binding
    from cakep2p.gui.history import ChatHistory
    from cakep2p.gui.recent import RecentModels
    from cakep2p.gui.window import MainWindow

    if broken_qt_binding():
        raise SystemExit(f"screenshot: {broken_qt_binding()}")
    app.setApplicationName("cakep2p")
    window = MainWindow({"name": "my-laptop", "port": free_port(), "interfaces": ["127.0.0.1"],
                         "cluster_code": CLUSTER_CODE, "max_memory": 4 * 1024**3},
                        history=ChatHistory(base / "chats"), recent=RecentModels(base / "recent.json"))
    window.resize(1480, 820)
    window.peers_panel.show_foreign.setChecked(False)   # other projects' test nodes may share the loopback
    window.centralWidget().setSizes([760, 720])
    window.show()
    previews = []
    window.bridge.modelInspected.connect(previews.append)
    try:
        pump_until(app, lambda: window.bridge.node is not None, 60, "the window's node")
        names = {name for name, _offer in PEERS}
        pump_until(app, lambda: names <= {peer.name for peer in window.peers_model.peers()}, 60, "3 peers")
        window.model_panel.set_folder(str(model_dir))
        window.load_model(str(model_dir))
        pump_until(app, lambda: window.model_info is not None and previews, 120, "the model")
        window.settings.temperature.setValue(0.0)
        window.settings.max_tokens.setValue(72)
        for prompt in PROMPTS:
            finished = []
            window.bridge.replyFinished.connect(finished.append)
            window.input.setPlainText(prompt)
            window.send()
            pump_until(app, lambda: finished, 120, "an answer")
            window.bridge.replyFinished.disconnect(finished.append)
        plan = window.plan
        if plan is not None and len(plan.segments) == 1 and previews[-1].plan is not None:
            # The model runs on this machine only until the mesh is wired: show the cluster's plan instead.
            window.show_plan(previews[-1].plan)
        window.input.setPlainText("Tell me about a brave little fox")
        pump_until(app, lambda: True, 1, "layout")
        for _ in range(10):
            app.processEvents()
        out.parent.mkdir(parents=True, exist_ok=True)
        if not window.grab().save(str(out)):
            raise SystemExit(f"screenshot: could not write {out}")
        print(f"wrote {out}")
    finally:
        window.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("CAKEP2P_TEST_MODEL", DEFAULT_MODEL)))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    args = parser.parse_args()
    subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], capture_output=True)
    with tempfile.TemporaryDirectory(prefix="cakep2p-screenshot-") as temporary:
        base = Path(temporary)
        processes = start_peers(base)
        try:
            render(args.model, args.out, base)
        finally:
            stop_peers(processes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
