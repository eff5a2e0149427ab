"""The window starts or explains: no display, missing X11 libraries or an X server that does not answer are one line
and exit 2, decided before Qt loads; and every install path (README, .ci/run, packaging) installs the libraries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cakep2p.commands import display
from tests.kit import REPO, child_env

LDD_MISSING_TWO = """\
\tlinux-vdso.so.1 (0x00007ffd8a1f2000)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f2a1c000000)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibxcb.so.1 => /lib/x86_64-linux-gnu/libxcb.so.1 (0x00007f2a1b000000)
\tlibxcb-icccm.so.4 => not found
"""


def cakep2p_script() -> list[str]:
    """The `cakep2p` the install put next to this interpreter (what a user types), else `python -m cakep2p`."""
    script = Path(sys.executable).with_name("cakep2p")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cakep2p"]


def window_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell for the window: no offscreen platform, no display unless `extra` sets one."""
    env = child_env(tmp_path / "home", **extra)
    for name in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY", "XDG_SESSION_TYPE", *(() if "DISPLAY" in extra else ("DISPLAY",))):
        env.pop(name, None)
    return env


def free_display_number() -> int:
    """An X display number with no server: no socket in /tmp/.X11-unix and no lock file."""
    return next(number for number in range(87, 200) if not Path(f"/tmp/.X11-unix/X{number}").exists()
                and not Path(f"/tmp/.X{number}-lock").exists())


# -- the command a user types ------------------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="macOS and Windows always have a display plugin")
def test_no_display_is_one_line_naming_serve_and_exit_2(tmp_path):
    result = subprocess.run(cakep2p_script(), env=window_env(tmp_path), capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cakep2p: error: no display")
    assert "`cakep2p --serve`" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="macOS and Windows always have a display plugin")
def test_a_display_nobody_answers_is_one_line_and_exit_2(tmp_path):
    display_name = f":{free_display_number()}"
    result = subprocess.run(cakep2p_script(), env=window_env(tmp_path, DISPLAY=display_name), capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cakep2p: error: ")
    # either the X11 libraries are missing here (named with their apt packages) or the display does not answer
    assert "sudo apt install" in result.stderr or f"cannot open the X display '{display_name}'" in result.stderr
    assert "--serve" in result.stderr


def test_the_check_loads_no_qt():
    code = ("import sys; from cakep2p.commands.display import window_problem; window_problem({}, 'linux'); "
            "print(sorted(name for name in sys.modules if name.startswith(('PySide6.Qt', 'cakep2p.gui'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- the decision --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ, platform", [
    ({"QT_QPA_PLATFORM": "offscreen"}, "linux"),             # the user chose a plugin that needs no desktop
    ({"QT_QPA_PLATFORM": "vnc:size=800x600"}, "linux"),
    ({}, "darwin"), ({}, "win32"),                          # their own platform plugins, always there
    ({"WAYLAND_DISPLAY": "wayland-0"}, "linux"),             # Wayland: the X11 libraries do not matter
    ({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0", "XDG_SESSION_TYPE": "wayland"}, "linux"),
])
def test_no_problem_where_qt_needs_no_x11_display(environ, platform):
    assert display.window_problem(environ, platform) is None


def test_no_display_names_both_variables_and_the_headless_node():
    problem = display.window_problem({}, "linux")
    assert problem.startswith("no display") and "DISPLAY" in problem and "WAYLAND_DISPLAY" in problem
    assert "`cakep2p --serve`" in problem


def test_missing_libraries_are_what_ldd_reports_not_found_once_each():
    missing = display.missing_libraries(Path("libqxcb.so"), run_ldd=lambda plugin: LDD_MISSING_TWO,
                                        loads=lambda library: True)
    assert missing == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]


def test_the_cursor_library_qt_opens_at_run_time_is_checked_too():
    missing = display.missing_libraries(Path("libqxcb.so"), run_ldd=lambda plugin: "",
                                        loads=lambda library: library != "libxcb-cursor.so.0")
    assert missing == ["libxcb-cursor.so.0"]


def test_without_ldd_the_known_libraries_are_loaded_one_by_one():
    missing = display.missing_libraries(Path("libqxcb.so"), run_ldd=lambda plugin: None,
                                        loads=lambda library: library not in ("libxcb-xkb.so.1", "libxcb-cursor.so.0"))
    assert sorted(missing) == ["libxcb-cursor.so.0", "libxcb-xkb.so.1"]


def test_missing_libraries_become_one_apt_command():
    message = display.missing_libraries_message(["libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxkbcommon-x11.so.0"])
    assert "\n" not in message
    assert "`sudo apt install libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0`" in message
    assert "libxcb-icccm.so.4" in message and "`cakep2p --serve`" in message


def test_an_unlisted_library_gets_debians_package_name():
    assert "sudo apt install libxcb-foo0 libbar2-1`" in display.missing_libraries_message(
        ["libxcb-foo.so.0", "libbar2.so.1"])


def test_every_listed_package_is_one_of_the_window_packages_or_a_dependency_of_them():
    # the table maps what ldd can report; the install list is what a minimal desktop lacks
    assert set(display.WINDOW_PACKAGES) <= set(display.PACKAGE_OF_LIBRARY.values())
    assert display.PACKAGE_OF_LIBRARY["libxcb-cursor.so.0"] in display.WINDOW_PACKAGES


def test_this_machine_finds_the_xcb_plugin_of_its_pyside6():
    pytest.importorskip("PySide6")
    plugin = display.xcb_plugin()
    if sys.platform.startswith("linux"):
        assert plugin is not None and plugin.name == "libqxcb.so" and plugin.parent.name == "platforms"


# -- every install path installs the window's packages ----------------------------------------------------------

def apt_packages(text: str) -> set[str]:
    """Every package named on an `apt install` / `apt-get install` command line in `text` (continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    packages = set()
    for line in re.findall(r"apt(?:-get)? install ([^\n]*)", joined):
        packages |= {word for word in line.split() if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", word)}
    return packages


@pytest.mark.parametrize("path", ["README.md", ".ci/run", "packaging/README.md"])
def test_the_install_instructions_name_every_window_package(path):
    assert set(display.WINDOW_PACKAGES) <= apt_packages((REPO / path).read_text(encoding="utf-8"))


def test_the_install_script_checks_the_same_packages():
    script = (REPO / "packaging" / "linux" / "install.sh").read_text(encoding="utf-8")
    listed = re.search(r'^window_packages="([^"]*)"', script, re.MULTILINE)
    assert listed and listed.group(1).split() == list(display.WINDOW_PACKAGES)


def fake_tools(tmp_path: Path, ldd_output: str, cursor_installed: bool) -> Path:
    """A folder of stand-in `ldd` and `ldconfig` to put first on PATH."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "ldd").write_text(f"#!/bin/sh\ncat <<'EOF'\n{ldd_output}EOF\n")
    listing = "\tlibxcb-cursor.so.0 (libc6,x86-64) => /lib/libxcb-cursor.so.0\n" if cursor_installed else ""
    (tools / "ldconfig").write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\n")
    for tool in tools.iterdir():
        tool.chmod(0o755)
    return tools


def run_install_with(tmp_path: Path, tools: Path) -> subprocess.CompletedProcess:
    bundle = tmp_path / "app" / "cakep2p"
    (bundle / "_internal" / "PySide6" / "Qt" / "plugins" / "platforms").mkdir(parents=True)
    (bundle / "_internal" / "PySide6" / "Qt" / "plugins" / "platforms" / "libqxcb.so").write_bytes(b"\x7fELF")
    (bundle / "cakep2p").write_text("#!/bin/sh\necho cakep2p fake\n")
    (bundle / "cakep2p").chmod(0o755)
    env = dict(os.environ, PREFIX=str(tmp_path / "prefix"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               HOME=str(tmp_path), PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["sh", str(REPO / "packaging" / "linux" / "install.sh"), "--bundle", str(bundle)], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(sys.platform != "linux", reason="install.sh is the Linux installer")
def test_install_script_names_the_apt_packages_when_the_window_lacks_libraries(tmp_path):
    result = run_install_with(tmp_path, fake_tools(tmp_path, LDD_MISSING_TWO, cursor_installed=False))
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "the window needs" in line)
    assert "libxcb-icccm.so.4 libxcb-keysyms.so.1 libxcb-cursor.so.0" in warning
    assert f"sudo apt install {' '.join(display.WINDOW_PACKAGES)}" in warning


@pytest.mark.skipif(sys.platform != "linux", reason="install.sh is the Linux installer")
def test_install_script_is_quiet_about_libraries_when_none_is_missing(tmp_path):
    result = run_install_with(tmp_path, fake_tools(tmp_path, "\tlibxcb.so.1 => /lib/libxcb.so.1 (0x1)\n", True))
    assert result.returncode == 0, result.stderr
    assert "the window needs" not in result.stderr


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="macOS and Windows always have a display plugin")
def test_doctor_says_whether_the_window_can_start(monkeypatch):
    from cakep2p.commands import doctor

    pytest.importorskip("PySide6")

    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    assert doctor.window_line().startswith("window: no display")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert doctor.window_line() == "window: can start here"
