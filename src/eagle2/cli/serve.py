"""`eagle2 serve`: the OpenAI-compatible server and the web chat page."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from .common import _load, _model_args

KEY_ON_COMMAND_LINE = ("--api-key is not accepted: a key on the command line is visible to every user of this "
                       "machine (ps, /proc). Set EAGLE2_API_KEY, or use --api-key-file PATH")


def register(sub) -> None:
    from ..server.config import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROMPT_CHARS

    p = sub.add_parser("serve", help="serve an OpenAI-compatible API and a web chat page",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models and /health "
                                   "(OpenAI request/response schemas, streaming as server-sent events) and a web "
                                   "chat page at /. Up to --parallel requests are decoded side by side, their forwards "
                                   "run as one; others wait in a FIFO queue of --max-queue places (503 + Retry-After "
                                   "when full). The API key, "
                                   "if any, comes from $EAGLE2_API_KEY or --api-key-file.")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused with a reason, see cmd_serve
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the key that /v1/* requires ('Authorization: Bearer KEY') from this file "
                        "(default: $EAGLE2_API_KEY, else no key)")
    p.add_argument("--allowed-hosts", action="append", default=None, metavar="NAME[,NAME...]",
                   help="Host header names to answer besides the bind address (and localhost on a loopback "
                        "bind); '*' answers any name, which turns off the DNS-rebinding guard (repeatable)")
    p.add_argument("--parallel", type=int, default=8, metavar="N",
                   help="requests decoded side by side, their target forwards run as one pass over the weights "
                        "(each gets the answer it gets alone); a short one is not held behind a long one "
                        "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait (or be tokenized) while --parallel are decoded (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413 (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS",
                   help="a request body not received whole within this is refused with 408 (default: %(default)s)")
    p.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS,
                   help="longer prompts are refused with 400 before tokenizing (default: %(default)s)")
    p.add_argument("--docs", action="store_true",
                   help="serve the OpenAPI pages /docs, /redoc and /openapi.json (behind the key when one is set)")
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


def _api_key(args) -> str | None:
    if args.api_key is not None:
        raise ValueError(KEY_ON_COMMAND_LINE)
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API key file: {getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise ValueError("the API key file is empty")
        return key
    key = os.environ.get("EAGLE2_API_KEY")
    if key is not None and not key.strip():
        raise ValueError("EAGLE2_API_KEY is set but empty")
    return key.strip() if key else None


def _config(args, api_key: str | None):
    from ..server.config import ServerConfig

    if not 0 <= args.port <= 65535:
        raise ValueError(f"port must be in [0, 65535]; got {args.port}")
    hosts = tuple(h.strip() for arg in (args.allowed_hosts or ()) for h in arg.split(",") if h.strip())
    return ServerConfig(api_key=api_key, max_queue=args.max_queue, parallel=args.parallel,
                        max_body_bytes=args.max_body_bytes,
                        max_prompt_chars=args.max_prompt_chars, body_timeout_s=args.body_timeout, host=args.host,
                        allowed_hosts=hosts, docs=args.docs)


def cmd_serve(args) -> int:
    config = _config(args, _api_key(args))
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise ValueError(f"serving needs {e.name}: pip install 'eagle2[serve]'") from None
    from ..server.app import bind_socket, run

    bind_socket(args.host, args.port).close()  # fail fast (before the model load) on a busy port
    if not _is_loopback(args.host) and not config.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine can use "
              "it (set EAGLE2_API_KEY or --api-key-file)", file=sys.stderr)
    gen = _load(args)  # Ctrl-C here: main() exits at once while the load runs on (_exit_now_if_computing)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def ready(port: int) -> None:
        print(f"eagle2 serving {gen.model_key} on http://{host}:{port}  (web chat at /, API at /v1, "
              f"{'API key required' if config.api_key else 'no API key'}; Ctrl-C stops)", file=sys.stderr, flush=True)

    run(gen, config, port=args.port, log_level=args.log_level, on_ready=ready)
    return 0
