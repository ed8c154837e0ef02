"""Stage 3 of training: the head learns to predict the target's next feature.

Pairing (as at inference): the head at window position i takes (f_i, embedding of t_{i+1}) and
predicts f_{i+1}; loss only where f_{i+1} belongs to an assistant token:

    loss = SmoothL1(pred, f_{i+1}) + ce_weight * soft-CE(softmax(lm_head(f_{i+1})), log_softmax(lm_head(pred)))

With ``ttt_steps`` K > 1 (training-time test, ``unrolled_forward``) the head is also run K-1
more steps on its own predicted features, with the attention pattern a draft node at depth k+1
has, and the loss is the decayed mean over the steps: at inference every draft level below the
first is fed the head's own (imperfect) predictions, never the target's features, and plain
EAGLE training never shows it those.

Loss vocabulary (FR-Spec applied to training): given ``vocab`` (the draft vocabulary the head
ships, most frequent first), both distributions of the soft-CE, and the top-1 accuracy, are taken
over those lm_head rows only (the target's distribution renormalized over them): the drafter only
ever proposes those tokens, and the [V, H] lm_head product was ~80% of a step at V = 49k. Also: uniform noise on the input features, AdamW (betas
0.9/0.95), linear warm-up then linear decay, gradient clipping, bf16 autocast where the hardware
has native bf16 (CUDA, AVX512-BF16 / AMX; fp32 elsewhere), fp32 master weights; ``init_head``
fine-tunes a trained head instead of starting from random.

Checkpoints (``ckpt.pt``: head, optimizer, scheduler, noise RNG, data position, history) are
written every ``ckpt_minutes`` and whenever training stops (also on SIGINT / SIGTERM, after the step
in flight: ``_StopRequests``), so a later call resumes exactly:
same batches, same noise, bit-identical weights. Every ``eval_every`` steps the head decodes a
few held-out prompts with EAGLE-2 (greedy) and the mean acceptance length (tau) is recorded;
the head with the best tau is kept in ``best/`` (released layout). The target stays frozen;
this module does not read responses or compute features (it gets examples from features.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .. import masks
from ..draft_head import DraftHead, HeadConfig, init_head, rotate_half
from ..target import cap_logits
from .shards import Example

log = logging.getLogger("eagle2")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-4  # peak learning rate (official 3e-5 is for a 7B target and 68k dialogues x 20 epochs)
    epochs: int = 2
    batch_tokens: int = 2048  # padded tokens per optimizer step
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # lr decays linearly to lr * this at the last step
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    noise: float = 0.1  # uniform noise amplitude on input features ...
    noise_len_norm: int = 0  # if > 0: amplitude x noise_len_norm / sequence length (official code: 512)
    ce_weight: float = 0.1
    seed: int = 0
    bf16: bool | None = None  # autocast matmuls to bf16; None: where the hardware has fast bf16 (CUDA,
    #                           AVX512-BF16 / AMX), else fp32 (emulated bf16 made a step 22x slower on an AVX2 CPU)
    ckpt_minutes: float = 5.0
    eval_every: int = 200  # steps between acceptance evaluations (0: only at the end)
    eval_max_new_tokens: int = 64
    log_every: int = 10
    max_steps: int | None = None  # stop (with a checkpoint) once this many steps are done in total
    max_minutes: float | None = None  # stop (with a checkpoint) after this long in this call
    schedule_steps: int | None = None  # the lr reaches its floor at this step (None: all planned epochs' steps);
    #                                    a run that will be stopped early still anneals before it stops
    fc_bias: bool = True  # the released "bias" field; vLLM's EAGLE loader may drop fc.bias
    ttt_steps: int = 3  # training-time test: steps the head is unrolled on its own predicted features
    #                     (1 = plain EAGLE training on the target's features only)
    ttt_decay: float = 0.8  # weight of unrolled step k is ttt_decay ** k (normalized)
    init_head: str | None = None  # start from this head directory (released layout) instead of random weights
    head_intermediate: int = 0  # MLP width of the head (0: the target's). A wider MLP is still the released
    #                             layout (config.intermediate_size); a narrower --init-head is widened exactly
    head_layers: int = 1  # EAGLE-3 heads: decoder layers (1: the official layout); a shallower --init-head is
    #                       deepened exactly (the new layers start as the identity)
    lookup_weight: float = 1.0  # EAGLE-3 loss weight of answer tokens prompt lookup proposes (lookup.copy_hits),
    #                             against 1 for the rest: the engine's tree gets those from the lookup chain
    tv_weight: float = 0.0  # EAGLE-3 loss = (1 - w) soft cross-entropy + w total variation 1 - sum min(p, q): the
    #                         chance a draw from q is rejected at T = 1, what sampled drafting loses
    new_layer_lr_scale: float = 1.0  # lr multiplier of the decoder layers a deepened --init-head lacks: at the
    #                                  base lr a layer that starts as the identity barely moves in a few hundred steps

    def __post_init__(self) -> None:
        checks = [(self.lr > 0, "lr must be > 0"), (self.epochs >= 1, "epochs must be >= 1"),
                  (self.batch_tokens >= 16, "batch_tokens must be >= 16"),
                  (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
                  (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
                  (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)"),
                  (self.grad_clip > 0, "grad_clip must be > 0"), (self.noise >= 0, "noise must be >= 0"),
                  (self.ce_weight >= 0, "ce_weight must be >= 0"), (self.ckpt_minutes > 0, "ckpt_minutes must be > 0"),
                  (self.eval_every >= 0, "eval_every must be >= 0"),
                  (self.max_steps is None or self.max_steps >= 0, "max_steps must be >= 0"),
                  (self.schedule_steps is None or self.schedule_steps >= 1, "schedule_steps must be >= 1"),
                  (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0"),
                  (self.head_intermediate >= 0, "head_intermediate must be >= 0"),
                  (self.head_layers >= 1, "head_layers must be >= 1"),
                  (self.new_layer_lr_scale > 0, "new_layer_lr_scale must be > 0"),
                  (self.lookup_weight >= 0, "lookup_weight must be >= 0"),
                  (0 <= self.tv_weight <= 1, "tv_weight must be in [0, 1]"),
                  (self.ttt_steps >= 1, "ttt_steps must be >= 1"), (0 < self.ttt_decay <= 1, "ttt_decay must be in (0, 1]")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class TrainResult:
    status: str  # "done" (all epochs), "stopped" (max_steps / max_minutes) or "interrupted" (a signal); resumable
    step: int
    tokens_seen: int
    best_tau: float
    best_step: int
    seconds: float
    history: list = field(default_factory=list)


class _StopRequests:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM while training: the step in flight finishes, then the
    loop checkpoints and returns "interrupted", so a stop never loses the minutes since the last
    checkpoint. A second Ctrl-C aborts at once. Handlers go in only on the main thread (Python allows
    no other) and not over a signal the process ignores (a job started with ``&`` ignores SIGINT);
    the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step: the checkpoint is written first (Ctrl-C again aborts at once)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def widen_mlp(state: dict[str, Tensor], fresh: dict[str, Tensor], prefix: str = "layers.0.mlp") -> dict[str, Tensor]:
    """A trained head's weights in a head with a wider MLP (``prefix``: its MLP's key prefix), computing
    the same function.

    The old units keep their gate/up rows and down columns; the new units keep ``fresh``'s random
    gate/up rows and get zero down columns, so they add nothing until training moves them."""
    out = dict(state)
    for name in ("gate_proj", "up_proj"):
        k = f"{prefix}.{name}.weight"
        w = fresh[k].clone().float()  # [I_new, H]
        w[: state[k].shape[0]] = state[k]
        out[k] = w
    k = f"{prefix}.down_proj.weight"
    w = torch.zeros_like(fresh[k], dtype=torch.float32)  # [H, I_new]
    w[:, : state[k].shape[1]] = state[k]
    out[k] = w
    return out


def _plan(lengths: list[int], epoch: int, cfg: TrainConfig) -> list[list[int]]:
    """Batches (lists of example indices) of one epoch: deterministic from (seed, epoch).

    Shuffle, sort by length within chunks of 64 (little padding), cut into batches of at most
    batch_tokens padded tokens, shuffle the batches."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches: list[list[int]] = []
    for c0 in range(0, len(perm), 64):
        chunk = sorted(perm[c0:c0 + 64], key=lambda i: lengths[i])
        cur: list[int] = []
        for i in chunk:
            width = max([lengths[j] for j in cur] + [lengths[i]])
            if cur and width * (len(cur) + 1) > cfg.batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def collate(examples: list[Example]) -> dict[str, Tensor]:
    """Right-pad a batch. Returns hidden [B, T, H] bf16 (on the examples' device), tokens [B, T], lens [B],
    start [B], pos0 [B]."""
    b, t = len(examples), max(len(e.tokens) for e in examples)
    h = examples[0].hidden.shape[-1]
    hidden = torch.zeros(b, t, h, dtype=examples[0].hidden.dtype, device=examples[0].hidden.device)
    tokens = torch.zeros(b, t, dtype=torch.long)
    for i, e in enumerate(examples):
        hidden[i, : len(e.tokens)] = e.hidden
        tokens[i, : len(e.tokens)] = e.tokens
    return dict(hidden=hidden, tokens=tokens, lens=torch.tensor([len(e.tokens) for e in examples]),
                start=torch.tensor([e.start for e in examples]), pos0=torch.tensor([e.pos0 for e in examples]))


def unrolled_forward(head: DraftHead, features: Tensor, token_embeds: Tensor, positions: Tensor,
                     steps: int) -> list[Tensor]:
    """The head run as it runs at inference, ``steps`` levels deep, on every position at once
    (training-time test).

    Step 0 is the plain forward: at position i the head sees (f_i, t_{i+1}) and the true
    features before it, and predicts f_{i+1}. At step k the input feature at position i is the
    head's own step k-1 prediction from position i-1, and the query attends to the true keys at
    positions <= i-k plus one key from each step j = 1..k at position i-k+j: exactly the keys a
    depth-(k+1) draft node sees (committed context, then its own ancestors). So step k trains
    the head for draft depth k+1 on the inputs it will really get there.

    features, token_embeds: [B, T, H]; positions: [B, T]. Returns one [B, T, H] prediction per
    step; step k's rows i < k have no such chain and are meaningless (callers mask them)."""
    layer = head.layers[0]
    a = layer.self_attn
    b, t, _ = features.shape
    nh, nkv, hd = a.nh, a.nkv, a.hd
    rep = nh // nkv
    scale = hd ** -0.5
    dev = features.device
    keys: list[Tensor] = []  # per step: [B, Hq, T, D] (already repeated for grouped-query heads)
    vals: list[Tensor] = []
    preds: list[Tensor] = []
    cos = sin = None
    feat = features
    for k in range(steps):
        if k:  # position i now takes the previous step's prediction made at i - 1
            feat = torch.cat([features[:, :1], preds[-1][:, :-1]], dim=1)  # row 0 is a placeholder
        x = head.fc(torch.cat([token_embeds, feat], dim=-1))  # [B, T, H]
        if cos is None:
            cos, sin = head.rope(positions, x.dtype)  # [B, 1, T, D]
        q = a.q_proj(x).view(b, t, nh, hd).transpose(1, 2)  # [B, Hq, T, D]
        kk = a.k_proj(x).view(b, t, nkv, hd).transpose(1, 2)  # [B, Hkv, T, D]
        vv = a.v_proj(x).view(b, t, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        kk = kk * cos + rotate_half(kk) * sin
        keys.append(kk.repeat_interleave(rep, dim=1))
        vals.append(vv.repeat_interleave(rep, dim=1))
        allowed = masks.causal(t, shift=k, device=dev)  # [T, T]: true keys at <= i - k
        s0 = torch.matmul(q, keys[0].transpose(-1, -2)) * scale  # [B, Hq, T, T]
        scores = [masks.masked_scores(s0, allowed)]
        shifted_v = []
        for j in range(1, k + 1):  # step j's key at position i - (k - j), lined up with query i
            sh = k - j
            kj = F.pad(keys[j], (0, 0, sh, 0))[:, :, :t]  # [B, Hq, T, D]
            shifted_v.append(F.pad(vals[j], (0, 0, sh, 0))[:, :, :t])
            scores.append((q * kj).sum(-1, keepdim=True) * scale)  # [B, Hq, T, 1]
        p = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)  # [B, Hq, T, T + k]
        out = torch.matmul(p[..., :t], vals[0])  # [B, Hq, T, D]
        for j, vj in enumerate(shifted_v):
            out = out + p[..., t + j:t + j + 1] * vj
        h = x + a.o_proj(out.transpose(1, 2).reshape(b, t, nh * hd))
        preds.append(h + layer.mlp(layer.post_attention_layernorm(h)))
    return preds


def head_loss(head: DraftHead, embed, lm_head_weight: Tensor, batch: dict[str, Tensor], cfg: TrainConfig,
              noise_gen: torch.Generator | None, softcap: float | None = None) -> tuple[Tensor, dict]:
    """Loss of one batch and its metrics (loss; l1, ce, acc = draft top-1 == target top-1 at
    step 0; acc_k at unrolled step k; tokens).

    loss = sum_k w_k (SmoothL1 + ce_weight * soft-CE) / sum_k w_k over the ``ttt_steps`` unrolled
    steps, w_k = ttt_decay ** k."""
    dev = lm_head_weight.device
    hidden = batch["hidden"].to(dev).float()  # [B, T, H]
    tokens = batch["tokens"].to(dev)  # [B, T]
    b, t, _ = hidden.shape
    f_in, f_next = hidden[:, :-1], hidden[:, 1:]  # [B, T-1, H]: f_i and the target f_{i+1}
    i = torch.arange(t - 1, device=dev)[None]  # [1, T-1]
    lens, start = batch["lens"].to(dev)[:, None], batch["start"].to(dev)[:, None]
    mask = (i + 1 >= start) & (i + 1 < lens)  # [B, T-1]: f_{i+1} is an assistant token's feature
    if cfg.noise > 0 and noise_gen is not None:
        u = torch.rand(f_in.shape, generator=noise_gen, device="cpu").to(dev)  # [B, T-1, H]
        scale = cfg.noise * (cfg.noise_len_norm / lens.float() if cfg.noise_len_norm else torch.ones_like(lens.float()))
        f_in = f_in + (u * 2 - 1) * scale[:, :, None]
    positions = batch["pos0"].to(dev)[:, None] + i  # [B, T-1]
    with torch.no_grad():
        emb = embed(tokens[:, 1:]).float()  # [B, T-1, H]: embedding of t_{i+1}
    w = lm_head_weight
    metrics: dict = dict(l1=float("nan"), ce=float("nan"), acc=float("nan"))
    total = torch.zeros((), device=dev)
    weights = 0.0
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        if cfg.ttt_steps == 1:
            preds = [head(f_in, emb, positions)[0]]  # [B, T-1, H]
        else:
            preds = unrolled_forward(head, f_in, emb, positions, cfg.ttt_steps)
        tgt_m = f_next[mask]  # [N, H]
        with torch.no_grad():
            tgt_logits = cap_logits(F.linear(tgt_m.to(w.dtype) if not cfg.bf16 else tgt_m, w).float(),
                                    softcap)  # [N, V]
            p = tgt_logits.softmax(-1)  # [N, V]
            tgt_top = tgt_logits.argmax(-1)  # [N]
        rows = i.expand(b, -1)[mask]  # [N] window index of each masked row
        for k, pred in enumerate(preds):
            sel = rows >= k  # [N] rows with a k-step chain behind them
            if not bool(sel.any()):
                continue
            pred_m = pred[mask][sel].float()  # [N_k, H]
            l1 = F.smooth_l1_loss(pred_m, tgt_m[sel])
            pred_logits = cap_logits(F.linear(pred_m.to(w.dtype) if not cfg.bf16 else pred_m, w).float(),
                                     softcap)  # [N_k, V]
            ce = -(p[sel] * pred_logits.log_softmax(-1)).sum(-1).mean()
            wk = cfg.ttt_decay ** k
            total = total + wk * (l1 + cfg.ce_weight * ce)
            weights += wk
            with torch.no_grad():
                acc = float((pred_logits.argmax(-1) == tgt_top[sel]).float().mean())
            if k == 0:
                metrics.update(l1=float(l1.detach()), ce=float(ce.detach()), acc=acc)
            else:
                metrics[f"acc_{k}"] = acc
    if not weights:  # no assistant token in the batch: a zero loss that still has a graph
        total = sum(q.sum() * 0.0 for q in head.parameters())
    loss = total / max(weights, 1e-12)
    metrics.update(loss=float(loss.detach()), tokens=int(mask.sum()))
    return loss, metrics


def acceptance(model, tokenizer, head: DraftHead, prompts: list, max_new_tokens: int = 64, tree=None) -> dict:
    """Greedy EAGLE-2 decoding of ``prompts`` with ``head``: tau = new tokens / target forwards.

    The drafter decodes with its own inference copy, so the training head is left untouched."""
    from ..api import Eagle2Generator

    gen = Eagle2Generator(model, tokenizer, head, tree=tree)
    new = rounds = 0
    per = []
    for pr in prompts:
        res = gen.generate(pr, max_new_tokens=max_new_tokens, method="eagle2")
        new += res.stats.new_tokens
        rounds += res.stats.rounds
        per.append(res.stats.mean_accept_len)
    return dict(tau=new / rounds if rounds else 0.0, per_prompt=per, new_tokens=new, rounds=rounds)


class Trainer:
    """Trains one head on a list of examples; owns run_dir/{ckpt.pt, best/, metrics.jsonl}.

    vocab: [N] token ids the loss is computed over, the head's draft vocabulary (most frequent
    first); the heads saved in best/ and last/ carry it, so acceptance is measured with the head as
    shipped. None: the full vocabulary."""

    def __init__(self, model, tokenizer, examples, run_dir: str | Path, cfg: TrainConfig,
                 dev_prompts: list | None = None, progress: bool = True, vocab: Tensor | None = None):
        self.device = next(model.parameters()).device
        if cfg.bf16 is None:  # bf16 where it is the device's fast dtype, the same rule as load(dtype="auto")
            from ..models import resolve_dtype

            cfg = replace(cfg, bf16=resolve_dtype("auto", self.device) == torch.bfloat16)
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.examples = examples
        self.lengths = examples.lengths() if hasattr(examples, "lengths") else [len(e.tokens) for e in examples]
        if not self.lengths:
            raise ValueError("no training examples (run the responses and features stages first)")
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dev_prompts = list(dev_prompts or [])
        self.progress = progress
        self.embed = model.get_input_embeddings()
        self.lm_w = model.get_output_embeddings().weight.detach()  # [V, H] frozen
        self.vocab = None if vocab is None else vocab.detach().cpu().long()  # [N]
        if self.vocab is not None:
            if self.vocab.numel() == 0 or int(self.vocab.max()) >= self.lm_w.shape[0] or int(self.vocab.min()) < 0:
                raise ValueError(f"loss vocabulary: {self.vocab.numel()} ids, each must be in [0, {self.lm_w.shape[0]})")
            self.lm_w = self.lm_w[self.vocab.to(self.lm_w.device)]  # [N, H]: the draft vocabulary's rows
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.head = self._build_head()
        self.head.train()
        self.opt = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.steps_per_epoch = len(_plan(self.lengths, 0, cfg))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warm, total, floor = cfg.warmup_steps, cfg.schedule_steps or self.total_steps, cfg.min_lr_ratio

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            frac = (step - warm) / max(1, total - warm)
            return max(floor, 1.0 - (1.0 - floor) * frac)

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = self.epoch = self.batch_in_epoch = self.tokens_seen = 0
        self.best_tau, self.best_step = -1.0, -1
        self.history: list[dict] = []
        self.elapsed = 0.0
        if (self.dir / "ckpt.pt").exists():
            self._load()

    def _param_groups(self) -> list[dict]:
        """AdamW groups: weight decay on matrices only; each parameter at the lr ``_lr_scale`` gives it."""
        groups: dict[tuple[bool, float], list] = {}
        for name, p in self.head.named_parameters():
            groups.setdefault((p.ndim >= 2, self._lr_scale(name)), []).append(p)
        return [{"params": ps, "weight_decay": self.cfg.weight_decay if matrix else 0.0, "lr": self.cfg.lr * scale}
                for (matrix, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]

    def _lr_scale(self, name: str) -> float:
        """The lr multiplier of one head parameter (1: the base lr)."""
        return 1.0

    def _build_head(self):
        """The head to train (fresh or ``init_head``), on the target's device. Subclasses train other heads."""
        cfg = self.cfg
        self.head_cfg = HeadConfig.from_target(self.model.config, bias=cfg.fc_bias)
        if cfg.head_intermediate:
            self.head_cfg = replace(self.head_cfg, intermediate_size=cfg.head_intermediate)
        self.head = init_head(self.head_cfg, seed=cfg.seed).to(self.device)
        if cfg.init_head:
            self._warm_start(cfg.init_head)
        self.head.draft_vocab = self.vocab  # saved with every head; the acceptance checks draft over it
        return self.head

    def _fetch(self, idx: list[int]) -> list:
        """One step's examples: one batched forward when they are streamed, else read one by one."""
        if hasattr(self.examples, "batch"):
            return self.examples.batch(idx)
        return [self.examples[i] for i in idx]

    def batch_loss(self, examples: list) -> tuple[Tensor, dict]:
        """(loss, metrics) of one batch of examples; metrics has at least loss, tokens and acc."""
        return head_loss(self.head, self.embed, self.lm_w, collate(examples), self.cfg, self.noise_gen, self.softcap)

    def _warm_start(self, directory: str) -> None:
        """Start from a trained head (fine-tuning) instead of random weights."""
        from ..draft_head import check_head_fits

        src = DraftHead.load(directory)
        check_head_fits(src.config, self.model.config)
        if (src.config.bias, src.config.attention_bias) != (self.head_cfg.bias, self.head_cfg.attention_bias):
            raise ValueError(f"--init-head {directory}: its fc/attention biases ({src.config.bias}, "
                             f"{src.config.attention_bias}) differ from this run's ({self.head_cfg.bias}, "
                             f"{self.head_cfg.attention_bias}); use --no-fc-bias to match or another head")
        state = {k: v.float() for k, v in src.state_dict().items()}
        have, want = src.config.intermediate_size, self.head_cfg.intermediate_size
        if have > want:
            raise ValueError(f"--init-head {directory}: its MLP is {have} wide, this run's is {want}; "
                             f"pass --head-intermediate {have} or more")
        if have < want:
            state = widen_mlp(state, self.head.state_dict())
            log.info("widened the head's MLP from %d to %d (the new units start silent)", have, want)
        self.head.load_state_dict(state)
        log.info("starting from the head in %s", directory)

    # ---- checkpoints -----------------------------------------------------------------------
    def _save(self) -> None:
        state = dict(head=self.head.state_dict(), opt=self.opt.state_dict(), sched=self.sched.state_dict(),
                     noise_rng=self.noise_gen.get_state(), step=self.step, epoch=self.epoch,
                     batch_in_epoch=self.batch_in_epoch, tokens_seen=self.tokens_seen, best_tau=self.best_tau,
                     best_step=self.best_step, history=self.history, elapsed=self.elapsed,
                     config=asdict(self.cfg), n_examples=len(self.lengths), vocab=self.vocab)
        tmp = self.dir / "ckpt.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.dir / "ckpt.pt")

    def _load(self) -> None:
        path = self.dir / "ckpt.pt"
        try:
            s = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # cut short or overwritten
            raise ValueError(f"{path} is damaged ({type(e).__name__}); delete it to train from the start, or "
                             f"use a fresh --run-dir") from None
        if s.get("n_examples") != len(self.lengths):
            raise ValueError(f"checkpoint in {self.dir} was trained on {s.get('n_examples')} examples, now there "
                             f"are {len(self.lengths)}; use a fresh --run-dir or delete {self.dir / 'ckpt.pt'}")
        have = s.get("vocab")
        if (have is None) != (self.vocab is None) or (have is not None and not torch.equal(have, self.vocab)):
            raise ValueError(f"checkpoint in {self.dir} was trained over another loss vocabulary; use a fresh "
                             f"--run-dir or delete {self.dir / 'ckpt.pt'}")
        if [len(g["params"]) for g in s["opt"]["param_groups"]] != [len(g["params"]) for g in self.opt.param_groups]:
            raise ValueError(f"checkpoint in {self.dir} grouped the head's parameters by learning rate otherwise "
                             f"(--new-layer-lr-scale / --head-layers); use a fresh --run-dir or delete "
                             f"{self.dir / 'ckpt.pt'}")
        self.head.load_state_dict(s["head"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        self.noise_gen.set_state(s["noise_rng"])
        for k in ("step", "epoch", "batch_in_epoch", "tokens_seen", "best_tau", "best_step", "history", "elapsed"):
            setattr(self, k, s[k])
        log.info("resumed training at step %d (epoch %d, batch %d)", self.step, self.epoch, self.batch_in_epoch)

    def _evaluate(self) -> float:
        if not self.dev_prompts:
            return float("nan")
        self.head.eval()
        r = acceptance(self.model, self.tokenizer, self.head, self.dev_prompts, self.cfg.eval_max_new_tokens)
        self.head.train()
        tau = r["tau"]
        rec = dict(step=self.step, tau=round(tau, 4), eval=True)
        self.history.append(rec)
        self._metric(rec)
        if tau > self.best_tau:
            self.best_tau, self.best_step = tau, self.step
            self.save_head(self.dir / "best", extra={"eagle2_train_step": self.step, "eagle2_dev_tau": round(tau, 4)})
        return tau

    def _log_window(self, window: list[dict], grad_norm: float, bar) -> None:
        """One metrics.jsonl record: the means over the steps since the last one."""
        n = len(window)
        rec = dict(step=self.step, epoch=self.epoch, lr=self.sched.get_last_lr()[0],
                   **{k: round(sum(x[k] for x in window) / n, 5)
                      for k in ("loss", "l1", "ce") if k in window[0]},  # (EAGLE-3: no l1)
                   acc=round(sum(x["acc"] for x in window) / n, 4), grad_norm=round(grad_norm, 4),
                   tokens_seen=self.tokens_seen, seconds=round(self.elapsed, 2))  # training time so far (no evaluations)
        for k in range(1, self.cfg.ttt_steps):  # top-1 agreement at each unrolled step
            got = [x[f"acc_{k}"] for x in window if f"acc_{k}" in x]
            if got:
                rec[f"acc_{k}"] = round(sum(got) / len(got), 4)
        self.history.append(rec)
        self._metric(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}",
                        tau=f"{self.best_tau:.2f}" if self.best_tau >= 0 else "-")
        log.info("step %d loss %.4f acc %.3f", self.step, rec["loss"], rec["acc"])

    def _metric(self, rec: dict) -> None:
        with (self.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def save_head(self, directory: str | Path, extra: dict | None = None) -> Path:
        return self.head.save(directory, extra_config=extra)

    # ---- the loop --------------------------------------------------------------------------
    def train(self) -> TrainResult:
        t_call = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        with _StopRequests() as stop:
            status = self._loop(bar, stop)
        bar.close()
        if status == "done" and not any(h.get("eval") and h["step"] == self.step for h in self.history):
            self._evaluate()
        if not self.dev_prompts and status == "done":
            self.save_head(self.dir / "best", extra={"eagle2_train_step": self.step})
        self._save()
        self.save_head(self.dir / "last", extra={"eagle2_train_step": self.step})
        return TrainResult(status, self.step, self.tokens_seen, self.best_tau, self.best_step, time.time() - t_call,
                           self.history)

    def _loop(self, bar, stop: _StopRequests) -> str:
        """Steps until the epochs end ("done"), a limit is reached ("stopped") or a signal ("interrupted")."""
        cfg, t_call, last_ckpt = self.cfg, time.time(), time.time()
        status = "done"
        acc_window: list[dict] = []
        while self.epoch < cfg.epochs:
            plan = _plan(self.lengths, self.epoch, cfg)
            while self.batch_in_epoch < len(plan):
                if stop.requested:
                    status = "interrupted"
                    break
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    status = "stopped"
                    break
                if cfg.max_minutes is not None and time.time() - t_call > cfg.max_minutes * 60:
                    status = "stopped"
                    break
                t0 = time.time()
                loss, m = self.batch_loss(self._fetch(plan[self.batch_in_epoch]))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.head.parameters(), cfg.grad_clip)
                self.opt.step()
                self.sched.step()
                self.step += 1
                self.batch_in_epoch += 1
                self.tokens_seen += m["tokens"]
                self.elapsed += time.time() - t0
                acc_window.append(m)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == 1:
                    self._log_window(acc_window, float(gn), bar)
                    acc_window = []
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._evaluate()
                if time.time() - last_ckpt > cfg.ckpt_minutes * 60:
                    self._save()
                    last_ckpt = time.time()
            if status != "done":
                break
            self.epoch += 1
            self.batch_in_epoch = 0
        return status


def loss_curve(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h and not math.isnan(h["loss"])]
