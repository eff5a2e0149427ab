"""Can the window start here? Checked before Qt loads, so a missing display or missing X11 libraries is one line
naming the fix (the apt packages, or `cakep2p --serve`) instead of Qt's abort.

Only Linux and the other X11 systems are checked: macOS and Windows always have their own platform plugin.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Mapping

DISPLAY_TIMEOUT_S = 5.0
HEADLESS_HINT = "run `cakep2p --serve` for a headless node (or `cakep2p --help` for the commands)"

# The Debian/Ubuntu package of each shared library Qt's xcb platform plugin (libqxcb.so) needs beyond glibc.
PACKAGE_OF_LIBRARY = {
    "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1", "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0", "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0", "libxkbcommon.so.0": "libxkbcommon0",
    "libxcb-shape.so.0": "libxcb-shape0", "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-xfixes.so.0": "libxcb-xfixes0", "libxcb-sync.so.1": "libxcb-sync1", "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-render.so.0": "libxcb-render0", "libxcb-util.so.1": "libxcb-util1", "libxcb-xinput.so.0": "libxcb-xinput0",
    "libxcb-glx.so.0": "libxcb-glx0", "libxcb.so.1": "libxcb1", "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6", "libSM.so.6": "libsm6", "libICE.so.6": "libice6",
    "libfontconfig.so.1": "libfontconfig1", "libfreetype.so.6": "libfreetype6", "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1", "libOpenGL.so.0": "libopengl0", "libGLX.so.0": "libglx0",
    "libdbus-1.so.3": "libdbus-1-3", "libglib-2.0.so.0": "libglib2.0-0",
}
# What the window needs on a minimal Debian/Ubuntu desktop: the README, .ci/run and packaging/ install this list.
WINDOW_PACKAGES = ("libegl1", "libgl1", "libopengl0", "libglx0", "libfontconfig1", "libglib2.0-0", "libdbus-1-3",
                   "libxkbcommon0", "libxkbcommon-x11-0", "libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1",
                   "libxcb-image0", "libxcb-render-util0", "libxcb-xkb1", "libxcb-shape0", "libxcb-randr0",
                   "libx11-xcb1")
# Qt opens this one with dlopen at start (ldd cannot see it): "xcb-cursor0 or libxcb-cursor0 is needed".
LOADED_AT_RUNTIME = ("libxcb-cursor.so.0",)
NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)


def window_problem(environ: Mapping[str, str] | None = None, platform: str = sys.platform) -> str | None:
    """Why the window cannot start on this machine, as one line naming the fix; None when it can (or when only
    Qt can tell: an unusual platform plugin, a PySide6 this check cannot find)."""
    environ = os.environ if environ is None else environ
    if platform == "darwin" or platform.startswith(("win", "cygwin")):
        return None
    chosen = environ.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip().lower()
    if chosen and chosen not in ("xcb", "wayland"):
        return None           # offscreen, vnc, eglfs...: the user picked a plugin that needs no desktop
    if not environ.get("DISPLAY") and not environ.get("WAYLAND_DISPLAY"):
        return ("no display: the window needs a desktop session (DISPLAY and WAYLAND_DISPLAY are unset); "
                f"{HEADLESS_HINT}")
    wayland_session = environ.get("XDG_SESSION_TYPE") == "wayland" and environ.get("WAYLAND_DISPLAY")
    if chosen == "wayland" or (not chosen and (wayland_session or not environ.get("DISPLAY"))):
        return None           # Qt runs on Wayland: the xcb libraries do not matter
    plugin = xcb_plugin()
    if plugin is None:
        return None
    missing = missing_libraries(plugin)
    if missing:
        return missing_libraries_message(missing)
    return display_unreachable(environ.get("DISPLAY", ""))


def xcb_plugin() -> Path | None:
    """PySide6's xcb platform plugin (platforms/libqxcb.so), found without importing Qt; None when absent."""
    roots = []
    spec = importlib.util.find_spec("PySide6")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(location) for location in spec.submodule_search_locations]
    bundle = getattr(sys, "_MEIPASS", None)   # the PyInstaller app
    if bundle:
        roots.append(Path(bundle) / "PySide6")
    for root in roots:
        for plugins in (root / "Qt" / "plugins", root / "plugins"):
            if (plugins / "platforms" / "libqxcb.so").is_file():
                return plugins / "platforms" / "libqxcb.so"
    return None


def missing_libraries(plugin: Path, run_ldd: Callable[[Path], str | None] | None = None,
                      loads: Callable[[str], bool] | None = None) -> list[str]:
    """Shared libraries `plugin` needs that this system lacks: what ldd reports "not found" (or, without ldd, the
    known xcb libraries that cannot be loaded), plus the ones Qt loads at run time."""
    run_ldd, loads = run_ldd or _ldd, loads or _loads
    report = run_ldd(plugin)
    if report is not None:
        missing = list(dict.fromkeys(NOT_FOUND.findall(report)))
    else:
        missing = [library for library in PACKAGE_OF_LIBRARY if not loads(library)]
    missing += [library for library in LOADED_AT_RUNTIME if library not in missing and not loads(library)]
    return missing


def missing_libraries_message(missing: list[str]) -> str:
    """One line: the missing libraries and the apt command that installs them."""
    packages = list(dict.fromkeys(PACKAGE_OF_LIBRARY.get(library, _guess_package(library)) for library in missing))
    return (f"the window cannot start: Qt's X11 plugin needs {', '.join(missing)}; install them with "
            f"`sudo apt install {' '.join(packages)}` (other systems: the packages holding those files), "
            f"or {HEADLESS_HINT}")


def display_unreachable(display: str) -> str | None:
    """One line when no X server answers at `display` (checked with libxcb itself, as Qt would connect); None when
    one does, or when that cannot be checked here."""
    try:
        xcb = ctypes.CDLL("libxcb.so.1")
    except OSError:
        return None
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    outcome: list[bool] = []

    def connect() -> None:   # in a thread: a DISPLAY on a host that is down would block for minutes
        connection = xcb.xcb_connect(display.encode(), None)
        outcome.append(bool(connection) and xcb.xcb_connection_has_error(connection) == 0)
        if connection:
            xcb.xcb_disconnect(connection)

    attempt = threading.Thread(target=connect, name="cakep2p-display-check", daemon=True)
    attempt.start()
    attempt.join(DISPLAY_TIMEOUT_S)
    if not outcome or outcome[0]:
        return None          # it answered, or it is still trying: Qt will say more than a guess here
    return (f"no display: cannot open the X display {display!r} (no X server answers there, or it refused this "
            f"user); check DISPLAY, or {HEADLESS_HINT}")


def _ldd(plugin: Path) -> str | None:
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    try:
        return subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _guess_package(library: str) -> str:
    """Debian's name for an unlisted library: libfoo-bar.so.1 is in libfoo-bar1 (libfoo2.so.0: libfoo2-0)."""
    stem, _, version = library.partition(".so.")
    stem = stem.lower()
    return f"{stem}-{version}" if stem[-1:].isdigit() else f"{stem}{version}"
