"""The window's model downloads: cakep2p.library.download on a thread of its own, its progress and end as signals.

One download at a time; Cancel stops it within a chunk and keeps what arrived, so the next Download of the same
model continues it. Nothing here touches a widget; the library view shows what the signals say.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from PySide6.QtCore import QObject, Signal

from cakep2p.errors import CakeError

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.1     # progress signals: every tenth of a second, or every 2 % of the bytes
PROGRESS_STEPS = 50


class Downloads(QObject):
    started = Signal(str)                 # repo
    progressed = Signal(str, object, object)   # repo, bytes done, bytes in all (ints beyond 32 bits)
    finished = Signal(str, str)           # repo, the model's path (a folder, or its .gguf file)
    cancelled = Signal(str, str)          # repo, what was kept
    failed = Signal(str, str)             # repo, why (one line)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-download")
        self._cancel = threading.Event()
        self.active: str | None = None     # the repo downloading now (set and cleared on the UI thread's calls)
        self._closed = False

    def start(self, repo: str, patterns: Sequence[str]) -> Future | None:
        """Download `repo`'s files matching `patterns`; None (with `failed`) while another download runs."""
        if self._closed:
            return None
        if self.active is not None:
            self.failed.emit(repo, f"{self.active} is still downloading: wait for it, or cancel it first")
            return None
        self.active = repo
        self._cancel = threading.Event()
        self.started.emit(repo)
        return self._jobs.submit(self._run, repo, tuple(patterns), self._cancel)

    def cancel(self) -> None:
        """Stop the download within a chunk; what arrived stays for the next attempt."""
        self._cancel.set()

    def shutdown(self) -> None:
        """Stop any download and its thread (blocks briefly; called when the window closes)."""
        self._closed = True
        self._cancel.set()
        self._jobs.shutdown(wait=True, cancel_futures=True)

    def _run(self, repo: str, patterns: tuple[str, ...], cancel: threading.Event) -> None:
        from cakep2p.library import download

        last, last_done = 0.0, 0

        def progress(done: int, total: int, _name: str) -> None:
            nonlocal last, last_done
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S or done - last_done >= total // PROGRESS_STEPS or done >= total:
                last, last_done = now, done
                self.progressed.emit(repo, done, total)

        try:
            path = download.download(repo, patterns, on_progress=progress, cancel=cancel)
        except download.Cancelled as stopped:
            self._end()
            self.cancelled.emit(repo, str(stopped))
        except CakeError as error:
            self._end()
            self.failed.emit(repo, str(error))
        except Exception as error:  # the window shows it; it never takes the app down
            log.exception("download of %s failed", repo)
            self._end()
            self.failed.emit(repo, f"download of {repo} failed: {error}")
        else:
            self._end()
            self.finished.emit(repo, str(path))

    def _end(self) -> None:
        self.active = None
