"""Turning a model into a running LoadedModel over this node and its peers.

- loader.py: open_model, the one way in (command line, window, API)
- planning.py: budgets, planner.plan over them, and plan_model, the plan preview
- loaded.py: LoadedModel, ModelOptions, LocalModel (the whole model on this machine)
- remote.py: ClusterModel (the layers over the mesh, re-planned when a peer is lost)
"""

from cakep2p.cluster.loaded import DEFAULT_CONTEXT, LoadedModel, LocalModel, ModelOptions, context_length
from cakep2p.cluster.loader import open_model
from cakep2p.cluster.planning import NotEnoughMemory, PlannedModel, check_fits_locally, plan_model
from cakep2p.cluster.remote import ClusterModel

__all__ = ["DEFAULT_CONTEXT", "ClusterModel", "LoadedModel", "LocalModel", "ModelOptions", "NotEnoughMemory",
           "PlannedModel", "check_fits_locally", "context_length", "open_model", "plan_model"]
