"""The OpenAI-compatible HTTP API over a LoadedModel, served by `cakep2p api` and by the window's API switch.

- app.py: the routes and the ASGI app
- requests.py: request bodies to GenerationRequests, or OpenAI-style errors
- sessions.py: the admission queue and one worker per generation
- server.py: listening sockets and the background server
- status.py: the cluster status GET /v1/cluster shows
"""

from cakep2p.api.app import create_app
from cakep2p.api.requests import ApiError
from cakep2p.api.server import BackgroundServer, base_url, listen_socket
from cakep2p.api.sessions import StopMatcher
from cakep2p.api.status import cluster_status

__all__ = ["ApiError", "BackgroundServer", "StopMatcher", "base_url", "cluster_status", "create_app",
           "listen_socket"]
