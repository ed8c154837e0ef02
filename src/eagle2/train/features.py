"""Stage 2 of training: the target's features over prompt + response.

The frozen target runs over each conversation (prompt ids + response ids from the corpus); we keep
its last hidden states (after the final norm: the EAGLE features, bf16) and the tokens of the
whole conversation, the prompt included (``context=None``, the default: at inference the head sees
the whole prompt too), or of the assistant part plus ``context`` prompt tokens before it. A window
longer than ``max_len`` drops its oldest prompt tokens first, then the end of the answer. The head
is trained on that window.

When the target runs on the lean forward, the responses stage captures these features while it
generates (the forward that produces token t_{i+1} already computes f_i), writes them as shards
and this stage only fills in the records that have none: no second pass over the data.

On disk: ``features/shard-NNNNN.safetensors``, each covering the responses records named in its
``ids`` metadata, written atomically (temp file + rename), so an interrupted run resumes by
shard. Tensors per shard (N = total stored tokens, n = examples):
``hidden`` [N, H] bf16, ``tokens`` [N] int64, ``offsets`` [n + 1] int64 (example i is rows
offsets[i]:offsets[i+1]), ``start`` [n] int64 (index in the window of the first assistant
token), ``pos0`` [n] int64 (absolute position of the window's first token). The metadata names the
window settings (``context``, ``max_len``); shards made with other settings are not reused.

``stream_examples`` yields the same examples computed on the fly (no disk; for big targets).
This module runs the target but knows nothing about the head or the loss.
"""

from __future__ import annotations

import json
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


def _windows(records: list[dict], context: int | None, max_len: int) -> list[tuple[list[int], int, int]]:
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


_LEAN: dict = {}


def _lean(model):
    """The model's ``FastTarget`` when the lean forward supports it (built once), else None."""
    from ..fast import FastTarget, supports

    key = id(model)
    if key not in _LEAN:
        _LEAN.clear()
        _LEAN[key] = FastTarget(model) if supports(model)[0] else None
    return _LEAN[key]


def pad_batch(batch_ids: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad sequences into one batch: (ids [B, W] long, attention mask [B, W] long, 1 = real)."""
    width = max(len(x) for x in batch_ids)
    ids = torch.zeros(len(batch_ids), width, dtype=torch.long)
    attn = torch.zeros(len(batch_ids), width, dtype=torch.long)
    for i, x in enumerate(batch_ids):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
    return ids, attn


@torch.inference_mode()
def target_features(model, batch_ids: list[list[int]]) -> list[Tensor]:
    """Last hidden states (after the final norm) for each sequence: list of [T_i, H] bf16.

    Sequences are right padded into one batch; causal attention keeps padding out of real rows."""
    dev = next(model.parameters()).device
    ids, attn = pad_batch(batch_ids)  # [B, W]
    width = ids.shape[1]
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


def _examples_for(model, records: list[dict], context: int, max_len: int, batch_size: int,
                  features=target_features) -> list[Example | None]:
    """``features(model, batch_ids) -> [T_i, W]`` per sequence: the last hidden states by default
    (EAGLE-3: eagle3.py passes its captured layers)."""
    wins = _windows(records, context, max_len)
    out: list[Example | None] = [None] * len(wins)
    order = sorted(range(len(wins)), key=lambda i: len(wins[i][0]))  # little padding per batch
    for b0 in range(0, len(order), batch_size):
        idx = [i for i in order[b0:b0 + batch_size] if wins[i][2] >= 0]
        if not idx:
            continue
        feats = features(model, [wins[i][0] for i in idx])
        for i, f in zip(idx, feats):
            out[i] = _example(*wins[i], f)
    return out


def _example(ids: list[int], s: int, p: int, hidden: Tensor) -> Example:
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
    ids, s, p = _windows([rec], context, max_len)[0]
    return _example(ids, s, p, hidden) if p >= 0 else None


def _records(responses: str | Path | list[dict]) -> list[dict]:
    """Training records ({"id", "prompt_ids", "response_ids"}): a list as given, or read from a responses JSONL."""
    return list(responses) if isinstance(responses, list) else read_responses(responses)


def build_features(model, responses: str | Path | list[dict], out_dir: str | Path, *, shard_size: int = 64,
                   context: int | None = None, max_len: int = 1024, batch_size: int = 4,
                   exclude: set[str] | None = None, progress: bool = True, max_seconds: float | None = None,
                   features=target_features) -> dict:
    """Compute the features of every record (``Corpus.records()`` or a responses JSONL) that no
    shard cut with the same window settings holds yet (records whose features were captured by the
    responses stage are skipped). ``features``: as in ``_examples_for``. Returns {"shards",
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
    t0, new = time.time(), 0
    bar = tqdm(total=len(chunks), desc="features", unit="shard", disable=not progress, dynamic_ncols=True)
    for recs in chunks:
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
        exs = _examples_for(model, recs, context, max_len, batch_size, features)
        write_shard(out_dir, [r["id"] for r in recs], [(r["id"], e) for r, e in zip(recs, exs) if e is not None],
                    model.config.hidden_size, context, max_len)
        new += 1
        bar.update(1)
    bar.close()
    shards = sorted(out_dir.glob("shard-*.safetensors"))
    return dict(shards=len(shards), new_shards=new, complete=new == len(chunks))


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


class StreamedExamples:
    """Examples computed on the fly from the responses JSONL (no feature cache), one record at a
    time, for targets whose features would not fit on disk. Indexable like a list."""

    def __init__(self, model, responses: str | Path | list[dict], *, context: int | None = None, max_len: int = 1024,
                 exclude: set[str] | None = None):
        self.model = model
        self.records = [r for r in _records(responses) if not exclude or r["id"] not in exclude]
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


def stream_examples(model, responses: str | Path | list[dict], **kw) -> Iterator[Example]:
    ds = StreamedExamples(model, responses, **kw)
    for i in range(len(ds)):
        yield ds[i]
