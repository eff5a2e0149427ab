"""The OpenAI-compatible API, driven by the real `openai` client against a live uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import openai
import pytest

from cakep2p.api import StopMatcher, create_app
from cakep2p.cluster import LocalModel
from tests.kit import ApiProcess, child_env, reference_rows, wait_until
from tests.kit.api import GatedModel, greedy_chat, serve, stage_sessions
from tests.kit.leaks import threads_ended

MODEL = "stories260K"
STORY_REQUEST = [{"role": "system", "content": "You tell short stories."},
                 {"role": "user", "content": "Tell me a story about a cat."}]

@pytest.fixture(autouse=True)
def no_generation_left_running() -> Iterator[None]:
    """Fail a test that leaves a generation thread behind (the module's server starts threads of its own lazily)."""
    with threads_ended(lambda thread: thread.name == "cakep2p-api-generation"):
        yield


@pytest.fixture(scope="module")
def model(stories_model) -> LocalModel:
    return stories_model


@pytest.fixture(scope="module")
def reference(stories_dir) -> dict:
    return {entry["prompt"]: entry for entry in reference_rows(stories_dir)}


@pytest.fixture(scope="module")
def server(model) -> Iterator[tuple[str, object]]:
    app = create_app(model, max_sessions=4)
    with serve(app) as url:
        yield url, app


@pytest.fixture
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60) as openai_client:
        yield openai_client


def post(url: str, path: str, body: object, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=60)


# ---------------------------------------------------------------- output equals the greedy reference


def test_models_lists_the_served_model(client):
    assert [card.id for card in client.models.list().data] == [MODEL]


def test_completion_matches_reference_text(client, reference):
    expected = reference["Once upon a time"]
    result = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64, temperature=0)
    assert result.choices[0].text == expected["text"]
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        len(expected["prompt_token_ids"]), 64, len(expected["prompt_token_ids"]) + 64)


def test_streamed_completion_matches_reference_text(client, reference):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64, temperature=0,
                                            stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == reference["Once upon a time"]["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_of_token_ids_with_echo_repeats_the_prompt(client, reference):
    expected = reference["Lily and Ben"]
    result = client.completions.create(model=MODEL, prompt=expected["prompt_token_ids"], max_tokens=64,
                                       temperature=0, echo=True)
    assert result.choices[0].text == expected["full_text"]


def test_chat_completion_matches_single_node_greedy(client, model):
    expected = greedy_chat(model, STORY_REQUEST, 48)
    result = client.chat.completions.create(model=MODEL, messages=STORY_REQUEST, max_tokens=48, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected.text
    assert result.choices[0].finish_reason == expected.finish_reason
    assert result.usage.prompt_tokens == expected.prompt_tokens
    assert result.usage.completion_tokens == expected.completion_tokens == 48
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streamed_chat_matches_greedy_with_role_first_and_usage_last(client, model):
    expected = greedy_chat(model, STORY_REQUEST, 48)
    chunks = list(client.chat.completions.create(model=MODEL, messages=STORY_REQUEST, max_tokens=48, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        expected.prompt_tokens, expected.completion_tokens)


def test_stream_ends_with_done_event(server):
    body = {"model": MODEL, "messages": STORY_REQUEST, "max_tokens": 8, "temperature": 0, "stream": True}
    response = post(server[0], "/v1/chat/completions", body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------- stop sequences


@pytest.mark.parametrize("pieces, stops, emitted, stopped", [
    (["Once", " up", "on"], ("upon",), "Once ", True),
    (["a b", "c", "d"], ("bcd", "cx"), "a ", True),
    (["ab", "x"], ("abc",), "abx", False),
    (["no stop here"], ("zz",), "no stop here", False),
])
def test_stop_matcher_cuts_at_first_stop_string_across_pieces(pieces, stops, emitted, stopped):
    matcher = StopMatcher(stops)
    text, hit = "", False
    for piece in pieces:
        chunk, hit = matcher.push(piece)
        text += chunk
        if hit:
            break
    if not hit:
        text += matcher.flush()
    assert (text, hit) == (emitted, stopped)


def test_stop_sequence_ends_completion_before_it(client, reference):
    full = reference["Once upon a time"]["text"]
    result = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64, temperature=0,
                                       stop=[" park", "zebra"])
    assert result.choices[0].text == full[: full.index(" park")]
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < 64


def test_stop_sequence_ends_streamed_chat_before_it(client, model):
    expected = greedy_chat(model, STORY_REQUEST, 48).text
    stop = expected[10:14]
    chunks = list(client.chat.completions.create(model=MODEL, messages=STORY_REQUEST, max_tokens=48, temperature=0,
                                                 stream=True, stop=stop))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected[: expected.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- concurrency and cancellation


def _stream_completion_text(url: str, prompt: str) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as own_client:
        stream = own_client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream)


def test_two_concurrent_streams_both_complete_correctly(model, reference):
    gated = GatedModel(model)
    app = create_app(gated, max_sessions=2)
    prompts = ["Once upon a time", "Lily and Ben"]
    with serve(app) as url, ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_stream_completion_text, url, prompt) for prompt in prompts]
        wait_until(lambda: app.state.sessions.snapshot()["open"] == 2)  # both sessions mid-stream at once
        gated.gate.set()
        texts = [future.result(timeout=60) for future in futures]
    assert texts == [reference[prompt]["text"] for prompt in prompts]
    assert gated.opened == gated.closed == 2


def test_requests_beyond_the_session_cap_wait_and_all_complete(model, reference):
    gated = GatedModel(model)
    app = create_app(gated, max_sessions=1)
    prompts = ["Once upon a time", "Lily and Ben", "Once upon a time"]
    with serve(app) as url, ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(_stream_completion_text, url, prompt) for prompt in prompts]
        wait_until(lambda: app.state.sessions.snapshot()["waiting"] == 2)  # one runs, two queue
        assert app.state.sessions.snapshot()["open"] == 1
        gated.gate.set()
        texts = [future.result(timeout=60) for future in futures]
    assert texts == [reference[prompt]["text"] for prompt in prompts]
    assert app.state.sessions.snapshot()["finished"] == {"length": 3}


def test_disconnect_mid_stream_cancels_generation_and_frees_the_session(model):
    gated = GatedModel(model)
    app = create_app(gated)
    sessions = app.state.sessions
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with serve(app) as url:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as response:
                first = next(line for line in response.iter_lines() if line.startswith("data: "))
                assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
                assert sessions.snapshot()["open"] == 1
        # The pipeline pauses before its third token, so the disconnect is noticed before the reply can end.
        wait_until(lambda: sessions.snapshot()["cancelling"] == 1 or sessions.snapshot()["finished"])
        gated.gate.set()
        wait_until(lambda: sessions.snapshot()["open"] == 0)
    assert sessions.snapshot()["finished"] == {"cancelled": 1}
    assert gated.opened == gated.closed == 1
    assert gated.forwards <= 3


def test_disconnect_while_waiting_for_a_whole_reply_cancels_it(model):
    gated = GatedModel(model)
    app = create_app(gated)
    sessions = app.state.sessions
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}).encode()
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: gated.forwards >= 2)  # generating, paused before the third token
        wait_until(lambda: sessions.snapshot()["cancelling"] == 1 or sessions.snapshot()["finished"])
        gated.gate.set()
        wait_until(lambda: sessions.snapshot()["open"] == 0)
    assert sessions.snapshot()["finished"] == {"cancelled": 1}
    assert gated.opened == gated.closed == 1


def test_lost_peer_mid_stream_sends_an_error_event_and_frees_the_session(model):
    failing = GatedModel(model, fail_at=3)
    app = create_app(failing)
    body = {"model": MODEL, "messages": STORY_REQUEST, "max_tokens": 40, "temperature": 0, "stream": True}
    with serve(app) as url:
        events = [line for line in post(url, "/v1/chat/completions", body).text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert "peer 192.0.2.7" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]
    assert app.state.sessions.snapshot()["finished"] == {"error": 1}
    assert failing.opened == failing.closed == 1


def test_lost_peer_gives_a_503_json_error(model):
    app = create_app(GatedModel(model, fail_at=1))
    with serve(app) as url:
        response = post(url, "/v1/chat/completions", {"model": MODEL, "messages": STORY_REQUEST})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"


# ---------------------------------------------------------------- errors


def test_missing_or_wrong_api_key_is_401(model):
    app = create_app(model, api_key="sesame")
    with serve(app) as url:
        for key in ("wrong", "sesame"):
            with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as keyed:
                if key == "wrong":
                    with pytest.raises(openai.AuthenticationError):
                        keyed.models.list()
                else:
                    assert keyed.models.list().data[0].id == MODEL
        response = httpx.get(url + "/v1/models")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=STORY_REQUEST)
    assert error.value.body["code"] == "model_not_found"


def test_unknown_path_is_404_json(server):
    response = httpx.get(server[0] + "/v1/engines")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ([1, 2], 400, None),
    ({"model": MODEL, "messages": STORY_REQUEST, "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL, "messages": STORY_REQUEST, "n": 2}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "cat " * 600}]}, 400, "messages"),
    ({"model": MODEL}, 422, "messages"),
    ({"messages": STORY_REQUEST}, 422, "model"),
    ({"model": 7, "messages": STORY_REQUEST}, 422, "model"),
    ({"model": MODEL, "messages": []}, 422, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages[0].role"),
    ({"model": MODEL, "messages": STORY_REQUEST, "temperature": 5}, 422, "temperature"),
    ({"model": MODEL, "messages": STORY_REQUEST, "max_tokens": "many"}, 422, "max_tokens"),
    ({"model": MODEL, "messages": STORY_REQUEST, "stop": ["a", ""]}, 422, "stop"),
    ({"model": MODEL, "messages": STORY_REQUEST, "stream": "yes"}, 422, "stream"),
])
def test_bad_chat_body_gets_openai_style_error(server, body, status, param):
    response = post(server[0], "/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_bad_completion_prompt_is_422(client):
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt=[[1, 99999]], max_tokens=4)


def test_cluster_status_shows_model_and_sessions(server):
    status = httpx.get(server[0] + "/v1/cluster").json()
    assert status["model"]["name"] == MODEL
    assert status["sessions"]["open"] == 0 and status["sessions"]["max"] == 4


# ---------------------------------------------------------------- the `cakep2p api` command


def test_api_command_refuses_a_public_host_without_key(stories_dir, capsys):
    from cakep2p.cli import main

    assert main(["api", "--model", str(stories_dir), "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("cakep2p: error: --host 0.0.0.0") and "--api-key" in error and "\n" not in error


@pytest.mark.slow
def test_api_command_serves_on_loopback_until_interrupted(stories_dir, tmp_path):
    with ApiProcess(["--model", str(stories_dir), "--local", "--device", "cpu", "--port", "0"],
                    child_env(tmp_path)) as api:
        url = api.url()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url), url
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()["model"] == MODEL
        api.stop(signal.SIGINT)
        assert api.process.wait(timeout=30) in (0, 130)
    assert "Traceback" not in api.output()


# ---------------------------------------------------------------- over a real cluster


@pytest.fixture(scope="module")
def cluster_api(stories_dir, tmp_path_factory) -> Iterator[tuple[str, list, object]]:
    """Two `cakep2p --serve` nodes holding every layer, and `cakep2p api` as the initiator on 127.0.0.1."""
    from cakep2p.security import derive_keys, new_code
    from tests.kit.cluster import INITIATOR_MEMORY, initiator_env, serve_nodes

    tmp_path, code = tmp_path_factory.mktemp("cluster-api"), new_code()
    with serve_nodes(tmp_path, code, ["alpha", "beta"]) as nodes:
        arguments = ["--model", str(stories_dir), "--interface", "127.0.0.1", "--max-memory", INITIATOR_MEMORY,
                     "--port", "0"]
        with ApiProcess(arguments, initiator_env(tmp_path / "home-api", code)) as api:
            yield api.url(), nodes, derive_keys(code)


@pytest.mark.slow
def test_cluster_streamed_chat_matches_single_node_greedy(cluster_api, model):
    url, nodes, keys = cluster_api
    status = httpx.get(url + "/cluster", timeout=30).json()
    assert {stage["name"] for stage in status["model"]["stages"]} >= {"alpha", "beta"}
    assert {peer["name"] for peer in status["cluster"]["peers"]} >= {"alpha", "beta"}
    expected = greedy_chat(model, STORY_REQUEST, 48)
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60) as cluster_client:
        chunks = list(cluster_client.chat.completions.create(
            model=MODEL, messages=STORY_REQUEST, max_tokens=48, temperature=0, stream=True,
            stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


@pytest.mark.slow
def test_cluster_two_concurrent_streams_both_complete_correctly(cluster_api, reference):
    prompts = ["Once upon a time", "Lily and Ben"]
    base = cluster_api[0].removesuffix("/v1")
    with ThreadPoolExecutor(max_workers=2) as pool:
        texts = list(pool.map(lambda prompt: _stream_completion_text(base, prompt), prompts))
    assert texts == [reference[prompt]["text"] for prompt in prompts]


@pytest.mark.slow
def test_cluster_disconnect_mid_stream_frees_the_session_on_every_stage(cluster_api):
    url, nodes, keys = cluster_api
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/completions", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
    wait_until(lambda: httpx.get(url + "/cluster", timeout=30).json()["sessions"]["open"] == 0, 60)
    finished = httpx.get(url + "/cluster", timeout=30).json()["sessions"]["finished"]
    assert finished.get("cancelled", 0) + finished.get("length", 0) >= 1
    assert [stage_sessions(node, keys) for node in nodes] == [0, 0]


def test_requests_beyond_the_waiting_cap_get_429(model, reference):
    gated = GatedModel(model)
    app = create_app(gated, max_sessions=1, max_waiting=1)
    prompts = ["Once upon a time", "Lily and Ben"]
    with serve(app) as url, ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_stream_completion_text, url, prompt) for prompt in prompts]
        wait_until(lambda: app.state.sessions.snapshot()["waiting"] == 1)  # one runs, one waits: the cap
        whole = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4})
        streamed = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True})
        gated.gate.set()
        texts = [future.result(timeout=60) for future in futures]
    for refused in (whole, streamed):
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert texts == [reference[prompt]["text"] for prompt in prompts]
    assert app.state.sessions.snapshot()["finished"] == {"length": 2}
