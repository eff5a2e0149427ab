"""A bare StageServer in its own process, for StageProcess (tests/kit/processes.py):

    python tests/kit/stage_server.py --port 0 [--insecure] [--budget N] [--lease-s S] [--max-frame-bytes N]
                                                                                  # prints {"port": N} once bound
The cluster code comes from $CAKEP2P_CLUSTER_CODE, the cache from $CAKEP2P_HOME.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--budget", type=int, default=1 << 30)
    parser.add_argument("--max-frame-bytes", type=int, default=None)
    parser.add_argument("--lease-s", type=float, default=None)
    parser.add_argument("--name", default="subprocess")
    options = parser.parse_args()

    import torch

    from cakep2p import security, wire
    from cakep2p.mesh import StageLimits, StageServer

    torch.set_num_threads(1)
    keys = None if options.insecure else security.derive_keys(os.environ["CAKEP2P_CLUSTER_CODE"])
    limits = StageLimits(budget_bytes=options.budget, max_frame_bytes=options.max_frame_bytes or wire.MAX_FRAME_BYTES)
    if options.lease_s is not None:
        limits = dataclasses.replace(limits, lease_s=options.lease_s)

    async def serve() -> None:
        server = StageServer(node_id="subprocess", name=options.name, keys=keys, limits=limits, port=options.port,
                             device="cpu")
        port = await server.start()
        print(json.dumps({"port": port}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
