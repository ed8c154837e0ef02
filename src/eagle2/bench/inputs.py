"""Bench inputs: the method names ``eagle2 bench`` knows and the FastChat question files it reads."""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

ENGINE_METHODS = ("vanilla", "chain", "eagle1", "eagle2")
HF_METHODS = ("hf", "pld")
ALL_METHODS = HF_METHODS + ENGINE_METHODS + ("llamacpp",)
DEFAULT_METHODS = ("hf", "pld", "vanilla", "eagle1", "eagle2")
SPECULATIVE = ("pld", "chain", "eagle1", "eagle2")


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
