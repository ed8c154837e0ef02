"""The lean target: our own forward for Llama-style decoders, with a static KV cache.

transformers' general forward costs about a millisecond of Python per layer on a CPU, which
dominates a one-token (or sixteen-token) forward of a small model. This module runs the same
weights in the way gpt-fast writes a model: fused q/k/v and gate/up projections, a rotary table,
grouped-query SDPA straight over a preallocated cache, no per-step allocation of the cache.
Every projection and the lm_head go through ``kernels.linear`` (bf16 weights prepacked for
oneDNN on a CPU, bit-identical to ``F.linear``; for a model converted from a GGUF, the exact
low-bit blocks its weights are made of, on AMX, AVX512-BF16 or AVX2). It covers the families whose layers are exactly

    x = x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))));  x = x + down(act(gate(n2(x))) * up(n2(x)))

with RMSNorm — Llama, Qwen2 (q/k/v biases), Mistral without a sliding window. Everything else
(Gemma 3, sliding windows, dynamic RoPE, ...) stays on ``target.Target``, the general path.
``supports(model)`` says which, with the reason.

``Stack`` is the core: a list of such layers over a ``StaticCache``, run as a Python loop or —
on a CPU, when native.py could build it — as one C++ call making the same ATen calls
(bit-identical, tested). The target (all layers + final norm, ``FastTarget``) and the drafter
(the head's one layer without input norm, draft.py) both run on it. ``Stack.capturing`` also
returns the residual streams at chosen layer inputs (an EAGLE-3 head's features, asked for with
``Target.capture``) by running the layers in segments between them — natively too, one C++ call
per segment, so the extension needs no change; without a capture the stack runs as before. ``FastTarget`` has the same
interface as ``Target`` (forward / keep / new_cache / logits), so the engine does not know which
one it drives; ``batch_forward`` serves batched generation (batch.py), and ``forward_many`` runs the
small forwards of several sequences, each with its own cache, in one pass over the weights (a server's
requests side by side; ``Stack.multi``). The weights are shared with
(or, for the fused matrices, copied once from) the transformers model; a test checks the logits
against transformers'.

``make_target`` is the one place that decides which forward a model runs (lean or general), for
inference and training alike, from a ``config.Backend``; ``in_force`` says what that backend then
runs on this machine. Every switch reaches the stack, the kernels and the extension as an explicit
argument.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import masks, native
from .config import Backend
from .draft_head import ACTIVATIONS
from .kernels import Linear, linear, lowbit_runs, lowbit_usable, packing_works
from .models import float_weights
from .target import Forward, Target

_FAMILIES = ("llama", "qwen2", "mistral")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def supports(model) -> tuple[bool, str]:
    """(True, "") when the lean forward reproduces this model, else (False, why not)."""
    ok, why = config_supported(model.config)
    if not ok:
        return ok, why
    layers = model.get_decoder().layers
    if any(type(layer).__name__ != type(layers[0]).__name__ for layer in layers):
        return False, "mixed layer types"
    return True, ""


def config_supported(cfg) -> tuple[bool, str]:
    """``supports`` from the model's config alone (before its weights load)."""
    if cfg.model_type not in _FAMILIES:
        return False, f"no lean forward for model_type {cfg.model_type!r}"
    if cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False):
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return False, "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _STATIC_ROPE:
        return False, f"RoPE type {rope_type!r}"
    if getattr(cfg, "hidden_act", "silu") not in ACTIVATIONS:
        return False, f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "mlp_bias", False):
        return False, "MLP biases"
    return True, ""


def half_is_exact(backend: Backend, cfg) -> bool:
    """Whether this model in bf16 / fp16 on this CPU would keep greedy drafting equal to vanilla:
    the lean forward with row-invariant numerics (or the caller gave up exactness, ``exact=False``).
    ``dtype="auto"`` picks bf16 only then; elsewhere fp32, where the contract with transformers holds."""
    if backend.exact is False:
        return True
    lean = backend.forward != "transformers" and config_supported(cfg)[0]
    native_ok = backend.native and native.load() is not None  # as FastTarget resolves exact=None
    return lean and (backend.exact is True or exact_default(torch.bfloat16, torch.device("cpu"), native_ok))


@dataclass(frozen=True)
class Dims:
    """Sizes and constants of a stack of decoder layers."""

    n_heads: int
    kv_heads: int
    head_dim: int
    inter: int  # MLP width
    eps: float  # RMSNorm epsilon
    act: str  # MLP activation (a key of ACTIVATIONS)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


def _rms(weight: Tensor, x: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms(weight: Tensor, x: Tensor, eps: float, use_native: bool = True) -> Tensor:
    """``_rms`` in one native call where the extension runs on x's device (bit-identical; a draft step's
    few rows pay eight ATen dispatches from Python otherwise)."""
    mod = native.load() if use_native and x.device.type == "cpu" else None
    return _rms(weight, x, eps) if mod is None else mod.rms(x, weight, eps)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


@dataclass
class Layer:
    """One decoder layer's weights. ``n1`` None: no input norm (EAGLE's draft layer)."""

    n1: Tensor | None
    qkv: Linear  # [(Hq + 2 Hkv) D, H] fused projection
    o: Linear
    n2: Tensor
    gu: Linear  # [2 I, H] fused gate / up
    down: Linear

    @classmethod
    def fuse(cls, n1: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, n2: Tensor, gate: Tensor, up: Tensor,
             down: Tensor, qkv_bias: tuple[Tensor, Tensor, Tensor] | None = None, o_bias: Tensor | None = None,
             source: "Callable[[Tensor], Tensor | None] | None" = None, pack: bool = True) -> "Layer":
        """A layer from separate [out, in] projection weights: q/k/v and gate/up are concatenated
        once, every projection goes through ``kernels.linear`` (prepacked where exact and ``pack``).
        ``source``: weight -> the fp32 tensor it was rounded from, or None (low-bit blocks, kernels.py)."""

        def src(*ws: Tensor) -> Tensor | None:
            parts = [None if source is None else source(w) for w in ws]
            return None if any(p is None for p in parts) else torch.cat(parts)

        qkv_b = None if qkv_bias is None else torch.cat(qkv_bias)
        return cls(n1=n1, qkv=linear(torch.cat([q, k, v]), qkv_b, src(q, k, v), pack),
                   o=linear(o, o_bias, src(o), pack), n2=n2, gu=linear(torch.cat([gate, up]), None, src(gate, up), pack),
                   down=linear(down, None, src(down), pack))

    def native_tensors(self) -> native.LayerTensors:
        """This layer as the native stack takes it."""
        return native.LayerTensors(self.n1, self.qkv.weight, self.qkv.bias, self.o.weight, self.o.bias, self.n2,
                                   self.gu.weight, self.down.weight, self.qkv.lowbit, self.o.lowbit, self.gu.lowbit,
                                   self.down.lowbit)


class Stack:
    """A stack of Llama-style decoder layers over a static KV cache: the lean forward's core,
    shared by the target (all its layers + final norm) and the drafter (the head's one layer).

    Runs natively (native.py: the same ATen calls from C++, bit-identical) on a CPU when
    ``use_native`` and the extension is available, else as the Python loop below."""

    def __init__(self, layers: list[Layer], final_norm: Tensor | None, dims: Dims, exact: bool = False,
                 use_native: bool = True):
        """exact: row-invariant numerics for steps of up to ``EXACT_ROWS`` rows (see ``exact_attention``).
        use_native: allow the extension (``Backend.native``), for the whole stack and for exact attention."""
        self.layers, self.final_norm, self.dims, self.exact = layers, final_norm, dims, exact
        self.use_native = use_native
        linears = [lin for L in layers for lin in (L.qkv, L.o, L.gu, L.down)]
        self.packed = linears[0].packed if linears else False
        self._flat = [w for L in layers for w in L.native_tensors()]  # native.LayerTensors, layer after layer
        same = all(lin.packed == self.packed for lin in linears) and all(L.gu.bias is None and L.down.bias is None
                                                                         for L in layers)
        self.device = layers[0].n2.device
        runs = use_native and same and native.usable(self.device, dims.act)
        self._native = native.load() if runs else None
        self._act = native.activation_code(dims.act) if runs else None

    @property
    def is_native(self) -> bool:
        return self._native is not None

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, cache: "StaticCache", past: int,
                 python: bool = False, attn_input: Tensor | None = None) -> Tensor:
        """x [B, T, H] layer input; cos, sin [B, 1, T, D]; bias [B, 1, T, S] additive mask with
        S = past + T. Writes the T new keys/values at cache index past.. and returns the last
        layer's output (after the final norm, if any), [B, T, H]. ``python``: force the loop.
        ``attn_input`` [B, T, H']: what the first layer's attention reads instead of its (normed) input
        (an EAGLE-3 midlayer's [embedding, feature], 2 H wide; x is then its residual stream)."""
        return self._layers(x, cos, sin, bias, cache, past, 0, len(self.layers), self.final_norm, python, attn_input)

    def capturing(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, cache: "StaticCache", past: int,
                  capture: tuple[int, ...], python: bool = False) -> tuple[Tensor, list[Tensor]]:
        """As ``__call__``, and also the residual stream at the input of each layer in ``capture``
        (index len(layers): the last layer's output before the final norm; transformers'
        ``hidden_states`` numbering below that), each [B, T, H], in ``capture``'s order. The layers
        run in segments between the capture points (natively too: one C++ call per segment)."""
        n = len(self.layers)
        cuts = sorted({0, n, *capture})
        seen = {0: x}
        for lo, hi in zip(cuts, cuts[1:]):
            x = self._layers(x, cos, sin, bias, cache, past, lo, hi, None, python)
            seen[hi] = x
        out = x if self.final_norm is None else rms(self.final_norm, x, self.dims.eps, self._native is not None)
        return out, [seen[i] for i in capture]

    def multi(self, x: Tensor, cos: Tensor, sin: Tensor, biases: list[Tensor], caches: list["StaticCache"],
              capture: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """Several sequences' steps in one pass over the weights (natively; ``is_native`` and ``exact``
        only): x [1, R, H], each sequence's rows after the previous one's, R <= ``EXACT_ROWS``; cos, sin
        [1, 1, R, D]; biases[j] [1, 1, t_j, past_j + t_j] with past_j = caches[j].length. Writes each
        sequence's keys/values into its own cache (lengths unchanged) and returns, as ``capturing`` does,
        the output after the final norm and the captured residual streams, each [1, R, H]. Every row is
        bit for bit the one a forward of its sequence alone gives (csrc: decoder_forward_multi)."""
        dm, per, n = self.dims, len(native.LayerTensors._fields), len(self.layers)
        pasts = [c.length for c in caches]
        cuts = sorted({0, n, *capture})
        seen = {0: x}
        for lo, hi in zip(cuts, cuts[1:]):
            norm = self.final_norm if hi == n and not capture else None  # as ``__call__`` / ``capturing`` apply it
            x = self._native.decoder_forward_multi(x, cos, sin, biases, [c.k[lo:hi] for c in caches],
                                                   [c.v[lo:hi] for c in caches], pasts, self._flat[per * lo:per * hi],
                                                   norm, dm.n_heads, dm.kv_heads, dm.head_dim, dm.inter, dm.eps,
                                                   dm.scale, self.packed, self._act, None)
            seen[hi] = x
        out = rms(self.final_norm, x, dm.eps, True) if capture and self.final_norm is not None else x
        return out, [seen[i] for i in capture]

    def _layers(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, cache: "StaticCache", past: int, lo: int,
                hi: int, final_norm: Tensor | None, python: bool, attn_input: Tensor | None = None) -> Tensor:
        """Layers lo..hi-1 (cache layers lo..hi-1), then ``final_norm`` if given; ``attn_input`` as in
        ``__call__`` (for layer 0)."""
        dm = self.dims
        if self._native is not None and not python:
            per = len(native.LayerTensors._fields)
            return self._native.decoder_forward(x, cos, sin, bias, self._flat[per * lo:per * hi], final_norm,
                                                cache.k[lo:hi], cache.v[lo:hi], past, dm.n_heads, dm.kv_heads,
                                                dm.head_dim, dm.inter, dm.eps, dm.scale, self.packed, self._act,
                                                self.exact, attn_input if lo == 0 else None)
        act = ACTIVATIONS[dm.act]
        for i in range(lo, hi):
            L = self.layers[i]
            h = attn_input if i == 0 and attn_input is not None else x if L.n1 is None else _rms(L.n1, x, dm.eps)
            x = x + attend(L, h, cos, sin, bias, cache.k[i], cache.v[i], past, dm, self.exact, self.use_native)
            gate, up = L.gu(_rms(L.n2, x, dm.eps), self.exact).split(dm.inter, dim=-1)
            x = x + L.down(act(gate) * up, self.exact)
        return x if final_norm is None else _rms(final_norm, x, dm.eps)


def attend(L: Layer, h: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, k_cache: Tensor, v_cache: Tensor, past: int,
           dm: Dims, exact: bool = False, use_native: bool = True) -> Tensor:
    """A layer's attention block: h [B, T, in] (the normed input) -> o(attention) [B, T, H]. Writes the T
    new keys/values into k_cache, v_cache [B, Hkv, C, D] at past.. and attends over 0..past + T.
    ``exact``: row-invariant numerics for steps of up to ``EXACT_ROWS`` rows (``exact_attention``, natively
    when ``use_native``)."""
    b, t, _ = h.shape
    s = past + t
    hq, hk, d = dm.n_heads, dm.kv_heads, dm.head_dim
    q, k, v = L.qkv(h, exact).split([hq * d, hk * d, hk * d], dim=-1)  # [B, T, (Hq | Hkv) D]
    q = _rotate(q.view(b, t, hq, d).transpose(1, 2), cos, sin)  # [B, Hq, T, D]
    k = _rotate(k.view(b, t, hk, d).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
    k_cache[:, :, past:s] = k
    v_cache[:, :, past:s] = v.view(b, t, hk, d).transpose(1, 2)
    if exact and b * t <= EXACT_ROWS:
        o = exact_attention(q, k_cache, v_cache, bias, s, dm.scale, use_native)
    else:
        keys, vals = k_cache[:, :, :s], v_cache[:, :, :s]  # [B, Hkv, S, D]
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=bias, scale=dm.scale, enable_gqa=hq > hk)  # [B, Hq, T, D]
    return L.o(o.transpose(1, 2).reshape(b, t, hq * d), exact)


EXACT_ROWS = 64  # the most rows one exact call covers; an exact forward runs a longer prefill in chunks of this many


def exact_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, bias: Tensor, s: int, scale: float,
                    use_native: bool = True) -> Tensor:
    """Attention whose every row is reduced in one order fixed by the keys that row may see, whatever
    the number of rows in the call or where the masked columns sit (csrc/lean_forward.cpp says which
    order and why ATen's SDPA does not give it). q [B, Hq, T, D]; caches [B, Hkv, C, D], the first s
    entries valid; bias [B, 1, T, s] additive -> [B, Hq, T, D].

    Without the native extension (not ``use_native``, no compiler, not a CPU), each row is computed by its
    own call of ATen ops over just the keys it may see: the same calls a one-token step makes for that
    token, so rows are invariant there too (bit-identical to the native kernel they are not)."""
    mod = native.load() if use_native and q.device.type == "cpu" else None
    if mod is not None:
        return mod.exact_attention(q, k_cache, v_cache, bias, s, scale)
    return exact_attention_rows(q, k_cache, v_cache, bias, scale)


def exact_attention_rows(q: Tensor, k_cache: Tensor, v_cache: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``exact_attention`` without the extension: one row at a time, over the keys that row may see."""
    b, hq, t, d = q.shape
    g = hq // k_cache.shape[1]
    out = torch.empty_like(q)
    for bi in range(b):
        for ti in range(t):
            seen = masks.allowed_by(bias[bi, 0, ti]).nonzero()[:, 0]  # [n] keys this row may see, in order
            keys = k_cache[bi, :, seen].float().repeat_interleave(g, 0)  # [Hq, n, D]
            vals = v_cache[bi, :, seen].float().repeat_interleave(g, 0)
            scores = (q[bi, :, ti, None].float() * keys).sum(-1) * scale + bias[bi, 0, ti, seen].float()  # [Hq, n]
            out[bi, :, ti] = (torch.softmax(scores, -1)[:, None] @ vals)[:, 0].to(q.dtype)
    return out


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T, S] bool (True = attend) -> [B, 1, T, S] bias: 0 where allowed, dtype's min elsewhere."""
    return masks.additive(mask, dtype)[:, None]


class StaticCache:
    """Preallocated keys/values for every layer: k, v [layers, batch, kv_heads, capacity, head_dim].

    ``length`` entries are valid; cache index == position for every row of the batch."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        self.k = torch.zeros(n_layers, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def empty_like(self) -> "StaticCache":
        layers, batch, kv_heads, capacity, head_dim = self.k.shape
        return StaticCache(layers, batch, kv_heads, head_dim, capacity, self.k.dtype, self.k.device)

    def get_seq_length(self) -> int:
        return self.length

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more entries (doubling: reallocation is rare)."""
        need = self.length + n
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], cap, old.shape[4])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)


def exact_default(dtype: torch.dtype, device: torch.device = torch.device("cpu"), native_ok: bool = True) -> bool:
    """Row-invariant numerics are the default on a CPU with the native extension (``native_ok``): greedy
    eagle2 / eagle1 / chain then give vanilla's text token for token in bf16 / fp16, and they are faster,
    not slower. Their attention (``exact_attention``) is a plain loop over the cached keys, while ATen's
    attention with a mask costs several milliseconds per step of 1-64 rows (docs/design.md, "Row-invariant
    numerics", has the measurements). In fp32 the linears stay MKL's
    where the weights are not low-bit blocks, which are not row-invariant; there the contract is token
    equality with transformers, which the fp32 tests check with this default. Without the extension the
    attention falls back to a slow row-by-row loop, and other devices run ATen's attention: off there."""
    return (dtype in (torch.bfloat16, torch.float16, torch.float32) and torch.device(device).type == "cpu"
            and native_ok)


class RotaryTable:
    """cos, sin rows by position from ``compute(n) -> (cos, sin)``, each [n, D] for positions 0..n-1, grown
    by doubling (at least 1024 rows; never past ``limit`` unless a position needs it) so that a growing
    sequence recomputes it rarely. Row p does not depend on n, so growth never changes a value."""

    def __init__(self, compute: Callable[[int], tuple[Tensor, Tensor]], limit: int | None = None):
        self.compute, self.limit = compute, limit
        self.cos = self.sin = None  # [P, D]

    def rows(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [...] -> cos, sin [..., D]."""
        top = int(positions.max()) + 1
        have = 0 if self.cos is None else self.cos.shape[0]
        if have < top:
            n = max(top, 2 * have, 1024)
            if self.limit is not None:
                n = min(n, max(self.limit, top))
            self.cos, self.sin = self.compute(n)
        return self.cos[positions], self.sin[positions]


class FastTarget(Target):
    """``Target`` with the lean forward. Construct only when ``supports(model)`` holds."""

    def __init__(self, model, capacity: int = 1024, backend: Backend | None = None):
        """backend: the switches (``Backend()``: every fast path allowed). Its ``exact``: row-invariant
        numerics (each logit row as a one-token step would give it, so greedy speculative decoding equals
        vanilla decoding bit for bit where every linear is row-invariant: always in bf16 / fp16, for low-bit
        blocks in fp32); None: ``exact_default``."""
        super().__init__(model)
        backend = backend or Backend()
        ok, why = supports(model)
        if not ok:
            raise ValueError(f"the lean forward does not support this model: {why}")
        cfg = model.config
        self.n_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.capacity = capacity
        self.norm = self.decoder.norm
        source = None  # the fp32 weights a bf16 model was rounded from, for exact low-bit blocks (kernels.py)
        if backend.lowbit and backend.native and lowbit_usable(self.decoder.layers[0].mlp.down_proj.weight):
            names = {id(p): n for n, p in model.named_parameters()}
            floats = float_weights(model)
            source = lambda w: floats(names.get(id(w), ""))  # noqa: E731
            self.float_weight = source  # the drafter reads it too, for its FR-Spec lm_head rows
        layers = []
        for layer in self.decoder.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_b = None if a.q_proj.bias is None else (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
            layers.append(Layer.fuse(layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                                     a.o_proj.weight, layer.post_attention_layernorm.weight, m.gate_proj.weight,
                                     m.up_proj.weight, m.down_proj.weight, qkv_b, a.o_proj.bias, source,
                                     backend.packed_linear))
        dims = Dims(self.n_heads, self.kv_heads, self.head_dim, int(self.decoder.layers[0].mlp.gate_proj.weight.shape[0]),
                    float(self.norm.variance_epsilon), getattr(cfg, "hidden_act", "silu"))
        exact = backend.exact
        # the extension is CPU code: a model on a GPU neither builds nor loads it
        native_ok = backend.native and self.device.type == "cpu" and native.load() is not None
        self.exact = exact_default(self.dtype, self.device, native_ok) if exact is None else bool(exact)
        self.stack = Stack(layers, self.norm.weight, dims, self.exact, backend.native)
        lm = self.lm_head.weight
        self._lm = linear(lm, getattr(self.lm_head, "bias", None), None if source is None else source(lm),
                          backend.packed_linear)  # used by Target.logits
        self.rope = RotaryTable(self._rope_rows, limit=self.max_len)  # in the model dtype

    def _project(self, hidden: Tensor) -> Tensor:
        return self._lm(hidden, self.exact)

    def _rope_rows(self, n: int) -> tuple[Tensor, Tensor]:
        pos = torch.arange(n, device=self.device)[None]
        x = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.decoder.rotary_emb(x, pos)  # [1, n, D] each, as transformers computes them
        return cos[0], sin[0]

    def new_cache(self, capacity: int | None = None, batch: int = 1) -> StaticCache:
        return StaticCache(len(self.stack.layers), batch, self.kv_heads, self.head_dim, capacity or self.capacity,
                           self.dtype, self.device)

    # -- the forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def batch_forward(self, cache: StaticCache, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """tokens, positions: [B, T]; mask: [B, T, S] bool with S = cache.length + T (row may attend
        column). Appends the T new keys/values at cache index cache.length.. and returns the
        hidden states after the final norm, [B, T, H]."""
        return self._run(cache, tokens, positions, mask, ())[0]

    def _run(self, cache: StaticCache, tokens: Tensor, positions: Tensor, mask: Tensor,
             capture: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """``batch_forward`` plus the residual streams of the ``capture`` layers, [B, T, H] each."""
        past = cache.length
        cache.reserve(tokens.shape[1])
        cos, sin = self.rope.rows(positions)  # [B, T, D]
        args = (self.embed(tokens), cos[:, None], sin[:, None], additive_mask(mask, self.dtype), cache, past)
        hidden, seen = self.stack.capturing(*args, capture) if capture else (self.stack(*args), [])
        cache.length = past + tokens.shape[1]
        return hidden, seen

    @torch.inference_mode()
    def forward(self, cache: StaticCache, tokens: Tensor, positions: Tensor, allowed: Tensor | None,
                logits_rows: Tensor | slice | None = None) -> tuple[Tensor, Tensor]:
        """Same contract as ``Target.forward`` (batch of one), captured layers included. An exact forward of
        more than ``EXACT_ROWS`` rows (a prefill) runs in chunks of that many, so that its rows get the
        exact numerics too: the cache is then the same however a sequence was split into calls, which is
        what lets the engine reuse one call's cache for the next prompt (``row_invariant``)."""
        t, past = tokens.shape[0], cache.length
        if allowed is None:
            allowed = masks.causal(t, past, device=tokens.device)
        step = EXACT_ROWS if self.exact else t
        parts = [self._run(cache, tokens[None, i:i + step], positions[None, i:i + step],
                           allowed[None, i:i + step, :past + i + step], self.feature_layers)
                 for i in range(0, t, step)]
        hidden = _rows(h[0] for h, _ in parts)  # [T, H] after the final norm
        rows = hidden if logits_rows is None else hidden[logits_rows]
        seen = [_rows(s[j][0] for _, s in parts) for j in range(len(parts[0][1]))]
        features = torch.cat(seen, dim=-1) if seen else hidden  # [T, 3H] captured, else [T, H]
        return self.logits(rows), features

    @torch.inference_mode()
    def forward_many(self, calls: list[Forward]) -> list[tuple[Tensor, Tensor]]:
        """``Target.forward_many``: where rows are invariant and the stack native, calls of few rows (a
        verification's tree, a decode step) run in groups of up to ``EXACT_ROWS`` rows, one pass over the
        weights per group, with the same bits as one at a time; the rest one at a time."""
        if not (self.row_invariant and self.stack.is_native):
            return super().forward_many(calls)
        out: list = [None] * len(calls)
        for group in _groups([c.tokens.shape[0] for c in calls], EXACT_ROWS):
            if len(group) == 1:
                out[group[0]] = super().forward_many([calls[group[0]]])[0]
            else:
                for i, res in zip(group, self._together([calls[i] for i in group])):
                    out[i] = res
        return out

    def _together(self, calls: list[Forward]) -> list[tuple[Tensor, Tensor]]:
        """``forward`` of a group of calls of R <= ``EXACT_ROWS`` rows in all, in one ``Stack.multi``."""
        sizes = [c.tokens.shape[0] for c in calls]
        biases = []
        for c, t in zip(calls, sizes):
            past = c.cache.length
            allowed = masks.causal(t, past, device=self.device) if c.allowed is None else c.allowed[:, :past + t]
            biases.append(additive_mask(allowed[None], self.dtype))  # [1, 1, t, past + t]
            c.cache.reserve(t)
        cos, sin = self.rope.rows(torch.cat([c.positions for c in calls])[None])  # [1, R, D]
        x = self.embed(torch.cat([c.tokens for c in calls])[None])  # [1, R, H]
        hidden, seen = self.stack.multi(x, cos[:, None], sin[:, None], biases, [c.cache for c in calls],
                                        self.feature_layers)
        for c, t in zip(calls, sizes):
            c.cache.length += t
        hidden = hidden[0].split(sizes)  # [t_j, H] each
        feats = [torch.cat(parts, dim=-1) for parts in zip(*(s[0].split(sizes) for s in seen))] if seen else hidden
        rows = [h if c.logits_rows is None else h[c.logits_rows] for h, c in zip(hidden, calls)]
        logits = self.logits(torch.cat(rows)).split([r.shape[0] for r in rows])  # one lm_head pass for all
        return list(zip(logits, feats))

    @property
    def row_invariant(self) -> bool:
        """Whether each row of a forward, and so each cache entry, depends only on its token, its position
        and the entries before it, not on the other rows of its call: exact numerics with linears that are
        row-invariant (bf16 / fp16 always; fp32 only where every layer runs the low-bit block kernel)."""
        if not self.exact:
            return False
        return self.dtype != torch.float32 or all(
            f.lowbit is not None for L in self.stack.layers for f in (L.qkv, L.o, L.gu, L.down))

    def copy_prefix(self, cache: StaticCache, n: int) -> StaticCache:
        """A new cache holding the first ``n`` entries of ``cache`` (which stays as it is)."""
        new = cache.empty_like()
        new.k[:, :, :, :n] = cache.k[:, :, :, :n]
        new.v[:, :, :, :n] = cache.v[:, :, :, :n]
        new.length = n
        return new

    @staticmethod
    @torch.inference_mode()
    def keep(cache: StaticCache, start: int, nodes: Tensor) -> None:
        """Compact in place: entries start + nodes move to start.. ; length = start + len(nodes)."""
        n = int(nodes.shape[0])
        src = nodes + start
        if not bool((src == torch.arange(start, start + n, device=src.device)).all()):
            cache.k[:, :, :, start:start + n] = cache.k[:, :, :, src]
            cache.v[:, :, :, start:start + n] = cache.v[:, :, :, src]
        cache.length = start + n


def _groups(sizes: list[int], limit: int) -> list[list[int]]:
    """Indices of ``sizes`` in groups of consecutive items whose sizes add up to at most ``limit`` (an item
    larger than that alone)."""
    groups: list[list[int]] = []
    total = limit + 1
    for i, n in enumerate(sizes):
        if total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _rows(parts) -> Tensor:
    """[T, ...] from the chunks' [t_i, ...] (the one chunk itself when there is one)."""
    parts = list(parts)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def make_target(model, backend: Backend | str | None = None) -> Target:
    """The target adapter for ``model``, the one place that chooses it: the lean forward where the backend
    allows it, the model sits on one device and ``supports(model)`` holds, else transformers' forward.

    backend: a ``Backend``, or its ``forward`` name ("auto", "fast": lean or a ValueError saying why
    not, "transformers") with the environment's switches; None: "auto"."""
    backend = Backend.of(backend)
    if backend.forward == "transformers":
        return Target(model)
    ok, why = supports(model)
    if ok and len({p.device for p in model.parameters()}) > 1:
        ok, why = False, "the model is spread over several devices"
    if not ok:
        if backend.forward == "fast":
            raise ValueError(f"backend 'fast' is unavailable: {why}")
        return Target(model)
    return FastTarget(model, backend=backend)


def in_force(backend: Backend, target: Target) -> Backend:
    """What ``backend`` runs for ``target`` (from ``make_target``) and its drafter on this machine: the
    forward taken, exact as the target resolved it, and each switch on only where its path can run here
    (the extension built, oneDNN packing exact in this dtype, the block kernel on this CPU)."""
    lean = isinstance(target, FastTarget)
    cpu = target.device.type == "cpu"
    built = backend.native and cpu and native.load() is not None
    return replace(backend, forward="fast" if lean else "transformers", native=built,
                   packed_linear=backend.packed_linear and cpu and packing_works(target.dtype),
                   lowbit=lean and backend.lowbit and built and lowbit_runs(target.dtype, target.device),
                   exact=bool(target.exact) if lean else False)
