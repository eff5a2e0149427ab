"""Cluster security: the pairing code, the CURVE key pair derived from it, and ZeroMQ CURVE/ZAP glue for the mesh."""

import hashlib
import hmac
import itertools
import logging
import os
import re
import secrets
import socket as pysocket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from cakep2p import paths
from cakep2p.errors import CakeError, MeshError

log = logging.getLogger(__name__)

CODE_FILE_NAME = "cluster-code"
CODE_ENV_VAR = "CAKEP2P_CLUSTER_CODE"   # an alternative to --cluster that keeps the code out of the process title
CODE_WORD_COUNT = 6
CODE_DIGIT_COUNT = 6

# scrypt N=2**15, r=8, p=1: 32 MiB and about 0.1 s per derivation. The salt is fixed (every node must derive the
# same keys from the code alone) and separates cakep2p's keys from any other use of the same words.
KDF_SALT = b"cakep2p/cluster-curve-key/v1"
KDF_N = 2**15
KDF_R = 8
KDF_P = 1
KDF_MAXMEM = 64 * 1024 * 1024
FINGERPRINT_PREFIX = b"cakep2p/cluster-fingerprint/v1\x00"
FINGERPRINT_HEX_CHARS = 16

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_POLL_MS = 50
# Handshakes that fail before ZAP (a wrong code fails CURVE's HELLO; a NULL client is a mechanism mismatch).
MONITORED_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
REFUSAL_LOG_INTERVAL_S = 60.0   # a refused client reconnects every ~100 ms; log it once a minute, with a count
REFUSAL_LOG_MAX_PEERS = 1024

INSECURE_WARNING = (
    "WARNING: --insecure-open: mesh traffic is NOT encrypted and ANYONE on this network can connect to this node, "
    "read activations (the meaning of your prompts) and make it do work. Use only for debugging on a trusted network."
)

# 256 short, distinct, lower-case words: each word of the code carries exactly 8 bits.
WORDS: tuple[str, ...] = (
    "acorn", "actor", "adobe", "agent", "alarm", "album", "alpha", "amber", "angle", "anvil", "apple", "apron",
    "arena", "arrow", "aspen", "atlas", "attic", "autumn", "bacon", "badge", "bagel", "baker", "bamboo",
    "banjo", "barley", "basin", "beach", "beacon", "berry", "bison", "blade", "bottle", "branch", "bread",
    "brick", "bridge", "bronze", "brook", "bucket", "bugle", "button", "cabin", "cactus", "camel", "candle",
    "canoe", "canyon", "carbon", "cargo", "carpet", "castle", "cedar", "cello", "chalk", "cherry", "chess",
    "cider", "circus", "citrus", "clover", "cobalt", "cocoa", "comet", "coral", "cotton", "cowboy", "crane",
    "crayon", "daisy", "dancer", "delta", "denim", "desert", "diesel", "dingo", "domino", "donkey", "dragon",
    "drum", "dune", "eagle", "easel", "echo", "elbow", "ember", "engine", "falcon", "fennel", "ferry", "fiddle",
    "field", "flute", "forest", "fossil", "fox", "galaxy", "garden", "garlic", "gecko", "geyser", "ginger",
    "globe", "goblet", "gopher", "granite", "grape", "gravel", "guitar", "hammer", "harbor", "harp", "hazel",
    "helmet", "heron", "honey", "hornet", "husky", "igloo", "indigo", "iris", "island", "ivory", "jacket",
    "jaguar", "jelly", "jigsaw", "jungle", "kayak", "kernel", "kettle", "kiwi", "koala", "ladder", "lagoon",
    "lantern", "laser", "lava", "lemon", "lentil", "lily", "lizard", "locket", "lotus", "magnet", "mango",
    "maple", "marble", "meadow", "melon", "meteor", "mint", "mitten", "molar", "mosaic", "moss", "muffin",
    "mural", "mustard", "napkin", "nectar", "needle", "nickel", "noodle", "nutmeg", "oasis", "ocean", "olive",
    "onion", "opal", "orbit", "orchid", "otter", "oyster", "paddle", "pagoda", "panda", "papaya", "parrot",
    "pasta", "peach", "pebble", "pepper", "piano", "pickle", "pigeon", "pilot", "pine", "planet", "plum",
    "pocket", "polar", "poppy", "potato", "prism", "pumpkin", "puzzle", "quail", "quartz", "quill", "rabbit",
    "radar", "radish", "raven", "reef", "ribbon", "river", "robin", "rocket", "saddle", "salmon", "sandal",
    "satin", "scarf", "shovel", "silver", "sketch", "sled", "socket", "spider", "spruce", "squid", "stable",
    "statue", "summit", "sunset", "swan", "tablet", "tango", "teapot", "temple", "thunder", "tiger", "timber",
    "tomato", "topaz", "tulip", "tundra", "turnip", "turtle", "unicorn", "valley", "velvet", "violet", "violin",
    "volcano", "wafer", "waffle", "walnut", "walrus", "willow", "window", "winter", "wizard", "yogurt", "zebra",
    "zephyr",

)
_WORD_SET = frozenset(WORDS)
CODE_ENTROPY_BITS = CODE_WORD_COUNT * 8 + CODE_DIGIT_COUNT * 3.321928094887362   # 6*8 + 6*log2(10) = 67.9 bits


@dataclass(frozen=True, repr=False)
class ClusterKeys:
    """The cluster's CURVE key pair (z85, shared by every node holding the code) and its public fingerprint."""

    public_key: bytes
    secret_key: bytes
    fingerprint: str

    def __repr__(self) -> str:
        return f"ClusterKeys(fingerprint={self.fingerprint!r})"


def insecure_warning() -> str:
    """The text the caller shouts (log level WARNING, stderr, GUI banner) when --insecure-open is on."""
    return INSECURE_WARNING


def new_code() -> str:
    """A fresh random pairing code: six words and six digits, e.g. 'amber-falcon-river-tulip-maple-orbit-048213'."""
    words = [secrets.choice(WORDS) for _ in range(CODE_WORD_COUNT)]
    digits = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGIT_COUNT))
    code = "-".join([*words, digits])
    _remember_secret(code)  # redacted from logs from birth, not only once read back from disk
    return code


def normalize_code(code: str) -> str:
    """The canonical form of a typed code (any case, spaces/dots/underscores as separators); CakeError if malformed."""
    tokens = [token for token in re.split(r"[\s\-_.,;:/]+", code.strip().lower()) if token]
    words = [token for token in tokens if not token.isdigit()]
    digits = "".join(token for token in tokens if token.isdigit())
    shape_ok = (
        len(words) == CODE_WORD_COUNT
        and tokens[:CODE_WORD_COUNT] == words
        and len(digits) == CODE_DIGIT_COUNT
        and digits.isascii()
    )
    if not shape_ok or not all(word in _WORD_SET for word in words):
        raise CakeError(
            f"malformed cluster code: expected {CODE_WORD_COUNT} words from the cakep2p word list and "
            f"{CODE_DIGIT_COUNT} digits, like 'amber-falcon-river-tulip-maple-orbit-048213'; "
            "copy it again from a node of the cluster (its window shows it; its config dir has it in 'cluster-code')"
        )
    normalized = "-".join([*words, digits])
    _remember_secret(code.strip())
    _remember_secret(normalized)
    return normalized


def code_path() -> Path:
    """Where this node keeps its pairing code."""
    return paths.config_dir() / CODE_FILE_NAME


def load_or_create_code(code: str | None = None) -> str:
    """The cluster code: an explicit one (--cluster, $CAKEP2P_CLUSTER_CODE) is stored; else the stored one; else new."""
    if code is None:
        code = os.environ.get(CODE_ENV_VAR) or None
    path = code_path()
    if code is not None:
        normalized = normalize_code(code)
        if _read_code_file(path) != normalized:
            _write_code_file(path, normalized)
        return normalized
    stored = _read_code_file(path)
    if stored is not None:
        return stored
    created = new_code()
    _write_code_file(path, created)
    log.info("created a new cluster pairing code in %s", path)
    return created


def derive_keys(code: str) -> ClusterKeys:
    """The cluster's CURVE key pair from its code (scrypt, fixed salt): the same code, the same keys on every node."""
    return _derive_normalized(normalize_code(code))


def cluster_keys(code: str | None = None) -> ClusterKeys:
    """load_or_create_code + derive_keys; derivations are cached per code."""
    return derive_keys(load_or_create_code(code))


def fingerprint_of(public_key: bytes) -> str:
    """A short public name for the cluster: a domain-separated hash of the public key, never of the code."""
    raw_public = z85.decode(public_key)
    return hashlib.sha256(FINGERPRINT_PREFIX + raw_public).hexdigest()[:FINGERPRINT_HEX_CHARS]


@lru_cache(maxsize=16)
def _derive_normalized(normalized_code: str) -> ClusterKeys:
    _require_curve()
    seed = hashlib.scrypt(
        normalized_code.encode(), salt=KDF_SALT, n=KDF_N, r=KDF_R, p=KDF_P, maxmem=KDF_MAXMEM, dklen=32
    )
    secret_key = z85.encode(seed)
    public_key = zmq.curve_public(secret_key)
    _remember_secret(secret_key.decode())
    return ClusterKeys(public_key=public_key, secret_key=secret_key, fingerprint=fingerprint_of(public_key))


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CakeError(
            "this pyzmq/libzmq build has no CURVE support; install the pyzmq wheel from PyPI "
            "(or run with --insecure-open for debugging only)"
        )


def _read_code_file(path: Path) -> str | None:
    if not path.exists():
        return None
    _tighten_permissions(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        raise CakeError(f"cannot read the cluster code file {path} ({error.__class__.__name__}); "
                        "fix its permissions or delete it to create a new code") from None
    try:
        return normalize_code(text)
    except CakeError:
        raise CakeError(f"the cluster code file {path} is corrupt; delete it to create a new code, "
                        "or join a cluster with --cluster CODE") from None


def _write_code_file(path: Path, code: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _chmod_quietly(path.parent, 0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(code + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _chmod_quietly(path, 0o600)


def _tighten_permissions(path: Path) -> None:
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("cluster code file %s was readable by others; restricting it to its owner", path)
        _chmod_quietly(path, 0o600)
    if os.name == "posix" and path.parent.stat().st_mode & 0o077:
        _chmod_quietly(path.parent, 0o700)


def _chmod_quietly(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError as error:   # e.g. a config dir owned by another user; the file itself is still created 0600
        log.warning("cannot set permissions %o on %s (%s)", mode, path, error.__class__.__name__)


# -- secrets hygiene --------------------------------------------------------------------------------------------

_known_secrets: set[str] = set()
_known_secrets_lock = threading.Lock()
REDACTED = "<redacted>"


def _remember_secret(secret: str) -> None:
    if len(secret) >= 8:
        with _known_secrets_lock:
            _known_secrets.add(secret)


def redact(text: str) -> str:
    """The text with every pairing code and secret key this process has seen replaced by <redacted>."""
    with _known_secrets_lock:
        known = sorted(_known_secrets, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs known secrets from records; install with install_log_redaction()."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(handler: logging.Handler) -> None:
    """Attach a RedactingFilter to a log handler (the CLI and GUI do this for theirs)."""
    handler.addFilter(RedactingFilter())


# -- ZeroMQ glue ------------------------------------------------------------------------------------------------


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
            state.last_peer = _peer_address(event["value"])
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


def start_authenticator(context: zmq.Context, keys: ClusterKeys,
                        on_refused: Callable[[str], None] | None = None) -> Authenticator:
    """Start the ZAP handler for this context (one per context, before any CURVE server binds). Returns it; .stop() it.

    Also call authenticator.watch(router) for each CURVE server socket so that wrong-code peers, which fail the CURVE
    handshake before ZAP is asked, are reported too.
    """
    return Authenticator(context, keys, on_refused)


_monitor_numbers = itertools.count()
_HANDSHAKE_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "wrong cluster code (CURVE handshake failed)",
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "unencrypted client (no CURVE)",
}


@dataclass
class _MonitorState:
    last_peer: str = ""   # address of the connection accepted last: a failed handshake follows its ACCEPTED event


def _peer_address(file_descriptor: int) -> str:
    """Best effort: the remote address of a just-accepted connection ('' once libzmq has already closed it)."""
    try:
        duplicate = os.dup(file_descriptor)
    except (OSError, TypeError):
        return ""
    try:
        connection = pysocket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return ""
    with connection:
        try:
            host, port, *_ = connection.getpeername()
        except (OSError, ValueError):
            return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
