"""The HTTP endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``, ``/``.

Handlers read everything from ``request.app.state.eagle2`` (an ``AppState``). A generation request
is checked (size, then tokenized on the tokenizer thread, then context and sampling parameters)
before it may start, so every bad parameter is a real 400, streaming or not. Then both endpoints
take one path: the job's events are followed while watching the client, which cancels the job
whether it waits or runs, and are formatted whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse

from ..config import DecodeSettings
from .config import ServerConfig
from .errors import APIError, shutting_down
from .responses import KEEPALIVE, Formatter, sse_error
from .scheduler import Done, Failed, Job, QueueFull, Round, Scheduler, ShuttingDown, Started
from .schemas import ChatMessage, ChatRequest, Common, CompletionRequest, unsupported

log = logging.getLogger("eagle2.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_TOKENS = 512  # chat, when a request gives no max_tokens (capped by the context left)
COMPLETIONS_MAX_TOKENS = 16  # /v1/completions default, as OpenAI's
KEEPALIVE_S = 5.0  # SSE comment interval while a streaming request has nothing to send

router = APIRouter()


@dataclass(frozen=True)
class AppState:
    generator: object  # an Eagle2Generator (or anything with its encode_prompt / stream_events)
    config: ServerConfig
    scheduler: Scheduler
    tokenizer_pool: ThreadPoolExecutor  # one thread: tokenizing never runs on the event loop
    model_name: str
    created: int


def _state(request: Request) -> AppState:
    return request.app.state.eagle2


# ---- plain endpoints (HEAD too: probes and ``curl -I``) -------------------------------------------
@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health(request: Request):
    s = _state(request)
    gen, cfg = s.generator, s.config
    head = str(getattr(gen, "head_source", "") or "")
    return {"status": "ok", "model": s.model_name, "head": Path(head).name if head else "",
            "device": str(getattr(gen, "device", "")), "dtype": str(getattr(gen, "dtype", "")).replace("torch.", ""),
            "max_context": gen.max_context, "auth": cfg.api_key is not None, "queue": s.scheduler.snapshot(),
            "limits": {"max_body_bytes": cfg.max_body_bytes, "max_prompt_chars": cfg.max_prompt_chars,
                       "body_timeout_s": cfg.body_timeout_s}}


def _model_card(s: AppState) -> dict:
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "eagle2",
            "max_context": s.generator.max_context}


@router.get("/v1/models")
@router.head("/v1/models", include_in_schema=False)
async def models(request: Request):
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model_id:path}")
@router.head("/v1/models/{model_id:path}", include_in_schema=False)
async def model(model_id: str, request: Request):
    s = _state(request)
    if model_id != s.model_name:
        raise APIError(404, f"the model {model_id[:80]!r} does not exist; this server serves {s.model_name!r}",
                       param="model", code="model_not_found")
    return _model_card(s)


@router.get("/", include_in_schema=False)
@router.head("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


# ---- generation endpoints ----------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    _refuse_unsupported(req)
    if not getattr(_state(request).generator.tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template (a base model): use /v1/completions with a raw prompt",
                       param="messages", code="no_chat_template")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
            for m in req.messages]
    return await _generate(request, req, msgs, "chat", max_tokens, DEFAULT_MAX_TOKENS)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    _refuse_unsupported(req)
    prompt = req.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    return await _generate(request, req, prompt, "text", req.max_tokens, COMPLETIONS_MAX_TOKENS)


def _refuse_unsupported(req: Common) -> None:
    """A request asking for what this server does not do is refused, not answered as if it had not asked."""
    name = unsupported(req)
    if name:
        raise APIError(400, f"{name} is not supported by this server (leave it out, or give its no-op value)",
                       param=name, code="unsupported_parameter")
    for i, m in enumerate(getattr(req, "messages", ())):
        if (m.model_extra or {}).get("tool_calls"):
            raise APIError(400, "tool calls are not supported by this server (messages carry tool_calls)",
                           param=f"messages.{i}.tool_calls", code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.type != "text":
            raise APIError(400, f"unsupported content part type {p.type!r:.40}: only text parts are supported",
                           param="messages", code="unsupported_parameter")
        if p.text is None:
            raise APIError(400, "a text content part needs its 'text'", param="messages")
        parts.append(p.text)
    return "".join(parts)


async def _generate(request: Request, req: Common, prompt, kind: str, max_tokens: int | None, default: int):
    s = _state(request)
    param = "messages" if kind == "chat" else "prompt"
    _check_size(prompt, s, param)
    job = _reserve(s.scheduler)
    try:
        job.ids, job.settings = await _prepare(s, req, prompt, param, max_tokens, default)
    except BaseException:
        s.scheduler.release(job)
        raise
    job.stream = req.stream
    s.scheduler.start(job)
    fmt = Formatter(kind, s.model_name, req.method, req.include_usage)
    if req.stream:
        return JobStream(_stream_body(request, s.scheduler, job, fmt), s.scheduler, job)
    return await _whole(request, s.scheduler, job, fmt)


class JobStream(StreamingResponse):
    """The SSE response of a job. However the response ends (even before its body started: a client
    that left at once), an unfinished job is cancelled."""

    def __init__(self, body, sched: Scheduler, job: Job):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sched, self.job = sched, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.resolved:
                self.sched.cancel(self.job)


def _reserve(sched: Scheduler) -> Job:
    try:
        return sched.reserve(asyncio.get_running_loop())
    except QueueFull:
        raise APIError(503, f"the server is busy: {sched.max_queue} requests are already waiting; retry later",
                       type="server_error", code="queue_full",
                       headers={"Retry-After": str(sched.retry_after())}) from None
    except ShuttingDown:
        raise shutting_down() from None


# ---- checks before a job may start -------------------------------------------------------------
def _check_size(prompt, s: AppState, param: str) -> None:
    """Cheap bounds before any tokenizing: characters of text, count of token ids, valid Unicode."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        if len(prompt) >= s.generator.max_context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's maximum context length is "
                                f"{s.generator.max_context} tokens, leaving no room to generate", param=param,
                           code="context_length_exceeded")
        return
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    chars = sum(len(t) for t in texts)
    limit = s.config.max_prompt_chars
    if chars > limit:
        raise APIError(400, f"the prompt has {chars} characters; this server takes at most {limit}", param=param,
                       code="prompt_too_long")
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the prompt is not valid Unicode text (it holds a lone surrogate)",
                           param=param) from None


def _encode(gen, prompt, param: str) -> list[int]:
    """Token ids of a prompt (runs on the tokenizer thread)."""
    if param == "prompt" and isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return list(gen.tokenizer(prompt)["input_ids"])
    return gen.encode_prompt(prompt)


async def _tokenize(s: AppState, prompt, param: str) -> list[int]:
    loop = asyncio.get_running_loop()
    try:
        ids = await loop.run_in_executor(s.tokenizer_pool, _encode, s.generator, prompt, param)
    except ValueError as e:
        raise APIError(400, str(e).splitlines()[0] if str(e) else "invalid prompt", param=param) from None
    except Exception as e:  # e.g. a chat template that rejects this conversation: its text is not for clients
        log.warning("cannot build the prompt: %s: %s", type(e).__name__, e)
        raise APIError(400, "cannot build the prompt from this input", param=param) from None
    if not ids:
        raise APIError(400, "prompt is empty", param=param)
    return ids


async def _prepare(s: AppState, req: Common, prompt, param: str, max_tokens: int | None,
                   default: int) -> tuple[list[int], DecodeSettings]:
    """Tokenize and check everything; returns (prompt ids, decode settings)."""
    ids = await _tokenize(s, prompt, param)
    ctx = s.generator.max_context
    room = ctx - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's maximum context length is {ctx} "
                            "tokens, leaving no room to generate", param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        field = "max_completion_tokens" if getattr(req, "max_tokens", None) is None else "max_tokens"
        raise APIError(400, f"this model's maximum context length is {ctx} tokens; the prompt has {len(ids)} "
                            f"and {field} asks for {max_tokens} more (at most {room})", param=field,
                       code="context_length_exceeded")
    try:  # the engine's own checks, now rather than inside the stream
        settings = DecodeSettings.of(
            max_new_tokens=max_tokens if max_tokens is not None else min(default, room), method=req.method,
            temperature=0.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=req.top_k or 0, seed=req.seed,
            stop=req.stop or ())
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return ids, settings


# ---- following a job ---------------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the server's ``http.disconnect``)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # not expected after the body; never spin on it


async def _follow(request: Request, sched: Scheduler, job: Job, tick: float | None = None):
    """The job's events up to its terminal one (``Done`` or ``Failed``); ``None`` after every ``tick``
    seconds without one. Ends early when the client disconnects, and then cancels the job."""
    gone = asyncio.ensure_future(_disconnected(request))
    get = None
    finished = False
    try:
        while True:
            get = get or asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({get, gone}, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                event, get = get.result(), None
                finished = isinstance(event, (Done, Failed))
                yield event
                if finished:
                    return
            elif gone in done:
                return
            else:
                yield None
    finally:
        gone.cancel()
        if get is not None:
            get.cancel()
        if not finished:  # the client went away (or the server stops): stop decoding, free the place
            sched.cancel(job)


async def _whole(request: Request, sched: Scheduler, job: Job, fmt: Formatter) -> dict:
    queue_s = 0.0
    async with contextlib.aclosing(_follow(request, sched, job)) as events:
        async for event in events:
            if isinstance(event, Started):
                queue_s = event.queue_s
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Done):
                return fmt.whole(event.result, queue_s)
    raise APIError(499, "client disconnected")


async def _stream_body(request: Request, sched: Scheduler, job: Job, fmt: Formatter):
    queue_s = 0.0
    first = fmt.first()
    if first:
        yield first
    async with contextlib.aclosing(_follow(request, sched, job, tick=KEEPALIVE_S)) as events:
        async for event in events:
            if event is None:
                yield KEEPALIVE
            elif isinstance(event, Started):
                queue_s = event.queue_s
            elif isinstance(event, Round):
                piece = fmt.round(event)
                if piece:
                    yield piece
            elif isinstance(event, Failed):
                yield sse_error(event.error)
            else:
                yield fmt.last(event.result, queue_s)
