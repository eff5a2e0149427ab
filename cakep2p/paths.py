"""Where a node keeps its files: platformdirs locations, or all under $CAKEP2P_HOME (tests, portable installs)."""

import os
from pathlib import Path

import platformdirs

APP_NAME = "cakep2p"


def _base(kind: str) -> Path:
    home = os.environ.get("CAKEP2P_HOME")
    if home:
        path = Path(home) / kind
    else:
        path = Path(getattr(platformdirs, f"user_{kind}_dir")(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir() -> Path:
    """Identity, pairing code, settings (owner-only files live here)."""
    return _base("config")


def cache_dir() -> Path:
    """Re-creatable data: benchmark results, model parts received from peers."""
    return _base("cache")


def data_dir() -> Path:
    """User data worth keeping: chat history, recent models."""
    return _base("data")
