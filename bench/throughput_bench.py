"""Aggregate decode throughput of concurrent API streams on one node: 1 stream against N at once, side by side.

    .venv/bin/python bench/throughput_bench.py [--formats int8,bf16] [--streams 4] [--tokens 64] [--rounds 2]
                                               [--unbatched]

A random TinyLlama-shaped model (cakep2p.testing, cached outside the repository) is served by a real `cakep2p api`
process per format (--local, CPU, speculation off so that only batching is measured; --unbatched adds a server with
CAKEP2P_BATCH=0, each session alone as before batching). Each round runs the N prompts one after another (1 stream:
these are the solo texts), then all N at once through the streaming completions endpoint. Two aggregate figures, each
the same formula for 1 and N streams: decode (text pieces per second while every stream decodes, see decode_rate)
and end to end (completion tokens / wall time, prompts included). It prints the medians, the ratios, and whether
every concurrent stream's greedy text equals its solo run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPTS = ["Once upon a time there was", "The cat sat on the mat and", "In a small town far away",
           "She opened the door and saw", "Tom and his dog ran to", "Every morning the old man",
           "The rain stopped and the", "A little bird flew over"]


class Server:
    """`cakep2p api` on a free loopback port, stopped on exit."""

    def __init__(self, model: Path, weights: str, env: dict[str, str], sessions: int) -> None:
        command = [sys.executable, "-m", "cakep2p", "api", "--model", str(model), "--local", "--device", "cpu",
                   "--weights", weights, "--port", "0", "--max-sessions", str(sessions)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                        env={**os.environ, "CAKEP2P_SPECULATE": "0", **env})
        self.url = ""
        for line in self.process.stderr:
            found = re.search(r"http://\S+/v1", line)
            if "serving" in line and found:
                self.url = found.group(0)
                break
        if not self.url:
            raise SystemExit(f"cakep2p api exited with {self.process.wait()} before serving")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        self.process.wait(30)


def stream(url: str, model: str, prompt: str, tokens: int) -> tuple[str, int, list[float]]:
    """One streamed greedy completion: its text, completion tokens and the arrival time of each text piece."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, produced, arrivals = [], 0, []
    with httpx.stream("POST", url + "/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            pieces = [choice["text"] for choice in chunk.get("choices", []) if choice["text"]]
            text += pieces
            arrivals += [time.perf_counter()] * bool(pieces)
            if chunk.get("usage"):
                produced = chunk["usage"]["completion_tokens"]
    return "".join(text), produced, arrivals


def decode_rate(streams: list[tuple[str, int, list[float]]]) -> float:
    """Text pieces per second while every stream decodes: from the last stream's first piece (every prompt has run)
    to the first stream's last one; one stream: its first piece to its last (the pieces are tokens, or fewer)."""
    start = max(arrivals[0] for _, _, arrivals in streams)
    end = min(arrivals[-1] for _, _, arrivals in streams)
    pieces = sum(sum(start < moment <= end for moment in arrivals) for _, _, arrivals in streams)
    return pieces / (end - start)


def one_round(url: str, model: str, prompts: list[str], tokens: int) -> dict:
    start = time.perf_counter()
    solo = [stream(url, model, prompt, tokens) for prompt in prompts]
    solo_s = time.perf_counter() - start
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        start = time.perf_counter()
        together = list(pool.map(lambda prompt: stream(url, model, prompt, tokens), prompts))
        together_s = time.perf_counter() - start
    return {"solo_tok_s": sum(n for _, n, _ in solo) / solo_s,
            "together_tok_s": sum(n for _, n, _ in together) / together_s,
            "solo_decode": statistics.mean(decode_rate([one]) for one in solo), "together_decode": decode_rate(together),
            "tokens": [n for _, n, _ in together], "identical": [a[0] == b[0] for a, b in zip(solo, together)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int8", help="weight formats, comma-separated (default int8)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--unbatched", action="store_true", help="also serve with CAKEP2P_BATCH=0 (as before)")
    args = parser.parse_args()
    from cakep2p.testing import cached_random_model

    model_dir = cached_random_model("llama", "tinyllama", dtype="bfloat16")
    prompts = PROMPTS[:args.streams]
    modes = [("batched", {})] + ([("unbatched", {"CAKEP2P_BATCH": "0"})] if args.unbatched else [])
    print(f"TinyLlama shape, random weights, 1 node, {os.cpu_count()} CPUs, {args.streams} streams x "
          f"{args.tokens} tokens, {args.rounds} rounds (medians)")
    everything_identical = True
    for weights in args.formats.split(","):
        for mode, env in modes:
            with Server(model_dir, weights, env, args.streams) as server:
                name = httpx.get(server.url + "/models", timeout=30).json()["data"][0]["id"]
                stream(server.url, name, prompts[0], 4)   # warm up
                rounds = [one_round(server.url, name, prompts, args.tokens) for _ in range(args.rounds)]
            identical = all(all(r["identical"]) for r in rounds)
            everything_identical &= identical
            print(f"{weights} {mode}: each stream's text == its solo run: {identical}; tokens per stream "
                  f"{rounds[-1]['tokens']}")
            for label, key in (("decode", "decode"), ("end to end", "tok_s")):
                solo = statistics.median(r[f"solo_{key}"] for r in rounds)
                together = statistics.median(r[f"together_{key}"] for r in rounds)
                print(f"  {label:10}  1 stream {solo:6.2f} tok/s   {args.streams} streams {together:6.2f} tok/s "
                      f"aggregate   ratio {together / solo:4.2f}x")
    return 0 if everything_identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
