"""Stage 1 of training: the target writes its own answers to the training prompts.

Self-distillation: the draft head learns from exactly the text the target produces, which is
what it meets at inference. Output is one JSONL line per prompt,
``{"id", "prompt_ids", "response_ids", "response"}`` (token ids exactly as generated, chat
template applied), appended as batches finish, so an interrupted run resumes where it stopped.
Batched greedy ``generate`` with left padding; prompts are grouped by length to waste little
compute on padding. Knows nothing about the draft head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from .data import Prompt


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


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: list[Prompt], out: str | Path, *, max_new_tokens: int = 384,
                       max_prompt_tokens: int = 768, batch_size: int = 16, temperature: float = 0.0,
                       progress: bool = True) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(out)
    done = _done_ids(out)
    todo = []
    for p in prompts:
        if p.id in done:
            continue
        ids = tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if 0 < len(ids) <= max_prompt_tokens:
            todo.append((p.id, list(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    dev = model.device
    bar = tqdm(total=len(todo), desc="responses", unit="prompt", disable=not progress)
    chunk = batch_size * 16  # sort by length inside chunks: little padding, prompt order roughly kept
    with out.open("a", encoding="utf-8") as f:
        for c0 in range(0, len(todo), chunk):
            part = sorted(todo[c0:c0 + chunk], key=lambda r: len(r[1]))
            for b0 in range(0, len(part), batch_size):
                batch = part[b0:b0 + batch_size]
                width = max(len(ids) for _, ids in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (_, ids) in enumerate(batch):
                    input_ids[i, width - len(ids):] = torch.tensor(ids)
                    attn[i, width - len(ids):] = 1
                gen = model.generate(input_ids=input_ids.to(dev), attention_mask=attn.to(dev),
                                     max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                     pad_token_id=pad)
                for (rid, ids), row in zip(batch, gen[:, width:].tolist()):
                    resp = []
                    for t in row:
                        resp.append(t)
                        if t in eos:
                            break
                    text = tokenizer.decode(resp, skip_special_tokens=True)
                    f.write(json.dumps({"id": rid, "prompt_ids": ids, "response_ids": resp, "response": text}) + "\n")
                f.flush()
                bar.update(len(batch))
    bar.close()
    return out
