"""Stage 2 of training: the target's features over prompt + response, as feature shards.

The frozen target runs over each conversation (prompt ids + response ids from the corpus); we keep
its last hidden states (after the final norm: the EAGLE features, bf16) over the conversation's
training window (shards.py: the whole prompt by default, as the head sees it at inference) and
write them as shards (shards.py's format) that the trainer reads.

When the target runs on the lean forward, the responses stage captures these features while it
generates (the forward that produces token t_{i+1} already computes f_i), writes them as shards
and this stage only fills in the records that have none: no second pass over the data. Which
forward runs is ``fast.make_target``'s choice, made once per stage.

``stream_examples`` yields the same examples computed on the fly (no disk; for big targets).
This module runs the target but knows nothing about the head or the loss.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from .. import masks
from ..config import Backend
from ..fast import FastTarget, make_target
from .responses import read_responses
from .shards import Example, covered_ids, window_example, window_meta, windows, write_shard

# A batch of token-id sequences -> the features of each, [T_i, W] bf16 on the CPU (W = H, or 4H for EAGLE-3).
FeatureFn = Callable[[list[list[int]]], list[Tensor]]


def pad_batch(batch_ids: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad sequences into one batch: (ids [B, W] long, attention mask [B, W] long, 1 = real)."""
    width = max(len(x) for x in batch_ids)
    ids = torch.zeros(len(batch_ids), width, dtype=torch.long)
    attn = torch.zeros(len(batch_ids), width, dtype=torch.long)
    for i, x in enumerate(batch_ids):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
    return ids, attn


def last_hidden(model, backend: Backend | str | None = None) -> FeatureFn:
    """The EAGLE-1/2 features: last hidden states after the final norm, on the forward ``fast.make_target``
    picks for ``model`` (built here, once). Features are prefills, batched or not: they take ATen's attention
    (``exact=False``) whatever the batch, so a sequence's features do not depend on what it was batched with."""
    target = make_target(model, Backend.of(backend, exact=False))
    return partial(_last_hidden, model, target if isinstance(target, FastTarget) else None)


@torch.inference_mode()
def _last_hidden(model, lean: FastTarget | None, batch_ids: list[list[int]]) -> list[Tensor]:
    """[T_i, H] bf16 per sequence, through ``lean`` or else transformers' decoder. Sequences are right
    padded into one batch; causal attention keeps padding out of real rows."""
    dev = next(model.parameters()).device
    ids, attn = pad_batch(batch_ids)  # [B, W]
    width = ids.shape[1]
    if lean is not None:  # the lean forward: same features, less overhead (fast.py)
        ids, attn = ids.to(dev), attn.to(dev).bool()
        cache = lean.new_cache(capacity=width, batch=len(batch_ids))
        positions = torch.arange(width, device=dev).expand(len(batch_ids), -1)
        allowed = masks.causal(width, device=dev)[None] & attn[:, None, :]  # [B, W, W]
        hid = lean.batch_forward(cache, ids, positions, allowed)  # [B, W, H]
        return [hid[i, : len(x)].to(torch.bfloat16).cpu() for i, x in enumerate(batch_ids)]
    out = model.get_decoder()(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False)
    hid = out.last_hidden_state  # [B, W, H]
    return [hid[i, : len(x)].to(torch.bfloat16).cpu() for i, x in enumerate(batch_ids)]


def _examples_for(features: FeatureFn, records: list[dict], context: int | None, max_len: int,
                  batch_size: int) -> list[Example | None]:
    """Each record's training window with its ``features`` (``last_hidden``, or EAGLE-3's captured
    layers from eagle3.py), None for a record without assistant tokens."""
    wins = windows(records, context, max_len)
    out: list[Example | None] = [None] * len(wins)
    order = sorted(range(len(wins)), key=lambda i: len(wins[i][0]))  # little padding per batch
    for b0 in range(0, len(order), batch_size):
        idx = [i for i in order[b0:b0 + batch_size] if wins[i][2] >= 0]
        if not idx:
            continue
        feats = features([wins[i][0] for i in idx])
        for i, f in zip(idx, feats):
            out[i] = window_example(*wins[i], f)
    return out


def _records(responses: str | Path | list[dict]) -> list[dict]:
    """Training records ({"id", "prompt_ids", "response_ids"}): a list as given, or read from a responses JSONL."""
    return list(responses) if isinstance(responses, list) else read_responses(responses)


def build_features(model, responses: str | Path | list[dict], out_dir: str | Path, *, shard_size: int = 64,
                   context: int | None = None, max_len: int = 1024, batch_size: int = 4,
                   exclude: set[str] | None = None, progress: bool = True, max_seconds: float | None = None,
                   features: FeatureFn | None = None) -> dict:
    """Compute the features of every record (``Corpus.records()`` or a responses JSONL) that no
    shard cut with the same window settings holds yet (records whose features were captured by the
    responses stage are skipped). ``features``: None for ``last_hidden(model)``. Returns {"shards",
    "new_shards", "complete"}."""
    import time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob("*.tmp"):
        tmp.unlink()
    done = covered_ids(out_dir, window_meta(context, max_len))
    records = [r for r in _records(responses)
               if (not exclude or r["id"] not in exclude) and r["id"] not in done]
    chunks = [records[k:k + shard_size] for k in range(0, len(records), shard_size)]
    features = features or last_hidden(model)
    t0, new = time.time(), 0
    bar = tqdm(total=len(chunks), desc="features", unit="shard", disable=not progress, dynamic_ncols=True)
    for recs in chunks:
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
        exs = _examples_for(features, recs, context, max_len, batch_size)
        write_shard(out_dir, [r["id"] for r in recs], [(r["id"], e) for r, e in zip(recs, exs) if e is not None],
                    model.config.hidden_size, context, max_len)
        new += 1
        bar.update(1)
    bar.close()
    shards = sorted(out_dir.glob("shard-*.safetensors"))
    return dict(shards=len(shards), new_shards=new, complete=new == len(chunks))


class StreamedExamples:
    """Examples computed on the fly from the training records (no feature cache), for targets whose
    features would not fit on disk, or on a GPU, where the target's forward costs less than reading a
    cache. Indexable like a list; ``batch`` computes a whole training step's examples in one padded
    forward. ``features``: the feature function (default: ``last_hidden``, EAGLE-1/2)."""

    def __init__(self, model, responses: str | Path | list[dict], *, context: int | None = None, max_len: int = 1024,
                 exclude: set[str] | None = None, backend: Backend | str | None = None,
                 features: FeatureFn | None = None):
        self.features = features or last_hidden(model, backend)
        self.records = [r for r in _records(responses) if not exclude or r["id"] not in exclude]
        self.records = [r for r in self.records if len(r["response_ids"]) > 1]
        self.context, self.max_len = context, max_len

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        ex = _examples_for(self.features, [self.records[i]], self.context, self.max_len, 1)[0]
        assert ex is not None
        return ex

    def batch(self, idx: list[int]) -> list[Example]:
        """The examples ``idx``, in that order, from one batched target forward."""
        exs = _examples_for(self.features, [self.records[i] for i in idx], self.context, self.max_len, len(idx))
        assert all(e is not None for e in exs)
        return exs

    def lengths(self) -> list[int]:
        """Window length of every example, without running the target."""
        out = []
        for ids, s, p in windows(self.records, self.context, self.max_len):
            out.append(len(ids) - s)
        return out


def stream_examples(model, responses: str | Path | list[dict], **kw) -> Iterator[Example]:
    ds = StreamedExamples(model, responses, **kw)
    for i in range(len(ds)):
        yield ds[i]
