"""The native decoder stack: ``csrc/lean_forward.cpp``, compiled once per machine and cached.

``fast.Stack`` runs a stack of Llama-style decoder layers either as a Python loop over ATen ops
or, when this module can provide it, as one call into C++ that makes the same ATen calls —
minus the Python interpreter between ~2000 small ops per forward — except that RoPE + cache
writes and the elementwise tail of RMSNorm are single fused loops that round every
intermediate exactly as the ATen ops do. Output is bit-identical to the Python loop (tested,
fp32 and bf16). It is used on CPU tensors only; elsewhere the Python loop runs. The same
extension holds the low-bit block-weight kernel on AMX (``block_linear``; kernels.py packs for
it), which both the native stack and the Python loop call.

The interface between the two languages is named here: ``LayerTensors`` (the tensors of one layer,
in the order ``decoder_forward`` reads them) and ``ACTIVATION_KINDS`` (a model's activation name ->
the name of the C++ activation, whose code the extension reports). A build whose layout or
activation table differs from these is refused with a message saying how.

The first ``load()`` on a machine compiles the extension with the C++ compiler torch was set up
for (~30 s on 2 cores; needs a compiler and ninja) into ``$EAGLE2_CACHE/native`` (default
``~/.cache/eagle2/native``); later processes load it in well under a second. If anything is missing
the Python loop is used and a single warning says why. Whether a model uses it is the caller's
choice (``config.Backend.native``; ``EAGLE2_NATIVE=0`` turns it off at load). This module knows
nothing of models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import platform
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .models import cache_dir

log = logging.getLogger("eagle2")

SOURCE = Path(__file__).with_name("csrc") / "lean_forward.cpp"


class LayerTensors(NamedTuple):
    """One decoder layer as ``decoder_forward`` takes it (the ``Slot`` enum of lean_forward.cpp): a flat
    list of these, layer after layer. Weights are [out, in]; ``packed`` weights are oneDNN's copies."""

    input_norm: torch.Tensor | None  # [H] | None (EAGLE's draft layer has no input norm)
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D, H] fused q/k/v projection
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hkv) D] | None
    o: torch.Tensor  # [H, Hq D]
    o_bias: torch.Tensor | None  # [H] | None
    post_norm: torch.Tensor  # [H] post-attention RMSNorm
    gate_up: torch.Tensor  # [2 I, H] fused gate / up projection
    down: torch.Tensor  # [H, I]
    qkv_blocks: torch.Tensor | None  # low-bit block records (kernels.py) of each projection | None
    o_blocks: torch.Tensor | None
    gate_up_blocks: torch.Tensor | None
    down_blocks: torch.Tensor | None


# A model's MLP activation (transformers' hidden_act) -> the C++ activation computing it; the codes are the
# extension's own (``activation_codes``).
ACTIVATION_KINDS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_new": "gelu_tanh"}

_lock = threading.Lock()
_module = None
_tried = False


def load():
    """The compiled extension (with ``decoder_forward``), or None when it cannot be built or its layout
    disagrees with ``LayerTensors`` / ``ACTIVATION_KINDS``."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        module = _build_any()
        why = None if module is None else layout_mismatch(module)
        if why is not None:
            log.warning("native forward refused: %s; using the Python loop", why)
            module = None
        _module = module
        return _module


def source_digest() -> str:
    """A short hash of the extension's source: timings measured with one build do not carry over to another."""
    return hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:12]


def _build_any():
    """The extension built with the best flags this toolchain takes, or None (with a warning)."""
    base = ["-O3", "-ffp-contract=off"] + _vector_flags()  # no fused multiply-adds: round as ATen does
    # at::parallel_for is OpenMP in torch's Linux builds: without -fopenmp the extension's loops run on one
    # thread. A toolchain that cannot link it (clang without libomp, say) still gets the serial build.
    attempts = [(base + ["-fopenmp"], ["-fopenmp"]), (base, [])] if sys.platform.startswith("linux") else [(base, [])]
    for i, (flags, ldflags) in enumerate(attempts):
        try:
            return _build(flags, ldflags)
        except Exception as e:  # no compiler, no ninja, a failed build: the Python loop is exact too
            if i + 1 < len(attempts):
                continue
            log.warning("native forward unavailable (%s: %s); using the Python loop", type(e).__name__,
                        str(e).strip().splitlines()[-1][:200] if str(e).strip() else "")
    return None


def layout_mismatch(module) -> str | None:
    """Why ``module``'s tensor layout or activation table disagrees with this file's, or None."""
    theirs = tuple(module.layer_layout())
    if theirs != LayerTensors._fields:
        return (f"lean_forward.cpp reads layer tensors ({', '.join(theirs)}) but native.LayerTensors hands it "
                f"({', '.join(LayerTensors._fields)}); change both together")
    missing = sorted(set(ACTIVATION_KINDS.values()) - set(module.activation_codes()))
    if missing:
        return f"lean_forward.cpp has no activation {', '.join(missing)} (native.ACTIVATION_KINDS names it)"
    return None


def _build(flags: list[str], ldflags: list[str]):
    """Load the cached build of the extension with these flags, or compile it."""
    from torch.utils import cpp_extension

    digest = hashlib.sha1((source_digest() + torch.__version__ + " ".join(flags)).encode()).hexdigest()[:12]
    name = f"eagle2_lean_{digest}"
    where = cache_dir() / "native" / name
    where.mkdir(parents=True, exist_ok=True)
    built = _import_built(name, where)
    if built is not None:
        return built
    _drop_stale_lock(where / "lock")
    print("eagle2: compiling the native forward (once per machine, ~30 s) ...", file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(where), extra_cflags=flags,
                              extra_ldflags=ldflags, verbose=False)


def _import_built(name: str, where: Path):
    """The build in ``where``, imported as it is, or None. Its name holds the digest of its source, torch
    version and flags, so a build there is the one wanted. Why not ``cpp_extension.load``: it takes a lock
    file in ``where`` even to find a build up to date, and a process killed while it holds it (Ctrl-C
    during a load exits at once) left a lock that made every later process wait forever."""
    so = where / f"{name}.so"
    if not so.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001 (a broken build: compile it again)
        return None


LOCK_STALE_S = 600  # a compile takes under a minute: a lock this old was left by a process that died


def _drop_stale_lock(lock: Path) -> None:
    """Remove a compile lock left by a process that died while compiling (else the compile waits on it forever)."""
    try:
        if time.time() - lock.stat().st_mtime > LOCK_STALE_S:
            lock.unlink()
            log.warning("removed a stale compile lock %s", lock)
    except FileNotFoundError:
        pass


def _vector_flags() -> list[str]:
    """Vector ISA flags for the fused loops, from the capability torch itself detected at run time
    (never -march=native: on some VMs it enables instructions the hypervisor traps)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if cap == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def usable(device: torch.device, act: str) -> bool:
    """Whether a stack on ``device`` with activation ``act`` can run natively here."""
    return device.type == "cpu" and act in ACTIVATION_KINDS and load() is not None


def activation_code(act: str) -> int:
    """``decoder_forward``'s code for the model activation ``act`` (``usable`` must hold)."""
    return int(load().activation_codes()[ACTIVATION_KINDS[act]])
