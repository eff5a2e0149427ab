"""Who this node is: a random id made once per install (kept in paths.config_dir()) and a default name."""

from __future__ import annotations

import logging
import re
import socket
import uuid
from pathlib import Path

from cakep2p import paths

log = logging.getLogger(__name__)

NODE_ID_FILE = "node_id"
MAX_NAME_LENGTH = 48          # an mDNS instance label holds 63 bytes; leave room for a "-2" suffix
_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def _id_path(config_dir: Path | None) -> Path:
    return (config_dir or paths.config_dir()) / NODE_ID_FILE


def node_id(config_dir: Path | None = None) -> str:
    """This install's node id (32 hex digits), created on first use; config_dir defaults to paths.config_dir()."""
    path = _id_path(config_dir)
    try:
        stored = path.read_text().strip()
        if _ID_PATTERN.match(stored):
            return stored
        log.warning("node id file %s is corrupt; making a new id", path)
    except FileNotFoundError:
        pass
    return regenerate_node_id(config_dir)


def regenerate_node_id(config_dir: Path | None = None) -> str:
    """Make and store a fresh id: used on first start and when another live node turns out to share ours."""
    new_id = uuid.uuid4().hex
    paths.write_atomically(_id_path(config_dir), (new_id + "\n").encode("ascii"))
    return new_id


def default_node_name() -> str:
    """The machine's short host name, cleaned up for use as an mDNS instance name."""
    return clean_node_name(socket.gethostname().split(".")[0]) or "cakep2p-node"


def clean_node_name(name: str) -> str:
    """Printable, without dots (they separate DNS labels), at most MAX_NAME_LENGTH UTF-8 bytes."""
    cleaned = "".join(ch if ch.isprintable() and ch != "." else "-" for ch in name.strip())
    encoded = cleaned.encode("utf-8")[:MAX_NAME_LENGTH]
    return encoded.decode("utf-8", errors="ignore").strip(" -")
