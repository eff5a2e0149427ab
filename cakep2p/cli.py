"""The `cakep2p` command: no arguments opens the window, `--serve` runs a headless node, subcommands do the rest.

Each subcommand lives in `cakep2p/commands/<name>.py` and provides
`add_arguments(parser)` and `run(args) -> int`. Errors of the project's own
types become one line on stderr and exit code 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cakep2p import OPENMP_DEFAULTS, __version__
from cakep2p.errors import CakeError

SUBCOMMANDS = {
    "generate": "generate text from a prompt (on the cluster, or --local)",
    "chat": "interactive chat in the terminal",
    "plan": "show how a model's layers would be split across the visible peers",
    "peers": "list the nodes visible on the network",
    "doctor": "explain what discovery and the mesh can and cannot reach",
    "api": "serve an OpenAI-compatible HTTP API",
    "code": "show or change this machine's cluster pairing code",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (subcommand parsers inherit it)."""

    def error(self, message: str) -> None:
        self.exit(2, f"cakep2p: error: {message} (see `{self.prog} --help`)\n")


def _command_module(name: str):
    return importlib.import_module(f"cakep2p.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cakep2p", description="One language model across the machines you own.",
        epilog="With no command, cakep2p opens its window. `cakep2p --serve` runs a headless node "
               "(see `cakep2p --serve --help`).")
    parser.add_argument("--version", action="version", version=f"cakep2p {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in SUBCOMMANDS.items():
        module = _command_module(name)
        sub = subparsers.add_parser(name, help=summary, description=summary)
        sub.add_argument("-v", "--verbose", action="store_true", help="log debug details")
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def build_serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cakep2p --serve", description="Run a headless node until SIGINT/SIGTERM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    _command_module("serve").add_arguments(parser)
    return parser


def _setup_logging(verbose: bool) -> None:
    from cakep2p.redaction import install_log_redaction

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        install_log_redaction(handler)


def _open_window(args: argparse.Namespace) -> int:
    """The window, once a check that needs no Qt says it can start here (else one line naming the fix, exit 2)."""
    from cakep2p.commands.display import window_problem

    problem = window_problem()
    if problem:
        print(f"cakep2p: error: {problem}", file=sys.stderr)
        return 2
    from cakep2p.gui import run_app  # the window: only imported when asked for

    return run_app(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name, value in OPENMP_DEFAULTS.items():  # before any command imports torch
        os.environ.setdefault(name, value)
    try:
        if "--serve" in argv and not (argv and argv[0] in SUBCOMMANDS):
            argv.remove("--serve")
            args = build_serve_parser().parse_args(argv)
            handler = _command_module("serve").run
        else:
            args = build_parser().parse_args(argv)
            handler = getattr(args, "handler", None)
            if handler is None:
                return _open_window(args)
        _setup_logging(args.verbose)
        return handler(args)
    except CakeError as error:
        print(f"cakep2p: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cakep2p: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the edge: a bug must not show the user a traceback (or a secret)
        from cakep2p.redaction import redact

        if "-v" in argv or "--verbose" in argv:
            raise
        print(f"cakep2p: internal error: {type(error).__name__}: {redact(str(error))} "
              "(run again with -v for details, and please report it)", file=sys.stderr)
        return 1
