"""The training pipeline: responses -> features -> train -> export, each stage resumable.

Conversations live in the corpus (corpus.py; default ``<repo>/corpus/<model-key>`` for built-in
models, committed, else ``<run-dir>/corpus``): stage 1 adds the answers it lacks, stages 2-4 read
it. Which conversations train: the whole corpus, or with ``--prompts`` / ``--limit`` only those of
the chosen prompts; never the held-out dev prompts. ``--fixed-responses`` (reference answers, not
the target's) use ``<run-dir>/responses.jsonl`` instead. ``extra_corpora`` are read-only corpora
trained on beside it, e.g. the target's answers sampled at T = 1 (``corpus/<model-key>-t1``): the head
then also learns the contexts sampling leads it into, which greedy answers never visit. Their records
are named ``<record id>@<corpus directory name>``, so a prompt answered in both trains twice.

Run directory layout (default ``$EAGLE2_CACHE/runs/<model-key>``, outside git):
``features/shard-*.safetensors`` (stage 2), ``ckpt.pt``, ``best/``, ``last/``, ``metrics.jsonl``
(stage 3), ``stats.json`` (wall time per stage, counts), and the exported head (stage 4; default
``<run-dir>/head``). The loss is taken over the draft vocabulary the head ships (``draft_vocab``
most frequent answer tokens of the training conversations). This module only sequences the stages
and chooses prompts; each stage's work lives in its own module.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import Backend
from ..machine import data_dir
from .corpus import Corpus, default_corpus_dir
from .data import MIX, Prompt, data_license, default_mix, read_fixed, read_prompts, unique_prompts
from .shards import covered_ids, load_shards, window_meta

log = logging.getLogger("eagle2")

STAGES = ("responses", "features", "train", "export")


def default_run_dir(model_key: str) -> Path:
    from ..models import cache_dir, file_name

    return cache_dir() / "runs" / file_name(model_key.strip("/").replace("/", "--"))


@dataclass
class PipelineOptions:
    run_dir: Path
    stages: tuple = STAGES
    prompts: tuple = ()  # prompt files; empty: the default mix from data_dir
    data_dir: Path | None = None
    limit: int | None = None  # training prompts used (a fair prefix of the shuffled list)
    dev_prompts: int = 8  # held out from the end of the prompt list for acceptance evaluation
    fixed: bool = False  # reference answers from the prompt files instead of the target's own
    max_new_tokens: int = 256
    max_prompt_tokens: int = 320
    temperature: float = 0.0  # responses: 0 = the target's greedy answers, > 0 = sampled ones
    gen_batch_size: int = 64
    shard_size: int = 64
    context: int | None = None  # prompt tokens before each answer the head trains on (None: the whole prompt)
    max_len: int = 1024  # longest training window; longer ones drop their oldest prompt tokens
    corpus: Path | None = None  # corpus directory (default: default_corpus_dir(model_arg, run_dir))
    extra_corpora: tuple = ()  # read-only corpora (directories) trained on beside ``corpus``
    feature_batch_size: int = 8
    stream: bool = False  # compute features on the fly in the training loop (no feature cache)
    out: Path | None = None  # exported head directory (default run_dir/head)
    mtbench: int = 0  # prompts per MT-bench category measured at export (0: skip)
    draft_vocab: int = 8192  # FR-Spec draft vocabulary shipped with the head (0: none)
    vocab_loss: bool = True  # the loss over the draft vocabulary only (False: over the full vocabulary)
    mtbench_max_new_tokens: int = 128
    arch: str = "eagle2"  # head type: "eagle2" (EAGLE-1/2, trainer.py) or "eagle3" (eagle3.py)
    max_minutes: float | None = None  # per stage: stop (resumable) after this long
    progress: bool = True
    base_model: str = ""
    model_arg: str = ""
    train_cfg: object = None  # TrainConfig
    backend: Backend | None = None  # forward and fast paths of responses / features (None: from the environment)
    extra: dict = field(default_factory=dict)


def _stats(run_dir: Path) -> dict:
    p = run_dir / "stats.json"
    try:
        return json.loads(p.read_text()) if p.exists() else {"stage_seconds": {}}
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); delete it (it holds the stage times of the model card)") from None


def _save_stats(run_dir: Path, stats: dict) -> None:
    tmp = run_dir / "stats.json.tmp"  # then renamed: a stop while writing never leaves half a file
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, run_dir / "stats.json")


def _add_time(run_dir: Path, stage: str, seconds: float, **kw) -> None:
    s = _stats(run_dir)
    s["stage_seconds"][stage] = s["stage_seconds"].get(stage, 0.0) + seconds
    s.update(kw)
    _save_stats(run_dir, s)


def _claim_run_dir(run_dir: Path, model: str) -> None:
    """Record the target in stats.json, and refuse a run directory of another target: its feature
    shards and checkpoint are that model's (other token ids, another hidden size)."""
    st = _stats(run_dir)
    if st.get("model") and model and st["model"] != model:
        raise ValueError(f"the run directory {run_dir} holds a run of {st['model']}, not {model}; pass another "
                         "--run-dir")
    if model and not st.get("model"):
        _save_stats(run_dir, {**st, "model": model})


def choose_prompts(opts: PipelineOptions) -> tuple[list[Prompt], list[Prompt], list[str]]:
    """(training prompts, dev prompts, data sources). Dev prompts are the last ``dev_prompts`` of the
    full list and never trained on; ``limit`` takes a prefix of the rest."""
    sources = []
    if opts.prompts:
        allp: list[Prompt] = []
        stems: dict[str, str] = {}
        for f in opts.prompts:
            if not Path(f).is_file():
                raise ValueError(f"prompt file not found: {f}")
            if Path(f).stem in stems:  # the stem is the source part of every conversation id
                raise ValueError(f"two prompt files named {Path(f).stem!r} ({stems[Path(f).stem]} and {f}) would share "
                                 "conversation ids in the corpus; give each file once, under its own name")
            stems[Path(f).stem] = str(f)
            ps = read_prompts(f)
            if not ps:
                raise ValueError(f"prompt file {f} holds no usable prompt (a user turn with text); see --help for "
                                 "the formats")
            allp.extend(ps)
            sources.append(data_license(Path(f).name))
        allp = unique_prompts(allp)  # each file is deduplicated as it is read; across files here
        # Shuffled together, as the default mix is, so that --limit N and the held-out dev prompts are a fair
        # sample of every file given rather than the head of the first one.
        random.Random(0).shuffle(allp)
    else:
        d = opts.data_dir or data_dir()
        if not (d / "train").is_dir():
            raise ValueError(f"no training prompts: {d / 'train'} does not exist; pass --prompts FILE or --data-dir")
        allp = default_mix(d)
        sources = [data_license(n) for n, _ in MIX if (d / "train" / n).exists()]
    if len(allp) < 2:
        raise ValueError("need at least 2 prompts")
    n_dev = min(opts.dev_prompts, len(allp) // 4)
    dev = allp[len(allp) - n_dev:] if n_dev else []
    train = allp[: len(allp) - n_dev]
    if opts.limit:
        train = train[: opts.limit]
    return train, dev, sources


def _training_records(opts: PipelineOptions, corpus: Corpus | None, extras: list[Corpus], train_p: list[Prompt],
                      dev_ids: set[str]) -> tuple[list[dict], dict | None, list[dict]]:
    """The conversations the head trains on, one record per answered turn (see the module
    docstring); the corpus counts of those conversations (None for --fixed-responses); and per
    extra corpus its directory, temperature and counts."""
    from .responses import read_responses

    if corpus is None:  # --fixed-responses
        return [r for r in read_responses(Path(opts.run_dir) / "responses.jsonl") if r["id"] not in dev_ids], None, []
    only = {p.id for p in train_p} if (opts.prompts or opts.limit) else None
    records, shown = corpus.records(exclude=dev_ids, only=only), []
    for c in extras:
        records += [{**r, "id": f"{r['id']}@{c.path.name}"} for r in c.records(exclude=dev_ids, only=only)]
        shown.append(dict(path=_shown_path(c.path), temperatures=c.temperatures(),
                          total=c.summary(exclude=dev_ids, only=only)["total"]))
    return records, corpus.summary(exclude=dev_ids, only=only), shown


def _open_extras(opts: PipelineOptions, corpus: Corpus | None) -> list[Corpus]:
    """The extra corpora, each checked to exist, to differ from the main one and to hold this model's answers."""
    if opts.extra_corpora and corpus is None:
        raise ValueError("--extra-corpus trains on self-distilled answers; it cannot go with --fixed-responses")
    dirs = [Path(d) for d in opts.extra_corpora]
    for i, d in enumerate(dirs):
        if not (d / "manifest.json").is_file():
            raise ValueError(f"--extra-corpus {d}: not a corpus (no manifest.json there)")
        if d.resolve() == corpus.path.resolve() or d.name in {e.name for e in dirs[:i]}:
            raise ValueError(f"--extra-corpus {d}: given twice, or the same as --corpus (each corpus once, "
                             "under its own directory name)")
    extras = [Corpus(d) for d in dirs]
    for c in extras:
        c.check_model(opts.model_arg or opts.base_model, None)
    return extras


def _nothing_to_train(run: _Run, responses: dict | None) -> str:
    """Why no conversation is there to train on, and what to do about it."""
    opts = run.opts
    where = f"the corpus {run.corpus.path}" if run.corpus is not None else f"{Path(opts.run_dir) / 'responses.jsonl'}"
    why = [f"no answered turn of the {len(run.train_p)} chosen training prompt(s) is in {where}"]
    if responses and responses.get("skipped_long"):
        why.append(f"{responses['skipped_long']} prompt turn(s) were longer than --max-prompt-tokens "
                   f"{opts.max_prompt_tokens} and were not answered (raise it, or choose other prompts)")
    elif "responses" not in opts.stages:
        why.append("run the responses stage first (--stages responses,features,train,export)")
    return "nothing to train on: " + "; ".join(why)


def _check_token_ids(run: _Run, records: list[dict]) -> None:
    """Every id must be a token of the target: a corpus or responses file written with another tokenizer
    (a mislabelled import) would otherwise fail deep in the target's embedding, or train on another text."""
    vocab = int(run.model.config.vocab_size)
    for r in records:
        top = max(max(r["prompt_ids"], default=0), max(r["response_ids"], default=0))
        if top >= vocab:
            extra = next((c for c in run.extras if r["id"].endswith("@" + c.path.name)), None)
            where = ("responses.jsonl" if run.corpus is None else
                     f"the corpus {(extra or run.corpus).path}")
            raise ValueError(f"{where} holds token id {top} (in {r['id']}), beyond the target's vocabulary of {vocab}: "
                             "it was written with another tokenizer; pass this model's --corpus")


def _loss_vocab(opts: PipelineOptions, records: list[dict], vocab_size: int):
    """The draft vocabulary the head ships (None: none); the loss is computed over it when ``vocab_loss``."""
    from .export import draft_vocabulary

    return draft_vocabulary(records, vocab_size, opts.draft_vocab) if opts.draft_vocab and records else None


def _check_arch(opts: PipelineOptions) -> bool:
    """Whether the run trains an EAGLE-3 head; refuses an unknown head type."""
    if opts.arch not in ("eagle2", "eagle3"):
        raise ValueError(f"unknown head type {opts.arch!r}; use eagle2 (EAGLE-1/2) or eagle3")
    return opts.arch == "eagle3"


def _shown_path(p: Path) -> str:
    """A corpus path as the model card shows it: relative to the repo when inside it."""
    from .corpus import repo_corpus_root

    try:
        return str(Path(p).resolve().relative_to(repo_corpus_root().parent))
    except ValueError:
        return str(p)


@dataclass
class _Run:
    """What every stage of one run reads, decided once at its start (``_start``)."""

    model: object
    tokenizer: object
    opts: PipelineOptions
    dir: Path
    eagle3: bool  # the head type is EAGLE-3 (its own features and training directory)
    feat_dir: Path
    train_dir: Path
    backend: Backend  # the target forward and fast paths of the responses and features stages
    train_p: list[Prompt]
    dev_ids: set[str]
    dev_inputs: list[list[int]]  # the dev prompts' chat ids, for the trainer's acceptance evaluation
    corpus: Corpus | None  # None: --fixed-responses
    extras: list  # Corpus: read-only corpora trained on beside ``corpus``
    sources: list  # the data sources the model card names
    max_seconds: float | None  # per stage

    def data(self) -> Path:
        return self.opts.data_dir or data_dir()


def run_pipeline(model, tokenizer, opts: PipelineOptions) -> dict:
    """Run the requested stages in order; returns a summary dict (also merged into stats.json)."""
    run = _start(model, tokenizer, opts)
    summary: dict = {}
    if "responses" in opts.stages:
        summary["responses"] = _responses_stage(run)
    if run.corpus is not None:  # the responses stage checked it already; the other stages read it
        run.corpus.check_model(opts.model_arg or opts.base_model, None)
    records, trained_on, extra_on = _training_records(opts, run.corpus, run.extras, run.train_p, run.dev_ids)
    if not records and {"features", "train"} & set(opts.stages):
        raise ValueError(_nothing_to_train(run, summary.get("responses")))
    _check_token_ids(run, records)
    if trained_on is not None:
        run.sources = list(dict.fromkeys(data_license(s) for s in trained_on["sources"])) or run.sources  # two ShareGPT files, one line
    if "features" in opts.stages and not opts.stream:
        summary["features"] = _features_stage(run, records)
    vocab = _loss_vocab(opts, records, int(model.config.vocab_size)) if {"train", "export"} & set(opts.stages) else None
    if "train" in opts.stages:
        summary["train"] = _train_stage(run, records, trained_on, extra_on, vocab)
        if summary["train"]["status"] == "interrupted":  # the user asked to stop: no export after it
            return summary
    if "export" in opts.stages:
        summary["export"] = _export_stage(run, vocab)
    return summary


def _start(model, tokenizer, opts: PipelineOptions) -> _Run:
    """Check the options, choose the prompts, open the corpus: the run every stage reads."""
    from .responses import encode_chat

    for s in opts.stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    run = Path(opts.run_dir)
    e3 = _check_arch(opts)
    run.mkdir(parents=True, exist_ok=True)
    _claim_run_dir(run, opts.model_arg or opts.base_model)
    if e3:  # EAGLE-3: its own feature shards (three layers + final) and training directory
        from . import eagle3
        feat_dir, train_dir = eagle3.feature_dir(run, model), run / "train-eagle3"
    else:
        feat_dir, train_dir = run / "features", run / "train"
    train_p, dev_p, sources = choose_prompts(opts)
    dev_inputs = [ids for ids in (encode_chat(tokenizer, p.messages) for p in dev_p)
                  if len(ids) <= opts.max_prompt_tokens]
    corpus = None if opts.fixed else Corpus(opts.corpus or default_corpus_dir(opts.model_arg, run))
    extras = _open_extras(opts, corpus)
    return _Run(model=model, tokenizer=tokenizer, opts=opts, dir=run, eagle3=e3, feat_dir=feat_dir, train_dir=train_dir,
                backend=Backend.of(opts.backend), train_p=train_p, dev_ids={p.id for p in dev_p}, dev_inputs=dev_inputs,
                corpus=corpus, extras=extras, sources=sources, max_seconds=opts.max_minutes * 60 if opts.max_minutes else None)


def _responses_stage(run: _Run) -> dict:
    """Stage 1: the target's answers into the corpus (or --fixed-responses' reference answers)."""
    from .responses import generate_responses

    opts, t0 = run.opts, time.time()
    if opts.fixed:
        r = _fixed_responses(run)
    else:
        r = generate_responses(run.model, run.tokenizer, run.train_p, run.corpus, max_new_tokens=opts.max_new_tokens,
                               max_prompt_tokens=opts.max_prompt_tokens, batch_size=opts.gen_batch_size,
                               temperature=opts.temperature, progress=opts.progress, max_seconds=run.max_seconds,
                               backend=run.backend, features_dir=None if opts.stream or run.eagle3 else run.feat_dir,
                               context=opts.context, max_len=opts.max_len,
                               model_name=opts.model_arg or opts.base_model)
    _add_time(run.dir, "responses", time.time() - t0, data=run.sources, responses=r["done"], fixed_responses=opts.fixed)
    return r


def _fixed_responses(run: _Run) -> dict:
    """--fixed-responses: the prompt files' reference answers as ``<run-dir>/responses.jsonl``."""
    from .responses import fixed_responses

    opts = run.opts
    files = opts.prompts or [run.data() / "train" / n for n in ("gsm8k_train.jsonl", "gpteacher_codegen_instruct.json")]
    recs = [r for f in files for r in read_fixed(f)]
    keep = {p.id for p in run.train_p} if opts.prompts else None
    recs = [r for r in recs if r[0].id not in run.dev_ids and (keep is None or r[0].id in keep)]
    if opts.limit:
        recs = recs[: opts.limit]
    if not recs:
        raise ValueError("--fixed-responses: none of the prompt files has reference answers")
    eos = getattr(run.tokenizer, "eos_token_id", None)
    return fixed_responses(run.tokenizer, [(p, a) for p, a in recs], run.dir / "responses.jsonl",
                           max_prompt_tokens=opts.max_prompt_tokens, eos_id=eos)


def _features_stage(run: _Run, records: list[dict]) -> dict:
    """Stage 2: feature shards for the records the responses stage did not capture."""
    from .features import build_features, last_hidden

    opts, t0 = run.opts, time.time()
    if run.eagle3:
        from . import eagle3
        features = eagle3.features_fn(run.model)
    else:
        features = last_hidden(run.model, run.backend)
    r = build_features(run.model, records, run.feat_dir, shard_size=opts.shard_size, context=opts.context,
                       max_len=opts.max_len, batch_size=opts.feature_batch_size, progress=opts.progress,
                       max_seconds=run.max_seconds, features=features)
    _add_time(run.dir, "features", time.time() - t0)
    return r


def _check_features(feat_dir: Path, records: list[dict], covered: set[str]) -> None:
    """Every record to train on must have its features: a shard lost or damaged since the features
    stage would otherwise shrink the training set silently, under a model card that counts it all."""
    missing = [r["id"] for r in records if r["id"] not in covered]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(records)} conversations to train on have no features in "
                         f"{feat_dir} (e.g. {missing[0]}; a shard was lost or damaged): run the features stage "
                         "too (--stages features,train,...) to compute them again")


def _train_stage(run: _Run, records: list[dict], trained_on: dict | None, extra_on: list[dict], vocab) -> dict:
    """Stage 3: train the head on the records' examples (shards, or streamed)."""
    from dataclasses import replace

    from .features import StreamedExamples
    from .trainer import TrainConfig, Trainer

    opts, t0 = run.opts, time.time()
    if opts.stream:  # EAGLE-3: its three layers + final, left on the target's device (a GPU: no host copies)
        from . import eagle3
        feats = eagle3.features_fn(run.model, on_device=True) if run.eagle3 else None
        examples = StreamedExamples(run.model, records, context=opts.context, max_len=opts.max_len, backend=run.backend,
                                    features=feats)
    else:
        window = window_meta(opts.context, opts.max_len)
        _check_features(run.feat_dir, records, covered_ids(run.feat_dir, window))
        examples = load_shards(run.feat_dir, window=window, only={r["id"] for r in records})
    cfg = opts.train_cfg or TrainConfig()
    if opts.max_minutes and cfg.max_minutes is None:
        cfg = replace(cfg, max_minutes=opts.max_minutes)
    if run.eagle3:
        from .eagle3 import Eagle3Trainer as trainer
    else:
        trainer = Trainer
    tr = trainer(run.model, run.tokenizer, examples, run.train_dir, cfg, dev_prompts=run.dev_inputs,
                 progress=opts.progress, vocab=vocab if opts.vocab_loss else None)
    res = tr.train()
    corpus_total = run.corpus.summary()["total"] if run.corpus is not None else None
    _add_time(run.dir, "train", time.time() - t0, examples=len(tr.lengths), tokens_seen=res.tokens_seen,
              data=run.sources, corpus=trained_on, corpus_total=corpus_total, corpus_extra=extra_on,
              loss_vocab=int(vocab.numel()) if vocab is not None and opts.vocab_loss else None,
              train_status=res.status, best_tau=res.best_tau, best_step=res.best_step, steps=res.step,
              hyperparameters={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()})
    return dict(status=res.status, step=res.step, tokens_seen=res.tokens_seen, best_tau=res.best_tau,
                best_step=res.best_step)


def _export_stage(run: _Run, vocab) -> dict:
    """Stage 4: the best (else last) checkpoint as a head directory with its model card."""
    from ..draft_head import DRAFT_VOCAB_FILE
    from .export import export_head

    t0 = time.time()
    src = run.train_dir / "best"
    if not (src / "config.json").exists():
        src = run.train_dir / "last"
    if not (src / "config.json").exists():
        raise ValueError(f"nothing to export: no trained head in {run.train_dir} (run the train stage)")
    mt = _export_mtbench(run, src) if run.opts.mtbench else None
    _add_time(run.dir, "export", time.time() - t0, **({"mtbench": mt} if mt else {}))
    st = _stats(run.dir)
    out = Path(run.opts.out) if run.opts.out else run.dir / "head"
    info = _model_card(run, st)
    if run.eagle3:  # the official EAGLE-3 layout; the draft vocabulary is the head's own d2t / t2d
        from .eagle3 import export_eagle3

        export_eagle3(src, out, {**info, "steps": st.get("steps")}, int(run.model.config.num_hidden_layers))
        return dict(out=str(out), mtbench=mt)
    if (src / DRAFT_VOCAB_FILE).exists():  # trained over it: ship exactly that one, even if the corpus grew since
        vocab = None
    elif vocab is not None:
        info["draft_vocab"] = int(vocab.numel())
    export_head(src, out, info, draft_vocab=vocab)
    return dict(out=str(out), mtbench=mt)


def _export_mtbench(run: _Run, src: Path) -> dict:
    """Acceptance of the exported head on ``mtbench`` prompts per MT-bench category (recorded in stats.json)."""
    from ..api import load_head
    from .export import mtbench_acceptance

    opts = run.opts
    q = run.data() / "eval" / "mt_bench_question.jsonl"
    if not q.exists():
        raise ValueError(f"MT-bench questions not found at {q}")
    head = load_head(src).to(next(run.model.parameters()).device)  # EAGLE-1/2 or EAGLE-3, as shipped
    return mtbench_acceptance(run.model, run.tokenizer, head, q, opts.mtbench, opts.mtbench_max_new_tokens,
                              progress=opts.progress)


def _model_card(run: _Run, st: dict) -> dict:
    """What the exported head's model card says about its training (from stats.json)."""
    opts, corpus = run.opts, run.corpus
    return dict(base_model=opts.base_model, model_arg=opts.model_arg, data=st.get("data", run.sources),
                tokens_seen=st.get("tokens_seen"), examples=st.get("examples"),
                hyperparameters=st.get("hyperparameters"), stage_seconds=st.get("stage_seconds"),
                mtbench=st.get("mtbench"), mtbench_max_new_tokens=opts.mtbench_max_new_tokens,
                dev_tau=st.get("best_tau") if (st.get("best_tau") or -1) >= 0 else None,
                corpus=st.get("corpus"), corpus_total=st.get("corpus_total"), corpus_extra=st.get("corpus_extra"),
                corpus_path=_shown_path(corpus.path) if corpus is not None else None,
                loss_vocab=st.get("loss_vocab"))
