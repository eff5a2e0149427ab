"""The project's exception types: each carries one line a user can act on."""


class CakeError(Exception):
    """Base class: the message names the thing and the fix; the CLI prints it as one line."""


class ModelError(CakeError):
    """A model folder is missing, corrupt, or of an unsupported architecture."""


class PlanError(CakeError):
    """The model does not fit the memory the cluster offers, or the plan input is invalid."""


class ProtocolError(CakeError):
    """A network message failed validation (wrong op, size, dtype, shape, version)."""


class MeshError(CakeError):
    """A peer is unreachable, refused a request, or was lost."""
