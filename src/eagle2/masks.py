"""Attention masks: which keys each query may see, as a bool matrix and as an additive bias.

The engine, both target adapters, the drafter, the cost probe and training all attend over cached
keys plus new ones. They say who may see whom with a bool "may attend" matrix [T, S] (row = query,
column = key, S = cached + new) built here, and the forwards turn it into the additive bias that
attention kernels take (0 where allowed, the dtype's most negative finite number elsewhere: a
finite value, so a fully masked row gives no NaN). The tree's own ancestry mask lives in tree.py;
this module only frames it. Pure tensor code, no models.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal(t: int, past: int = 0, shift: int = 0, device=None) -> Tensor:
    """[T, past + T] bool: query i (at position past + i) sees every cached key and the new keys up to
    itself; ``shift`` k > 0 hides its last k keys as well (it sees keys < past + i + 1 - k).

    E.g. causal(2, past=1): [[1, 1, 0], [1, 1, 1]]."""
    return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past - shift)


def after_prefix(own: Tensor, past: int) -> Tensor:
    """own [T, N] bool (what each query sees among the N new keys) -> [T, past + N]: every query also
    sees the ``past`` cached keys before them (a tree or draft level after the committed prefix)."""
    return torch.cat([torch.ones(own.shape[0], past, dtype=torch.bool, device=own.device), own], dim=1)


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """[..., T, S] bool (True = attend) -> the same shape in ``dtype``: 0 where allowed, the dtype's min elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def allowed_by(bias: Tensor) -> Tensor:
    """The bool mask an ``additive`` bias was made from (any value above half the dtype's min counts as allowed)."""
    return bias > torch.finfo(bias.dtype).min / 2


def masked_scores(scores: Tensor, allowed: Tensor) -> Tensor:
    """Attention scores [..., T, S] with the keys a query may not see set to -inf (softmax weight 0)."""
    return scores.masked_fill(~allowed, float("-inf"))
