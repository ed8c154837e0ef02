"""The EAGLE-1/2 draft head, and its save/load in the released checkpoint layout.

Architecture (as released): ``fc = Linear(2H -> H)`` over ``cat(embedding(t_{i+1}), f_i)`` —
embedding first — then one Llama-style decoder layer whose input norm is the identity, with
no final norm. The output is a predicted next feature; the target's frozen lm_head turns it
into draft logits. The head owns only ``fc`` and ``layers.0``; the embedding and lm_head are
the target's and are passed in by the caller.

Checkpoint layout (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): ``config.json`` (a Llama config with
``num_hidden_layers: 1`` plus ``"bias"`` for fc; absent means true) and ``model.safetensors`` or
``pytorch_model.bin`` with keys ``fc.weight`` (+ ``fc.bias``), ``layers.0.self_attn.{q,k,v,o}_proj.weight``
(+ q/k/v biases for Qwen2-style targets), ``layers.0.mlp.{gate,up,down}_proj.weight``,
``layers.0.post_attention_layernorm.weight``. A ``model.`` prefix (vLLM's naming) and copies of the
target's ``embed_tokens.weight`` / ``lm_head.weight`` are tolerated on load; any other tensor the head
does not run is refused. This module never touches a transformers model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("eagle2")

# hidden_act -> function, for the head and for fast.py's lean layers
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def _rope_params(config) -> dict:
    """The rope parameters that apply to a transformers config's global-attention layers: 5.x's
    ``rope_parameters`` (per layer type in Gemma 3: its full-attention layers'), else 4.x's
    ``rope_theta`` and ``rope_scaling``."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        if "rope_theta" in rp or "rope_type" in rp:
            return rp
        if isinstance(rp.get("full_attention"), dict):
            return rp["full_attention"]
        per_type = [sub for sub in rp.values() if isinstance(sub, dict)]
        if per_type:
            return per_type[0]
    scaling = getattr(config, "rope_scaling", None)
    return {**(scaling if isinstance(scaling, dict) else {}), "rope_theta": getattr(config, "rope_theta", None) or 10000.0}


def rope_theta_of(config) -> float:
    """RoPE base of a transformers config (5.x keeps it in ``rope_parameters``)."""
    return float(_rope_params(config).get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def rope_scaling_of(config) -> dict | None:
    """The RoPE scaling of a transformers config, without its base; None for plain RoPE."""
    return plain_scaling(_rope_params(config))


def json_rope(d: dict) -> tuple[float, dict | None]:
    """(base, ``plain_scaling``) of a head's config.json: the base at the top (4.x) or in
    ``rope_parameters`` (5.x), the scaling in ``rope_scaling`` or ``rope_parameters``; base 10000 where
    none is given (the official EAGLE trainers')."""
    params = d.get("rope_scaling") or d.get("rope_parameters")
    inner = params.get("rope_theta") if isinstance(params, dict) else None
    return float(d.get("rope_theta") or inner or 10000.0), plain_scaling(params)


def plain_scaling(params) -> dict | None:
    """A rope parameters / ``rope_scaling`` dict (a config.json's, either name) without its base, the
    type named ``rope_type``; None where it is plain RoPE."""
    if not isinstance(params, dict):
        return None
    d = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    d["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return None if d["rope_type"] == "default" else d


_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # transformers changes their frequencies with the sequence's length


def rope_frequencies(theta: float, head_dim: int, scaling: dict | None, max_positions: int) -> tuple[Tensor, float]:
    """A head's RoPE: inverse frequencies [head_dim / 2] fp32 and the factor cos and sin are scaled by.
    Plain RoPE is computed here; a scaled one (``rope_type`` linear, llama3, yarn, ...) by transformers'
    own rope functions, so that a head trained under its target's scaling (SpecForge and speculators
    heads for Llama 3.1 carry llama3's) rotates its keys as it did in training."""
    if scaling is None:
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = scaling["rope_type"]
    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"the head's RoPE type {kind!r} is unknown (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("the head's RoPE sets partial_rotary_factor; only full rotary heads are supported")
    if kind in _LENGTH_DEPENDENT_ROPE:
        log.warning("the head's RoPE type %r changes with the sequence's length; the head uses its frequencies "
                    "for sequences up to %d tokens throughout (output is exact; acceptance may drop beyond)",
                    kind, max_positions)
    try:  # transformers checks the parameters as it builds the config
        cfg = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                          max_position_embeddings=max_positions, rope_parameters={**scaling, "rope_theta": theta})
        inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the head's RoPE scaling {scaling} is missing or has a bad field: {e!r}") from None
    return inv_freq.float(), float(factor)


def rope_cos_sin(inv_freq: Tensor, factor: float, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, D] (``rope_frequencies``' factor applied, as transformers does)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False  # q/k/v biases (Qwen2 family)
    bias: bool = True  # fc bias; the released key name. LLaMA-3 heads use False
    max_position_embeddings: int = 4096
    target_model_type: str | None = None  # family of the target this head was built for (ours; official heads omit it)
    rope_scaling: dict | None = field(default=None, hash=False)  # ``plain_scaling``: as the target's (None: plain)

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} for the draft head")

    @classmethod
    def from_target(cls, config, bias: bool = True) -> "HeadConfig":
        """A head sized for a transformers target config (Llama, Qwen2, Mistral, Gemma 3, ...)."""
        heads = config.num_attention_heads
        act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu")
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            rope_theta=rope_theta_of(config),
            rope_scaling=rope_scaling_of(config),
            rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
            hidden_act=act,
            attention_bias=bool(getattr(config, "attention_bias", False)) or config.model_type.startswith("qwen2"),
            bias=bias,
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 4096)),
            target_model_type=config.model_type,
        )

    def to_json(self) -> dict:
        """config.json in the released layout: a one-layer Llama config plus ``bias``."""
        d = asdict(self)
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
                 tie_word_embeddings=False, torch_dtype="bfloat16")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "HeadConfig":
        try:
            heads = int(d["num_attention_heads"])
            theta, scaling = json_rope(d)
            kw = dict(
                hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
                num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads), vocab_size=int(d["vocab_size"]),
                rope_theta=theta, rope_scaling=scaling,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), hidden_act=str(d.get("hidden_act", "silu")),
                attention_bias=bool(d.get("attention_bias", False)), bias=bool(d.get("bias", True)),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                target_model_type=d.get("target_model_type"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"head config.json is missing or has a bad field: {e}") from None
        if int(d.get("num_hidden_layers", 1)) != 1:
            raise ValueError(f"head config.json has num_hidden_layers={d['num_hidden_layers']}; an EAGLE head has 1")
        return cls(**kw)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: HeadConfig, in_features: int | None = None):
        """in_features: width of q/k/v's input (default H; an EAGLE-3 midlayer takes 2H)."""
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        width = in_features or cfg.hidden_size
        self.q_proj = nn.Linear(width, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(width, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(width, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None,
                mask: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x: [B, T, H]; cos/sin: [B, 1, T, D]; past k/v: [B, Hkv, P, D]; mask: [B|1, 1, T, P + T] bool
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        new = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if self.nkv != self.nh:
            rep = self.nh // self.nkv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.o_proj(out), new


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A Llama decoder layer; without the input norm by default (EAGLE's draft layer). ``input_norm``:
    with it (the plain layers a deeper EAGLE-3 head stacks after its midlayer)."""

    def __init__(self, cfg: HeadConfig, input_norm: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else None
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, past, mask):
        # x: [B, T, H] -> [B, T, H], (k, v) [B, Hkv, T, D]
        h, new = self.self_attn(x if self.input_layernorm is None else self.input_layernorm(x), cos, sin, past, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new


DERIVED = ("rotary_emb.inv_freq",)  # buffers older checkpoints persisted; recomputed from rope_theta
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"  # optional: {"token_ids": [N] int64}, most frequent first


class DraftHead(nn.Module):
    """EAGLE's draft head. ``draft_vocab`` (optional, FR-Spec): the token ids the drafter may
    propose, most frequent first; it restricts only the draft's logits (the target verifies
    every token, so output is unchanged) and is saved beside the weights."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        self.draft_vocab: Tensor | None = None
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg)])
        inv_freq, self.rope_factor = rope_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling,
                                                      cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [B, T] -> cos, sin: [B, 1, T, D]
        return rope_cos_sin(self.inv_freq, self.rope_factor, positions, dtype)

    def forward(self, features: Tensor, token_embeds: Tensor, positions: Tensor,
                past: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None):
        """features, token_embeds: [B, T, H] (f_i and embedding of t_{i+1}); positions: [B, T].

        mask: [B|1, 1, T, P + T] bool (True = attend) or None for causal attention over T.
        Returns (predicted next features [B, T, H], (k, v) of these T entries [B, Hkv, T, D])."""
        x = self.fc(torch.cat([token_embeds, features], dim=-1))
        cos, sin = self.rope(positions, x.dtype)
        return self.layers[0](x, cos, sin, past, mask)

    # ---- released layout -------------------------------------------------------------
    def save(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_json()
        cfg.update(extra_config or {})
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        if self.draft_vocab is not None:
            save_file({"token_ids": self.draft_vocab.cpu().long().contiguous()}, str(directory / DRAFT_VOCAB_FILE))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "DraftHead":
        """Load a head directory (config.json + model.safetensors or pytorch_model.bin)."""
        directory = Path(directory)
        cfg = HeadConfig.from_json(read_head_config(directory))
        state = load_head_weights(directory)
        # The weights are the truth for the optional biases: configs in the wild disagree (a missing
        # "bias" means True, yet some heads were exported without fc.bias, and vice versa).
        has_fc_bias = "fc.bias" in state
        has_qkv_bias = "layers.0.self_attn.q_proj.bias" in state
        if (has_fc_bias, has_qkv_bias) != (cfg.bias, cfg.attention_bias):
            log.warning("head %s: config says fc bias=%s, attention bias=%s but the weights say %s, %s; using the weights",
                        directory, cfg.bias, cfg.attention_bias, has_fc_bias, has_qkv_bias)
            cfg = replace(cfg, bias=has_fc_bias, attention_bias=has_qkv_bias)
        head = cls(cfg)
        expected = head.state_dict()
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(f"head weights in {directory} lack {', '.join(missing[:4])}"
                             + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
        # A tensor this head does not run (a layer's input norm, HASS's extra norms, an o_proj bias) was
        # part of the head's math: dropping it would draft with another model, so refuse it.
        unknown = [k for k in state if k not in expected and not k.endswith(DERIVED)]
        if unknown:
            raise ValueError(f"head weights in {directory} have tensors this head does not use: "
                             f"{', '.join(sorted(unknown)[:4])}")
        for k, v in expected.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"head weight {k} has shape {tuple(state[k].shape)}; config.json implies {tuple(v.shape)}")
        head.load_state_dict({k: state[k] for k in expected})
        head.draft_vocab = load_draft_vocab(directory, cfg.vocab_size)
        return head


def read_head_config(directory: Path) -> dict:
    """A head directory's config.json as a dict (clear errors for a missing directory, file or bad JSON)."""
    if not directory.is_dir():
        raise ValueError(f"head directory not found: {directory}")
    path = directory / "config.json"
    if not path.exists():
        raise ValueError(f"head directory {directory} has no config.json")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"head config {path} is not valid JSON: {e.msg}") from None
    if not isinstance(d, dict):
        raise ValueError(f"head config {path} is not a JSON object")
    return d


def load_draft_vocab(directory: Path, vocab_size: int) -> Tensor | None:
    """The head's draft vocabulary (FR-Spec), most frequent first, or None when it has none."""
    path = directory / DRAFT_VOCAB_FILE
    if not path.exists():
        return None
    try:
        from safetensors.torch import load_file

        ids = load_file(str(path))["token_ids"].long()
    except Exception as e:
        raise ValueError(f"could not read the draft vocabulary {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if ids.ndim != 1 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size \
            or ids.unique().numel() != ids.numel():
        raise ValueError(f"draft vocabulary {path} must be distinct token ids in [0, {vocab_size})")
    return ids


def load_head_weights(directory: Path) -> dict[str, Tensor]:
    """Read the head's tensors; strip a ``model.`` prefix; drop the embedding / lm_head copies."""
    out = {}
    for k, v in load_weight_file(directory).items():
        k = k.removeprefix("model.")
        if k.startswith(("embed_tokens.", "lm_head.")):
            continue
        out[k] = v
    return out


def load_weight_file(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a head directory's model.safetensors (or else pytorch_model.bin), as stored."""
    st, binf = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if st.exists():
            from safetensors.torch import load_file

            raw = load_file(str(st))
        elif binf.exists():
            raw = torch.load(binf, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"head directory {directory} has neither model.safetensors nor pytorch_model.bin")
    except ValueError:
        raise
    except Exception as e:  # truncated / corrupt files
        raise ValueError(f"could not read head weights in {directory}: {type(e).__name__}: {str(e)[:200]}") from None
    return raw


def check_head_fits(cfg: HeadConfig, target_config) -> None:
    """Refuse a head built for a different target, saying what differs."""
    diffs = fit_differences(cfg, target_config)
    if diffs:
        raise ValueError(f"draft head does not fit the target ({target_config.model_type}): " + "; ".join(diffs))


def fit_differences(cfg, target_config) -> list[str]:
    """What differs between a head config (EAGLE-1/2 or EAGLE-3) and its target: hidden size,
    vocabulary, family (when the head names one)."""
    diffs = []
    if cfg.hidden_size != target_config.hidden_size:
        diffs.append(f"hidden size {cfg.hidden_size} vs target {target_config.hidden_size}")
    if cfg.vocab_size != target_config.vocab_size:
        diffs.append(f"vocabulary {cfg.vocab_size} vs target {target_config.vocab_size}")
    if cfg.target_model_type and cfg.target_model_type != target_config.model_type:
        diffs.append(f"built for {cfg.target_model_type}, target is {target_config.model_type}")
    return diffs


def init_weights_(module: nn.Module, seed: int = 0) -> None:
    """Llama-style init in place: normal(0, 0.02), norms at 1, biases at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def init_head(cfg: HeadConfig, seed: int = 0) -> DraftHead:
    """A freshly initialised head (``init_weights_``)."""
    head = DraftHead(cfg)
    init_weights_(head, seed)
    return head
