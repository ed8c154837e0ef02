"""``eagle2 tune``: refit this machine's cost model and find the fastest fixed draft-tree shape.

Two measurements, both on the loaded model, dtype and head:

1. the target's forward time against query length (1, 2, 4, ..., 64 new tokens over ~200 cached
   ones, logits for every row, as verification computes them): on a CPU a small model's forward
   is dominated by per-layer overhead, so verifying 16 tokens costs far less than 16 forwards, but
   the curve bends up at some size that only a measurement finds;
2. greedy eagle2 decoding of a few dev prompts for each candidate (total_tokens, depth,
   tree_top_k), candidates interleaved prompt by prompt, plus vanilla decoding as the reference.
   The candidate with the highest measured tokens/s (wall clock, drafting included) wins.

It also refits the cost model (``cost.py``) that the default, cost-aware tree sizes its rounds with,
once per frontier width in the top-k grid, and races that tree at each width alongside the candidates
(a verified row's cost differs by CPU: without AMX a narrow frontier pays better). The fastest fixed
shape and the narrowest width within 2% of the fastest (``narrowest_near_best``) are saved to
``eagle2.api.tuned_path(model_key)`` as JSON (``total_tokens``, ``depth``, ``tree_top_k``,
``adaptive_top_k``, plus both curves, the cost model and the machine); ``eagle2.load`` starts explicit
fixed-shape calls from the shape and gives the cost-aware tree that width. Plots go to ``out_dir``.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .machine import dtype_name, machine_info

QUERY_LENS = (1, 2, 4, 8, 16, 32, 64)
TOTAL_TOKENS_GRID = (8, 12, 16, 24, 32)
DEPTH_GRID = (4, 6)
TOP_K_GRID = (4, 8)

# Short, varied dev prompts (not from the evaluation sets, so tuning does not peek at them).
DEV_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number, with a short docstring.",
    "Explain in a few sentences why the sky is blue.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Show your steps.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Give me five tips for staying focused while working from home.",
    "Translate to French: 'The weather is nice today, let's go for a walk in the park.'",
)


def parse_int_list(text, name: str) -> list[int]:
    if isinstance(text, (list, tuple)):
        vals = list(text)
    else:
        try:
            vals = [int(x) for x in str(text).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated integers; got {text!r}") from None
    if not vals:
        raise ValueError(f"{name} is empty")
    return list(dict.fromkeys(vals))  # a value given twice is one candidate, measured once


def measure_forward_curve(gen, query_lens=QUERY_LENS, cached: int = 200, repeats: int = 5) -> list[dict]:
    """Median (and fastest) ms of one target forward over q new tokens with ``cached`` tokens in the cache."""
    from .cost import time_calls, verify_steps

    tgt = gen.target
    query_lens = sorted({int(q) for q in query_lens if 0 < int(q)})
    cached = max(1, min(cached, tgt.max_len - max(query_lens) - 1))
    times = time_calls(verify_steps(tgt, cached, query_lens), repeats)
    curve = [dict(query_len=q, ms=round(statistics.median(t), 3), ms_min=round(min(t), 3))
             for q, t in zip(query_lens, times)]
    base = curve[0]["ms"]
    for c in curve:
        c["relative_to_first"] = round(c["ms"] / base, 3) if base else None
    return curve


def _grid(total_tokens_grid, depth_grid, top_k_grid) -> list[tuple[int, int, int]]:
    from .config import TreeConfig

    grid = []
    for tt, d, k in itertools.product(parse_int_list(total_tokens_grid, "total_tokens grid"),
                                      parse_int_list(depth_grid, "depth grid"), parse_int_list(top_k_grid, "top-k grid")):
        TreeConfig(total_tokens=tt, depth=d, top_k=k)  # validates
        grid.append((tt, d, k))
    return grid


@contextmanager
def _frontier(gen, k: int | None):
    """``gen``'s default tree with frontier width ``k`` (None: as it is) for the block, then restored."""
    base = gen.tree
    gen.tree = base if k is None else replace(base, frontier=k)
    try:
        yield gen
    finally:
        gen.tree = base


def _race(gen, runs: list, prompts: list, max_new_tokens: int, progress: bool) -> dict:
    """Greedy generation of every run on every prompt, interleaved prompt by prompt (order rotated),
    after one warm-up each. A run is ("vanilla", None), ("eagle2", ("adaptive", k)) (the cost-aware tree
    with frontier width k) or ("eagle2", (n, d, k)) (a fixed shape). Returns run -> summed new tokens,
    seconds, rounds, draft and verify seconds."""
    from tqdm.auto import tqdm

    acc = {r: dict(new=0, sec=0.0, rounds=0, draft=0.0, verify=0.0) for r in runs}

    def one(run, prompt, n):
        method, g = run
        adaptive = g is not None and g[0] == "adaptive"
        kw = {} if g is None or adaptive else dict(total_tokens=g[0], depth=g[1], tree_top_k=g[2])
        with _frontier(gen, g[1] if adaptive else None):
            t0 = time.perf_counter()
            res = gen.generate(prompt, max_new_tokens=n, method=method, temperature=0.0, reuse_prefix=False, **kw)
            return res.stats, time.perf_counter() - t0

    for run in runs:
        one(run, prompts[0], min(8, max_new_tokens))
    bar = tqdm(total=len(runs) * len(prompts), desc="tune", unit="run", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for pi, prompt in enumerate(prompts):
        k = pi % len(runs)
        for run in runs[k:] + runs[:k]:
            st, dt = one(run, prompt, max_new_tokens)
            a = acc[run]
            a["new"] += st.new_tokens
            a["sec"] += dt
            a["rounds"] += st.rounds
            a["draft"] += st.draft_seconds
            a["verify"] += st.verify_seconds
            bar.update(1)
    bar.close()
    return acc


def _summary(a: dict, n_prompts: int) -> dict:
    verify_rounds = max(1, a["rounds"] - n_prompts)  # minus the prefills
    return dict(tokens_per_s=round(a["new"] / a["sec"], 3) if a["sec"] else 0.0,
                mean_accept_len=round(a["new"] / a["rounds"], 3) if a["rounds"] else 0.0,
                draft_ms_per_round=round(1000 * a["draft"] / verify_rounds, 3),
                verify_ms_per_round=round(1000 * a["verify"] / verify_rounds, 3),
                new_tokens=a["new"], seconds=round(a["sec"], 3))


WIDTH_TIE = 0.02  # frontier widths this close in the race count as tied


def narrowest_near_best(adaptives: list[dict], tie: float = WIDTH_TIE) -> dict:
    """The narrowest frontier width whose race ran within ``tie`` of the fastest. The race's few short
    prompts cannot rank widths that close (a full MT-bench run has ordered them differently from the
    race), and a narrower frontier feeds fewer rows to each draft level."""
    fastest = max(c["tokens_per_s"] for c in adaptives)
    return min((c for c in adaptives if c["tokens_per_s"] >= (1 - tie) * fastest), key=lambda c: c["tree_top_k"])


def _log_candidates(log, candidates, best, vanilla, adaptives, adaptive, speedup) -> None:
    log("cost-aware tree (the default), by frontier width:")
    for c in adaptives:
        mark = "  <- chosen" if c is adaptive else ""
        log(f"  top-k {c['tree_top_k']:>3}: {c['tokens_per_s']:8.2f} tokens/s, tau {c['mean_accept_len']:.2f}, "
            f"draft {c['draft_ms_per_round']:.2f} ms{mark}")
    log("candidates (eagle2, greedy):")
    log(f"  {'total':>5} {'depth':>5} {'top-k':>5} {'tok/s':>8} {'tau':>6} {'draft ms':>9} {'verify ms':>9}")
    for c in sorted(candidates, key=lambda c: -c["tokens_per_s"]):
        mark = "  <- chosen" if c is best else ""
        log(f"  {c['total_tokens']:>5} {c['depth']:>5} {c['tree_top_k']:>5} {c['tokens_per_s']:>8.2f} "
            f"{c['mean_accept_len']:>6.2f} {c['draft_ms_per_round']:>9.2f} {c['verify_ms_per_round']:>9.2f}{mark}")
    log(f"  vanilla: {vanilla['tokens_per_s']:.2f} tokens/s; chosen fixed shape {speedup}x; cost-aware tree "
        f"(the default) {adaptive['tokens_per_s']:.2f} tokens/s, tau {adaptive['mean_accept_len']:.2f}")
    if speedup is not None and speedup < 1:
        beaten = adaptive["tokens_per_s"] > vanilla["tokens_per_s"]
        log(f"  note: no fixed shape beat vanilla decoding here{'; the cost-aware tree did' if beaten else ''} "
            "(a weak or untrained head, or tree rows too dear to verify on this machine)")


def _write(result: dict, path: Path, save: bool, out_dir, log) -> None:
    """Plots (next to the tune file, or into ``out_dir``), then the tune file itself, atomically. A
    dry run writes plots only into ``out_dir``: the ones beside the tune file describe that file."""
    from . import plots

    if out_dir is None and not save:
        result["plots"] = {}
        return
    out = Path(out_dir) if out_dir is not None else path.parent
    best = result["chosen"]
    try:  # the plots are a view of the measurement: failing to draw them must not lose it
        written = {"forward_curve": plots.forward_curve(result["forward_curve"]["points"],
                                                        out / f"{path.stem}.forward_curve.png"),
                   "tokens_per_s": plots.tokens_per_s_vs_total_tokens(
                       result["candidates"], out / f"{path.stem}.tokens_per_s.png",
                       title=f"eagle2 tokens/s per tree (chosen {best['total_tokens']}/{best['depth']}/"
                             f"{best['tree_top_k']})",
                       baseline=result["vanilla"]["tokens_per_s"])}
    except OSError as e:
        log(f"plots not written to {out}: {e.strerror or e}")
        written = {}
    result["plots"] = {k: str(v) for k, v in written.items() if v}
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        result["path"] = str(path)
        log(f"saved {path}: total_tokens={best['total_tokens']} depth={best['depth']} tree_top_k={best['tree_top_k']}, "
            f"cost-aware tree top-k {result['adaptive_top_k']}")


def run_tune(gen, prompts=None, *, out_dir=None, max_new_tokens: int = 64, total_tokens_grid=TOTAL_TOKENS_GRID,
             depth_grid=DEPTH_GRID, top_k_grid=TOP_K_GRID, query_lens=QUERY_LENS, cached: int = 200,
             repeats: int = 5, save: bool = True, progress: bool = True, verbose: bool = True) -> dict:
    """Measure, choose and (with ``save``) write the tune file for ``gen.model_key``.

    prompts: user messages (strings) or token-id lists; default: built-in dev prompts."""
    from .api import tuned_path

    prompts = list(prompts or DEV_PROMPTS)
    if not prompts:
        raise ValueError("no dev prompts")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    grid = _grid(total_tokens_grid, depth_grid, top_k_grid)
    t_start = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)

    log(f"measuring target forward time vs query length ({cached} cached tokens, {repeats} repeats)...")
    curve = measure_forward_curve(gen, query_lens, cached, repeats)
    widths = sorted(set(parse_int_list(top_k_grid, "top-k grid")))
    log(f"refitting the cost model the dynamic tree sizes its rounds with (frontier widths {widths}) ...")
    cost_models = {}
    for k in widths:
        with _frontier(gen, k):
            cost_models[k] = gen.cost_model(refit=True)
    for c in curve:
        log(f"  q={c['query_len']:>3}: {c['ms']:8.2f} ms  ({c['relative_to_first']:.2f}x q=1)")

    runs = [("vanilla", None)] + [("eagle2", ("adaptive", k)) for k in widths] + [("eagle2", g) for g in grid]
    acc = _race(gen, runs, prompts, max_new_tokens, progress)
    vanilla = _summary(acc[("vanilla", None)], len(prompts))
    adaptives = [dict(tree_top_k=k, **_summary(acc[("eagle2", ("adaptive", k))], len(prompts))) for k in widths]
    adaptive = narrowest_near_best(adaptives)
    candidates = [dict(total_tokens=g[0], depth=g[1], tree_top_k=g[2], **_summary(acc[("eagle2", g)], len(prompts)))
                  for g in grid]
    best = max(candidates, key=lambda c: c["tokens_per_s"])
    speedup = round(best["tokens_per_s"] / vanilla["tokens_per_s"], 3) if vanilla["tokens_per_s"] else None
    _log_candidates(log, candidates, best, vanilla, adaptives, adaptive, speedup)

    result = dict(total_tokens=best["total_tokens"], depth=best["depth"], tree_top_k=best["tree_top_k"],
                  adaptive_top_k=adaptive["tree_top_k"],
                  model=gen.model_key, head=gen.head_source, dtype=dtype_name(gen.dtype), device=str(gen.device),
                  chosen=best, speedup_vs_vanilla=speedup, vanilla=vanilla, adaptive=adaptive,
                  adaptive_candidates=adaptives, candidates=candidates,
                  cost_model=cost_models[adaptive["tree_top_k"]].to_json(),
                  forward_curve=dict(cached=cached, repeats=repeats, points=curve),
                  max_new_tokens=max_new_tokens, n_prompts=len(prompts), machine=machine_info(),
                  created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_seconds=None, plots={}, path=None)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    _write(result, tuned_path(gen.model_key), save, out_dir, log)
    return result


def summary_line(r: dict) -> str:
    return json.dumps({"path": r["path"], "model": r["model"], "dtype": r["dtype"], "total_tokens": r["total_tokens"],
                       "depth": r["depth"], "tree_top_k": r["tree_top_k"], "adaptive_top_k": r["adaptive_top_k"],
                       "adaptive_tokens_per_s": r["adaptive"]["tokens_per_s"],
                       "tokens_per_s": r["chosen"]["tokens_per_s"], "vanilla_tokens_per_s": r["vanilla"]["tokens_per_s"],
                       "speedup_vs_vanilla": r["speedup_vs_vanilla"], "mean_accept_len": r["chosen"]["mean_accept_len"],
                       "wall_seconds": r["wall_seconds"], "plots": r["plots"]})
