"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..config import METHODS, TreeConfig


def _model_args(p: argparse.ArgumentParser, draft_vocab: bool = True) -> None:
    """--model/--head/--dtype/--device/--backend, and --draft-vocab unless the command defines its own."""
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, .gguf file or hub id (default: %(default)s)")
    p.add_argument("--head", default=None,
                   help="draft head directory in the released EAGLE-1/2 or EAGLE-3 layout (default: the model's shipped "
                        "head)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bf16 on CUDA or a CPU with fast bf16, else fp32 (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "fast", "transformers"],
                   help="target forward: auto = our lean forward for Llama/Qwen2/Mistral-style models (logits equal "
                        "to transformers'), transformers' otherwise; transformers = always the general path "
                        "(default: %(default)s)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="row-invariant numerics on the lean forward: in bf16 / fp16 greedy eagle2 / eagle1 / chain "
                        "then equal vanilla token for token; its attention is also the faster one on a CPU (default: on for "
                        "a CPU with the native extension; --no-exact takes ATen's kernels)")
    if not draft_vocab:
        return
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="FR-Spec: draft only over the first N tokens of the head's frequency list (default: the "
                        "head's whole list; 0 = the full vocabulary). Output is exact either way")


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="eagle2", choices=METHODS,
                   help="eagle2 = dynamic tree, eagle1 = static tree, chain = one path, vanilla = no drafting")
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    fixed = "; giving any of --total-tokens/--depth/--tree-top-k fixes the eagle2 tree's shape"
    p.add_argument("--total-tokens", type=int, default=None,
                   help=f"tree nodes verified per round incl. the root (default: eagle2 sizes each round by this "
                        f"machine's costs, at most {TreeConfig.max_nodes}; fixed shapes: tuned, else "
                        f"{TreeConfig.total_tokens}{fixed})")
    p.add_argument("--depth", type=int, default=None,
                   help=f"draft depth (default: eagle2 chooses per round, at most {TreeConfig.max_depth}; fixed "
                        f"shapes: tuned, else {TreeConfig.depth})")
    p.add_argument("--tree-top-k", type=int, default=None,
                   help=f"children per expanded node (default: tuned, else {TreeConfig.top_k})")
    p.add_argument("--lookup", type=int, default=None,
                   help=f"eagle2 at T <= {TreeConfig.draw_above}: the longest prompt-lookup chain (tokens copied from an earlier occurrence "
                        f"of the context's last few tokens) the tree may verify; 0 = none (default: {TreeConfig.lookup})")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _load(args):
    import eagle2  # noqa: F401 (lazy: keeps --help fast)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = eagle2.load(args.model, head=args.head, dtype=args.dtype, device=args.device,
                          backend=getattr(args, "backend", "auto"), draft_vocab=getattr(args, "draft_vocab", None),
                          exact=getattr(args, "exact", None))
    for w in caught:  # the load's own notices (no head, an emulated or inexact dtype), not its libraries' warnings
        if issubclass(w.category, eagle2.LoadWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    return gen


def _decode_settings(args):
    """The decoding settings of ``generate`` / ``chat``, validated (before the slow model load, so a
    typo fails in milliseconds)."""
    from ..config import DecodeSettings

    return DecodeSettings.of(max_new_tokens=args.max_new_tokens, method=args.method, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, seed=args.seed, total_tokens=args.total_tokens,
                             depth=args.depth, tree_top_k=args.tree_top_k, stop=args.stop or (), lookup=args.lookup)


def _stats_line(stats) -> str:
    reused = f"; {stats.reused_prefix} prompt tokens reused from the last turn" if stats.reused_prefix else ""
    return (f"[{stats.new_tokens} tokens in {stats.seconds:.2f}s: {stats.tokens_per_s:.1f} tokens/s, "
            f"mean acceptance length {stats.mean_accept_len:.2f} over {stats.rounds} target forwards{reused}]")


