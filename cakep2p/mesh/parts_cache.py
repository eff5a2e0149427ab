"""The parts cache: model parts a stage received from peers, kept as safetensors files named by their content
digest, with their config and weight format in the metadata; every read checks the content against the name, so
a damaged or foreign file is never used. The cache has a size cap ($CAKEP2P_PARTS_CACHE_MAX, default 16 GiB): the
least recently used parts go first. And finding a stage's own copy of a model in its models dirs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

import torch

from cakep2p import paths, wire
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.digests import Served, content_digest
from cakep2p.engine.dtypes import BY_SAFETENSORS
from cakep2p.engine.safetensors import Entry, TensorInfo, mapped_tensor, read_safetensors_header, write_safetensors
from cakep2p.errors import CakeError, ModelError
from cakep2p.units import format_size, parse_size

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
READ_CHUNK_BYTES = 8 * 1024 * 1024
CAP_ENV = "CAKEP2P_PARTS_CACHE_MAX"
DEFAULT_CAP_BYTES = 16 << 30


class CacheFull(OSError):
    """A part bigger than the whole parts cache may hold: it is kept in memory only."""


def default_parts_dir() -> Path:
    return paths.cache_dir() / PARTS_DIR


def cache_cap() -> int:
    """The parts cache's size cap: $CAKEP2P_PARTS_CACHE_MAX (a size such as 4GiB; 0 keeps nothing), else 16 GiB."""
    text = os.environ.get(CAP_ENV, "").strip()
    if not text:
        return DEFAULT_CAP_BYTES
    try:
        return parse_size(text)
    except (CakeError, ValueError):
        log.warning("%s=%r is not a size (e.g. 8GiB); using %d bytes", CAP_ENV, text, DEFAULT_CAP_BYTES)
        return DEFAULT_CAP_BYTES


def cached_parts(parts_dir: Path) -> list[tuple[Path, int, float]]:
    """(path, bytes, last use) of every cached part, least recently used first."""
    found = []
    for path in Path(parts_dir).glob("*.safetensors"):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((path, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda item: item[2])


def cache_usage(parts_dir: Path) -> tuple[int, int]:
    """(bytes, parts) the parts cache holds now."""
    parts = cached_parts(parts_dir)
    return sum(size for _, size, _ in parts), len(parts)


def cache_summary(parts_dir: Path | None = None) -> str:
    """`3 parts, 1.2 GiB of its 16 GiB cap`: what doctor and the window's node settings show."""
    used, count = cache_usage(parts_dir or default_parts_dir())
    return f"{count} part{'' if count == 1 else 's'}, {format_size(used)} of its {format_size(cache_cap())} cap"


def make_room(parts_dir: Path, nbytes: int, cap: int) -> None:
    """Evict the least recently used parts until `nbytes` more fit under `cap`; CacheFull if they never can."""
    if nbytes > cap:
        raise CacheFull(f"a part of {nbytes} bytes is more than the parts cache's cap of {cap} bytes")
    parts = cached_parts(parts_dir)
    used = sum(size for _, size, _ in parts)
    for path, size, _ in parts:
        if used + nbytes <= cap:
            break
        try:
            path.unlink()
            used -= size
            log.info("parts cache over its cap: evicted %s (%d bytes, least recently used)", path.name, size)
        except OSError as error:  # in use where open files cannot be deleted: the next one goes instead
            log.debug("could not evict %s: %s", path.name, error)


def cached_part_path(ref: wire.PartRef, parts_dir: Path) -> Path:
    """Where a received part is kept: <parts_dir>/<content digest>.safetensors."""
    return parts_dir / f"{ref.digest}.safetensors"


def write_cached_part(ref: wire.PartRef, config_json: str, weights: str, entries: Sequence[Entry],
                      write_data: Callable[[BinaryIO], None], parts_dir: Path, cap: int = DEFAULT_CAP_BYTES) -> Path:
    """Atomically store a part: its served tensors (`entries`, bytes as `write_data` streams them, in transfer
    order) with the part's config, layers and weight format in the metadata; older parts are evicted to stay under
    `cap` (CacheFull when the part alone is bigger; OSError when the disk is full)."""
    path = cached_part_path(ref, parts_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_room(parts_dir, sum(entry.nbytes for entry in entries) + len(config_json) + 4096, cap)
    metadata = {"cakep2p_fingerprint": ref.model_fingerprint, "cakep2p_config": config_json, "cakep2p_weights": weights,
                "cakep2p_part": json.dumps(_ref_fields(ref)), "cakep2p_order": json.dumps([e.name for e in entries])}
    return write_safetensors(path, entries, write_data, metadata)


class FileTensors(Mapping):
    """The tensors of a cached part, each mapped from disk when asked for and not kept: filling a ModelPart from it
    holds one tensor at a time besides the part."""

    def __init__(self, index: dict[str, TensorInfo], order: Sequence[str]) -> None:
        self._index, self._order = index, list(order)

    def __getitem__(self, name: str) -> torch.Tensor:
        return mapped_tensor(self._index[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def read_cached_part(ref: wire.PartRef, parts_dir: Path) -> tuple[str, str, FileTensors] | None:
    """(config_json, weight format, tensors read on demand) of a cached part whose content is still its name; None
    (and the file removed) if not. The content is hashed by streaming the file: the part is never all in memory."""
    path = cached_part_path(ref, parts_dir)
    if not path.is_file():
        return None
    try:
        index, _ = read_safetensors_header(path)
        with path.open("rb") as handle:  # read_safetensors_header has checked the length against the file
            metadata = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
        order = json.loads(metadata["cakep2p_order"])
        valid = (metadata["cakep2p_fingerprint"] == ref.model_fingerprint
                 and json.loads(metadata["cakep2p_part"]) == _ref_fields(ref)
                 and sorted(order) == sorted(index)
                 and content_digest(_file_entries(path, [index[name] for name in order])) == ref.digest)
    except Exception as error:  # a damaged cache file is re-fetched, never trusted
        log.warning("cached part %s is unreadable (%s); it will be transferred again", path.name, error)
        valid = False
    if not valid:
        log.warning("cached part %s does not hold the content its name says; removing it", path.name)
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)   # recently used: the last to be evicted
    except OSError:
        pass
    return metadata["cakep2p_config"], metadata["cakep2p_weights"], FileTensors(index, order)


def _file_entries(path: Path, infos: Sequence[TensorInfo]) -> list[Served]:
    """Each tensor's name, dtype, shape and the sha256 of its bytes in the file, read READ_CHUNK_BYTES at a time."""
    entries = []
    with path.open("rb") as handle:
        for info in infos:
            digest = hashlib.sha256()
            handle.seek(info.offset)
            left = info.nbytes
            while left:
                piece = handle.read(min(left, READ_CHUNK_BYTES))
                if not piece:
                    raise ModelError(f"{path} is truncated")
                digest.update(piece)
                left -= len(piece)
            entries.append((info.name, BY_SAFETENSORS[info.dtype].name, info.shape, digest.hexdigest()))
    return entries


def find_model_dir(models_dirs: Sequence[Path], fingerprint: str) -> Checkpoint | None:
    """A checkpoint under the given models dirs (each dir, its children, grandchildren: Hugging Face folders and
    .gguf files) with this fingerprint."""
    for root in models_dirs:
        folders = [Path(root)] + sorted(Path(root).glob("*/")) + sorted(Path(root).glob("*/*/"))
        for folder in folders:
            candidates = ([folder] if (folder / "config.json").is_file() else []) + sorted(folder.glob("*.gguf"))
            for candidate in candidates:
                checkpoint = _opened(candidate)
                if checkpoint is not None and checkpoint.fingerprint == fingerprint:
                    return checkpoint
    return None


_OPENED: dict[tuple[str, int, int], Checkpoint | None] = {}


def _opened(path: Path) -> Checkpoint | None:
    """Checkpoint.open, remembered while the file is unchanged (a GGUF takes seconds to open)."""
    try:
        stat = (path / "config.json" if path.is_dir() else path).stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _OPENED:
        try:
            _OPENED[key] = Checkpoint.open(path)
        except ModelError:
            _OPENED[key] = None
    return _OPENED[key]


def _ref_fields(ref: wire.PartRef) -> list:
    return [ref.start, ref.end, ref.has_embedding, ref.has_head]
