"""``eagle2 bench``: tokens/s, speedup, acceptance length and exactness on MT-bench style questions.

Questions come in FastChat format (one JSON object a line: ``question_id``, ``category``,
``turns``). Each question runs turn by turn with the chat template applied; the second turn is
conditioned on the method's *own* first answer (as MT-bench does), so methods whose first answer
differs see different second prompts.

Methods, all on the same loaded model, dtype, EOS ids, prompts and token budget:

- ``hf``: transformers ``generate`` (greedy, or sampling at T > 0): the loop users would call.
- ``pld``: transformers prompt-lookup assisted generation (``prompt_lookup_num_tokens``).
- ``vanilla`` / ``chain`` / ``eagle1`` / ``eagle2``: this package's engine.
- ``llamacpp``: llama-cpp-python on the same GGUF (2 threads), when importable; skipped otherwise.
- ``eagle2:NxDxK`` / ``eagle2:fixed``: a fixed EAGLE-2 tree. ``eagle2@NAME``: the cost-aware tree drafted
  by another head (``heads``), on its own copy of the target; a head of the same shape shares the
  generator's cost model, so an A/B of heads compares drafting alone, every tree sized by one rule.

Timing is fair by construction: one warm-up generation per method first, methods interleaved
question by question (their order rotated each question), and wall-clock time around everything a
user would pay for (prompt encoding, generation, detokenization). Speedup is total new tokens /
total seconds of a method divided by the same for ``hf`` (or ``vanilla``), over the same prompts.

``mean_accept_len`` (tau) is new tokens per target forward, prefill included: exactly what the
engine's stats report; for ``hf``/``pld`` the target forwards are counted with a forward hook.
``greedy_identical`` (T = 0 only) is the fraction of prompts whose new token ids equal ``hf``'s.
In fp32 every lossless method should score 1.0; in bf16 transformers' own forward rounds differently
from ours, so a near-tie can flip and the outputs then diverge. ``greedy_identical_vanilla`` (when
``hf`` and ``vanilla`` both run) compares with our own vanilla decode instead: with the row-invariant
numerics (``exact``, the CPU default) every greedy engine method should score 1.0 there in bf16 / fp16.

The package is collect (collect.py, runners.py) -> score (score.py) -> report (report.py); results.json
is the source of truth, and ``eagle2 bench --report`` regenerates pages and plots from it. Outputs in
``out_dir``: ``results.json``, ``results.md``, ``answers.jsonl`` (every answer) and PNG
plots (speedup per category, acceptance-length histogram, draft calibration, tokens/s against
``total_tokens``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..machine import dtype_name, machine_info
from .collect import RunSettings, Stopped, check_seed, collect, sweep_sizes, tree_settings, tune_curve
from .inputs import (ALL_METHODS, DEFAULT_METHODS, ENGINE_METHODS, HF_METHODS, SPECULATIVE, fixed_shape, is_engine,
                     load_questions, parse_heads, parse_methods, with_heads)
from .report import regenerate, render_markdown, summary_line, summary_page, write_run
from .runners import Answer, gguf_of, make_runners
from .score import (FIELDS, accept_rate_per_depth, aggregate, calibration_bins, calibration_per_depth, exactness,
                    identical_fraction, round_profile, speculation_stats, tree_per_round)

__all__ = ["ALL_METHODS", "DEFAULT_METHODS", "ENGINE_METHODS", "FIELDS", "HF_METHODS", "SPECULATIVE", "Answer",
           "RunSettings", "Stopped", "accept_rate_per_depth", "backend_info", "calibration_bins",
           "calibration_per_depth", "check_seed", "fixed_shape", "gguf_of", "is_engine", "load_questions",
           "parse_heads", "parse_methods", "regenerate", "render_markdown", "round_profile", "run_bench",
           "summary_line", "summary_page", "tree_per_round", "with_heads"]


def backend_info(gen) -> dict:
    """The forward path the run measured: the generator's ``Backend`` in force (``target``: its forward)."""
    b = gen.backend
    return dict(target=b.forward, native=b.native, packed_linear=b.packed_linear, lowbit=b.lowbit, exact=b.exact)


def _size_curve(gen, questions, sweep, tree, s: RunSettings) -> dict:
    """tokens/s against total_tokens: tune's measured curve when present, else a small sweep on the
    first question's first turn (at most 32 new tokens)."""
    curve, source, vanilla = None, None, None
    if sweep == "auto":
        curve, vanilla = tune_curve(gen)
        source = "tune" if curve else None
        sweep = None if curve else [8, 16, 32]
    if sweep:
        prompts = [[{"role": "user", "content": questions[0]["turns"][0]}]]
        curve, vanilla = sweep_sizes(gen, prompts, [int(x) for x in sweep], tree, min(32, s.max_new_tokens),
                                     s.temperature)
        source = "sweep"
    return dict(source=source, points=curve or [], vanilla_tokens_per_s=vanilla)


def _head_record(gen, heads: dict, runners: dict) -> dict:
    """NAME -> the head's directory and whether it shared the generator's cost model."""
    return {label: dict(path=str(d), shared_cost=runners[f"eagle2@{label}"].gen.cost_model() is gen.cost_model())
            for label, d in heads.items() if f"eagle2@{label}" in runners}


def run_bench(gen, questions: list[dict], methods=DEFAULT_METHODS, *, out_dir, max_new_tokens: int = 256,
              temperature: float = 0.0, turns: int = 2, total_tokens: int | None = None, depth: int | None = None,
              tree_top_k: int | None = None, sweep="auto", seed: int = 0, prompt_lookup: int = 10,
              progress: bool = True, questions_file: str | None = None, command: str | None = None,
              heads: dict | None = None) -> dict:
    """Benchmark ``methods`` on ``questions`` with an already loaded ``Eagle2Generator``: collect,
    score, report. sweep: total_tokens values for the tokens/s-vs-tree-size curve, "auto" (tune's
    curve when present, else 8,16,32) or None / [] for none. Writes the files into ``out_dir`` and
    returns the results dict (what results.json holds). heads: NAME -> head directory, each run as
    the method ``eagle2@NAME`` beside the generator's own head (``with_heads``)."""
    heads = dict(heads or {})
    methods = with_heads(parse_methods(methods), heads)
    s = RunSettings(max_new_tokens=max_new_tokens, temperature=temperature, turns=turns, seed=seed)
    if not questions:
        raise ValueError("no questions to run")
    if not gen.tokenizer.chat_template:
        raise ValueError("bench needs a chat model (its tokenizer has no chat template)")
    tree = tree_settings(gen, total_tokens, depth, tree_top_k)
    check_seed(seed, len(questions))
    _check_first_turns(gen, questions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runners, notes = make_runners(gen, methods, dict(total_tokens=total_tokens, depth=depth, tree_top_k=tree_top_k),
                                  prompt_lookup=prompt_lookup, heads=heads)
    for m, note in notes.items():
        print(f"note: {m} {note}", file=sys.stderr)
    runners = {m: runners[m] for m in methods if m in runners}
    active = list(runners)

    stopped = None
    try:
        records, answers = collect(runners, questions, s, progress)
    except Stopped as e:
        if not e.records:
            raise e.__cause__ from None
        records, answers, stopped, n_all = e.records, e.answers, e, len(questions)
        questions = questions[:e.done]

    greedy, reference = exactness(answers, records, active, len(questions)) if temperature == 0 else ({}, None)
    # speculation's own promise: the engine's greedy methods give our vanilla decode's text
    vs_vanilla = (identical_fraction(answers, active, len(questions), "vanilla")
                  if temperature == 0 and "vanilla" in active and reference != "vanilla" else {})
    overall = aggregate(records, active)
    cats = list(dict.fromkeys(q["category"] for q in questions))
    per_category = {c: aggregate([r for r in records if r["category"] == c], active) for c in cats}
    calib = speculation_stats(answers, overall, active)
    results = dict(
        model=gen.model_key, head=gen.head_source, heads=_head_record(gen, heads, runners),
        dtype=dtype_name(gen.dtype), device=str(gen.device),
        backend=backend_info(gen), command=command, tree=tree, max_new_tokens=max_new_tokens,
        temperature=temperature, turns=turns, questions_file=questions_file, n_questions=len(questions),
        n_prompts=len(records) // max(len(active), 1), methods=overall, per_category=per_category,
        greedy_identical=greedy, greedy_reference=reference, greedy_identical_vanilla=vs_vanilla, skipped=notes,
        machine=machine_info(), calibration=calib,
        total_tokens_curve=_size_curve(gen, questions, None if stopped else sweep, tree, s),
        prompts=records, wall_seconds=None, plots={},
        partial=dict(questions_done=len(questions), questions_total=n_all, reason=stopped.reason) if stopped else None)
    with (out / "answers.jsonl").open("w") as f:
        for (qi, m), al in answers.items():
            f.write(json.dumps({"question_id": questions[qi]["question_id"], "method": m, "turns": [a.text for a in al],
                                "token_ids": [a.token_ids for a in al]}) + "\n")
    results["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    write_run(out, results)
    if stopped:
        raise stopped
    return results


def _check_first_turns(gen, questions: list[dict]) -> None:
    """Every first turn fits the model's context (a later turn's length depends on the answers)."""
    for q in questions:
        n = len(gen.encode_prompt([{"role": "user", "content": q["turns"][0]}]))
        if n >= gen.max_context:
            raise ValueError(f"question {q['question_id']}: its first turn has {n} tokens; the model's context is "
                             f"{gen.max_context}, leaving no room to generate (leave it out of --questions)")
