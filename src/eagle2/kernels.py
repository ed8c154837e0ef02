"""Faster linear layers for the CPU: bf16 weights prepacked for oneDNN, and 4-bit block weights.

On a CPU, a small model's forward is dominated by its matrix-vector products, and ``F.linear``
re-lays out a bf16 weight for oneDNN on every call. ``linear(weight, bias)`` packs the weight
once and returns a callable ``x -> x @ weight.T + bias`` that skips that work: on the project
machine (AVX512-BF16 / AMX) the 120 linears of SmolLM2-135M went from 19.0 to 13.1 ms per
forward and the 49k-row lm_head from 1.9 to 1.3 ms.

**4-bit block weights.** A model converted from a 4-bit GGUF (our default SmolLM2 is Q4_1) has
bf16 weights that are exactly ``bf16(d * q + m)`` per block of 32 inputs, with 4-bit ``q`` and fp16
``d``, ``m``. Given the fp32 weights such a model was converted from (``source``),
``linear(..., source=)`` finds ``d``, ``m``, ``q``, checks that they rebuild the bf16 weight bit for
bit, and stores them as records for the native AMX kernel (csrc/lean_forward.cpp): 0.625 bytes
per weight instead of 2, the same bf16 weights, fp32 accumulation. Decode and tree-verify steps
(up to 32 rows) are bound by how fast weights stream in, so they run faster; longer inputs keep
oneDNN's kernel. A weight that is not exactly of that form, a CPU without AMX-BF16, or
``EAGLE2_Q4=0`` keeps the bf16 path.

Exactness: the packed product is used only where a probe shows it bit-identical to ``F.linear``
in that dtype (bf16 / fp16 on a CPU with oneDNN). Everywhere else — fp32 (checked token for
token against transformers), CUDA, other back ends — the callable is plain ``F.linear``. The
4-bit kernel rebuilds the identical bf16 weights; its products equal oneDNN's in the tests
(both accumulate bf16 products in fp32 on the tile unit), and it is used in bf16 only.
This module knows nothing of models: callers hand it weights.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

# Set EAGLE2_PACKED_LINEAR=0 (or assign False here before loading) to use plain F.linear everywhere,
# e.g. to measure what packing buys (tools/profile_round.py does).
ENABLED = os.environ.get("EAGLE2_PACKED_LINEAR", "1") != "0"
Q4_ENABLED = os.environ.get("EAGLE2_Q4", "1") != "0"  # EAGLE2_Q4=0: never use the 4-bit kernel
Q4_RECORD = 16 * 16 + 32 + 32  # bytes per (16 outputs, 32 inputs): codes, fp16 d, fp16 m (see lean_forward.cpp)
Q4_MAX_ROWS = 32  # inputs with more rows than this use the bf16 weight (see lean_forward.cpp)
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
    copy (call it only through this object or the native forward); else it is the plain [N, K] weight.
    ``q4``: the weight's 4-bit records [N / 16, K / 32, Q4_RECORD] (uint8), used for up to
    ``Q4_MAX_ROWS`` rows, or None."""

    __slots__ = ("weight", "bias", "packed", "q4")

    def __init__(self, weight: Tensor, bias: Tensor | None, packed: bool, q4: Tensor | None = None):
        self.weight, self.bias, self.packed, self.q4 = weight, bias, packed, q4

    def __call__(self, x: Tensor) -> Tensor:
        if self.q4 is not None and x.numel() <= Q4_MAX_ROWS * x.shape[-1]:
            return native.load().q4_linear(x, self.q4, self.bias)
        if self.packed:
            return _POINTWISE(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def linear(weight: Tensor, bias: Tensor | None = None, source: Tensor | None = None) -> Linear:
    """``x [..., K] -> [..., N]`` for ``weight [N, K]``: prepacked where that is exact, else ``F.linear``.
    ``source``: the fp32 weight a bf16 ``weight`` was rounded from; when it is 4-bit blocks (see
    the module docstring) and the 4-bit kernel runs here, short inputs use it."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    q4 = None
    if source is not None and q4_usable(weight):
        q4 = pack_q4(weight, source)
    if ENABLED and weight.device.type == "cpu" and packing_works(weight.dtype):
        return Linear(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None), bias, True, q4)
    return Linear(weight, bias, False, q4)


def q4_usable(weight: Tensor) -> bool:
    """Whether the 4-bit kernel can serve ``weight`` here: a bf16 CPU tensor of whole 16 x 32 tiles,
    a CPU with AMX-BF16 and the native extension built."""
    if not (Q4_ENABLED and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0):
        return False
    mod = native.load()
    return mod is not None and bool(mod.amx_ready())


def find_q4(weight: Tensor, source: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``q [N, K]`` uint8 in 0..15, ``d, m [N, K / 32]`` fp32 (fp16 values) with
    ``bf16(d * q + m) == weight`` for every element, or None if ``source`` (fp32 [N, K]) is not
    made of such blocks. ``d * q`` is exact in fp32 (11 x 4 significant bits), so rounding
    ``d * q + m`` once — the kernel's fused multiply-add — gives the same value as here."""
    n, k = weight.shape
    if source.shape != weight.shape:
        return None
    v = source.detach().to(torch.float32).reshape(n, k // 32, 32)  # [N, KB, 32]
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
        return None
    q = torch.round((v - m) / torch.where(d == 0, torch.ones_like(d), d)).clamp_(0, 15)
    rebuilt = (d * q + m).reshape(n, k).to(weight.dtype)
    if not torch.equal(rebuilt, weight):
        return None
    return q.to(torch.uint8).reshape(n, k), d[..., 0], m[..., 0]


def pack_q4(weight: Tensor, source: Tensor) -> Tensor | None:
    """The kernel's records [N / 16, K / 32, Q4_RECORD] uint8 for ``weight``, or None (``find_q4``)."""
    found = find_q4(weight, source)
    if found is None:
        return None
    q, d, m = found
    n, k = q.shape
    g, kb = n // 16, k // 32
    # B-tile (VNNI) rows: row r of a record holds, for its 16 outputs o, inputs 2r and 2r + 1: element 2 o + t
    rows = q.view(g, 16, kb, 16, 2).permute(0, 2, 3, 1, 4).reshape(g, kb, 16, 32)
    codes = (rows[..., :16] | (rows[..., 16:] << 4)).reshape(g, kb, 256)
    scale = lambda t: t.half().view(g, 16, kb).permute(0, 2, 1).contiguous().view(torch.uint8)  # [G, KB, 32]
    return torch.cat([codes, scale(d), scale(m)], dim=-1).contiguous()
