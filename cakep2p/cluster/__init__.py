"""Turning a model into a running LoadedModel over this node and its peers.

- loader.py: open_model, the one way in (command line, window, API)
- planning.py: budgets, planner.plan over them, and plan_model, the plan preview
- loaded.py: LoadedModel, ModelOptions, LocalModel (the whole model on this machine)
- remote.py: ClusterModel (the layers over the mesh, re-planned when a peer is lost)
- notes.py: what the user is told about a plan: machines heard but left out (and why), a capped context
"""

from cakep2p.cluster.loaded import DEFAULT_CONTEXT, LoadedModel, LocalModel, ModelOptions, context_length
from cakep2p.cluster.loader import open_model
from cakep2p.cluster.notes import LeftOut, context_note, describe_left_out, left_out, left_out_notes
from cakep2p.cluster.planning import NotEnoughMemory, PlannedModel, check_fits_locally, plan_model
from cakep2p.cluster.remote import ClusterModel

__all__ = ["DEFAULT_CONTEXT", "ClusterModel", "LeftOut", "LoadedModel", "LocalModel", "ModelOptions", "NotEnoughMemory",
           "PlannedModel", "check_fits_locally", "context_length", "context_note", "describe_left_out", "left_out",
           "left_out_notes", "open_model", "plan_model"]
