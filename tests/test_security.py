"""Pairing code, key derivation, CURVE/ZAP on real zmq sockets over loopback; a sniffing proxy checks encryption."""

import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from cakep2p import redaction, security
from cakep2p.mesh import curve
from cakep2p.errors import CakeError, MeshError
from tests.kit import wait_until
from tests.kit.sniff import SniffingProxy

CODE_A = "amber-falcon-river-tulip-maple-orbit-048213"
CODE_B = "honey-bridge-alarm-amber-magnet-elbow-221365"
MARKER = b"SECRET-ACTIVATION-"
PAYLOAD = MARKER * 50
HEADER = json.dumps({"op": "forward", "session_id": "s-1", "request_id": 7, "dtype": "F32",
                     "shape": [1, 64], "positions": [0]}).encode()
HEADER_FIELD_NAMES = [b'"op"', b"forward", b"session_id", b"request_id", b"dtype", b"shape", b"positions"]
NO_DELIVERY_WINDOW_MS = 300


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def keys_a() -> security.ClusterKeys:
    return security.derive_keys(CODE_A)


@pytest.fixture
def keys_b() -> security.ClusterKeys:
    return security.derive_keys(CODE_B)


@pytest.fixture
def refusals() -> list[str]:
    return []


@pytest.fixture
def cluster_server(context, keys_a, refusals) -> Iterator[tuple[zmq.Socket, int]]:
    """A CURVE ROUTER of cluster A on 127.0.0.1 with its authenticator watching it; yields (socket, port)."""
    authenticator = curve.Authenticator(context, keys_a, refusals.append)
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    curve.configure_server(router, keys_a)
    authenticator.watch(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield router, port
    finally:
        router.close(linger=0)
        authenticator.stop()


def connect_client(context: zmq.Context, keys: security.ClusterKeys | None, endpoint: str,
                   socket_type: int = zmq.DEALER) -> zmq.Socket:
    client = context.socket(socket_type)
    client.linger = 0
    curve.configure_client(client, keys)
    client.connect(endpoint)
    return client


def echo_once(router: zmq.Socket) -> list[bytes]:
    """Receive one DEALER message on the ROUTER and send its frames back; returns the frames received."""
    assert router.poll(5000), "server received nothing"
    identity, *frames = router.recv_multipart()
    router.send_multipart([identity, *frames])
    return frames


# -- pairing code ------------------------------------------------------------------------------------------------

def test_word_list_has_256_distinct_lowercase_words():
    assert len(security.WORDS) == 256
    assert len(set(security.WORDS)) == 256
    assert all(re.fullmatch(r"[a-z]{3,8}", word) for word in security.WORDS)


def test_code_entropy_is_at_least_64_bits():
    assert security.CODE_ENTROPY_BITS >= 64


def test_new_code_has_six_words_and_six_digits():
    code = security.new_code()
    *words, digits = code.split("-")
    assert len(words) == 6 and all(word in security.WORDS for word in words)
    assert re.fullmatch(r"\d{6}", digits)


def test_new_codes_are_distinct():
    assert len({security.new_code() for _ in range(200)}) == 200


@pytest.mark.parametrize("typed", [
    "Amber Falcon River Tulip Maple Orbit 048213",
    "  AMBER-FALCON-RIVER-TULIP-MAPLE-ORBIT-048213\n",
    "amber_falcon.river tulip-maple  orbit 048 213",
])
def test_normalize_code_accepts_any_case_and_separators(typed):
    assert security.normalize_code(typed) == CODE_A


@pytest.mark.parametrize("malformed", [
    "",
    "amber-falcon-river-tulip-maple-048213",             # five words
    "amber-falcon-river-tulip-maple-orbit-48213",        # five digits
    "amber-falcon-river-tulip-maple-zzzzz-048213",       # word not in the list
    "048213-amber-falcon-river-tulip-maple-orbit",       # digits first
    "amber-falcon-river-tulip-maple-orbit-048213-extra",
    "amber-falcon-river-tulip-maple-orbit-٠٤٨٢١٣",       # non-ASCII digits
])
def test_normalize_code_rejects_malformed_code_with_clear_error(malformed):
    with pytest.raises(CakeError, match="malformed cluster code"):
        security.normalize_code(malformed)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_code_on_any_text_returns_canonical_code_or_raises_cake_error(text):
    try:
        normalized = security.normalize_code(text)
    except CakeError:
        return
    assert security.normalize_code(normalized) == normalized


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([" ", "-", "_", ".", "  ", " - "]), min_size=6, max_size=6), st.booleans())
def test_normalize_code_recovers_any_respelling_of_a_code(separators, upper):
    words, digits = CODE_A.split("-")[:6], CODE_A.split("-")[6]
    typed = "".join(word + separator for word, separator in zip(words, separators)) + digits
    assert security.normalize_code(typed.upper() if upper else typed) == CODE_A


def test_first_start_creates_code_file_owner_only(node_home):
    code = security.load_or_create_code()
    path = security.code_path()
    assert path.read_text().strip() == code
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_second_start_returns_stored_code(node_home):
    assert security.load_or_create_code() == security.load_or_create_code()


def test_explicit_code_is_normalised_and_stored(node_home):
    security.load_or_create_code()
    assert security.load_or_create_code("Amber Falcon River Tulip Maple Orbit 048213") == CODE_A
    assert security.load_or_create_code() == CODE_A
    assert stat.S_IMODE(security.code_path().stat().st_mode) == 0o600


def test_code_from_environment_variable_is_used_and_stored(node_home, monkeypatch):
    monkeypatch.setenv(security.CODE_ENV_VAR, CODE_B)
    assert security.load_or_create_code() == CODE_B
    monkeypatch.delenv(security.CODE_ENV_VAR)
    assert security.load_or_create_code() == CODE_B


def test_malformed_explicit_code_is_not_stored(node_home):
    stored = security.load_or_create_code()
    with pytest.raises(CakeError, match="malformed cluster code"):
        security.load_or_create_code("not a code")
    assert security.load_or_create_code() == stored


def test_code_file_readable_by_others_is_tightened(node_home):
    security.load_or_create_code(CODE_A)
    os.chmod(security.code_path(), 0o644)
    assert security.load_or_create_code() == CODE_A
    assert stat.S_IMODE(security.code_path().stat().st_mode) == 0o600


def test_corrupt_code_file_raises_error_naming_the_file(node_home):
    security.code_path().write_text("garbage\n")
    with pytest.raises(CakeError, match="cluster-code is corrupt; delete it"):
        security.load_or_create_code()


# -- keys and fingerprint ---------------------------------------------------------------------------------------

def test_derive_keys_is_deterministic_across_spellings(keys_a):
    security._derive_normalized.cache_clear()
    again = security.derive_keys("AMBER FALCON RIVER TULIP MAPLE ORBIT 048213")
    assert (again.public_key, again.secret_key, again.fingerprint) == (
        keys_a.public_key, keys_a.secret_key, keys_a.fingerprint)


def test_derived_keys_are_a_valid_curve_pair(keys_a):
    assert len(keys_a.secret_key) == 40 and len(keys_a.public_key) == 40
    assert zmq.curve_public(keys_a.secret_key) == keys_a.public_key


def test_different_codes_give_different_keys_and_fingerprints(keys_a, keys_b):
    assert keys_a.secret_key != keys_b.secret_key
    assert keys_a.public_key != keys_b.public_key
    assert keys_a.fingerprint != keys_b.fingerprint


def test_fingerprint_is_short_hex_revealing_neither_code_nor_keys(keys_a):
    assert re.fullmatch(r"[0-9a-f]{16}", keys_a.fingerprint)
    for word in CODE_A.split("-"):
        assert word not in keys_a.fingerprint
    assert keys_a.fingerprint not in keys_a.public_key.decode() + keys_a.secret_key.decode()


def test_cluster_keys_uses_stored_code(node_home):
    security.load_or_create_code(CODE_A)
    assert security.cluster_keys().fingerprint == security.derive_keys(CODE_A).fingerprint


def test_cluster_keys_repr_shows_only_fingerprint(keys_a):
    shown = repr(keys_a) + str(keys_a)
    assert keys_a.fingerprint in shown
    assert keys_a.secret_key.decode() not in shown
    assert keys_a.public_key.decode() not in shown


def test_redact_removes_codes_and_secret_keys(keys_a):
    text = f"joined {CODE_A} with key {keys_a.secret_key.decode()}"
    cleaned = redaction.redact(text)
    assert CODE_A not in cleaned and keys_a.secret_key.decode() not in cleaned
    assert "<redacted>" in cleaned


def test_redacting_filter_scrubs_log_records(keys_a, caplog):
    logger = logging.getLogger("cakep2p.test_redaction")
    redacting = redaction.RedactingFilter()
    logger.addFilter(redacting)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("code is %s", CODE_A)
    finally:
        logger.removeFilter(redacting)
    assert CODE_A not in caplog.text and "<redacted>" in caplog.text


def test_refusal_storm_from_one_peer_logs_one_line(caplog):
    limiter = curve._RefusalLogLimiter(interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="cakep2p.mesh.curve"):
        for port in range(40000, 40050):
            limiter.log(f"192.0.2.7:{port}", "wrong cluster code")
    assert len(caplog.records) == 1


def test_insecure_warning_says_traffic_is_unencrypted_and_open():
    warning = security.insecure_warning()
    assert "--insecure-open" in warning and "NOT encrypted" in warning and "debugging" in warning


# -- CURVE and ZAP on real sockets -------------------------------------------------------------------------------

def test_same_code_dealer_router_round_trip(context, cluster_server, keys_a):
    router, port = cluster_server
    dealer = connect_client(context, keys_a, f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([HEADER, PAYLOAD])
    assert echo_once(router) == [HEADER, PAYLOAD]
    assert dealer.poll(5000) and dealer.recv_multipart() == [HEADER, PAYLOAD]


def test_same_code_req_rep_round_trip(context, keys_a):
    authenticator = curve.Authenticator(context, keys_a)
    try:
        reply = context.socket(zmq.REP)
        curve.configure_server(reply, keys_a)
        port = reply.bind_to_random_port("tcp://127.0.0.1")
        request = connect_client(context, keys_a, f"tcp://127.0.0.1:{port}", zmq.REQ)
        request.send(b"ping")
        assert reply.poll(5000) and reply.recv() == b"ping"
        reply.send(b"pong")
        assert request.poll(5000) and request.recv() == b"pong"
    finally:
        authenticator.stop()


def test_other_code_client_is_refused_and_never_delivers(context, cluster_server, keys_b, refusals, caplog):
    router, port = cluster_server
    with caplog.at_level(logging.WARNING, logger="cakep2p.mesh.curve"):
        dealer = connect_client(context, keys_b, f"tcp://127.0.0.1:{port}")
        dealer.send_multipart([HEADER, PAYLOAD])
        wait_until(lambda: refusals, message="the refusal callback")
        assert router.poll(NO_DELIVERY_WINDOW_MS) == 0
    assert "refused connection from" in caplog.text and "wrong cluster code" in caplog.text


def test_refusal_log_names_no_code_or_key(context, cluster_server, keys_a, keys_b, refusals, caplog):
    router, port = cluster_server
    with caplog.at_level(logging.DEBUG):
        connect_client(context, keys_b, f"tcp://127.0.0.1:{port}").send(b"x")
        wait_until(lambda: refusals, message="the refusal callback")
    for secret in (CODE_A, CODE_B, keys_a.secret_key, keys_a.public_key, keys_b.secret_key, keys_b.public_key):
        assert (secret if isinstance(secret, str) else secret.decode()) not in caplog.text


def test_unencrypted_client_is_refused(context, cluster_server, refusals):
    router, port = cluster_server
    dealer = connect_client(context, None, f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([HEADER, PAYLOAD])
    wait_until(lambda: refusals, message="the refusal callback")
    assert router.poll(NO_DELIVERY_WINDOW_MS) == 0


def test_client_knowing_public_key_but_not_secret_is_refused_by_zap(context, cluster_server, keys_a, refusals,
                                                                     caplog):
    router, port = cluster_server
    public, secret = zmq.curve_keypair()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = keys_a.public_key, public, secret
    with caplog.at_level(logging.WARNING, logger="cakep2p.mesh.curve"):
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"let me in")
        wait_until(lambda: "127.0.0.1" in refusals, message="a refusal of 127.0.0.1")  # ZAP reports the bare IP
        assert router.poll(NO_DELIVERY_WINDOW_MS) == 0
    assert "CURVE client without the cluster key" in caplog.text


def test_member_still_served_while_stranger_is_refused(context, cluster_server, keys_a, keys_b, refusals):
    router, port = cluster_server
    connect_client(context, keys_b, f"tcp://127.0.0.1:{port}").send(b"stranger")
    wait_until(lambda: refusals, message="the refusal callback")
    member = connect_client(context, keys_a, f"tcp://127.0.0.1:{port}")
    member.send(b"member")
    assert echo_once(router) == [b"member"]


def test_insecure_open_null_round_trip(context):
    router = context.socket(zmq.ROUTER)
    curve.configure_server(router, None)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = connect_client(context, None, f"tcp://127.0.0.1:{port}")
    dealer.send(b"open")
    assert echo_once(router) == [b"open"]


def test_second_authenticator_on_same_context_raises_mesh_error(context, keys_a):
    first = curve.Authenticator(context, keys_a)
    try:
        with pytest.raises(MeshError, match="only one may run per zmq context"):
            curve.Authenticator(context, keys_a)
    finally:
        first.stop()


def test_authenticator_stop_ends_its_thread(context, keys_a):
    before = set(threading.enumerate())
    authenticator = curve.Authenticator(context, keys_a)
    authenticator.stop()
    authenticator.stop()
    assert set(threading.enumerate()) <= before


def test_watch_after_stop_raises_mesh_error(context, keys_a):
    authenticator = curve.Authenticator(context, keys_a)
    authenticator.stop()
    router = context.socket(zmq.ROUTER)
    with pytest.raises(MeshError, match="authenticator was stopped"):
        authenticator.watch(router)


def test_authenticator_works_on_asyncio_context(keys_a):
    import zmq.asyncio
    context = zmq.asyncio.Context()
    authenticator = curve.Authenticator(context, keys_a)
    sync_context = zmq.Context.shadow(context.underlying)   # its sockets are not closed by context.destroy()
    router = sync_context.socket(zmq.ROUTER)
    dealer = sync_context.socket(zmq.DEALER)
    try:
        curve.configure_server(router, keys_a)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        curve.configure_client(dealer, keys_a)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        assert echo_once(router) == [b"hello"]
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        authenticator.stop()
        context.destroy(linger=0)


# -- what a sniffer on the wire sees -----------------------------------------------------------------------------

def test_curve_traffic_through_proxy_is_ciphertext_both_ways(context, cluster_server, keys_a):
    router, port = cluster_server
    with SniffingProxy(port) as proxy:
        dealer = connect_client(context, keys_a, proxy.endpoint)
        dealer.send_multipart([HEADER, PAYLOAD])
        assert echo_once(router) == [HEADER, PAYLOAD]
        assert dealer.poll(5000) and dealer.recv_multipart() == [HEADER, PAYLOAD]
        assert len(proxy.to_server) > len(PAYLOAD) and len(proxy.to_client) > len(PAYLOAD)
        assert proxy.leaks([MARKER, *HEADER_FIELD_NAMES]) == []


def test_sniffer_sees_plaintext_when_insecure_open(context):
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    with SniffingProxy(port) as proxy:
        dealer = connect_client(context, None, proxy.endpoint)
        dealer.send_multipart([HEADER, PAYLOAD])
        assert echo_once(router) == [HEADER, PAYLOAD]
        assert dealer.poll(5000) and dealer.recv_multipart() == [HEADER, PAYLOAD]
        wait_until(lambda: MARKER in proxy.to_client, message="the reply through the proxy")
        assert MARKER in proxy.to_server and b'"op"' in proxy.to_server


def test_a_freshly_created_code_is_redacted_at_once(node_home):
    from cakep2p.redaction import redact
    from cakep2p.security import load_or_create_code

    code = load_or_create_code()
    assert code not in redact(f"the code is {code}")
