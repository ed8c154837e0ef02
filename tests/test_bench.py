"""`eagle2 bench` and `eagle2 tune` on a tiny random model (real SmolLM2 tokenizer + chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA, make_generator, make_tiny_model

METHODS = ["hf", "pld", "vanilla", "eagle1", "eagle2"]


@pytest.fixture()
def questions(tmp_path):
    """Two questions (one two-turn), in FastChat format."""
    path = tmp_path / "q.jsonl"
    qs = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku about the sea.", "Now make it rhyme."]},
          {"question_id": 2, "category": "math", "turns": ["What is 12 * 7?"]}]
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return path


def test_bench_tiny_all_methods(tiny_chat_generator, questions, tmp_path, monkeypatch):
    from eagle2.bench import FIELDS, load_questions, run_bench

    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path / "cache"))  # no tune file: the sweep runs
    qs = load_questions(questions)
    out = tmp_path / "out"
    r = run_bench(tiny_chat_generator, qs, METHODS, out_dir=out, max_new_tokens=12, temperature=0.0, turns=2,
                  sweep=[4, 8], progress=False)
    for f in ("results.json", "results.md", "answers.jsonl", "speedup_per_category.png", "accept_length_hist.png",
              "draft_calibration.png", "tokens_per_s_vs_total_tokens.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"].keys() == set(METHODS)
    for m in METHODS:
        s = saved["methods"][m]
        assert set(FIELDS) <= s.keys()
        assert s["new_tokens"] > 0 and s["seconds"] > 0 and s["tokens_per_s"] > 0
        assert s["speedup_vs_hf"] is not None and s["speedup_vs_vanilla"] is not None
        assert s["prompts"] == 3  # 2 turns + 1 turn
    assert saved["methods"]["hf"]["speedup_vs_hf"] == 1.0
    assert saved["methods"]["vanilla"]["mean_accept_len"] == 1.0
    assert saved["methods"]["eagle2"]["mean_accept_len"] >= 1.0
    assert set(saved["per_category"]) == {"writing", "math"}
    for cat in saved["per_category"].values():
        assert set(cat) == set(METHODS) and all(set(FIELDS) <= v.keys() for v in cat.values())
    # exact at T = 0 (fp32): every method reproduces transformers' greedy output token for token
    assert saved["greedy_reference"] == "hf"
    assert saved["greedy_identical"] == {m: 1.0 for m in METHODS if m != "hf"}
    assert saved["greedy_identical_vanilla"] == {m: 1.0 for m in METHODS if m != "vanilla"}
    assert {"cpu", "torch", "transformers", "torch_threads"} <= saved["machine"].keys()
    assert saved["dtype"] == "float32"
    assert {"total_tokens", "depth", "tree_top_k", "adaptive"} <= set(saved["tree"])
    t = saved["methods"]["eagle2"]["tree_per_round"]  # what the cost-aware rounds verified
    assert t["rounds"] == sum(t["size_hist"].values()) and 1 <= t["size_mean"] <= saved["tree"]["max_nodes"]
    assert t["expected_accept_mean"] is not None and t["realised_accept_mean"] is not None
    assert [p["total_tokens"] for p in saved["total_tokens_curve"]["points"]] == [4, 8]
    assert saved["total_tokens_curve"]["vanilla_tokens_per_s"] > 0
    assert r["methods"]["eagle2"]["tokens_per_s"] == saved["methods"]["eagle2"]["tokens_per_s"]
    assert "| eagle2 |" in (out / "results.md").read_text() and "identical to vanilla" in (out / "results.md").read_text()
    prof = saved["methods"]["eagle2"]["round_profile_ms"]
    assert prof["rounds"] > 0 and prof["verify"] > 0 and prof["draft"] > 0
    assert abs(prof["draft"] + prof["verify"] + prof["other"] - prof["total"]) < 0.05
    rates = saved["methods"]["eagle2"]["accept_rate_per_depth"]
    assert rates and all(0 <= x <= 1 for x in rates)
    assert "round_profile_ms" not in saved["methods"]["hf"]
    assert saved["backend"]["target"] in ("fast", "transformers") and "commit" in saved["machine"]
    # results.json is the source of truth: the page and plots regenerate from it alone
    page = (out / "results.md").read_text()
    for f in ("results.md", "accept_length_hist.png", "speedup_per_category.png"):
        (out / f).unlink()
    from eagle2.cli import main

    assert main(["bench", "--report", str(out), "--summary", str(tmp_path / "docs" / "summary.md"),
                 "--title", "tiny"]) == 0
    assert (out / "results.md").read_text() == page
    assert (out / "accept_length_hist.png").stat().st_size > 0 and (out / "speedup_per_category.png").is_file()
    summary = (tmp_path / "docs" / "summary.md").read_text()
    assert summary.startswith("# tiny") and "| out (T=0, 3 prompts) | eagle2 |" in summary
    assert "(../out/results.md)" in summary
    assert main(["bench", "--report", str(out), "--no-plots"]) == 0  # a lean page: no PNGs, no links to them
    assert not list(out.glob("*.png")) and "## Plots" not in (out / "results.md").read_text()
    assert "| eagle2 |" in (out / "results.md").read_text()


def test_bench_cli_user_errors(tmp_path, questions, capsys):
    from eagle2.cli import main

    assert main(["bench", "--questions", str(questions), "--methods", "hf,magic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--questions", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["bench", "--questions", str(questions), "--methods", "vanilla,eagle2@b"]) == 2
    assert "needs --compare-head b=DIR" in capsys.readouterr().err
    assert main(["bench", "--questions", str(questions), "--compare-head", f"b={tmp_path / 'nope'}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["bench", "--questions", str(questions), "--categories", "poetry"]) == 2
    assert "unknown category" in capsys.readouterr().err
    assert main(["bench", "--report", str(tmp_path)]) == 2  # no results.json there
    assert "no results.json" in capsys.readouterr().err
    assert main(["bench", "--summary", str(tmp_path / "s.md")]) == 2
    assert "--summary needs --report" in capsys.readouterr().err
    assert main(["bench", "--no-plots"]) == 2
    assert "--no-plots needs --report" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    for shape in ("{}", "[1]", '{"methods": 3}', '{"methods": {}}'):  # valid JSON, not a bench result
        (tmp_path / "r" / "results.json").write_text(shape)
        assert main(["bench", "--report", str(tmp_path / "r")]) == 2
        assert "is not an eagle2 bench result" in capsys.readouterr().err
    assert main(["bench", "--report", str(tmp_path / "r"), "--summary", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["bench", "--questions", str(questions), "--out", str(questions)]) == 2  # before the model loads
    assert "is a file" in capsys.readouterr().err
    assert main(["tune", "--total-tokens", "8,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    # all of these before the model loads (the test has none to load)
    for argv, says in (
            (["--out", "/proc/eagle2-nope"], "cannot create this directory"),
            (["--seed", str(2**64 - 1), "--temperature", "1"], "seed must be an integer in"),
            (["--categories", ","], "names no category"),
            (["--compare-head", f"x={tmp_path}"], "no config.json there"),
            (["--methods", "eagle2:16x4x8,eagle2:16x04x8"], "listed twice")):
        assert main(["bench", "--questions", str(questions), *argv]) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert main(["bench", "--report", str(tmp_path / "r"), "--limit", "3"]) == 2
    assert "--limit does not apply" in capsys.readouterr().err
    assert main(["bench", "--report", str(tmp_path / "r"), "--title", "t"]) == 2
    assert "--title needs --summary" in capsys.readouterr().err
    assert main(["tune", "--limit", "50"]) == 2
    assert "built-in dev prompts" in capsys.readouterr().err


def test_accept_rate_per_depth_and_round_profile():
    from eagle2.bench import Answer, accept_rate_per_depth, round_profile

    # a round that stopped at an accepted leaf drafted nothing deeper: it does not count as a rejection
    assert accept_rate_per_depth([(0, True), (1, True), (1, False), (3, False)]) == [0.75, 0.5, 1.0]
    assert accept_rate_per_depth([(0, False), (2, True)]) == [1.0, 1.0, 0.0]
    a = Answer([1] * 10, "", 1.0, forwards=5, phases=dict(prefill=0.2, draft=0.3, verify=0.4))
    p = round_profile([a])
    assert p["rounds"] == 4 and p["draft"] == 75.0 and p["verify"] == 100.0 and p["other"] == 25.0
    assert p["total"] == 200.0 and p["prefill_per_prompt"] == 200.0


def test_load_questions_real_files():
    from eagle2.bench import load_questions

    path = DATA / "eval" / "mt_bench_question.jsonl"
    if not path.exists():
        pytest.skip("shared eval data not present")
    qs = load_questions(path, limit=3, categories="coding,math")
    assert len(qs) == 3 and {q["category"] for q in qs} <= {"coding", "math"}
    assert all(len(q["turns"]) == 2 for q in qs)
    spread = load_questions(path, limit=8)  # a small limit is spread over the categories, not a prefix
    assert len({q["category"] for q in spread}) == 8


def test_tune_writes_config_that_load_uses(smol_tokenizer, tmp_path, monkeypatch):
    from eagle2.api import Eagle2Generator, load_tuned, tuned_path
    from eagle2.tune import run_tune

    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer), eos_token_id=2, max_position_embeddings=1024)
    gen = make_generator(model, smol_tokenizer, model_key="tiny-tune-test")
    r = run_tune(gen, ["Say hello.", "Count to five."], out_dir=tmp_path / "plots", max_new_tokens=8,
                 total_tokens_grid=[4, 8], depth_grid=[2, 3], top_k_grid=[2, 3], query_lens=[1, 4, 16], cached=32,
                 repeats=1, progress=False, verbose=False)
    path = tuned_path("tiny-tune-test")
    assert path.is_file() and r["path"] == str(path)
    saved = json.loads(path.read_text())
    best = max(saved["candidates"], key=lambda c: c["tokens_per_s"])
    assert (saved["total_tokens"], saved["depth"], saved["tree_top_k"]) == \
        (best["total_tokens"], best["depth"], best["tree_top_k"])
    assert len(saved["candidates"]) == 8
    # the cost-aware tree raced at each width of the grid; the fastest is saved, each with its own cost probe
    widths = {c["tree_top_k"]: c["tokens_per_s"] for c in saved["adaptive_candidates"]}
    assert set(widths) == {2, 3} and widths[saved["adaptive_top_k"]] >= 0.98 * max(widths.values())
    assert len(list((tmp_path / "cache" / "cost").glob("*.json"))) == 2
    assert [p["query_len"] for p in saved["forward_curve"]["points"]] == [1, 4, 16]
    assert all(p["ms"] > 0 for p in saved["forward_curve"]["points"])
    assert {"cpu", "torch"} <= saved["machine"].keys()
    assert (tmp_path / "plots" / "tiny-tune-test.forward_curve.png").is_file()
    assert (tmp_path / "plots" / "tiny-tune-test.tokens_per_s.png").is_file()
    # a new generator for the same model key picks the tuned tree up; an explicit tree still wins
    tree = load_tuned("tiny-tune-test")
    assert (tree.total_tokens, tree.depth, tree.top_k) == (saved["total_tokens"], saved["depth"], saved["tree_top_k"])
    gen2 = make_generator(model, smol_tokenizer, model_key="tiny-tune-test")
    assert (gen2.tree.total_tokens, gen2.tree.depth, gen2.tree.top_k) == (tree.total_tokens, tree.depth, tree.top_k)
    assert gen2.tree.frontier == tree.frontier == saved["adaptive_top_k"] and gen2.tree.width == saved["adaptive_top_k"]
    assert 1 <= gen2.generate("Say hello.", max_new_tokens=4).stats.new_tokens <= 4
    from eagle2.config import TreeConfig

    gen3 = Eagle2Generator(model, smol_tokenizer, gen.head, model_key="tiny-tune-test", tree=TreeConfig(total_tokens=5))
    assert gen3.tree.total_tokens == 5


def test_an_interrupted_bench_keeps_the_finished_questions(tiny_chat_generator, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or a failing question) midway: the questions every method finished are written,
    marked partial; nothing is written when none was finished."""
    from eagle2.bench import Stopped, run_bench
    from eagle2.bench import runners as runners_mod

    qs = [{"question_id": i, "category": "c", "turns": [f"Say {i}."]} for i in range(3)]
    real, calls = runners_mod._EngineRunner.__call__, [0]

    def flaky(self, *a):
        calls[0] += 1
        if calls[0] == 2 + 2 * 2 + 1:  # 2 warm-ups, questions 0 and 1 (two methods each), then question 2
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(runners_mod._EngineRunner, "__call__", flaky)
    with pytest.raises(Stopped) as e:
        run_bench(tiny_chat_generator, qs, ["vanilla", "eagle2"], out_dir=tmp_path / "o", max_new_tokens=4, turns=1,
                  sweep=None, progress=False)
    assert e.value.done == 2 and isinstance(e.value.__cause__, KeyboardInterrupt)
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["partial"] == dict(questions_done=2, questions_total=3, reason="interrupted")
    assert saved["n_questions"] == 2 and saved["methods"]["eagle2"]["prompts"] == 2
    assert "Partial run" in (tmp_path / "o" / "results.md").read_text()
    calls[0] = 0

    def fails_after_warmup(self, *a):
        calls[0] += 1
        if calls[0] > 1:
            raise ValueError("x")
        return real(self, *a)

    monkeypatch.setattr(runners_mod._EngineRunner, "__call__", fails_after_warmup)
    with pytest.raises(ValueError, match="^x$"):  # nothing finished: the error itself, no results
        run_bench(tiny_chat_generator, qs, ["vanilla"], out_dir=tmp_path / "p", max_new_tokens=4, turns=1, sweep=None,
                  progress=False)
    assert not (tmp_path / "p" / "results.json").exists()


def test_summary_page_keeps_runs_of_the_same_name(tmp_path):
    from eagle2.bench import summary_page

    src = Path(__file__).resolve().parents[1] / "docs" / "results" / "2026-12-06ab-epyc-zen4" / "mtbench-t0"
    for parent in ("a", "b"):
        (tmp_path / parent / "x").mkdir(parents=True)
        (tmp_path / parent / "x" / "results.json").write_text((src / "results.json").read_text())
    page = summary_page([tmp_path / "a" / "x", tmp_path / "b" / "x"], tmp_path / "s.md", plots=False)
    assert "a/x/results.md" in page and "b/x/results.md" in page
    assert page.count("| eagle2 |") == 2
    assert page.count("torch ISA AVX512, bfloat16,") == 2  # each run names its own ISA and dtype
    bad = json.loads((tmp_path / "a" / "x" / "results.json").read_text())
    (tmp_path / "a" / "x" / "results.json").write_text(json.dumps({**bad, "temperature": "1"}))
    with pytest.raises(ValueError, match="a/x/results.json is not an eagle2 bench result"):
        summary_page([tmp_path / "a" / "x"], tmp_path / "s.md", plots=False)


def test_fixed_shape_methods(tiny_chat_generator, questions, tmp_path):
    from eagle2.bench import fixed_shape, load_questions, parse_methods, run_bench

    assert fixed_shape("eagle2:16x4x8") == dict(total_tokens=16, depth=4, tree_top_k=8)
    assert fixed_shape("eagle2:fixed") == {} and fixed_shape("eagle2") is None and fixed_shape("eagle2:1x4x8") is None
    with pytest.raises(ValueError, match="eagle2:NxDxK"):
        parse_methods("vanilla,eagle2:16x4")
    r = run_bench(tiny_chat_generator, load_questions(questions)[:1], ["eagle2", "eagle2:6x3x2"], out_dir=tmp_path, max_new_tokens=12,
                  turns=1, sweep=None, progress=False)
    fixed = r["methods"]["eagle2:6x3x2"]["tree_per_round"]
    assert set(fixed["size_hist"]) <= {"1", "2", "3", "4", "5", "6"} and fixed["depth_mean"] <= 3


def test_gguf_of_knows_builtin_models_and_files(tiny_chat_generator, tmp_path):
    """llama.cpp's runner finds the GGUF a model came from (and nothing for other models)."""
    from types import SimpleNamespace

    from eagle2.bench import gguf_of

    assert gguf_of(tiny_chat_generator) is None
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert gguf_of(SimpleNamespace(model_key=str(f))) == f


def test_compare_heads_share_the_cost_model(tiny_chat_generator, questions, tmp_path):
    """eagle2@NAME runs another head on the same model; a head of the same shape sizes its trees with the
    generator's own cost model, and its output stays exact."""
    from eagle2.bench import load_questions, parse_heads, parse_methods, run_bench
    from eagle2.bench.inputs import with_heads

    head_dir = tiny_chat_generator.head.save(tmp_path / "other")
    other = tiny_chat_generator.with_head(head_dir)
    assert other.cost_model() is tiny_chat_generator.cost_model() and other.target is not tiny_chat_generator.target
    heads = parse_heads([f"other={head_dir}"])
    assert with_heads(parse_methods("vanilla,eagle2"), heads) == ["vanilla", "eagle2", "eagle2@other"]
    r = run_bench(tiny_chat_generator, load_questions(questions), ["vanilla", "eagle2"], out_dir=tmp_path / "out",
                  max_new_tokens=12, turns=2, sweep=None, progress=False, heads=heads)
    assert r["methods"]["eagle2@other"]["prompts"] == 3
    assert r["greedy_identical"]["eagle2@other"] == 1.0
    assert r["heads"] == {"other": dict(path=str(head_dir), shared_cost=True)}
    assert "eagle2@other: " in (tmp_path / "out" / "results.md").read_text()
    for bad, msg in (([f"other{head_dir}"], "NAME=DIR"), (["a b=x"], "head name"),
                     ([f"x={tmp_path / 'nope'}"], "not found"), ([f"x={head_dir}", f"x={head_dir}"], "twice")):
        with pytest.raises(ValueError, match=msg):
            parse_heads(bad)
    with pytest.raises(ValueError, match="--compare-head gone=DIR"):
        with_heads(["eagle2@gone"], heads)


def test_a_head_of_another_shape_keeps_the_verify_curve_and_probes_its_drafting(tiny_chat_generator, tmp_path,
                                                                                 monkeypatch):
    """A wider head drafts at another cost but verifies on the same target: with_head keeps the target's
    verify curve and replaces only the draft costs, so an A/B of the two heads rests on one target probe."""
    from dataclasses import replace

    from eagle2.draft_head import init_head

    gen = tiny_chat_generator
    mine = gen.cost_model()
    probed = []

    def fake_probe(drafter, top_k, repeats=4):  # the tiny head's real costs are noise-sized: fix them
        probed.append(drafter)
        return 0.75, 0.125, 2.5

    monkeypatch.setattr(type(gen.drafter), "probe_ms", fake_probe)
    wide = init_head(replace(gen.head.config, intermediate_size=4 * gen.head.config.intermediate_size))
    other = gen.with_head(wide.save(tmp_path / "wide"))
    theirs = other.cost_model()
    assert theirs is not mine and probed == [other.drafter]
    assert (theirs.draft_level_ms, theirs.draft_row_ms, theirs.round_fixed_ms) == (0.75, 0.125, 2.5)
    for field in ("query_lens", "verify_ms_short", "verify_ms_long", "cached_short", "cached_long"):
        assert getattr(theirs, field) == getattr(mine, field), field


def test_tune_breaks_near_ties_toward_the_narrower_frontier():
    from eagle2.tune import narrowest_near_best

    race = [dict(tree_top_k=2, tokens_per_s=174.9), dict(tree_top_k=4, tokens_per_s=176.9),
            dict(tree_top_k=8, tokens_per_s=177.0)]
    assert narrowest_near_best(race)["tree_top_k"] == 2
    race[0]["tokens_per_s"] = 170.0  # 4% behind: no longer a tie
    assert narrowest_near_best(race)["tree_top_k"] == 4


def test_tune_dry_run_leaves_the_saved_plots_alone(tmp_path):
    """The plots beside a tune file describe that file: a dry run (no --out) writes none there, and a
    plot that cannot be written does not lose the tune file."""
    from eagle2.tune import _write

    result = dict(chosen=dict(total_tokens=4, depth=2, tree_top_k=2), vanilla=dict(tokens_per_s=10.0),
                  forward_curve=dict(points=[dict(query_len=1, ms=1.0), dict(query_len=4, ms=2.0)]),
                  candidates=[dict(total_tokens=4, depth=2, tree_top_k=2, tokens_per_s=12.0)], adaptive_top_k=2)
    path = tmp_path / "tune" / "m.json"
    _write(dict(result), path, save=False, out_dir=None, log=print)
    assert not path.parent.exists()
    (tmp_path / "blocked").write_text("a file where the plots' directory would go")
    _write(result, path, save=True, out_dir=tmp_path / "blocked", log=print)
    assert json.loads(path.read_text())["plots"] == {}
