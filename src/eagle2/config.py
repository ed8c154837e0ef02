"""Configuration: frozen dataclasses, validated at construction.

Every knob a caller can turn lives here, with a comment per field. Invalid values raise
``ValueError`` with a one-line message; the CLI turns those into a clean error and exit code.
``Backend.from_env`` is the one place that reads the fast-path environment variables. Nothing in
this module imports torch.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Mapping

METHODS = ("eagle2", "eagle1", "chain", "vanilla")
FORWARDS = ("auto", "fast", "transformers")
_SWITCHES = {"native": "EAGLE2_NATIVE", "packed_linear": "EAGLE2_PACKED_LINEAR", "lowbit": "EAGLE2_LOWBIT"}


@dataclass(frozen=True)
class Backend:
    """Which target forward and which fast paths a generator runs: decided once at load (``from_env``
    for the switches), passed down to the target, the drafter and the kernels, shown as
    ``Eagle2Generator.backend`` (there with what this machine actually runs) and recorded by the bench.

    Every switch only *allows* its path: each is used where its own check passes (the lean forward
    supports the model, the extension builds, a packed product is exact in that dtype, a weight is
    made of low-bit blocks on a CPU with a kernel for its dtype). Output is exact with any combination.
    """

    forward: str = "auto"  # auto: the lean forward (fast.py) where it fits the model; fast: it or refuse; transformers
    native: bool = True  # decoder stacks from C++ (native.py); EAGLE2_NATIVE=0 turns it off
    packed_linear: bool = True  # weights prepacked for oneDNN where exact (kernels.py); EAGLE2_PACKED_LINEAR=0
    lowbit: bool = True  # GGUF low-bit block weights (AMX, AVX512-BF16, AVX2; kernels.py; needs native); EAGLE2_LOWBIT=0
    exact: bool | None = None  # row-invariant numerics on the lean forward (None: fast.exact_default)

    def __post_init__(self) -> None:
        if self.forward not in FORWARDS:
            raise ValueError(f"backend must be one of {', '.join(FORWARDS)}; got {self.forward!r}")
        for name in ("native", "packed_linear", "lowbit"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.exact is not None and not isinstance(self.exact, bool):
            raise ValueError(f"exact must be True, False or None; got {self.exact!r}")

    @classmethod
    def from_env(cls, forward: str = "auto", exact: bool | None = None,
                 environ: Mapping[str, str] | None = None) -> "Backend":
        """The switches the environment sets (each on unless its variable is "0") with this forward."""
        env = os.environ if environ is None else environ
        return cls(forward=forward, exact=exact, **{k: env.get(v, "1") != "0" for k, v in _SWITCHES.items()})

    @classmethod
    def of(cls, backend: "str | Backend | None" = None, exact: bool | None = None) -> "Backend":
        """A ``Backend`` from what a caller passed: a value as it is, a forward name (or None: "auto") with
        the environment's switches. ``exact``, when not None, overrides the value's."""
        if isinstance(backend, Backend):
            return backend if exact is None else replace(backend, exact=exact)
        if backend is not None and not isinstance(backend, str):
            raise ValueError(f"backend must be a Backend or one of {', '.join(FORWARDS)}; got {backend!r}")
        return cls.from_env("auto" if backend is None else backend, exact)


# A round verifies its nodes in one forward with an [N, cache + N] mask, and drafts one head step per
# level: far beyond these, a round takes seconds (or the memory) for nothing a draft head can reach.
TREE_LIMITS = MappingProxyType({"total_tokens": 256, "max_nodes": 256, "depth": 64, "max_depth": 64, "lookup": 64})


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the draft tree verified in one target forward.

    ``adaptive`` (the default for ``method="eagle2"``): every round grows the tree level by level
    while another level is expected to pay for its draft step, then verifies the prefix of the
    reranked candidates that maximises expected tokens per second on this machine (``cost.py``
    measures the costs, ``tree.best_size`` weighs them). ``max_nodes`` / ``max_depth`` bound it.
    Up to T = ``draw_above`` the adaptive tree also weighs a chain copied from the context (``lookup``).
    Otherwise the shape is fixed: ``total_tokens`` nodes, ``depth`` levels, ``top_k`` per level.
    """

    method: str = "eagle2"  # eagle2 (dynamic tree), eagle1 (static tree), chain, vanilla
    total_tokens: int = 16  # fixed shape: nodes verified per round, root included (EAGLE's total_token + 1)
    depth: int = 4  # fixed shape: drafting steps = deepest node's distance from the root
    top_k: int = 8  # children drafted per expanded node, and frontier width (EAGLE-2's K)
    adaptive: bool = False  # eagle2 only: size and depth chosen per round by the cost rule
    max_nodes: int = 48  # adaptive: the most nodes a round verifies, root included
    max_depth: int = 8  # adaptive: the deepest level a round may draft
    frontier: int = 0  # adaptive: its top_k (children per expanded node, frontier width); 0: top_k (eagle2 tune's choice)
    lookup: int = 8  # adaptive, T <= draw_above: the longest prompt-lookup chain merged in (lookup.py); 0: none
    draw_above: float = 0.7  # T > 0: children drawn from the draft above this temperature, its top-k at or below it

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name, low in (("total_tokens", 2), ("depth", 1), ("top_k", 1), ("max_nodes", 2), ("max_depth", 1),
                          ("frontier", 0), ("lookup", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                shown = "tree_top_k" if name == "top_k" else name
                raise ValueError(f"{shown} must be an integer >= {low}; got {v!r}")
        for name, high in TREE_LIMITS.items():
            if getattr(self, name) > high:
                raise ValueError(f"{name} must be at most {high}; got {getattr(self, name)}")
        d = self.draw_above
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not d >= 0:
            raise ValueError(f"draw_above must be a number >= 0; got {d!r}")

    def draws(self, temperature: float) -> bool:
        """True when a round at this temperature draws its children from the draft (T > draw_above).
        False: greedy, or at 0 < T <= draw_above the same top-k tree as at T = 0 (values from the
        draft at T = 1), each child accepted with the target's probability of it. Where the target
        is sure, a top-k child is accepted about as often as a drawn one, and the top-k tree may be
        reranked and cut by value; the draft at the request's temperature rates its top-k too high."""
        return temperature > self.draw_above  # (draw_above >= 0: never at T = 0)

    @property
    def dynamic(self) -> bool:
        """True when this round's shape is chosen by the cost rule."""
        return self.adaptive and self.method == "eagle2"

    @property
    def width(self) -> int:
        """Children per expanded node (and frontier width) of this round's tree: ``frontier`` for the
        adaptive tree where set, else ``top_k``."""
        return self.frontier if self.dynamic and self.frontier else self.top_k

    @property
    def node_cap(self) -> int:
        return self.max_nodes if self.dynamic else self.total_tokens

    @property
    def depth_cap(self) -> int:
        return self.max_depth if self.dynamic else self.depth


MIN_TEMPERATURE = 1e-4  # below this (but above 0) logits / T overflow fp32 and sampling gets NaNs
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_STOP_CHARS = 1024  # a stop string is matched against the text's tail every round


def _real(x) -> float | None:
    """x as a float where it is a real number of any type (numpy's scalars too), else None (a bool too)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return None
    try:
        return float(x)
    except OverflowError:  # an int beyond every float
        return math.inf


def _integer(x) -> int | None:
    """x as an int where it is an integer of any type (numpy's too), else None (a bool too)."""
    return int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else None


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next-token distribution is turned into tokens.

    temperature == 0 is greedy decoding; otherwise top-k then top-p are applied to the
    target's distribution at temperature T, and acceptance is exact rejection sampling.
    """

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # seeds the torch.Generator used for every random draw

    def __post_init__(self) -> None:
        t, p, k = _real(self.temperature), _real(self.top_p), _integer(self.top_k)
        seed = None if self.seed is None else _integer(self.seed)
        if t is None or not (math.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE)):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}; "
                             f"got {self.temperature!r}")
        if p is None or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if k is None or k < 0:
            raise ValueError(f"top_k must be an integer >= 0; got {self.top_k!r}")
        if self.seed is not None and (seed is None or not SEED_MIN <= seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64 - 1]; got {self.seed!r}")
        for name, v in (("temperature", t), ("top_p", p), ("top_k", k), ("seed", seed)):
            object.__setattr__(self, name, v)  # numpy's scalars as Python's, which torch and JSON take

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class DecodeSettings:
    """Everything one generation call decides, validated once at construction: the token budget,
    the method, how to sample, an optional fixed tree shape and the stop strings.

    ``generate``, ``stream_events``, the CLI, the server and the bench all build one of these
    (``DecodeSettings.of(**keywords)`` resolves the keyword conveniences) and pass it down.
    """

    max_new_tokens: int = 256
    method: str = "eagle2"  # eagle2, eagle1, chain, vanilla
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    total_tokens: int | None = None  # any of these three fixes the tree's shape (None: the generator's tree)
    depth: int | None = None
    tree_top_k: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, excluded from the text
    lookup: int | None = None  # the longest prompt-lookup chain (None: the generator's tree's; 0: none)
    reuse_prefix: bool = True  # start from a recent call's target cache where the prompt begins with its tokens

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "total_tokens", "depth", "tree_top_k", "lookup"):
            n = _integer(getattr(self, name))
            if n is not None:
                object.__setattr__(self, name, n)  # numpy's integers as Python's, as SamplingConfig takes them
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1; got {self.max_new_tokens!r}")
        if not isinstance(self.sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig; got {type(self.sampling).__name__}")
        TreeConfig(method=self.method, total_tokens=self.total_tokens or 2, depth=self.depth or 1,
                   top_k=self.tree_top_k or 1, lookup=self.lookup or 0)  # the method, and the tree fields' types
        for name, low in (("total_tokens", 2), ("depth", 1), ("tree_top_k", 1), ("lookup", 0)):
            v = getattr(self, name)
            if v is not None and v < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
        if not isinstance(self.reuse_prefix, bool):
            raise ValueError(f"reuse_prefix must be true or false; got {self.reuse_prefix!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop or ())
        if not all(isinstance(x, str) for x in stop):
            raise ValueError("stop must be a string or a list of strings")
        if any(len(x) > MAX_STOP_CHARS for x in stop):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        object.__setattr__(self, "stop", stop)

    @classmethod
    def of(cls, settings: "DecodeSettings | None" = None, **kw) -> "DecodeSettings":
        """``settings`` (or the defaults) with keyword conveniences applied: any field of this class,
        plus ``temperature``, ``top_p``, ``top_k`` and ``seed`` for its sampling. Unknown keywords raise
        TypeError, as a misspelt argument does."""
        if settings is not None and not isinstance(settings, cls):
            raise ValueError(f"settings must be a DecodeSettings (or keywords); got {type(settings).__name__}")
        base = settings or cls()
        sampling_keys = {f.name for f in fields(SamplingConfig)}
        own = {f.name for f in fields(cls)}
        unknown = set(kw) - sampling_keys - own
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        sampling = kw.pop("sampling", base.sampling)
        picked = {k: kw.pop(k) for k in list(kw) if k in sampling_keys}
        if picked:
            sampling = replace(sampling, **picked)
        return replace(base, sampling=sampling, **kw)

    @property
    def fixed_shape(self) -> bool:
        return any(x is not None for x in (self.total_tokens, self.depth, self.tree_top_k))

    def tree(self, base: TreeConfig) -> TreeConfig:
        """The round's tree: ``base`` (the generator's) with this call's method, any fixed shape and lookup.

        An eagle2 tree keeps at most its node budget, so a ``top_k`` above that budget is cut to it:
        a frontier node ranked below the budget has that many better nodes at its level, and so have
        its children, so no tree changes (up to ties in value; output is exact either way), but a huge
        ``tree_top_k`` no longer drafts for a minute."""
        t = replace(base, method=self.method, adaptive=base.adaptive and not self.fixed_shape,
                    total_tokens=base.total_tokens if self.total_tokens is None else self.total_tokens,
                    depth=base.depth if self.depth is None else self.depth,
                    top_k=base.top_k if self.tree_top_k is None else self.tree_top_k,
                    lookup=base.lookup if self.lookup is None else self.lookup)
        budget = t.max_nodes if t.adaptive else t.total_tokens
        return replace(t, top_k=min(t.top_k, budget)) if t.method == "eagle2" else t
