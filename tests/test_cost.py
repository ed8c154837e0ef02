"""The cost model: interpolation of the verify curve, the probe and its cache, the sampled-draft acceptance rates."""

import pytest
import torch

from conftest import make_generator, make_tiny_model
from eagle2.cost import CostModel


def test_verify_curve_interpolates_in_rows_and_cached_length():
    c = CostModel((1, 4, 16), (10.0, 13.0, 25.0), (20.0, 23.0, 35.0), 100, 1100, 1.0, 2.0)
    at_short = c.verify_curve(100, 20)
    assert at_short[0] == 0 and torch.allclose(at_short[[1, 4, 16]], torch.tensor([10.0, 13.0, 25.0]))
    assert torch.isclose(at_short[2], torch.tensor(11.0)) and torch.isclose(at_short[10], torch.tensor(19.0))
    assert torch.isclose(at_short[20], torch.tensor(29.0))  # past the last point: the last segment's slope
    mid = c.verify_curve(600, 16)  # halfway between the probe lengths
    assert torch.allclose(mid[[1, 16]], torch.tensor([15.0, 30.0]))


def test_probe_measures_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path))
    model = make_tiny_model("llama", vocab_size=16, max_position_embeddings=2048)
    gen = make_generator(model, model_key="tiny-cost-test")
    cost = gen.cost_model()
    assert cost.query_lens[0] == 1 and cost.cached_long > cost.cached_short
    assert all(b >= a > 0 for a, b in zip(cost.verify_ms_short, cost.verify_ms_short[1:]))  # non-decreasing
    assert cost.draft_level_ms >= 0 and cost.draft_row_ms >= 0 and cost.round_fixed_ms > 0
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(files) == 1
    again = make_generator(model, model_key="tiny-cost-test")
    assert again.cost_model() == cost  # read back, not re-measured
    assert again.generate([1, 2, 3], max_new_tokens=8).stats.new_tokens == 8
    from eagle2.config import TreeConfig

    narrow = make_generator(model, model_key="tiny-cost-test", tree=TreeConfig(top_k=2, adaptive=True))
    narrow.cost_model()  # a frontier of another width: its own probe, not the one above
    assert len(list((tmp_path / "cost").glob("*.json"))) == 2


def test_a_probe_taken_beside_other_work_serves_the_run_but_is_not_cached(tmp_path, monkeypatch, caplog):
    """Other programs busy on 1.5 cores during the probe: the generator uses what it measured, warns,
    and writes no file, so the next load measures again; on a quiet machine the file is written."""
    import logging
    import time

    from eagle2 import cost

    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path))
    monkeypatch.setattr(cost.OtherLoad, "BUSY_CORES", 0.25)
    others = {"cores": 1.5}
    monkeypatch.setattr(cost, "_machine_busy_s", lambda: others["cores"] * time.monotonic() + cost._own_cpu_s())
    model = make_tiny_model("llama", vocab_size=16, max_position_embeddings=2048)
    gen = make_generator(model, model_key="tiny-busy-test")
    with caplog.at_level(logging.WARNING, logger="eagle2"):
        measured = gen.cost_model()
    assert "kept 1.5 cores busy" in caplog.text
    assert gen.cost_model() is measured  # kept for this generator
    assert not list((tmp_path / "cost").glob("*.json"))
    assert gen.generate([1, 2, 3], max_new_tokens=4).stats.new_tokens == 4
    others["cores"] = 0.0
    make_generator(model, model_key="tiny-busy-test").cost_model()  # quiet now: measured again and cached
    assert len(list((tmp_path / "cost").glob("*.json"))) == 1


def test_other_load_reads_this_machine():
    from eagle2.cost import OtherLoad

    with OtherLoad() as load:
        sum(range(10**5))
    assert load.cores is None or load.cores >= 0


def test_monotone_envelope_lowers_a_slow_short_query_instead_of_raising_the_rest():
    """A slow spell during the q = 1 measurement must not make 2..16 rows look as dear as it: the curve
    is non-decreasing, and each point is at most what it measured and what any longer query measured."""
    from eagle2.cost import _monotone

    measured = [40.0, 20.0, 21.0, 25.0, 24.0, 30.0]  # q = 1 hit by interference; q = 16 dipped below q = 8
    curve = _monotone(measured)
    assert curve == [20.0, 20.0, 21.0, 24.0, 24.0, 30.0]
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    assert all(c <= m for c, m in zip(curve, measured))


def test_sampled_acceptance_counts_the_children_tried_on_the_accepted_path():
    """Root children 1, 2 (ranks 0, 1), node 1's child 3. Path root -> 2: child 1 was tried and
    rejected, child 2 tried and accepted; node 3 was never tried (its parent was rejected)."""
    from eagle2.cost import SampledAcceptance

    acc = SampledAcceptance.by_depth(max_depth=2, max_rank=2, weight=1.0)
    before = acc.table().clone()
    assert before[0].tolist() == pytest.approx([0.4, 0.25])
    acc.update([-1, 0, 0, 1], [0, 0, 0, 1], [0, 2])  # rows: depth - 1
    assert acc.tried.tolist() == [[2.0, 2.0], [1.0, 1.0]]
    assert acc.accepted.flatten().tolist() == pytest.approx([0.4, 1.25, 0.4, 0.25])
    acc.update([-1, 0, 1], [0, 0, 1], [0, 1, 2])  # a chain accepted whole
    assert acc.tried.tolist() == [[3.0, 2.0], [2.0, 1.0]]
    assert acc.accepted.flatten().tolist() == pytest.approx([1.4, 1.25, 1.4, 0.25])


def test_a_slow_target_is_measured_with_fewer_repeats_and_says_so(caplog):
    import time

    from eagle2.cost import time_calls

    calls = [0, 0]

    def slow(i):
        def fn():
            calls[i] += 1
            time.sleep(0.05)
        return fn

    with caplog.at_level("WARNING", logger="eagle2"):
        times = time_calls([slow(0), slow(1)], repeats=5, budget_s=0.15)  # warm-up ~0.1 s: one repeat fits
    assert [len(t) for t in times] == [1, 1] and calls == [2, 2]
    assert "measuring this machine's round costs" in caplog.text
    caplog.clear()
    fast = time_calls([lambda: None, lambda: None], repeats=5, budget_s=0.15)
    assert [len(t) for t in fast] == [5, 5] and not caplog.text
