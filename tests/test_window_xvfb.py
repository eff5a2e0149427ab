"""The real window on a real X server: packaging/screenshot.py under Xvfb with Qt's xcb platform (not offscreen)
walks a new user's first hour and saves what the screen showed; this test checks what each scene saw and that each
screenshot is a real picture. Set CAKEP2P_SCREENSHOTS=DIR to keep the pictures (docs/screenshots/ in the repo).

Needs Debian's `xvfb` and the xcb libraries Qt's X11 plugin loads (the README's list; the test skips naming them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kit import REPO, ChildProcess, child_env

pytestmark = pytest.mark.slow
SHOTS = ("first-launch", "other-cluster-note", "model-library", "spread-offer", "three-node-chat", "peer-lost")
GGUF_DIR = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct-Q4_1"
SCREEN = "1600x1000x24"


def xvfb_or_skip() -> str:
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed: apt-get install xvfb (and the window's xcb libraries, see the README)")
    pytest.importorskip("PySide6", reason="the window needs PySide6: pip install 'cakep2p[gui]'")
    from cakep2p.commands import display

    plugin = display.xcb_plugin()
    if plugin is None:
        pytest.skip("this PySide6 has no xcb platform plugin (libqxcb.so)")
    missing = display.missing_libraries(plugin)
    if missing:
        pytest.skip(display.missing_libraries_message(missing))
    return xvfb


def free_display() -> int:
    number = 90 + os.getpid() % 100
    while Path(f"/tmp/.X11-unix/X{number}").exists() or Path(f"/tmp/.X{number}-lock").exists():
        number += 1
    return number


@pytest.fixture
def x_server():
    """An Xvfb of its own on a free display (no TCP), ended afterwards."""
    xvfb, number = xvfb_or_skip(), free_display()
    server = ChildProcess([xvfb, f":{number}", "-screen", "0", SCREEN, "-nolisten", "tcp", "-noreset"],
                          env=dict(os.environ), role=f"Xvfb :{number}", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            if not server.alive() or time.monotonic() > deadline:
                pytest.fail(f"Xvfb :{number} did not start")
            time.sleep(0.05)
        yield f":{number}"
    finally:
        server.kill()


def is_a_picture(path: Path) -> bool:
    """A PNG of a window's size whose pixels are not all alike (a blank or black grab is no screenshot)."""
    from PySide6.QtGui import QImage

    image = QImage(str(path))
    if image.isNull() or image.width() < 600 or image.height() < 400:
        return False
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 5)}
    return len(colours) > 30


def test_the_real_window_walks_the_first_hour_under_xvfb(x_server, tmp_path):
    out = Path(os.environ.get("CAKEP2P_SCREENSHOTS") or tmp_path / "screenshots")
    env = child_env(tmp_path / "home", DISPLAY=x_server, QT_QPA_PLATFORM="xcb")
    env.pop("WAYLAND_DISPLAY", None)
    command = [sys.executable, str(REPO / "packaging" / "screenshot.py"), "--out", str(out), "--gguf", str(GGUF_DIR)]
    if os.environ.get("CAKEP2P_SCREENSHOTS"):
        command += ["--readme", str(REPO / "docs" / "screenshot.png")]
    run = ChildProcess(command, env=env, role="packaging/screenshot.py under Xvfb", stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = run.process.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)       # the script and the nodes it started
        output, _ = run.process.communicate()
        pytest.fail(f"the screenshot run did not end within 9 minutes:\n{output[-4000:]}")
    finally:
        run.kill()
    assert run.process.returncode == 0, output[-4000:]
    facts = json.loads(next(line for line in output.splitlines() if line.startswith("SCENES "))[len("SCENES "):])

    assert facts["first_launch"] == {**facts["first_launch"], "demo": True, "welcome": True}
    assert facts["first_launch"]["answer_tokens"] > 0
    assert facts["other_cluster"]["hidden"] and "2 machines of other clusters" in facts["other_cluster"]["note"]
    assert "cakep2p code" in facts["other_cluster"]["note"]
    assert facts["library"]["rows"] >= 16 and facts["library"]["downloaded"] > 0
    assert "kept to continue" in facts["library"]["stopped"]
    assert facts["three_nodes"]["offer"].startswith("2 machines joined (")
    assert len(facts["three_nodes"]["holders"]) == 3
    assert facts["peer_lost"]["state"] == "lost" and facts["peer_lost"]["answer_tokens"] > 0
    assert any(facts["peer_lost"]["lost"] in notice for notice in facts["peer_lost"]["notices"])
    shots = list(SHOTS)
    if GGUF_DIR.is_dir():
        assert "GGUF Q4_1, 93.8 MiB" in facts["gguf"]["line"] and "chat template" in facts["gguf"]["line"]
        assert "Paris" in facts["gguf"]["answers"][0] and "Rome" in facts["gguf"]["answers"][1]
        shots.append("gguf-chat")
    assert [name for name in shots if not is_a_picture(out / f"{name}.png")] == []
