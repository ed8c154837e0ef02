"""Stage 2 of training: the target's features over prompt + response.

The frozen target runs over each conversation (prompt ids + response ids from stage 1); we keep
its last hidden states (after the final norm: the EAGLE features, bf16) and the tokens for the
assistant part plus ``context`` prompt tokens before it. The head is trained on that window.

On disk: ``features/shard-NNNNN.safetensors``, shard k holding responses records
[k * shard_size, (k + 1) * shard_size) in file order, written atomically (temp file + rename),
so an interrupted run resumes by shard. A trailing partial shard is redone when more responses
have arrived since. Tensors per shard (N = total stored tokens, n = examples):
``hidden`` [N, H] bf16, ``tokens`` [N] int64, ``offsets`` [n + 1] int64 (example i is rows
offsets[i]:offsets[i+1]), ``start`` [n] int64 (index in the window of the first assistant
token), ``pos0`` [n] int64 (absolute position of the window's first token).

``stream_examples`` yields the same examples computed on the fly (no disk; for big targets).
This module runs the target but knows nothing about the head or the loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from .responses import read_responses


@dataclass
class Example:
    hidden: Tensor  # [T, H] target features (after final norm), bf16
    tokens: Tensor  # [T] long: the tokens at those positions
    start: int  # index in the window of the first assistant token
    pos0: int = 0  # absolute position of tokens[0]


def _windows(records: list[dict], context: int, max_len: int) -> list[tuple[list[int], int, int]]:
    """(full ids, window start, assistant start) per record; overlong conversations are cut at max_len."""
    out = []
    for r in records:
        ids = list(r["prompt_ids"]) + list(r["response_ids"])
        ids = ids[:max_len]
        p = len(r["prompt_ids"])
        if p >= len(ids) - 1:  # no assistant tokens to learn from
            out.append((ids, 0, -1))
            continue
        out.append((ids, max(0, p - context), p))
    return out


_LEAN: dict = {}


def _lean(model):
    """The model's ``FastTarget`` when the lean forward supports it (built once), else None."""
    from ..fast import FastTarget, supports

    key = id(model)
    if key not in _LEAN:
        _LEAN.clear()
        _LEAN[key] = FastTarget(model) if supports(model)[0] else None
    return _LEAN[key]


@torch.inference_mode()
def target_features(model, batch_ids: list[list[int]]) -> list[Tensor]:
    """Last hidden states (after the final norm) for each sequence: list of [T_i, H] bf16.

    Sequences are right padded into one batch; causal attention keeps padding out of real rows."""
    dev = next(model.parameters()).device
    width = max(len(x) for x in batch_ids)
    ids = torch.zeros(len(batch_ids), width, dtype=torch.long)  # [B, W]
    attn = torch.zeros(len(batch_ids), width, dtype=torch.long)  # [B, W]
    for i, x in enumerate(batch_ids):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
    fast = _lean(model)
    if fast is not None:  # the lean forward: same features, less overhead (fast.py)
        ids, attn = ids.to(dev), attn.to(dev).bool()
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        cache = fast.new_cache(capacity=width, batch=len(batch_ids))
        positions = torch.arange(width, device=dev).expand(len(batch_ids), -1)
        hid = fast.batch_forward(cache, ids, positions, causal[None] & attn[:, None, :])  # [B, W, H]
        return [hid[i, : len(x)].to(torch.bfloat16).cpu() for i, x in enumerate(batch_ids)]
    out = model.get_decoder()(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False)
    hid = out.last_hidden_state  # [B, W, H]
    return [hid[i, : len(x)].to(torch.bfloat16).cpu() for i, x in enumerate(batch_ids)]


def _examples_for(model, records: list[dict], context: int, max_len: int, batch_size: int) -> list[Example | None]:
    wins = _windows(records, context, max_len)
    out: list[Example | None] = [None] * len(wins)
    order = sorted(range(len(wins)), key=lambda i: len(wins[i][0]))  # little padding per batch
    for b0 in range(0, len(order), batch_size):
        idx = [i for i in order[b0:b0 + batch_size] if wins[i][2] >= 0]
        if not idx:
            continue
        feats = target_features(model, [wins[i][0] for i in idx])
        for i, f in zip(idx, feats):
            ids, s, p = wins[i]
            out[i] = Example(hidden=f[s:].clone(), tokens=torch.tensor(ids[s:], dtype=torch.long), start=p - s, pos0=s)
    return out


def _shard_path(d: Path, k: int) -> Path:
    return d / f"shard-{k:05d}.safetensors"


def _shard_count(path: Path) -> int | None:
    """Number of responses records a finished shard covers (None if absent / unreadable)."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["records"])
    except Exception:
        return None


def build_features(model, responses: str | Path, out_dir: str | Path, *, shard_size: int = 64, context: int = 32,
                   max_len: int = 1024, batch_size: int = 4, exclude: set[str] | None = None,
                   progress: bool = True, max_seconds: float | None = None) -> dict:
    """Compute every missing shard. Returns {"shards", "examples", "tokens", "new_shards"}."""
    import time

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [r for r in read_responses(responses) if not exclude or r["id"] not in exclude]
    n_shards = (len(records) + shard_size - 1) // shard_size
    todo = []
    for k in range(n_shards):
        want = min(shard_size, len(records) - k * shard_size)
        if _shard_count(_shard_path(out_dir, k)) != want:
            todo.append(k)
    t0, new = time.time(), 0
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), desc="features", unit="shard", disable=not progress,
               dynamic_ncols=True)
    for k in todo:
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
        recs = records[k * shard_size:(k + 1) * shard_size]
        exs = [e for e in _examples_for(model, recs, context, max_len, batch_size) if e is not None]
        hidden = torch.cat([e.hidden for e in exs]) if exs else torch.zeros(0, model.config.hidden_size,
                                                                             dtype=torch.bfloat16)
        lens = torch.tensor([0] + [len(e.tokens) for e in exs], dtype=torch.long)
        tensors = {
            "hidden": hidden.contiguous(),  # [N, H] bf16
            "tokens": torch.cat([e.tokens for e in exs]) if exs else torch.zeros(0, dtype=torch.long),  # [N]
            "offsets": lens.cumsum(0),  # [n + 1]
            "start": torch.tensor([e.start for e in exs], dtype=torch.long),  # [n]
            "pos0": torch.tensor([e.pos0 for e in exs], dtype=torch.long),  # [n]
        }
        path = _shard_path(out_dir, k)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"records": str(len(recs)), "context": str(context)})
        os.replace(tmp, path)
        new += 1
        bar.update(1)
    bar.close()
    shards = sorted(out_dir.glob("shard-*.safetensors"))
    return dict(shards=len(shards), new_shards=new, complete=new == len(todo))


def load_shards(feature_dir: str | Path) -> list[Example]:
    """Every example of every shard, in shard order (features stay bf16)."""
    from safetensors.torch import load_file

    out = []
    for path in sorted(Path(feature_dir).glob("shard-*.safetensors")):
        t = load_file(str(path))
        off = t["offsets"].tolist()
        for i in range(len(off) - 1):
            out.append(Example(hidden=t["hidden"][off[i]:off[i + 1]], tokens=t["tokens"][off[i]:off[i + 1]],
                               start=int(t["start"][i]), pos0=int(t["pos0"][i])))
    return out


class StreamedExamples:
    """Examples computed on the fly from the responses JSONL (no feature cache), one record at a
    time, for targets whose features would not fit on disk. Indexable like a list."""

    def __init__(self, model, responses: str | Path, *, context: int = 32, max_len: int = 1024,
                 exclude: set[str] | None = None):
        self.model = model
        self.records = [r for r in read_responses(responses) if not exclude or r["id"] not in exclude]
        self.records = [r for r in self.records if len(r["response_ids"]) > 1]
        self.context, self.max_len = context, max_len

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        ex = _examples_for(self.model, [self.records[i]], self.context, self.max_len, 1)[0]
        assert ex is not None
        return ex

    def lengths(self) -> list[int]:
        """Window length of every example, without running the target."""
        out = []
        for ids, s, p in _windows(self.records, self.context, self.max_len):
            out.append(len(ids) - s)
        return out


def stream_examples(model, responses: str | Path, **kw) -> Iterator[Example]:
    ds = StreamedExamples(model, responses, **kw)
    for i in range(len(ds)):
        yield ds[i]
