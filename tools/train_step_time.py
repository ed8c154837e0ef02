"""Train-step time of the EAGLE-1/2 head: soft-CE over the full vocabulary vs over the draft vocabulary.

Both trainers run the same batches (whole-prompt windows of corpus conversations, the default
TrainConfig: bf16 where native, TTT 3), interleaved step by step so that other load on the machine
hits both alike; per batch the minimum over the repetitions after the first (warm-up) is kept.

Usage: python tools/train_step_time.py [--conversations 12] [--reps 4] [--draft-vocab 8192] [--threads 2]
Prints one JSON line at the end: seconds per pass over the batches for each and their ratio.
"""

import argparse
import json
import time

import torch

from eagle2.machine import cpu_name
from eagle2.models import load_target
from eagle2.train.corpus import Corpus, repo_corpus_root
from eagle2.train.export import draft_vocabulary
from eagle2.train.features import _examples_for, last_hidden
from eagle2.train.trainer import TrainConfig, Trainer, _plan, collate, head_loss


def step(tr: Trainer, batch: dict) -> float:
    t0 = time.perf_counter()
    loss, _ = head_loss(tr.head, tr.embed, tr.lm_w, batch, tr.cfg, tr.noise_gen, tr.softcap)
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    tr.opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", default="/tmp/eagle2-step-time")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, _ = load_target("smollm2-135m")
    recs = Corpus(repo_corpus_root() / "smollm2-135m").records()
    vocab = draft_vocabulary(recs, model.config.vocab_size, a.draft_vocab)
    sample = recs[:: max(1, len(recs) // a.conversations)][: a.conversations]
    exs = [e for e in _examples_for(last_hidden(model), sample, None, 1024, 4) if e is not None]
    cfg = TrainConfig(ckpt_minutes=60, eval_every=0)
    trainers = {"full": Trainer(model, tok, exs, f"{a.run_dir}/full", cfg, progress=False),
                "draft": Trainer(model, tok, exs, f"{a.run_dir}/draft", cfg, progress=False, vocab=vocab)}
    batches = [collate([exs[i] for i in b]) for b in _plan([len(e.tokens) for e in exs], 0, trainers["full"].cfg)]
    times: dict[str, list[list[float]]] = {k: [] for k in trainers}
    for r in range(a.reps):
        for k in times:
            times[k].append([])
        for b in batches:
            for k, tr in trainers.items():
                times[k][-1].append(step(tr, b))
        print(f"pass {r}: " + ", ".join(f"{k} {sum(v[-1]):.2f} s" for k, v in times.items()), flush=True)
    best = {k: sum(min(v[r][i] for r in range(1, len(v))) for i in range(len(batches))) for k, v in times.items()}
    print(json.dumps(dict(cpu=cpu_name(), threads=a.threads, bf16=trainers["full"].cfg.bf16, batches=len(batches),
                          tokens=sum(len(e.tokens) for e in exs), full_s=round(best["full"], 3),
                          draft_s=round(best["draft"], 3), draft_vocab=int(vocab.numel()),
                          ratio=round(best["full"] / best["draft"], 2))))


if __name__ == "__main__":
    main()
