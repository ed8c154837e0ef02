"""OpenAI response bodies: chat and text completions, whole or as server-sent-event chunks.

``Formatter`` is built per request for one of the two endpoints; the routes hand it the
scheduler's events and send what it returns. Every response carries ``eagle2`` with the
speculative stats; every streamed round carries this round's ``draft_text`` (the prefix of the
text that came from accepted drafts), token counts and the live stats. Pure functions of their
inputs: no I/O, no model.
"""

from __future__ import annotations

import json
import time
import uuid

from .errors import APIError

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": waiting\n\n"


def sse(obj, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def sse_error(err: APIError) -> bytes:
    """An error after the stream began: an SSE ``error`` event with the usual error body."""
    return sse(err.body(), event="error")


def stats(st, method: str, queue_s: float = 0.0) -> dict:
    return {"method": method, "mean_accept_len": round(st.mean_accept_len, 3),
            "tokens_per_s": round(st.tokens_per_s, 2), "rounds": st.rounds, "new_tokens": st.new_tokens,
            "seconds": round(st.seconds, 4), "queue_seconds": round(queue_s, 4),
            "cached_prompt_tokens": st.reused_prefix}


def usage(result) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose keys/values a recent request left (a
    conversation's earlier turns), which were not computed again."""
    p, c = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": result.stats.reused_prefix}}


class Formatter:
    """Bodies for one request to ``chat`` (``/v1/chat/completions``) or ``text`` (``/v1/completions``)."""

    def __init__(self, kind: str, model: str, method: str, include_usage: bool = False):
        self.chat = kind == "chat"
        self.model, self.method, self.include_usage = model, method, include_usage
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def _chunk(self, choices: list, **more) -> bytes:
        """One stream chunk; with ``include_usage`` every chunk but the last carries ``usage: null`` (OpenAI)."""
        body = {**self._head(self._chunk_object), "choices": choices, **more}
        if self.include_usage:
            body.setdefault("usage", None)
        return sse(body)

    def _choice(self, text: str | None, finish: str | None, whole: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def whole(self, result, queue_s: float) -> dict:
        """The non-streaming response."""
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [self._choice(result.text, result.finish_reason, whole=True)],
                "usage": usage(result), "eagle2": stats(result.stats, self.method, queue_s)}

    def first(self) -> bytes:
        """What a stream opens with (chat: the assistant role; completions: nothing)."""
        if not self.chat:
            return b""
        return self._chunk([self._choice(None, None, False, first=True)])

    def round(self, r) -> bytes:
        """One scheduler ``Round`` as a chunk (nothing when it added no text)."""
        if not r.text:
            return b""
        ext = {"draft_text": r.draft_text, "tokens": r.tokens, "drafted": r.drafted, "method": self.method, **r.live}
        return self._chunk([self._choice(r.text, None, False)], eagle2=ext)

    def last(self, result, queue_s: float) -> bytes:
        """The finish chunk with the stats, the usage chunk when asked for, and [DONE]."""
        out = self._chunk([self._choice(None, result.finish_reason, False)], eagle2=stats(result.stats, self.method,
                                                                                             queue_s))
        if self.include_usage:
            out += self._chunk([], usage=usage(result))
        return out + DONE
