"""Where a node keeps its files: platformdirs locations, or all under $CAKEP2P_HOME (tests, portable installs); and
where the demo model that ships inside the package is."""

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

import platformdirs

APP_NAME = "cakep2p"
EMBEDDED_MODEL_NAME = "stories260K"   # MIT, 260K parameters, ~1 MB: ships inside the package (cakep2p/models/)
EMBEDDED_MODEL_NOTE = (f"{EMBEDDED_MODEL_NAME} is the tiny demo model that ships with cakep2p: it only writes short "
                       "children's stories")   # each shell adds how to pick a real model


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


def embedded_model_dir() -> Path:
    """The demo model inside the package (a Hugging Face folder): what runs when no model is chosen, offline."""
    return Path(__file__).resolve().parent / "models" / EMBEDDED_MODEL_NAME


def is_embedded_model(path: str | Path) -> bool:
    """Whether `path` is the demo model that ships with cakep2p."""
    try:
        return Path(path).expanduser().resolve() == embedded_model_dir()
    except OSError:
        return False


def write_atomically(path: Path, content: bytes | Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Replace `path` whole or not at all: write a private temporary beside it (bytes, or what `content` writes to
    the open file), fsync it, then rename it over `path`. A crash leaves the old file or the new one, never half."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
