"""Bench reports: results.json -> results.md and PNG plots, and one summary page over several runs.

results.json is the source of truth: everything here reads only it (plus ``answers.jsonl``, which
the run writes beside it), so ``eagle2 bench --report DIR...`` regenerates a run's page and plots,
and writes a summary across runs (e.g. ``docs/results/<date>-<cpu>.md``), without rerunning anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PLOT_FILES = dict(speedup="speedup_per_category.png", accept_hist="accept_length_hist.png",
                  calibration="draft_calibration.png", total_tokens="tokens_per_s_vs_total_tokens.png")


def write_plots(r: dict, out: Path) -> dict:
    """The run's PNG plots from its results dict; returns {kind: file name} of those written."""
    from .. import plots

    names = list(r["methods"])
    baseline = "hf" if "hf" in names else ("vanilla" if "vanilla" in names else None)
    hists = {m: s["accept_length_hist"] for m, s in r["methods"].items() if s.get("accept_length_hist")}
    curve = r["total_tokens_curve"]
    written = {
        "speedup": plots.speedup_per_category({**r["per_category"], "all": r["methods"]}, names, baseline,
                                              out / PLOT_FILES["speedup"]) if baseline else None,
        "accept_hist": plots.accept_histogram(hists, out / PLOT_FILES["accept_hist"]),
        "calibration": plots.calibration(r.get("calibration") or {}, out / PLOT_FILES["calibration"]),
        "total_tokens": plots.tokens_per_s_vs_total_tokens(curve["points"], out / PLOT_FILES["total_tokens"],
                                                           title=f"eagle2 tokens/s vs tree size ({curve['source']})",
                                                           baseline=curve.get("vanilla_tokens_per_s")),
    }
    return {k: Path(v).name for k, v in written.items() if v}


def write_run(out: Path, r: dict) -> None:
    """results.json, plots and results.md of one run into ``out``."""
    r["plots"] = write_plots(r, out)
    (out / "results.json").write_text(json.dumps(r, indent=1))
    (out / "results.md").write_text(render_markdown(r))


def regenerate(run_dir, plots: bool = True) -> dict:
    """Rewrite a run's results.md and plots from its results.json; returns the results. ``plots=False``
    writes the page without plots (and removes the run's PNGs), for pages committed to a lean repo."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise ValueError(f"no results.json in {run_dir}")
    try:
        r = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        if not isinstance(r, dict) or not r["methods"]:
            raise KeyError("methods")
        format(r["temperature"], "g")  # the summary table formats it so
        r["plots"] = write_plots(r, run_dir) if plots else {}
        page = render_markdown(r)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # valid JSON of another shape
        raise ValueError(f"{path} is not an eagle2 bench result ({type(e).__name__}: {e})") from None
    if not plots:
        for name in PLOT_FILES.values():
            (run_dir / name).unlink(missing_ok=True)
    (run_dir / "results.md").write_text(page)
    return r


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _tree_text(t: dict) -> str:
    fixed = f"total_tokens {t['total_tokens']}, depth {t['depth']}, top-k {t['tree_top_k']}"
    if t.get("adaptive"):
        lookup = f", prompt-lookup chains of up to {t['lookup']} tokens at T = 0" if t.get("lookup") else ""
        return (f"eagle2 tree: cost-aware (at most {t['max_nodes']} nodes, {t['max_depth']} levels, top-k "
                f"{t.get('frontier_top_k', t['tree_top_k'])}{lookup}); fixed shapes: {fixed}")
    return f"tree: {fixed}"


def _tree_lines(m: dict) -> list[str]:
    trees = {n: s["tree_per_round"] for n, s in m.items() if s.get("tree_per_round")}
    if not trees:
        return []
    lines = ["", "## The verified tree per round (expected = calibrated draft probabilities of its nodes)", "",
             "| method | nodes (mean) | depth (mean) | expected accept | realised accept | nodes histogram |",
             "|---|---:|---:|---:|---:|---|"]
    for n, t in trees.items():
        hist = " ".join(f"{k}:{v}" for k, v in t["size_hist"].items())
        lines.append(f"| {n} | {t['size_mean']} | {t['depth_mean']} | {_f(t['expected_accept_mean'])} "
                     f"| {_f(t['realised_accept_mean'])} | {hist} |")
    cal = {n: s["calibration_per_depth"] for n, s in m.items() if s.get("calibration_per_depth")}
    lines += ["", "## Calibration per depth (accepted / predicted; 1 = calibrated)", ""]
    for n, rows in cal.items():
        lines.append(f"- {n}: " + ", ".join(f"d{c['depth']} {_f(c['scale'])} (n={c['n']})" for c in rows))
    return lines


def _heads_text(heads: dict | None) -> list[str]:
    """One line naming the heads of the ``eagle2@NAME`` methods; none when the run had none."""
    if not heads:
        return []
    shared = {True: "the same cost model", False: "the same verify costs, its own draft costs"}
    return ["Other heads: " + "; ".join(f"eagle2@{k}: {h['path']} ({shared[bool(h['shared_cost'])]})"
                                        for k, h in heads.items()) + "."]


def _partial_text(r: dict) -> list[str]:
    """A run cut short (Ctrl-C, a failing question) says so: its numbers cover the questions before."""
    p = r.get("partial")
    if not p:
        return []
    return [f"**Partial run:** stopped after {p['questions_done']} of {p['questions_total']} questions "
            f"({p['reason']}); every number here covers those {p['questions_done']} questions, all methods."]


def render_markdown(r: dict) -> str:
    m = r["methods"]
    vs_vanilla = r.get("greedy_identical_vanilla") or {}  # absent in runs recorded before it existed
    lines = [f"# eagle2 bench: {r['model']}", "",
             f"{r['n_questions']} questions ({r['n_prompts']} prompts, up to {r['turns']} turns), "
             f"max {r['max_new_tokens']} new tokens, temperature {r['temperature']}, dtype {r['dtype']}, "
             f"device {r['device']}; {_tree_text(r['tree'])}; head: {r['head']}.",
             f"Machine: {r['machine']['cpu']} (torch ISA {r['machine'].get('isa', '?')}, "
             f"{r['machine']['torch_threads']} torch threads), torch {r['machine']['torch']}, "
             f"transformers {r['machine']['transformers']}; backend {r.get('backend') or '?'}; "
             f"commit {r['machine'].get('commit') or '?'}. Wall time {r['wall_seconds']} s.",
             f"Command: `{r.get('command') or '(not recorded)'}`", *_heads_text(r.get("heads")), *_partial_text(r), "",
             "| method | tokens/s | speedup vs hf | speedup vs vanilla | tau (tokens/forward) | new tokens | seconds "
             "| greedy identical |" + (" identical to vanilla |" if vs_vanilla else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if vs_vanilla else "")]
    for name, s in m.items():
        gi = r["greedy_identical"].get(name)
        lines.append(f"| {name} | {s['tokens_per_s']:.2f} | {_f(s['speedup_vs_hf'])} | {_f(s['speedup_vs_vanilla'])} "
                     f"| {_f(s['mean_accept_len'])} | {s['new_tokens']} | {s['seconds']:.2f} | {_f(gi)} |"
                     + (f" {_f(vs_vanilla.get(name))} |" if vs_vanilla else ""))
    if r["greedy_reference"]:
        lines += ["", f"Greedy identical: fraction of prompts whose new token ids equal `{r['greedy_reference']}`'s."
                  + (" Identical to vanilla: the same against our own vanilla decode." if vs_vanilla else "")]
    prof = {n: s["round_profile_ms"] for n, s in m.items() if s.get("round_profile_ms")}
    if prof:
        lines += ["", "## One round, ms (draft = head commit + tree growth; verify = target forward + acceptance "
                  "+ cache compaction; other = detokenization, stop checks, Python)", "",
                  "| method | draft | verify | other | total per round | prefill per prompt |",
                  "|---|---:|---:|---:|---:|---:|"]
        for n, p in prof.items():
            lines.append(f"| {n} | {p['draft']} | {p['verify']} | {p['other']} | {p['total']} | {p['prefill_per_prompt']} |")
    rates = {n: s["accept_rate_per_depth"] for n, s in m.items() if s.get("accept_rate_per_depth")}
    if rates:
        lines += ["", "## Acceptance rate per draft depth (P(depth d accepted | depth d-1 accepted and a depth-d node "
                  "drafted under it))", ""]
        for n, v in rates.items():
            lines.append(f"- {n}: " + ", ".join(f"d{d + 1} {x:.2f}" for d, x in enumerate(v)))
    lines += _tree_lines(m)
    for note in r.get("skipped", {}).items():
        lines.append(f"- {note[0]}: {note[1]}")
    base = "hf" if any(s.get("speedup_vs_hf") is not None for s in m.values()) else "vanilla"
    lines += ["", "## Per category", "", f"tokens/s (speedup vs {base}, tau)", ""]
    names = list(m)
    lines += ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cat, cm in r["per_category"].items():
        cells = []
        for n in names:
            s = cm.get(n)
            cells.append("—" if s is None else
                         f"{s['tokens_per_s']:.1f} ({_f(s.get('speedup_vs_' + base))}x, {_f(s['mean_accept_len'])})")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    pts = r["total_tokens_curve"]["points"]
    if pts:
        lines += ["", f"## tokens/s vs total_tokens ({r['total_tokens_curve']['source']}; vanilla measured "
                  f"alongside: {_f(r['total_tokens_curve'].get('vanilla_tokens_per_s'))} tokens/s)", "",
                  "| total_tokens | depth | top-k | tokens/s | tau |", "|---:|---:|---:|---:|---:|"]
        for p in sorted(pts, key=lambda p: (p["total_tokens"], p.get("depth") or 0, p.get("tree_top_k") or 0)):
            lines.append(f"| {p['total_tokens']} | {p.get('depth')} | {p.get('tree_top_k')} | {p['tokens_per_s']:.2f} "
                         f"| {_f(p.get('mean_accept_len'))} |")
    if r["plots"]:
        lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in r["plots"].items()]
    return "\n".join(lines) + "\n"


def summary_line(r: dict, out_dir) -> str:
    return json.dumps({"out": str(out_dir), "model": r["model"], "dtype": r["dtype"],
                       "prompts": r["n_prompts"], "wall_seconds": r["wall_seconds"],
                       "tokens_per_s": {k: v["tokens_per_s"] for k, v in r["methods"].items()},
                       "speedup_vs_hf": {k: v.get("speedup_vs_hf") for k, v in r["methods"].items()},
                       "speedup_vs_vanilla": {k: v.get("speedup_vs_vanilla") for k, v in r["methods"].items()},
                       "mean_accept_len": {k: v["mean_accept_len"] for k, v in r["methods"].items()},
                       "greedy_identical": r["greedy_identical"],
                       "greedy_identical_vanilla": r.get("greedy_identical_vanilla") or {}})


def _vs_vanilla(r: dict) -> dict:
    """Per method, the fraction identical to vanilla (T = 0): its own column, or the reference's when that
    is vanilla."""
    if r.get("greedy_reference") == "vanilla":
        return r.get("greedy_identical") or {}
    return r.get("greedy_identical_vanilla") or {}


def runs_table(runs: dict[str, dict]) -> list[str]:
    """One markdown table over several runs (name -> results dict): a row per method and run."""
    lines = ["| run | method | tokens/s | vs vanilla | tau | draft ms | verify ms | nodes | depth | greedy = ref "
             "| = vanilla |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        run = f"{name} (T={r['temperature']:g}, {r['n_prompts']} prompts)"
        for m, s in r["methods"].items():
            prof, tree = s.get("round_profile_ms") or {}, s.get("tree_per_round") or {}
            cells = [run, m, f"{s['tokens_per_s']:.1f}", _f(s.get("speedup_vs_vanilla")), _f(s.get("mean_accept_len")),
                     _f(prof.get("draft"), "{:.1f}"), _f(prof.get("verify"), "{:.1f}"),
                     _f(tree.get("size_mean"), "{:.1f}"), _f(tree.get("depth_mean"), "{:.1f}"),
                     _f((r.get("greedy_identical") or {}).get(m)), _f(_vs_vanilla(r).get(m))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _run_names(run_dirs: list) -> list[str]:
    """Each run's name on the page: its directory's name, or its path where two names would collide."""
    base = [Path(d).name for d in run_dirs]
    names = [b if base.count(b) == 1 else str(d) for b, d in zip(base, run_dirs)]
    if len(set(names)) != len(names):
        raise ValueError("a run directory is given twice")
    return names


def summary_page(run_dirs: list, page: Path, title: str | None = None, plots: bool = True) -> str:
    """A page (to be written at ``page``) over several runs: where and how they were measured, the
    table, and links to each run's own page. Regenerates each run's page (and plots) on the way."""
    names = _run_names(run_dirs)
    runs = {n: regenerate(d, plots) for n, d in zip(names, run_dirs)}
    links = {n: os.path.relpath(Path(d) / "results.md", Path(page).parent) for n, d in zip(names, run_dirs)}
    if not runs:
        raise ValueError("no runs given")
    first = next(iter(runs.values()))
    mach = first["machine"]
    lines = [f"# {title or 'eagle2 bench results'}", "",
             f"Machine: {mach['cpu']} (torch ISA {mach.get('isa', '?')}, flags {' '.join(mach.get('cpu_flags', []))}; "
             f"{mach.get('torch_threads')} threads), torch {mach['torch']}, transformers {mach['transformers']}. "
             f"Model {first['model']}, dtype {first['dtype']}, head {first['head']}.", "",
             *runs_table(runs), "",
             "tau = new tokens per target forward; draft / verify = ms per round; nodes / depth = mean verified "
             "tree per round; greedy = ref: fraction of prompts identical to the reference method (T = 0); = vanilla: "
             "the same against our own vanilla decode.", "",
             "## Runs", ""]
    for name, r in runs.items():
        cmd = r.get("command") or "(not recorded)"
        m = r["machine"]  # a run may differ from the first (another dtype, a forced ISA): each says its own
        lines += [f"- [{name}]({links[name]}): `{cmd}` (commit {m.get('commit') or '?'}, torch ISA "
                  f"{m.get('isa', '?')}, {r['dtype']}, {r['wall_seconds']} s)"]
    return "\n".join(lines) + "\n"
