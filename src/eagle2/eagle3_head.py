"""The EAGLE-3 draft head: save/load in the official EAGLE-3 layout, load from the speculators format.

Architecture (EAGLE-3, arXiv 2503.01840, as released by SafeAILab/EAGLE and served by SGLang and
vLLM): the features are three of the target's residual streams (low, mid, high), concatenated,
[.., 3H]; ``fc = Linear(3H -> H, no bias)`` fuses them. One ``midlayer``: attention over
``cat(input_layernorm(embedding(t_{i+1})), hidden_norm(h))`` (so q/k/v take 2H inputs) with the
un-normed h as the residual, then post-attention norm and MLP. Its output, before ``norm``, is the
next step's h (fc is skipped for an H-wide input); ``lm_head(norm(out))`` gives logits over the
head's own draft vocabulary of Vd tokens. The embedding is the target's (passed in by the caller).
This project also runs deeper heads (``num_hidden_layers`` > 1: plain decoder layers ``layers.i.*``
after the midlayer), which SGLang and vLLM do not load in this layout.

Checkpoint layout: ``config.json`` (a one-layer Llama config plus ``draft_vocab_size``, optionally
``eagle_config.eagle_aux_hidden_state_layer_ids``) and ``model.safetensors`` or ``pytorch_model.bin``
with keys ``fc.weight``, ``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight``,
``midlayer.self_attn.{q,k,v,o}_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``,
``norm.weight``, ``lm_head.weight`` [Vd, H], ``d2t`` [Vd] int64 and ``t2d`` [V] bool.

The speculators format (vllm-project/speculators; vLLM reads it, e.g. RedHatAI's
``*-speculator.eagle3`` heads) holds the same head under other names, and is translated to the
layout above on load (``speculators_config``, ``official_keys``): ``config.json`` has
``speculators_model_type: "eagle3"``, the decoder layer's Llama config nested under
``transformer_layer_config``, and ``draft_vocab_size``, ``norm_before_residual`` (vLLM: True when
absent), ``target_hidden_size`` and ``eagle_aux_hidden_state_layer_ids`` at the top level, the last
read as vLLM reads it: hidden_states indices, as they are. Weights: ``layers.0.*`` is the midlayer
(``layers.i.*`` for i >= 1 are our ``layers.{i-1}.*``); ``fc``, ``norm``, ``lm_head``, ``d2t``,
``t2d`` as above; an ``embed_tokens`` copy of the target's is ignored. What the head would need
beyond this loader (``norm_before_fc``, a trained embedding, a non-Llama layer, biases) is refused.

Draft vocabulary: target id = draft id i + d2t[i]; t2d[v] is True when target token v is in the
draft vocabulary; draft ids follow ascending target ids (vocab 10, kept {1, 3, 4, 8}: d2t =
[1, 2, 2, 5], so draft id 2 -> target 4).

Layer convention (``feature_layers``): we number the captured states as transformers'
``hidden_states`` does — 0 = the embeddings, i = the input of layer i (the output of layer i - 1),
L = the last layer's output before the final norm. The official default is [2, L // 2, L - 3].
This module never touches a transformers model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .draft_head import (ACTIVATIONS, MLP, Attention, DecoderLayer, RMSNorm, fit_differences, init_weights_,
                         json_rope, load_weight_file, read_head_config, rope_cos_sin, rope_frequencies)

ARCHITECTURE = "LlamaForCausalLMEagle3"  # SGLang's class name; vLLM registers it too


def default_layers(n_layers: int) -> tuple[int, int, int]:
    """The official capture points for a target of ``n_layers`` layers (hidden_states indices)."""
    return (2, n_layers // 2, n_layers - 3)


def three_layer_ids(ids) -> tuple[int, int, int]:
    """``eagle_aux_hidden_state_layer_ids`` as three integers, else a one-line refusal."""
    try:
        ids = tuple(int(i) for i in ids)
    except (TypeError, ValueError):
        raise ValueError(f"eagle_aux_hidden_state_layer_ids must be a list of integers; got {ids!r}") from None
    if len(ids) != 3:
        raise ValueError(f"eagle_aux_hidden_state_layer_ids must name 3 layers (low, mid, high); got {list(ids)}")
    return ids


def layers_from_config_ids(ids) -> tuple[int, ...]:
    """``eagle_aux_hidden_state_layer_ids`` of an official-layout config -> hidden_states indices.

    Two conventions ship under this one field. SpecForge / SGLang write the *output* of layer j
    (the default reads [1, L // 2 - 1, L - 4]; SGLang adds 1), vLLM reads the ids as hidden_states
    indices (the default reads [2, L // 2, L - 3]). We resolve it as SGLang does since its PR
    #25454: a first id of 1 (the output of the first layer; no head taps the embeddings) means
    the output convention, and every id gets + 1; otherwise the ids are hidden_states indices.
    (A speculators config is read as vLLM reads it, with no such guess: ``speculators_config``.)"""
    ids = three_layer_ids(ids)
    return tuple(i + 1 for i in ids) if ids[0] == 1 else ids


# ---- the speculators format (vLLM's) ---------------------------------------------------------
# Flags at its top level that add math this head does not run (vLLM and speculators read them).
_SPECULATORS_UNRUN = {"norm_before_fc": "an RMSNorm over the 3 features before fc (input_norm)",
                      "embed_requires_grad": "its own trained embedding (vLLM would use it, not the target's)"}


def is_speculators(d: dict) -> bool:
    """Whether a head's config.json is in the speculators format."""
    return "speculators_model_type" in d or "transformer_layer_config" in d


def speculators_config(d: dict) -> tuple[dict, tuple[int, ...] | None]:
    """A speculators config.json -> (the flat official config ``Eagle3Config`` parses, the capture
    points as hidden_states indices or None for the default). As vLLM's speculators adapter does,
    the flat config is the nested ``transformer_layer_config`` with ``draft_vocab_size``,
    ``target_hidden_size`` and ``norm_before_residual`` (True when absent) lifted from the top;
    the layer ids are used as they are, since vLLM hands them to its capture (the input of
    layer i, i.e. hidden_states[i]) unchanged. Refuses, in one line, what this head cannot run."""
    kind = d.get("speculators_model_type", "eagle3")
    if kind != "eagle3":
        raise ValueError(f"speculators head of type {kind!r}: only speculators_model_type 'eagle3' is supported")
    layer = d.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ValueError("speculators EAGLE-3 config.json lacks a transformer_layer_config object")
    if layer.get("model_type", "llama") != "llama":  # e.g. qwen3: q_norm / k_norm in the layer
        raise ValueError(f"speculators EAGLE-3 head has a {layer['model_type']!r} decoder layer; only 'llama' "
                         "layers are supported")
    unrun = [f"{k} ({what})" for k, what in _SPECULATORS_UNRUN.items() if d.get(k)]
    unrun += [f"transformer_layer_config.{k}" for k in ("attention_bias", "mlp_bias") if layer.get(k)]
    if unrun:
        raise ValueError(f"speculators EAGLE-3 head sets {', '.join(unrun)}, which is not supported")
    ids_key = "eagle_aux_hidden_state_layer_ids"
    flat = {k: v for k, v in layer.items() if k != ids_key}
    if isinstance(flat.get("eagle_config"), dict):  # the ids travel beside the flat config, never through its guess
        flat["eagle_config"] = {k: v for k, v in flat["eagle_config"].items() if k != ids_key}
    flat.update(draft_vocab_size=d.get("draft_vocab_size"), norm_before_residual=d.get("norm_before_residual", True))
    if d.get("target_hidden_size") is not None:
        flat["target_hidden_size"] = d["target_hidden_size"]
    ids = d.get(ids_key) or layer.get(ids_key) or (layer.get("eagle_config") or {}).get(ids_key)
    return flat, None if ids is None else three_layer_ids(ids)


_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


def official_keys(state: dict) -> dict:
    """Speculators tensor names -> official ones: ``layers.0.*`` is the midlayer, ``layers.i.*``
    (i >= 1) our ``layers.{i-1}.*``. A checkpoint already naming a ``midlayer`` is left as it is
    (vLLM renames midlayer -> layers.0 and loads either)."""
    if any(k.startswith("midlayer.") for k in state):
        return state
    out = {}
    for k, v in state.items():
        m = _LAYER_KEY.match(k)
        if m:
            k = ("midlayer." if m[1] == "0" else f"layers.{int(m[1]) - 1}.") + k[m.end():]
        out[k] = v
    return out


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary V
    draft_vocab_size: int  # Vd <= V: rows of the head's lm_head
    rope_theta: float = 10000.0  # the head's own base (official heads omit it: 10000)
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    bias: bool = False  # fc bias (SGLang's "bias"); released heads have none
    norm_before_residual: bool = False  # vLLM's option: the residual is hidden_norm(h), not h
    layers: tuple[int, ...] | None = None  # captured hidden_states indices; None = default_layers(L)
    target_model_type: str | None = None  # ours; official heads omit it
    num_layers: int = 1  # the midlayer, then num_layers - 1 plain decoder layers (ours; official heads have one)
    rope_scaling: dict | None = field(default=None, hash=False)  # ``draft_head.plain_scaling``; None: plain RoPE
    attention_bias = False  # q/k/v biases: never in EAGLE-3 heads (draft_head.Attention reads it)

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} for the draft head")
        if self.num_layers < 1:
            raise ValueError(f"an EAGLE-3 head needs at least one decoder layer; got num_layers={self.num_layers}")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must be in [1, vocab_size {self.vocab_size}]")

    def feature_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else default_layers(n_layers)

    @classmethod
    def from_target(cls, config, draft_vocab_size: int | None = None, layers: tuple[int, ...] | None = None,
                    ) -> "Eagle3Config":
        """A head sized for a transformers target config (rope base 10000, as the official trainer)."""
        heads = config.num_attention_heads
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_attention_heads=heads, num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab_size=config.vocab_size, draft_vocab_size=draft_vocab_size or config.vocab_size,
                   rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
                   hidden_act=getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu"),
                   layers=layers, target_model_type=config.model_type)

    def to_json(self, n_layers: int | None = None) -> dict:
        """config.json in the official layout, with the fields SGLang and vLLM read. Capture points
        other than the default are written as hidden_states indices, which vLLM and SGLang (since
        its PR #25454) read alike only when the first is >= 2 (see ``layers_from_config_ids``);
        others are refused."""
        d = dict(architectures=[ARCHITECTURE], model_type="llama", hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, num_hidden_layers=self.num_layers,
                 vocab_size=self.vocab_size, draft_vocab_size=self.draft_vocab_size, rope_theta=self.rope_theta,
                 rms_norm_eps=self.rms_norm_eps, hidden_act=self.hidden_act,
                 max_position_embeddings=self.max_position_embeddings, bias=self.bias, attention_bias=False,
                 mlp_bias=False, norm_before_residual=self.norm_before_residual, tie_word_embeddings=False,
                 torch_dtype="bfloat16", eagle_config={"use_aux_hidden_state": True})
        if self.layers is not None and (n_layers is None or self.layers != default_layers(n_layers)):
            if self.layers[0] < 2:
                raise ValueError(f"capture points {list(self.layers)} start below hidden state 2: SGLang and vLLM "
                                 "would read them differently, so they cannot be exported")
            d["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = list(self.layers)
        if self.target_model_type:
            d["target_model_type"] = self.target_model_type
        if self.rope_scaling is not None:  # the name SGLang and vLLM read (transformers 5 maps it too)
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Eagle3Config":
        """Parse a config.json, official or speculators (``speculators_config``); refuse what this
        head cannot run, saying why."""
        if is_speculators(d):
            flat, layers = speculators_config(d)
            return replace(cls._from_official(flat), layers=layers)
        return cls._from_official(d)

    @classmethod
    def _from_official(cls, d: dict) -> "Eagle3Config":
        eagle = d.get("eagle_config") or {}
        if eagle.get("use_aux_hidden_state", True) is False:
            raise ValueError("EAGLE-3 head config sets use_aux_hidden_state = false: such a head reads one hidden "
                             "state, which is not supported")
        if d.get("target_hidden_size") not in (None, d.get("hidden_size")):
            raise ValueError(f"EAGLE-3 head has hidden size {d.get('hidden_size')} but target_hidden_size "
                             f"{d['target_hidden_size']}: heads narrower than their target are not supported")
        ids = d.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
        try:
            heads = int(d["num_attention_heads"])
            theta, scaling = json_rope(d)
            vocab = int(d["vocab_size"])
            return cls(
                hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
                num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads), vocab_size=vocab,
                draft_vocab_size=int(d.get("draft_vocab_size") or vocab),
                rope_theta=theta, rope_scaling=scaling,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), hidden_act=str(d.get("hidden_act", "silu")),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)), bias=bool(d.get("bias", False)),
                norm_before_residual=bool(d.get("norm_before_residual", False)),
                layers=None if ids is None else layers_from_config_ids(ids), target_model_type=d.get("target_model_type"),
                num_layers=int(d.get("num_hidden_layers", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"EAGLE-3 head config.json is missing or has a bad field: {e}") from None


class Midlayer(nn.Module):
    """The EAGLE-3 decoder layer: attention over cat(input_layernorm(emb), hidden_norm(h)), residual h."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, in_features=2 * cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.norm_before_residual = cfg.norm_before_residual

    def forward(self, emb: Tensor, h: Tensor, cos: Tensor, sin: Tensor, past, mask):
        # emb, h: [B, T, H] -> out [B, T, H] (before the final norm), (k, v) [B, Hkv, T, D]
        hn = self.hidden_norm(h)
        residual = hn if self.norm_before_residual else h
        a, new = self.self_attn(torch.cat([self.input_layernorm(emb), hn], dim=-1), cos, sin, past, mask)
        x = residual + a
        return x + self.mlp(self.post_attention_layernorm(x)), new


class Eagle3Head(nn.Module):
    """The EAGLE-3 head (reference PyTorch forward; draft.py runs it lean). Buffers ``d2t`` [Vd]
    (target id = draft id + d2t) and ``t2d`` [V] (True = in the draft vocabulary).

    A deeper head (``num_layers`` > 1, this project's extension: SGLang and vLLM load one-layer
    heads) runs ``layers.0``, ``layers.1``, .. on the midlayer's output; the last one's output is
    the next step's h and goes through ``norm`` and ``lm_head``."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.config = cfg
        self.fc = nn.Linear(3 * cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)
        self.midlayer = Midlayer(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, input_norm=True) for _ in range(cfg.num_layers - 1))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(cfg.vocab_size) < cfg.draft_vocab_size)
        inv_freq, self.rope_factor = rope_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling,
                                                      cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def target_ids(self) -> Tensor:
        """[Vd] the target token id of each draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_draft_vocab(self, token_ids: Tensor) -> None:
        """Use these target token ids (distinct) as the draft vocabulary: fills d2t and t2d."""
        d2t, t2d = vocab_maps(token_ids, self.config.vocab_size)
        if d2t.shape[0] != self.config.draft_vocab_size:
            raise ValueError(f"{d2t.shape[0]} token ids for a draft vocabulary of {self.config.draft_vocab_size}")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [B, T] -> cos, sin: [B, 1, T, D]
        return rope_cos_sin(self.inv_freq, self.rope_factor, positions, dtype)

    def forward(self, features: Tensor, token_embeds: Tensor, positions: Tensor, past=None, mask: Tensor | None = None):
        """features: [B, T, 3H] (the target's captured layers; fc fuses them) or [B, T, H] (the head's
        own previous output; fc is skipped). token_embeds: [B, T, H] (embedding of t_{i+1}).
        past: None or one (k, v) per decoder layer. Returns (out [B, T, H] before the final norm,
        [(k, v)] of these T entries, one per decoder layer)."""
        h = self.fc(features) if features.shape[-1] != self.config.hidden_size else features
        cos, sin = self.rope(positions, h.dtype)
        past = past or [None] * self.config.num_layers
        out, kv = self.midlayer(token_embeds, h, cos, sin, past[0], mask)
        new = [kv]
        for layer, p in zip(self.layers, past[1:]):
            out, kv = layer(out, cos, sin, p, mask)
            new.append(kv)
        return out, new

    def logits(self, out: Tensor) -> Tensor:
        """[.., H] outputs -> [.., Vd] draft logits (column i is target token target_ids[i])."""
        return self.lm_head(self.norm(out))

    # ---- official layout -------------------------------------------------------------
    def save(self, directory: str | Path, n_layers: int | None = None, extra_config: dict | None = None) -> Path:
        """Write config.json + model.safetensors (weights in bf16, d2t int64, t2d bool). ``n_layers``:
        the target's depth, so that default capture points are left implicit."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_json(n_layers)
        cfg.update(extra_config or {})
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: (v if k in ("d2t", "t2d") else v.to(torch.bfloat16)).detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Eagle3Head":
        directory = Path(directory)
        raw = read_head_config(directory)
        cfg = Eagle3Config.from_json(raw)
        state = {k.removeprefix("model."): v for k, v in load_weight_file(directory).items()}
        if is_speculators(raw):
            state = official_keys(state)
        if "fc.bias" in state and not cfg.bias:
            cfg = replace(cfg, bias=True)
        head = cls(cfg)
        expected = head.state_dict()
        _check_keys(directory, state, expected)
        d2t, t2d = _vocab_buffers(state, cfg, directory)
        head.load_state_dict({**{k: state[k] for k in expected if k not in ("d2t", "t2d")}, "d2t": d2t, "t2d": t2d})
        return head


def is_eagle3(directory: str | Path) -> bool:
    """Whether a head directory holds an EAGLE-3 head: its config names an Eagle3 architecture or a
    draft vocabulary, or is in the speculators format (whose reader refuses every other speculators
    kind in one line), or its weights have a ``midlayer``."""
    d = read_head_config(Path(directory))
    eagle3_arch = any("eagle3" in str(a).lower() for a in d.get("architectures") or [])
    if "draft_vocab_size" in d or eagle3_arch or is_speculators(d):
        return True
    return any(k.removeprefix("model.").startswith("midlayer.") for k in _weight_names(Path(directory)))


def _weight_names(directory: Path) -> list[str]:
    """The tensor names of a head's model.safetensors (else pytorch_model.bin), without reading the
    tensors ([] when unreadable: the loader then reports it)."""
    st, binf = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if st.exists():
            from safetensors import safe_open

            with safe_open(str(st), framework="pt") as f:
                return list(f.keys())
        if binf.exists():  # mmap: the names without loading the weights (zip format, torch >= 1.6)
            return list(torch.load(binf, map_location="cpu", weights_only=True, mmap=True).keys())
    except Exception:
        pass
    return []


def _check_keys(directory: Path, state: dict, expected: dict) -> None:
    """Refuse missing / misshapen / unknown tensors (a missing lm_head would draft at random)."""
    missing = [k for k in expected if k not in state and k not in ("d2t", "t2d")]
    if missing:
        raise ValueError(f"EAGLE-3 head weights in {directory} lack {', '.join(missing[:4])}"
                         + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    unknown = [k for k in state if k not in expected and k != "embed_tokens.weight"]
    if unknown:
        raise ValueError(f"EAGLE-3 head weights in {directory} have tensors this head does not use: "
                         f"{', '.join(sorted(unknown)[:4])}")
    for k, v in expected.items():
        if k in state and k not in ("d2t", "t2d") and tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"EAGLE-3 head weight {k} has shape {tuple(state[k].shape)}; config.json implies "
                             f"{tuple(v.shape)}")


def vocab_maps(token_ids: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Distinct target ids (any order) -> (d2t [Vd] int64, t2d [V] bool), draft ids ascending by target id."""
    ids = token_ids.long().flatten().sort().values
    if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size or bool((ids[1:] == ids[:-1]).any()):
        raise ValueError(f"a draft vocabulary must be distinct token ids in [0, {vocab_size})")
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(ids.numel()), t2d


def _vocab_buffers(state: dict, cfg: Eagle3Config, directory: Path) -> tuple[Tensor, Tensor]:
    """d2t and t2d from the checkpoint, checked against each other and the vocabularies.
    A missing d2t is taken from t2d; a head with neither must draft over the full vocabulary."""
    vd, v = cfg.draft_vocab_size, cfg.vocab_size
    d2t, t2d = state.get("d2t"), state.get("t2d")
    if t2d is not None and (t2d.ndim != 1 or t2d.shape[0] != v):
        raise ValueError(f"EAGLE-3 head {directory}: t2d has shape {tuple(t2d.shape)}; the vocabulary is {v}")
    if t2d is not None and int(t2d.bool().sum()) != vd:
        raise ValueError(f"EAGLE-3 head {directory}: t2d keeps {int(t2d.bool().sum())} tokens; "
                         f"draft_vocab_size is {vd}")
    if d2t is None:
        if t2d is None and vd != v:
            raise ValueError(f"EAGLE-3 head {directory} drafts over {vd} of {v} tokens but has neither d2t nor t2d "
                             "to map its draft ids to token ids")
        ids = torch.arange(v)[t2d.bool()] if t2d is not None else torch.arange(vd)
        d2t = ids - torch.arange(vd)
    if d2t.ndim != 1 or d2t.shape[0] != vd or d2t.dtype.is_floating_point:
        raise ValueError(f"EAGLE-3 head {directory}: d2t must be [{vd}] integers; got {tuple(d2t.shape)} {d2t.dtype}")
    targets = torch.arange(vd) + d2t.long()
    bad = ((targets < 0) | (targets >= v)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"EAGLE-3 head {directory}: d2t maps draft id {i} to token {int(targets[i])}, outside the "
                         f"vocabulary [0, {v})")
    if targets.unique().numel() != vd:
        raise ValueError(f"EAGLE-3 head {directory}: d2t maps two draft ids to the same token")
    if t2d is not None:
        off = (~t2d.bool()[targets]).nonzero()
        if off.numel():
            i = int(off[0])
            raise ValueError(f"EAGLE-3 head {directory}: d2t and t2d disagree: d2t maps draft id {i} to token "
                             f"{int(targets[i])}, which t2d does not keep")
    keep = torch.zeros(v, dtype=torch.bool)
    keep[targets] = True
    return d2t.long(), keep


def check_eagle3_fits(cfg: Eagle3Config, target_config) -> None:
    """Refuse an EAGLE-3 head built for a different target, saying what differs (capture points included)."""
    diffs = fit_differences(cfg, target_config)
    n = int(target_config.num_hidden_layers)
    layers = cfg.feature_layers(n)
    if any(not 0 <= i <= n for i in layers):
        origin = "its eagle_aux_hidden_state_layer_ids" if cfg.layers is not None else "the default [2, L//2, L-3]"
        diffs.append(f"capture points {list(layers)} ({origin}) outside the target's hidden states 0..{n}")
    if diffs:
        raise ValueError(f"EAGLE-3 draft head does not fit the target ({target_config.model_type}): " + "; ".join(diffs))


def init_eagle3_head(cfg: Eagle3Config, seed: int = 0, draft_ids: Tensor | None = None) -> Eagle3Head:
    """A freshly initialised head (draft_head.init_weights_); ``draft_ids``: its draft vocabulary
    (default: the first draft_vocab_size token ids)."""
    head = Eagle3Head(cfg)
    init_weights_(head, seed)
    if draft_ids is not None:
        head.set_draft_vocab(draft_ids)
    return head
