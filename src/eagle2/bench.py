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

Timing is fair by construction: one warm-up generation per method first, methods interleaved
question by question (their order rotated each question), and wall-clock time around everything a
user would pay for (prompt encoding, generation, detokenization). Speedup is total new tokens /
total seconds of a method divided by the same for ``hf`` (or ``vanilla``), over the same prompts.

``mean_accept_len`` (tau) is new tokens per target forward, prefill included: exactly what the
engine's stats report; for ``hf``/``pld`` the target forwards are counted with a forward hook.
``greedy_identical`` (T = 0 only) is the fraction of prompts whose new token ids equal ``hf``'s.
In fp32 every lossless method should score 1.0; in bf16 tiny numeric differences between
transformers' own forward and the tree forward can flip a near-tie and the outputs then diverge.

Outputs in ``out_dir``: ``results.json``, ``results.md``, ``answers.jsonl`` (every answer) and PNG
plots (speedup per category, acceptance-length histogram, draft calibration, tokens/s against
``total_tokens``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import torch

log = logging.getLogger("eagle2")

ENGINE_METHODS = ("vanilla", "chain", "eagle1", "eagle2")
HF_METHODS = ("hf", "pld")
ALL_METHODS = HF_METHODS + ENGINE_METHODS + ("llamacpp",)
DEFAULT_METHODS = ("hf", "pld", "vanilla", "eagle1", "eagle2")
SPECULATIVE = ("pld", "chain", "eagle1", "eagle2")
FIELDS = ("tokens_per_s", "speedup_vs_hf", "speedup_vs_vanilla", "mean_accept_len", "new_tokens", "seconds")


# ---- inputs ---------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    """``<repo>/../shared/data`` (where the evaluation question files live in this project)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def fixed_shape(name: str) -> dict | None:
    """``eagle2:16x4x8`` -> dict(total_tokens=16, depth=4, tree_top_k=8); ``eagle2:fixed`` -> {} (the
    generator's fixed shape: ``eagle2 tune``'s, else the default); anything else -> None."""
    if not name.startswith("eagle2:"):
        return None
    spec = name.split(":", 1)[1]
    if spec == "fixed":
        return {}
    try:
        n, d, k = (int(x) for x in spec.split("x"))
    except ValueError:
        return None
    return dict(total_tokens=n, depth=d, tree_top_k=k) if n >= 2 and d >= 1 and k >= 1 else None


def is_engine(name: str) -> bool:
    return name in ENGINE_METHODS or fixed_shape(name) is not None


def parse_methods(text: str | list | tuple) -> list[str]:
    methods = [m.strip() for m in text.split(",")] if isinstance(text, str) else [str(m).strip() for m in text]
    methods = [m for m in methods if m]
    if not methods:
        raise ValueError("no methods given")
    bad = [m for m in methods if m not in ALL_METHODS and fixed_shape(m) is None]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(ALL_METHODS)}, or eagle2:NxDxK "
                         "(a fixed EAGLE-2 tree: N nodes, D levels, top-k K) or eagle2:fixed (the tuned fixed tree)")
    if len(set(methods)) != len(methods):
        raise ValueError("a method is listed twice")
    return methods


def load_questions(path, limit: int | None = None, categories=None) -> list[dict]:
    """Read a FastChat question file; keep the given categories, then ``limit`` questions taken
    round-robin over the categories (file order within each), so a small limit still covers them all."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"questions file not found: {path}")
    questions = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            turns = q.get("turns") if isinstance(q, dict) else None
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise ValueError(f"{path}:{n}: each question needs 'turns', a non-empty list of strings")
            questions.append({"question_id": q.get("question_id", n), "category": str(q.get("category", "all")),
                              "turns": turns})
    if not questions:
        raise ValueError(f"{path} holds no questions")
    if categories:
        cats = [c.strip() for c in categories.split(",")] if isinstance(categories, str) else list(categories)
        cats = [c for c in cats if c]
        known = sorted({q["category"] for q in questions})
        bad = [c for c in cats if c not in known]
        if bad:
            raise ValueError(f"unknown category {bad[0]!r}; {path.name} has: {', '.join(known)}")
        questions = [q for q in questions if q["category"] in cats]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        by_cat: dict[str, list[dict]] = {}
        for q in questions:
            by_cat.setdefault(q["category"], []).append(q)
        picked = [q for rank in zip_longest(*by_cat.values()) for q in rank if q is not None][:limit]
        order = {id(q): i for i, q in enumerate(questions)}
        questions = sorted(picked, key=lambda q: order[id(q)])
    return questions


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def machine_info() -> dict:
    """The CPU (model name, the ISA torch dispatches to, the flags that decide our kernels) and versions."""
    import transformers

    from .cost import cpu_flags, cpu_name

    info = dict(cpu=cpu_name(), isa=torch.backends.cpu.get_cpu_capability(), cpu_flags=cpu_flags(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                platform=platform.platform())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---- runners --------------------------------------------------------------------------------
@dataclass
class Answer:
    token_ids: list
    text: str
    seconds: float
    forwards: int | None = None  # target forwards (prefill included), when known
    accept_lengths: list = field(default_factory=list)
    draft_confidence: list = field(default_factory=list)  # (depth, draft path prob, accepted?) per drafted node
    tree_sizes: list = field(default_factory=list)  # per drafted round: nodes verified, root included
    tree_depths: list = field(default_factory=list)
    expected_accepts: list = field(default_factory=list)
    phases: dict = field(default_factory=dict)  # engine methods: prefill / draft / verify seconds


class _EngineRunner:
    def __init__(self, gen, method, tree_kw):
        self.gen, self.method, self.tree_kw = gen, method, tree_kw

    def __call__(self, messages, max_new_tokens, temperature, seed) -> Answer:
        t0 = time.perf_counter()
        r = self.gen.generate(messages, max_new_tokens=max_new_tokens, method=self.method, temperature=temperature,
                              seed=seed, **self.tree_kw)
        dt = time.perf_counter() - t0
        st = r.stats
        return Answer(list(r.token_ids), r.text, dt, st.rounds, list(st.accept_lengths),
                      draft_confidence=list(st.draft_confidence),
                      phases=dict(prefill=st.prefill_seconds, draft=st.draft_seconds, verify=st.verify_seconds),
                      tree_sizes=list(st.tree_sizes), tree_depths=list(st.tree_depths),
                      expected_accepts=list(st.expected_accepts))


class _HFRunner:
    """transformers ``generate`` on the generator's own model; ``pld`` adds prompt lookup."""

    def __init__(self, gen, prompt_lookup: int = 0):
        self.gen, self.prompt_lookup = gen, prompt_lookup
        self.eos = sorted(gen.eos_ids)

    def __call__(self, messages, max_new_tokens, temperature, seed) -> Answer:
        gen, model = self.gen, self.gen.model
        count = [0]
        hook = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        try:
            t0 = time.perf_counter()
            ids = torch.tensor([gen.encode_prompt(messages)], device=gen.device)
            kw = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos or None,
                      pad_token_id=self.eos[0] if self.eos else 0)
            if temperature > 0:
                if seed is not None:
                    torch.manual_seed(seed)
                kw.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            else:
                kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            if self.prompt_lookup:
                kw["prompt_lookup_num_tokens"] = self.prompt_lookup
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            new = out[0, ids.shape[1]:].tolist()
            text = gen.tokenizer.decode(new, skip_special_tokens=True)
            dt = time.perf_counter() - t0
        finally:
            hook.remove()
        return Answer(new, text, dt, count[0])


class _LlamaCppRunner:
    """llama-cpp-python on the same GGUF, 2 threads, same prompt token ids, same EOS ids."""

    def __init__(self, gen, gguf: Path, threads: int = 2):
        from llama_cpp import Llama

        self.gen = gen
        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=4096,
                         verbose=False, logits_all=False)
        self.eos = set(gen.eos_ids) | {int(self.llm.token_eos())}

    def __call__(self, messages, max_new_tokens, temperature, seed) -> Answer:
        t0 = time.perf_counter()
        ids = self.gen.encode_prompt(messages)
        if seed is not None:
            self.llm.set_seed(seed)
        new: list[int] = []
        for tok in self.llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temp=float(temperature),
                                     repeat_penalty=1.0, reset=True):
            new.append(int(tok))
            if tok in self.eos or len(new) >= max_new_tokens:
                break
        text = self.gen.tokenizer.decode(new, skip_special_tokens=True)
        return Answer(new, text, time.perf_counter() - t0)


def gguf_of(gen) -> Path | None:
    """The GGUF the generator's model came from, when known (built-in model or a .gguf path)."""
    from .models import BUILTIN_MODELS, builtin_gguf_path

    key = gen.model_key or ""
    try:
        if key in BUILTIN_MODELS:
            return builtin_gguf_path(key)
    except ValueError:
        return None
    return Path(key) if key.endswith(".gguf") and Path(key).is_file() else None


def make_runners(gen, methods, tree_kw, prompt_lookup: int = 10, llamacpp_threads: int = 2):
    """name -> runner; plus notes for methods that were skipped."""
    runners, notes = {}, {}
    for m in methods:
        if m == "hf":
            runners[m] = _HFRunner(gen)
        elif m == "pld":
            runners[m] = _HFRunner(gen, prompt_lookup=prompt_lookup)
        elif m in ENGINE_METHODS:
            runners[m] = _EngineRunner(gen, m, tree_kw if m != "vanilla" else {})
        elif fixed_shape(m) is not None:
            shape = fixed_shape(m) or dict(total_tokens=gen.tree.total_tokens, depth=gen.tree.depth,
                                           tree_top_k=gen.tree.top_k)
            runners[m] = _EngineRunner(gen, "eagle2", shape)
        elif m == "llamacpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                notes[m] = "skipped: llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"
                continue
            gguf = gguf_of(gen)
            if gguf is None:
                notes[m] = "skipped: no GGUF file known for this model"
                continue
            try:
                runners[m] = _LlamaCppRunner(gen, gguf, threads=llamacpp_threads)
            except Exception as e:  # a llama.cpp build that cannot read this file, ...
                notes[m] = f"skipped: llama.cpp could not load {gguf}: {e}"
    return runners, notes


# ---- aggregation ----------------------------------------------------------------------------
def _aggregate(records: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        if not rs:
            continue
        new = sum(r["new_tokens"] for r in rs)
        sec = sum(r["seconds"] for r in rs)
        fw = [r["forwards"] for r in rs]
        out[m] = dict(tokens_per_s=round(new / sec, 3) if sec > 0 else 0.0, speedup_vs_hf=None,
                      speedup_vs_vanilla=None,
                      mean_accept_len=round(new / sum(fw), 3) if all(f for f in fw) else None,
                      new_tokens=new, seconds=round(sec, 4), prompts=len(rs))
    for base in ("hf", "vanilla"):
        b = out.get(base, {}).get("tokens_per_s")
        if b:
            for m in out:
                out[m][f"speedup_vs_{base}"] = round(out[m]["tokens_per_s"] / b, 3)
    return out


def accept_rate_per_depth(accept_lengths: list[int]) -> list[float]:
    """P(the depth-d draft token is accepted | depth d-1 was), d = 1.. : where drafts stop paying."""
    rates = []
    for d in range(1, (max(accept_lengths) if accept_lengths else 0) + 2):
        reached = sum(1 for a in accept_lengths if a >= d - 1)
        if not reached:
            break
        rates.append(round(sum(1 for a in accept_lengths if a >= d) / reached, 4))
    return rates


def round_profile(answers: list) -> dict:
    """Where an engine round's time goes, in ms per round (prefill: ms per prompt)."""
    rounds = sum((a.forwards or 1) - 1 for a in answers)  # verification forwards (the prefill excluded)
    tot = {k: sum(a.phases.get(k, 0.0) for a in answers) for k in ("prefill", "draft", "verify")}
    wall = sum(a.seconds for a in answers)
    other = wall - sum(tot.values())
    if not rounds:
        return {}
    return dict(rounds=rounds, draft=round(1e3 * tot["draft"] / rounds, 2), verify=round(1e3 * tot["verify"] / rounds, 2),
                other=round(1e3 * other / rounds, 2), total=round(1e3 * (wall - tot["prefill"]) / rounds, 2),
                prefill_per_prompt=round(1e3 * tot["prefill"] / max(len(answers), 1), 2))


def calibration_bins(pairs: list, n_bins: int = 10) -> list[dict]:
    """(draft prob, accepted) pairs -> equal-width confidence bins with their acceptance rate."""
    bins = []
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        sel = [(p, a) for p, a in pairs if lo <= p < hi or (i == n_bins - 1 and p == 1.0)]
        bins.append(dict(lo=lo, hi=hi, n=len(sel),
                         mean_confidence=round(sum(p for p, _ in sel) / len(sel), 4) if sel else None,
                         accept_rate=round(sum(1 for _, a in sel if a) / len(sel), 4) if sel else None))
    return bins


def _histogram(values: list[int]) -> dict:
    return {str(k): values.count(k) for k in sorted(set(values))}


def tree_per_round(answers: list) -> dict:
    """What the rounds verified: size and depth (histogram and mean), and the expected accept length
    (calibrated draft probabilities of the verified nodes) against the realised one."""
    sizes = [x for a in answers for x in a.tree_sizes]
    depths = [x for a in answers for x in a.tree_depths]
    expected = [e for a in answers for e, _ in a.expected_accepts]
    realised = [r for a in answers for _, r in a.expected_accepts]
    if not sizes:
        return {}
    mean = lambda v: round(sum(v) / len(v), 3) if v else None  # noqa: E731
    return dict(rounds=len(sizes), size_mean=mean(sizes), size_hist=_histogram(sizes), depth_mean=mean(depths),
                depth_hist=_histogram(depths), expected_accept_mean=mean(expected),
                realised_accept_mean=mean(realised))


def calibration_per_depth(triples: list) -> list[dict]:
    """(depth, draft path prob, accepted) -> per depth: nodes, mean predicted, accept rate and their
    ratio (``scale``: what ``Calibration.scale_t1`` holds when measured at T = 1)."""
    out = []
    for d in sorted({t[0] for t in triples}):
        sel = [(p, a) for dd, p, a in triples if dd == d]
        pred = sum(p for p, _ in sel)
        acc = sum(1 for _, a in sel if a)
        out.append(dict(depth=d, n=len(sel), mean_predicted=round(pred / len(sel), 4),
                        accept_rate=round(acc / len(sel), 4), scale=round(acc / pred, 4) if pred > 0 else None))
    return out


def _tree_settings(gen, total_tokens, depth, tree_top_k) -> dict:
    fixed = any(x is not None for x in (total_tokens, depth, tree_top_k))
    return dict(total_tokens=gen.tree.total_tokens if total_tokens is None else total_tokens,
                depth=gen.tree.depth if depth is None else depth,
                tree_top_k=gen.tree.top_k if tree_top_k is None else tree_top_k,
                adaptive=gen.tree.adaptive and not fixed, max_nodes=gen.tree.max_nodes, max_depth=gen.tree.max_depth)


def _tune_curve(gen) -> tuple[list[dict] | None, float | None]:
    """tokens/s per candidate from ``eagle2 tune``'s file, if it was measured for this model/head/dtype."""
    from .api import tuned_path

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


def _sweep(gen, prompts, sweep, tree, max_new_tokens, temperature) -> tuple[list[dict], float]:
    """eagle2 tokens/s at each total_tokens (depth and top-k fixed) on a few first turns, and
    vanilla tokens/s measured alongside (the same minutes of a noisy machine) as the baseline."""
    runs = [None] + list(sweep)
    acc = {tt: [0, 0.0, 0] for tt in runs}
    for i, msgs in enumerate(prompts):
        for tt in runs:
            kw = dict(method="vanilla") if tt is None else dict(method="eagle2", total_tokens=tt, depth=tree["depth"],
                                                                 tree_top_k=tree["tree_top_k"])
            t0 = time.perf_counter()
            r = gen.generate(msgs, max_new_tokens=max_new_tokens, temperature=temperature, seed=i, **kw)
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


# ---- the benchmark --------------------------------------------------------------------------
def run_bench(gen, questions: list[dict], methods=DEFAULT_METHODS, *, out_dir, max_new_tokens: int = 256,
              temperature: float = 0.0, turns: int = 2, total_tokens: int | None = None, depth: int | None = None,
              tree_top_k: int | None = None, sweep="auto", seed: int = 0, prompt_lookup: int = 10,
              progress: bool = True, questions_file: str | None = None) -> dict:
    """Benchmark ``methods`` on ``questions`` with an already loaded ``Eagle2Generator``.

    sweep: total_tokens values for the tokens/s-vs-tree-size curve (eagle2 on the first question's
    first turn, at most 32 new tokens), "auto" (tune's curve when present, else 8,16,32) or None / []
    for none. Writes the files into ``out_dir`` and returns
    the results dict (what results.json holds)."""
    from tqdm.auto import tqdm

    from . import plots

    methods = parse_methods(methods)
    if not questions:
        raise ValueError("no questions to run")
    if turns not in (1, 2):
        raise ValueError(f"turns must be 1 or 2; got {turns}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if not gen.tokenizer.chat_template:
        raise ValueError("bench needs a chat model (its tokenizer has no chat template)")
    tree = _tree_settings(gen, total_tokens, depth, tree_top_k)
    from .config import TreeConfig

    TreeConfig(total_tokens=tree["total_tokens"], depth=tree["depth"], top_k=tree["tree_top_k"])  # validates
    tree_kw = dict(total_tokens=total_tokens, depth=depth, tree_top_k=tree_top_k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    runners, notes = make_runners(gen, methods, tree_kw, prompt_lookup=prompt_lookup)
    active = [m for m in methods if m in runners]
    for m, note in notes.items():
        print(f"note: {m} {note}", file=sys.stderr)

    # Warm-up: one short generation per method (first-call allocations, lazy init, caches).
    warm = [{"role": "user", "content": questions[0]["turns"][0]}]
    for m in active:
        runners[m](warm, min(8, max_new_tokens), temperature, seed)

    records: list[dict] = []
    answers: dict = {}  # (question index, method) -> [Answer per turn]
    n_turns = [min(turns, len(q["turns"])) for q in questions]
    bar = tqdm(total=sum(n_turns) * len(active), desc="bench", unit="answer", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for qi, q in enumerate(questions):
        order = active[qi % len(active):] + active[:qi % len(active)] if active else []
        for m in order:
            msgs: list[dict] = []
            for ti in range(n_turns[qi]):
                msgs.append({"role": "user", "content": q["turns"][ti]})
                a = runners[m](list(msgs), max_new_tokens, temperature, seed + 1000 * qi + ti)
                msgs.append({"role": "assistant", "content": a.text})
                answers.setdefault((qi, m), []).append(a)
                records.append(dict(index=qi, question_id=q["question_id"], category=q["category"], turn=ti + 1, method=m,
                                    new_tokens=len(a.token_ids), seconds=a.seconds, forwards=a.forwards))
                bar.set_postfix_str(f"{m} q{q['question_id']} t{ti + 1} {len(a.token_ids) / a.seconds:.1f} tok/s")
                bar.update(1)
    bar.close()

    # Exactness at T = 0: same new token ids as the reference, prompt by prompt.
    greedy, reference = {}, None
    if temperature == 0:
        reference = "hf" if "hf" in active else ("vanilla" if "vanilla" in active else None)
        if reference:
            for m in active:
                if m == reference:
                    continue
                same = total = 0
                for qi in range(len(questions)):
                    ref, got = answers[(qi, reference)], answers[(qi, m)]
                    for ra, ga in zip(ref, got):
                        total += 1
                        same += ra.token_ids == ga.token_ids
                greedy[m] = round(same / total, 4) if total else None
        for r in records:
            if reference and r["method"] != reference:
                ra = answers[(r["index"], reference)][r["turn"] - 1]
                r["identical"] = ra.token_ids == answers[(r["index"], r["method"])][r["turn"] - 1].token_ids

    overall = _aggregate(records, active)
    cats = sorted({q["category"] for q in questions}, key=[q["category"] for q in questions].index)
    per_category = {c: _aggregate([r for r in records if r["category"] == c], active) for c in cats}
    accept_lengths = {m: [x for (_, mm), al in answers.items() if mm == m for a in al for x in a.accept_lengths]
                      for m in active if m != "vanilla" and is_engine(m)}
    confidence = {m: [x for (_, mm), al in answers.items() if mm == m for a in al for x in a.draft_confidence]
                  for m in accept_lengths}
    calib = {m: calibration_bins([(p, a) for d, p, a in v if d == 1]) for m, v in confidence.items()}
    for m in accept_lengths:
        mine = [a for (_, mm), al in answers.items() if mm == m for a in al]
        overall[m]["tree_per_round"] = tree_per_round(mine)
        overall[m]["calibration_per_depth"] = calibration_per_depth(confidence[m])
    for m, v in accept_lengths.items():
        if m in overall:
            overall[m]["accept_length_hist"] = {str(k): v.count(k) for k in sorted(set(v))}
            overall[m]["accept_rate_per_depth"] = accept_rate_per_depth(v)
    for m in active:
        if is_engine(m) and m in overall:
            overall[m]["round_profile_ms"] = round_profile([a for (_, mm), al in answers.items() if mm == m
                                                            for a in al])

    # tokens/s against total_tokens: tune's measured curve when present, else a small sweep.
    curve, curve_source, curve_vanilla = None, None, None
    if sweep == "auto":
        curve, curve_vanilla = _tune_curve(gen)
        curve_source = "tune" if curve else None
        sweep = None if curve else [8, 16, 32]
    if sweep:  # kept small: the first question's first turn, at most 32 new tokens
        sweep_prompts = [[{"role": "user", "content": questions[0]["turns"][0]}]]
        curve, curve_vanilla = _sweep(gen, sweep_prompts, [int(s) for s in sweep], tree, min(32, max_new_tokens),
                                      temperature)
        curve_source = "sweep"

    results = dict(
        model=gen.model_key, head=gen.head_source, dtype=dtype_name(gen.dtype),
        device=str(gen.device), tree=tree, max_new_tokens=max_new_tokens, temperature=temperature, turns=turns,
        questions_file=questions_file, n_questions=len(questions), n_prompts=sum(n_turns),
        methods=overall, per_category=per_category, greedy_identical=greedy, greedy_reference=reference,
        skipped=notes, machine=machine_info(), calibration=calib,
        total_tokens_curve=dict(source=curve_source, points=curve or [], vanilla_tokens_per_s=curve_vanilla),
        prompts=records, wall_seconds=None, plots={})

    baseline = "hf" if "hf" in active else ("vanilla" if "vanilla" in active else None)
    written = {
        "speedup": plots.speedup_per_category({**per_category, "all": overall}, active, baseline,
                                              out / "speedup_per_category.png") if baseline else None,
        "accept_hist": plots.accept_histogram(accept_lengths, out / "accept_length_hist.png"),
        "calibration": plots.calibration(calib, out / "draft_calibration.png"),
        "total_tokens": plots.tokens_per_s_vs_total_tokens(curve or [], out / "tokens_per_s_vs_total_tokens.png",
                                                           title=f"eagle2 tokens/s vs tree size ({curve_source})",
                                                           baseline=curve_vanilla),
    }
    results["plots"] = {k: Path(v).name for k, v in written.items() if v}
    with (out / "answers.jsonl").open("w") as f:
        for (qi, m), al in answers.items():
            f.write(json.dumps({"question_id": questions[qi]["question_id"], "method": m, "turns": [a.text for a in al],
                                "token_ids": [a.token_ids for a in al]}) + "\n")
    results["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render_markdown(results))
    return results


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _tree_text(t: dict) -> str:
    fixed = f"total_tokens {t['total_tokens']}, depth {t['depth']}, top-k {t['tree_top_k']}"
    if t.get("adaptive"):
        return (f"eagle2 tree: cost-aware (at most {t['max_nodes']} nodes, {t['max_depth']} levels, top-k "
                f"{t['tree_top_k']}); fixed shapes: {fixed}")
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


def render_markdown(r: dict) -> str:
    m = r["methods"]
    lines = [f"# eagle2 bench: {r['model']}", "",
             f"{r['n_questions']} questions ({r['n_prompts']} prompts, up to {r['turns']} turns), "
             f"max {r['max_new_tokens']} new tokens, temperature {r['temperature']}, dtype {r['dtype']}, "
             f"device {r['device']}; {_tree_text(r['tree'])}; head: {r['head']}.",
             f"Machine: {r['machine']['cpu']} ({r['machine']['torch_threads']} torch threads), "
             f"torch {r['machine']['torch']}, transformers {r['machine']['transformers']}. "
             f"Wall time {r['wall_seconds']} s.", "",
             "| method | tokens/s | speedup vs hf | speedup vs vanilla | tau (tokens/forward) | new tokens | seconds "
             "| greedy identical |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in m.items():
        gi = r["greedy_identical"].get(name)
        lines.append(f"| {name} | {s['tokens_per_s']:.2f} | {_f(s['speedup_vs_hf'])} | {_f(s['speedup_vs_vanilla'])} "
                     f"| {_f(s['mean_accept_len'])} | {s['new_tokens']} | {s['seconds']:.2f} | {_f(gi)} |")
    if r["greedy_reference"]:
        lines += ["", f"Greedy identical: fraction of prompts whose new token ids equal `{r['greedy_reference']}`'s."]
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
        lines += ["", "## Acceptance rate per draft depth (P(depth d accepted | depth d-1 accepted))", ""]
        for n, v in rates.items():
            lines.append(f"- {n}: " + ", ".join(f"d{d + 1} {x:.2f}" for d, x in enumerate(v)))
    lines += _tree_lines(m)
    for note in r.get("skipped", {}).items():
        lines.append(f"- {note[0]}: {note[1]}")
    lines += ["", "## Per category", "", "tokens/s (speedup vs hf, tau)", ""]
    names = list(m)
    lines += ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cat, cm in r["per_category"].items():
        cells = []
        for n in names:
            s = cm.get(n)
            cells.append("—" if s is None else
                         f"{s['tokens_per_s']:.1f} ({_f(s['speedup_vs_hf'])}x, {_f(s['mean_accept_len'])})")
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
                       "speedup_vs_hf": {k: v["speedup_vs_hf"] for k, v in r["methods"].items()},
                       "mean_accept_len": {k: v["mean_accept_len"] for k, v in r["methods"].items()},
                       "greedy_identical": r["greedy_identical"]})
