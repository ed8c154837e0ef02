"""Stage 1 of training: the target writes its own answers to the training prompts.

Self-distillation: the draft head learns from exactly the text the target produces, which is
what it meets at inference. Output is one JSONL line per prompt,
``{"id", "prompt_ids", "response_ids", "response"}`` (token ids exactly as generated, chat
template applied), appended as batches finish, so an interrupted run resumes where it stopped.

Throughput on a CPU is dominated by the prefill of padded prompts and by rows that keep the
batch alive after the others stopped, so: prompts longer than ``max_prompt_tokens`` are skipped
(not truncated: a cut prompt is not a real conversation), prompts are sorted by length within
large windows (``sort_window`` prompts: padding is near the global-sort minimum while any
finished window is still a fair sample of the mix), and a batch is dropped from the loop as
soon as every row has ended.

``fixed_responses`` writes the same JSONL from a data set's reference answers (GSM8K
``answer``, GPTeacher ``response``) without running the target. Knows nothing about the head.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .data import Prompt

log = logging.getLogger("eagle2")


def _done_ids(out: Path) -> set[str]:
    done = set()
    if out.exists():
        with out.open(encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError):
                    pass  # a line cut by an interruption: that prompt is redone
    return done


def _repair_tail(out: Path) -> None:
    """Drop a last line cut in half by an interruption, so appends stay valid JSONL."""
    if not out.exists():
        return
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        out.write_bytes(data[: data.rfind(b"\n") + 1])


def _lock(out: Path):
    """An exclusive lock next to ``out``: two writers appending to one JSONL would duplicate work."""
    import fcntl

    f = open(out.with_name(out.name + ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"another process is writing {out}; wait for it or stop it first") from None
    return f


def encode_chat(tokenizer, messages) -> list[int]:
    """Chat-template token ids of a conversation ending with a user turn (generation prompt added)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    # no chat template (toy tokenizers, base models): the raw text of the last turn
    return [int(i) for i in tokenizer(messages[-1]["content"])["input_ids"]]


def read_responses(path: str | Path) -> list[dict]:
    """All complete records of a responses JSONL, first one per id (a cut last line is ignored)."""
    out, seen = [], set()
    path = Path(path)
    if not path.exists():
        return out
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("id") not in seen:
                seen.add(rec.get("id"))
                out.append(rec)
    return out


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: list[Prompt], out: str | Path, *, max_new_tokens: int = 256,
                       max_prompt_tokens: int = 320, batch_size: int = 16, sort_window: int = 1024,
                       temperature: float = 0.0, progress: bool = True, max_seconds: float | None = None,
                       log_every: int = 0, use_fast: bool = True, features_dir: str | Path | None = None,
                       context: int = 32) -> dict:
    """Append the target's answers for every prompt not yet in ``out``.

    Llama-style targets decode through the lean forward (fast.py) with a static cache,
    about twice transformers' ``generate`` throughput here; other models use ``generate``.
    With ``features_dir`` (lean forward only) the features computed while generating are saved
    there as one shard per batch (features.py's format), so the features stage has nothing left
    to do for these records.

    Returns {"done", "skipped_long", "new", "new_tokens", "seconds"} for this call."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)  # noqa: F841 (held until this function returns)
    _repair_tail(out)
    done = _done_ids(out)
    todo, skipped = [], 0
    for p in prompts:
        if p.id in done:
            continue
        ids = encode_chat(tokenizer, p.messages)
        if 0 < len(ids) <= max_prompt_tokens:
            todo.append((p.id, ids))
        else:
            skipped += 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    dev = model.device
    fast = None
    if use_fast:
        from ..fast import FastTarget, supports

        if supports(model)[0]:
            fast = FastTarget(model)
    order = []
    for w0 in range(0, len(todo), sort_window):  # near-global sort, window by window
        order.extend(sorted(todo[w0:w0 + sort_window], key=lambda r: len(r[1])))
    bar = tqdm(total=len(done) + len(order), initial=len(done), desc="responses", unit="prompt",
               disable=not progress, dynamic_ncols=True)
    t0, new, new_tokens = time.time(), 0, 0
    with out.open("a", encoding="utf-8") as f:
        for b0 in range(0, len(order), batch_size):
            if max_seconds is not None and time.time() - t0 > max_seconds:
                break
            batch = order[b0:b0 + batch_size]
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, W] left padded
            attn = torch.zeros((len(batch), width), dtype=torch.long)  # [B, W]
            for i, (_, ids) in enumerate(batch):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                attn[i, width - len(ids):] = 1
            feats = None
            if fast is not None:
                rows = fast_generate(fast, [ids for _, ids in batch], max_new_tokens, eos, temperature,
                                     return_hidden=features_dir is not None)
                if features_dir is not None:
                    rows, feats = rows
            else:
                kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
                    dict(do_sample=False, temperature=None, top_p=None, top_k=None)
                gen = model.generate(input_ids=input_ids.to(dev), attention_mask=attn.to(dev),
                                     max_new_tokens=max_new_tokens, pad_token_id=pad, **kw)  # [B, W + new]
                rows = gen[:, width:].tolist()
            for (rid, ids), row in zip(batch, rows):
                resp = []
                for t in row:
                    resp.append(t)
                    if t in eos:
                        break
                text = tokenizer.decode(resp, skip_special_tokens=True)
                f.write(json.dumps({"id": rid, "prompt_ids": ids, "response_ids": resp, "response": text}) + "\n")
                new_tokens += len(resp)
            f.flush()
            if feats is not None:  # after the JSONL: a record never has features without its line
                from .features import example_from_generation, write_shard

                exs = [(rid, example_from_generation(ids, row, hid, context))  # rows end at their first EOS
                       for (rid, ids), row, hid in zip(batch, rows, feats)]
                write_shard(features_dir, [rid for rid, _ in batch], [(r, e) for r, e in exs if e is not None],
                            int(model.config.hidden_size), context)
            new += len(batch)
            bar.update(len(batch))
            el = time.time() - t0
            bar.set_postfix(tok_s=f"{new_tokens / max(el, 1e-9):.0f}")
            if log_every and (b0 // batch_size) % log_every == 0:
                left = len(order) - new
                log.warning("responses: %d/%d done, %.1f new tokens/s, %.3f responses/s, ETA %.1f h",
                            len(done) + new, len(done) + len(order), new_tokens / el, new / el,
                            left / max(new / el, 1e-9) / 3600)
    bar.close()
    return dict(done=len(done) + new, skipped_long=skipped, new=new, new_tokens=new_tokens,
                seconds=time.time() - t0)


@torch.inference_mode()
def fast_generate(target, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                  temperature: float = 0.0, generator: torch.Generator | None = None,
                  return_hidden: bool = False):
    """Batched decoding of left-padded prompts on a ``FastTarget``; rows leave the batch as they end.

    Greedy at temperature 0 (the token-for-token reference), else plain sampling at
    ``temperature``. Returns each prompt's new tokens, cut after its first EOS. With
    ``return_hidden`` also each prompt's features (last hidden states after the final norm, bf16,
    on the CPU) for the prompt and every new token that was fed back: [P_i + n_i, H] with
    n_i = len(new tokens) or one less (the last token of a row is never fed)."""
    dev = target.device
    b, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(b, width, dtype=torch.long, device=dev)  # [B, W] left padded
    valid = torch.zeros(b, width, dtype=torch.bool, device=dev)  # [B, W] real (not pad) positions
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, device=dev)
        valid[i, width - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, W]
    cache = target.new_cache(batch=b, capacity=width + max_new_tokens)
    causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
    hidden = target.batch_forward(cache, tokens, positions, causal[None] & valid[:, None, :])  # [B, W, H]
    feats: list[list[torch.Tensor]] = []
    if return_hidden:
        h = hidden.to(torch.bfloat16).cpu()
        feats = [[h[i, width - len(p):]] for i, p in enumerate(prompts)]
    logits = target.logits(hidden[:, -1])  # [B, V]
    out: list[list[int]] = [[] for _ in prompts]
    alive = torch.arange(b, device=dev)  # original prompt index of each batch row
    ended = torch.zeros(b, dtype=torch.bool, device=dev)  # [B] rows whose answer is complete
    key_ok = valid  # [B, S] which cache entries are real
    pos = positions[:, -1]  # [B]
    for step in range(max_new_tokens):
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)  # [B]
        fed = []  # (batch row, prompt index) of the tokens appended this step
        for j, (r, t) in enumerate(zip(alive.tolist(), nxt.tolist())):
            if not ended[j]:
                out[r].append(t)
                fed.append((j, r))
                ended[j] = t in eos or len(out[r]) >= max_new_tokens
        n_ended = int(ended.sum())
        if n_ended == len(alive) or step == max_new_tokens - 1:
            break
        if 4 * n_ended >= len(alive):  # compact the batch now and then: a copy of the whole cache
            keep = (~ended).nonzero().flatten()
            row_of = {int(j): k for k, j in enumerate(keep.tolist())}
            fed = [(row_of[j], r) for j, r in fed if j in row_of]
            alive, nxt, pos, key_ok, ended = alive[keep], nxt[keep], pos[keep], key_ok[keep], ended[keep]
            cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
        pos = pos + 1
        key_ok = torch.cat([key_ok, torch.ones(len(alive), 1, dtype=torch.bool, device=dev)], dim=1)
        hidden = target.batch_forward(cache, nxt[:, None], pos[:, None], key_ok[:, None, :])  # [B', 1, H]
        if return_hidden:
            h = hidden[:, 0].to(torch.bfloat16).cpu()  # [B', H]
            for j, r in fed:
                feats[r].append(h[j:j + 1])
        logits = target.logits(hidden[:, -1])
    if return_hidden:
        return out, [torch.cat(f) for f in feats]
    return out


def fixed_responses(tokenizer, records: list[tuple[Prompt, str]], out: str | Path, *,
                    max_prompt_tokens: int = 320, max_response_tokens: int = 512, eos_id: int | None = None) -> dict:
    """Write the JSONL from reference answers instead of generated ones (no target run).

    records: (prompt, answer text). The answer is tokenized without special tokens and the
    end-of-turn token ``eos_id`` is appended when given."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(out)
    done = _done_ids(out)
    n = 0
    with out.open("a", encoding="utf-8") as f:
        for p, answer in records:
            if p.id in done or not answer.strip():
                continue
            ids = encode_chat(tokenizer, p.messages)
            if len(ids) > max_prompt_tokens:
                continue
            try:
                resp = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
            except TypeError:  # tokenizers without the keyword
                resp = list(tokenizer(answer)["input_ids"])
            resp = [int(t) for t in resp][:max_response_tokens]
            if eos_id is not None:
                resp.append(int(eos_id))
            f.write(json.dumps({"id": p.id, "prompt_ids": ids, "response_ids": resp, "response": answer}) + "\n")
            n += 1
    return dict(done=len(done) + n, new=n)
