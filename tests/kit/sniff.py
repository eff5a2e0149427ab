"""A raw TCP proxy on 127.0.0.1 that records every byte both ways: tests point a client at it to check encryption."""

import socket
import threading
from collections.abc import Iterable

CHUNK = 65536


class SniffingProxy:
    """Listens on 127.0.0.1:<free port>, forwards each connection to target_port, keeps a copy of all bytes.

    Use as a context manager:  with SniffingProxy(server_port) as proxy: client.connect(proxy.endpoint) ...
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._to_server = bytearray()
        self._to_client = bytearray()
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="sniff-accept", daemon=True)
        self._accept_thread.start()

    def __enter__(self) -> "SniffingProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def to_server(self) -> bytes:
        """Everything clients sent through the proxy so far."""
        with self._lock:
            return bytes(self._to_server)

    @property
    def to_client(self) -> bytes:
        """Everything the server sent back through the proxy so far."""
        with self._lock:
            return bytes(self._to_client)

    def leaks(self, needles: Iterable[bytes]) -> list[str]:
        """Which needles appear in the capture, as 'to_server: b...' lines (empty when none leaked)."""
        found = []
        for direction, captured in (("to_server", self.to_server), ("to_client", self.to_client)):
            found += [f"{direction}: {needle!r}" for needle in needles if needle in captured]
        return found

    def stop(self) -> None:
        """Close the listener and every proxied connection, and join all proxy threads."""
        self._stopping.set()
        self._accept_thread.join()
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join()
        for connection in connections:
            connection.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            pumps = [threading.Thread(target=self._pump, args=(source, destination, capture), name="sniff-pump",
                                      daemon=True)
                     for source, destination, capture in ((client, server, self._to_server),
                                                          (server, client, self._to_client))]
            with self._lock:
                self._connections += [client, server]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, source: socket.socket, destination: socket.socket, capture: bytearray) -> None:
        while True:
            try:
                data = source.recv(CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            with self._lock:
                capture += data
            try:
                destination.sendall(data)
            except OSError:
                break
        for end in (source, destination):   # one side closed: close both directions so the peer notices
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
