"""eagle2: lossless EAGLE-2 dynamic-tree speculative decoding for Hugging Face causal LMs.

    import eagle2
    gen = eagle2.load("smollm2-135m")
    out = gen.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=64)
    print(out.text, out.stats.mean_accept_len, out.stats.tokens_per_s)

The names below load on first use (PEP 562), so that ``import eagle2`` and the CLI's argument parsing
do not wait for torch and transformers (a second or more), and a Ctrl-C during that import reaches the
CLI's handler.
"""

from __future__ import annotations

import importlib

_HOMES = {"load": "api", "load_off_thread": "api", "Eagle2Generator": "api", "Backend": "config",
          "DecodeSettings": "config", "TreeConfig": "config", "SamplingConfig": "config",
          "GenerationResult": "engine", "RoundEvent": "engine", "Stats": "engine", "LoadWarning": "models"}

__all__ = list(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'eagle2' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
