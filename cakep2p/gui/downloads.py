"""Fetching a model from the Hugging Face Hub for the window (optional: needs huggingface_hub and a network)."""

from __future__ import annotations

from cakep2p.errors import CakeError

DOWNLOAD_NEEDS = ("Downloading a model needs the huggingface_hub package (pip install huggingface_hub) "
                  "and a connection to huggingface.co. Without them, copy the model folder to this machine "
                  "and pick it with “Choose folder…”.")
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def why_not_downloadable(hub_id: str) -> str | None:
    """Why `hub_id` cannot be downloaded here (the package is missing, or it is no owner/name id), or None."""
    try:
        import huggingface_hub  # noqa: F401  (optional dependency)
        del huggingface_hub
    except ImportError:
        return DOWNLOAD_NEEDS
    if not hub_id or hub_id.count("/") != 1:
        return f"“{hub_id}” is not a hub id: use the form owner/name, e.g. Qwen/Qwen3-0.6B"
    return None


def download(hub_id: str) -> str:
    """The local folder of `hub_id`'s model files, fetched (or found in the hub's cache); blocks."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id, allow_patterns=MODEL_FILES)
    except Exception as error:  # any hub/network failure becomes one message
        raise CakeError(f"could not download {hub_id}: {str(error).splitlines()[0] if str(error) else error!r}. "
                        + DOWNLOAD_NEEDS) from None
