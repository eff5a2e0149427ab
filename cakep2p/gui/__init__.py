"""The desktop window (PySide6): `cakep2p` with no arguments runs `run_app`; the core lives in cakep2p.node."""

from __future__ import annotations

import argparse
import logging
import sys

INSTALL_HINT = "cakep2p: the window needs PySide6: pip install 'cakep2p[gui]' (or run a headless node: cakep2p --serve)"


def broken_qt_binding() -> str | None:
    """Why the installed PySide6 cannot run the window on this Python, or None when it can."""
    import PySide6

    if PySide6.__version__ == "6.12.0" and sys.version_info < (3, 12):
        return ("PySide6 6.12.0 has a reference-counting bug in Signal.emit that aborts Python < 3.12 after a "
                "few hundred signals; install another version: pip install 'PySide6-Essentials>=6.6,!=6.12.0'")
    return None


def setup_logging(verbose: bool) -> None:
    """Log to stderr as the CLI does, with pairing codes and secret keys redacted from every record."""
    from cakep2p.redaction import RedactingFilter, install_log_redaction

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(item, RedactingFilter) for item in handler.filters):
            install_log_redaction(handler)


def run_app(args: argparse.Namespace | None = None) -> int:
    """Open the window with a Node of this machine; returns the process exit code."""
    try:
        from PySide6.QtGui import QGuiApplication, QIcon
        from PySide6.QtWidgets import QApplication
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    broken = broken_qt_binding()
    if broken:
        print(f"cakep2p: error: {broken}", file=sys.stderr)
        return 2
    from cakep2p import __version__
    from cakep2p.gui.window import MainWindow

    setup_logging(bool(getattr(args, "verbose", False)))
    QGuiApplication.setDesktopFileName("cakep2p")
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("cakep2p")
    app.setApplicationVersion(__version__)
    app.setOrganizationName("cakep2p")
    if QIcon.hasThemeIcon("cakep2p"):
        app.setWindowIcon(QIcon.fromTheme("cakep2p"))
    window = MainWindow({})  # the window's node takes its settings from the window, not the command line
    window.show()
    try:
        return app.exec()
    finally:
        window.close()  # stops the node (goodbye packets) even when the loop ended some other way
