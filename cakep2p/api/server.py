"""Serving the API: a listening socket that fails with the fix named, and uvicorn on a background thread (the
window's switch, tests); `cakep2p api` runs uvicorn in the foreground on the same socket."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

from cakep2p.errors import CakeError


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: any free port); CakeError naming the fix when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise CakeError(f"cannot use --host {host} ({error}); pass an IP address of this machine") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise CakeError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                        "pick another --port, or a --host this machine has") from None
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """Serves an app with uvicorn on a thread (the window's on/off switch, tests); `stop()` always joins it."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> str:
        """Listen and wait until requests are served; returns the base URL (without /v1)."""
        self._sock = listen_socket(self.host, self.port)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="cakep2p-api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise CakeError(f"the API server on {self.host}:{self.port} did not start; see the log above")
            time.sleep(0.01)
        self.url = base_url(self._sock)
        return self.url

    def stop(self, timeout: float = 15.0) -> None:
        """Finish open requests (cut after 5 s), then close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
