"""`cakep2p chat`: an interactive chat in the terminal, streamed; /reset, /exit; Ctrl-C stops the answer."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, TextIO

from cakep2p.commands.options import (add_cluster_options, add_model_options, load_model, sampling_from_args,
                                      seed_number)
from cakep2p.errors import CakeError

if TYPE_CHECKING:
    from cakep2p.engine.conversation import Conversation
    from cakep2p.engine.sampling import SamplingParams

HELP = "/reset starts a new chat, /exit (or Ctrl-D) quits, Ctrl-C stops the answer being written"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message that opens every chat")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                        help="longest answer in tokens (default 512)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="0 = greedy (default: the model's generation_config.json, greedy when it has none)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample among the K likeliest tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling: smallest set with mass >= P")
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="> 1 discourages repeats")
    parser.add_argument("--seed", type=seed_number, default=None, metavar="S", help="seed for reproducible sampling")
    add_cluster_options(parser)


class _StopOnInterrupt:
    """While active, Ctrl-C sets `cancel` instead of raising, so only the current answer stops."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.previous: Callable | int | None = None

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda signum, frame: self.cancel.set())
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def answer(conversation: Conversation, text: str, params: SamplingParams, out: TextIO, notes: TextIO) -> None:
    """Stream the answer to `text` onto `out`; status lines go to `notes`."""
    from cakep2p.engine.conversation import ContextFull, Reply

    cancel = threading.Event()
    reply = Reply()
    try:
        with _StopOnInterrupt(cancel):
            for event in conversation.ask(text, params, reply, cancel):
                out.write(event.text)
                out.flush()
    except ContextFull as error:
        print(f"(this chat no longer fits the context: {error}; type /reset to start a new chat)", file=notes)
        return
    out.write("\n")
    out.flush()
    if not reply.done:
        return
    if reply.finish_reason == "cancelled":
        print("(stopped)", file=notes)
    used = conversation.context_used()
    print(f"[{reply.completion_tokens} tokens, {reply.tokens_per_s:.1f} tokens/s, "
          f"context {used}/{conversation.max_context}]", file=notes, flush=True)
    if used + 1 >= conversation.max_context:
        print("(the chat has filled the context; type /reset to start a new chat)", file=notes)


def chat_loop(conversation: Conversation, params: SamplingParams, read_line: Callable[[str], str] = input,
              out: TextIO = sys.stdout, notes: TextIO = sys.stderr) -> int:
    """Read user lines until /exit or end of input; each line gets a streamed answer."""
    while True:
        try:
            line = read_line("> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=notes)
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            conversation.reset()
            print("(new chat)", file=notes)
        elif line in ("/help", "/?"):
            print(HELP, file=notes)
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}: {HELP})", file=notes)
        else:
            answer(conversation, line, params, out, notes)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CakeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.conversation import Conversation

    checkpoint = Checkpoint.open(args.model)
    params = sampling_from_args(args, checkpoint)
    model = load_model(args, checkpoint)
    try:
        pipeline = model.new_pipeline()
        try:
            conversation = Conversation(pipeline, model.tokenizer, args.system)
            if sys.stdin.isatty():
                with contextlib.suppress(ImportError):
                    importlib.import_module("readline")  # line editing and history for input()
            print(f"chatting with {model.name} ({conversation.max_context} tokens of context). {HELP}",
                  file=sys.stderr, flush=True)
            return chat_loop(conversation, params)
        finally:
            pipeline.close()
    finally:
        model.close()
