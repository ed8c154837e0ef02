"""The native decoder stack: ``csrc/lean_forward.cpp``, compiled once per machine and cached.

``fast.Stack`` runs a stack of Llama-style decoder layers either as a Python loop over ATen ops
or, when this module can provide it, as one call into C++ that makes the same ATen calls —
minus the Python interpreter between ~2000 small ops per forward — except that RoPE + cache
writes and the elementwise tail of RMSNorm are single fused loops that round every
intermediate exactly as the ATen ops do. Output is bit-identical to the Python loop (tested,
fp32 and bf16). It is used on CPU tensors only; elsewhere the Python loop runs. The same
extension holds the low-bit block-weight kernel on AMX (``block_linear``; kernels.py packs for
it), which both the native stack and the Python loop call.

The first ``load()`` on a machine compiles the extension with the C++ compiler torch was set up
for (~30 s on 2 cores; needs a compiler and ninja) into ``$EAGLE2_CACHE/native`` (default ``~/.cache/eagle2/native``); later
processes load it in well under a second. If anything is missing the Python loop is used and a
single warning says why. ``EAGLE2_NATIVE=0`` (or ``native.ENABLED = False`` before loading a
model) turns it off. This module knows nothing of models.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

from .models import cache_dir

log = logging.getLogger("eagle2")

ENABLED = os.environ.get("EAGLE2_NATIVE", "1") != "0"
ACTS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2}  # activation -> code in the C++
SOURCE = Path(__file__).with_name("csrc") / "lean_forward.cpp"

_lock = threading.Lock()
_module = None
_tried = False


def load():
    """The compiled extension (with ``decoder_forward``), or None when it is off or cannot be built."""
    global _module, _tried
    if not ENABLED:
        return None
    with _lock:
        if _tried:
            return _module
        _tried = True
        base = ["-O3", "-ffp-contract=off"] + _vector_flags()  # no fused multiply-adds: round as ATen does
        # at::parallel_for is OpenMP in torch's Linux builds: without -fopenmp the extension's loops run on one
        # thread. A toolchain that cannot link it (clang without libomp, say) still gets the serial build.
        attempts = [(base + ["-fopenmp"], ["-fopenmp"]), (base, [])] if sys.platform.startswith("linux") else [(base, [])]
        for i, (flags, ldflags) in enumerate(attempts):
            try:
                _module = _build(flags, ldflags)
                break
            except Exception as e:  # no compiler, no ninja, a failed build: the Python loop is exact too
                if i + 1 < len(attempts):
                    continue
                log.warning("native forward unavailable (%s: %s); using the Python loop", type(e).__name__,
                            str(e).strip().splitlines()[-1][:200] if str(e).strip() else "")
                _module = None
        return _module


def _build(flags: list[str], ldflags: list[str]):
    """Compile (or load the cached build of) the extension with these flags."""
    from torch.utils import cpp_extension

    digest = hashlib.sha1(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()[:12]
    name = f"eagle2_lean_{digest}"
    where = cache_dir() / "native" / name
    where.mkdir(parents=True, exist_ok=True)
    if not any(where.glob(f"{name}*.so")):
        print("eagle2: compiling the native forward (once per machine, ~30 s) ...", file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(where), extra_cflags=flags,
                              extra_ldflags=ldflags, verbose=False)


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
    return ENABLED and device.type == "cpu" and act in ACTS and load() is not None
