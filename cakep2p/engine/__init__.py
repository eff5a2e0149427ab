"""Our own torch inference engine for Llama-family checkpoints; knows nothing of networking."""
