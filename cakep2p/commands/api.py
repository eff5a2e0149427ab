"""`cakep2p api`: serve the model over an OpenAI-compatible HTTP API (loopback unless told otherwise)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from cakep2p.commands.options import (add_cluster_options, add_model_options, load_model, open_checkpoint,
                                      port_or_zero, positive_int)
from cakep2p.errors import CakeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs --api-key)")
    parser.add_argument("--port", type=port_or_zero, default=8000,
                        help="TCP port (default 8000; 0: any free port, printed at start)")
    parser.add_argument("--api-key", default=os.environ.get("CAKEP2P_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $CAKEP2P_API_KEY)")
    parser.add_argument("--max-sessions", type=positive_int, default=4, metavar="N",
                        help="requests generating at once, each with its own KV cache; others wait (default 4)")
    add_cluster_options(parser)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_options(args: argparse.Namespace) -> None:
    """Refuse an exposed server without a key, and impossible numbers, before loading the model."""
    if not is_loopback(args.host) and not args.api_key:
        raise CakeError(f"--host {args.host} exposes the API to the network: also pass --api-key KEY "
                        "(clients send it as 'Authorization: Bearer KEY'), or keep the default --host 127.0.0.1")
    if not 0 <= args.port < 65536:
        raise CakeError(f"--port must be 0-65535 (0: any free port), got {args.port}")
    if args.max_sessions < 1:
        raise CakeError(f"--max-sessions must be >= 1, got {args.max_sessions}")


def run(args: argparse.Namespace) -> int:
    check_options(args)
    import uvicorn

    from cakep2p.api import base_url, create_app, listen_socket
    checkpoint = open_checkpoint(args)
    sock = listen_socket(args.host, args.port)  # before the model loads, so a taken port fails fast
    try:
        model = load_model(args, checkpoint)
        try:
            app = create_app(model, api_key=args.api_key, max_sessions=args.max_sessions)
            print(f"cakep2p: serving {model.name} on {base_url(sock)}/v1 (OpenAI-compatible, model id "
                  f"\"{model.name}\", as GET /v1/models says); Ctrl-C stops", file=sys.stderr, flush=True)
            config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", timeout_graceful_shutdown=5)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            model.close()
    finally:
        sock.close()
    return 0
