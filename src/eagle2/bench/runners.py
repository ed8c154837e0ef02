"""Bench runners: one callable per method that answers a conversation and times it.

Every runner takes (messages, max_new_tokens, temperature, seed) and returns an ``Answer`` whose
wall-clock time covers everything a user would pay for (prompt encoding, generation,
detokenization). Nothing here aggregates or reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .inputs import ENGINE_METHODS, fixed_shape, head_variant


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
    accept_stops: list = field(default_factory=list)  # per drafted round: (accepted, last accepted node had children)
    phases: dict = field(default_factory=dict)  # engine methods: prefill / draft / verify seconds


class _EngineRunner:
    def __init__(self, gen, method, tree_kw):
        self.gen, self.method, self.tree_kw = gen, method, tree_kw

    def __call__(self, messages, max_new_tokens, temperature, seed) -> Answer:
        if len(messages) == 1:  # a conversation starts: another method's caches must not shorten its prefills
            self.gen.clear_cache()
        t0 = time.perf_counter()
        # a later turn reuses this conversation's cache, as a chat does (llama.cpp's runner does the same)
        r = self.gen.generate(messages, max_new_tokens=max_new_tokens, method=self.method, temperature=temperature,
                              seed=seed, **self.tree_kw)
        dt = time.perf_counter() - t0
        st = r.stats
        return Answer(list(r.token_ids), r.text, dt, st.rounds, list(st.accept_lengths),
                      draft_confidence=list(st.draft_confidence),
                      phases=dict(prefill=st.prefill_seconds, draft=st.draft_seconds, verify=st.verify_seconds),
                      tree_sizes=list(st.tree_sizes), tree_depths=list(st.tree_depths),
                      expected_accepts=list(st.expected_accepts), accept_stops=list(st.accept_stops))


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
            if ids.shape[1] >= gen.max_context:  # generate would run past the context the engine refuses
                raise ValueError(f"prompt has {ids.shape[1]} tokens; the model's context is {gen.max_context}, "
                                 "leaving no room to generate")
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
    from ..models import BUILTIN_MODELS, builtin_gguf_path

    key = gen.model_key or ""
    try:
        if key in BUILTIN_MODELS:
            return builtin_gguf_path(key)
    except ValueError:
        return None
    return Path(key) if key.endswith(".gguf") and Path(key).is_file() else None


def make_runners(gen, methods, tree_kw, prompt_lookup: int = 10, llamacpp_threads: int = 2, heads=None):
    """name -> runner; plus notes for methods that were skipped. heads: NAME -> head directory for the
    ``eagle2@NAME`` methods (``Eagle2Generator.with_head``: same model, tree and, for a head of the same
    shape, the same cost model)."""
    runners, notes = {}, {}
    for m in methods:
        if head_variant(m) is not None:
            runners[m] = _EngineRunner(gen.with_head((heads or {})[head_variant(m)]), "eagle2", tree_kw)
            continue
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
