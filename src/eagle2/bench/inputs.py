"""Bench inputs: the method names ``eagle2 bench`` knows and the FastChat question files it reads."""

from __future__ import annotations

import json
import re
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


_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,40}")  # a --compare-head NAME


def head_variant(name: str) -> str | None:
    """``eagle2@NAME`` -> ``NAME``: the cost-aware tree drafted by another head (``--compare-head
    NAME=DIR``); anything else -> None."""
    if not name.startswith("eagle2@"):
        return None
    label = name.split("@", 1)[1]
    return label if _LABEL.fullmatch(label) else None


def is_engine(name: str) -> bool:
    return name in ENGINE_METHODS or fixed_shape(name) is not None or head_variant(name) is not None


def parse_methods(text: str | list | tuple) -> list[str]:
    methods = [m.strip() for m in text.split(",")] if isinstance(text, str) else [str(m).strip() for m in text]
    methods = [m for m in methods if m]
    if not methods:
        raise ValueError("no methods given")
    bad = [m for m in methods if m not in ALL_METHODS and fixed_shape(m) is None and head_variant(m) is None]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(ALL_METHODS)}, or eagle2:NxDxK "
                         "(a fixed EAGLE-2 tree: N nodes, D levels, top-k K), eagle2:fixed (the tuned fixed tree) "
                         "or eagle2@NAME (another head, given by --compare-head NAME=DIR)")
    same = [_shape_key(m) for m in methods]
    if len(set(same)) != len(same):
        raise ValueError("a method is listed twice")
    return methods


def _shape_key(m: str):
    """What a method runs: eagle2:16x4x8 and eagle2:16x04x8 are the same tree."""
    shape = fixed_shape(m)
    return tuple(sorted(shape.items())) if shape else m


def parse_heads(specs) -> dict[str, str]:
    """``["e3f=/tmp/e3f", ...]`` -> {"e3f": "/tmp/e3f"}: the heads ``eagle2@NAME`` methods draft with."""
    heads: dict[str, str] = {}
    for spec in specs or []:
        label, sep, directory = spec.partition("=")
        label = label.strip()
        if not sep or not directory.strip():
            raise ValueError(f"--compare-head takes NAME=DIR; got {spec!r}")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"head name {label!r}: use 1-40 letters, digits, '_', '.' or '-'")
        if label in heads:
            raise ValueError(f"head name {label!r} is given twice")
        if not Path(directory).is_dir():
            raise ValueError(f"head directory not found: {directory}")
        if not (Path(directory) / "config.json").is_file():
            raise ValueError(f"--compare-head {label}={directory}: no config.json there, so it is not a head directory")
        heads[label] = directory
    return heads


def with_heads(methods: list[str], heads: dict[str, str]) -> list[str]:
    """``methods`` plus ``eagle2@NAME`` for each head not listed yet; every listed ``eagle2@NAME``
    must name a given head."""
    missing = [m for m in methods if head_variant(m) is not None and head_variant(m) not in heads]
    if missing:
        raise ValueError(f"{missing[0]} needs --compare-head {head_variant(missing[0])}=DIR")
    return methods + [f"eagle2@{h}" for h in heads if f"eagle2@{h}" not in methods]


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
        if not cats:
            raise ValueError(f"--categories {categories!r} names no category")
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
