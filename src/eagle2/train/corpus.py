"""The self-distilled corpus: the target's own answers as token ids, committed and grown run by run.

Home: ``<repo>/corpus/<model-key>/`` for the built-in models (``default_corpus_dir``); any other
directory with ``--corpus``. A run answers only the turns the corpus does not hold yet and never
rewrites an answer, so the corpus only grows.

Layout of a corpus directory:

- ``turns-NNNNN.jsonl.gz``: sealed shards, gzip'd JSONL, immutable once written (git stores each
  once; growth adds shards, it never rewrites one).
- ``pending.jsonl``: turns answered since the last seal (uncompressed, appended as batches finish,
  so an interrupted run loses nothing); sealed into a shard at the end of a run. Not committed.
- ``manifest.json``: model, counts of conversations / turns / tokens per source, each shard's
  generation settings and sha256. Rewritten (atomically) at every seal from the shards themselves.
- ``README.md``: the manifest as a table, generated.

One line per answered turn, ``{"id", "turn", "prefix", "prompt_ids", "response_ids"}``:
``id`` is the conversation (``<prompt file stem>:<record id>``, the source is the part before the
colon); turn 0 has ``prefix`` 0 and ``prompt_ids`` = the chat-templated prompt. Turn k > 0 was
asked after the model's own answer to turn k - 1, so its full prompt extends that conversation:

    full_prompt[k] = (full_prompt[k-1] + response_ids[k-1])[:prefix] + prompt_ids

e.g. turn 0 prompt [1, 5, 9] answered [7, 2]; the templated turn 1 is [1, 5, 9, 7, 2, 4, 8], stored
as prefix 5, prompt_ids [4, 8]. Only new ids are stored, and the ids round-trip exactly.

This module stores and reads token ids; it runs no model (responses.py generates the answers).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .data import data_license

FORMAT = 1
PENDING = "pending.jsonl"
MANIFEST = "manifest.json"


def repo_corpus_root() -> Path:
    """``<repo>/corpus``: the committed corpora (one directory per built-in model key)."""
    return Path(__file__).resolve().parents[3] / "corpus"


def default_corpus_dir(model_key: str, run_dir: Path) -> Path:
    """The committed corpus of a built-in model when running from the repository; else
    ``<run_dir>/corpus`` (other models, or an installed package with no repository around it)."""
    from ..models import BUILTIN_MODELS

    root = repo_corpus_root()
    if model_key in BUILTIN_MODELS and (root.parent / "pyproject.toml").exists():
        return root / model_key
    return Path(run_dir) / "corpus"


def source_of(conversation_id: str) -> str:
    return conversation_id.split(":", 1)[0] if ":" in conversation_id else "unknown"


def record_id(conversation_id: str, turn: int) -> str:
    """The training record of one turn: the conversation id for turn 0, ``<id>#<turn>`` after it."""
    return conversation_id if turn == 0 else f"{conversation_id}#{turn}"


@dataclass
class Turn:
    prompt_ids: list[int]  # the full chat-templated prompt of this turn (earlier turns included)
    response_ids: list[int]  # the model's answer, as generated (ends with EOS unless cut at the cap)


@dataclass
class Conversation:
    id: str
    turns: list[Turn] = field(default_factory=list)

    def ids_after(self, k: int) -> list[int]:
        """Prompt + answer of turn k: the context turn k + 1 continues."""
        t = self.turns[k]
        return t.prompt_ids + t.response_ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_line(rec: dict, where: str) -> None:
    ok = (isinstance(rec.get("id"), str) and isinstance(rec.get("turn"), int) and rec["turn"] >= 0
          and isinstance(rec.get("prefix"), int) and isinstance(rec.get("prompt_ids"), list)
          and isinstance(rec.get("response_ids"), list))
    if not ok:
        raise ValueError(f"{where}: not a corpus record (need id, turn, prefix, prompt_ids, response_ids)")


def _shard_records(shard: Path) -> list[dict]:
    """A sealed shard's records, or a ValueError naming the shard (and line) that is damaged. Sealed
    shards are never rewritten, so damage there is not an interruption: it is reported, not skipped."""
    n = 0
    try:
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            records = []
            for n, line in enumerate(f, 1):
                records.append(json.loads(line))
                _check_line(records[-1], f"{shard}:{n}")
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:  # gzip.BadGzipFile is an OSError
        where = f"{shard}:{n}" if isinstance(e, json.JSONDecodeError) else str(shard)
        raise ValueError(f"{where}: damaged corpus shard ({type(e).__name__}: {e}); restore it (e.g. git checkout "
                         f"{shard.name})") from None
    return records


def _check_sha256(shard: Path, want: str | None) -> None:
    """A sealed shard must be the one its seal recorded: another corpus's shard copied over it (another
    model's or tokenizer's ids) would read back as valid records."""
    if want and hashlib.sha256(shard.read_bytes()).hexdigest() != want:
        raise ValueError(f"{shard}: damaged corpus shard (not the sha256 {MANIFEST} records for it: replaced or "
                         f"changed since it was sealed); restore it (e.g. git checkout {shard.name})")


class Corpus:
    """A corpus directory, read whole into memory (ids only: ~10 MB per 100k turns of Python ints
    is fine at this project's scale). ``add`` appends to ``pending.jsonl``; ``seal`` turns that into
    a shard. Writers hold ``lock()``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conversations: dict[str, Conversation] = {}
        self.manifest: dict = {}
        self._sealed: set[tuple[str, int]] = set()  # (id, turn) held by a shard
        self._pending_lines = 0
        self._load()

    # ---- reading ---------------------------------------------------------------------------
    def _shards(self) -> list[Path]:
        return sorted(self.path.glob("turns-*.jsonl.gz"))

    def _load(self) -> None:
        if (self.path / MANIFEST).exists():
            try:
                self.manifest = json.loads((self.path / MANIFEST).read_text())
            except ValueError as e:
                raise ValueError(f"{self.path / MANIFEST} is not valid JSON: {e}") from None
        sums = {s["file"]: s.get("sha256") for s in self.manifest.get("shards", [])}
        for shard in self._shards():
            _check_sha256(shard, sums.get(shard.name))
            for rec in _shard_records(shard):
                if self._take(rec):
                    self._sealed.add((rec["id"], rec["turn"]))
        pending = self.path / PENDING
        if pending.exists():
            with pending.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        _check_line(rec, str(pending))
                    except (json.JSONDecodeError, ValueError):
                        continue  # a line cut by an interruption: that turn is answered again
                    self._take(rec)
                    self._pending_lines += 1

    def _take(self, rec: dict) -> bool:
        """Add one stored line; False for a duplicate (first one wins) or a turn without its predecessor."""
        conv = self.conversations.setdefault(rec["id"], Conversation(rec["id"]))
        k = rec["turn"]
        if k != len(conv.turns):
            if not conv.turns:
                del self.conversations[rec["id"]]
            return False
        base = conv.ids_after(k - 1)[: rec["prefix"]] if k else []
        conv.turns.append(Turn([int(i) for i in base + rec["prompt_ids"]], [int(i) for i in rec["response_ids"]]))
        return True

    def __len__(self) -> int:
        return len(self.conversations)

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self.conversations

    def answered_turns(self, conversation_id: str) -> int:
        conv = self.conversations.get(conversation_id)
        return len(conv.turns) if conv else 0

    def select(self, exclude: set[str] | None = None, only: set[str] | None = None) -> list[Conversation]:
        """The conversations, in corpus order, none of ``exclude``, with ``only`` just those (ids)."""
        return [c for cid, c in self.conversations.items()
                if not (exclude and cid in exclude) and (only is None or cid in only)]

    def records(self, exclude: set[str] | None = None, only: set[str] | None = None) -> list[dict]:
        """One training record per answered turn, ``{"id", "prompt_ids", "response_ids"}`` with the
        full prompt (``record_id`` names it). ``exclude`` / ``only``: conversation ids."""
        out = []
        for conv in self.select(exclude, only):
            cid = conv.id
            for k, t in enumerate(conv.turns):
                out.append({"id": record_id(cid, k), "prompt_ids": t.prompt_ids, "response_ids": t.response_ids})
        return out

    # ---- writing ---------------------------------------------------------------------------
    def lock(self):
        """An exclusive writer lock (two writers would answer the same prompts twice)."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ValueError(f"another process is writing the corpus {self.path}; wait for it or stop it") from None
        return f

    def check_model(self, model: str, settings: dict | None) -> None:
        """Refuse to mix another model's answers, or sampled with greedy ones, into one corpus;
        ``settings`` None: a reader, refused only another model's answers."""
        have = self.manifest.get("model")
        if have and model and have != model:
            raise ValueError(f"the corpus {self.path} holds answers of {have}, not {model}; pass another --corpus")
        if settings is None:
            return
        if not have and self._shards():
            raise ValueError(f"the corpus {self.path} has {len(self._shards())} shard(s) but no model in {MANIFEST} (deleted "
                             f"or damaged?), so whose answers it holds is unknown; restore {self.path / MANIFEST} (e.g. "
                             "with git checkout) or pass another --corpus")
        temps = self.temperatures()
        if temps and settings.get("temperature") not in temps:
            raise ValueError(f"the corpus {self.path} holds answers at temperature {sorted(temps)}, this run uses "
                             f"{settings.get('temperature')}; give sampled answers their own --corpus")

    def temperatures(self) -> list[float]:
        """The sampling temperatures its sealed shards were answered at (from the manifest)."""
        return manifest_temperatures(self.manifest)

    def add(self, conversation_id: str, turn: int, prompt_ids: list[int], response_ids: list[int],
            out=None) -> None:
        """Append one answered turn (``prompt_ids``: its full prompt) to ``pending.jsonl``.

        ``out``: an open pending file (``open_pending``); callers flush it once per batch."""
        if turn != self.answered_turns(conversation_id):
            raise ValueError(f"{conversation_id}: turn {turn} does not follow the {self.answered_turns(conversation_id)} "
                             f"answered turn(s)")
        prefix = _common_prefix(self.conversations[conversation_id].ids_after(turn - 1), prompt_ids) if turn else 0
        rec = {"id": conversation_id, "turn": turn, "prefix": prefix, "prompt_ids": [int(i) for i in prompt_ids[prefix:]],
               "response_ids": [int(i) for i in response_ids]}
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        if out is None:
            with self.open_pending() as f:
                f.write(line)
        else:
            out.write(line)
        self._take(rec)
        self._pending_lines += 1

    def open_pending(self):
        """The pending file for appends, its cut last line (an interruption) dropped first."""
        self.path.mkdir(parents=True, exist_ok=True)
        p = self.path / PENDING
        if p.exists():
            data = p.read_bytes()
            if data and not data.endswith(b"\n"):
                p.write_bytes(data[: data.rfind(b"\n") + 1])
        return p.open("a", encoding="utf-8")

    def seal(self, model: str = "", settings: dict | None = None) -> Path | None:
        """Move the pending turns into a new shard, rewrite manifest.json and README.md; returns the
        shard (None when nothing was pending). Atomic steps: shard (temp + rename), manifest, then
        the pending file is removed; a crash in between leaves duplicates that loading skips."""
        todo = []
        for cid, conv in self.conversations.items():
            for k in range(len(conv.turns)):
                if (cid, k) not in self._sealed:
                    todo.append(self._stored_line(cid, k))
        shard = None
        if todo and not (self.path / MANIFEST).exists():
            self._write_manifest(model)  # first: a shard is never on disk without the model it belongs to
        if todo:
            taken = [int(p.name[6:11]) for p in self._shards() if p.name[6:11].isdigit()]
            shard = self.path / f"turns-{max(taken, default=-1) + 1:05d}.jsonl.gz"
            tmp = shard.with_name(shard.name + ".tmp")
            data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in todo).encode()
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
                gz.write(data)  # mtime 0: the same turns give the same bytes
            os.replace(tmp, shard)
            self._sealed.update((r["id"], r["turn"]) for r in todo)
            entry = dict(file=shard.name, turns=len(todo), sha256=hashlib.sha256(shard.read_bytes()).hexdigest(),
                         settings=dict(settings or {}))
            self.manifest.setdefault("shards", []).append(entry)
        if todo or not (self.path / MANIFEST).exists():
            self._write_manifest(model)
        pending = self.path / PENDING
        if pending.exists():
            pending.unlink()
        self._pending_lines = 0
        return shard

    def _stored_line(self, cid: str, k: int) -> dict:
        conv = self.conversations[cid]
        t = conv.turns[k]
        prefix = _common_prefix(conv.ids_after(k - 1), t.prompt_ids) if k else 0
        return {"id": cid, "turn": k, "prefix": prefix, "prompt_ids": t.prompt_ids[prefix:],
                "response_ids": t.response_ids}

    def summary(self, exclude: set[str] | None = None, only: set[str] | None = None) -> dict:
        """Counts per source: conversations, multi_turn (conversations with > 1 turn), turns,
        prompt_tokens (stored: new prompt ids only), response_tokens; plus totals. Of the whole
        corpus, or of the conversations ``select`` picks."""
        per: dict[str, dict] = {}
        for conv in self.select(exclude, only):
            cid = conv.id
            s = per.setdefault(source_of(cid), dict(conversations=0, multi_turn=0, turns=0, prompt_tokens=0,
                                                    response_tokens=0))
            s["conversations"] += 1
            s["multi_turn"] += len(conv.turns) > 1
            s["turns"] += len(conv.turns)
            for k in range(len(conv.turns)):
                line = self._stored_line(cid, k)
                s["prompt_tokens"] += len(line["prompt_ids"])
                s["response_tokens"] += len(line["response_ids"])
        total = {k: sum(s[k] for s in per.values()) for k in ("conversations", "multi_turn", "turns",
                                                             "prompt_tokens", "response_tokens")}
        return dict(sources=dict(sorted(per.items())), total=total)

    def _write_manifest(self, model: str) -> None:
        names = {p.name for p in self._shards()}
        shards = [s for s in self.manifest.get("shards", []) if s["file"] in names]
        known = {s["file"] for s in shards}
        shards += [dict(file=n, settings={}) for n in sorted(names - known)]  # a seal cut short: settings unknown
        m = dict(format=FORMAT, model=self.manifest.get("model") or model,
                 record="one line per answered turn: {id, turn, prefix, prompt_ids, response_ids}; see "
                        "eagle2/train/corpus.py", **self.summary(), shards=shards)
        self.manifest = m
        _atomic_write(self.path / MANIFEST, json.dumps(m, indent=1) + "\n")
        _atomic_write(self.path / "README.md", corpus_readme(m))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def manifest_temperatures(manifest: dict) -> list[float]:
    """The sampling temperatures a corpus's shards were answered at (0.0: greedy), from its manifest."""
    return sorted({s.get("settings", {}).get("temperature") for s in manifest.get("shards", [])} - {None})


def corpus_readme(manifest: dict) -> str:
    """README.md of a corpus directory, generated from its manifest."""
    temps = manifest_temperatures(manifest)
    how = "greedy" if temps in ([], [0.0]) else "sampled (temperature " + ", ".join(map(str, temps)) + ")"
    lines = [f"# Self-distilled corpus of {manifest.get('model', '?')}", "",
             f"The target model's own {how} answers to the training prompts, as token ids (prompt ids, chat template "
             "applied, and response ids exactly as generated). Multi-turn conversations: each later turn was asked "
             "after the model's own answer to the one before. Written and grown by `eagle2 train --stages responses` "
             "(it answers only what is missing here and never regenerates); the `train` stage reads it. Format: "
             "see `src/eagle2/train/corpus.py`. The prompt texts are not stored here; they stay in "
             "`../shared/data/train/` (see its SOURCES.md).", "", corpus_table(manifest), "", "## Generation", ""]
    for s in manifest.get("shards", []):
        st = ", ".join(f"{k} {v}" for k, v in s.get("settings", {}).items()) or "settings not recorded"
        lines.append(f"- `{s['file']}`: {s.get('turns', '?')} turns; {st}")
    lines += ["", "## Sources and licenses", ""]
    lines += [f"- {src}: {data_license(src)}" for src in manifest.get("sources", {})]
    lines += ["- The answers are the model's output (the model's license applies).", ""]
    return "\n".join(lines)


def corpus_table(manifest: dict) -> str:
    """Markdown table: conversations, multi-turn ones, turns and tokens per source, with totals."""
    cols = ("conversations", "multi_turn", "turns", "prompt_tokens", "response_tokens")
    rows = ["| source | conversations | multi-turn | turns | prompt tokens | response tokens |",
            "|---|---:|---:|---:|---:|---:|"]
    for src, s in manifest.get("sources", {}).items():
        rows.append(f"| {src} | " + " | ".join(f"{s[c]:,}" for c in cols) + " |")
    t = manifest.get("total")
    if t:
        rows.append("| **all** | " + " | ".join(f"**{t[c]:,}**" for c in cols) + " |")
    rows += ["", "Prompt tokens count the ids stored: a later turn stores only what follows the earlier turns."]
    return "\n".join(rows)


def _token_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def _read_responses(path: Path) -> list[tuple[str, list[int], list[int]]]:
    """(id, prompt ids, response ids) of every line of a responses JSONL, or a ValueError naming the
    first bad line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON may hold a raw U+2028
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a responses JSONL (not UTF-8 text: {e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            cid, p, r = rec["id"], rec["prompt_ids"], rec["response_ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a responses record (need id, prompt_ids, response_ids)") from None
        if not (_token_ids(p) and p and _token_ids(r)):
            raise ValueError(f"{path}:{n}: prompt_ids (non-empty) and response_ids must be lists of token ids >= 0")
        records.append((str(cid), p, r))
    return records


def import_responses(corpus: Corpus, path: str | Path, model: str, settings: dict) -> dict:
    """Import a responses JSONL (``{"id", "prompt_ids", "response_ids", ...}``, the format the
    responses stage wrote before the corpus existed) as first turns. Ids already in the corpus are
    skipped, so importing twice adds nothing. The whole file is checked before anything is added,
    so a bad line leaves the corpus as it was. Returns {"added", "skipped"}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"responses file not found: {path}")
    records = _read_responses(path)
    added = skipped = 0
    with corpus.lock(), corpus.open_pending() as out:
        for cid, p, r in records:
            if cid in corpus:
                skipped += 1
                continue
            corpus.add(cid, 0, p, r, out=out)
            added += 1
        out.flush()
        corpus.seal(model, {**settings, "imported_from": path.name})
    return dict(added=added, skipped=skipped)
