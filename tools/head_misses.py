"""Where an EAGLE-3 head's depth-1 drafts miss, by how sure the target itself is of its next token.

Teacher-forced on the greedy answers of a bench run (``answers.jsonl`` of ``eagle2 bench`` with the
``vanilla`` method; the answers are tokenized again, the prompts get the chat template as the bench
gives them): at each answer position the head's depth-1 top-1 (the trainer's forward, step 0) is
compared with the target's argmax, and the positions are bucketed by the target's top-1 probability
(softmax over the full vocabulary at T = 1). Judges a head beyond tau: a head that is only more
confident sizes bigger trees, a better one hits more often where the target is sure. The last column is
what one draft sampled at T = 1 is accepted with, sum_x min(p(x), q(x)) (p the target's, q the head's
distribution), so the answers of a bench run at ``--temperature 1`` show how the head drafts in the
contexts sampling leads to. The target runs through transformers here (bf16), so a near-tie may differ
from the engine's.

Usage: python tools/head_misses.py ANSWERS_JSONL [--head DIR ...] [--questions FILE] [--turn 0]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import eagle2
from eagle2.api import load_head
from eagle2.bench.inputs import load_questions
from eagle2.eagle3_head import Eagle3Head
from eagle2.machine import data_dir
from eagle2.train.eagle3 import capture_features, feature_layers, ttt_forward

EDGES = (0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)


@torch.inference_mode()
def score(gen, head: Eagle3Head, sequences: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Per bucket of the target's top-1 probability: [positions, head hits, target argmax in the draft
    vocabulary, head's mean top-1 probability, target's probability of the head's token, acceptance of a
    sampled draft at T = 1] (sums)."""
    model, h = gen.model, gen.model.config.hidden_size
    embed, lm = model.get_input_embeddings(), model.get_output_embeddings()
    edges = torch.tensor(EDGES[1:-1])
    sums = torch.zeros(len(EDGES) - 1, 6, dtype=torch.float64)
    for prompt, answer in sequences:
        ids = prompt + answer
        feats = capture_features(model, [ids], feature_layers(model))[0].float()  # [T, 4H]
        probs = lm(feats[:, 3 * h:].to(lm.weight.dtype)).float().softmax(-1)  # [T, V] the target after x_i
        p1, top = probs.max(-1)  # [T]
        tokens = torch.tensor(ids)
        out = ttt_forward(head, feats[None, :, :3 * h], embed(tokens)[None].float(),
                          torch.arange(len(ids))[None], 1)[0][0]  # [T, H]: index i drafts the token after x_{i+1}
        q = head.logits(out).float().softmax(-1)  # [T, Vd] the head's distribution at T = 1
        conf, draft = q.max(-1)  # [T]
        draft = head.target_ids[draft]
        i = torch.arange(len(prompt) - 1, len(ids) - 2)  # drafts of answer tokens 2.. (the first is the prefill's)
        j = i + 1
        bucket = torch.bucketize(p1[j], edges, right=True)  # [n]
        rows = torch.stack([torch.ones(len(i)), (draft[i] == top[j]).float(), head.t2d[top[j]].float(),
                            conf[i], probs[j, draft[i]],
                            torch.minimum(probs[j][:, head.target_ids], q[i]).sum(-1)], dim=1).double()  # [n, 6]
        sums.index_add_(0, bucket, rows)
    return sums


def table(name: str, sums: torch.Tensor) -> str:
    n = sums[:, 0].sum()
    lines = [f"{name}: {int(n)} positions, depth-1 hits {sums[:, 1].sum() / n:.3f}, target's argmax in the draft "
             f"vocabulary {sums[:, 2].sum() / n:.3f}, a sampled draft accepted at T = 1 {sums[:, 5].sum() / n:.3f}", "",
             "| target's top-1 probability | share of positions | head hits | argmax in draft vocabulary | "
             "hits where in it | head's top-1 probability | target's probability of the head's token | "
             "sampled draft accepted (T = 1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in range(sums.shape[0]):
        c, hit, inv, conf, mass, alpha = sums[k].tolist()
        c1 = max(c, 1.0)
        lines.append(f"| {EDGES[k]:.2f}-{EDGES[k + 1]:.2f} | {c / n:.3f} | {hit / c1:.3f} | {inv / c1:.3f} | "
                     f"{hit / max(inv, 1.0):.3f} | {conf / c1:.3f} | {mass / c1:.3f} | {alpha / c1:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("answers", type=Path, help="answers.jsonl of an eagle2 bench run with the vanilla method")
    ap.add_argument("--head", action="append", default=[], help="an EAGLE-3 head directory (repeat to compare; "
                    "default: the shipped head)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=Path, default=None, help="default: MT-bench in the data directory")
    ap.add_argument("--turn", type=int, default=0)
    args = ap.parse_args()
    qfile = args.questions or data_dir() / "eval" / "mt_bench_question.jsonl"
    if not args.answers.is_file():
        print(f"error: no such file: {args.answers}", file=sys.stderr)
        return 2
    try:
        questions = {q["question_id"]: q for q in load_questions(qfile)}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    answers = [a for a in map(json.loads, args.answers.open()) if a.get("method") == "vanilla"]
    if not answers:
        print(f"error: {args.answers} has no vanilla answers", file=sys.stderr)
        return 2
    missing = sorted({str(a["question_id"]) for a in answers} - {str(k) for k in questions})
    if missing:
        print(f"error: {qfile} lacks questions {', '.join(missing[:5])} of {args.answers} (pass --questions)",
              file=sys.stderr)
        return 2
    gen = eagle2.load(args.model)
    sequences = [(gen.encode_prompt([{"role": "user", "content": questions[a["question_id"]]["turns"][args.turn]}]),
                  gen.tokenizer(a["turns"][args.turn], add_special_tokens=False)["input_ids"]) for a in answers]
    try:
        heads = [(d, load_head(d)) for d in args.head] or [("shipped head", gen.head)]
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, head in heads:
        if not isinstance(head, Eagle3Head):
            print(f"error: {name} is not an EAGLE-3 head", file=sys.stderr)
            return 2
    for name, head in heads:
        print(table(str(name), score(gen, head.float().eval(), sequences)), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
