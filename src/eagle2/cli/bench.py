"""`eagle2 bench` and `eagle2 tune`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import _load, _model_args
from ..config import TreeConfig


def _default_questions() -> str:
    from ..machine import data_dir

    return str(data_dir() / "eval" / "mt_bench_question.jsonl")


def register(sub) -> None:
    b = sub.add_parser(
        "bench", help="benchmark tokens/s, speedup and acceptance length on MT-bench style questions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run FastChat-format questions (turn by turn, chat template applied) through each method on the "
                    "same model, dtype and token budget, interleaved question by question after a warm-up, and write "
                    "results.json, results.md, answers.jsonl and PNG plots to --out. The last stdout line is a JSON "
                    "summary.\n\nmethods: hf = transformers generate, pld = transformers prompt-lookup decoding, "
                    "vanilla / chain / eagle1 / eagle2 = this engine, llamacpp = llama-cpp-python on the same GGUF "
                    "(if installed).")
    _model_args(b)
    b.add_argument("--questions", default=None,
                   help="FastChat question file (.jsonl: question_id, category, turns) "
                        "(default: $EAGLE2_DATA or <repo>/../shared/data, then eval/mt_bench_question.jsonl)")
    b.add_argument("--limit", type=int, default=None, help="N questions (after --categories), taken round-robin over the categories")
    b.add_argument("--categories", default=None, help="comma-separated categories to keep, e.g. coding,math")
    b.add_argument("--turns", type=int, default=2, choices=[1, 2],
                   help="turns per question; the 2nd is conditioned on the method's own 1st answer (default: 2)")
    b.add_argument("--max-new-tokens", type=int, default=256, help="per turn (default: %(default)s)")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="base seed for sampling (default: %(default)s)")
    b.add_argument("--methods", default="hf,pld,vanilla,eagle1,eagle2",
                   help="comma-separated: hf, pld, vanilla, chain, eagle1, eagle2 (the cost-aware tree), "
                        "eagle2:NxDxK (a fixed EAGLE-2 tree of N nodes, D levels, top-k K), eagle2:fixed (the tuned "
                        "fixed tree, else 16x4x8), llamacpp (default: %(default)s)")
    b.add_argument("--compare-head", action="append", default=[], metavar="NAME=DIR",
                   help="also run the cost-aware tree drafted by the head in DIR, as the method eagle2@NAME; "
                        "repeatable. A head of the same shape as --head's shares its cost model, so the "
                        "runs differ only in how well the heads draft")
    b.add_argument("--total-tokens", type=int, default=None, help=f"tree nodes per round (default: tuned, else {TreeConfig.total_tokens})")
    b.add_argument("--depth", type=int, default=None, help=f"draft depth (default: tuned, else {TreeConfig.depth})")
    b.add_argument("--tree-top-k", type=int, default=None, help=f"children per expanded node (default: tuned, else {TreeConfig.top_k})")
    b.add_argument("--prompt-lookup", type=int, default=10,
                   help="pld: prompt_lookup_num_tokens (default: %(default)s)")
    b.add_argument("--sweep", default="auto",
                   help="total_tokens values for the tokens/s-vs-tree-size plot, e.g. 8,16,32; 'auto' = tune's "
                        "curve if present, else 8,16,32; 'none' = skip (default: %(default)s)")
    b.add_argument("--out", default="bench-results", help="output directory (default: %(default)s)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--report", nargs="+", metavar="RUN_DIR", default=None,
                   help="run nothing: regenerate each RUN_DIR's results.md and plots from its results.json; with "
                        "--summary, also write one page over them all")
    b.add_argument("--summary", default=None, metavar="FILE.md",
                   help="with --report: the summary page to write, e.g. docs/results/<date>-<cpu>.md")
    b.add_argument("--title", default=None, help="with --summary: the page's title")
    b.add_argument("--no-plots", action="store_true",
                   help="with --report: pages without PNG plots (a run's PNGs are removed), e.g. for a lean repo")
    b.set_defaults(handler=cmd_bench)

    t = sub.add_parser(
        "tune", help="measure this machine and save the fastest draft-tree size for a model",
        description="Measure the target's forward time against query length and greedy eagle2 tokens/s on a few dev "
                    "prompts for each candidate (total_tokens, depth, tree_top_k) and for the cost-aware tree at each "
                    "--tree-top-k frontier width; save the fastest shape and the narrowest width within 2% of the "
                    "fastest to $EAGLE2_CACHE/tune/<model>.json, which eagle2.load then uses for its default tree. "
                    "The last stdout line is a JSON summary.")
    _model_args(t)
    t.add_argument("--questions", default=None,
                   help="FastChat question file whose first turns are the dev prompts (default: built-in dev prompts)")
    t.add_argument("--limit", type=int, default=3, help="number of dev prompts (default: %(default)s)")
    t.add_argument("--max-new-tokens", type=int, default=64, help="per dev prompt (default: %(default)s)")
    t.add_argument("--total-tokens", default="8,12,16,24,32", help="candidate total_tokens (default: %(default)s)")
    t.add_argument("--depth", default="4,6", help="candidate depths (default: %(default)s)")
    t.add_argument("--tree-top-k", default="4,8",
                   help="candidate tree top-k values, also the cost-aware tree's frontier widths (default: %(default)s)")
    t.add_argument("--query-lens", default="1,2,4,8,16,32,64",
                   help="query lengths for the forward-time curve (default: %(default)s)")
    t.add_argument("--out", default=None, help="directory for the PNG plots (default: next to the tune file)")
    t.add_argument("--dry-run", action="store_true",
                   help="measure and print, but do not save the tune file (nor plots, unless --out is given)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=cmd_tune)


def _check_pos(name, v):
    if v is not None and v < 1:
        raise ValueError(f"{name} must be >= 1; got {v}")


def _out_dir(path: str, flag: str) -> Path:
    """The output directory, created now (before the model loads): a path that cannot be one fails
    at once, not after the run."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create this directory ({e.strerror or e})") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {path}: not writable")
    return p


# options that shape a run; --report runs nothing, so it refuses them rather than ignore them
_RUN_ONLY = ("questions", "limit", "categories", "compare_head", "total_tokens", "depth", "tree_top_k")


def cmd_report(args) -> int:
    from ..bench import regenerate, summary_page

    given = [n for n in _RUN_ONLY if getattr(args, n) not in (None, [])]
    if given:
        raise ValueError(f"--report regenerates pages from results.json and runs nothing: "
                         f"--{given[0].replace('_', '-')} does not apply")
    if args.title and not args.summary:
        raise ValueError("--title needs --summary FILE.md (it is the summary page's title)")
    if args.summary:
        page = Path(args.summary)
        if page.is_dir():
            raise ValueError(f"--summary {page} is a directory; give the page's file name, e.g. {page / 'results.md'}")
        _out_dir(str(page.parent), "--summary's directory")
        text = summary_page(args.report, page, args.title, plots=not args.no_plots)
        try:
            page.write_text(text)
        except OSError as e:
            raise ValueError(f"--summary {page}: cannot write it ({e.strerror or e})") from None
        print(f"wrote {page}")
    else:
        for d in args.report:
            regenerate(d, plots=not args.no_plots)
            print(f"wrote {Path(d) / 'results.md'}")
    return 0


def cmd_bench(args) -> int:
    from ..bench import (Stopped, check_seed, load_questions, parse_heads, parse_methods, run_bench, summary_line,
                         with_heads)
    from ..config import DecodeSettings

    if args.report:
        return cmd_report(args)
    if args.summary or args.no_plots:
        raise ValueError(f"{'--summary' if args.summary else '--no-plots'} needs --report RUN_DIR...")

    heads = parse_heads(args.compare_head)
    methods = with_heads(parse_methods(args.methods), heads)
    _check_pos("limit", args.limit)
    DecodeSettings.of(max_new_tokens=args.max_new_tokens, temperature=args.temperature, total_tokens=args.total_tokens,
                      depth=args.depth, tree_top_k=args.tree_top_k)  # validates before the model loads
    if args.prompt_lookup < 1:
        raise ValueError(f"prompt-lookup must be >= 1; got {args.prompt_lookup}")
    sweep = args.sweep.strip().lower()
    if sweep in ("none", "", "0"):
        sweep = None
    elif sweep != "auto":
        from ..tune import parse_int_list

        sweep = parse_int_list(sweep, "sweep")
        if min(sweep) < 2:
            raise ValueError("sweep values are total_tokens: each must be >= 2")
    qfile = args.questions or _default_questions()
    questions = load_questions(qfile, limit=args.limit, categories=args.categories)
    check_seed(args.seed, len(questions))
    _out_dir(args.out, "--out")
    gen = _load(args)
    try:
        r = run_bench(gen, questions, methods, out_dir=args.out, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, turns=args.turns, total_tokens=args.total_tokens, depth=args.depth,
                      tree_top_k=args.tree_top_k, sweep=sweep, seed=args.seed, prompt_lookup=args.prompt_lookup,
                      progress=not args.no_progress, questions_file=str(qfile),
                      command=" ".join(["eagle2", *sys.argv[1:]]), heads=heads)
    except Stopped as e:
        print(f"{e.reason}: the {e.done} questions every method finished are in {Path(args.out, 'results.md')} "
              f"(marked partial)", file=sys.stderr)
        if isinstance(e.__cause__, KeyboardInterrupt):
            return 130
        return 2
    print(Path(args.out, "results.md").read_text())
    print(summary_line(r, args.out))
    return 0


def cmd_tune(args) -> int:
    from ..tune import parse_int_list, run_tune, summary_line

    _check_pos("limit", args.limit)
    _check_pos("max_new_tokens", args.max_new_tokens)
    grids = dict(total_tokens_grid=parse_int_list(args.total_tokens, "--total-tokens"),
                 depth_grid=parse_int_list(args.depth, "--depth"),
                 top_k_grid=parse_int_list(args.tree_top_k, "--tree-top-k"))
    query_lens = parse_int_list(args.query_lens, "--query-lens")
    if min(query_lens) < 1:
        raise ValueError("query lengths must be >= 1")
    from ..config import TreeConfig

    for tt in grids["total_tokens_grid"]:
        for d in grids["depth_grid"]:
            for k in grids["top_k_grid"]:
                TreeConfig(total_tokens=tt, depth=d, top_k=k)
    prompts = None
    if args.questions:
        from ..bench import load_questions

        prompts = [q["turns"][0] for q in load_questions(args.questions, limit=args.limit)]
    else:
        from ..tune import DEV_PROMPTS

        if args.limit > len(DEV_PROMPTS):
            raise ValueError(f"there are {len(DEV_PROMPTS)} built-in dev prompts; --limit {args.limit} needs "
                             "--questions FILE for more")
        prompts = list(DEV_PROMPTS[: args.limit])
    if args.out is not None:
        _out_dir(args.out, "--out")
    gen = _load(args)
    r = run_tune(gen, prompts, out_dir=args.out, max_new_tokens=args.max_new_tokens, query_lens=query_lens,
                 save=not args.dry_run, progress=not args.no_progress, **grids)
    print(summary_line(r))
    sys.stdout.flush()
    return 0
