"""Stage 1 of training: the target writes its own answers to the training prompts, into the corpus.

Self-distillation: the draft head learns from exactly the text the target produces, which is
what it meets at inference. Answers go to the corpus (corpus.py: token ids, chat template
applied, exactly as generated), appended as batches finish; only turns the corpus lacks are
answered, so an interrupted run resumes where it stopped and nothing is ever regenerated.
Multi-turn prompts (``Prompt.followups``) are answered turn by turn: turn k + 1 is templated
after the target's own answer to turn k (decoded to text, as a chat client sends it back).

Throughput on a CPU is dominated by the prefill of padded prompts and by rows that keep the
batch alive after the others stopped, so: prompts longer than ``max_prompt_tokens`` are skipped
(not truncated: a cut prompt is not a real conversation; for a later turn the limit applies to
what the turn adds), prompts are sorted by length within large windows (``sort_window`` prompts:
padding is near the global-sort minimum while any finished window is still a fair sample of the
mix), and a batch is dropped from the loop as soon as every row has ended.

``fixed_responses`` writes a JSONL ``{"id", "prompt_ids", "response_ids", "response"}`` from a
data set's reference answers (GSM8K ``answer``, GPTeacher ``response``) without running the
target; those are not the target's answers, so they never enter the corpus. Knows nothing about
the head.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..batch import generate_batch
from ..config import Backend
from ..fast import FastTarget, make_target
from .corpus import Corpus, record_id
from .data import Prompt
from .shards import example_from_generation, write_shard

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


def encode_chat(tokenizer, messages) -> list[int]:
    """Chat-template token ids of a conversation ending with a user turn (generation prompt added)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    # no chat template (toy tokenizers, base models): the turns' texts as one text, a blank line between
    # them, tokenized once (one BOS where the tokenizer adds one, not one per turn)
    return [int(i) for i in tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]]


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


def turn_messages(tokenizer, prompt: Prompt, corpus: Corpus, turn: int) -> list[dict]:
    """The conversation that turn ``turn`` of ``prompt`` answers: its first messages, then for each
    earlier turn the target's own answer (from the corpus, as text) and the next user turn."""
    msgs = list(prompt.messages)
    conv = corpus.conversations.get(prompt.id)
    for k in range(turn):
        answer = tokenizer.decode(conv.turns[k].response_ids, skip_special_tokens=True).strip()
        msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": prompt.followups[k]}]
    return msgs


def _turn_inputs(tokenizer, prompts: list[Prompt], corpus: Corpus, turn: int,
                 max_prompt_tokens: int) -> tuple[list[tuple[str, list[int]]], int]:
    """(conversation id, full prompt ids) of every prompt whose turn ``turn`` is due (earlier turns
    answered, this one not), and how many were skipped as too long."""
    todo, skipped = [], 0
    for p in prompts:
        if len(p.followups) < turn or corpus.answered_turns(p.id) != turn:
            continue
        ids = encode_chat(tokenizer, turn_messages(tokenizer, p, corpus, turn))
        before = len(corpus.conversations[p.id].ids_after(turn - 1)) if turn else 0
        if 0 < len(ids) - before <= max_prompt_tokens:
            todo.append((p.id, ids))
        else:
            skipped += 1
    return todo, skipped


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: list[Prompt], corpus: Corpus, *, max_new_tokens: int = 256,
                       max_prompt_tokens: int = 320, batch_size: int = 16, sort_window: int = 1024,
                       temperature: float = 0.0, progress: bool = True, max_seconds: float | None = None,
                       log_every: int = 0, backend: Backend | str | None = None, features_dir: str | Path | None = None,
                       context: int | None = None, max_len: int = 1024, model_name: str = "",
                       seal_every: int = 4096) -> dict:
    """Answer every turn of ``prompts`` that ``corpus`` lacks, turn 0 of all prompts first, then
    the follow-up turns; seal the new answers into a corpus shard every ``seal_every`` turns and
    at the end.

    Where ``fast.make_target`` picks the lean forward for ``backend`` (Llama-style targets), answers are
    decoded through it in batches (batch.py), about twice transformers' ``generate`` throughput here;
    other models use ``generate``. With ``features_dir`` (lean forward only) the features computed while
    generating are saved there as one shard per batch (shards.py, ``context``/``max_len`` windows), so
    the features stage has nothing left to do for these records.

    Returns {"done" (conversations in the corpus), "turns", "skipped_long", "new", "new_tokens",
    "seconds"} for this call."""
    from ..machine import dtype_name, git_commit

    settings = dict(temperature=temperature, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                    dtype=dtype_name(model.dtype), device=model.device.type, commit=git_commit())
    corpus.check_model(model_name, settings)
    target = make_target(model, backend)
    fast = target if isinstance(target, FastTarget) else None
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    t0, new, new_tokens, skipped = time.time(), 0, 0, 0
    with corpus.lock():
        corpus.seal(model_name, settings)  # turns a cut-short run left pending
        for turn in range(1 + max((len(p.followups) for p in prompts), default=0)):
            todo, sk = _turn_inputs(tokenizer, prompts, corpus, turn, max_prompt_tokens)
            skipped += sk
            order = []
            for w0 in range(0, len(todo), sort_window):  # near-global sort, window by window
                order.extend(sorted(todo[w0:w0 + sort_window], key=lambda r: len(r[1])))
            bar = tqdm(total=len(order), desc=f"responses, turn {turn + 1}", unit="prompt", disable=not progress,
                       dynamic_ncols=True)
            since_seal = 0
            f = corpus.open_pending()
            try:
                for b0 in range(0, len(order), batch_size):
                    if max_seconds is not None and time.time() - t0 > max_seconds:
                        break
                    batch = order[b0:b0 + batch_size]
                    rows, feats = _answer(model, fast, tokenizer, batch, max_new_tokens, eos, temperature,
                                          features_dir is not None)
                    for (cid, ids), row in zip(batch, rows):
                        corpus.add(cid, turn, ids, row, out=f)
                        new_tokens += len(row)
                    f.flush()
                    if feats is not None:  # after the corpus: a record never has features without its answer
                        _write_features(features_dir, model, batch, rows, feats, turn, context, max_len)
                    new += len(batch)
                    since_seal += len(batch)
                    bar.update(len(batch))
                    el = time.time() - t0
                    bar.set_postfix(tok_s=f"{new_tokens / max(el, 1e-9):.0f}")
                    if log_every and (b0 // batch_size) % log_every == 0:
                        log.warning("responses turn %d: %d/%d done, %.1f new tokens/s", turn + 1, b0 + len(batch),
                                    len(order), new_tokens / el)
                    if since_seal >= seal_every:
                        f.close()
                        corpus.seal(model_name, settings)
                        f, since_seal = corpus.open_pending(), 0
            finally:
                f.close()
                bar.close()
        corpus.seal(model_name, settings)
    return dict(done=len(corpus), turns=sum(len(c.turns) for c in corpus.conversations.values()),
                skipped_long=skipped, new=new, new_tokens=new_tokens, seconds=time.time() - t0)


def _answer(model, fast, tokenizer, batch: list[tuple[str, list[int]]], max_new_tokens: int, eos: set[int],
            temperature: float, capture: bool):
    """The target's answers to one batch of prompts, each cut after its first EOS, and (``capture``,
    lean forward only) the features computed on the way; else None."""
    if fast is not None:
        rows = generate_batch(fast, [ids for _, ids in batch], max_new_tokens, eos, temperature, return_hidden=capture)
        return rows if capture else (rows, None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(ids) for _, ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, W] left padded
    attn = torch.zeros((len(batch), width), dtype=torch.long)  # [B, W]
    for i, (_, ids) in enumerate(batch):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attn[i, width - len(ids):] = 1
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    dev = model.device
    gen = model.generate(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), max_new_tokens=max_new_tokens,
                         pad_token_id=pad, **kw)  # [B, W + new]
    rows = []
    for row in gen[:, width:].tolist():
        resp = []
        for t in row:
            resp.append(t)
            if t in eos:
                break
        rows.append(resp)
    return rows, None


def _write_features(features_dir, model, batch, rows, feats, turn: int, context: int | None, max_len: int) -> None:
    names = [record_id(cid, turn) for cid, _ in batch]
    exs = [(n, example_from_generation(ids, row, hid, context, max_len))  # rows end at their first EOS
           for n, (_, ids), row, hid in zip(names, batch, rows, feats)]
    write_shard(features_dir, names, [(n, e) for n, e in exs if e is not None], int(model.config.hidden_size), context,
                max_len)


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
