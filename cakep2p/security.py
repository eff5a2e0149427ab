"""The cluster's secret: the pairing code (words and digits, kept 0600), and the CURVE key pair scrypt derives from it.

The mesh's sockets use the keys in cakep2p/mesh/curve.py; log redaction of codes and keys is cakep2p/redaction.py.
"""

import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import zmq
from zmq.utils import z85

from cakep2p import paths
from cakep2p.errors import CakeError
from cakep2p.redaction import remember_secret

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
    remember_secret(code)  # redacted from logs from birth, not only once read back from disk
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
    remember_secret(code.strip())
    remember_secret(normalized)
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
    remember_secret(secret_key.decode())
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
    paths.write_atomically(path, (code + "\n").encode("ascii"), mode=0o600)
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
