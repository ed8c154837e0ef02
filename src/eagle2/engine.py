"""The engine: the decode loop — draft -> verify -> accept -> commit — with stop handling and stats.

One call of ``Engine.decode`` generates one sequence (batch size 1) and yields a ``RoundEvent``
per target forward. A round:
1. the drafter commits the pairs the last verification produced and grows a tree under the root;
2. the target verifies root + tree in one forward (tree mask, positions = prefix_len + depth);
3. acceptance (verify.py) picks the accepted path and the bonus token;
4. the target cache keeps prefix + accepted path; the accepted features feed the next draft.

The target caches the last ``KEPT_CACHES`` calls left behind are kept (``_Kept``): a prompt that
starts with the same tokens as one of them (a chat's next turn, which repeats the conversation so far)
takes that cache and prefills only what follows them. That happens only where the target is
``row_invariant`` (the lean forward's exact numerics, the CPU default): the kept keys/values are then bit
for bit the ones a fresh prefill would compute, so the output does not depend on what ran before. For
the same reason a row-invariant target prefills a long prompt in chunks of ``PREFILL_CHUNK`` tokens (the
same bits as one forward) and yields an event without tokens after each but the last, so that a consumer
can stop there (the server, when its client left). The draft head, though, recommits the whole prompt's
(feature, token) pairs in one call, as a fresh call does: its own forward is not row-invariant, so pairs
it committed a few per round in the earlier call would draft (and at T > 0 sample) differently.

Calls may interleave round by round (two streams advanced in turn, the server's jobs): each keeps its
own target cache, and the draft head's committed pairs move to whichever call drafts next
(``_claim_drafter``), so a call's tokens and drafts do not depend on what ran between its rounds.

A decode is written as ``Engine.steps``, which yields the target forwards it needs (``target.Forward``)
besides its events, and takes each forward's result back: ``decode`` runs them at once, one by one
(``run_alone``); ``step_together`` advances several decodes by one forward each and runs their forwards
as one (``Target.forward_many``: one pass over the weights, whose reading is most of a small forward's
time). Where the target is row-invariant every row of that shared forward has the bits it has alone, so
a decode's tokens do not depend on the decodes beside it.

The engine knows nothing of transformers (target.py does) or of HTTP / argument parsing.
``method="vanilla"`` runs the same loop with a root-only tree: plain autoregressive decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from contextlib import closing
from typing import Generator, Iterator

import torch

from . import masks
from .config import SamplingConfig, TreeConfig
from .draft import Committed, Drafter, Draw
from .lookup import PromptLookup
from .target import Forward, Target
from .cost import CostModel, SampledAcceptance
from .tree import Budget, chain_tree, path_probs, sampled_reach, single_node_tree
from .verify import greedy_accept, sample_accept, sample_token, target_probs


PREFILL_CHUNK = 256  # prompt tokens per prefill forward where it is row-invariant (which runs 64-row calls anyway)


@dataclass
class Stats:
    rounds: int = 0  # target forwards: the prefill plus one verification per round
    new_tokens: int = 0
    seconds: float = 0.0  # wall clock of the whole call, prefill included
    prefill_seconds: float = 0.0
    reused_prefix: int = 0  # prompt tokens whose keys/values a recent call left in its cache
    draft_seconds: float = 0.0  # drafter commit + tree growth
    verify_seconds: float = 0.0  # target forward over the tree
    accept_lengths: list = field(default_factory=list)  # drafted tokens accepted, per round
    draft_confidence: list = field(default_factory=list)  # (depth, draft path prob, on the accepted path?) per node
    tree_sizes: list = field(default_factory=list)  # nodes verified per drafted round, root included
    tree_depths: list = field(default_factory=list)  # deepest node per drafted round
    expected_accepts: list = field(default_factory=list)  # (calibrated expected, realised) accept length per drafted round
    accept_stops: list = field(default_factory=list)  # (accepted, whether the last accepted node had children) per drafted round
    # (the four lists above have one entry per round that grew a tree, a root-only one included)

    @property
    def mean_accept_len(self) -> float:
        """New tokens per target forward (tau). Vanilla decoding gives exactly 1.0."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(rounds=self.rounds, new_tokens=self.new_tokens, seconds=round(self.seconds, 4),
                    tokens_per_s=round(self.tokens_per_s, 2), mean_accept_len=round(self.mean_accept_len, 3),
                    prefill_seconds=round(self.prefill_seconds, 4), reused_prefix=self.reused_prefix,
                    draft_seconds=round(self.draft_seconds, 4),
                    verify_seconds=round(self.verify_seconds, 4))


@dataclass(frozen=True)
class RoundEvent:
    token_ids: list  # tokens emitted by this target forward (after stop handling)
    drafted: int  # the first `drafted` of them were draft tokens the target accepted; the rest: bonus
    text: str  # new text; may lag the tokens (incomplete characters, a possible stop string)
    draft_text: str  # the part of `text` that came from accepted drafts
    stats: Stats
    final: bool = False  # the call's last forward is done: what follows is bookkeeping (and held-back text)


@dataclass
class GenerationResult:
    token_ids: list  # new tokens only (an EOS that ended generation is included)
    text: str  # decoded new text, special tokens skipped, stop string excluded
    stats: Stats
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens / context)
    prompt_token_ids: list


class TextTracker:
    """Incremental detokenization with stop strings and hold-back of undecided text.

    Decoding the whole answer every round would make a round's cost grow with the answer (O(n^2)
    per answer). The text of the tokens up to an anchor is kept instead, and a round decodes only
    a window starting ``CONTEXT`` tokens before the anchor: the window's text past its part before
    the anchor is what the new tokens add. The left context gives a tokenizer that treats a string's
    start specially (a Metaspace leading space, joined word pieces) the same start in both decodes;
    where the window's text does not extend that part, the whole answer is decoded instead."""

    CONTEXT = 4

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self._anchor, self._anchor_text = 0, ""  # ids[:_anchor] decode to _anchor_text, whole characters

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _text(self) -> str:
        """The text of all ``ids``, decoding only what follows the anchor (plus its left context)."""
        start = max(0, self._anchor - self.CONTEXT)
        known = self._decode(self.ids[start:self._anchor])
        window = self._decode(self.ids[start:])
        full = self._anchor_text + window[len(known):] if window.startswith(known) else self._decode(self.ids)
        if not full.endswith("\ufffd"):  # ends on a whole character: a safe anchor
            self._anchor, self._anchor_text = len(self.ids), full
        return full

    def push(self, new: list[int]) -> tuple[list[int], str]:
        """Add tokens; returns (tokens kept, text released). Sets ``stopped`` on a stop string."""
        before = len(self.ids)
        self.ids.extend(new)
        full = self._text()
        hit = min((i for i in (full.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stop) if i >= 0),
                  default=-1)
        if hit >= 0:
            for n in range(before + 1, len(self.ids) + 1):  # fewest tokens that complete the stop string
                if any(s in self._decode(self.ids[:n]) for s in self.stop):
                    break
            kept = self.ids[before:n]
            self.ids = self.ids[:n]
            self._anchor, self._anchor_text = 0, ""
            piece = full[len(self.sent):hit]
            self.sent += piece
            self.stopped = True
            return kept, piece
        hold = 1 if full.endswith("\ufffd") else 0  # an incomplete multi-byte character
        for s in self.stop:  # a suffix that may grow into a stop string
            for j in range(len(s) - 1, 0, -1):
                if full.endswith(s[:j]):
                    hold = max(hold, j)
                    break
        piece = full[len(self.sent): len(full) - hold]
        self.sent += piece
        return list(new), piece

    def flush(self) -> str:
        full = self._decode(self.ids)
        piece = full[len(self.sent):] if not self.stopped else ""
        self.sent += piece
        return piece


class Engine:
    def __init__(self, target: Target, drafter: Drafter | None, tokenizer, eos_ids: set[int],
                 trained_head: bool = True):
        """trained_head: False for an untrained head (the glossary's), whose guesses the cost-aware tree
        leaves out: it verifies prompt-lookup chains alone (``tree.chain_tree``), and at temperatures where
        drafts are drawn (no chain) the root alone."""
        self.target = target
        self.drafter = drafter
        self.trained_head = trained_head
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self._kept: list[_Kept] = []  # the caches the last calls left, newest first, until a call takes one
        self._drafting: _Run | None = None  # the decode whose committed pairs the drafter holds
        self._beside = 1  # decodes whose forwards run together in the step under way (``step_together``)

    def step_together(self, decodes: list[Steps]) -> list["Step"]:
        """``step_together`` on this engine's target, each decode sizing its tree for a forward shared
        with the others (``Budget.shared_by``)."""
        self._beside = len(decodes)
        try:
            return step_together(self.target, decodes)
        finally:
            self._beside = 1

    def forget(self) -> None:
        """Drop the kept caches."""
        self._kept = []

    def _pick(self, logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> int:
        if s.greedy:
            return int(logits.argmax())
        return sample_token(target_probs(logits, s.temperature, s.top_k, s.top_p), gen)

    def decode(self, prompt_ids: list[int], tree: TreeConfig, sampling: SamplingConfig, max_new_tokens: int,
               stop: tuple[str, ...] = (), result: GenerationResult | None = None,
               cost: CostModel | None = None, reuse_prefix: bool = True) -> Iterator[RoundEvent]:
        """Yield one event per target forward; fills ``result`` (if given) as it goes. ``cost`` lets a
        dynamic tree (``tree.dynamic``) size each round; without it the fixed shape is grown. At T > 0
        the drafts are sampled (``draft.Draw``) and a ``SampledAcceptance`` learns from every round how
        often they are accepted, which shapes the next rounds' trees. ``reuse_prefix``: start from a
        recent call's cache where the prompt begins with its tokens (False: prefill the whole prompt)."""
        return run_alone(self.target, self.steps(prompt_ids, tree, sampling, max_new_tokens, stop, result, cost,
                                                 reuse_prefix))

    def steps(self, prompt_ids: list[int], tree: TreeConfig, sampling: SamplingConfig, max_new_tokens: int,
              stop: tuple[str, ...] = (), result: GenerationResult | None = None,
              cost: CostModel | None = None, reuse_prefix: bool = True) -> Steps:
        """``decode`` with its target forwards left to the caller: yields each ``Forward`` it needs (send
        back the target's (logits, features) for it) and the events, one after each forward. ``decode``
        runs the forwards at once (``run_alone``); ``step_together`` runs several decodes' together."""
        run = _Run(self, prompt_ids, sampling, max_new_tokens, stop, result)
        capacity = len(prompt_ids) + run.budget + tree.node_cap + 1
        cache, logits, hidden, run.stats.reused_prefix = yield from self._prefill(
            prompt_ids, capacity, reuse_prefix, run.stats)
        kept = _Kept(list(prompt_ids), cache, [hidden])
        try:
            yield from self._rounds(run, kept, logits, hidden, tree, sampling, cost)
        finally:  # kept only if the cache holds exactly its tokens (not after a forward that failed midway)
            self._release_drafter(run)
            if self.target.row_invariant and cache.get_seq_length() == len(kept.ids):
                self._kept = [kept] + self._kept[:KEPT_CACHES - 1]

    def _claim_drafter(self, run: "_Run") -> None:
        """Give the drafter ``run``'s committed pairs. Decodes may interleave round by round (two streams,
        the server's jobs); each keeps its own pairs: the decode that used the drafter last parks them
        on itself and takes them back when it next drafts. The caches swap; a decode's first claim
        while another holds the drafter allocates it one."""
        dr, last = self.drafter, self._drafting
        if last is run:
            return
        if last is not None and run.parked is not None:
            last.parked = Committed(dr.cache, dr.length)
        elif last is not None:
            last.parked = dr.hand_over()
        if run.parked is not None:
            dr.resume(run.parked)
            run.parked = None
        self._drafting = run

    def _release_drafter(self, run: "_Run") -> None:
        """``run`` ends: its committed pairs are nobody's (the drafter's cache serves the next call)."""
        if self._drafting is run:
            self._drafting = None
        run.parked = None

    def _prefill(self, prompt_ids: list[int], capacity: int, reuse: bool, stats: Stats):
        """The prompt into a target cache: the kept cache that shares the longest prefix with it, cut to
        that prefix, or a copy of that prefix where more than ``TAKE_TAIL`` kept tokens follow it
        (``reuse``); then causal forwards over the rest (``_chunks``), yielding a token-less event between
        them. Returns (cache, logits [1, V] after the last prompt token, features [n, F] of every prompt
        token, tokens reused)."""
        tgt, dev, n = self.target, self.target.device, len(prompt_ids)
        # only where the kept entries are those a fresh prefill would compute; >= 1 token runs: its logits
        shared = [k.common(prompt_ids, n - 1) for k in self._kept] if reuse and tgt.row_invariant else []
        m = max(shared, default=0)
        feats = []  # [*, F] blocks of the prompt's features
        if m:
            kept = self._kept[shared.index(m)]
            feats.append(torch.cat(kept.feats)[:m])  # [m, F]
            if len(kept.ids) - m <= TAKE_TAIL:  # the prompt continues that call: its cache is this call's
                self._kept.remove(kept)
                cache = kept.cache
                tgt.keep(cache, m, torch.empty(0, dtype=torch.long, device=dev))  # cut to the common prefix
            else:  # only a beginning is shared (a system prompt): a copy, and the kept cache keeps serving its own
                cache = tgt.copy_prefix(kept.cache, m)
        else:
            cache = tgt.new_cache(capacity=capacity)
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=dev)
        for a, b in self._chunks(m, n):
            last = slice(b - a - 1, b - a)  # logits of the chunk's last row only
            logits, hidden = yield Forward(cache, ids[a:b], torch.arange(a, b, device=dev), None, last)
            feats.append(hidden)
            if b < n:
                yield RoundEvent([], 0, "", "", stats)
        return cache, logits, torch.cat(feats) if len(feats) > 1 else feats[0], m

    def _chunks(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) as the prefill's forwards: ``PREFILL_CHUNK`` tokens each where the target is
        row-invariant (each row's bits do not depend on the rows beside it), else one forward."""
        step = PREFILL_CHUNK if self.target.row_invariant else end - start
        return [(a, min(end, a + step)) for a in range(start, end, step)]

    def _rounds(self, run: "_Run", kept: "_Kept", logits: torch.Tensor, hidden: torch.Tensor, tree: TreeConfig,
                sampling: SamplingConfig, cost: CostModel | None) -> Iterator[RoundEvent]:
        """``decode`` after the prefill: the first token, then one round per target forward."""
        dev, cache = self.target.device, kept.cache
        prompt_ids, n_prompt = kept.ids[:], len(kept.ids)
        use_draft = tree.method != "vanilla" and self.drafter is not None
        budgets = _Budgets(tree, cost)
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=dev)
        root = self._pick(logits[0], sampling, run.rng)
        run.stats.rounds = 1
        run.stats.prefill_seconds = time.perf_counter() - run.t0
        yield run.emit([root], 0)
        drawn = tree.draws(sampling.temperature)
        adaptive = tree.dynamic and cost is not None  # the cost-aware tree (else a fixed shape)
        head_free = adaptive and not self.trained_head  # the lookup chain alone (none when drafts are drawn)
        if use_draft:  # the prompt's pairs (f_i, t_{i+1}), committed with the first round's
            if not head_free:
                self._claim_drafter(run)
                self.drafter.reset()
            feats = hidden  # [n, H]
            pair_tokens = torch.cat([prompt[1:], prompt.new_tensor([root])])  # [n]
        length = n_prompt  # tokens in the target cache (everything emitted except the root)
        acceptance = None
        if use_draft and drawn:  # the adaptive tree rates draws by confidence (draft.py)
            acceptance = SampledAcceptance.by_confidence() if adaptive else SampledAcceptance.by_depth()
        lookup = (PromptLookup(prompt_ids + [root], tree.lookup)
                  if use_draft and not drawn and adaptive and tree.lookup else None)
        while not run.finished():
            max_depth = min(tree.depth_cap, run.budget - len(run.out.token_ids) - 1)
            grown = use_draft and max_depth >= 1
            t_round = time.perf_counter()
            root_t = torch.tensor(root, dtype=torch.long, device=dev)
            chain, matched = ([], []), 0  # prompt lookup's copied tokens and log-probs, the suffix length matched
            if grown:
                draw = Draw(sampling.temperature, run.rng, acceptance.table()) if drawn else None
                if lookup is not None:
                    copied, logps, matched = lookup.propose(max_depth)
                    chain = (copied, logps)
                # A greedy round sizes its tree for a forward shared with the decodes beside it; a sampled one does
                # not, drawn drafts or a top-k tree alike: its tree decides which random draws its acceptance takes,
                # and a seeded answer must not depend on what runs beside it.
                budget = budgets.at(length, self._beside if sampling.greedy else 1)
                if head_free:  # the head's cache is left to the decodes that use it
                    draft = chain_tree(root_t, chain, budget)
                else:
                    self._claim_drafter(run)
                    draft = self.drafter.grow(root_t, self.drafter.commit(feats, pair_tokens), tree, max_depth, budget,
                                              draw, chain)
            else:
                draft = single_node_tree(root_t)
            run.stats.draft_seconds += time.perf_counter() - t_round
            path, bonus, hidden = yield from self._verify(cache, length, draft, sampling, run)
            accepted = draft.tokens[path[1:]].tolist()
            run.stats.accept_lengths.append(len(accepted))
            if grown:
                rated = None if draft.draft_q is None else (draw.accept, acceptance.rows(draft))  # what it assumed
                _record_tree(run.stats, draft, path, rated)
                if rated is not None:
                    acceptance.update(draft.parents.tolist(), rated[1], path.tolist())
            length += path.shape[0]
            path_feats = hidden[path]  # [A + 1, F] the root's and the accepted nodes' features
            kept.add([root] + accepted, path_feats)
            if use_draft:  # (a round with max_depth < 1 is the last one: nothing left to pair)
                feats, pair_tokens = path_feats, torch.tensor(accepted + [bonus], device=dev)
            root = bonus
            if lookup is not None:
                lookup.update(chain[0], matched, accepted + [bonus])
                lookup.extend(accepted + [bonus])
            yield run.emit(accepted + [bonus], len(accepted))
        tail = run.finish()
        if tail:
            yield RoundEvent([], 0, tail, "", run.stats, True)

    def _verify(self, cache, length: int, draft, sampling: SamplingConfig, run: "_Run"):
        """One target forward over root + tree, acceptance, and the cache cut to the accepted path.
        Returns (path [A + 1] node indices, bonus token, hidden [N, H])."""
        t0 = time.perf_counter()
        allowed = masks.after_prefix(draft.mask, length)  # [N, length + N]
        logits, hidden = yield Forward(cache, draft.tokens, length + draft.depths, allowed)
        if sampling.greedy:
            path, bonus = greedy_accept(draft, logits)
        else:
            path, bonus = sample_accept(draft, target_probs(logits, sampling.temperature, sampling.top_k,
                                                            sampling.top_p), run.rng)
        self.target.keep(cache, length, path)
        run.stats.verify_seconds += time.perf_counter() - t0
        run.stats.rounds += 1
        return path, bonus, hidden


Steps = Generator["RoundEvent | Forward", "tuple[torch.Tensor, torch.Tensor] | None", None]  # Engine.steps


def run_alone(target: Target, steps: Steps) -> Iterator[RoundEvent]:
    """A decode's events, each target forward it asks for run at once on ``target``. Closing this closes
    the decode (its cleanup keeps its cache for a next turn)."""
    with closing(steps):
        answer = None
        while True:
            try:
                item = steps.send(answer)
            except StopIteration:
                return
            answer = None
            if isinstance(item, Forward):
                answer = target.forward_many([item])[0]
            else:
                yield item


@dataclass
class Step:
    """What one decode did in a ``step_together``: the events it yielded (one per forward; a finished
    decode's tail too), and the error that ended it, if any. ``ended``: it has no more events."""

    events: list = field(default_factory=list)
    error: BaseException | None = None
    ended: bool = False


def step_together(target: Target, decodes: list[Steps]) -> list[Step]:
    """Advance each decode by one target forward, their forwards run together (``Target.forward_many``:
    one pass over the weights, each row bit for bit as alone), so that each decode's tokens are those it
    gives alone. A decode yields its drafts' forward, then (after the shared forward) its event; one whose
    last event comes is run to its end. An error ends only the decodes it came from; an ended decode is
    closed. A server decodes its requests side by side this way."""
    out = [Step() for _ in decodes]
    asks = [(i, f) for i, d in enumerate(decodes) if (f := _to_event(d, out[i], None)) is not None]
    try:
        answers = target.forward_many([f for _, f in asks]) if asks else []
    except Exception as e:  # noqa: BLE001 (each decode in the call ends with it)
        answers = [e] * len(asks)
    for (i, _), answer in zip(asks, answers):
        while answer is not None:  # a decode that asks for a second forward before its event runs it alone
            f = _to_event(decodes[i], out[i], answer)
            answer = None if f is None else _forward_alone(target, f)
    for d, st in zip(decodes, out):
        if st.error is not None or st.ended:
            st.ended = True
            d.close()
    return out


def _to_event(decode: Steps, st: Step, answer) -> Forward | None:
    """Run ``decode`` (sending it ``answer``: a forward's result, or an error to raise there) until it asks
    for a forward (returned) or has yielded an event (None; after its final event, to its end)."""
    try:
        item = decode.throw(answer) if isinstance(answer, BaseException) else decode.send(answer)
        while not isinstance(item, Forward):
            st.events.append(item)
            if not item.final:
                return None
            item = next(decode)
        return item
    except StopIteration:
        st.ended = True
    except Exception as e:  # noqa: BLE001 (it ends this decode only)
        st.error = e
    return None


def _forward_alone(target: Target, f: Forward):
    try:
        return target.forward_many([f])[0]
    except Exception as e:  # noqa: BLE001 (sent into the decode, which ends with it)
        return e


class _Run:
    """One ``decode`` call's bookkeeping: the result it fills, its token budget, the stop-string and
    EOS handling of emitted tokens, the random generator and the clock."""

    def __init__(self, engine: Engine, prompt_ids: list[int], sampling: SamplingConfig, max_new_tokens: int,
                 stop: tuple[str, ...], result: GenerationResult | None):
        self.eos_ids = engine.eos_ids
        self.budget = min(max_new_tokens, engine.target.max_len - len(prompt_ids))
        self.stats = Stats()
        self.out = result if result is not None else GenerationResult([], "", self.stats, "length", list(prompt_ids))
        self.out.stats, self.out.prompt_token_ids = self.stats, list(prompt_ids)
        self.tracker = TextTracker(engine.tokenizer, stop)
        self.parked: Committed | None = None  # its draft pairs while another decode drafts (``_claim_drafter``)
        self.rng = torch.Generator(device=engine.target.device)
        if sampling.seed is not None:
            self.rng.manual_seed(sampling.seed)
        else:
            self.rng.seed()
        self.t0 = time.perf_counter()

    def emit(self, tokens: list[int], drafted: int) -> RoundEvent:
        """Emit a round's tokens (the first ``drafted`` came from the draft) up to the budget, EOS or a stop."""
        out, tracker = self.out, self.tracker
        kept = []
        for t in tokens[: self.budget - len(out.token_ids)]:
            kept.append(t)
            if t in self.eos_ids:
                out.finish_reason = "stop"
                break
        kept_d, draft_text = tracker.push(kept[:drafted])
        kept_b, bonus_text = ([], "") if tracker.stopped else tracker.push(kept[drafted:])
        if tracker.stopped:
            out.finish_reason = "stop"
        kept = kept_d + kept_b
        out.token_ids.extend(kept)
        out.text = tracker.sent
        self.stats.new_tokens = len(out.token_ids)
        self.stats.seconds = time.perf_counter() - self.t0
        return RoundEvent(kept, len(kept_d), draft_text + bonus_text, draft_text, self.stats, self.finished())

    def finished(self) -> bool:
        return self.out.finish_reason == "stop" or len(self.out.token_ids) >= self.budget

    def finish(self) -> str:
        """The text held back for a possible stop string; closes the clock."""
        tail = self.tracker.flush()
        self.out.text = self.tracker.sent
        self.stats.seconds = time.perf_counter() - self.t0
        return tail


KEPT_CACHES = 4  # conversations whose caches wait for their next turn (SmolLM2 in bf16: ~27 KB per token)
# A next turn may re-render the end of the last answer (a chat template strips it, closes the turn), so a
# prompt that shares all but this many of a kept cache's tokens takes that cache; one that shares less (a
# system prompt, another conversation's beginning) copies the shared part and leaves the cache to its owner.
TAKE_TAIL = 32


@dataclass
class _Kept:
    """A target cache and the tokens whose keys/values fill it, with their features (the draft head's
    inputs, [n_i, F] per forward), left for the next call."""

    ids: list
    cache: object
    feats: list

    def add(self, tokens: list[int], feats: torch.Tensor) -> None:
        self.ids.extend(tokens)
        self.feats.append(feats)

    def common(self, ids: list[int], limit: int) -> int:
        """Length of the longest common prefix of ``ids`` and the kept tokens, at most ``limit``."""
        n = 0
        for a, b in zip(self.ids[:limit], ids[:limit]):
            if a != b:
                break
            n += 1
        return n


class _Budgets:
    """Per-round budgets of a dynamic tree: the verify-cost curve at the cache's length (reused
    within 32-token buckets)."""

    def __init__(self, tree: TreeConfig, cost: CostModel | None):
        self.tree, self.cost = tree, cost
        self._curves: dict[int, torch.Tensor] = {}

    def at(self, cached: int, beside: int = 1) -> Budget | None:
        """The budget of a round over ``cached`` tokens whose forward runs with ``beside`` - 1 others'."""
        if not self.tree.dynamic or self.cost is None:
            return None
        bucket = cached // 32
        if bucket not in self._curves:
            self._curves[bucket] = self.cost.verify_curve(32 * bucket + 16, self.tree.max_nodes)
        return Budget(self._curves[bucket], self.cost.draft_level_ms, self.cost.round_fixed_ms,
                      self.cost.draft_row_ms).shared_by(beside)


def _record_tree(stats: Stats, draft, path: torch.Tensor, rated: tuple[torch.Tensor, list[int]] | None) -> None:
    """Per-round tree statistics: size, depth, expected accept length and per-node calibration data.
    Expected: the path probabilities (greedy: the draft is calibrated), or with sampled drafts the
    reach probabilities under the acceptance rates the round was shaped with and each node's row."""
    probs = path_probs(draft).float().cpu()  # [N]
    depths = draft.depths.cpu()
    on_path = set(path.tolist())
    d, p = depths.tolist(), probs.tolist()  # lists: a tensor index per node costs more than the round's tree code
    parents = draft.parents.tolist()
    expected = p if rated is None else sampled_reach(parents, rated[1], rated[0])
    stats.tree_sizes.append(draft.size)
    stats.tree_depths.append(max(d))
    stats.expected_accepts.append((round(sum(min(1.0, x) for x in expected[1:]), 4), int(path.shape[0]) - 1))
    stats.accept_stops.append((int(path.shape[0]) - 1, int(path[-1]) in parents))
    stats.draft_confidence.extend((d[i], p[i], i in on_path) for i in range(1, draft.size))
