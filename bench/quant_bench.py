"""Quantized weights against llama.cpp on the same shape: decode and prefill tok/s, side by side, in alternation.

    .venv/bin/python bench/quant_bench.py [--formats bf16,f32,int8,int4] [--threads 2] [--rounds 3]
                                          [--llama-python ~/.cache/cakep2p/bench-venv/bin/python] [--emulate-avx2]

A random TinyLlama-shaped model (hidden 2048, 22 layers, 32/4 heads, FFN 5632, vocab 32000) is made once and
cached outside the repository (cakep2p.testing; GGUFs of the same shape for llama.cpp next to it). Each round runs
every pair once: ours in a format, then llama.cpp in the nearest one (bf16 ~ F16, int8 ~ Q8_0, int4 ~ Q4_0), each in
a fresh process with the same threads, a 32-token prompt (prefill) and 64 new tokens (decode). It prints the
medians, the ratios, and each format's peak RSS against its weight bytes.

llama.cpp comes from llama-cpp-python, a bench-only dependency built from source
(CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python, about 15 minutes on 2 cores, in a venv outside the
repository); without it the bench times ours alone and says so. --emulate-avx2 runs our side as on a CPU without
AVX-512 or bf16 hardware (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS); llama.cpp keeps the
CPU it was built for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NEAREST = {"bf16": "F16", "f16": "F16", "f32": "F16", "int8": "Q8_0", "int4": "Q4_0"}
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
DEFAULT_LLAMA_PYTHON = Path.home() / ".cache" / "cakep2p" / "bench-venv" / "bin" / "python"
SHAPE = dict(hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt_ids(count: int, vocab: int) -> list[int]:
    return [1] + [300 + (index * 37) % (vocab - 400) for index in range(count - 1)]


# -- the two sides, each in its own process -------------------------------------------------------------------

def ours(weights: str, threads: int, prompt_len: int, new_tokens: int) -> dict:
    import torch

    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.loading import load_part, whole_model
    from cakep2p.testing import cached_random_model

    torch.set_num_threads(threads)
    checkpoint = Checkpoint.open(cached_random_model("llama", "tinyllama", dtype="bfloat16"))
    base = current_rss()
    began = time.perf_counter()
    part = load_part(checkpoint, whole_model(checkpoint.args), device="cpu", weights=weights)
    load_s = time.perf_counter() - began
    cache = part.new_cache(prompt_len + new_tokens)
    prompt = torch.tensor(prompt_ids(prompt_len, checkpoint.args.vocab_size))
    with torch.no_grad():
        part(prompt[:4], 0, part.new_cache(8), last_only=True)   # warm up both kernel paths
        part(prompt[:1], 0, part.new_cache(8), last_only=True)
        began = time.perf_counter()
        part(prompt, 0, cache, last_only=True)
        prefilled = time.perf_counter()
        for position in range(prompt_len, prompt_len + new_tokens):
            part(torch.tensor([1000]), position, cache, last_only=True)
        decoded = time.perf_counter()
    return {"prefill_tok_s": prompt_len / (prefilled - began), "decode_tok_s": new_tokens / (decoded - prefilled),
            "load_s": load_s, "weight_bytes": part.weight_bytes, "peak_rss": peak_rss(), "base_rss": base,
            "kernel": part.kernel, "capability": torch.backends.cpu.get_cpu_capability()}


def llama(path: Path, threads: int, prompt_len: int, new_tokens: int, plain_buffers: bool) -> dict:
    import llama_cpp

    if plain_buffers:  # llama.cpp's AMX and repacked buffers crash on some VMs: plain CPU buffers then
        default = llama_cpp.llama_cpp.llama_model_default_params

        def plain():
            params = default()
            params.use_extra_bufts = False
            return params
        llama_cpp.llama_cpp.llama_model_default_params = plain
    model = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                            n_batch=512, verbose=False)
    prompt = prompt_ids(prompt_len, SHAPE["vocab"])
    model.eval(prompt[:4])
    model.reset()
    began = time.perf_counter()
    model.eval(prompt)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        model.eval([1000])
    decoded = time.perf_counter()
    return {"prefill_tok_s": prompt_len / (prefilled - began), "decode_tok_s": new_tokens / (decoded - prefilled),
            "file_bytes": path.stat().st_size, "peak_rss": peak_rss(),
            "buffers": "plain" if plain_buffers else "default"}


# -- llama.cpp's files ----------------------------------------------------------------------------------------

def gguf_path(qtype: str) -> Path:
    from cakep2p.testing import model_cache_root

    return model_cache_root() / f"tinyllama-shape-random-{qtype}.gguf"


def write_gguf(qtype: str) -> Path:
    """A llama GGUF of the TinyLlama shape with random weights and a synthetic SentencePiece vocabulary."""
    import gguf
    import numpy as np

    path = gguf_path(qtype)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    hidden, ffn, heads, kv_heads, vocab = (SHAPE[key] for key in ("hidden", "ffn", "heads", "kv_heads", "vocab"))
    for add, value in ((writer.add_context_length, 2048), (writer.add_embedding_length, hidden),
                       (writer.add_block_count, SHAPE["layers"]), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                       (writer.add_rope_dimension_count, hidden // heads), (writer.add_rope_freq_base, 10000.0),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_vocab_size, vocab)):
        add(value)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    tokens += [f"\u2581t{index}" for index in range(vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(index) for index in range(vocab)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def matrix(rows: int, cols: int):
        values = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        return values.astype(np.float16) if qtype == "F16" else gguf.quants.quantize(values, kind)

    def add_matrix(name: str, values) -> None:
        writer.add_tensor(name, values, raw_dtype=kind if values.dtype == np.uint8 else None)

    head_dim, ones = hidden // heads, np.ones(hidden, dtype=np.float32)
    add_matrix("token_embd.weight", matrix(vocab, hidden))
    for layer in range(SHAPE["layers"]):   # fresh weights per layer: nothing shared in the caches
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
        for name, rows, cols in (("attn_q", heads * head_dim, hidden), ("attn_k", kv_heads * head_dim, hidden),
                                 ("attn_v", kv_heads * head_dim, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            add_matrix(f"blk.{layer}.{name}.weight", matrix(rows, cols))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
    writer.add_tensor("output_norm.weight", ones)
    add_matrix("output.weight", matrix(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(path) + ".tmp", path)
    return path


# -- the driver -------------------------------------------------------------------------------------------------

def run_worker(command: list[str], env: dict | None = None) -> dict | None:
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=1800)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_llama(options: argparse.Namespace, qtype: str, buffers: dict[str, bool]) -> dict | None:
    """One llama.cpp run, with the buffers that worked before (default first, plain CPU buffers if it crashes)."""
    for plain in ([buffers[qtype]] if qtype in buffers else [False, True]):
        command = [str(options.llama_python), __file__, "--worker", "llama", "--path", str(gguf_path(qtype)),
                   "--threads", str(options.threads), "--prompt", str(options.prompt), "--new", str(options.new)]
        result = run_worker(command + (["--plain-buffers"] if plain else []))
        if result is not None:
            buffers[qtype] = plain
            return result
    return None


def llama_available(python: Path) -> bool:
    if not python.is_file():
        return False
    return subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0


def report(options: argparse.Namespace, ours_runs: dict, llama_runs: dict) -> None:
    first = next(iter(ours_runs.values()))[0]
    print(f"\nCPU capability {first['capability']}, {options.threads} threads, prompt {options.prompt}, "
          f"{options.new} new tokens, medians of {options.rounds} rounds")
    print(f"{'format':7} {'kernel':32} {'decode tok/s':>22} {'prefill tok/s':>22} {'peak RSS / weights':>20}")
    for weights, runs in ours_runs.items():
        qtype = NEAREST[weights]
        decode = statistics.median(run["decode_tok_s"] for run in runs)
        prefill = statistics.median(run["prefill_tok_s"] for run in runs)
        rss = max(run["peak_rss"] - run["base_rss"] for run in runs)
        theirs = llama_runs.get(qtype) or []
        if theirs:
            their_decode = statistics.median(run["decode_tok_s"] for run in theirs)
            their_prefill = statistics.median(run["prefill_tok_s"] for run in theirs)
            decode_text = f"{decode:6.2f} / {their_decode:5.2f} = {decode / their_decode:4.2f}x"
            prefill_text = f"{prefill:6.1f} / {their_prefill:5.1f} = {prefill / their_prefill:4.2f}x"
        else:
            decode_text, prefill_text = f"{decode:6.2f}", f"{prefill:6.1f}"
        print(f"{weights:7} {runs[0]['kernel'][:32]:32} {decode_text:>22} {prefill_text:>22} "
              f"{rss / 2**20:7.0f} / {runs[0]['weight_bytes'] / 2**20:5.0f} MiB = {rss / runs[0]['weight_bytes']:4.2f}x")
    if llama_runs:
        print("(ours / llama.cpp " + ", ".join(f"{weights} vs {NEAREST[weights]}" for weights in ours_runs) + ")")
    for sixteen in ("bf16", "f16"):
        if sixteen in ours_runs and "f32" in ours_runs:   # the 16-bit path must not lose to float32
            ratios = [statistics.median(run[key] for run in ours_runs[sixteen])
                      / statistics.median(run[key] for run in ours_runs["f32"]) for key in ("decode_tok_s", "prefill_tok_s")]
            print(f"{sixteen} / f32: decode {ratios[0]:.2f}x, prefill {ratios[1]:.2f}x ({ours_runs[sixteen][0]['kernel']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="bf16,f32,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--llama-python", type=Path, default=DEFAULT_LLAMA_PYTHON)
    parser.add_argument("--emulate-avx2", action="store_true")
    parser.add_argument("--worker", choices=("ours", "llama"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain-buffers", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker == "ours":
        print(json.dumps(ours(options.weights, options.threads, options.prompt, options.new)))
        return
    if options.worker == "llama":
        print(json.dumps(llama(options.path, options.threads, options.prompt, options.new, options.plain_buffers)))
        return
    formats = options.formats.split(",")
    with_llama = llama_available(options.llama_python)
    if not with_llama:
        print(f"llama.cpp: not timed: {options.llama_python} cannot import llama_cpp (build it with "
              "CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python in a venv outside the repository, then "
              "pass --llama-python)")
    from cakep2p.testing import cached_random_model

    began = time.perf_counter()
    cached_random_model("llama", "tinyllama", dtype="bfloat16")
    for qtype in sorted({NEAREST[weights] for weights in formats}) if with_llama else ():
        write_gguf(qtype)
    print(f"models ready in {time.perf_counter() - began:.0f} s")
    env = {**AVX2, "CAKEP2P_PACK": os.environ.get("CAKEP2P_PACK", "1")} if options.emulate_avx2 else {}
    ours_runs: dict[str, list] = {weights: [] for weights in formats}
    llama_runs: dict[str, list] = {}
    buffers: dict[str, bool] = {}
    for round_number in range(options.rounds):
        for weights in formats:
            command = [sys.executable, __file__, "--worker", "ours", "--weights", weights, "--threads",
                       str(options.threads), "--prompt", str(options.prompt), "--new", str(options.new)]
            run = run_worker(command, env)
            if run is None:
                raise SystemExit(f"our {weights} run failed: rerun `{' '.join(command)}` to see why")
            ours_runs[weights].append(run)
            line = f"round {round_number + 1} {weights}: decode {run['decode_tok_s']:.2f}, prefill {run['prefill_tok_s']:.1f}"
            if with_llama:
                theirs = time_llama(options, NEAREST[weights], buffers)
                if theirs is not None:
                    llama_runs.setdefault(NEAREST[weights], []).append(theirs)
                    line += (f" | llama.cpp {NEAREST[weights]}: decode {theirs['decode_tok_s']:.2f}, "
                             f"prefill {theirs['prefill_tok_s']:.1f} ({theirs['buffers']} buffers)")
            print(line, flush=True)
    report(options, ours_runs, llama_runs)


if __name__ == "__main__":
    main()
