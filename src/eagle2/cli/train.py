"""`eagle2 train`: train a draft head for a target model (responses -> features -> train -> export)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .common import _model_args

DESCRIPTION = """Train a draft head for MODEL: EAGLE-1/2 (--arch eagle2, the default) or EAGLE-3 (--arch eagle3). Four stages, each resumable (rerun the same command
to continue where it stopped), each with a progress bar and ETA, all cached in --run-dir
(default $EAGLE2_CACHE/runs/<model>, outside git):

  responses  the target writes its own greedy answers to the training prompts (self-distillation),
             chat template applied, into the corpus (--corpus; default corpus/<model> in the repo
             for built-in models, committed and grown run by run, else <run-dir>/corpus). Only
             prompts the corpus has not answered are answered; nothing is regenerated. Multi-turn
             prompts ({"turns": [...]}) get each later turn asked after the model's own answer.
             Prompts: --prompts FILE... (ShareGPT json, GSM8K/GPTeacher, or JSONL of {"prompt"} /
             {"messages"} / {"conversations"} / {"turns"}), default the project mix in
             ../shared/data/train. --fixed-responses uses the files' reference answers (GSM8K
             answer, GPTeacher response, first assistant turn) instead, kept out of the corpus.
  features   (captured by the responses stage on Llama-style targets, so usually nothing is left)
             the target runs over prompt + response; its last hidden states (after the final norm,
             bf16) and tokens of the whole conversation (--context N: the answer and N prompt
             tokens; --max-len bounds a window) are stored in safetensors shards (resumable by
             shard). --stream skips this stage and computes features on the fly during training.
             Trains on the whole corpus, or with --prompts / --limit only on those prompts.
  train      the head learns to predict the next feature: SmoothL1 + 0.1 x soft cross-entropy of the
             target's next-token distribution over the head's draft vocabulary (--draft-vocab; or
             --full-vocab-loss), assistant positions only, uniform feature noise,
             AdamW (0.9, 0.95), warm-up, grad clip 0.5, bf16 autocast where bf16 is native
             (--train-precision). With --ttt-steps K the head is also unrolled K-1 steps on its own
             predictions (training-time test), so deeper draft levels are trained on the inputs
             they really get. --init-head fine-tunes. Checkpoints every few minutes
             (resume is exact); every --eval-every steps it decodes held-out prompts with EAGLE-2 and
             keeps the head with the best mean acceptance length.
  export     writes the head in the released EAGLE layout (config.json + model.safetensors) with a
             model card README.md to --out (default <run-dir>/head); --mtbench N measures acceptance
             on N MT-bench first turns per category first.

--arch eagle3 trains an EAGLE-3 head instead (features: the target's hidden states 2, L//2, L-3 and
its next-token distribution, in <run-dir>/features-eagle3-*; training in <run-dir>/train-eagle3):
soft cross-entropy of the head's own logits over the draft vocabulary (--draft-vocab most frequent
answer tokens, as d2t/t2d) against the target's distribution renormalised over it, no feature loss,
no noise; training-time test over --ttt-steps steps (default 7), step k fed the head's own step k-1
outputs under the diagonal mask. Export in the official EAGLE-3 layout (SGLang EAGLE3, vLLM eagle3).
--ce-weight, --noise and --no-fc-bias are EAGLE-1/2 options; --head-layers, --new-layer-lr-scale and
--lookup-weight and --tv-weight are EAGLE-3's;
--head-intermediate serves both.

Example: eagle2 train --model smollm2-135m --limit 2000 --epochs 3 --out ./my-head"""


def register(sub) -> None:
    p = sub.add_parser("train", help="train a draft head for a model (self-distillation, resumable)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p, draft_vocab=False)
    p.add_argument("--arch", default="eagle2", choices=["eagle2", "eagle3"],
                   help="head type: eagle2 = EAGLE-1/2 head (feature + token loss), eagle3 = EAGLE-3 head (three "
                        "target layers, own draft vocabulary, token loss, training-time test) (default: %(default)s)")
    p.add_argument("--stages", default="responses,features,train,export",
                   help="comma-separated stages to run, in order (default: %(default)s)")
    p.add_argument("--run-dir", default=None, help="cache directory of this run (default: $EAGLE2_CACHE/runs/<model>)")
    p.add_argument("--out", default=None, help="exported head directory (default: <run-dir>/head)")
    p.add_argument("--prompts", nargs="+", default=None, metavar="FILE", help="prompt files (default: the project mix)")
    p.add_argument("--data-dir", default=None, help="shared data directory with train/ and eval/ (default: ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts of the (shuffled) list")
    p.add_argument("--dev-prompts", type=int, default=8, help="prompts held out for acceptance evaluation (default: %(default)s)")
    p.add_argument("--fixed-responses", action="store_true", help="train on the data set's reference answers")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length cap (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=320, help="longer prompts are skipped (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="responses stage: sample the target's answers at this temperature instead of greedy "
                        "(more varied data from the same prompts; give the pass its own --run-dir) (default: 0)")
    p.add_argument("--gen-batch-size", type=int, default=64, help="prompts per generate batch (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=64, help="conversations per feature shard (default: %(default)s)")
    p.add_argument("--context", type=int, default=None,
                   help="prompt tokens kept before each answer (default: the whole prompt, as at inference)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="longest training window in tokens; longer conversations drop their oldest prompt tokens "
                        "(default: %(default)s)")
    p.add_argument("--corpus", default=None, metavar="DIR",
                   help="the corpus of self-distilled conversations (default: corpus/<model> in the repo for "
                        "built-in models, else <run-dir>/corpus)")
    p.add_argument("--extra-corpus", action="append", default=[], metavar="DIR",
                   help="another corpus of this model's answers to train on beside --corpus, read only (repeat for "
                        "several), e.g. its answers sampled at T = 1: corpus/<model>-t1 in the repo for built-in models")
    p.add_argument("--stream", action="store_true", help="compute features on the fly instead of caching them (no disk; the "
                        "fast way on a GPU: --device cuda)")
    p.add_argument("--epochs", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per step (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.1, help="uniform feature noise amplitude (default: %(default)s)")
    p.add_argument("--ce-weight", type=float, default=0.1,
                   help="weight of the soft cross-entropy against the target's next-token distribution, next to the "
                        "feature SmoothL1 (default: %(default)s, the official recipe)")
    p.add_argument("--full-vocab-loss", action="store_true",
                   help="soft-CE over the full vocabulary instead of the draft vocabulary the head ships (slower)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between acceptance checks (default: %(default)s)")
    p.add_argument("--eval-max-new-tokens", type=int, default=64,
                   help="tokens decoded per held-out prompt in each acceptance check (default: %(default)s)")
    p.add_argument("--ttt-steps", type=int, default=None,
                   help="training-time test: unroll the head this many steps on its own predicted features, as "
                        "the drafter does at depths 2, 3, ... (1: plain EAGLE training; default: 3 for eagle2, "
                        "7 for eagle3)")
    p.add_argument("--ttt-decay", type=float, default=0.8,
                   help="loss weight of unrolled step k is DECAY**k (default: %(default)s)")
    p.add_argument("--init-head", default=None, metavar="DIR",
                   help="start from this trained head (released layout) instead of random weights: fine-tuning. "
                        "An EAGLE-3 head keeps its draft vocabulary; a larger --draft-vocab adds the most frequent "
                        "tokens it lacks (their rows start at zero)")
    p.add_argument("--head-intermediate", type=int, default=0, metavar="N",
                   help="MLP width of the head (0: the target's). Still the released layout; a narrower "
                        "--init-head is widened without changing its outputs (default: %(default)s)")
    p.add_argument("--head-layers", type=int, default=1, metavar="N",
                   help="EAGLE-3 heads: decoder layers (1: the official layout SGLang and vLLM load; more is this "
                        "project's extension, run by eagle2 only). A shallower --init-head is deepened without "
                        "changing its outputs (default: %(default)s)")
    p.add_argument("--lookup-weight", type=float, default=1.0, metavar="W",
                   help="EAGLE-3 heads: loss weight of the answer tokens prompt lookup would propose (the engine's tree "
                        "gets them from its lookup chain), against 1 for the rest (default: %(default)s)")
    p.add_argument("--tv-weight", type=float, default=0.0, metavar="W",
                   help="EAGLE-3 heads: loss = (1 - W) x soft cross-entropy + W x total variation 1 - sum min(p, q), "
                        "the chance a draft sampled from q is rejected at T = 1 (default: %(default)s)")
    p.add_argument("--new-layer-lr-scale", type=float, default=1.0, metavar="X",
                   help="EAGLE-3 heads deepened from --init-head: the new layers train at X times --lr (they start "
                        "as the identity and barely move at the base lr) (default: %(default)s)")
    p.add_argument("--train-precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="train stage matmuls: auto = bf16 autocast on CUDA or a CPU with native bf16 (AVX512-BF16 / "
                        "AMX), fp32 elsewhere (emulated bf16 was 22x slower per step on an AVX2 CPU) (default: auto)")
    p.add_argument("--no-fc-bias", action="store_true", help="train fc without a bias (what some vLLM versions load)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop training after N steps in total (resumable)")
    p.add_argument("--schedule-steps", type=int, default=None, metavar="N",
                   help="the learning rate decays linearly to its floor (0.1 x --lr) at step N instead of at the end "
                        "of the last epoch: a run that --max-steps / --max-minutes will stop early still anneals "
                        "(default: all planned steps)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop each stage after this long (resumable)")
    p.add_argument("--mtbench", type=int, default=0, help="MT-bench prompts per category measured at export (default: 0)")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="FR-Spec: ship the N most frequent response tokens with the head; the drafter proposes "
                        "only those (output stays exact; 0: none, draft over the full vocabulary) (default: 8192)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train)


def _stages(args) -> tuple[str, ...]:
    from ..train.pipeline import STAGES

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"unknown stage {bad[0] if bad else '(none)'}; stages are {', '.join(STAGES)}")
    return stages


def _check_args(args) -> None:
    """Every bad option, refused before the model loads."""
    for name in ("limit", "max_new_tokens", "max_prompt_tokens", "gen_batch_size", "shard_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {v}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0; got {args.temperature}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}")
    stages = _stages(args)
    written = (("--out", args.out, "export" in stages), ("--run-dir", args.run_dir, True),
               ("--corpus", args.corpus, "responses" in stages and not args.fixed_responses))
    for flag, d, writes in written:
        if d and Path(d).exists() and not Path(d).is_dir():
            raise ValueError(f"{flag} {d} is a file; give a directory")
        if d and writes and not _writable(Path(d)):
            raise ValueError(f"{flag} {d} cannot be created or written (read-only, no permission, or under a "
                             "file); give another directory")
    for d in args.extra_corpus:  # found before the model loads; the pipeline checks whose answers they are
        if not (Path(d) / "manifest.json").is_file():
            raise ValueError(f"--extra-corpus {d}: not a corpus (no manifest.json there)")
    if args.init_head and not (Path(args.init_head) / "config.json").is_file():
        raise ValueError(f"--init-head {args.init_head}: not a head directory (no config.json there)")
    if (args.context or 0) < 0 or args.dev_prompts < 0 or args.mtbench < 0 or args.draft_vocab < 0:
        raise ValueError("--context, --dev-prompts, --mtbench and --draft-vocab must be >= 0")
    if args.max_len < 16:
        raise ValueError(f"--max-len must be >= 16; got {args.max_len}")
    if args.head_layers != 1 and args.arch != "eagle3":
        raise ValueError(f"--head-layers {args.head_layers} needs --arch eagle3 (EAGLE-1/2 heads have one layer)")
    if args.lookup_weight != 1.0 and args.arch != "eagle3":
        raise ValueError(f"--lookup-weight {args.lookup_weight} needs --arch eagle3")
    if args.tv_weight and args.arch != "eagle3":
        raise ValueError(f"--tv-weight {args.tv_weight} needs --arch eagle3")
    if args.new_layer_lr_scale != 1.0 and not (args.arch == "eagle3" and args.init_head and args.head_layers > 1):
        raise ValueError("--new-layer-lr-scale applies to new layers only: it needs --arch eagle3, --init-head and "
                         "--head-layers deeper than that head")


def _writable(d: Path) -> bool:
    """Whether directory ``d`` can be written, or created where it does not exist yet."""
    d = d.absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    return d.is_dir() and os.access(d, os.W_OK)


def _train_config(args):
    from ..train.trainer import TrainConfig

    return TrainConfig(lr=args.lr, epochs=args.epochs, batch_tokens=args.batch_tokens, warmup_steps=args.warmup_steps,
                       noise=args.noise, ce_weight=args.ce_weight, eval_every=args.eval_every,
                       eval_max_new_tokens=args.eval_max_new_tokens, seed=args.seed, max_steps=args.max_steps,
                       schedule_steps=args.schedule_steps,
                       max_minutes=args.max_minutes, fc_bias=not args.no_fc_bias,
                       ttt_steps=(7 if args.arch == "eagle3" else 3) if args.ttt_steps is None else args.ttt_steps,
                       ttt_decay=args.ttt_decay, init_head=args.init_head,
                       head_intermediate=args.head_intermediate, head_layers=args.head_layers,
                       new_layer_lr_scale=args.new_layer_lr_scale, lookup_weight=args.lookup_weight,
                       tv_weight=args.tv_weight,
                       bf16={"auto": None, "bf16": True, "fp32": False}[args.train_precision])


def cmd_train(args) -> int:
    from ..train.pipeline import PipelineOptions, default_run_dir, run_pipeline

    stages = _stages(args)
    _check_args(args)
    cfg = _train_config(args)
    import torch

    from ..models import load_target

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tok, builtin = load_target(args.model, dtype=args.dtype, device=args.device)
    key = builtin or args.model
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(key)
    opts = PipelineOptions(
        run_dir=run_dir, stages=stages, prompts=tuple(args.prompts or ()),
        data_dir=Path(args.data_dir) if args.data_dir else None, limit=args.limit, dev_prompts=args.dev_prompts,
        fixed=args.fixed_responses, max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
        gen_batch_size=args.gen_batch_size, shard_size=args.shard_size, context=args.context, max_len=args.max_len,
        corpus=Path(args.corpus) if args.corpus else None, extra_corpora=tuple(map(Path, args.extra_corpus)),
        vocab_loss=not args.full_vocab_loss, stream=args.stream,
        out=Path(args.out) if args.out else None, mtbench=args.mtbench, draft_vocab=args.draft_vocab,
        max_minutes=args.max_minutes, temperature=args.temperature, arch=args.arch,
        progress=not args.no_progress, base_model=_base_name(model, key), model_arg=args.model, train_cfg=cfg)
    summary = run_pipeline(model, tok, opts)
    for stage, r in summary.items():
        print(f"{stage}: {r}", file=sys.stderr)
    if summary.get("train", {}).get("status") == "interrupted":
        print(f"interrupted at step {summary['train']['step']}; the checkpoint is saved in {run_dir}: "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    if "export" in summary:
        print(summary["export"]["out"])
    return 0


def _base_name(model, key: str) -> str:
    names = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0; Q4_1 GGUF dequantized)"}
    return names.get(key, getattr(model.config, "_name_or_path", "") or key)
