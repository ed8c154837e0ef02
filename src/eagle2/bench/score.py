"""Bench scoring: from timed answers to the numbers results.json holds.

Pure functions over plain data (records, ``Answer`` lists): throughput and speedups, tau,
exactness against a reference method, acceptance per depth, draft calibration, the verified tree
per round and where a round's time goes. Nothing here runs a model or writes a file.
"""

from __future__ import annotations

FIELDS = ("tokens_per_s", "speedup_vs_hf", "speedup_vs_vanilla", "mean_accept_len", "new_tokens", "seconds")


def aggregate(records: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        if not rs:
            continue
        new = sum(r["new_tokens"] for r in rs)
        sec = sum(r["seconds"] for r in rs)
        fw = [r["forwards"] for r in rs]
        out[m] = dict(tokens_per_s=round(new / sec, 3) if sec > 0 else 0.0, speedup_vs_hf=None,
                      speedup_vs_vanilla=None,
                      mean_accept_len=round(new / sum(fw), 3) if all(f for f in fw) else None,
                      new_tokens=new, seconds=round(sec, 4), prompts=len(rs))
    for base in ("hf", "vanilla"):
        b = out.get(base, {}).get("tokens_per_s")
        if b:
            for m in out:
                out[m][f"speedup_vs_{base}"] = round(out[m]["tokens_per_s"] / b, 3)
    return out


def accept_rate_per_depth(stops: list[tuple[int, bool]]) -> list[float]:
    """P(a depth-d draft is accepted | depth d-1 was, and the tree had a depth-d node under it),
    d = 1.. : where drafts stop paying. ``stops``: per drafted round, (drafted tokens accepted,
    whether the last accepted node had children). A round whose tree ended at the accepted node
    drafted nothing deeper, so it does not count against depth d: with adaptive trees, which stop
    where the draft is unsure, counting it would mix "not drafted" into "rejected"."""
    rates = []
    for d in range(1, max((a for a, _ in stops), default=0) + 2):
        accepted = sum(1 for a, _ in stops if a >= d)
        tried = accepted + sum(1 for a, more in stops if a == d - 1 and more)
        if not tried:
            break
        rates.append(round(accepted / tried, 4))
    return rates


def round_profile(answers: list) -> dict:
    """Where an engine round's time goes, in ms per round (prefill: ms per prompt)."""
    rounds = sum((a.forwards or 1) - 1 for a in answers)  # verification forwards (the prefill excluded)
    tot = {k: sum(a.phases.get(k, 0.0) for a in answers) for k in ("prefill", "draft", "verify")}
    wall = sum(a.seconds for a in answers)
    other = wall - sum(tot.values())
    if not rounds:
        return {}
    return dict(rounds=rounds, draft=round(1e3 * tot["draft"] / rounds, 2), verify=round(1e3 * tot["verify"] / rounds, 2),
                other=round(1e3 * other / rounds, 2), total=round(1e3 * (wall - tot["prefill"]) / rounds, 2),
                prefill_per_prompt=round(1e3 * tot["prefill"] / max(len(answers), 1), 2))


def calibration_bins(pairs: list, n_bins: int = 10) -> list[dict]:
    """(draft prob, accepted) pairs -> equal-width confidence bins with their acceptance rate."""
    bins = []
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        sel = [(p, a) for p, a in pairs if lo <= p < hi or (i == n_bins - 1 and p == 1.0)]
        bins.append(dict(lo=lo, hi=hi, n=len(sel),
                         mean_confidence=round(sum(p for p, _ in sel) / len(sel), 4) if sel else None,
                         accept_rate=round(sum(1 for _, a in sel if a) / len(sel), 4) if sel else None))
    return bins


def _histogram(values: list[int]) -> dict:
    return {str(k): values.count(k) for k in sorted(set(values))}


def tree_per_round(answers: list) -> dict:
    """What the rounds verified: size and depth (histogram and mean), and the expected accept length
    (calibrated draft probabilities of the verified nodes) against the realised one."""
    sizes = [x for a in answers for x in a.tree_sizes]
    depths = [x for a in answers for x in a.tree_depths]
    expected = [e for a in answers for e, _ in a.expected_accepts]
    realised = [r for a in answers for _, r in a.expected_accepts]
    if not sizes:
        return {}
    mean = lambda v: round(sum(v) / len(v), 3) if v else None  # noqa: E731
    return dict(rounds=len(sizes), size_mean=mean(sizes), size_hist=_histogram(sizes), depth_mean=mean(depths),
                depth_hist=_histogram(depths), expected_accept_mean=mean(expected),
                realised_accept_mean=mean(realised))


def calibration_per_depth(triples: list) -> list[dict]:
    """(depth, draft path prob, accepted) -> per depth: nodes, mean predicted, accept rate and their
    ratio (``scale``; 1 = calibrated)."""
    out = []
    for d in sorted({t[0] for t in triples}):
        sel = [(p, a) for dd, p, a in triples if dd == d]
        pred = sum(p for p, _ in sel)
        acc = sum(1 for _, a in sel if a)
        out.append(dict(depth=d, n=len(sel), mean_predicted=round(pred / len(sel), 4),
                        accept_rate=round(acc / len(sel), 4), scale=round(acc / pred, 4) if pred > 0 else None))
    return out


def identical_fraction(answers: dict, active: list[str], n_questions: int, reference: str) -> dict:
    """At T = 0: per method other than ``reference``, the fraction of answers (turns) whose new token ids
    equal ``reference``'s."""
    greedy = {}
    for m in active:
        if m == reference:
            continue
        pairs = [(ra.token_ids, ga.token_ids) for qi in range(n_questions)
                 for ra, ga in zip(answers[(qi, reference)], answers[(qi, m)])]
        greedy[m] = round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None
    return greedy


def exactness(answers: dict, records: list[dict], active: list[str], n_questions: int) -> tuple[dict, str | None]:
    """At T = 0: per method, the fraction of prompts whose new token ids equal the reference's
    (``hf`` if run, else ``vanilla``); marks each record ``identical``. Returns (fractions, reference)."""
    reference = "hf" if "hf" in active else ("vanilla" if "vanilla" in active else None)
    if reference is None:
        return {}, None
    greedy = identical_fraction(answers, active, n_questions, reference)
    for r in records:
        if r["method"] != reference:
            ra = answers[(r["index"], reference)][r["turn"] - 1]
            r["identical"] = ra.token_ids == answers[(r["index"], r["method"])][r["turn"] - 1].token_ids
    return greedy, reference


def speculation_stats(answers: dict, overall: dict, active: list[str]) -> dict:
    """Adds tree, calibration, acceptance and round-profile statistics to ``overall``'s engine
    methods; returns the depth-1 calibration bins per speculative method (for the plot)."""
    from .inputs import is_engine

    mine = {m: [a for (_, mm), al in answers.items() if mm == m for a in al] for m in active}
    calib = {}
    for m in active:
        if not is_engine(m) or m not in overall:
            continue
        overall[m]["round_profile_ms"] = round_profile(mine[m])
        if m == "vanilla":
            continue
        lengths = [x for a in mine[m] for x in a.accept_lengths]
        confidence = [x for a in mine[m] for x in a.draft_confidence]
        calib[m] = calibration_bins([(p, a) for d, p, a in confidence if d == 1])
        overall[m]["tree_per_round"] = tree_per_round(mine[m])
        overall[m]["calibration_per_depth"] = calibration_per_depth(confidence)
        overall[m]["accept_length_hist"] = _histogram(lengths)
        overall[m]["accept_rate_per_depth"] = accept_rate_per_depth([x for a in mine[m] for x in a.accept_stops])
    return calib
