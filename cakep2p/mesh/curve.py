"""CURVE for the mesh: client and server sockets with the cluster key pair, and the ZAP authenticator that admits only
cluster members (and reports everyone it refuses)."""

import hmac
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from cakep2p.errors import MeshError
from cakep2p.network import peer_address_of
from cakep2p.security import ClusterKeys

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_POLL_MS = 50
# Handshakes that fail before ZAP (a wrong code fails CURVE's HELLO; a NULL client is a mechanism mismatch).
MONITORED_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
REFUSAL_LOG_INTERVAL_S = 60.0   # a refused client reconnects every ~100 ms; log it once a minute, with a count
REFUSAL_LOG_MAX_PEERS = 1024


def configure_server(socket: zmq.Socket, keys: ClusterKeys | None) -> None:
    """Make a (ROUTER) socket a CURVE server with the cluster key; keys=None leaves it open (NULL, --insecure-open).

    Call before bind(), after start_authenticator() on the same context, so that every handshake goes through ZAP.
    """
    if keys is None:
        return
    socket.curve_secretkey = keys.secret_key
    socket.curve_publickey = keys.public_key
    socket.curve_server = True


def configure_client(socket: zmq.Socket, keys: ClusterKeys | None) -> None:
    """Make a (DEALER) socket a CURVE client with the cluster key; keys=None leaves it open. Call before connect()."""
    if keys is None:
        return
    socket.curve_serverkey = keys.public_key
    socket.curve_secretkey = keys.secret_key
    socket.curve_publickey = keys.public_key


class Authenticator:
    """The ZAP handler and handshake watcher of one zmq context, in one thread; admits only cluster members.

    Clients presenting the cluster public key pass; every other handshake is refused, logged (address only, at most
    once a minute per peer, with a count) and reported to on_refused(peer) each time, where peer is "IP" (refused by
    ZAP), "IP:port" (failed handshake) or "unknown address (to <our endpoint>)" when the address was not readable.
    """

    def __init__(self, context: zmq.Context, keys: ClusterKeys, on_refused: Callable[[str], None] | None = None):
        self._allowed_key = z85.decode(keys.public_key)
        self._on_refused = on_refused
        self._context = zmq.Context.shadow(context.underlying)   # sync sockets even on a zmq.asyncio context
        self._pending_monitors: list[zmq.Socket] = []   # handed from watch() to the thread under _lock
        self._lock = threading.Lock()
        self._closed = False
        self._log_limiter = _RefusalLogLimiter()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: zmq.ZMQError | None = None
        self._thread = threading.Thread(target=self._run, name="cakep2p-zap", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise MeshError(f"cannot start the cluster authenticator ({self._error}); only one may run per zmq context")

    def watch(self, server_socket: zmq.Socket) -> None:
        """Also report handshakes that fail before ZAP on this CURVE server socket (wrong code, NULL client).

        Call from the thread that owns server_socket, before or right after bind().
        """
        address = f"inproc://cakep2p-handshake-monitor-{id(self)}-{next(_monitor_numbers)}"
        server_socket.monitor(address, MONITORED_EVENTS)
        monitor = self._context.socket(zmq.PAIR)
        monitor.linger = 0
        monitor.connect(address)
        with self._lock:
            if not self._closed:
                self._pending_monitors.append(monitor)
                return
        monitor.close(linger=0)
        server_socket.disable_monitor()
        raise MeshError("the cluster authenticator was stopped; start a new one before watching a socket")

    def stop(self) -> None:
        """Stop the thread (idempotent). Call before closing the context; later CURVE handshakes skip ZAP."""
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        handler = self._context.socket(zmq.REP)
        handler.linger = 0
        try:
            handler.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as error:
            handler.close(linger=0)
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(handler, zmq.POLLIN)
        monitors: dict[zmq.Socket, _MonitorState] = {}
        try:
            while not self._stopping.is_set():
                for monitor in self._take_pending_monitors():
                    monitors[monitor] = _MonitorState()
                    poller.register(monitor, zmq.POLLIN)
                for ready_socket, _ in poller.poll(ZAP_POLL_MS):
                    if ready_socket is handler:
                        handler.send_multipart(self._answer(handler.recv_multipart()))
                    else:
                        self._on_monitor_event(monitors[ready_socket], ready_socket.recv_multipart())
        finally:
            with self._lock:
                self._closed = True
            handler.close(linger=0)
            for monitor in [*monitors, *self._take_pending_monitors()]:
                monitor.close(linger=0)

    def _take_pending_monitors(self) -> list[zmq.Socket]:
        with self._lock:
            pending, self._pending_monitors = self._pending_monitors, []
        return pending

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6 or frames[0] != b"1.0":
            request_id = frames[1] if len(frames) > 1 else b""
            return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
        _version, request_id, _domain, address, _identity, mechanism, *credentials = frames
        admitted = (
            mechanism == b"CURVE" and len(credentials) == 1
            and hmac.compare_digest(credentials[0], self._allowed_key)
        )
        if admitted:
            return [b"1.0", request_id, b"200", b"OK", b"cluster", b""]
        self._refuse(address.decode("ascii", "replace"), f"{mechanism.decode('ascii', 'replace')} client "
                     "without the cluster key")
        return [b"1.0", request_id, b"400", b"not a member of this cluster", b"", b""]

    def _on_monitor_event(self, state: "_MonitorState", frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_ACCEPTED:
            state.last_peer = peer_address_of(event["value"])
        elif event["event"] in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            endpoint = event["endpoint"].decode("ascii", "replace")
            peer = state.last_peer or f"unknown address (to {endpoint})"
            reason = _HANDSHAKE_REASONS.get(event["value"], "failed CURVE handshake")
            self._refuse(peer, reason)

    def _refuse(self, peer: str, reason: str) -> None:
        self._log_limiter.log(peer, reason)
        if self._on_refused is not None:
            try:
                self._on_refused(peer)
            except Exception:   # a faulty callback must not kill the authenticator thread
                log.exception("on_refused callback failed")


_monitor_numbers = itertools.count()
_HANDSHAKE_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "wrong cluster code (CURVE handshake failed)",
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "unencrypted client (no CURVE)",
}


@dataclass
class _MonitorState:
    last_peer: str = ""   # address of the connection accepted last: a failed handshake follows its ACCEPTED event


class _RefusalLogLimiter:
    """One warning per peer host per interval, counting the refusals in between (reconnect storms stay one line)."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S):
        self._interval_s = interval_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, peer: str, reason: str) -> None:
        host = re.sub(r":\d+$", "", peer)
        now = time.monotonic()
        if len(self._last_logged) > REFUSAL_LOG_MAX_PEERS:   # forget quiet peers so a scan cannot grow this forever
            self._last_logged = {key: at for key, at in self._last_logged.items() if now - at < self._interval_s}
            self._suppressed = {key: count for key, count in self._suppressed.items() if key in self._last_logged}
        if now - self._last_logged.get(host, -self._interval_s) < self._interval_s:
            self._suppressed[host] = self._suppressed.get(host, 0) + 1
            return
        more = self._suppressed.pop(host, 0)
        suffix = f" ({more} more refusals from it since the last report)" if more else ""
        log.warning("refused connection from %s: %s%s", peer, reason, suffix)
        self._last_logged[host] = now
