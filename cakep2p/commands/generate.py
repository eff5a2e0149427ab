"""`cakep2p generate`: complete one prompt and stream the text to stdout (or print one JSON object)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Callable, TextIO

from cakep2p.commands.options import (add_cluster_options, add_model_options, load_model, open_checkpoint,
                                      positive_int, print_notice, sampling_from_args, seed_number)
from cakep2p.errors import CakeError

if TYPE_CHECKING:  # the engine imports torch; this module must stay cheap to import for `cakep2p --help`
    from cakep2p.cluster import LoadedModel
    from cakep2p.engine.conversation import Reply
    from cakep2p.engine.generate import LocalPipeline, Pipeline
    from cakep2p.engine.sampling import SamplingParams
    from cakep2p.engine.tokenizer import Tokenizer
    from cakep2p.mesh import RemotePipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue (or the user message with --chat)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                        help="stop after N new tokens, N >= 1 (default 128)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="0 = greedy (default: the model's generation_config.json, greedy when it has none)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: smallest set with mass >= P")
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="> 1 discourages repeats")
    parser.add_argument("--seed", type=seed_number, default=None, metavar="S", help="seed for reproducible sampling")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message (implies --chat)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object: prompt_tokens, tokens, text, ttft_s, tokens_per_s, plan '
                             '(null on one machine), stages (where each ran, its weights\' source, its seconds)')
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only the text (or the JSON): no notes and no summary line on stderr")
    add_cluster_options(parser)


def check_device(device: str) -> None:
    """Refuse a device name torch does not know, or one this machine lacks, before loading anything."""
    import torch

    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CakeError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise CakeError(f"device {device!r} is not available on this machine; use --device auto or cpu")


def prompt_ids(tokenizer: "Tokenizer", args: argparse.Namespace) -> list[int]:
    """The prompt as token ids: plain text with the model's bos, or a chat rendered by its template."""
    if not (args.chat or args.system is not None):
        return tokenizer.encode(args.prompt)
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages.append({"role": "user", "content": args.prompt})
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def complete(pipeline: "Pipeline", tokenizer: "Tokenizer", args: argparse.Namespace, params: "SamplingParams",
             on_text: Callable[[str], None] = lambda text: None) -> "Reply":
    """Run one request; `on_text` receives each whole-character chunk as soon as it is decoded."""
    from cakep2p.engine.conversation import Reply, stream_completion

    prompt = prompt_ids(tokenizer, args)
    if not prompt:
        raise CakeError("the prompt is empty and the model adds no bos token; pass some text with --prompt")
    reply = Reply()
    for event in stream_completion(pipeline, tokenizer, prompt, params, reply):
        if event.text:
            on_text(event.text)
    return reply


def reply_json(reply: "Reply") -> dict:
    """What --json prints of the reply itself."""
    return {"prompt_tokens": reply.prompt_ids, "tokens": reply.token_ids, "text": reply.text,
            "ttft_s": round(reply.ttft_s, 6), "tokens_per_s": round(reply.tokens_per_s, 3),
            "finish_reason": reply.finish_reason, "context_full": reply.context_full}


def _stream_to(out: TextIO) -> Callable[[str], None]:
    def write(chunk: str) -> None:
        out.write(chunk)
        out.flush()
    return write


def cluster_report(model: "LoadedModel", pipeline: "LocalPipeline | RemotePipeline") -> dict:
    """What --json adds: the plan (None on one machine) and, per pipeline stage, where it ran, the source of its
    weights (local, memory, cache, models_dir, transfer) and the seconds spent in it; plus any notices."""
    from cakep2p.engine.model import ModelPart

    stage_seconds = list(pipeline.stage_seconds)
    sources = list(pipeline.load_sources)
    stages = []
    for stage, source, seconds in zip(pipeline.stages, sources, stage_seconds):
        where = {"name": "local", "address": None, "port": None} if isinstance(stage, ModelPart) \
            else {"name": stage.name, "address": stage.address, "port": stage.port}
        stages.append({**where, "start": stage.layers.start, "end": stage.layers.end,
                       "embedding": stage.layers.has_embedding, "head": stage.layers.has_head,
                       "source": source, "seconds": round(seconds, 6)})
    described = model.describe()
    return {"plan": model.plan.to_json() if model.plan is not None else None, "stages": stages,
            "stage_seconds": [round(seconds, 6) for seconds in stage_seconds], "load_sources": sources,
            "weights": described.get("weights", ""), "kernel": described.get("kernel", ""),
            "dtype": described.get("dtype", ""), "notices": list(model.notices)}


def where_it_ran(model: "LoadedModel") -> str:
    """`1 node · int4 weights, int4pack (AVX2)`: how many machines held layers of this answer, and
    in which weight format and kernel."""
    count = len([stage for stage in model.plan.stages if stage.layers.num_layers]) if model.plan is not None else 1
    described = model.describe()
    nodes = f"{max(count, 1)} node{'' if count <= 1 else 's'}"
    if not described.get("weights"):
        return nodes
    kernel = f", {described['kernel']}" if described.get("kernel") else ""
    return f"{nodes} · {described['weights']} weights{kernel}"


def report(reply: "Reply", model: "LoadedModel") -> None:
    """The summary line on stderr (tokens, first token, tok/s, nodes, how it ended), and what to do about an answer
    that stopped at the end of the context."""
    print(f"cakep2p: {reply.summary(where_it_ran(model))}", file=sys.stderr, flush=True)
    if reply.context_full:
        limit = model.args.max_position_embeddings
        fix = (f"pass a larger --context (this model allows up to {limit})" if model.max_seq_len < limit
               else "this is the model's whole context: shorten the prompt")
        print_notice(f"the answer stopped at the end of the context ({model.max_seq_len} tokens): {fix}")


def run(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args)  # model problems fail here, before any peer is contacted
    check_device(args.device)
    params = sampling_from_args(args, checkpoint)  # and bad flags too
    model = load_model(args, checkpoint)
    pipeline = None
    try:
        pipeline = model.new_pipeline()
        if args.json:
            reply = complete(pipeline, model.tokenizer, args, params)
            print(json.dumps({**reply_json(reply), **cluster_report(model, pipeline)}, ensure_ascii=False))
        else:
            reply = complete(pipeline, model.tokenizer, args, params, on_text=_stream_to(sys.stdout))
            sys.stdout.write("\n")
            sys.stdout.flush()
        if not args.quiet:
            report(reply, model)
    except BrokenPipeError:  # `cakep2p generate ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if pipeline is not None:
            pipeline.close()
        model.close()
    return 0
