"""DelayLink (tests/kit/links.py): the emulated LAN's one-way delay, intact bytes, closes passed on, a process that
ends with its owner, and CURVE traffic of a real stage server passing through unchanged."""

import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.kit import REPO, wait_until
from tests.kit.links import DelayLink


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port():
    """A threaded TCP echo server on 127.0.0.1 (each connection echoed until it closes); its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, name="test-echo", kwargs=dict(poll_interval=0.05))
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()   # joins the handler threads: every test closes its connections
    thread.join()


def connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def receive(connection: socket.socket, size: int) -> bytes:
    chunks, received = [], 0
    while received < size:
        chunk = connection.recv(min(65536, size - received))
        assert chunk, f"connection closed after {received} of {size} bytes"
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def test_round_trip_through_a_20_ms_link_takes_at_least_40_ms(echo_port):
    with DelayLink("127.0.0.1", echo_port, 0.020) as link, connect(link.port) as connection:
        for _ in range(3):
            began = time.perf_counter()
            connection.sendall(b"ping")
            assert receive(connection, 4) == b"ping"
            assert time.perf_counter() - began >= 0.040


def test_five_megabytes_arrive_intact_and_in_order(echo_port):
    payload = os.urandom(5 << 20)
    with DelayLink("127.0.0.1", echo_port, 0.005) as link, connect(link.port) as connection:
        sender = threading.Thread(target=connection.sendall, args=(payload,), name="test-sender")
        sender.start()
        echoed = receive(connection, len(payload))
        sender.join()
    assert echoed == payload


def test_a_rate_cap_spaces_the_bytes_out(echo_port):
    with DelayLink("127.0.0.1", echo_port, 0.0, rate_bytes_s=1 << 20) as link, connect(link.port) as connection:
        began = time.perf_counter()
        connection.sendall(bytes(256 << 10))
        receive(connection, 256 << 10)
        assert time.perf_counter() - began >= 0.25   # 256 KiB at 1 MiB/s each way, the two ways overlapping


@pytest.mark.parametrize("closing", ["client", "server"])
def test_closing_one_side_closes_the_other(closing):
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            DelayLink("127.0.0.1", listener.getsockname()[1], 0.002) as link, connect(link.port) as client:
        listener.settimeout(10)
        server, _ = listener.accept()
        with server:
            server.settimeout(10)
            closed, other = (client, server) if closing == "client" else (server, client)
            closed.sendall(b"last words")
            closed.close()
            assert receive(other, 10) == b"last words"
            assert other.recv(1) == b""


def test_stop_ends_the_proxy_and_its_connections(echo_port):
    link = DelayLink("127.0.0.1", echo_port, 0.002).start()
    with connect(link.port) as connection:
        connection.sendall(b"x")
        assert receive(connection, 1) == b"x"
        link.stop()
        assert link.process.returncode == 0
        assert connection.recv(1) == b""


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_proxy_dies_with_its_parent(echo_port):
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tests.kit.links import DelayLink; "
         f"link = DelayLink('127.0.0.1', {echo_port}, 0.001).start(); print(link.process.pid, flush=True); "
         "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        proxy = psutil.Process(int(owner.stdout.readline()))
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        wait_until(lambda: ended(proxy), 10, message="the orphaned proxy to exit")
    finally:
        owner.kill()
        owner.wait(10)
        owner.stdout.close()


def test_a_stage_server_answers_a_ping_through_the_link(keys, tmp_path):
    from cakep2p.mesh import ServerThread, StageClient, StageLimits, StageServer

    server = ServerThread(StageServer(node_id="node-links", name="behind-a-link", keys=keys, limits=StageLimits(budget_bytes=1 << 30),
                                      device="cpu", parts_dir=tmp_path / "parts"))
    port = server.start()
    try:
        with DelayLink("127.0.0.1", port, 0.010) as link:
            client = StageClient("127.0.0.1", link.port, keys, heartbeat_s=0.2, timeout_s=10)
            try:
                assert client.ping().name == "behind-a-link"   # the CURVE handshake and the first ping
                began = time.perf_counter()
                client.ping()
                assert time.perf_counter() - began >= 0.020
            finally:
                client.close()
    finally:
        server.stop()
