"""The one wait: poll a condition until it holds, fail the test at the deadline; `pump_until` runs Qt meanwhile."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 15.0, *, interval: float = 0.02,
               message: str | Callable[[], str] = "the condition", idle: Callable[[float], object] = time.sleep) -> T:
    """Poll `condition` until it returns something truthy and return that; fail the test at the deadline.

    `message` names what was awaited (a callable is asked at the deadline, so it can show the state then);
    `idle(seconds)` is what runs between polls: a sleep, or an event loop (see pump_until).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        idle(interval)


def pump_until(condition: Callable[[], T], timeout: float = 20.0, *, message: str | Callable[[], str] = "the condition"
               ) -> T:
    """wait_until that runs the Qt event loop between polls (for module fixtures, where qtbot is absent)."""
    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance()

    def process_events(seconds: float) -> None:
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(seconds)   # processEvents returns at once when nothing is pending: do not spin a core

    return wait_until(condition, timeout, interval=0.01, message=message, idle=process_events)
