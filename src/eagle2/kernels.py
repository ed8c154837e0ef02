"""Faster linear layers for the CPU: bf16 weights prepacked once for oneDNN.

On a CPU, a small model's forward is dominated by its matrix-vector products, and ``F.linear``
re-lays out a bf16 weight for oneDNN on every call. ``linear(weight, bias)`` packs the weight
once and returns a callable ``x -> x @ weight.T + bias`` that skips that work: on the project
machine (AVX512-BF16 / AMX) the 120 linears of SmolLM2-135M went from 19.0 to 13.1 ms per
forward and the 49k-row lm_head from 1.9 to 1.3 ms.

Exactness: the packed product is used only where a probe shows it bit-identical to ``F.linear``
in that dtype (bf16 / fp16 on a CPU with oneDNN). Everywhere else — fp32 (checked token for
token against transformers), CUDA, other back ends — the callable is plain ``F.linear``.
This module knows nothing of models: callers hand it weights.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

# Set EAGLE2_PACKED_LINEAR=0 (or assign False here before loading) to use plain F.linear everywhere,
# e.g. to measure what packing buys (tools/profile_round.py does).
ENABLED = os.environ.get("EAGLE2_PACKED_LINEAR", "1") != "0"
_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None)  # None on builds without oneDNN


@functools.lru_cache(maxsize=None)
def packing_works(dtype: torch.dtype) -> bool:
    """True when oneDNN's prepacked linear exists here and equals ``F.linear`` bit for bit in ``dtype``."""
    if dtype not in (torch.bfloat16, torch.float16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(96, 64, generator=g) * 0.1).to(dtype)
        b = torch.randn(96, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        for shape in ((1, 64), (16, 64), (2, 5, 64)):
            x = torch.randn(*shape, generator=g).to(dtype)
            for bias in (None, b):
                got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
                if not torch.equal(got, F.linear(x, w, bias)):
                    return False
        return True
    except Exception:  # op missing or unsupported on this CPU / build
        return False


class Linear:
    """``x [..., K] -> x @ weight.T + bias [..., N]``. ``packed``: ``weight`` is oneDNN's prepacked
    copy (call it only through this object or the native forward); else it is the plain [N, K] weight."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: Tensor, bias: Tensor | None, packed: bool):
        self.weight, self.bias, self.packed = weight, bias, packed

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed:
            return _POINTWISE(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def linear(weight: Tensor, bias: Tensor | None = None) -> Linear:
    """``x [..., K] -> [..., N]`` for ``weight [N, K]``: prepacked where that is exact, else ``F.linear``."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if ENABLED and weight.device.type == "cpu" and packing_works(weight.dtype):
        return Linear(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None), bias, True)
    return Linear(weight, bias, False)
