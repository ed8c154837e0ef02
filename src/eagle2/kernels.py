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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LinearFn = Callable[[Tensor], Tensor]

# Set EAGLE2_PACKED_LINEAR=0 (or assign False here before loading) to use plain F.linear everywhere,
# e.g. to measure what packing buys (tools/profile_round.py does).
ENABLED = os.environ.get("EAGLE2_PACKED_LINEAR", "1") != "0"


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


def linear(weight: Tensor, bias: Tensor | None = None) -> LinearFn:
    """``x [..., K] -> [..., N]`` for ``weight [N, K]``: prepacked where that is exact, else ``F.linear``."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if ENABLED and weight.device.type == "cpu" and packing_works(weight.dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        op = torch.ops.mkldnn._linear_pointwise

        def packed_linear(x: Tensor) -> Tensor:
            return op(x, packed, bias, "none", [], "")

        return packed_linear
    return functools.partial(F.linear, weight=weight, bias=bias)


class PackedLinear(nn.Module):
    """Inference-only stand-in for an ``nn.Linear`` (same output, prepacked weight where exact)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.fn = linear(layer.weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def pack_linears(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (in place) by a ``PackedLinear``; returns it."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    return module
