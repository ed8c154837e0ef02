"""The public API: ``eagle2.load(...)`` -> ``Eagle2Generator`` with ``generate`` and ``stream``.

This is what the CLI, the server, the benchmark and outside checks call. It resolves the model
and head, validates every argument (``ValueError`` with a one-line message), turns prompts
(token ids, a string or chat messages) into token ids and hands the work to the engine.
"""

from __future__ import annotations

import json
import logging
import numbers
import threading
import warnings
import weakref
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from . import compute, cost, kernels, native
from .compute import ComputeThread
from .config import Backend, DecodeSettings, TreeConfig
from .cost import CostModel
from .draft import make_drafter
from .draft_head import DraftHead, HeadConfig, check_head_fits, init_head
from .eagle3_head import Eagle3Head, check_eagle3_fits, is_eagle3
from .engine import Engine, GenerationResult, RoundEvent, Step, Steps, run_alone
from .fast import half_is_exact, in_force, make_target
from .models import LoadWarning, builtin_head_dir, cache_dir, file_name, load_target
from .target import Target, check_supported
from .templating import chat_ids

log = logging.getLogger("eagle2")
T = TypeVar("T")


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id the model treats as end of sequence (generation config, config, tokenizer)."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return {int(i) for i in ids}


def tuned_path(model_key: str) -> Path:
    return cache_dir() / "tune" / f"{file_name(model_key)}.json"


def load_tuned(model_key: str) -> TreeConfig | None:
    """Tree settings saved by ``eagle2 tune`` for this model on this machine, if any: the fastest
    fixed shape, which explicit fixed-shape calls start from, and the cost-aware tree's fastest
    frontier width (a file from before tune chose it: the fixed shape's)."""
    p = tuned_path(model_key)
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text())
        return TreeConfig(total_tokens=int(d["total_tokens"]), depth=int(d["depth"]), top_k=int(d["tree_top_k"]),
                          adaptive=True, frontier=int(d.get("adaptive_top_k", 0)))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable tune file %s: %s", p, e)
        return None


def _one_sequence(array) -> list:
    """A tensor or array of token ids as a list: 0-D, 1-D or a batch of one row; a batch of several
    rows is refused rather than read as one long prompt."""
    if array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
        raise ValueError(f"prompt must be one sequence of token ids; got an array of shape {tuple(array.shape)}")
    return array.reshape(-1).tolist()


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"prompt is not valid Unicode: a lone surrogate at character {e.start}") from None


_END = object()  # the end of a generation's rounds (next's default)
LOAD_THREAD = "eagle2-load"  # the name of load_off_thread's threads
_loads_lock = threading.Lock()
_loads = 0  # load_off_thread loads still running (loading())


def loading() -> bool:
    """Whether a ``load_off_thread`` load is still running (the CLI then exits at once on Ctrl-C).

    Counted, not read from ``Thread.is_alive()``: on Python < 3.13 a ``join`` that Ctrl-C interrupts
    marks the joined thread stopped while it still runs (CPython gh-90882)."""
    return _loads > 0


class Eagle2Generator:
    """A target model + draft head ready to generate. Threads may share one: their rounds take turns."""

    def __init__(self, model, tokenizer, head: DraftHead | Eagle3Head, *, model_key: str = "",
                 tree: TreeConfig | None = None, head_source: str = "", backend: Backend | str = "auto",
                 draft_vocab: int | None = None, cost_model: CostModel | None = None, exact: bool | None = None,
                 compute: ComputeThread | None = None):
        """head: an EAGLE-1/2 ``DraftHead`` or an ``Eagle3Head`` (whose features are three target
        layers, captured in the target's forward). backend, exact: as for ``load``; ``self.backend`` is
        the ``Backend`` in force. cost_model: this machine's round costs for the dynamic tree; None
        measures them on first use. compute: the thread that runs the rounds threads other than the
        main one ask for (``load`` passes the process's, ``compute.shared()``; see ``_on_compute``);
        None runs every round on the thread that asks."""
        self.model = model
        self.tokenizer = tokenizer
        if isinstance(head, Eagle3Head):
            check_eagle3_fits(head.config, model.config)
        else:
            check_head_fits(head.config, model.config)
        requested = Backend.of(backend, exact)
        self.target: Target = make_target(model, requested)
        self.backend = in_force(requested, self.target)  # what runs here: forward, switches, exact
        _warn_if_inexact(requested, self.backend, self.target)
        if isinstance(head, Eagle3Head):
            self.target.capture(head.config.feature_layers(self.target.n_layers))
        self.head = head
        self.head_source = head_source
        self.drafter = make_drafter(head, self.target, draft_vocab, self.backend)
        self.eos_ids = eos_ids_of(model, tokenizer)
        self.engine = Engine(self.target, self.drafter, tokenizer, self.eos_ids,
                             trained_head=head_source != UNTRAINED)
        self._compute = compute
        self._lock = threading.RLock()  # one round at a time, whichever thread asks (see _one_at_a_time)
        self._threads = weakref.WeakSet([threading.current_thread()])  # that built it or ran rounds (_note_thread)
        self._thread_warned = False
        self.model_key = model_key
        self.tree = tree or load_tuned(model_key) or TreeConfig(adaptive=True)
        self._given_cost = cost_model
        self._costs: dict[str, CostModel] = {}  # fingerprint -> cost model, one per frontier width used

    def with_head(self, directory: str | Path) -> "Eagle2Generator":
        """Another generator on this one's model, tokenizer, tree and backend, drafting with the head in
        ``directory`` (its own target copy, so the two keep separate caches).

        When the head has this head's kind and tensor shapes, a round costs it what it costs this
        head, so the new generator shares this one's cost model: both then size their trees by one
        rule and an A/B of the two measures only how well each drafts. Otherwise it keeps this one's
        verify curve (the target's) and probes only its own drafting costs."""
        if not Path(directory).is_dir():
            raise ValueError(f"head directory not found: {directory}")
        return self._on_compute(self._with_head, directory)

    def _with_head(self, directory: str | Path) -> "Eagle2Generator":
        head = load_head(directory)
        same = type(head) is type(self.head) and _shapes(head) == _shapes(self.head)
        other = Eagle2Generator(self.model, self.tokenizer, head, model_key=self.model_key, tree=self.tree,
                                head_source=str(directory), backend=self.backend,
                                cost_model=self.cost_model() if same else None, compute=self._compute)
        if not same:
            other._given_cost = cost.with_draft_costs(self.cost_model(), other.drafter, self.tree.width)
        return other

    def clear_cache(self) -> None:
        """Drop the target caches kept for later prompts (``reuse_prefix``); the next call prefills all."""
        self._on_compute(self._locked, self.engine.forget)

    def _on_compute(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` where this thread's rounds run: here on the main thread (or on any thread when
        the generator has no compute thread), on the compute thread from every other thread.

        Why: torch keeps an OpenMP thread pool for each thread that runs parallel work, and two pools
        on one machine halved the speed (``compute``). The main thread lives as long as the process and
        is where a script or notebook does its own torch work, so its rounds stay on it; other threads
        (a server's worker, a web framework's request pool) come and go, and one thread serves them all.
        Either way the process keeps one pool, unless it decodes from both."""
        if self._compute is None or threading.current_thread() is threading.main_thread():
            return fn(*args)
        return self._compute.run(fn, *args)

    def _locked(self, fn: Callable[..., T], *args) -> T:
        with self._lock:
            return fn(*args)

    def _round(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` as a round: under the lock, noting the thread (``_note_thread``); called where
        rounds run (``_on_compute``)."""
        self._note_thread()
        return self._locked(fn, *args)

    def cost_model(self, refit: bool = False) -> CostModel:
        """This machine's round costs for this model, head, dtype, backend and the cost-aware tree's
        frontier width (``self.tree.width``): measured by a short probe the first time (a few seconds)
        and cached under ``$EAGLE2_CACHE/cost``."""
        if self._given_cost is not None and not refit:
            return self._given_cost
        b = self.backend
        key = cost.fingerprint(dict(model=self.model_key or id(self.model), head=self.head_source,
                                    dtype=str(self.dtype), device=str(self.device), backend=b.forward,
                                    native=b.native, packed=b.packed_linear, lowbit=b.lowbit, exact=b.exact,
                                    kernel=kernels.block_isa(self.dtype, self.device) if b.lowbit else "",
                                    build=native.source_digest() if b.native else "",
                                    draft_blocks=self.drafter.fc.lowbit is not None,
                                    top_k=self.tree.width))  # the probe's draft level feeds a frontier this wide
        if not refit and key in self._costs:
            return self._costs[key]
        found = None if refit or not self.model_key else cost.load_cached(key)
        if found is None:
            log.info("measuring this machine's round costs (once per model, dtype and CPU) ...")
            # the probe runs the target and the head on their caches
            with cost.OtherLoad() as load:
                found = self._on_compute(self._locked, cost.probe, self.target, self.drafter, self.tree.width)
            if load.busy:
                log.warning("other programs kept %.1f cores busy while this machine's round costs were measured: "
                            "the measurement serves this run only and is taken again next time", load.cores)
            elif self.model_key:
                cost.save(key, found)
        self._costs[key] = found
        return found

    @property
    def dtype(self) -> torch.dtype:
        return self.target.dtype

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def max_context(self) -> int:
        return self.target.max_len

    # ---- prompts -------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> list[int]:
        """Token ids from: token ids (a list, or a 1-D tensor / array), a list of chat messages, or a
        string (chat template applied when the tokenizer has one)."""
        if isinstance(prompt, str):
            return self._in_vocabulary(self._encode_text(prompt))
        if hasattr(prompt, "ndim") and hasattr(prompt, "tolist"):  # a torch tensor or numpy array
            prompt = _one_sequence(prompt)
        if isinstance(prompt, dict):
            raise ValueError("prompt is one chat message: pass a list of messages, [{'role': ..., 'content': ...}]")
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt must be a string, a list of chat messages or token ids; got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError("prompt is empty")
        if all(isinstance(m, dict) for m in prompt):
            return self._in_vocabulary(self._encode_messages(list(prompt)))
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt must be token ids (ints), chat messages (dicts) or a string")
        return self._in_vocabulary([int(t) for t in prompt])

    def _in_vocabulary(self, ids: list[int]) -> list[int]:
        """ids, each checked against the model's vocabulary: a tokenizer with more tokens than the model
        (a mismatched pair) gives ids the embedding has no row for."""
        bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if not text.strip():
            raise ValueError("prompt is empty")
        _check_unicode(text)
        if self.tokenizer.chat_template:
            return self._encode_messages([{"role": "user", "content": text}])
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _encode_messages(self, messages: list[dict]) -> list[int]:
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("each chat message needs a string 'role' and 'content'")
            _check_unicode(m["role"])
            _check_unicode(m["content"])  # each on its own, so the position named is right
        if not any(m["content"].strip() for m in messages):
            raise ValueError("prompt is empty: every message has empty content")
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; pass token ids or a plain string")
        return chat_ids(self.tokenizer, messages)  # control-token text inside a message stays text

    def _note_thread(self) -> None:
        """Warn once when rounds run on a thread while another that built the generator or ran rounds
        still lives (for a generator from ``load``: rounds from the main thread and from others). torch's
        OpenMP then keeps a thread pool for each, pools that sleep between parallel regions, and a
        forward on the CPU ran at about half speed (``compute``)."""
        here = threading.current_thread()
        if self._thread_warned or here in self._threads:
            return
        others = [t for t in self._threads if t is not here and t.is_alive()]
        self._threads.add(here)
        if not others or self.device.type != "cpu":
            return
        self._thread_warned = True
        log.warning("decoding on a second thread while another that built or ran this generator lives: on a CPU "
                    "this can halve the speed (an OpenMP thread pool for each); decode from one thread, or, with a "
                    "generator from eagle2.load, from the main thread only or from other threads only")

    def _steps(self, prompt, settings: DecodeSettings) -> tuple[Steps, GenerationResult]:
        """The engine's steps for ``prompt`` (its forwards left to the caller) and the result they fill."""
        ids = self.encode_prompt(prompt)
        if len(ids) >= self.target.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.target.max_len}, "
                             "leaving no room to generate")
        tree = settings.tree(self.tree)
        result = GenerationResult([], "", None, "length", ids)
        cost_model = self.cost_model() if tree.dynamic else None
        steps = self.engine.steps(ids, tree, settings.sampling, settings.max_new_tokens, settings.stop, result,
                                  cost_model, settings.reuse_prefix)
        return steps, result

    def _start(self, prompt, settings: DecodeSettings):
        steps, result = self._steps(prompt, settings)
        return self._one_at_a_time(run_alone(self.target, steps)), result

    # ---- side by side ----------------------------------------------------------------------
    def begin(self, prompt, settings: DecodeSettings | None = None, **kw) -> tuple[Steps, GenerationResult]:
        """(decode, result): a generation to advance with ``step_together`` beside others (a server's
        requests); ``result`` fills as it goes. Arguments as for ``generate``. End one early with ``end``."""
        return self._on_compute(self._locked, self._steps, prompt, DecodeSettings.of(settings, **kw))

    def step_together(self, decodes: list[Steps]) -> list[Step]:
        """One target forward of each decode from ``begin``, run together (``engine.step_together``): one
        pass over the weights for all where the target allows it, every decode's tokens those it gives
        alone. Per decode its events and, once it has ended, its error if any."""
        return self._on_compute(self._round, self.engine.step_together, decodes)

    def end(self, decode: Steps) -> None:
        """Stop a decode from ``begin`` (its cleanup keeps its cache for a next turn)."""
        self._on_compute(self._locked, decode.close)

    def _one_at_a_time(self, events: Iterator[RoundEvent]) -> Iterator[RoundEvent]:
        """The engine's rounds, each where this thread's rounds run (``_on_compute``) and under the
        generator's lock. Generations may interleave round by round (two streams in one thread do),
        but two threads must not run rounds at once: they share the target and draft caches. So
        threads calling ``generate`` together take turns by round. A generation abandoned midway (a
        stream left early) closes the engine's rounds the same way: that runs the engine's cleanup,
        which keeps its cache for later prompts."""
        try:
            while True:
                ev = self._on_compute(self._round, next, events, _END)
                if ev is _END:
                    return
                yield ev
        finally:
            self._on_compute(self._locked, events.close)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompt, settings: DecodeSettings | None = None, **kw) -> GenerationResult:
        """The answer to ``prompt``. ``settings`` (a ``DecodeSettings``) and/or its keyword conveniences:
        ``max_new_tokens=256, method="eagle2", temperature=0.0, top_p=1.0, top_k=0, seed=None,
        total_tokens=None, depth=None, tree_top_k=None, stop=None, lookup=None, reuse_prefix=True`` (or
        ``sampling=SamplingConfig(...)``). The target cache a call leaves is reused by the next call whose
        prompt starts with the same tokens (a chat's next turn); ``reuse_prefix=False`` prefills it all.
        A ``seed`` fixes the answer for the given settings (whatever ran before or beside it); other
        settings draw differently: the trees near the token budget, and so the draws, depend on
        ``max_new_tokens``, so a shorter seeded answer need not be the start of a longer one."""
        events, result = self._start(prompt, DecodeSettings.of(settings, **kw))
        for _ in events:
            pass
        return result

    def stream_events(self, prompt, settings: DecodeSettings | None = None,
                      **kw) -> tuple[Iterator[RoundEvent], GenerationResult]:
        """(events, result): iterate the events (one per target forward); ``result`` fills as they come.
        Arguments as for ``generate``."""
        return self._start(prompt, DecodeSettings.of(settings, **kw))

    def stream(self, prompt, settings: DecodeSettings | None = None, **kw) -> Iterator[str]:
        """Text pieces as rounds complete (same arguments as ``generate``, checked at the call, not at
        the first piece)."""
        events, _ = self.stream_events(prompt, settings, **kw)
        return (ev.text for ev in events if ev.text)


def _warn_if_inexact(requested: Backend, actual: Backend, target: Target) -> None:
    """Say so where greedy drafting may differ from vanilla at a near-tie: a half-precision target
    without row-invariant numerics, unless the caller turned exactness off."""
    if requested.exact is False or actual.exact or target.dtype == torch.float32 or target.device.type != "cpu":
        return
    why = "it runs on transformers' forward" if actual.forward == "transformers" else "the native extension is absent"
    warnings.warn(f"{str(target.dtype).replace('torch.', '')} without row-invariant numerics ({why}): greedy "
                  "eagle2 / eagle1 / chain may differ from vanilla where two tokens' logits tie; load with "
                  "dtype='float32' for output equal to the target's greedy output", LoadWarning, stacklevel=3)


def _shapes(head) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}


UNTRAINED = "random-init"  # the head_source of the fresh head a model without a trained one gets


def _fresh_head(config) -> DraftHead:
    """A freshly initialised head sized from the target's config; a config without the sizes a head
    takes (OPT names its MLP width ``ffn_dim``) is refused in one line."""
    try:
        return init_head(HeadConfig.from_target(config))
    except AttributeError as e:
        raise ValueError(f"cannot size a draft head for this {config.model_type} model: its config has no "
                         f"{getattr(e, 'name', None) or e}; pass a trained head= for it") from None


def load_off_thread(load: Callable[[], T]) -> T:
    """``load()`` run on a thread of its own that then exits: its result, or its exception raised here.
    ``eagle2.load`` loads this way itself.

    Why: torch's OpenMP runtime gives every thread that starts parallel work a pool of threads, which
    lives as long as that thread, and two pools on one machine halved the speed (``compute``). A load
    on a thread that exits leaves no pool behind, whichever thread then decodes. Ctrl-C raises
    KeyboardInterrupt here at once but cannot stop the load, which runs on in a daemon thread (one
    left inside torch can abort the interpreter's exit: the CLI quits with ``os._exit``)."""
    global _loads
    box: dict = {}
    done = threading.Event()

    def target():
        global _loads
        try:
            box["value"] = load()
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            box["error"] = e
        finally:
            with _loads_lock:
                _loads -= 1
            done.set()

    thread = threading.Thread(target=target, name=LOAD_THREAD, daemon=True)
    with _loads_lock:
        _loads += 1
    try:
        thread.start()
    except BaseException:
        with _loads_lock:
            _loads -= 1
        raise
    # Timed waits, so that Ctrl-C is seen (it may be delivered to another thread). On an Event, not
    # Thread.join: a join that Ctrl-C interrupts marks the thread stopped while it runs (gh-90882).
    while not done.wait(0.2):
        pass
    thread.join()  # the load is done: the thread only exits now (and its OpenMP pool with it)
    if "error" in box:
        raise box["error"]
    return box["value"]


def load_head(directory: str | Path) -> DraftHead | Eagle3Head:
    """A head directory in either released layout: EAGLE-3 (config with ``draft_vocab_size`` or an
    Eagle3 architecture, or ``midlayer`` weights) or EAGLE-1/2. Fit to the target is checked by
    ``Eagle2Generator``."""
    return Eagle3Head.load(directory) if is_eagle3(directory) else DraftHead.load(directory)


def load(model: str = "smollm2-135m", head: str | None = None, dtype: str | torch.dtype = "auto",
         device: str = "auto", device_map=None, tree: TreeConfig | None = None,
         backend: Backend | str = "auto", draft_vocab: int | None = None, exact: bool | None = None) -> Eagle2Generator:
    """Load a target and its draft head.

    model: a built-in name (``smollm2-135m``), a local Hugging Face model directory, a ``.gguf``
    file or a hub id. head: a head directory in the released EAGLE-1/2 or EAGLE-3 layout (told
    apart by ``load_head``); None picks the built-in model's shipped head, or a freshly
    initialised head (with a warning) otherwise.
    backend: "auto" runs Llama / Qwen2 / Mistral-style targets on the lean forward (fast.py,
    logits equal to transformers'), everything else through transformers; "transformers" forces
    the general path; "fast" demands the lean one. A name takes the fast-path switches from the
    environment (``Backend.from_env``: EAGLE2_NATIVE, EAGLE2_PACKED_LINEAR, EAGLE2_LOWBIT); a
    ``config.Backend`` sets them all. ``gen.backend`` is what then runs on this machine.
    draft_vocab: how many of the head's draft-vocabulary tokens the drafter may propose (FR-Spec;
    None: the head's whole list, 0: the full vocabulary; an EAGLE-3 head's is fixed: leave it None).
    Output is exact either way.
    exact: row-invariant numerics on the lean forward — every logit row of a tree verification is
    bit for bit what a one-token step gives, so greedy eagle2 / eagle1 / chain output equals vanilla
    output token for token in bf16 / fp16 too (fp32 is covered by the contract with transformers).
    None: ``fast.exact_default`` (on for a CPU with the native extension, where it is also the faster
    path, fp32 included); False: ATen's kernels, where a near-tie may flip between a tree row and a
    one-token step.

    Threads: the load runs on a thread that then exits (``load_off_thread``); rounds asked for on the
    main thread run there, and those asked for on any other thread run on the process's compute
    thread (``compute.shared()``). torch keeps a CPU thread pool per thread that computes, and two
    pools on one machine halved the speed: so a script, a notebook or a server keeps one."""
    return load_off_thread(lambda: _load(model, head, dtype, device, device_map, tree, backend, draft_vocab, exact))


def _load(model, head, dtype, device, device_map, tree, backend, draft_vocab, exact) -> Eagle2Generator:
    backend = Backend.of(backend, exact)  # the environment is read here, once; bad values fail before the load
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a name, a directory, a .gguf file or a hub id; got {type(model).__name__}")
    model = str(model)
    if draft_vocab is not None and (not isinstance(draft_vocab, int) or isinstance(draft_vocab, bool) or draft_vocab < 0):
        raise ValueError(f"draft_vocab must be None or an integer >= 0; got {draft_vocab!r}")
    if head is not None and not Path(head).is_dir():  # fail before the (slow) model load
        raise ValueError(f"head directory not found: {head}")
    if tree is not None and not isinstance(tree, TreeConfig):
        raise ValueError(f"tree must be None or a TreeConfig; got {type(tree).__name__}")
    hf, tok, builtin = load_target(model, dtype=dtype, device=device, device_map=device_map,
                                   half_ok=lambda cfg: half_is_exact(backend, cfg))
    check_supported(hf)  # before a head is sized from its config
    if head is not None:
        draft = load_head(head)
        source = str(head)
    elif builtin and builtin_head_dir(builtin) is not None:
        draft = load_head(builtin_head_dir(builtin))  # the shipped head may be of either kind
        source = str(builtin_head_dir(builtin))
    else:
        warnings.warn(f"no trained draft head for {model!r}: eagle2 drafts only from prompt lookup (copies of "
                      "earlier text) until one is given (head= / --head; `eagle2 train` makes one); chain, eagle1 and fixed "
                      "shapes use a freshly initialised head, slower than vanilla. Output is exact either way.",
                      LoadWarning, stacklevel=1)
        draft = _fresh_head(hf.config)
        source = UNTRAINED
    return Eagle2Generator(hf, tok, draft, model_key=builtin or str(model), tree=tree, head_source=source,
                           backend=backend, draft_vocab=draft_vocab, compute=compute.shared())
