"""Loading the user's own models: HF directories of other families, GGUF files and their cache,
damaged files and hub ids. A model that loads keeps the contract (greedy output equal to its own
transformers greedy decoding in fp32); one that cannot is refused with a one-line ValueError."""

from __future__ import annotations

import re
import threading
import warnings

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from test_engine import hf_greedy

PROMPT = [5, 9, 2, 7, 1, 3, 8, 4, 6, 10, 11, 12]  # longer than a sliding window of 8


def _load(path, **kw):
    import eagle2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no trained head: a fresh one, with its warning
        return eagle2.load(str(path), **kw)


def _assert_contract(gen, reference, prompt=PROMPT, n=12):
    """gen's greedy output for every method is the reference model's own greedy output (up to its EOS,
    where gen stops)."""
    want = hf_greedy(reference, prompt, n)
    for method in ("vanilla", "eagle2", "chain"):
        got = gen.generate(prompt, max_new_tokens=n, method=method).token_ids
        assert got == want[:len(got)] and (len(got) == n or got[-1] in gen.eos_ids), method


# ---- GGUF files and their cache -----------------------------------------------------------------
def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    other = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(other)}
    return [char[b] for b in range(256)]


def write_tiny_gguf(path, seed: int = 0, hidden: int = 32, layers: int = 2, ff: int = 64):
    """A random fp32 Llama GGUF with a byte-level tokenizer (259 tokens); same size for every seed."""
    gguf = pytest.importorskip("gguf")
    tokens = _byte_tokens() + ["ab", "<s>", "</s>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([f"{tokens[ord('a')]} {tokens[ord('b')]}"])
    w.add_token_types([1] * 257 + [3, 3])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output.weight": (len(tokens), hidden)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (hidden // 2, hidden),
                   f"blk.{i}.attn_v.weight": (hidden // 2, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ff)}
    for name, shape in shapes.items():
        scale = 1.0 if name in ("token_embd.weight", "output.weight") else 0.05  # sharp logits: a clear greedy path
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_ggufs_of_one_name_and_size_each_load_as_themselves(tmp_path, monkeypatch):
    """Two fine-tunes saved as dir/model.gguf have the same name and size: each must load as itself, not
    as the cached conversion of the other."""
    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EAGLE2_NATIVE", "0")  # the extension is built under the cache: not in a fresh one
    files = []
    for seed, where in enumerate(("a", "b")):
        (tmp_path / where).mkdir()
        files.append(write_tiny_gguf(tmp_path / where / "model.gguf", seed))
    assert files[0].stat().st_size == files[1].stat().st_size
    for f in files:
        _assert_contract(_load(f, dtype="float32"), _gguf_reference(f))


def test_conversions_racing_on_one_gguf_both_succeed(tmp_path, monkeypatch):
    """Two conversions of one file at once (two processes loading it): each writes its own copy and the
    first rename wins; neither fails nor leaves a half-written or stray directory."""
    import transformers

    from eagle2.models import _gguf_to_cache

    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    out = tmp_path / "cache" / "models" / "m"
    both_saved = threading.Barrier(2, timeout=120)
    save = transformers.PreTrainedModel.save_pretrained

    def save_then_wait(self, *a, **kw):  # both have written their weights before either goes on
        save(self, *a, **kw)
        both_saved.wait()

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_wait)
    errors = []

    def convert():
        try:
            _gguf_to_cache(gguf, out)
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in out.parent.iterdir()] == ["m"]


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    import eagle2

    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path / "not-a-dir"))
    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="set EAGLE2_CACHE to a writable directory"):
        eagle2.load(str(gguf))


def test_a_damaged_converted_copy_says_to_delete_it(tmp_path, monkeypatch):
    import shutil

    from eagle2.models import local_model_dir

    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EAGLE2_NATIVE", "0")
    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    copy, _ = local_model_dir(str(gguf))
    (copy / "model.safetensors").write_bytes(b"\0" * 64)  # cut by a crash or a full disk
    with pytest.raises(ValueError, match=f"if {re.escape(str(copy))} .* is damaged, delete it"):
        _load(gguf)
    shutil.rmtree(copy)
    _assert_contract(_load(gguf, dtype="float32"), _gguf_reference(gguf))


# ---- HF directories ------------------------------------------------------------------------------
def _save(model, path, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("cut", ["model.safetensors", "pytorch_model.bin"])
def test_a_cut_weight_file_is_named(cut, tmp_path, smol_tokenizer):
    """An interrupted download leaves a cut file: a one-line ValueError, not safetensors' or torch's
    traceback."""
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    path = _save(model, tmp_path / "m", smol_tokenizer)
    if cut == "pytorch_model.bin":
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / cut)
    data = (path / cut).read_bytes()
    (path / cut).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not load model"):
        _load(path)


def test_gemma2_loads_with_eager_attention_and_keeps_the_contract(tmp_path, smol_tokenizer):
    """transformers has no sdpa attention for Gemma 2; eager takes the tree masks as well."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                       max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    gen = _load(_save(model, tmp_path / "gemma2", smol_tokenizer), dtype="float32")
    _assert_contract(gen, model)


def test_models_the_adapter_cannot_run_are_refused_in_one_line(tmp_path, smol_tokenizer):
    """GPT-2 keeps its layers as ``h``; OPT names its MLP width ``ffn_dim``, so no fresh head can be sized."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    v = len(smol_tokenizer)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    opt = OPTForCausalLM(OPTConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported: its decoder does not keep its layers"):
        _load(_save(gpt2, tmp_path / "gpt2", smol_tokenizer))
    with pytest.raises(ValueError, match="cannot size a draft head for this opt model: .*intermediate_size"):
        _load(_save(opt, tmp_path / "opt", smol_tokenizer))


def test_a_text_prompt_past_the_model_vocabulary_is_refused(tmp_path, smol_tokenizer):
    """A tokenizer with more tokens than the model (a mismatched pair) gives ids past the embedding."""
    gen = _load(_save(make_tiny_model("llama", vocab_size=1000), tmp_path / "m", smol_tokenizer))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate("hello world, how are you", max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([{"role": "user", "content": "hello world"}], max_new_tokens=2)


def test_an_unreachable_hub_id_says_what_to_do(monkeypatch):
    import huggingface_hub

    import eagle2

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub is unreachable here anyway
    with pytest.raises(ValueError, match="taken as a hub id: .*pass its directory") as err:
        eagle2.load("someone/no-such-model-here")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(device=None), "unknown device None"),
    (dict(tree="x"), "tree must be None or a TreeConfig"),
])
def test_bad_load_arguments_are_one_line(kwargs, match):
    import eagle2

    with pytest.raises(ValueError, match=match) as err:
        eagle2.load("smollm2-135m", **kwargs)
    assert "\n" not in str(err.value)
