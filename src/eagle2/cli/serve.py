"""`eagle2 serve`: the OpenAI-compatible server and the web chat page."""

from __future__ import annotations

import ipaddress
import os
import sys

from .common import _load, _model_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible API and a web chat page",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models and /health "
                                   "(OpenAI request/response schemas, streaming as server-sent events) and a web "
                                   "chat page at /. One sequence is decoded at a time; other requests wait in a "
                                   "FIFO queue of --max-queue places (503 + Retry-After when full).")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EAGLE2_API_KEY, else no key)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait while one is decoded (default: %(default)s)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: %(default)s)")
    p.set_defaults(handler=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"port must be in [0, 65535]; got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"max-queue must be >= 0; got {args.max_queue}")
    api_key = args.api_key if args.api_key is not None else (os.environ.get("EAGLE2_API_KEY") or None)
    if api_key is not None and not api_key.strip():
        raise ValueError("api-key is empty")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise ValueError(f"serving needs {e.name}: pip install 'eagle2[serve]'") from None
    from ..server.app import bind_socket, run

    bind_socket(args.host, args.port).close()  # fail fast (before the model load) on a busy port
    if not _is_loopback(args.host) and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine can use "
              "it (set --api-key or EAGLE2_API_KEY)", file=sys.stderr)
    gen = _load(args)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def ready(port: int) -> None:
        print(f"eagle2 serving {gen.model_key} on http://{host}:{port}  (web chat at /, API at /v1, "
              f"{'API key required' if api_key else 'no API key'}; Ctrl-C stops)", file=sys.stderr, flush=True)

    run(gen, host=args.host, port=args.port, api_key=api_key, max_queue=args.max_queue, log_level=args.log_level,
        on_ready=ready)
    return 0
