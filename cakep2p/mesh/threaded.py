"""A StageServer on its own asyncio loop in a background thread (for tests, benchmarks and headless hosts)."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

from cakep2p.mesh.server import StageServer


class ServerThread:
    """A StageServer on its own asyncio loop in a background thread (for tests and headless hosts)."""

    def __init__(self, server: StageServer) -> None:
        self.server = server
        self._loop = asyncio.SelectorEventLoop()  # zmq.asyncio needs a selector loop (Windows too)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cakep2p-stage-{server.name}", daemon=True)

    def start(self) -> int:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.server.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as error:
            self._error = error
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.stop())
        self._loop.close()

    def call(self, function: Callable, *args):
        """Run function(*args) on the server's loop and return its result (for inspection in tests)."""
        async def run():
            return function(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
