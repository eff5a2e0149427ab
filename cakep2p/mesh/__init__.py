"""The mesh: CURVE-encrypted ZeroMQ DEALER/ROUTER between nodes.

- client.py: the initiator's end of one stage (request ids, heartbeats, liveness), and async ping
- pipeline.py: the engine's Pipeline over remote stages, with exact replay after a lost stage
- server.py: the stage server (requests, limits, leases and expiry); threaded.py runs one on its own thread
- sessions.py: whose is what on a stage (owners from leases, when each was heard, the sessions)
- compute.py: the compute thread shared fairly between owners, a forward cut into prefill chunks
- part_store.py: the parts a server holds, who holds them, and the memory they take
- lease.py: the initiator's lease (its client id) and the keeper that renews it
- transfer.py: streaming a part's tensors to a stage, and assembling them there
- parts_cache.py: received parts on disk, verified on every read
- curve.py: CURVE sockets and the ZAP authenticator (members only)

Messages are cakep2p/wire.py's; docs/protocol.md describes the exchange.
"""

from cakep2p.mesh.client import StageClient, StageRefused, layer_range, part_ref, ping, timed_ping
from cakep2p.mesh.pipeline import PipelineStage, RemotePipeline, RemoteStage, stages_for_plan
from cakep2p.mesh.server import StageLimits, StageServer
from cakep2p.mesh.threaded import ServerThread

__all__ = ["PipelineStage", "RemotePipeline", "RemoteStage", "ServerThread", "StageClient", "StageLimits",
           "StageRefused", "StageServer", "layer_range", "part_ref", "ping", "stages_for_plan", "timed_ping"]
