"""A fake Hugging Face Hub on 127.0.0.1 for download tests: the model-info API, `resolve` URLs that redirect large
files to a "CDN" path, byte ranges, and a record of every request (huggingface_hub talks to it through HF_ENDPOINT).

Nothing here reaches the internet; the server runs on its own thread and stops with the context manager.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

LFS_MIN_BYTES = 1024   # files at least this big are "LFS" files: hashed in the listing, served from the CDN path


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]]                      # repo -> file name -> content
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)   # (method, path, headers)
    url: str = ""
    gate: threading.Event | None = None   # when set up, a file body stops after `gate_after` bytes until it is set
    gate_after: int = 1 << 20

    def ranges(self) -> list[str]:
        """The Range headers file downloads sent, in order."""
        return [headers.get("Range", "") for method, path, headers in self.requests if "/cdn/" in path]

    def file_requests(self) -> list[tuple[str, dict[str, str]]]:
        return [(path, headers) for method, path, headers in self.requests if "/resolve/" in path]


def _listing(repo: str, files: dict[str, bytes]) -> dict:
    siblings = []
    for name, content in sorted(files.items()):
        sibling = {"rfilename": name, "size": len(content), "blobId": hashlib.sha1(content).hexdigest()}
        if len(content) >= LFS_MIN_BYTES:
            sibling["lfs"] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "pointerSize": 134}
        siblings.append(sibling)
    return {"id": repo, "modelId": repo, "sha": "0" * 40, "private": False, "siblings": siblings}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"    # one request per connection: no handler thread waits on a kept-alive one

        def log_message(self, *_args) -> None:   # quiet
            return

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            hub.requests.append(("GET", self.path, dict(self.headers)))
            path = self.path.split("?", 1)[0]
            listing = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
            cdn = re.fullmatch(r"/cdn/([^/]+/[^/]+)/(.+)", path)
            if listing and listing.group(1) in hub.repos:
                return self._send(200, json.dumps(_listing(listing.group(1), hub.repos[listing.group(1)])).encode(),
                                  "application/json")
            if listing:
                return self._send(404, b'{"error": "Repository not found"}', "application/json",
                                  {"X-Error-Code": "RepoNotFound"})
            if resolve and resolve.group(2) in hub.repos.get(resolve.group(1), {}):
                content = hub.repos[resolve.group(1)][resolve.group(2)]
                if len(content) >= LFS_MIN_BYTES:
                    return self._send(302, b"", "text/plain", {"Location": f"/cdn/{resolve.group(1)}/{resolve.group(2)}"})
                return self._serve(content)
            if cdn and cdn.group(2) in hub.repos.get(cdn.group(1), {}):
                return self._serve(hub.repos[cdn.group(1)][cdn.group(2)])
            self._send(404, b"not found", "text/plain")

        def _serve(self, content: bytes) -> None:
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if not wanted:
                return self._send(200, content, "application/octet-stream")
            start = int(wanted.group(1))
            if start >= len(content):
                return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(content)}"})
            self._send(206, content[start:], "application/octet-stream",
                       {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"})

        def _send(self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            gated = hub.gate is not None and kind == "application/octet-stream" and len(body) > hub.gate_after
            try:
                if gated:
                    self.wfile.write(body[:hub.gate_after])
                    self.wfile.flush()
                    hub.gate.wait(30)
                    body = body[hub.gate_after:]
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):   # the client stopped reading (a cancelled download)
                pass

    return Handler


@contextmanager
def fake_hub(repos: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    """A FakeHub serving `repos` on 127.0.0.1 (its `url` is the HF_ENDPOINT to use) until the block ends."""
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = False        # server_close() joins every request's thread
    server.block_on_close = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        if hub.gate is not None:
            hub.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
