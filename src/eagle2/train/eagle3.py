"""Training EAGLE-3 heads (``eagle2 train --arch eagle3``): features, training-time test, loss, export.

What differs from the EAGLE-1/2 path (trainer.py), following docs/eagle3.md:

- **Features.** The target's residual streams at the inputs of three layers, [2, L // 2, L - 3]
  (``eagle3_head.default_layers``, hidden_states numbering), plus its last hidden state after the
  final norm, from which the target's next-token distribution is computed in the loss. One
  example row is ``[low, mid, high, final]``, [T, 4H] bf16, stored in the same shards as EAGLE-1/2
  features (features.py) but in their own directory, for the whole prompt + answer window.
- **Draft vocabulary.** The ``--draft-vocab`` most frequent answer tokens of the training
  conversations, as for EAGLE-1/2, sorted by token id: draft id i is the i-th kept token, so
  ``d2t[i] = token - i`` and ``t2d[token] = True`` (``eagle3_head.vocab_maps``). A fine-tuning
  run (``init_head``) keeps its starting head's vocabulary (never regenerate d2t); a larger
  ``--draft-vocab`` widens it with the most frequent tokens it lacks (``widened_vocab``).
- **Training-time test (TTT), K = ``ttt_steps`` steps**, indexed as the official trainer does.
  Step 0 at window index i is the inference pair: fc(f_i) with the embedding of x_{i+1}, at
  position i. Step k at index i takes the head's own step k-1 output at index i (not detached),
  the teacher-forced token x_{i+1+k}, at position i + k: exactly what a draft node at depth k
  gets at inference. Its query sees the step-0 keys at indexes <= i (the true prefix) and the
  keys of steps 1..k at index i only (its own chain): the diagonal mask of ``ttt_mask``.
- **Loss.** Step k at index i predicts the token after x_{i+1+k}; its label is the target's
  distribution there, softmax over the draft vocabulary's lm_head rows (renormalised), and the
  loss is the soft cross-entropy of the head's draft logits (``lm_head(norm(out))``, [Vd])
  against it, averaged over the positions whose next token is an answer token in the draft
  vocabulary (for greedy self-distilled answers that token is the target's argmax: the
  official mask). No feature regression, no input noise. Total = sum_k 0.8^k L_k / sum_k 0.8^k
  (``ttt_decay``).
- **Head.** ``Eagle3Head`` with the target's shape, randomly initialised (lm_head too, as the
  official trainer; the target's rows were a worse start). Export writes the official layout (``Eagle3Head.save``: config.json with
  ``draft_vocab_size``, ``midlayer.*``, ``d2t``/``t2d``) with a model card.

``Eagle3Trainer`` reuses trainer.Trainer's loop, schedule, checkpoints (resumable) and acceptance
evaluation; this module supplies the head, the batch loss and the export. It does not read the
corpus or sequence stages (pipeline.py does).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import masks
from ..draft_head import rotate_half
from ..eagle3_head import Eagle3Config, Eagle3Head, check_eagle3_fits, default_layers, init_eagle3_head
from ..lookup import copy_hits
from ..target import cap_logits
from .features import FeatureFn, pad_batch
from .trainer import Trainer, collate, widen_mlp

log = logging.getLogger("eagle2")


# ---- features ------------------------------------------------------------------------------------
def feature_layers(model) -> tuple[int, ...]:
    """The capture points the head is trained on: the official default for this target."""
    n = int(model.config.num_hidden_layers)
    layers = default_layers(n)
    if not 0 <= min(layers) or max(layers) >= n:
        raise ValueError(f"the target is too shallow for an EAGLE-3 head: capture points {list(layers)} "
                         f"(2, L//2, L-3) are not inputs of its {n} layers")
    return layers


def feature_dir(run_dir: str | Path, model) -> Path:
    """Where a run keeps its EAGLE-3 feature shards (named by the capture points)."""
    return Path(run_dir) / ("features-eagle3-" + "-".join(map(str, feature_layers(model))))


@torch.inference_mode()
def capture_features(model, batch_ids: list[list[int]], layers: tuple[int, ...], on_device: bool = False) -> list[Tensor]:
    """[T_i, 4H] bf16 per sequence: the residual streams at the inputs of ``layers`` (hidden_states
    indices, each < L), then the last hidden state after the final norm. One right-padded batch
    through transformers' decoder (causal attention keeps the padding out of real rows). On the
    CPU (for shards), or with ``on_device`` left on the model's device (streamed training on a GPU)."""
    dev = next(model.parameters()).device
    ids, attn = pad_batch(batch_ids)  # [B, W]
    out = model.get_decoder()(input_ids=ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=True,
                              use_cache=False)
    rows = torch.cat([out.hidden_states[i] for i in layers] + [out.last_hidden_state], dim=-1)  # [B, W, 4H]
    rows = rows.to(torch.bfloat16)
    return [rows[i, : len(x)] if on_device else rows[i, : len(x)].cpu() for i, x in enumerate(batch_ids)]


def features_fn(model, on_device: bool = False) -> FeatureFn:
    """``build_features(features=...)`` (or ``StreamedExamples``, ``on_device``) for this target's
    EAGLE-3 capture points."""
    return partial(capture_features, model, layers=feature_layers(model), on_device=on_device)


# ---- training-time test ------------------------------------------------------------------------
def ttt_mask(t: int, k: int, device=None) -> Tensor:
    """[T, (k + 1) T] bool: which keys the step-k queries see, keys ordered step 0, 1, .., k.
    Step 0's block is causal (the true prefix); each later step's block is the identity (query i
    sees that step's key at index i: its own chain). T = 3, k = 2:

        1 0 0 | 1 0 0 | 1 0 0
        1 1 0 | 0 1 0 | 0 1 0
        1 1 1 | 0 0 1 | 0 0 1
    """
    eye = torch.eye(t, dtype=torch.bool, device=device)
    return torch.cat([masks.causal(t, device=device)] + [eye] * k, dim=1)


def _ttt_attention(q: Tensor, keys: list[Tensor], vals: list[Tensor], dense: bool) -> Tensor:
    """Attention of step k = len(keys) - 1 under ``ttt_mask``. q, keys[j], vals[j]: [B, Hq, T, D]
    (grouped-query heads already repeated). dense: through the full mask (the reference);
    else the causal block plus k diagonal scores, O(T^2 + kT) instead of O(kT^2)."""
    t, k = q.shape[2], len(keys) - 1
    if dense:
        return F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(vals, 2),
                                              attn_mask=ttt_mask(t, k, q.device))
    scale = q.shape[-1] ** -0.5
    s0 = masks.masked_scores(q @ keys[0].transpose(-1, -2) * scale, masks.causal(t, device=q.device))  # [B, Hq, T, T]
    diag = [(q * kj).sum(-1, keepdim=True) * scale for kj in keys[1:]]  # k x [B, Hq, T, 1]
    p = torch.softmax(torch.cat([s0, *diag], dim=-1).float(), dim=-1).to(q.dtype)  # [B, Hq, T, T + k]
    out = p[..., :t] @ vals[0]  # [B, Hq, T, D]
    for j, vj in enumerate(vals[1:]):
        out = out + p[..., t + j:t + j + 1] * vj
    return out


def ttt_forward(head: Eagle3Head, feats: Tensor, emb: Tensor, positions: Tensor, steps: int,
                dense: bool = False) -> list[Tensor]:
    """The head unrolled ``steps`` steps on every window index at once (training-time test).

    feats: [B, T, 3H] the target's captured layers at index i; emb: [B, T, H] the embedding of
    the token x_i at index i; positions: [B, T] the position of index i. Step k at index i reads
    (h, x_{i+1+k}) at position i + k, h = fc(feats_i) at step 0, else the step k-1 output at i.
    Every decoder layer keeps its own keys per step, under the same mask.
    Returns one [B, T, H] output (before the final norm) per step; step k's last k + 1 indexes
    have no token to read (zeros) and are meaningless (the loss masks them)."""
    mid = head.midlayer
    keys: list[list[Tensor]] = [[] for _ in range(1 + len(head.layers))]  # per decoder layer, per step
    vals: list[list[Tensor]] = [[] for _ in range(1 + len(head.layers))]
    outs: list[Tensor] = []
    h = head.fc(feats)  # [B, T, H]
    t = emb.shape[1]
    for k in range(steps):
        if k:
            h = outs[-1]
        tok = torch.zeros_like(emb)  # [B, T, H]: the embedding of x_{i+1+k} at index i
        if t > k + 1:
            tok[:, : t - 1 - k] = emb[:, 1 + k:]
        hn = mid.hidden_norm(h)
        x = torch.cat([mid.input_layernorm(tok), hn], dim=-1)  # [B, T, 2H]
        cos, sin = head.rope(positions + k, x.dtype)  # [B, 1, T, D]
        y = _ttt_layer(mid, x, hn if mid.norm_before_residual else h, cos, sin, keys[0], vals[0], dense)
        for j, layer in enumerate(head.layers, start=1):
            y = _ttt_layer(layer, layer.input_layernorm(y), y, cos, sin, keys[j], vals[j], dense)
        outs.append(y)
    return outs


def _ttt_layer(layer, x: Tensor, residual: Tensor, cos: Tensor, sin: Tensor, keys: list[Tensor],
               vals: list[Tensor], dense: bool) -> Tensor:
    """One decoder layer at the current TTT step: attention input x [B, T, H'] (normed), residual
    [B, T, H]; appends this step's keys / values to the layer's lists. Returns [B, T, H]."""
    a = layer.self_attn
    b, t, _ = x.shape
    rep = a.nh // a.nkv
    q = a.q_proj(x).view(b, t, a.nh, a.hd).transpose(1, 2)  # [B, Hq, T, D]
    kk = a.k_proj(x).view(b, t, a.nkv, a.hd).transpose(1, 2)  # [B, Hkv, T, D]
    vv = a.v_proj(x).view(b, t, a.nkv, a.hd).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    kk = kk * cos + rotate_half(kk) * sin
    keys.append(kk.repeat_interleave(rep, dim=1))
    vals.append(vv.repeat_interleave(rep, dim=1))
    att = _ttt_attention(q, keys, vals, dense).transpose(1, 2).reshape(b, t, a.nh * a.hd)
    y = residual + a.o_proj(att)
    return y + layer.mlp(layer.post_attention_layernorm(y))


# ---- loss ------------------------------------------------------------------------------------------
def _labels(head: Eagle3Head, batch: dict[str, Tensor], lm_w: Tensor, softcap: float | None,
            dev) -> tuple[Tensor, Tensor, Tensor]:
    """(p [B, T, Vd]: the target's distribution after x_j over the draft vocabulary, renormalised;
    ok [B, T]: label j counts, i.e. x_{j+1} is an answer token of the window in the draft vocabulary;
    answer [B, T]: x_{j+1} is an answer token of the window, in the draft vocabulary or not)."""
    tokens = batch["tokens"].to(dev)  # [B, T]
    hidden = batch["hidden"].to(dev)
    final = hidden[..., 3 * (hidden.shape[-1] // 4):].float()  # [B, T, H] after the target's final norm
    logits = cap_logits(F.linear(final, lm_w.float()), softcap)  # [B, T, Vd]
    j = torch.arange(tokens.shape[1], device=dev)[None]  # [1, T]
    nxt = torch.zeros_like(tokens, dtype=torch.bool)
    nxt[:, :-1] = head.t2d.to(dev)[tokens[:, 1:]]
    answer = (j + 1 >= batch["start"].to(dev)[:, None]) & (j + 1 < batch["lens"].to(dev)[:, None])
    return logits.softmax(-1), answer & nxt, answer


def copy_weights(batch: dict[str, Tensor], lookup_weight: float) -> Tensor:
    """[B, T] loss weight of label j (the token after x_j): ``lookup_weight`` where prompt lookup over the
    window so far proposes x_{j+1} (``lookup.copy_hits``: the engine's tree gets that token from the lookup
    chain), else 1. The head's capacity then goes to what lookup cannot propose."""
    tokens, w = batch["tokens"], torch.ones(batch["tokens"].shape)
    if lookup_weight == 1.0:
        return w
    for b, (n, s) in enumerate(zip(batch["lens"].tolist(), batch["start"].tolist())):
        hits = torch.tensor(copy_hits(tokens[b, :n].tolist(), s), dtype=torch.bool)  # [n]
        w[b, :n][hits] = lookup_weight
    return w


def eagle3_loss(head: Eagle3Head, embed, lm_w: Tensor, batch: dict[str, Tensor], steps: int, decay: float = 0.8,
                bf16: bool = False, softcap: float | None = None, lookup_weight: float = 1.0,
                tv_weight: float = 0.0) -> tuple[Tensor, dict]:
    """Loss of one batch (``trainer.collate`` of EAGLE-3 examples) and its metrics: loss; ce and
    acc at step 0; acc_k at step k; tokens. acc is the share of answer positions where the draft's
    top-1 is the target's top-1 over the draft vocabulary; a position whose next token lies outside
    that vocabulary counts as a miss, as it does when drafting (the loss cannot score it).

    lm_w: [Vd, H] the target's lm_head rows of the head's draft vocabulary, in draft id order.
    Step k's output at index i is scored against label j = i + 1 + k (see the module docstring); label j's
    cross-entropy is weighted by ``copy_weights`` (all 1 unless ``lookup_weight`` says otherwise). With
    ``tv_weight`` w the loss per label is (1 - w) cross-entropy + w (1 - sum_x min(p(x), q(x))): the total
    variation, the chance a draft drawn from q is rejected at T = 1, which the cross-entropy bounds only loosely."""
    dev = lm_w.device
    hidden = batch["hidden"].to(dev).float()  # [B, T, 4H]
    tokens = batch["tokens"].to(dev)  # [B, T]
    b, t, w = hidden.shape
    with torch.no_grad():
        p, ok, answer = _labels(head, batch, lm_w, softcap, dev)  # [B, T, Vd], [B, T], [B, T]
        cw = copy_weights(batch, lookup_weight).to(dev)  # [B, T]
        emb = embed(tokens).float()  # [B, T, H]
    positions = batch["pos0"].to(dev)[:, None] + torch.arange(t, device=dev)[None]  # [B, T]
    metrics: dict = dict(ce=float("nan"), acc=float("nan"))
    total, weights = torch.zeros((), device=dev), 0.0
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(bf16)):
        outs = ttt_forward(head, hidden[..., : 3 * (w // 4)], emb, positions, steps)
        for k, out in enumerate(outs):
            sel = ok[:, 1 + k:]  # [B, T - 1 - k]: index i is scored against label i + 1 + k
            if not bool(sel.any()):
                continue
            logq = head.logits(out[:, : t - 1 - k][sel]).float().log_softmax(-1)  # [N_k, Vd]
            pk, wk = p[:, 1 + k:][sel], cw[:, 1 + k:][sel]  # [N_k, Vd], [N_k]
            ce = -(wk * (pk * logq).sum(-1)).sum() / wk.sum().clamp_min(1e-12)
            loss_k = ce
            if tv_weight:
                tv = (wk * (1 - torch.minimum(pk, logq.exp()).sum(-1))).sum() / wk.sum().clamp_min(1e-12)
                loss_k = (1 - tv_weight) * ce + tv_weight * tv
            total = total + decay ** k * loss_k
            weights += decay ** k
            hits = (logq.argmax(-1) == pk.argmax(-1)).sum()
            acc = float(hits / answer[:, 1 + k:].sum())
            if k == 0:
                metrics.update(ce=float(ce.detach()), acc=acc)
            else:
                metrics[f"acc_{k}"] = acc
    if not weights:  # no label in the batch: a zero loss that still has a graph
        total = sum(q.sum() * 0.0 for q in head.parameters())
    loss = total / max(weights, 1e-12)
    metrics.update(loss=float(loss.detach()), tokens=int(ok.sum()))
    return loss, metrics


# ---- the trainer -------------------------------------------------------------------------------------
class Eagle3Trainer(Trainer):
    """trainer.Trainer for an EAGLE-3 head: same loop, checkpoints (run_dir/ckpt.pt, resumable),
    acceptance checks and best/ + last/ heads (official EAGLE-3 layout).

    vocab: the draft vocabulary (token ids, any order; sorted here into draft id order); None: the
    full vocabulary. With ``cfg.init_head`` the starting head's own vocabulary is used."""

    def __init__(self, model, tokenizer, examples, run_dir: str | Path, cfg, dev_prompts: list | None = None,
                 progress: bool = True, vocab: Tensor | None = None):
        # Fine-tuning keeps d2t (docs/eagle3.md pitfall 2); a larger --draft-vocab widens it. Read once: the
        # vocabulary here, the weights in _build_head.
        self.init_src = Eagle3Head.load(cfg.init_head) if cfg.init_head else None
        if self.init_src is not None:
            vocab = widened_vocab(self.init_src.target_ids, vocab)
        elif vocab is None:
            vocab = torch.arange(int(model.config.vocab_size))
        super().__init__(model, tokenizer, examples, run_dir, cfg, dev_prompts, progress,
                         vocab.detach().cpu().long().sort().values)

    def _build_head(self) -> Eagle3Head:
        mc = self.model.config
        feature_layers(self.model)
        hcfg = Eagle3Config.from_target(mc, draft_vocab_size=int(self.vocab.numel()))
        if self.cfg.head_intermediate:
            hcfg = replace(hcfg, intermediate_size=self.cfg.head_intermediate)
        hcfg = replace(hcfg, num_layers=self.cfg.head_layers)
        check_eagle3_fits(hcfg, mc)
        # Random init, lm_head included (official). Starting lm_head from the target's rows of the draft vocabulary
        # was worse on SmolLM2-135M: loss 20.9 at step 1 (random: 9.1), 8.9 vs 8.1 at step 30.
        head = init_eagle3_head(hcfg, seed=self.cfg.seed, draft_ids=self.vocab)
        self.new_layers: tuple[str, ...] = ()  # name prefixes of the decoder layers the init head lacks
        src = self.init_src
        if src is not None:
            load_widened(head, src, self.cfg.init_head, mc.num_hidden_layers)
            self.new_layers = tuple(f"layers.{i}." for i in range(src.config.num_layers - 1, hcfg.num_layers - 1))
        return head.to(self.device)

    def _lr_scale(self, name: str) -> float:
        return self.cfg.new_layer_lr_scale if name.startswith(self.new_layers) else 1.0

    def batch_loss(self, examples: list) -> tuple[Tensor, dict]:
        return eagle3_loss(self.head, self.embed, self.lm_w, collate(examples), self.cfg.ttt_steps,
                           self.cfg.ttt_decay, self.cfg.bf16, self.softcap, self.cfg.lookup_weight,
                           self.cfg.tv_weight)

    def save_head(self, directory: str | Path, extra: dict | None = None) -> Path:
        return self.head.save(directory, n_layers=int(self.model.config.num_hidden_layers), extra_config=extra)


def widened_vocab(kept: Tensor, wanted: Tensor | None) -> Tensor:
    """The draft vocabulary of a run that starts from a head drafting over ``kept`` (target ids): ``kept``
    itself, unless ``wanted`` (most frequent first, as ``export.draft_vocabulary``) is larger; then
    ``kept`` plus the most frequent tokens of ``wanted`` it lacks, up to ``len(wanted)`` tokens. A
    trained head's tokens are never dropped: their rows are what the run starts from."""
    if wanted is None or wanted.numel() <= kept.numel():
        return kept
    have = set(kept.tolist())
    extra = [t for t in wanted.tolist() if t not in have][: wanted.numel() - kept.numel()]
    return torch.cat([kept.cpu(), torch.tensor(extra, dtype=torch.long)])


def load_widened(head: Eagle3Head, src: Eagle3Head, name, n_layers: int) -> None:
    """Copy the trained head ``src`` into ``head`` (same capture points and attention; ``head``'s draft
    vocabulary may be a superset of ``src``'s, its MLP wider, its stack deeper). Each kept token's lm_head
    row moves to its draft id in ``head``; a token new to the vocabulary starts from a zero row (logit 0
    everywhere), which the loss then trains like any other row. New MLP units start silent
    (``trainer.widen_mlp``); new decoder layers start as the identity (``_silent_layer``)."""
    have, want = src.config.intermediate_size, head.config.intermediate_size
    if have > want:
        raise ValueError(f"--init-head {name}: its MLP is {have} wide, this run's is {want}; "
                         f"pass --head-intermediate {have} or more")
    if src.config.num_layers > head.config.num_layers:
        raise ValueError(f"--init-head {name}: it has {src.config.num_layers} decoder layers, this run "
                         f"{head.config.num_layers}; pass --head-layers {src.config.num_layers} or more")
    old, new = src.state_dict(), head.state_dict()
    mlps = ["midlayer.mlp"] + [f"layers.{i}.mlp" for i in range(src.config.num_layers - 1)]
    resized = ("lm_head.weight", "d2t") + tuple(f"{m}.{p}_proj.weight" for m in mlps for p in ("gate", "up", "down"))
    same = src.config.feature_layers(n_layers) == head.config.feature_layers(n_layers) \
        and all(k in new and (k in resized or v.shape == new[k].shape) for k, v in old.items())
    pos = {t: i for i, t in enumerate(head.target_ids.tolist())}
    rows = [pos.get(t) for t in src.target_ids.tolist()]
    if not same or None in rows:
        raise ValueError(f"--init-head {name}: an EAGLE-3 head of another shape, capture points or draft vocabulary "
                         f"than this run's ({head.config})")
    lm = torch.zeros_like(new["lm_head.weight"], dtype=torch.float32)  # [Vd, H]
    lm[torch.tensor(rows)] = old["lm_head.weight"].float()
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in old.items() if k not in ("d2t", "t2d")}
    if have < want:
        for m in mlps:
            state = widen_mlp(state, new, prefix=m)
        log.info("widened the head's MLP from %d to %d (the new units start silent)", have, want)
    for i in range(src.config.num_layers - 1, head.config.num_layers - 1):
        state.update(_silent_layer(new, f"layers.{i}."))
    if head.config.num_layers > src.config.num_layers:
        log.info("deepened the head from %d to %d decoder layers (the new ones start as the identity)",
                 src.config.num_layers, head.config.num_layers)
    head.load_state_dict({**state, "lm_head.weight": lm, "d2t": new["d2t"], "t2d": new["t2d"]})


def _silent_layer(fresh: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A new decoder layer's weights that leave its input unchanged: ``fresh``'s random weights with
    zero o_proj and down_proj, so both residual branches add nothing until training moves them (the
    zeroed matrices get gradients through the random ones)."""
    out = {k: v.float() for k, v in fresh.items() if k.startswith(prefix)}
    for k in (prefix + "self_attn.o_proj.weight", prefix + "mlp.down_proj.weight"):
        out[k] = torch.zeros_like(out[k])
    return out


# ---- export ------------------------------------------------------------------------------------------
EAGLE2_ONLY = ("noise", "noise_len_norm", "ce_weight", "fc_bias")  # TrainConfig fields an EAGLE-3 run ignores


def model_card(info: dict, head: Eagle3Head, n_layers: int) -> str:
    """README.md of an exported EAGLE-3 head: what it is and how to serve it, then the data,
    corpus, hyperparameters, wall time and acceptance sections of the EAGLE-1/2 card."""
    from .export import model_card as eagle2_card

    cfg = head.config
    hp = {k: v for k, v in (info.get("hyperparameters") or {}).items() if k not in EAGLE2_ONLY}
    body = eagle2_card({**info, "bias": False, "loss_vocab": None, "hyperparameters": hp})
    body = body[body.index("## Base model"):]
    return "\n".join([
        f"# EAGLE-3 draft head for {info.get('base_model', '?')}", "",
        f"An EAGLE-3 draft head (fc fusing the target's hidden states {list(cfg.feature_layers(n_layers))} "
        f"- the inputs of layers 2, L//2 and L-3 - {_stack_words(cfg.num_layers)}, its own lm_head over a draft "
        f"vocabulary of {cfg.draft_vocab_size} tokens mapped by `d2t`/`t2d`) trained with `eagle2 train --arch eagle3` by "
        f"self-distillation. Loss: {_loss_words(hp.get('tv_weight') or 0.0)} the target's next-token distribution "
        f"over the draft vocabulary, with training-time test over {hp.get('ttt_steps', '?')} steps (diagonal mask); "
        f"the weights of optimizer step {info.get('steps', '?')}. {_layout_words(cfg.num_layers)}", "",
        "## Use", "", "```python", "import eagle2",
        f"gen = eagle2.load({info.get('model_arg', 'MODEL')!r}, head=\"THIS_DIR\")",
        "print(gen.generate(\"Hello\", max_new_tokens=64).text)", "```", "", *_serving_lines(cfg.num_layers), body])


def _loss_words(tv_weight: float) -> str:
    if not tv_weight:
        return "soft cross-entropy against"
    return (f"{1 - tv_weight:g} x soft cross-entropy + {tv_weight:g} x total variation (1 - sum min(p, q)) against")


def _stack_words(layers: int) -> str:
    return "one midlayer" if layers == 1 else f"a midlayer and {layers - 1} more decoder layer(s)"


def _serving_lines(layers: int) -> list[str]:
    if layers > 1:
        return []
    return ["vLLM: `speculative_config={\"method\": \"eagle3\", \"model\": \"THIS_DIR\", \"num_speculative_tokens\": 4}`; "
            "SGLang: `--speculative-algorithm EAGLE3 --speculative-draft-model-path THIS_DIR`.", ""]


def _layout_words(layers: int) -> str:
    if layers == 1:
        return "Official EAGLE-3 layout: `config.json` + `model.safetensors` (bf16 weights, int64 `d2t`, bool `t2d`)."
    return (f"The official EAGLE-3 layout extended by this project to {layers} decoder layers (`num_hidden_layers`; "
            "the later ones as `layers.i.*`): eagle2 runs it; SGLang and vLLM name a deeper head's extra layers "
            "otherwise, so they read only the one-layer layout correctly.")


def export_eagle3(src: str | Path, out: str | Path, info: dict, n_layers: int) -> Path:
    """Copy a trained EAGLE-3 head (run_dir/train-eagle3/best or last) to ``out`` in the official
    layout, with its model card."""
    head = Eagle3Head.load(src)
    extra = {k: v for k, v in json.loads((Path(src) / "config.json").read_text()).items() if k.startswith("eagle2_")}
    extra["eagle2_base_model"] = info.get("base_model")
    info = {**info, "steps": extra.get("eagle2_train_step", info.get("steps"))}  # the step of these weights, not the run's last
    out = head.save(out, n_layers=n_layers, extra_config=extra)
    (out / "README.md").write_text(model_card(info, head, n_layers))
    return out
