"""Content addresses of weights: a part is named by the sha256 of its served tensors (engine/formats.py), as this
node makes them from its own files, so different weights never share a name and nobody can fill a name with other
bytes. Hashing a checkpoint is remembered per file (keyed by size and modification time): a second run does not
re-hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Iterable, Mapping

import torch

from cakep2p import paths
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.dtypes import BY_NAME, name_of
from cakep2p.engine.formats import served_tensors
from cakep2p.engine.loading import part_tensor_names
from cakep2p.engine.safetensors import raw_bytes
from cakep2p.planner import LayerRange

log = logging.getLogger(__name__)

CACHE_FILE = "tensor-digests.json"
DIGEST_VERSION = "cakep2p-part/v1"
Served = tuple[str, str, tuple[int, ...], str]  # (served name, dtype name, shape, sha256 of its bytes)


def tensor_entry(name: str, tensor: torch.Tensor) -> Served:
    return name, name_of(tensor.dtype), tuple(tensor.shape), hashlib.sha256(raw_bytes(tensor)).hexdigest()


def content_digest(entries: Iterable[Served]) -> str:
    """The part's name: sha256 over each served tensor's name, dtype, shape and bytes' sha256, in order."""
    digest = hashlib.sha256(DIGEST_VERSION.encode() + b"\0")
    for name, dtype, shape, sha256 in entries:
        digest.update(f"{name}\0{dtype}\0{list(shape)}\0{sha256}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PartIdentity:
    """A part's content digest and the bytes of its served tensors."""

    digest: str
    nbytes: int


def entry_bytes(entry: Served) -> int:
    return prod(entry[2]) * BY_NAME[entry[1]].itemsize


def part_identity(checkpoint: Checkpoint, layers: LayerRange, format_name: str) -> PartIdentity:
    """The content digest of the part `layers` of `checkpoint` in `format_name` (and its size), from the per-file
    cache where the file has not changed since it was hashed."""
    entries: list[Served] = []
    for name in part_tensor_names(checkpoint.args, layers):
        entries += _served_entries(checkpoint, name, format_name)
    _CACHE.flush()
    return PartIdentity(content_digest(entries), sum(entry_bytes(entry) for entry in entries))


def _served_entries(checkpoint: Checkpoint, name: str, format_name: str) -> list[Served]:
    info = checkpoint.info(name)
    key = f"{name}|{format_name}"
    cached = _CACHE.get(info.file, key)
    if cached is not None:
        return cached
    entries = [tensor_entry(served, tensor) for served, tensor in served_tensors(checkpoint, [name], format_name)]
    _CACHE.put(info.file, key, entries)
    return entries


class _DigestCache:
    """tensor-digests.json: {file path: {"size", "mtime_ns", "tensors": {"name|format": [entries]}}}, written at
    most once per new file hashed (atomically); an unreadable cache is simply rebuilt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict | None = None
        self._path: Path | None = None
        self._dirty = False

    def _load(self) -> dict:
        path = paths.cache_dir() / CACHE_FILE
        if self._data is None or path != self._path:   # a new home (tests switch CAKEP2P_HOME)
            try:
                data = json.loads(path.read_text())
                self._data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._data = {}
            self._path, self._dirty = path, False
        return self._data

    def get(self, file: Path, key: str) -> list[Served] | None:
        stat = file.stat()
        with self._lock:
            entry = self._load().get(str(file))
            if not isinstance(entry, Mapping) or entry.get("size") != stat.st_size \
                    or entry.get("mtime_ns") != stat.st_mtime_ns:
                return None
            found = entry.get("tensors", {}).get(key)
        try:
            return [(str(n), str(d), tuple(int(x) for x in s), str(h)) for n, d, s, h in found] if found else None
        except (TypeError, ValueError):
            return None

    def put(self, file: Path, key: str, entries: list[Served]) -> None:
        stat = file.stat()
        with self._lock:
            data = self._load()
            entry = data.get(str(file))
            if not isinstance(entry, dict) or entry.get("size") != stat.st_size \
                    or entry.get("mtime_ns") != stat.st_mtime_ns:
                entry = data[str(file)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tensors": {}}
            entry["tensors"][key] = [[n, d, list(s), h] for n, d, s, h in entries]
            self._dirty = True

    def flush(self) -> None:
        """Write the cache if it changed (after a part's digests are all known)."""
        with self._lock:
            if not self._dirty or self._data is None:
                return
            text = json.dumps(self._data, separators=(",", ":")).encode()
            self._dirty, path = False, self._path
        try:
            paths.write_atomically(path, text)
        except OSError as error:
            log.debug("could not write the digest cache: %s", error)


_CACHE = _DigestCache()
