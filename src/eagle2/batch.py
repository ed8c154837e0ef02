"""Batched decoding on the lean forward: many prompts at once, each row leaving as it ends.

Plain decoding (no draft, no tree) of a batch of left-padded prompts on a ``fast.FastTarget`` with
one static cache: a prefill, then one forward per step over the rows still running. A row that
has ended stops being fed; now and then the batch is compacted (a copy of the whole cache), so
late steps do not pay for rows long finished. Greedy at temperature 0 — the target's own answer,
token for token as transformers' ``generate`` gives it (tested) — else plain sampling.

The training pipeline answers its prompts with it (train/responses.py) and keeps the features it
computes on the way; nothing in it is specific to training. It knows nothing of heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import masks


def _left_pad(prompts: list[list[int]], dev) -> tuple[Tensor, Tensor]:
    """(tokens [B, W] long, left padded with 0; valid [B, W] bool, True at real tokens)."""
    b, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(b, width, dtype=torch.long, device=dev)
    valid = torch.zeros(b, width, dtype=torch.bool, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, device=dev)
        valid[i, width - len(p):] = True
    return tokens, valid


@torch.inference_mode()
def generate_batch(target, prompts: list[list[int]], max_new_tokens: int, eos: set[int], temperature: float = 0.0,
                   generator: torch.Generator | None = None, return_hidden: bool = False):
    """Each prompt's new tokens, cut after its first EOS (at most ``max_new_tokens``), decoded on
    ``target`` (a ``FastTarget``). Greedy at temperature 0, else sampled at ``temperature`` with
    ``generator``. With ``return_hidden`` also each prompt's features (last hidden states after the
    final norm, bf16, on the CPU) for the prompt and every new token that was fed back: [P_i + n_i, H]
    with n_i = len(new tokens) or one less (the last token of a row is never fed)."""
    dev = target.device
    tokens, valid = _left_pad(prompts, dev)  # [B, W]
    b, width = tokens.shape
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, W]
    cache = target.new_cache(batch=b, capacity=width + max_new_tokens)
    allowed = masks.causal(width, device=dev)[None] & valid[:, None, :]  # [B, W, W]: no row sees padding
    hidden = target.batch_forward(cache, tokens, positions, allowed)  # [B, W, H]
    feats: list[list[Tensor]] = []
    if return_hidden:
        h = hidden.to(torch.bfloat16).cpu()
        feats = [[h[i, width - len(p):]] for i, p in enumerate(prompts)]
    logits = target.logits(hidden[:, -1])  # [B, V]
    out: list[list[int]] = [[] for _ in prompts]
    # row bookkeeping stays on the host: on a GPU, reading or writing one element of a device tensor
    # per row and step would be a synchronisation each
    alive = torch.arange(b)  # original prompt index of each batch row
    ended = torch.zeros(b, dtype=torch.bool)  # [B] rows whose answer is complete
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
            alive, ended, keep = alive[keep], ended[keep], keep.to(dev)
            nxt, pos, key_ok = nxt[keep], pos[keep], key_ok[keep]
            cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
        pos = pos + 1
        key_ok = torch.cat([key_ok, torch.ones(len(alive), 1, dtype=torch.bool, device=dev)], dim=1)  # the new key
        hidden = target.batch_forward(cache, nxt[:, None], pos[:, None], key_ok[:, None, :])  # [B', 1, H]
        if return_hidden:
            h = hidden[:, 0].to(torch.bfloat16).cpu()  # [B', H]
            for j, r in fed:
                feats[r].append(h[j:j + 1])
        logits = target.logits(hidden[:, -1])
    if return_hidden:
        return out, [torch.cat(f) for f in feats]
    return out
