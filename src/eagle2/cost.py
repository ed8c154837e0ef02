"""The cost model: how long a round's parts take on this machine, for this model, dtype and backend.

EAGLE-2 grows a tree by confidence; whether a node is worth verifying depends on what verifying it
costs here. This module measures that once — a short probe of the target's forward time against
query length at two cached lengths, one draft level and the fixed part of a round — and caches
the result as JSON under ``$EAGLE2_CACHE/cost`` keyed by everything that changes the timings
(model, head, dtype, backend, CPU, torch, thread count). ``eagle2 tune`` refits it on demand.

It also learns how often sampled drafts are accepted at T > 0 (``SampledAcceptance``). The decision rules
themselves are pure functions in ``tree.py``; this module only supplies the numbers they weigh.
Nothing here knows the engine's round loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import masks
from .machine import cpu_name
from .models import cache_dir

log = logging.getLogger("eagle2")

PROBE_QUERY_LENS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
PROBE_CACHED = (128, 1024)  # cached lengths the verify curve is measured at; interpolated linearly between
PROBE_BUDGET_S = 20.0  # the verify curve's repeats after the warm-up pass, at most (about)
COST_VERSION = 3  # bump when the probe or the file layout changes


@dataclass(frozen=True)
class CostModel:
    """Milliseconds of a round's parts. Verification at query length n and cached length L is
    interpolated from the probe: piecewise linear in n, linear in L between the two probe lengths."""

    query_lens: tuple[int, ...]  # ascending, starting at 1
    verify_ms_short: tuple[float, ...]  # forward ms at cached_short for each query length
    verify_ms_long: tuple[float, ...]  # ... and at cached_long
    cached_short: int
    cached_long: int
    draft_level_ms: float  # one draft level apart from its rows: the head's call, top-k, bookkeeping
    round_fixed_ms: float  # paid by every drafted round whatever its tree: commit, root logits, accept, keep
    draft_row_ms: float = 0.0  # each frontier node a draft level feeds (its rows of the head and logits)

    def verify_curve(self, cached: int, max_nodes: int) -> torch.Tensor:
        """[max_nodes + 1] fp32: ms of verifying n = 0..max_nodes nodes over ``cached`` tokens (n = 0: 0)."""
        q = torch.tensor(self.query_lens, dtype=torch.float32)
        short = torch.tensor(self.verify_ms_short, dtype=torch.float32)
        long_ = torch.tensor(self.verify_ms_long, dtype=torch.float32)
        w = (cached - self.cached_short) / max(1, self.cached_long - self.cached_short)
        at = (short + w * (long_ - short)).clamp(min=1e-3)  # [Q]
        n = torch.arange(max_nodes + 1, dtype=torch.float32)
        idx = torch.searchsorted(q, n).clamp(1, len(q) - 1)  # segment [q[idx-1], q[idx]] (or the last one)
        q0, q1, y0, y1 = q[idx - 1], q[idx], at[idx - 1], at[idx]
        curve = y0 + (n - q0) * (y1 - y0) / (q1 - q0)  # extrapolates past the last probe point
        curve[0] = 0.0
        return curve.clamp(min=0.0)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "CostModel":
        return CostModel(tuple(int(x) for x in d["query_lens"]), tuple(float(x) for x in d["verify_ms_short"]),
                         tuple(float(x) for x in d["verify_ms_long"]), int(d["cached_short"]), int(d["cached_long"]),
                         float(d["draft_level_ms"]), float(d["round_fixed_ms"]), float(d.get("draft_row_ms", 0.0)))


class SampledAcceptance:
    """How often a sampled draft is accepted (T > 0), by a row and the draw rank, learnt from the rounds.

    With sampled drafting a child is accepted with probability min(1, p(x) / q(x)), whose mean is
    1 - TV(p, q). What predicts it is how sure the draft is where it draws, and the draw rank:
    ``by_confidence`` (the adaptive tree) keys the rows by the confidence of the distribution the
    child was drawn from (its largest probability, in tenths: a draw from a flat distribution is
    accepted ~0.2 of the time, from one above 0.9 ~0.9); ``by_depth`` (fixed shapes, whose
    layout is chosen before any distribution is seen) keys them by depth. ``table()[row, r]`` is the
    rate at which the rank-r draw of that row was accepted when it was tried (its parent reached,
    its earlier siblings rejected), from prior pseudo-counts plus every verified round so far;
    counts are halved past ``horizon`` tries so the rates follow the text being written. Runtime
    state of one generation: the engine starts one from the prior per ``decode`` call (so a seeded
    run is reproducible) and updates it after each sampled round."""

    RANK_PRIOR = (0.4, 0.25, 0.15)  # by rank, the same at every depth: near what a trained head measures at T = 1
    # by confidence tenth, first draw: what the shipped head measured at T = 1 on 40 corpus prompts
    # it never trained on (3,524 draws); later draws at a fraction of it
    CONFIDENCE_PRIOR = (0.23, 0.25, 0.29, 0.33, 0.35, 0.46, 0.56, 0.55, 0.74, 0.91)
    LATER_DRAWS = (1.0, 0.5, 0.35)
    BUCKETS = len(CONFIDENCE_PRIOR)

    def __init__(self, prior: torch.Tensor, by_confidence: bool, weight: float = 8.0, horizon: float = 4000.0):
        """prior: [rows, ranks] rates before any round."""
        self.by_confidence = by_confidence
        self.tried = torch.full(prior.shape, weight, dtype=torch.float64)  # [rows, R]
        self.accepted = (prior * weight).to(torch.float64)  # [rows, R]
        self.horizon = horizon

    @classmethod
    def by_depth(cls, max_depth: int = 8, max_rank: int = 8, weight: float = 8.0) -> "SampledAcceptance":
        prior = torch.tensor([cls.RANK_PRIOR[min(r, len(cls.RANK_PRIOR) - 1)] for r in range(max_rank)])
        return cls(prior.expand(max_depth, max_rank), False, weight)

    @classmethod
    def by_confidence(cls, max_rank: int = 8, weight: float = 8.0) -> "SampledAcceptance":
        later = [cls.LATER_DRAWS[min(r, len(cls.LATER_DRAWS) - 1)] for r in range(max_rank)]
        return cls(torch.tensor([[a * f for f in later] for a in cls.CONFIDENCE_PRIOR]), True, weight)

    @staticmethod
    def confidence_row(confidence: float) -> int:
        """The ``by_confidence`` row of a draw from a distribution whose largest probability is this."""
        return min(max(int(confidence * SampledAcceptance.BUCKETS), 0), SampledAcceptance.BUCKETS - 1)

    def table(self) -> torch.Tensor:
        """[rows, R] fp32 acceptance rates."""
        return (self.accepted / self.tried).float()

    def rows(self, tree) -> list[int]:
        """[N] the row each node of a sampled ``tree`` is rated with (the root's is unused)."""
        if not self.by_confidence:
            return [max(d - 1, 0) for d in tree.depths.tolist()]
        conf = tree.draft_q.max(-1).values.tolist()  # [N] each node's children's distribution
        return [self.confidence_row(conf[p]) if p >= 0 else 0 for p in tree.parents.tolist()]

    def update(self, parents: list[int], rows: list[int], path: list[int]) -> None:
        """Count one verified round: every child tried at a node on the accepted ``path`` (in index =
        draw order, up to and including the accepted one); rows[c]: child c's row."""
        on_path = set(path)
        kids: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            if p >= 0 and p in on_path:
                kids.setdefault(p, []).append(i)
        n_rows, cols = self.tried.shape
        for node in path:
            for r, c in enumerate(kids.get(node, ())):
                row, rr = min(rows[c], n_rows - 1), min(r, cols - 1)
                self.tried[row, rr] += 1
                if c in on_path:
                    self.accepted[row, rr] += 1
                    break
        if float(self.tried.sum()) > self.horizon:
            self.tried /= 2
            self.accepted /= 2


# ---- the probe ------------------------------------------------------------------------------------
def time_calls(fns: list, repeats: int, budget_s: float | None = None, progress: bool | None = False
               ) -> list[list[float]]:
    """Milliseconds of ``repeats`` calls of each function, after one warm-up call each. Calls are
    interleaved (one of each per pass), so a burst of other work on the machine spoils one pass
    rather than every call of one function.

    ``budget_s``: when the warm-up pass says the repeats would take longer than this, fewer are made
    (at least one). A target slow enough for that (a 262k vocabulary in fp32 on two cores) makes
    each call long, and a long call varies relatively less. ``progress``: a bar over the calls
    (None: when stderr is a terminal)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(fns) * (1 + repeats), desc="measuring round costs", unit="call", leave=False,
               disable=None if progress is None else not progress, file=sys.stderr)
    warm_s = 0.0
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        warm_s += time.perf_counter() - t0
        bar.update()
    if budget_s is not None and warm_s * repeats > budget_s:
        repeats = max(1, int(budget_s / max(warm_s, 1e-9)))
        log.warning("measuring this machine's round costs for this model (once; about %.0f s more) ...",
                    warm_s * repeats)
        bar.total = len(fns) * (1 + repeats)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(1000 * (time.perf_counter() - t0))
            bar.update()
    bar.close()
    return times


def _best_ms(fns: list, repeats: int, budget_s: float | None = None, progress: bool | None = False) -> list[float]:
    """The fastest call of each function: interference only ever adds time, so the minimum is the
    estimate of the cost itself least disturbed by it."""
    return [min(t) for t in time_calls(fns, repeats, budget_s, progress)]


def verify_steps(target, cached: int, query_lens) -> list:
    """One callable per query length q: a forward over q new tokens (a causal block, logits for every
    row, as a tree verification computes them) after ``cached`` tokens, then the cache cut back."""
    dev = target.device
    g = torch.Generator().manual_seed(cached)
    prefix = torch.randint(0, target.vocab_size, (cached,), generator=g).to(dev)
    cache = target.new_cache(capacity=cached + max(query_lens) + 1)
    target.forward(cache, prefix, torch.arange(cached, device=dev), None, logits_rows=slice(cached - 1, cached))
    none = torch.zeros(0, dtype=torch.long, device=dev)
    steps = []
    for q in query_lens:
        toks = torch.randint(0, target.vocab_size, (q,), generator=g).to(dev)
        pos = torch.arange(cached, cached + q, device=dev)
        allowed = masks.causal(q, cached, device=dev)

        def step(toks=toks, pos=pos, allowed=allowed):
            target.forward(cache, toks, pos, allowed)
            target.keep(cache, cached, none)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        steps.append(step)
    return steps


def _monotone(ms: list[float]) -> list[float]:
    """More rows never cost less, so the curve is made non-decreasing from the right: when q rows were
    measured slower than some q' > q rows, the q measurement was inflated (interference only adds
    time) and q costs at most what q' did. Raising the later points instead would let one slow call at
    q = 1 lift every longer query up to its time, and the rule would then verify big trees as if they
    were free."""
    out = list(ms)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


class OtherLoad:
    """How many cores other programs kept busy while a block ran: this machine's busy time
    (``/proc/stat``, steal included) less this process's own (``os.times``), over the wall time.

    A probe taken while something else computes (a build, a second job) measures the contention, not
    the machine: every part comes out several times dearer, and drafting dearer relative to verifying,
    so a cached curve would shape every later tree wrongly. The caller keeps such a measurement for
    the run at hand and does not cache it. ``cores`` is None where ``/proc/stat`` is not readable."""

    BUSY_CORES = 0.25  # others' mean use above this spoils a probe; an idle machine shows ~0.01

    def __enter__(self) -> "OtherLoad":
        self._start = (_machine_busy_s(), _own_cpu_s(), time.monotonic())
        self.cores: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, t0 = self._start
        busy1, wall = _machine_busy_s(), time.monotonic() - t0
        if busy0 is not None and busy1 is not None and wall > 0:
            self.cores = max(0.0, (busy1 - busy0) - (_own_cpu_s() - own0)) / wall

    @property
    def busy(self) -> bool:
        return self.cores is not None and self.cores > self.BUSY_CORES


def _machine_busy_s() -> float | None:
    """Seconds all CPUs spent busy since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = sum(fields[3:5])  # idle, iowait
    guest = sum(fields[8:10])  # already counted inside user and nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def probe(target, drafter, top_k: int = 8, repeats: int = 5, progress: bool | None = None) -> CostModel:
    """Measure this machine: a few seconds for a 135M model on two cores. The verify curve's repeats
    are cut to fit ``PROBE_BUDGET_S`` where the target is slow; ``progress`` as in ``time_calls``."""
    max_len = target.max_len
    cached = [c for c in PROBE_CACHED if c + max(PROBE_QUERY_LENS) + 1 < max_len] or [max(1, max_len // 4)]
    short_c, long_c = cached[0], cached[-1]
    steps = verify_steps(target, short_c, PROBE_QUERY_LENS)
    if long_c != short_c:
        steps += verify_steps(target, long_c, PROBE_QUERY_LENS)
    ms = _best_ms(steps, repeats, PROBE_BUDGET_S, progress)
    n = len(PROBE_QUERY_LENS)
    short, long_ = _monotone(ms[:n]), _monotone(ms[n:] or ms[:n])
    level_ms, row_ms, fixed_ms = drafter.probe_ms(top_k, repeats)
    return CostModel(PROBE_QUERY_LENS, tuple(round(x, 4) for x in short), tuple(round(x, 4) for x in long_),
                     short_c, long_c if long_c != short_c else short_c + 1, round(level_ms, 4), round(fixed_ms, 4),
                     round(row_ms, 5))


def with_draft_costs(cost_model: CostModel, drafter, top_k: int = 8, repeats: int = 5) -> CostModel:
    """``cost_model``'s verify curve (the target's, whatever the head) with ``drafter``'s own draft
    costs: for another head of another shape on the same target, so that an A/B of the two sizes
    both heads' trees from one measurement of the target."""
    level_ms, row_ms, fixed_ms = drafter.probe_ms(top_k, repeats)
    return replace(cost_model, draft_level_ms=round(level_ms, 4), round_fixed_ms=round(fixed_ms, 4),
                   draft_row_ms=round(row_ms, 5))


def fingerprint(parts: dict) -> str:
    """A stable file name for everything that changes the timings."""
    machine = dict(cpu=cpu_name(), isa=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                   threads=torch.get_num_threads(), arch=platform.machine(), version=COST_VERSION)
    blob = json.dumps({**parts, **machine}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cost_path(key: str) -> Path:
    return cache_dir() / "cost" / f"{key}.json"


def load_cached(key: str) -> CostModel | None:
    p = cost_path(key)
    if not p.exists():
        return None
    try:
        return CostModel.from_json(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable cost file %s: %s", p, e)
        return None


def save(key: str, cost: CostModel) -> Path:
    p = cost_path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(cost.to_json(), indent=1))
    tmp.replace(p)
    return p
