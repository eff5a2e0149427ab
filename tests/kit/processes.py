"""Child processes that are always ended: `cakep2p --serve` nodes, stage servers, `cakep2p api`, one-shot commands.

Every ChildProcess is recorded with the test that started it, so the session leak check (conftest) can say who
left one running. Use them as context managers, or kill() them in a `finally`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.kit.net import LOOPBACK
from tests.kit.nodes import seed_benchmark
from tests.kit.waits import wait_until

REPO = Path(__file__).resolve().parents[2]
STAGE_SERVER = Path(__file__).resolve().with_name("stage_server.py")
STARTED: list["ChildProcess"] = []   # every child the kit started this session, for the leak report


def child_env(home: Path | None = None, code: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a cakep2p child: its own CAKEP2P_HOME, this cluster code or none, unbuffered output,
    one OpenMP thread (the suite shares 2 cores with it), this checkout importable; `extra` on top."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("CAKEP2P_CLUSTER_CODE", None)
    if home is not None:
        env["CAKEP2P_HOME"] = str(home)
    if code is not None:
        env["CAKEP2P_CLUSTER_CODE"] = code
    env.update(extra)
    return env


def cakep2p_command(*arguments: str) -> list[str]:
    """`python -m cakep2p ARGUMENTS` with this interpreter."""
    return [sys.executable, "-m", "cakep2p", *arguments]


def run_cakep2p(*arguments: str, env: dict[str, str], input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `cakep2p ARGUMENTS` to its end (killed at the timeout); text output captured."""
    return subprocess.run(cakep2p_command(*arguments), cwd=REPO, env=env, input=input, capture_output=True,
                          text=True, timeout=timeout)


class ChildProcess:
    """A child process of the suite. kill() (or leaving the `with` block) ends and reaps it and closes its pipes."""

    def __init__(self, command: list[str], *, env: dict[str, str], role: str, cwd: Path = REPO, **popen_options):
        self.role = role
        self.test = os.environ.get("PYTEST_CURRENT_TEST", "(no test)").rsplit(" ", 1)[0]
        self.process = subprocess.Popen(command, cwd=cwd, env=env, **popen_options)
        STARTED.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` if it still runs (the caller waits for what it expects; kill() still ends it)."""
        if self.alive():
            self.process.send_signal(sig)

    def terminate(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; reaped either way."""
        self.stop(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL if it still runs; reap it; close its pipes. Safe to call twice."""
        if self.alive():
            self.process.kill()
        self.process.wait(30)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def describe(self) -> str:
        return f"{self.role} (pid {self.pid}, started by {self.test})"


class ServeProcess(ChildProcess):
    """`cakep2p --serve` with its own home; its output goes to `log_path`."""

    def __init__(self, command: list[str], *, env: dict[str, str], name: str, home: Path, port: int,
                 log_path: Path, address: str):
        self.name, self.home, self.port, self.log_path, self.address = name, home, port, log_path, address
        with open(log_path, "wb") as log_file:
            super().__init__(command, env=env, role=f"cakep2p --serve {name or '(default name)'}",
                             stdout=log_file, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def joined(self, name: str) -> re.Match | None:
        """The log line saying this node saw `name` join (groups: address, port), or None."""
        return re.search(rf"peer joined: '{re.escape(name)}' \(id \w+\) at ([\d.]+):(\d+)", self.log())

    def started(self) -> bool:
        """Serving yet? Fails the test with the log when it has exited instead."""
        if not self.alive():
            pytest.fail(f"node {self.name} exited with {self.process.returncode}:\n{self.log()}")
        return "serving at" in self.log()


def start_serve(tmp_path: Path, name: str | None, port: int | None, *, code: str, interface: str = LOOPBACK,
                args: tuple[str, ...] = (), env: dict | None = None, netns: str | None = None,
                home: Path | None = None) -> ServeProcess:
    """Start `cakep2p --serve` with its own CAKEP2P_HOME (benchmark pre-stored); the caller kills it.

    interface="" is the all-interfaces default: allowed only inside a network namespace the test made, or with
    --no-discovery, so that nothing is announced beyond loopback."""
    home = home or tmp_path / f"home-{name or 'default'}"
    home.mkdir(parents=True, exist_ok=True)
    seed_benchmark(home)
    child = child_env(home, code, **(env or {}))
    if not interface:
        assert netns or "--no-discovery" in args, "a node on all interfaces must run in a test network namespace"
        child.pop("CAKEP2P_INTERFACE", None)
    command = cakep2p_command("--serve", *args)
    command += ["--name", name] if name else []
    command += ["--port", str(port)] if port else []
    command += ["--interface", interface] if interface else []
    if netns:
        command = ["ip", "netns", "exec", netns, *command]   # ip execs the node: the pid is the node's
    return ServeProcess(command, env=child, name=name or "", home=home, port=port or 0,
                        log_path=tmp_path / f"{name or 'default'}.log", address=interface)


def kill_all(children) -> None:
    """kill() every child, even when one kill fails."""
    errors = []
    for child in children:
        try:
            child.kill()
        except Exception as error:  # noqa: BLE001  (kill the rest first)
            errors.append(error)
    if errors:
        raise errors[0]


class StageProcess(ChildProcess):
    """A bare StageServer (tests/kit/stage_server.py) on 127.0.0.1 in its own process; `with` waits for its port.

    code=None runs it with --insecure; its stderr goes to HOME/stage.log. `prefix` goes before the command (e.g. a
    mount namespace that gives it a small disk), `env` on top of its environment."""

    def __init__(self, home: Path, code: str | None, *extra_args: str, prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.log_path = home / "stage.log"
        args = [*prefix, sys.executable, str(STAGE_SERVER), "--port", "0", *extra_args]
        if code is None:
            args.append("--insecure")
        with open(self.log_path, "wb") as log_file:
            super().__init__(args, env=child_env(home, code, **(env or {})), role="stage server",
                             stdout=subprocess.PIPE, stderr=log_file, text=True)
        self.port = 0

    def __enter__(self) -> "StageProcess":
        return self.ready()

    def ready(self) -> "StageProcess":
        """Wait for the port it bound (killed, and an error with its log, when it does not start)."""
        if not self.port:
            try:
                self.port = json.loads(self.process.stdout.readline())["port"]
            except (ValueError, KeyError):
                self.kill()
                raise RuntimeError(f"stage process did not start: {self.log_path.read_text()[-2000:]}") from None
        return self

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def peak_rss(self) -> int:
        """The most memory it has held so far (Linux's VmHWM)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ApiProcess(ChildProcess):
    """`cakep2p api ...` as a child process; a thread collects its stderr lines."""

    def __init__(self, arguments: list[str], env: dict[str, str]):
        super().__init__(cakep2p_command("api", *arguments), env=env, role="cakep2p api", stderr=subprocess.PIPE,
                         text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="test-api-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def url(self, timeout: float = 120) -> str:
        """The http://.../v1 base URL from its "serving" line (fails the test if it exits first)."""
        wait_until(lambda: not self.alive() or any("serving" in line for line in self.lines), timeout,
                   message="`cakep2p api` to say where it serves")
        found = next((re.search(r"http://\S+/v1", line) for line in self.lines if "serving" in line), None)
        assert found, "".join(self.lines)
        return found.group(0)

    def output(self) -> str:
        """Its stderr so far (all of it once it has exited and kill() has run)."""
        return "".join(self.lines)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(30)
        self._reader.join(10)
        super().kill()
