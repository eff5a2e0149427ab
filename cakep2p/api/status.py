"""What GET /v1/cluster adds to the plan when the model runs over a cluster node: this node and its peers."""

from __future__ import annotations

from typing import Callable

from cakep2p.cluster import LoadedModel


def cluster_status(model: LoadedModel) -> Callable[[], dict] | None:
    """A function returning this node and its peers now, or None for a model on this machine only."""
    node = model.node
    if node is None:
        return None

    def status() -> dict:
        peers = [{"name": peer.name, "id": peer.node_id, "address": peer.address, "port": peer.port,
                  "status": peer.status, "serving": peer.serving, "offered_memory": peer.offered_memory,
                  "accelerator": peer.accelerator, "device_name": peer.device_name} for peer in node.peers()]
        return {"node": {"name": node.name, "id": node.node_id, "port": node.port}, "peers": peers}

    return status
