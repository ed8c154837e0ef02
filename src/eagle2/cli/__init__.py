"""Command line: ``eagle2 generate | chat | train | bench | tune | serve``.

The only place that parses arguments: one module per subcommand, each with a ``register(sub)``.
Every user mistake ends in a one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

DESCRIPTION = """Lossless EAGLE-2 speculative decoding for Hugging Face causal LMs.

A small draft head grows a context-aware tree of guesses; the target model checks the whole
tree in one forward pass; the output is exactly what the target alone would produce."""

SUBCOMMANDS = ("generate", "serve", "train", "corpus", "bench")  # modules of this package with register()


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="eagle2", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (model loading, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(__name__):
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        try:
            from transformers.utils import logging as hf_logging  # a second or more, before the handler's try
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        hf_logging.disable_progress_bar()
    if args.command is None:
        parser.print_help()
        return 2
    handler = args.handler
    try:
        return int(handler(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit_now_if_computing(130)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a path that cannot be read or written, a full disk: the system's one-line reason
        print(f"error: {e}", file=sys.stderr)
        return 2


def _exit_now_if_computing(code: int) -> None:
    """Quit at once while a load (which Ctrl-C cannot stop) or a round on the compute thread is still
    inside torch: a thread left there can abort the interpreter's normal exit."""
    api, compute = sys.modules.get("eagle2.api"), sys.modules.get("eagle2.compute")
    if api is None or compute is None:  # interrupted before (or while) they were imported: nothing runs in torch
        return
    if api.loading() or compute.shared().busy():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
