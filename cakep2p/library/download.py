"""Downloading a model from the Hugging Face Hub into this machine's models folder: resumable, cancellable, with
progress, and with one honest message for each way it can fail.

huggingface_hub (optional) lists the repository's files with their sizes and hashes, builds their URLs and the
headers (its token, when logged in); the bytes come over plain HTTP with a Range header, into `<file>.part` files
that a later download continues. `HF_ENDPOINT` names another hub (a mirror, or a test's local one).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from cakep2p import paths
from cakep2p.errors import CakeError

DEFAULT_ENDPOINT = "https://huggingface.co"
MARKER = ".cakep2p-download.json"        # written once every file is complete
PART_SUFFIX = ".part"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0
NEEDS_PACKAGE = ("downloading needs the huggingface_hub package: pip install huggingface_hub (or copy the model "
                 "to this machine and open it with “Open model…”)")
OFFLINE_HINT = ("this machine seems to be offline, or {host} is blocked here. Try again once connected, or copy "
                "the model to this machine and open it with “Open model…”")

Progress = Callable[[int, int, str], None]   # (bytes done, bytes in all, file name)


class DownloadError(CakeError):
    """A download that cannot go on: the message names why and what to do."""


class Cancelled(DownloadError):
    """The user stopped the download; what arrived stays in `.part` files and the next download continues it."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None       # the LFS hash, for weights; None for small files


def endpoint() -> str:
    """The hub to use: $HF_ENDPOINT (read now, not at import), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def models_dir() -> Path:
    """Where downloaded models live (the node also looks here for models its peers ask for)."""
    path = paths.data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def target_dir(repo: str) -> Path:
    """The folder `repo` downloads into: the repository's name, under models_dir()."""
    return models_dir() / repo.rstrip("/").rpartition("/")[2]


def check_hub_id(repo: str) -> None:
    if not repo or repo.count("/") != 1 or any(part.strip() != part or not part for part in repo.split("/")):
        raise DownloadError(f"“{repo}” is not a hub id: use the form owner/name, e.g. Qwen/Qwen2.5-0.5B-Instruct")


def matches(name: str, patterns: Sequence[str]) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatch(lowered, pattern.lower()) for pattern in patterns)


def list_files(repo: str, patterns: Sequence[str], hub: str | None = None) -> list[RemoteFile]:
    """The repository's files that match `patterns`, with sizes and hashes from the hub's listing."""
    check_hub_id(repo)
    hub = hub or endpoint()
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise DownloadError(NEEDS_PACKAGE) from None
    try:
        info = HfApi(endpoint=hub).model_info(repo, files_metadata=True, timeout=TIMEOUT_S)
    except Exception as error:   # the hub's own and its HTTP library's errors: one message each
        raise explain(error, repo, hub) from None
    files = []
    for sibling in info.siblings or ():
        if matches(sibling.rfilename, patterns) and "/" not in sibling.rfilename:
            lfs = getattr(sibling, "lfs", None)
            size = sibling.size if sibling.size is not None else getattr(lfs, "size", None)
            files.append(RemoteFile(sibling.rfilename, int(size or 0), getattr(lfs, "sha256", None)))
    if not files:
        raise DownloadError(f"{repo} on {_host(hub)} has no files matching {', '.join(patterns)}: it holds no model "
                            "our engine reads in that format")
    return sorted(files, key=lambda item: item.name)


def downloaded(repo: str) -> Path | None:
    """The model `repo` downloaded completely (its folder, or its one .gguf file), or None."""
    folder = target_dir(repo)
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = [str(name) for name in record.get("files", [])] if isinstance(record, dict) else []
    if not names or not all((folder / name).is_file() for name in names):
        return None
    ggufs = [name for name in names if name.lower().endswith(".gguf")]
    return folder / ggufs[0] if len(ggufs) == 1 else folder


def partial_bytes(repo: str) -> int:
    """Bytes of `repo` already here from a download that did not finish (what the next one continues from)."""
    folder = target_dir(repo)
    if not folder.is_dir() or (folder / MARKER).exists():
        return 0
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file() and path.name != MARKER)


def download(repo: str, patterns: Sequence[str], *, on_progress: Progress | None = None,
             cancel: threading.Event | None = None, hub: str | None = None) -> Path:
    """Fetch `repo`'s files matching `patterns` into target_dir(repo), continuing any earlier partial download;
    returns what downloaded() returns. Cancelled when `cancel` is set, DownloadError when it cannot go on."""
    hub = hub or endpoint()
    files = list_files(repo, patterns, hub)
    folder = target_dir(repo)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    total = sum(item.size for item in files)
    done = sum(_present_bytes(folder / item.name, item.size) for item in files)
    report = on_progress or (lambda _done, _total, _name: None)
    report(done, total, files[0].name)
    headers = _headers(hub)
    for item in files:
        def step(count: int, name: str = item.name) -> None:
            nonlocal done
            done += count
            report(done, total, name)
        _fetch(_url(hub, repo, item.name), folder / item.name, item, headers, step, cancel, repo, hub)
    paths.write_atomically(folder / MARKER, json.dumps({"repo": repo, "files": [item.name for item in files]},
                                                       indent=1).encode())
    result = downloaded(repo)
    assert result is not None
    return result


def explain(error: BaseException, repo: str, hub: str) -> DownloadError:
    """One clear message for a hub or network failure."""
    host = _host(hub)
    names = {kind.__name__ for kind in type(error).__mro__}
    status = getattr(getattr(error, "response", None), "status_code", None) or getattr(error, "code", None)
    if "GatedRepoError" in names:
        return DownloadError(f"{repo} is gated: accept its license on {host} and log in (`hf auth login`), "
                             "or pick another model")
    if "RepositoryNotFoundError" in names or status == 404:
        return DownloadError(f"{host} has no model {repo} (or it is private): check the id")
    if status in (401, 403):
        return DownloadError(f"{host} refused access to {repo} (HTTP {status}): log in (`hf auth login`) "
                             "if the model needs an account")
    if "OfflineModeIsEnabled" in names:
        return DownloadError(f"downloads are switched off here (HF_HUB_OFFLINE is set): unset it to download {repo}")
    reason = _reason(error)
    if isinstance(status, int) and status >= 500:
        return DownloadError(f"{host} answered HTTP {status} for {repo}: the hub has a problem, try again later")
    if names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "TransportError",
                "ConnectionError", "URLError", "TimeoutError", "OSError", "ProxyError"}:
        return DownloadError(f"could not reach {host} ({reason}): " + OFFLINE_HINT.format(host=host))
    return DownloadError(f"could not download {repo} from {host}: {reason}")


def _fetch(url: str, target: Path, item: RemoteFile, headers: dict[str, str], step: Callable[[int], None],
           cancel: threading.Event | None, repo: str, hub: str) -> None:
    """One file into target, through target.part; a complete target is kept as it is."""
    if target.is_file() and target.stat().st_size == item.size:
        return
    part = target.with_name(target.name + PART_SUFFIX)
    offset = part.stat().st_size if part.is_file() else 0
    if offset > item.size:
        part.unlink()
        step(-offset)
        offset = 0
    if offset < item.size:
        _transfer(url, part, offset, item, headers, step, cancel, repo, hub)
    _verify(part, item, repo)
    os.replace(part, target)


def _transfer(url: str, part: Path, offset: int, item: RemoteFile, headers: dict[str, str],
              step: Callable[[int], None], cancel: threading.Event | None, repo: str, hub: str) -> None:
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={offset}-"} if offset else {})})
    try:
        with _opener().open(request, timeout=TIMEOUT_S) as response:
            if offset and response.status != 206:   # the server sent the whole file: start over
                step(-offset)
                offset = 0
            with open(part, "r+b" if offset else "wb") as handle:
                handle.seek(offset)
                handle.truncate()
                while True:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"download of {repo} stopped; {item.name} is kept to continue from "
                                        f"{_fraction(handle.tell(), item.size)}")
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    handle.write(chunk)
                    step(len(chunk))
    except DownloadError:
        raise
    except urllib.error.HTTPError as error:
        if error.code == 416:               # the part is complete or damaged: the size check below decides
            return
        raise explain(error, repo, hub) from None
    except OSError as error:   # URLError, timeouts, refused or reset connections
        raise explain(error, repo, hub) from None


def _verify(part: Path, item: RemoteFile, repo: str) -> None:
    size = part.stat().st_size if part.is_file() else 0
    if size != item.size:
        raise DownloadError(f"{item.name} of {repo} arrived incomplete ({size} of {item.size} bytes): "
                            "download it again to continue")
    if item.sha256:
        digest = hashlib.sha256()
        with open(part, "rb") as handle:
            for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
                digest.update(block)
        if digest.hexdigest() != item.sha256:
            part.unlink()
            raise DownloadError(f"{item.name} of {repo} does not match the hub's checksum and was removed: "
                                "download it again")


class _NoAuthElsewhere(urllib.request.HTTPRedirectHandler):
    """Follow the hub's redirects (to its CDN), never taking the token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlparse(newurl).netloc != urlparse(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoAuthElsewhere())


def _headers(hub: str) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    headers = dict(build_hf_headers(library_name="cakep2p"))
    headers.pop("Accept-Encoding", None)   # byte ranges of the stored bytes, never of a compressed stream
    return headers


def _url(hub: str, repo: str, name: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, name, endpoint=hub)


def _present_bytes(target: Path, size: int) -> int:
    if target.is_file() and target.stat().st_size == size:
        return size
    part = target.with_name(target.name + PART_SUFFIX)
    return min(part.stat().st_size, size) if part.is_file() else 0


def _host(hub: str) -> str:
    return urlparse(hub).netloc or hub


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(error).__name__
    return text[:160]


def _fraction(done: int, total: int) -> str:
    return f"{done * 100 // max(1, total)}%"
