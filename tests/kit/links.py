"""DelayLink: a loopback TCP proxy in its own process that delivers every chunk `delay_s` after reading it (a user-space
stand-in for `tc netem delay`, which this kernel lacks), optionally at a bandwidth cap; protocol-agnostic.

    with DelayLink("127.0.0.1", stage_port, 0.002) as link: ... connect to 127.0.0.1:link.port ...
    python tests/kit/links.py --target-port N --delay-ms 2 [--rate-bytes-s R]   # prints {"port": N} once listening

The proxy is a child process (so the caller's torch compute cannot hold up a delivery) that ends when its stdin
closes: on stop(), or when its parent dies. Standard library only: it starts without importing the test kit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 65536
IN_FLIGHT_CHUNKS = 1024        # per direction: backpressure beyond 64 MiB read but not yet delivered
PRECISE_LAST_S = 0.001         # epoll waits in whole milliseconds: the last one is slept precisely, blocking
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class DelayLink:
    """A proxy process listening on listen_host:<free port>; each connection is forwarded to the target, every chunk
    `delay_s` later, both ways, in order. `rate_bytes_s` caps each direction's bandwidth (None: no cap)."""

    def __init__(self, target_host: str, target_port: int, delay_s: float, listen_host: str = "127.0.0.1",
                 rate_bytes_s: float | None = None) -> None:
        for host in (target_host, listen_host):
            if host not in LOOPBACK_HOSTS and not host.startswith("127."):
                raise ValueError(f"DelayLink is for loopback only, not {host}")
        self.target_host, self.target_port, self.listen_host = target_host, target_port, listen_host
        self.delay_s, self.rate_bytes_s = delay_s, rate_bytes_s
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> "DelayLink":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "DelayLink":
        """Start the proxy process and wait until it listens (its port is then `port`)."""
        command = [sys.executable, str(Path(__file__).resolve()), "--target-host", self.target_host,
                   "--target-port", str(self.target_port), "--listen-host", self.listen_host,
                   "--delay-ms", repr(self.delay_s * 1000)]
        if self.rate_bytes_s:
            command += ["--rate-bytes-s", repr(float(self.rate_bytes_s))]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        try:
            self.port = json.loads(line)["port"]
        except (ValueError, KeyError):
            self.stop()
            raise RuntimeError(f"the delay link to port {self.target_port} did not start: {line!r}") from None
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the proxy and every connection through it (closing its stdin; SIGKILL if it lingers); reap it."""
        if self.process is None:
            return
        self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# -- the proxy process ------------------------------------------------------------------------------------------


class Direction:
    """One way of one connection: read chunks as they come, deliver each at its deadline, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                 rate_bytes_s: float | None) -> None:
        self.reader, self.writer = reader, writer
        self.delay_s, self.rate_bytes_s = delay_s, rate_bytes_s
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(IN_FLIGHT_CHUNKS)
        self._line_free_at = 0.0   # with a rate: when the last chunk read has finished crossing the link

    async def read(self) -> None:
        """Queue every chunk with its delivery time; an empty chunk is the end (EOF or error), delayed too."""
        loop = asyncio.get_running_loop()
        try:
            while data := await self.reader.read(CHUNK):
                await self.queue.put((self._deadline(loop.time(), len(data)), data))
        except (ConnectionError, OSError):
            pass
        await self.queue.put((self._deadline(loop.time(), 0), b""))

    def _deadline(self, now: float, size: int) -> float:
        if not self.rate_bytes_s:
            return now + self.delay_s
        self._line_free_at = max(now, self._line_free_at) + size / self.rate_bytes_s
        return self._line_free_at + self.delay_s

    async def deliver(self) -> None:
        """Write each chunk at its deadline; at the end half-close the other side (it sees EOF)."""
        loop = asyncio.get_running_loop()
        while True:
            deadline, data = await self.queue.get()
            if deadline - loop.time() > PRECISE_LAST_S:
                await asyncio.sleep(deadline - loop.time() - PRECISE_LAST_S)
            remaining = deadline - loop.time()
            if remaining > 0:
                time.sleep(remaining)  # < 1 ms, where asyncio's timer would add up to a millisecond
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()


async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, options) -> None:
    """Forward one accepted connection to the target until both ways have ended (or either fails)."""
    try:
        server_reader, server_writer = await asyncio.open_connection(options.target_host, options.target_port)
    except OSError:
        client_writer.close()
        return
    directions = [Direction(client_reader, server_writer, options.delay_ms / 1000, options.rate_bytes_s),
                  Direction(server_reader, client_writer, options.delay_ms / 1000, options.rate_bytes_s)]
    tasks = [asyncio.ensure_future(job) for direction in directions for job in (direction.read(), direction.deliver())]
    try:
        await asyncio.gather(*tasks)
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass  # a write to a closed side, or the proxy ending: close both (3.11's streams log a cancelled handler)
    finally:
        for task in tasks:
            task.cancel()
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(options: argparse.Namespace) -> None:
    """Listen, print {"port": N}, forward connections until stdin closes."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(lambda reader, writer: forward(reader, writer, options),
                                        options.listen_host, 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while await stdin.read(4096):
        pass
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of every chunk")
    parser.add_argument("--rate-bytes-s", type=float, default=None, help="bandwidth cap of each direction")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
