"""cakep2p: one language model across the ordinary machines you own."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
