"""`cakep2p chat`: an interactive chat in the terminal, streamed; /reset, /raw, /exit; Ctrl-C stops the answer.

The chat mode is the window's (engine.conversation.conversation_mode): the model's template, else the plain
fallback template, every turn kept; --raw or /raw for raw completion.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, TextIO

from cakep2p.commands.options import (add_cluster_options, add_model_options, load_model, open_checkpoint,
                                      positive_int, sampling_from_args, seed_number)

if TYPE_CHECKING:
    from cakep2p.engine.conversation import Conversation
    from cakep2p.engine.sampling import SamplingParams

HELP = ("/reset starts a new chat, /raw switches raw completion on or off, /exit (or Ctrl-D) quits, "
        "Ctrl-C stops the answer being written")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message that opens every chat")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                        help="longest answer in tokens, N >= 1 (default: a quarter of the context)")
    parser.add_argument("--raw", action="store_true",
                        help="raw completion: no chat template, the model continues your text as written (/raw "
                             "switches it in the chat)")
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
    print(f"[{reply.summary(f'context {used}/{conversation.max_context}')}]", file=notes, flush=True)
    if reply.context_full or used + 1 >= conversation.max_context:
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
        elif line == "/raw":
            conversation.set_raw(not conversation.raw)
            print(f"(new chat, {conversation.mode.describe()})", file=notes)
        elif line in ("/help", "/?"):
            print(HELP, file=notes)
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}: {HELP})", file=notes)
        else:
            answer(conversation, line, params, out, notes)


def run(args: argparse.Namespace) -> int:
    from cakep2p.cluster import context_length
    from cakep2p.engine.conversation import Conversation, default_max_new_tokens

    checkpoint = open_checkpoint(args)
    params = sampling_from_args(args, checkpoint,  # bad flags fail here, before loading
                                default_max_new_tokens(context_length(checkpoint.args, args.context)))
    model = load_model(args, checkpoint)
    try:
        pipeline = model.new_pipeline()
        try:
            conversation = Conversation(pipeline, model.tokenizer, args.system, raw=args.raw)
            if sys.stdin.isatty():
                with contextlib.suppress(ImportError):
                    importlib.import_module("readline")  # line editing and history for input()
            print(f"chatting with {model.name} ({conversation.max_context} tokens of context, answers up to "
                  f"{params.max_new_tokens} tokens; {conversation.mode.describe()}). {HELP}",
                  file=sys.stderr, flush=True)
            return chat_loop(conversation, params)
        finally:
            pipeline.close()
    finally:
        model.close()
