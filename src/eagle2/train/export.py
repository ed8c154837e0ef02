"""Stage 4 of training: a head directory in the released EAGLE layout, with a model card.

``export_head`` writes config.json + model.safetensors (bf16, keys without ``model.`` prefix)
and README.md (base model, data and licenses, tokens seen, hyperparameters, wall time per stage,
acceptance per MT-bench category when measured). ``check_released_format`` says what the
official EAGLE loader, vLLM (``EagleLlamaForCausalLM``) and SGLang would object to in a head
directory; ``mtbench_acceptance`` measures tau per MT-bench category (first turns, greedy).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from ..draft_head import DraftHead

log = logging.getLogger("eagle2")

# What the official EAGLE loader (a one-layer LlamaConfig + fc), vLLM and SGLang read from config.json.
REQUIRED_CONFIG = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "num_hidden_layers", "vocab_size", "rms_norm_eps", "rope_theta",
                   "max_position_embeddings", "hidden_act", "bias", "torch_dtype")

FC_BIAS_NOTE = ("This head has an fc bias (`\"bias\": true`). Some vLLM versions build the EAGLE fc without a "
                "bias and silently skip `fc.bias`, which mis-loads the head (lower acceptance, output still exact); "
                "the official EAGLE code and SGLang read it. Train with `--no-fc-bias` for those vLLM versions.")


def expected_keys(cfg: dict) -> dict[str, tuple]:
    """Tensor name -> shape that the released layout (and vLLM after adding ``model.``) expects."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // nh
    keys = {"fc.weight": (h, 2 * h),
            "layers.0.self_attn.q_proj.weight": (nh * d, h), "layers.0.self_attn.k_proj.weight": (nkv * d, h),
            "layers.0.self_attn.v_proj.weight": (nkv * d, h), "layers.0.self_attn.o_proj.weight": (h, nh * d),
            "layers.0.mlp.gate_proj.weight": (i, h), "layers.0.mlp.up_proj.weight": (i, h),
            "layers.0.mlp.down_proj.weight": (h, i), "layers.0.post_attention_layernorm.weight": (h,)}
    if cfg.get("bias", True):
        keys["fc.bias"] = (h,)
    if cfg.get("attention_bias"):
        keys.update({"layers.0.self_attn.q_proj.bias": (nh * d,), "layers.0.self_attn.k_proj.bias": (nkv * d,),
                     "layers.0.self_attn.v_proj.bias": (nkv * d,)})
    return keys


def check_released_format(directory: str | Path) -> list[str]:
    """Problems a released-EAGLE / vLLM / SGLang loader would have with this directory ([] = none)."""
    from safetensors import safe_open

    directory = Path(directory)
    problems = []
    cfg = json.loads((directory / "config.json").read_text())
    for k in REQUIRED_CONFIG:
        if k not in cfg:
            problems.append(f"config.json lacks {k}")
    if cfg.get("num_hidden_layers") != 1:
        problems.append("num_hidden_layers must be 1")
    if cfg.get("architectures") != ["LlamaForCausalLM"] or cfg.get("model_type") != "llama":
        problems.append("architectures/model_type must be LlamaForCausalLM/llama (vLLM rewrites it to EagleLlamaForCausalLM)")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    want = expected_keys(cfg) if not problems else {}
    for k, s in want.items():
        if k not in shapes:
            problems.append(f"missing tensor {k}")
        elif shapes[k] != s:
            problems.append(f"{k} has shape {shapes[k]}, expected {s}")
    for k in shapes:
        if k not in want and not k.startswith(("embed_tokens.", "lm_head.")):
            problems.append(f"unexpected tensor {k} (loaders skip or reject it)")
        if k.startswith("model."):
            problems.append(f"{k}: released heads have no model. prefix")
    if dtypes - {"BF16", "F16", "F32"}:
        problems.append(f"unexpected dtypes {sorted(dtypes)}")
    return problems


def mtbench_acceptance(model, tokenizer, head: DraftHead, questions: str | Path, per_category: int = 10,
                       max_new_tokens: int = 128, progress: bool = True) -> dict:
    """tau (new tokens / target forwards) per MT-bench category over first turns, greedy EAGLE-2."""
    from tqdm import tqdm

    from .trainer import acceptance

    qs = [json.loads(line) for line in Path(questions).read_text().splitlines() if line.strip()]
    by_cat: dict[str, list] = defaultdict(list)
    for q in qs:
        if len(by_cat[q["category"]]) < per_category:
            by_cat[q["category"]].append(q["turns"][0])
    out, new, rounds = {}, 0, 0
    for cat, prompts in tqdm(sorted(by_cat.items()), desc="mt-bench", disable=not progress):
        msgs = [[{"role": "user", "content": p}] if getattr(tokenizer, "chat_template", None) else p for p in prompts]
        r = acceptance(model, tokenizer, head, msgs, max_new_tokens)
        out[cat] = dict(tau=round(r["tau"], 3), prompts=len(prompts))
        new += r["new_tokens"]
        rounds += r["rounds"]
    out["all"] = dict(tau=round(new / rounds if rounds else 0.0, 3), prompts=sum(len(v) for v in by_cat.values()))
    return out


def model_card(info: dict) -> str:
    """README.md for an exported head. info: base_model, data (list of sources), tokens_seen,
    examples, hyperparameters (dict), stage_seconds (dict), mtbench (dict or None), dev_tau, bias."""
    lines = [f"# EAGLE-2 draft head for {info.get('base_model', '?')}", "",
             "An EAGLE-1/2 draft head (fc over [embedding; feature] + one Llama decoder layer without input norm) "
             "trained with `eagle2 train` by self-distillation: the target wrote the responses the head learns from. "
             "Released EAGLE layout: `config.json` + `model.safetensors` (bf16, keys without a `model.` prefix).", "",
             "## Use", "", "```python", "import eagle2",
             f"gen = eagle2.load({info.get('model_arg', 'MODEL')!r}, head=\"THIS_DIR\")",
             "print(gen.generate(\"Hello\", max_new_tokens=64).text)", "```", "",
             "vLLM: `speculative_config={\"method\": \"eagle\", \"model\": \"THIS_DIR\", \"num_speculative_tokens\": 4}`; "
             "SGLang: `--speculative-algorithm EAGLE --speculative-draft-model-path THIS_DIR`.", ""]
    if info.get("bias", True):
        lines += ["**fc bias:** " + FC_BIAS_NOTE, ""]
    lines += ["## Base model", "", f"- {info.get('base_model', '?')}", "", "## Training data and licenses", ""]
    for d in dict.fromkeys(info.get("data", [])):  # two prompt files of one source share a line
        lines.append(f"- {d}")
    lines += ["", f"Examples: {info.get('examples', '?')}; assistant tokens seen in training: "
              f"{info.get('tokens_seen', '?')}.", ""]
    if info.get("corpus"):
        from .corpus import corpus_table

        lines += ["## Training corpus", "",
                  f"The self-distilled conversations this head trained on, from the corpus "
                  f"`{info.get('corpus_path', 'corpus/')}` (counted from its records; held-out evaluation prompts "
                  "excluded):", "", corpus_table(info["corpus"]), ""]
        t = info.get("corpus_total")
        if t:
            lines += [f"The corpus then held {t['conversations']:,} conversations ({t['turns']:,} turns, "
                      f"{t['prompt_tokens'] + t['response_tokens']:,} tokens).", ""]
        for e in info.get("corpus_extra") or []:  # --extra-corpus: e.g. answers sampled at T = 1
            t, temps = e["total"], ", ".join(map(str, e["temperatures"])) or "unknown"
            lines += [f"Beside it: {t['conversations']:,} conversations ({t['turns']:,} turns, {t['response_tokens']:,} "
                      f"answer tokens) of the corpus `{e['path']}`, answered at temperature {temps}.", ""]
    if info.get("loss_vocab"):
        lines += [f"Loss over the draft vocabulary: the soft cross-entropy and accuracy were computed over the "
                  f"{info['loss_vocab']} tokens of `draft_vocab.safetensors` only.", ""]
    lines += ["## Hyperparameters", "", "| name | value |", "|---|---|"]
    for k, v in (info.get("hyperparameters") or {}).items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    for k, v in (info.get("stage_seconds") or {}).items():
        lines.append(f"| {k} | {v:.0f} |")
    lines += ["", "## Acceptance", ""]
    if info.get("dev_tau") is not None:
        lines.append(f"Mean acceptance length on held-out training-mix prompts during training (best checkpoint): "
                     f"{info['dev_tau']:.3f}.")
        lines.append("")
    mt = info.get("mtbench")
    if mt:
        lines += [f"MT-bench first turns, greedy EAGLE-2, max_new_tokens {info.get('mtbench_max_new_tokens', '?')}, "
                  "tau = new tokens / target forwards:", "", "| category | prompts | tau |", "|---|---|---|"]
        for cat, r in mt.items():
            lines.append(f"| {cat} | {r['prompts']} | {r['tau']:.3f} |")
    else:
        lines.append("MT-bench acceptance was not measured for this export.")
    lines.append("")
    return "\n".join(lines)


def draft_vocabulary(records: list[dict], vocab_size: int, n: int) -> torch.Tensor:
    """FR-Spec: the ``n`` most frequent tokens of the responses, most frequent first (ties: lower id).

    The drafter proposes only these; the target still verifies every token, so output is exact."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in records:
        ids = torch.tensor(r["response_ids"], dtype=torch.long)
        counts += torch.bincount(ids[ids < vocab_size], minlength=vocab_size)
    return torch.argsort(-counts, stable=True)[: min(n, vocab_size)]


def export_head(src: str | Path, out: str | Path, info: dict, draft_vocab: torch.Tensor | None = None) -> Path:
    """Copy a trained head (released layout) to ``out`` with a model card; check the format.

    draft_vocab: token ids for FR-Spec drafting, saved as draft_vocab.safetensors beside the head."""
    head = DraftHead.load(src)
    if draft_vocab is not None:
        head.draft_vocab = draft_vocab.long()
    out = Path(out)
    extra = {k: v for k, v in json.loads((Path(src) / "config.json").read_text()).items() if k.startswith("eagle2_")}
    extra["eagle2_base_model"] = info.get("base_model")
    head.save(out, extra_config=extra)
    (out / "README.md").write_text(model_card({**info, "bias": head.config.bias}))
    problems = check_released_format(out)
    if problems:
        raise ValueError(f"exported head in {out} is not in the released layout: {'; '.join(problems)}")
    if head.config.bias:
        warnings.warn(FC_BIAS_NOTE, stacklevel=2)
    return out


def head_from_dir(directory: str | Path, device: torch.device | str = "cpu") -> DraftHead:
    return DraftHead.load(directory).to(device)
