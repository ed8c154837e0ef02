"""Bench collection: run every method on every question, interleaved, and time it.

Timing is fair by construction: one warm-up generation per method first, methods interleaved
question by question (their order rotated each question), each turn conditioned on the method's
own previous answer. Also the small tokens/s-vs-tree-size sweep. Returns raw records and answers;
scoring and reporting happen elsewhere.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from ..machine import dtype_name
from .runners import Answer


@dataclass(frozen=True)
class RunSettings:
    """What every method of one bench run shares, validated once."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    turns: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.turns not in (1, 2):
            raise ValueError(f"turns must be 1 or 2; got {self.turns}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")


def check_seed(seed, n_questions: int) -> None:
    """Question q's turn t samples with seed + 1000 q + t: every one of those must be a seed torch takes."""
    from ..config import SEED_MAX, SEED_MIN

    top = SEED_MAX - 1000 * n_questions
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= top:
        raise ValueError(f"seed must be an integer in [{SEED_MIN}, {top}] for {n_questions} question(s) (question q's "
                         f"turn t samples with seed + 1000 q + t); got {seed!r}")


class Stopped(Exception):
    """``collect`` ended early (Ctrl-C, or a question that failed): the records and answers of the
    questions every method had finished, how many those are, and why it stopped."""

    def __init__(self, records: list[dict], answers: dict, done: int, reason: str):
        super().__init__(reason)
        self.records, self.answers, self.done, self.reason = records, answers, done, reason


def collect(runners: dict, questions: list[dict], s: RunSettings, progress: bool = True
            ) -> tuple[list[dict], dict[tuple[int, str], list[Answer]]]:
    """(records: one dict per answered turn, answers: (question index, method) -> Answer per turn).
    Raises ``Stopped`` (from the cause) when interrupted or when a question fails midway."""
    from tqdm.auto import tqdm

    active = list(runners)
    warm = [{"role": "user", "content": questions[0]["turns"][0]}]
    for m in active:  # first-call allocations, lazy init, caches
        runners[m](warm, min(8, s.max_new_tokens), s.temperature, s.seed)
    records: list[dict] = []
    answers: dict = {}
    n_turns = [min(s.turns, len(q["turns"])) for q in questions]
    bar = tqdm(total=sum(n_turns) * len(active), desc="bench", unit="answer", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    qi = 0
    try:
        for qi, q in enumerate(questions):
            order = active[qi % len(active):] + active[:qi % len(active)] if active else []
            for m in order:
                _answer_turns(runners[m], m, qi, q, n_turns[qi], s, records, answers, bar)
    except (KeyboardInterrupt, Exception) as e:  # keep what is finished: minutes of measurement
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else \
            f"question {questions[qi]['question_id']} failed: {e}"
        raise Stopped([r for r in records if r["index"] < qi], {k: v for k, v in answers.items() if k[0] < qi},
                      qi, reason) from e
    finally:
        bar.close()
    return records, answers


def _answer_turns(runner, m: str, qi: int, q: dict, n_turns: int, s: RunSettings, records: list, answers: dict,
                  bar) -> None:
    """One method's answers to one question, turn by turn, each turn after its own previous answer."""
    msgs: list[dict] = []
    for ti in range(n_turns):
        msgs.append({"role": "user", "content": q["turns"][ti]})
        a = runner(list(msgs), s.max_new_tokens, s.temperature, s.seed + 1000 * qi + ti)
        msgs.append({"role": "assistant", "content": a.text})
        answers.setdefault((qi, m), []).append(a)
        records.append(dict(index=qi, question_id=q["question_id"], category=q["category"], turn=ti + 1,
                            method=m, new_tokens=len(a.token_ids), seconds=a.seconds, forwards=a.forwards))
        bar.set_postfix_str(f"{m} q{q['question_id']} t{ti + 1} {len(a.token_ids) / a.seconds:.1f} tok/s")
        bar.update(1)


def tree_settings(gen, total_tokens, depth, tree_top_k) -> dict:
    """The tree the run's tree methods use, as results.json records it (validated)."""
    from ..config import TreeConfig

    fixed = any(x is not None for x in (total_tokens, depth, tree_top_k))
    tree = dict(total_tokens=gen.tree.total_tokens if total_tokens is None else total_tokens,
                depth=gen.tree.depth if depth is None else depth,
                tree_top_k=gen.tree.top_k if tree_top_k is None else tree_top_k,
                adaptive=gen.tree.adaptive and not fixed, max_nodes=gen.tree.max_nodes, max_depth=gen.tree.max_depth,
                frontier_top_k=gen.tree.width,  # the cost-aware tree's children per node
                lookup=gen.tree.lookup)  # ... and its longest prompt-lookup chain at T = 0
    TreeConfig(total_tokens=tree["total_tokens"], depth=tree["depth"], top_k=tree["tree_top_k"])  # validates
    return tree


def tune_curve(gen) -> tuple[list[dict] | None, float | None]:
    """tokens/s per candidate from ``eagle2 tune``'s file, if it was measured for this model/head/dtype."""
    from ..api import tuned_path

    p = tuned_path(gen.model_key)
    if not p.exists():
        return None, None
    try:
        d = json.loads(p.read_text())
    except ValueError:
        return None, None
    if d.get("dtype") != dtype_name(gen.dtype) or d.get("head") != gen.head_source:
        return None, None
    pts = [c for c in d.get("candidates", []) if "tokens_per_s" in c and "total_tokens" in c]
    return (pts or None), (d.get("vanilla") or {}).get("tokens_per_s")


def sweep_sizes(gen, prompts, sweep, tree, max_new_tokens, temperature) -> tuple[list[dict], float]:
    """eagle2 tokens/s at each total_tokens (depth and top-k fixed) on a few first turns, and
    vanilla tokens/s measured alongside (the same minutes of a noisy machine) as the baseline."""
    runs = [None] + list(sweep)
    acc = {tt: [0, 0.0, 0] for tt in runs}
    for i, msgs in enumerate(prompts):
        for tt in runs:
            kw = dict(method="vanilla") if tt is None else dict(method="eagle2", total_tokens=tt, depth=tree["depth"],
                                                                 tree_top_k=tree["tree_top_k"])
            t0 = time.perf_counter()
            r = gen.generate(msgs, max_new_tokens=max_new_tokens, temperature=temperature, seed=i,
                             reuse_prefix=False, **kw)  # each size prefills the prompt itself
            acc[tt][1] += time.perf_counter() - t0
            acc[tt][0] += r.stats.new_tokens
            acc[tt][2] += r.stats.rounds
    points = []
    for tt in sweep:
        new, sec, fw = acc[tt]
        points.append(dict(total_tokens=tt, depth=tree["depth"], tree_top_k=tree["tree_top_k"],
                           tokens_per_s=round(new / sec, 3) if sec else 0.0,
                           mean_accept_len=round(new / fw, 3) if fw else 0.0))
    new, sec, _ = acc[None]
    return points, round(new / sec, 3) if sec else 0.0
