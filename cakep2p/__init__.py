"""cakep2p: one language model across the ordinary machines you own."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 4  # the mesh protocol (cakep2p.wire.PROTOCOL_VERSION); nodes of another are never planned

# OpenMP workers that finish a forward spin ~300000 times (libgomp; ~9 ms of a core) before sleeping. Pipeline
# stages sharing a machine (or a busy laptop) then lose those cores to a neighbour that is idle. A short spin
# keeps the workers hot between the ops of one forward. bench/mesh_bench.py: 3 loopback stages went from 0.84x
# to 0.99x of one process's decode speed. Read once, when torch loads libgomp, so it is set on package import.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}
