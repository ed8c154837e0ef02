"""The target adapter: the only module that talks to a transformers model.

It runs the target over a block of tokens at explicit positions with an explicit attention
pattern (a boolean "may attend" matrix over cached + new tokens), through transformers'
public API only: a 4D additive attention mask, ``position_ids`` and a ``DynamicCache``.
It returns logits and the draft head's features, and compacts the KV cache to the accepted path
after a round. The features are the last hidden states after the final norm (EAGLE-1/2), or —
after ``capture(layers)``, for an EAGLE-3 head — the residual streams at the inputs of the chosen
layers, concatenated (read with forward hooks on the decoder layers, only while capturing).

Sliding-window models (Gemma 3, Mistral, Qwen2 with the window on) get a dict of masks, one per
layer type, with the window applied by position; a single full mask would silently let the
sliding layers see past their window. Models whose attention cannot take a custom mask
(flash attention) are switched to sdpa; models with recurrent state, or whose decoder does not keep
its layers as ``layers`` (GPT-2, Falcon), are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from . import masks

log = logging.getLogger("eagle2")

_MASKABLE = ("sdpa", "eager")
_LAYER_TYPES_OK = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    pass


def cap_logits(logits: Tensor, cap: float | None) -> Tensor:
    """Final-logit soft-capping (Gemma's ``final_logit_softcapping``): cap * tanh(logits / cap); None or 0:
    the logits as they are. The target, the drafter and training all apply it this one way."""
    return torch.tanh(logits / cap) * cap if cap else logits


def check_supported(model) -> None:
    """Raise ``UnsupportedModelError`` (one line, saying why) for a model this adapter cannot run: an
    encoder-decoder, layers with recurrent state, or a decoder that does not keep its layers as ``layers``
    (GPT-2, Falcon): the features, the captured layers and the cache are read through that list."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{cfg.model_type} is an encoder-decoder model; eagle2 needs a decoder-only causal LM")
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    bad = sorted({t for t in layer_types if t not in _LAYER_TYPES_OK})
    if bad:
        raise UnsupportedModelError(
            f"{cfg.model_type} has {', '.join(bad)} layers; their state cannot be rolled back to an accepted "
            "path, so tree verification is not supported for this model")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: its decoder does not keep its layers as `layers` "
            "(supported: Llama-style models such as Llama, Qwen, Mistral, Phi-3, Gemma)")


@dataclass
class Forward:
    """One target forward as a decode asks for it: ``Target.forward``'s arguments, held so that a driver
    can run it beside other decodes' forwards (``Target.forward_many``)."""

    cache: object
    tokens: Tensor  # [T] long
    positions: Tensor  # [T] long
    allowed: Tensor | None  # [T, past + T] bool, or None: causal
    logits_rows: Tensor | slice | None = None


class Target:
    def __init__(self, model):
        check_supported(model)
        cfg = model.config
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        impl = getattr(cfg, "_attn_implementation", None)
        if impl not in _MASKABLE:
            try:
                model.set_attn_implementation("sdpa")
                log.warning("switched attention from %s to sdpa: tree verification needs an arbitrary mask", impl)
            except Exception as e:
                raise UnsupportedModelError(
                    f"attention implementation {impl!r} cannot take a tree mask and sdpa is unavailable: {e}") from None
        self.model = model
        self.config = cfg
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        if self.decoder is None or self.lm_head is None or self.embed is None:
            raise UnsupportedModelError(f"{type(model).__name__} does not expose decoder / embeddings / lm_head")
        self._lm = self.lm_head  # hidden -> logits in the model dtype (FastTarget swaps in a prepacked one)
        self.float_weight = lambda weight: None  # weight -> the fp32 tensor it was rounded from (FastTarget: kernels.py)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "use_sliding_window", True) is False:
            window = None
        self.window = int(window) if window else None
        # Mask per layer type when the model keys its masks by type; else one mask (with the
        # window applied when every layer slides, as in Mistral).
        self.layer_types = sorted(set(layer_types)) if layer_types else None
        if self.layer_types is None and self.window is not None and cfg.model_type not in ("mistral", "mixtral"):
            self.window = None  # the window is configured but not used by this family's layers
        self.max_len = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(cfg.vocab_size)
        self.hidden_size = int(cfg.hidden_size)
        self.n_layers = len(self.decoder.layers)
        self.feature_layers: tuple[int, ...] = ()  # hidden_states indices whose residual streams are the features

    def capture(self, layers: tuple[int, ...]) -> None:
        """Return as features the residual stream at the input of each layer in ``layers``
        (transformers' ``hidden_states`` numbering: 0 = the embeddings, i = the input of layer i,
        n_layers = the last layer's output before the final norm), concatenated in that order:
        [T, len(layers) * H]. An empty tuple goes back to the last hidden state after the norm."""
        layers = tuple(int(i) for i in layers)
        bad = [i for i in layers if not 0 <= i <= self.n_layers]
        if bad:
            raise ValueError(f"cannot capture hidden state {bad[0]}: the target has {self.n_layers} layers "
                             f"(hidden states 0..{self.n_layers})")
        self.feature_layers = layers

    # Whether a cache entry depends only on its token, position and the entries before it, not on how a
    # sequence was split into forwards (FastTarget can say yes, and then also has ``copy_prefix``;
    # transformers' kernels promise no such thing, so the engine never reuses this adapter's caches).
    row_invariant = False

    def new_cache(self, capacity: int | None = None):
        """An empty cache (``capacity``, a hint for preallocating caches, is not needed here)."""
        from transformers import DynamicCache

        # No config: every layer keeps all of its keys (no sliding-window eviction), so cache
        # index == position and the accepted path can be kept by index. Windows are applied
        # through the masks instead.
        return DynamicCache()

    def _additive(self, allowed: Tensor) -> Tensor:
        # [T, S] bool -> [1, 1, T, S] additive mask in the model dtype
        return masks.additive(allowed, self.dtype)[None, None]

    def _masks(self, allowed: Tensor, positions: Tensor, past_len: int):
        if self.window is None and self.layer_types is None:
            return self._additive(allowed)
        key_pos = torch.cat([torch.arange(past_len, device=positions.device), positions])  # [S]
        windowed = allowed & ((positions[:, None] - key_pos[None, :]) < (self.window or self.max_len))
        if self.layer_types is None:
            return self._additive(windowed)
        return {t: self._additive(windowed if t == "sliding_attention" else allowed) for t in self.layer_types}

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., H] features -> [..., V] fp32 logits, as the model's own forward computes them."""
        return cap_logits(self._project(hidden).float(), self.softcap)

    def _project(self, hidden: Tensor) -> Tensor:
        """[..., H] -> [..., V] in the model dtype (FastTarget: with its exact numerics)."""
        return self._lm(hidden)

    @torch.inference_mode()
    def forward(self, cache, tokens: Tensor, positions: Tensor, allowed: Tensor | None,
                logits_rows: Tensor | slice | None = None) -> tuple[Tensor, Tensor]:
        """Run the target over new tokens, appending their keys/values to ``cache``.

        tokens, positions: [T] long. allowed: [T, past + T] bool (row i may attend to column j),
        or None for a plain causal block. logits_rows selects which rows get logits (default
        all). Returns (logits [R, V] fp32, features [T, H] after the final norm — or [T, 3H], the
        captured layers, after ``capture``)."""
        past = cache.get_seq_length()
        if allowed is None:
            allowed = masks.causal(tokens.shape[0], past, device=tokens.device)
        mask = self._masks(allowed, positions, past)
        seen: dict[int, Tensor] = {}
        hooks = self._hooks(seen) if self.feature_layers else []
        try:
            out = self.decoder(input_ids=tokens[None], attention_mask=mask, position_ids=positions[None],
                               past_key_values=cache, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        hidden = out.last_hidden_state[0]  # [T, H]
        rows = hidden if logits_rows is None else hidden[logits_rows]
        if self.feature_layers:
            # [T, 3H]; a sharded model's layers may sit on other devices than its last one
            return self.logits(rows), torch.cat([seen[i][0].to(hidden.device) for i in self.feature_layers], dim=-1)
        return self.logits(rows), hidden

    def forward_many(self, calls: list[Forward]) -> list[tuple[Tensor, Tensor]]:
        """``forward`` of each call, each on its own cache: [(logits, features)] in order. Here one after
        another; ``FastTarget`` runs small ones together in one pass over the weights."""
        return [self.forward(c.cache, c.tokens, c.positions, c.allowed, c.logits_rows) for c in calls]

    def _hooks(self, seen: dict) -> list:
        """Forward hooks that put the captured layers' residual streams, [1, T, H], into ``seen``:
        a pre-hook on layer i for hidden state i, a hook on the last layer for n_layers."""
        layers = self.decoder.layers
        hooks = []
        for i in set(self.feature_layers):
            if i < self.n_layers:
                def pre(module, args, kwargs, i=i):
                    seen[i] = args[0] if args else kwargs["hidden_states"]
                hooks.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, output):
                    seen[self.n_layers] = output[0] if isinstance(output, tuple) else output
                hooks.append(layers[-1].register_forward_hook(post))
        return hooks

    @staticmethod
    @torch.inference_mode()
    def keep(cache, start: int, nodes: Tensor) -> None:
        """Keep cache entries [0, start) plus entries start + nodes (in order); drop the rest.

        After verification the cache holds prefix + every tree node; this leaves prefix +
        the accepted path, so cache index == position again."""
        n = int(nodes.shape[0])
        src = nodes + start
        contiguous = bool((src == torch.arange(start, start + n, device=src.device)).all())
        for layer in cache.layers:
            if not contiguous:
                layer.keys[:, :, start:start + n] = layer.keys[:, :, src]
                layer.values[:, :, start:start + n] = layer.values[:, :, src]
            layer.keys = layer.keys[:, :, : start + n]
            layer.values = layer.values[:, :, : start + n]
