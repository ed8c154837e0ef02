"""Training prompts: read the prompt files this project trains on into chat messages, and name
their sources and licenses (``data_license``, for model cards and the corpus README).

Formats (see ../shared/data/SOURCES.md):
- ShareGPT json: a list of {id, conversations: [{from: human|gpt|system, value}]}.
- GSM8K jsonl: {question, answer}.
- GPTeacher json: a list of {instruction, input, response}.
- Any user JSONL with one of {"prompt": str}, {"messages": [{role, content}]},
  {"conversations": [...ShareGPT...]}, {"question": str} or {"instruction": str, "input": str} per line.

Each prompt becomes a ``Prompt(id, messages, followups)``; the conversation is cut after its first
user turn (the target writes the answer itself). FastChat-style ``{"turns": [...]}`` records keep
their later user turns as ``followups``: the responses stage asks them after the target's own
answer to the turn before, as MT-bench's second turns are asked. Stops at reading files: no
model, no tokenizer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple  # ({"role": ..., "content": ...}, ...) ending with a user turn
    followups: tuple = ()  # later user turns (str), each asked after the target's answer to the one before


def _from_record(rec: dict, fallback_id: str) -> Prompt | None:
    rid = str(rec.get("id", rec.get("question_id", fallback_id)))
    msgs: list[dict] = []
    followups: tuple = ()
    if "conversations" in rec or "messages" in rec:
        turns = rec.get("conversations") or rec.get("messages") or []
        for t in turns if isinstance(turns, list) else ():
            if not isinstance(t, dict):
                continue
            role = _ROLES.get(t.get("from", t.get("role", "")))
            text = t.get("value", t.get("content", ""))
            if role is None or not isinstance(text, str):
                continue
            if role == "assistant" and not any(m["role"] == "user" for m in msgs):
                continue  # a conversation that opens with the assistant: drop that turn
            msgs.append({"role": role, "content": text})
            if role == "user":
                break
    elif "prompt" in rec:
        msgs = [{"role": "user", "content": rec["prompt"]}]
    elif "question" in rec:
        msgs = [{"role": "user", "content": rec["question"]}]
    elif "instruction" in rec:
        text, extra = rec["instruction"], rec.get("input")
        msgs = [{"role": "user", "content": f"{text}\n\n{extra}" if isinstance(text, str) and extra else text}]
    elif "turns" in rec and isinstance(rec["turns"], list) and rec["turns"]:
        msgs = [{"role": "user", "content": rec["turns"][0]}]
        followups = tuple(t for t in rec["turns"][1:] if isinstance(t, str) and t.strip())
    text = msgs[-1]["content"] if msgs else None
    if not msgs or msgs[-1]["role"] != "user" or not isinstance(text, str) or not text.strip():
        return None  # no user turn whose text is a non-empty string
    if not all(_utf8(t) for t in [m["content"] for m in msgs] + list(followups)):
        return None
    return Prompt(rid, tuple(msgs), followups)


def _utf8(text: str) -> bool:
    """Whether a tokenizer can take ``text``: JSON's escaped lone surrogates ("\\ud800") are no UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read one prompt file (json list or jsonl). Records without a usable user turn are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is not JSON
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    try:
        records = json.loads(text)
        if isinstance(records, dict):
            records = [records]
        elif not isinstance(records, list):
            raise ValueError(f"{path}: neither a JSON list of records nor JSONL (the file is one "
                             f"{type(records).__name__})")
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON may hold a raw U+2028
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    out, seen, ids = [], set(), {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is not a JSON object")
        p = _from_record(rec, f"{i}")
        if p is None:
            continue
        p = Prompt(f"{path.stem}:{p.id}", p.messages, p.followups)
        key = p.messages[-1]["content"]
        if key in seen:
            continue
        if p.id in ids:  # the id names the corpus conversation: two prompts under one would share one answer
            raise ValueError(f"{path}: records {ids[p.id]} and {i} are different prompts with the same id "
                             f"{p.id.split(':', 1)[1]!r}; give each prompt its own id")
        seen.add(key)
        ids[p.id] = i
        out.append(p)
    return out


# The project's training mix: (file in <data>/train, prompts taken; None = all of them).
MIX = (("sharegpt_en_first_prompts_2978.json", None), ("sharegpt_v3_filtered_1000.json", None),
       ("gsm8k_train.jsonl", 1500), ("gpteacher_codegen_instruct.json", 1500),
       ("dolly15k_en.jsonl", None), ("oasst1_en.jsonl", None), ("gpteacher_roleplay.jsonl", None),
       ("awesome_chatgpt_persona.jsonl", None))


# The source and license of each prompt file this project trains on, by a key of its file name.
DATA_LICENSES = {
    "sharegpt": "ShareGPT first prompts via ml-energy/leaderboard-v2 (repo Apache-2.0; ShareGPT content has no "
                "clear license: it is what EAGLE itself trained on)",
    "gsm8k": "GSM8K train questions, openai/grade-school-math (MIT)",
    "gpteacher_roleplay": "GPTeacher role-play instructions, teknium1/GPTeacher (MIT; GPT-4-generated text)",
    "gpteacher": "GPTeacher codegen-instruct, teknium1/GPTeacher (MIT)",
    "dolly15k": "Dolly-15k English prompts, Databricks via TurkuNLP/dolly-fi (CC-BY-SA 3.0: attribute, keep the "
                "license when redistributing the prompts)",
    "oasst1": "OpenAssistant oasst1 English prompts, via TurkuNLP/oasst-fi and Open-Assistant/oasst-model-eval "
              "(Apache-2.0)",
    "awesome_chatgpt": "awesome-chatgpt-prompts persona prompts, f/awesome-chatgpt-prompts (CC0-1.0)",
}


def data_license(name: str) -> str:
    """The source and license line of a prompt file or corpus source (its name or stem)."""
    low = name.lower()
    for k, v in DATA_LICENSES.items():  # the more specific keys come first
        if k in low:
            return v
    return f"{name} (user-supplied; check its license)"


def default_mix(data_dir: str | Path, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """The project's training mix (``MIX``: ShareGPT, GSM8K and GPTeacher code, plus the writing,
    knowledge, extraction, role-play and multi-turn sources added 2026-12-02), shuffled together so
    that any prefix of the list (a partial run) is a fair sample of the mix. Files missing from
    ``data_dir`` are left out."""
    d = Path(data_dir) / "train"
    rng = random.Random(seed)
    parts = []
    for name, n in MIX:
        if not (d / name).exists():
            continue
        ps = read_prompts(d / name)
        if n is not None:
            rng.shuffle(ps)
            ps = ps[:n]
        parts.append(ps)
    mix = unique_prompts([p for ps in parts for p in ps])
    rng.shuffle(mix)
    return mix[:limit] if limit else mix


def unique_prompts(prompts: list[Prompt]) -> list[Prompt]:
    """The first prompt of each text (the last user turn): one asked twice would be answered twice,
    and could sit in the training set and among the held-out dev prompts at once."""
    seen, out = set(), []
    for p in prompts:
        key = p.messages[-1]["content"]
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def read_fixed(path: str | Path) -> list[tuple[Prompt, str]]:
    """(prompt, reference answer) pairs of a data set that carries answers: GSM8K ``answer``,
    GPTeacher ``response``, or a conversation's first assistant turn after its first user turn."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
        records = [records] if isinstance(records, dict) else records
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.split("\n") if line.strip()]
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        p = _from_record(rec, f"{i}")
        if p is None:
            continue
        answer = rec.get("answer") or rec.get("response")
        if answer is None:
            turns = rec.get("conversations") or rec.get("messages") or []
            seen_user = False
            for t in turns:
                role = _ROLES.get(t.get("from", t.get("role", "")))
                if role == "user":
                    seen_user = True
                elif role == "assistant" and seen_user:
                    answer = t.get("value", t.get("content"))
                    break
        if isinstance(answer, str) and answer.strip():
            out.append((Prompt(f"{path.stem}:{p.id}", p.messages), answer))
    return out
