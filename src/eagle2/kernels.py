"""Faster linear layers for the CPU: weights prepacked for oneDNN, and low-bit block weights.

On a CPU, a small model's forward is dominated by its matrix products, and ``F.linear`` re-lays
out the weight on every call (bf16: always; fp32: for inputs of more than one row).
``linear(weight, bias)`` packs the weight once and returns a callable ``x -> x @ weight.T + bias``
that skips that work: on an Intel machine with AMX the 120 bf16 linears of SmolLM2-135M went
from 19.0 to 13.1 ms per forward and the 49k-row lm_head from 1.9 to 1.3 ms.

**Low-bit block weights.** A model converted from a GGUF has weights that are exactly
``d * q + m`` (rounded once to the dtype) per block of 32 inputs: 4-bit ``q`` with fp16 ``d``, ``m`` for
Q4_1 (our default SmolLM2's layers), 8-bit ``q`` with fp16 ``d`` and ``m = 0`` for Q8_0 (its embedding,
tied to the lm_head). Given the fp32 weights such a model was converted from (``source``),
``linear(..., source=)`` finds ``d``, ``m``, ``q``, checks that they rebuild the loaded weight bit for bit,
and stores them as records for the native kernels (csrc/lean_forward.cpp): 0.625 or 1.06 bytes per
weight instead of 2 or 4, the same weights, fp32 accumulation. Decode and tree-verify steps are bound by
how fast weights stream in, so they run faster; inputs of more than 32 rows (prefills, unless exact:
fast.py runs those in 64-row chunks) keep oneDNN's kernel. Which kernel runs is chosen from CPUID at run
time (``block_isa``): bf16 on AMX-BF16 (tile unit) or AVX512-BF16 (dot-product instruction), fp32 on
AVX2 + FMA. A weight not exactly of that form, a CPU without a kernel for the dtype, or a caller that
passes no ``source`` (``Backend.lowbit`` off: ``EAGLE2_LOWBIT=0``) keeps the plain weights.

Exactness: in bf16 / fp16 the packed product is used only where a probe shows it bit-identical
to ``F.linear`` (a CPU with oneDNN). In fp32 it is used where it agrees to fp32 rounding (another
summation order, ~1e-6 relative): on a CPU without fast bf16 fp32 is the dtype users run, and there
``F.linear`` re-lays out every fp32 weight for inputs of 2-32 rows (SmolLM2's gate/up at 4 rows:
1.39 ms plain, 0.34 ms packed, on an AVX2 EPYC). Greedy output in fp32 stays token-identical to
transformers (the real-model contract test runs with it); ``linear(..., pack=False)``
(``Backend.packed_linear`` off: ``EAGLE2_PACKED_LINEAR=0``) gives transformers' own kernels. CUDA
and other back ends run plain ``F.linear``. The low-bit kernels compute each row alone, in an order
independent of the number of rows (row-invariant, tested bit for bit). In bf16 they rebuild the identical
weights and their products match oneDNN's up to a rare last-bit step; in fp32 (AVX2) they factor each
block's ``d`` and ``m`` out of its sum, which agrees with MKL's product to fp32 rounding.
This module knows nothing of models: callers hand it weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

Q4_RECORD = 16 * 16 + 32 + 32  # bytes per (16 outputs, 32 inputs): 4-bit codes, fp16 d, fp16 m (lean_forward.cpp)
Q8_RECORD = 16 * 32 + 32  # 8-bit codes, fp16 d
_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None)  # None on builds without oneDNN


@functools.lru_cache(maxsize=None)
def packing_works(dtype: torch.dtype) -> bool:
    """True when oneDNN's prepacked linear exists here and agrees with ``F.linear`` in ``dtype``:
    bit for bit in bf16 / fp16, where one rounding step flips near-tied tokens; to fp32 rounding
    in fp32 (another summation order, |difference| <= 1e-5 of the output's scale), the same
    latitude the tree forward already takes against a one-token forward."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or not torch.backends.mkldnn.is_available():
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
                ref = F.linear(x, w, bias)
                if dtype == torch.float32:
                    if got.shape != ref.shape or float((got - ref).abs().max()) > 1e-5 * max(float(ref.abs().max()), 1.0):
                        return False
                elif not torch.equal(got, ref):
                    return False
        return True
    except Exception:  # op missing or unsupported on this CPU / build
        return False


class Linear:
    """``x [..., K] -> x @ weight.T + bias [..., N]``. ``packed``: ``weight`` is oneDNN's prepacked
    copy (call it only through this object or the native forward); else it is the plain [N, K] weight.
    ``lowbit``: the weight's block records [N / 16, K / 32, Q4_RECORD or Q8_RECORD] (uint8), or
    None; with records, the native ``linear`` picks the block kernel or the bf16 weight by row count,
    the same choice the native decoder stack makes (lean_forward.cpp: up to 32 rows, 64 when exact)."""

    __slots__ = ("weight", "bias", "packed", "lowbit", "_native")

    def __init__(self, weight: Tensor, bias: Tensor | None, packed: bool, lowbit: Tensor | None = None):
        self.weight, self.bias, self.packed, self.lowbit = weight, bias, packed, lowbit
        self._native = None if lowbit is None else native.load().linear

    def __call__(self, x: Tensor, exact: bool = False) -> Tensor:
        """``exact``: compute every row as in a call of 2..64 rows (row-invariant numerics, fast.py).
        oneDNN's bf16 product takes another kernel for a single row (SmolLM2's down projection: 1 output
        in 576 differs in its last bit), so a 1-row input runs as two copies of its row."""
        if self._native is not None:
            return self._native(x, self.weight, self.bias, self.packed, self.lowbit, exact)
        if exact and x.numel() == x.shape[-1]:
            one = x.reshape(1, x.shape[-1])
            return self(torch.cat([one, one]))[:1].reshape(*x.shape[:-1], -1)
        if self.packed:
            return _POINTWISE(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def linear(weight: Tensor, bias: Tensor | None = None, source: Tensor | None = None, pack: bool = True) -> Linear:
    """``x [..., K] -> [..., N]`` for ``weight [N, K]``: prepacked where that is exact (and ``pack``), else
    ``F.linear``. ``source``: the fp32 weight a bf16 ``weight`` was rounded from; when it is made of low-bit
    blocks (see the module docstring) and the block kernel runs here, short inputs use it."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    lowbit = None
    if source is not None and lowbit_usable(weight):
        lowbit = pack_lowbit(weight, source)
    if pack and weight.device.type == "cpu" and packing_works(weight.dtype):
        return Linear(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None), bias, True, lowbit)
    return Linear(weight, bias, False, lowbit)


def lowbit_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the block kernel runs here for ``dtype`` weights on ``device``: bf16 on a CPU with AMX-BF16
    or AVX512-BF16, fp32 on one with AVX2 + FMA; the native extension built."""
    return bool(block_isa(dtype, device))


def block_isa(dtype: torch.dtype = torch.bfloat16, device: torch.device = torch.device("cpu")) -> str:
    """The block kernel that runs here for ``dtype`` weights on ``device``: "amx", "avx512_bf16" (bf16),
    "avx2" (fp32), or ""."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return ""
    mod = native.load()
    if mod is None:
        return ""
    return str(mod.block_isa() if dtype == torch.bfloat16 else mod.block_isa_f32())


def lowbit_usable(weight: Tensor) -> bool:
    """Whether the block kernel can serve ``weight`` here: a 2-D tensor of whole 16 x 32 tiles where
    ``lowbit_runs``."""
    return (weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0
            and lowbit_runs(weight.dtype, weight.device))


def _blocks(weight: Tensor, source: Tensor) -> Tensor | None:
    """``source`` as fp32 [N, K / 32, 32] blocks, or None if it cannot be ``weight``'s source."""
    if source.shape != weight.shape or weight.dim() != 2 or weight.shape[1] % 32:
        return None
    return source.detach().to(torch.float32).reshape(weight.shape[0], weight.shape[1] // 32, 32)


def _rebuilds(weight: Tensor, d: Tensor, q: Tensor, m: Tensor | None) -> bool:
    """Whether bf16(d * q (+ m)) is ``weight`` bit for bit (d * q is exact in fp32: one rounding
    either way, as in the kernel's multiply or fused multiply-add)."""
    if not torch.isfinite(d).all() or (m is not None and not torch.isfinite(m).all()):
        return False
    v = d * q if m is None else d * q + m
    return torch.equal(v.reshape(weight.shape).to(weight.dtype), weight)


def find_q4(weight: Tensor, source: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``q [N, K]`` uint8 in 0..15, ``d, m [N, K / 32]`` fp32 (fp16 values) with
    ``bf16(d * q + m) == weight`` for every element (Q4_1), or None."""
    v = _blocks(weight, source)
    if v is None:
        return None
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    d, m = ((hi - lo) / 15).half().float(), lo.half().float()
    q = torch.round((v - m) / torch.where(d == 0, torch.ones_like(d), d)).clamp_(0, 15)
    if not _rebuilds(weight, d, q, m):
        return None
    return q.to(torch.uint8).reshape(weight.shape), d[..., 0], m[..., 0]


def find_q8(weight: Tensor, source: Tensor) -> tuple[Tensor, Tensor] | None:
    """``q [N, K]`` int8 in -127..127, ``d [N, K / 32]`` fp32 (fp16 values) with
    ``bf16(d * q) == weight`` for every element (Q8_0), or None."""
    v = _blocks(weight, source)
    if v is None:
        return None
    d, q = _q8_codes(v)
    if not _rebuilds(weight, d, q, None):
        return None
    return q.to(torch.int8).reshape(weight.shape), d[..., 0]


def round_to_q8(weight: Tensor) -> Tensor:
    """``weight [N, K]`` rounded to Q8_0 blocks: fp32 ``d * q`` per block of 32 inputs, ``d`` the fp16 of the
    block's largest magnitude / 127 and ``q = round(w / d)`` in -127..127. The result cast to the weight's
    dtype is a weight ``find_q8`` recovers bit for bit (the largest code is always +-127, so ``d`` comes
    back exactly), so ``linear(result.to(dtype), source=result)`` runs on the block kernel."""
    d, q = _q8_codes(weight.detach().to(torch.float32).reshape(weight.shape[0], -1, 32))
    return (d * q).reshape(weight.shape)


def _q8_codes(v: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 blocks [N, K / 32, 32] -> Q8_0 scales d [N, K / 32, 1] (fp16 values) and codes q (-127..127)."""
    d = (v.abs().amax(-1, keepdim=True) / 127).half().float()
    return d, torch.round(v / torch.where(d == 0, torch.ones_like(d), d)).clamp_(-127, 127)


def pack_lowbit(weight: Tensor, source: Tensor) -> Tensor | None:
    """The block kernel's records [N / 16, K / 32, Q4_RECORD or Q8_RECORD] uint8 for ``weight``
    (4-bit if its blocks are Q4_1, else 8-bit if Q8_0), or None."""
    n, k = weight.shape
    g, kb = n // 16, k // 32
    scale = lambda t: t.half().view(g, 16, kb).permute(0, 2, 1).contiguous().view(torch.uint8)  # noqa: E731  [G, KB, 32]
    # B-tile (VNNI) rows: row r of a record holds, for its 16 outputs o, inputs 2r and 2r + 1: element 2 o + t
    vnni = lambda q: q.view(g, 16, kb, 16, 2).permute(0, 2, 3, 1, 4).reshape(g, kb, 16, 32)  # noqa: E731
    found = find_q4(weight, source)
    if found is not None:
        q, d, m = found
        rows = vnni(q)
        codes = (rows[..., :16] | (rows[..., 16:] << 4)).reshape(g, kb, 256)
        return torch.cat([codes, scale(d), scale(m)], dim=-1).contiguous()
    found = find_q8(weight, source)
    if found is not None:
        q, d = found
        return torch.cat([vnni(q).reshape(g, kb, 512).view(torch.uint8), scale(d)], dim=-1).contiguous()
    return None
