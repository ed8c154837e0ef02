"""Configuration: frozen dataclasses, validated at construction.

Every knob a caller can turn lives here, with a comment per field. Invalid values raise
``ValueError`` with a one-line message; the CLI turns those into a clean error and exit code.
Nothing in this module imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("eagle2", "eagle1", "chain", "vanilla")


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the draft tree verified in one target forward.

    Defaults are what ``eagle2 tune`` chose for SmolLM2-135M on a 2-core CPU, where verifying
    16 tokens costs ~1.2 one-token forwards and 32 tokens ~1.6 (native stack); the paper's GPU defaults are
    60 / 6 / 10. ``eagle2 tune`` measures the best values for a
    machine and saves them; ``eagle2.load`` then uses those instead.
    """

    method: str = "eagle2"  # eagle2 (dynamic tree), eagle1 (static tree), chain, vanilla
    total_tokens: int = 16  # nodes verified per round, root included (EAGLE's total_token + 1)
    depth: int = 4  # drafting steps = deepest node's distance from the root
    top_k: int = 8  # children drafted per expanded node, and frontier width (EAGLE-2's K)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not isinstance(self.total_tokens, int) or self.total_tokens < 2:
            raise ValueError(f"total_tokens must be an integer >= 2 (root + at least one draft); got {self.total_tokens!r}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be an integer >= 1; got {self.depth!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"tree_top_k must be an integer >= 1; got {self.top_k!r}")


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
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0; got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0; got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None; got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
