"""Feature shards: the training examples of EAGLE heads, cut into windows and stored on disk.

A training example is one conversation's window (``windows``: the whole prompt by default, or the
assistant part plus ``context`` prompt tokens; at most ``max_len`` tokens, dropping the oldest
prompt tokens first, then the end of the answer) with the target's features at those positions.
Both the responses stage (features captured while generating, ``example_from_generation``) and
the features stage (features.py) write them here; the trainers read them back.

On disk: ``shard-NNNNN.safetensors``, each covering the responses records named in its ``ids``
metadata, written atomically (temp file + rename), so an interrupted run resumes by shard.
Tensors per shard (N = total stored tokens, n = examples): ``hidden`` [N, W] bf16 (W = H for
EAGLE-1/2, 4H for EAGLE-3), ``tokens`` [N] int64, ``offsets`` [n + 1] int64 (example i is rows
offsets[i]:offsets[i+1]), ``start`` [n] int64 (index in the window of the first assistant token),
``pos0`` [n] int64 (absolute position of the window's first token). The metadata names the window
settings (``context``, ``max_len``); shards made with other settings are not reused. This module
runs no model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class Example:
    hidden: Tensor  # [T, H] target features (after final norm), bf16
    tokens: Tensor  # [T] long: the tokens at those positions
    start: int  # index in the window of the first assistant token
    pos0: int = 0  # absolute position of tokens[0]


def windows(records: list[dict], context: int | None, max_len: int) -> list[tuple[list[int], int, int]]:
    """(ids, window start s, assistant start p) per record: the window is ids[s:], at most ``max_len``
    long. context None: the whole prompt (s = 0), else its last ``context`` tokens. An overlong
    window drops its oldest prompt tokens first (keeping one before the answer), then cuts the answer.

    E.g. prompt 6 + answer 4 tokens, max_len 8, context None: s = 2, p = 6 (window ids[2:10])."""
    out = []
    for r in records:
        ids = list(r["prompt_ids"]) + list(r["response_ids"])
        p = len(r["prompt_ids"])
        if p >= len(ids) - 1 or p == 0:  # no assistant tokens to learn from
            out.append((ids, 0, -1))
            continue
        s = 0 if context is None else max(0, p - context)
        if len(ids) - s > max_len:
            s = max(s, min(p - 1, len(ids) - max_len))
            ids = ids[: s + max_len]
        out.append((ids, s, p))
    return out


def window_example(ids: list[int], s: int, p: int, hidden: Tensor) -> Example:
    """The window [s:] of one conversation (assistant from p) and its features ([>= len(ids), H])."""
    return Example(hidden=hidden[s:len(ids)].to(torch.bfloat16).clone(), tokens=torch.tensor(ids[s:], dtype=torch.long),
                   start=p - s, pos0=s)


def window_meta(context: int | None, max_len: int) -> dict[str, str]:
    """Shard metadata naming the window settings its examples were cut with."""
    return {"context": "full" if context is None else str(context), "max_len": str(max_len)}


def _shard_path(d: Path, k: int) -> Path:
    return d / f"shard-{k:05d}.safetensors"


def _shard_meta(path: Path) -> dict:
    """A finished shard's metadata ({} if unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def _matching_shards(out_dir: str | Path, window: dict[str, str] | None) -> list[tuple[Path, dict]]:
    """(path, metadata) of the shards of ``out_dir`` in order; with ``window``, only those cut with it."""
    out = []
    for path in sorted(Path(out_dir).glob("shard-*.safetensors")):
        meta = _shard_meta(path)
        if window is None or all(meta.get(k) == v for k, v in window.items()):
            out.append((path, meta))
    return out


def covered_ids(out_dir: str | Path, window: dict[str, str] | None = None) -> set[str]:
    """Ids of every record that some shard in ``out_dir`` (cut with ``window``, if given) already holds."""
    done: set[str] = set()
    for _, meta in _matching_shards(out_dir, window):
        if meta.get("ids") is not None:
            done.update(json.loads(meta["ids"]))
    return done


def write_shard(out_dir: str | Path, ids: list[str], examples: list[tuple[str, Example]], hidden_size: int,
                context: int | None, max_len: int) -> Path:
    """Write one shard (atomically) under the next free index. ``ids``: the responses records it
    covers (a record without assistant tokens gives no example but is covered all the same);
    ``examples``: (record id, example) pairs."""
    from safetensors.torch import save_file

    example_ids = [i for i, _ in examples]
    examples = [e for _, e in examples]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[6:11]) for p in out_dir.glob("shard-*.safetensors") if p.name[6:11].isdigit()]
    path = _shard_path(out_dir, max(taken, default=-1) + 1)
    lens = torch.tensor([0] + [len(e.tokens) for e in examples], dtype=torch.long)
    tensors = {
        "hidden": (torch.cat([e.hidden for e in examples]) if examples
                   else torch.zeros(0, hidden_size, dtype=torch.bfloat16)).contiguous(),  # [N, H] bf16
        "tokens": torch.cat([e.tokens for e in examples]) if examples else torch.zeros(0, dtype=torch.long),  # [N]
        "offsets": lens.cumsum(0),  # [n + 1]
        "start": torch.tensor([e.start for e in examples], dtype=torch.long),  # [n]
        "pos0": torch.tensor([e.pos0 for e in examples], dtype=torch.long),  # [n]
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"ids": json.dumps(list(ids)),
                                           "example_ids": json.dumps(example_ids),
                                           **window_meta(context, max_len)})
    os.replace(tmp, path)
    return path


def example_from_generation(prompt_ids: list[int], response_ids: list[int], hidden: Tensor,
                            context: int | None, max_len: int) -> Example | None:
    """The training window of a conversation whose features were captured while generating it.

    hidden: [P + n, H], the features of the prompt and of the first n response tokens (the
    last generated token is never fed back, so n may be len(response) - 1)."""
    rec = dict(prompt_ids=prompt_ids, response_ids=list(response_ids)[: hidden.shape[0] - len(prompt_ids)])
    ids, s, p = windows([rec], context, max_len)[0]
    return window_example(ids, s, p, hidden) if p >= 0 else None


def load_shards(feature_dir: str | Path, exclude: set[str] | None = None, window: dict[str, str] | None = None,
                only: set[str] | None = None) -> list[Example]:
    """Every example of every shard (cut with ``window`` settings, if given), in shard order, each
    record once, none of ``exclude`` (held-out prompts: a record captured before ``--dev-prompts``
    grew is not trained on) and, with ``only``, only those records. Features stay bf16."""
    from safetensors.torch import load_file

    out, seen = [], set()
    for path, meta in _matching_shards(feature_dir, window):
        t = load_file(str(path))
        off = t["offsets"].tolist()
        names = json.loads(meta.get("example_ids") or meta.get("ids") or "[]")  # older shards: "ids" only
        if len(names) != len(off) - 1:  # (unnamed rows are loaded as they are)
            names = [None] * (len(off) - 1)
        for i, name in zip(range(len(off) - 1), names):
            if name is not None and (name in seen or (exclude and name in exclude)
                                     or (only is not None and name not in only)):  # regenerated / held out
                continue
            seen.add(name)
            out.append(Example(hidden=t["hidden"][off[i]:off[i + 1]], tokens=t["tokens"][off[i]:off[i + 1]],
                               start=int(t["start"][i]), pos0=int(t["pos0"][i])))
    return out
