"""`cakep2p code`: show this machine's cluster pairing code, join another cluster's, or make a fresh one.

The code is printed to stdout only when asked for, and never logged: headless machines pair with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cakep2p.errors import CakeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--set", metavar="CODE", default=None,
                        help="join another cluster: store its code (from `cakep2p code` on one of its machines); "
                             "'-' reads it from stdin, which keeps it out of the process list")
    action.add_argument("--new", action="store_true",
                        help="make a fresh code: every other machine must then be paired again")
    parser.add_argument("--json", action="store_true", help='print {"code": ..., "fingerprint": ...}')


def run(args: argparse.Namespace) -> int:
    from cakep2p import security

    if args.set is not None:
        code = security.load_or_create_code(_valid_code(_typed_code(args.set)))
        _note(f"stored: this machine now belongs to cluster {security.derive_keys(code).fingerprint} "
              "(restart a running `cakep2p --serve` or window to switch it too)")
    elif args.new:
        code = security.load_or_create_code(security.new_code())
        _note("made a new pairing code: every other machine must be paired again with "
              "`cakep2p code --set CODE` (and running nodes restarted), or they will no longer be let in")
    else:
        code = security.load_or_create_code()
    overriding = os.environ.get(security.CODE_ENV_VAR)
    if overriding and (args.set is not None or args.new) and _normalized(overriding) != code:
        _note(f"${security.CODE_ENV_VAR} is set in this shell and overrides the stored code for commands run here")
    if args.json:
        print(json.dumps({"code": code, "fingerprint": security.derive_keys(code).fingerprint}))
    else:
        print(code)
    return 0


def _typed_code(value: str) -> str:
    if value != "-":
        return value
    if sys.stdin.isatty():   # a person at the keyboard, not a pipe: say what to type
        print("paste the cluster code (what `cakep2p code` prints on a machine of the cluster), then press Enter: ",
              end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        raise CakeError("no cluster code on stdin: pipe in what `cakep2p code` prints on a machine of the cluster")
    return line


def _valid_code(typed: str) -> str:
    """The typed code, normalized; one line that never repeats it when it is malformed."""
    from cakep2p import security

    try:
        return security.normalize_code(typed)
    except CakeError:
        raise CakeError(f"malformed cluster code: expected {security.CODE_WORD_COUNT} words from the cakep2p word "
                        f"list and {security.CODE_DIGIT_COUNT} digits, like "
                        f"'amber-falcon-river-tulip-maple-orbit-048213'; run `cakep2p code` on a machine of the "
                        "cluster and copy what it prints") from None


def _normalized(code: str) -> str | None:
    from cakep2p import security

    try:
        return security.normalize_code(code)
    except CakeError:
        return None


def _note(text: str) -> None:
    print(f"cakep2p: note: {text}", file=sys.stderr, flush=True)
