"""The model library: recommended models, whether the cluster can hold them, and downloading them (no Qt here).

- catalog.py: the recommended models, their formats, approximate sizes and shapes
- fit.py: the planner's verdict on a model over this node's and its usable peers' offered memory
- download.py: resumable, cancellable downloads from the Hugging Face Hub (or $HF_ENDPOINT) into the models folder
- local.py: what a model on disk is: its format, quantization and real size
"""
