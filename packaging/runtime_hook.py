"""PyInstaller runtime hook: runs in the bundled app before cakep2p; no Qt import here (`--serve` stays Qt-free).

On Linux the bundle carries its hicolor icons under share/icons; putting that share folder on XDG_DATA_DIRS lets
Qt's desktop themes resolve QIcon.fromTheme("cakep2p") before the user installs the .desktop entry.
"""

import os
import sys

if sys.platform.startswith("linux") and hasattr(sys, "_MEIPASS"):
    bundled_share = os.path.join(sys._MEIPASS, "share")
    system_dirs = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    os.environ["XDG_DATA_DIRS"] = f"{bundled_share}:{system_dirs}"
