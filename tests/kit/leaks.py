"""What a test or the whole session left running: threads it started, child processes of this pytest process."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterable, Iterator

import psutil

from tests.kit.processes import STARTED


# Threads a library starts once and keeps for the life of the process: never a test's leak.
LIFETIME_THREADS = ("GarbageCollectorThread",   # pyzmq's, started by the first zero-copy send
                    "TMonitor",                 # tqdm's, started by the first progress bar (transformers' loaders)
                    "_DummyThread")             # a thread Python did not start (Qt's, torch's) that called into it


def started_by_a_test(thread: threading.Thread) -> bool:
    """Any thread but a library's process-lifetime one: what a single test must have ended when it returns."""
    return type(thread).__name__ not in LIFETIME_THREADS


def left_threads(before: Iterable[threading.Thread], grace: float = 5.0,
                 counts: Callable[[threading.Thread], bool] = started_by_a_test) -> list[threading.Thread]:
    """Threads not in `before` that `counts` and that are still alive after up to `grace` seconds of winding down."""
    before = set(before)

    def leftovers() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate()
                if thread not in before and thread.is_alive() and counts(thread)]

    deadline = time.monotonic() + grace
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    return leftovers()


@contextlib.contextmanager
def threads_ended(counts: Callable[[threading.Thread], bool] = started_by_a_test, grace: float = 5.0
                  ) -> Iterator[None]:
    """Fail if threads started inside the block (those that `counts`) still run `grace` seconds after it."""
    before = set(threading.enumerate())
    yield
    leaked = left_threads(before, grace, counts)
    assert not leaked, f"threads left running: {describe_threads(leaked)}"


def must_end(thread: threading.Thread) -> bool:
    """A thread the session fails on: cakep2p's or the kit's own (by name), or a non-daemon one that would hold up
    the interpreter's exit. Other daemon threads (a library's, a test server's) are reported, not failed on."""
    return not thread.daemon or thread.name.startswith(("cakep2p", "test-", "sniff-"))


class LeftRunningWarning(UserWarning):
    """Daemon threads the suite started and did not end (they die with pytest, but something did not close)."""


def describe_threads(threads: Iterable[threading.Thread]) -> str:
    return ", ".join(f"{thread.name}{'' if thread.daemon else ' (non-daemon)'}" for thread in threads)


def child_processes() -> list[psutil.Process]:
    """Every descendant of this process, zombies included (a child nobody reaped is a leak too)."""
    return psutil.Process().children(recursive=True)


def left_children(before_pids: set[int], grace: float = 5.0) -> list[psutil.Process]:
    """Descendants not there at `before_pids` time that are still there after up to `grace` seconds."""
    def leftovers() -> list[psutil.Process]:
        return [child for child in child_processes() if child.pid not in before_pids]

    deadline = time.monotonic() + grace
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    return leftovers()


def describe_process(child: psutil.Process) -> str:
    """pid, state and command line, and the kit role and test that started it when the kit did."""
    known = next((started for started in STARTED if started.pid == child.pid), None)
    try:
        state, command = child.status(), " ".join(child.cmdline())[:300]
    except psutil.Error:
        state, command = "gone", ""
    origin = f" -- {known.role}, started by {known.test}" if known else ""
    return f"pid {child.pid} ({state}): {command}{origin}"


def end_processes(children: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is left after 5 s; reap our own children."""
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    for started in STARTED:
        if started.pid in {child.pid for child in children}:
            started.process.poll()
