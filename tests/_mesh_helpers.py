"""Mesh test helpers: a stage server in its own process (run this file), a handle that always kills it, waits.

    python tests/_mesh_helpers.py --port 0 [--insecure] [--max-frame-bytes N]   # prints {"port": N} once bound
The cluster code comes from $CAKEP2P_CLUSTER_CODE, the cache from $CAKEP2P_HOME.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    """Poll `condition` until it holds (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


class StageProcess:
    """A stage server subprocess on 127.0.0.1; use as a context manager (killed and reaped on exit)."""

    def __init__(self, home: Path, code: str | None, *extra_args: str) -> None:
        env = dict(os.environ, CAKEP2P_HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        env.pop("CAKEP2P_CLUSTER_CODE", None)
        args = [sys.executable, str(Path(__file__).resolve()), "--port", "0", *extra_args]
        if code is None:
            args.append("--insecure")
        else:
            env["CAKEP2P_CLUSTER_CODE"] = code
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.port = 0

    def __enter__(self) -> "StageProcess":
        try:
            line = self.process.stdout.readline()
            self.port = json.loads(line)["port"]
        except (ValueError, KeyError):
            self.kill()
            raise RuntimeError(f"stage process did not start: {self.process.stderr.read()[-2000:]}") from None
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--budget", type=int, default=1 << 30)
    parser.add_argument("--max-frame-bytes", type=int, default=None)
    options = parser.parse_args()

    import torch

    from cakep2p import security, wire
    from cakep2p.mesh import StageLimits, StageServer

    torch.set_num_threads(1)
    keys = None if options.insecure else security.derive_keys(os.environ["CAKEP2P_CLUSTER_CODE"])
    limits = StageLimits(budget_bytes=options.budget, max_frame_bytes=options.max_frame_bytes or wire.MAX_FRAME_BYTES)

    async def serve() -> None:
        server = StageServer(node_id="subprocess", name="subprocess", keys=keys, limits=limits, port=options.port,
                             device="cpu")
        port = await server.start()
        print(json.dumps({"port": port}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
