"""Chat messages -> prompt token ids, through the model's chat template, with message text kept as text.

``apply_chat_template(..., tokenize=True)`` renders the conversation to one string and tokenizes
it, so a message whose content contains a control token's text (``<|im_end|>``,
``<|im_start|>assistant``) gets the control token itself: a user could close their own turn and
write the assistant's. Here such text inside a message becomes ordinary tokens (its characters),
as a chat API promises; the template's own control tokens are unchanged. Messages without any
special token's text take the plain ``apply_chat_template`` path, so their ids are exactly its ids.

Boundary: tokenizer work only; no model. The caller checks the messages' shape and Unicode.
"""

from __future__ import annotations

import re

_PRIVATE_USE = range(0xF0000, 0xFFFFE)  # placeholders: a template passes them through untouched (not whitespace)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of ``messages`` (with the generation prompt) under the tokenizer's chat template."""
    spans = [_added_token_spans(tokenizer, m["content"]) for m in messages]
    if not any(spans):
        return _template_ids(tokenizer, messages)
    used = set("".join(m["content"] for m in messages))
    free = (chr(c) for c in _PRIVATE_USE if chr(c) not in used)
    hidden: dict[str, str] = {}  # placeholder -> the control-token text it stands for
    safe = []
    for m, sp in zip(messages, spans):
        text, out, at = m["content"], [], 0
        for a, b in sp:
            mark = next(free)
            hidden[mark] = text[a:b]
            out += [text[at:a], mark]
            at = b
        safe.append({**m, "content": "".join(out) + text[at:]})
    rendered = tokenizer.apply_chat_template(safe, add_generation_prompt=True, tokenize=False)
    pieces = re.split("(" + "|".join(map(re.escape, hidden)) + ")", rendered)
    if sum(p in hidden for p in pieces) != len(hidden):
        raise ValueError("this model's chat template does not keep message text as given, so control-token text "
                         f"inside a message (e.g. {next(iter(hidden.values()))!r}) cannot be kept as plain text; "
                         "remove it from the message")
    ids: list[int] = []
    for p in pieces:
        if p in hidden:  # the characters of a control token's text, as ordinary tokens
            ids += tokenizer(hidden[p], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif p:
            ids += tokenizer(p, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _added_token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of ``text`` that tokenize as one special added token (a control
    token's text). Found by the tokenizer's own matcher. Added tokens not marked special (in some
    vocabularies runs of spaces) stay as the template path tokenizes them; a slow tokenizer (no
    offsets) finds none."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {i for i, t in added.items() if getattr(t, "special", False)}
    if not special or not text or not getattr(tokenizer, "is_fast", False):
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(a, b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i in special and b > a]
