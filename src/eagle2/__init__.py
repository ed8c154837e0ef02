"""eagle2: lossless EAGLE-2 dynamic-tree speculative decoding for Hugging Face causal LMs.

    import eagle2
    gen = eagle2.load("smollm2-135m")
    out = gen.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=64)
    print(out.text, out.stats.mean_accept_len, out.stats.tokens_per_s)
"""

from .api import Eagle2Generator, load, load_off_thread
from .config import Backend, DecodeSettings, SamplingConfig, TreeConfig
from .engine import GenerationResult, RoundEvent, Stats

__all__ = ["load", "load_off_thread", "Eagle2Generator", "Backend", "DecodeSettings", "TreeConfig", "SamplingConfig", "GenerationResult",
           "RoundEvent", "Stats"]
__version__ = "0.1.0"
