"""The API's edges: odd numbers, invalid Unicode, huge prompts and long stop strings get a 4xx (never a 500), a
refused stream is a 429 (never a 200 with an error inside), and a huge prompt does not stall /health."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest

from cakep2p.api import StopMatcher, create_app
from cakep2p.cluster import LocalModel
from tests.kit import wait_until
from tests.kit.api import GatedModel, serve

MODEL = "stories260K"


@pytest.fixture(scope="module")
def model(stories_model) -> LocalModel:
    return stories_model


@pytest.fixture(scope="module")
def url(model) -> Iterator[str]:
    with serve(create_app(model, max_sessions=2)) as base:
        yield base + "/v1"


def completion(url: str, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, **fields}
    return httpx.post(url + "/completions", json=body, timeout=60)


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, -1, -(2**63)])
def test_a_seed_outside_zero_to_two_to_the_63_is_a_422(url, seed):
    response = completion(url, seed=seed, temperature=1.0)
    assert response.status_code == 422 and response.json()["error"]["param"] == "seed"


def test_the_largest_seed_samples(url):
    assert completion(url, seed=2**63 - 1, temperature=1.0).status_code == 200


@pytest.mark.parametrize("route, field", [("/completions", "prompt"), ("/chat/completions", "messages")])
def test_a_lone_surrogate_is_a_400_not_a_500(url, route, field):
    text = '"Once upon a \\ud800 time"'
    value = text if field == "prompt" else f'[{{"role": "user", "content": {text}}}]'
    raw = f'{{"model": "{MODEL}", "max_tokens": 4, "{field}": {value}}}'.encode()
    response = httpx.post(url + route, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_unicode"


def test_a_tiny_temperature_is_greedy_and_an_infinite_one_is_a_422(url):
    greedy = completion(url, temperature=0, max_tokens=16)
    tiny = completion(url, temperature=1e-300, max_tokens=16, seed=7)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    raw = f'{{"model": "{MODEL}", "prompt": "Once", "temperature": 1e400}}'.encode()
    response = httpx.post(url + "/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "temperature"


def test_streams_refused_by_a_full_queue_get_429_not_200(model):
    gated = GatedModel(model)
    app = create_app(gated, max_sessions=1, max_waiting=1)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}

    def stream(base: str) -> tuple[int, str]:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
            return response.status_code, response.read().decode()

    with serve(app) as base, ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(stream, base) for _ in range(12)]
        wait_until(lambda: sum(future.done() for future in futures) == 10)  # one runs, one waits, ten refused
        gated.gate.set()
        results = [future.result(timeout=60) for future in futures]
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 2 + [429] * 10
    assert all('"error"' not in text for status, text in results if status == 200)


def test_health_answers_while_five_megabyte_prompts_arrive(url):
    prompt = "Once upon a time there was a little cat. " * 120_000   # ~5 MB of text, far beyond the context
    responses = []

    def send_big() -> None:
        for _ in range(8):
            responses.append(completion(url, prompt=prompt))

    sender = threading.Thread(target=send_big)
    sender.start()
    answered_while_busy, latencies = 0, []
    while sender.is_alive():
        asked = time.monotonic()
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - asked)
        answered_while_busy += sender.is_alive()
    sender.join()
    assert [response.status_code for response in responses] == [400] * 8   # refused: longer than the context
    assert {response.json()["error"]["code"] for response in responses} == {"context_length_exceeded"}
    assert answered_while_busy >= 1, latencies            # /health kept answering while the prompts were read
    print(f"/health latency during 5 MB prompts: max {max(latencies) * 1000:.0f} ms over {len(latencies)} calls")


@pytest.mark.timeout(60)
def test_stop_matching_is_linear_in_the_stop_strings_length():
    stop = "ab" * 20_000 + "c"                      # 40 kB: matched by prefix sizes per token, this took hours
    matcher = StopMatcher((stop,))
    emitted = []
    for _ in range(2000):
        text, stopped = matcher.push("ab" * 50)
        emitted.append(text)
        assert not stopped
    text, stopped = matcher.push("c")
    assert stopped and "".join(emitted) + text == "ab" * 80_000   # everything before the stop string


def test_stop_matcher_holds_back_only_a_possible_start_of_a_stop():
    matcher = StopMatcher(("<end>", "STOP"))
    assert matcher.push("Hello <e") == ("Hello ", False)
    assert matcher.push("nd-not really") == ("<end-not really", False)
    assert matcher.push(" ST") == (" ", False)
    assert matcher.push("OP and more") == ("", True)
