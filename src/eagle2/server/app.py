"""The FastAPI app: OpenAI-style ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health`` and the web chat page at ``/``.

Concurrency model: the generator decodes one sequence at a time, so a single worker thread runs
every generation; requests wait in a bounded FIFO queue (503 + Retry-After when it is full). The
event loop never runs the model. A streaming client that disconnects sets its job's cancel flag;
the worker checks it after every target forward and closes the decode, so the slot frees within
one round. Prompts are tokenized (and checked against the context) before a request is queued, in
a separate one-thread pool, so bad requests get their 400 at once.

Extensions to the OpenAI schema: the request field ``method`` (``eagle2`` default, ``eagle1``,
``chain``, ``vanilla``) plus ``top_k``; every response carries ``eagle2`` with the speculative
stats; every streamed chunk carries ``eagle2`` with this round's ``draft_text`` (the prefix of
``delta.content`` that came from accepted drafts; the rest is the target's bonus token), token
counts and the live stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import METHODS

log = logging.getLogger("eagle2.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_TOKENS = 512  # chat, when a request gives no max_tokens (capped by the context left)
COMPLETIONS_MAX_TOKENS = 16  # /v1/completions default, as OpenAI's
KEEPALIVE_S = 5.0  # SSE comment interval while a streaming request waits in the queue


# ---- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _err(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    return APIError(status, message, type, param, code, headers).response()


# ---- request schemas ---------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown OpenAI fields are accepted, ignored


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Stop = Union[str, Annotated[list[str], Field(max_length=4)], None]


class _Common(_Strict):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # extension
    n: Annotated[int, Field(ge=1, le=1)] | None = None  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None  # only the no-op value
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    user: str | None = None
    method: Literal[METHODS] = "eagle2"  # extension: eagle2 | eagle1 | chain | vanilla  # type: ignore[valid-type]


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None


class CompletionRequest(_Common):
    prompt: Union[str, Annotated[list[int], Field(min_length=1)], Annotated[list[str], Field(min_length=1, max_length=1)],
                  Annotated[list[list[int]], Field(min_length=1, max_length=1)]]
    echo: Literal[False] | None = None
    logprobs: None = None
    suffix: None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None


# ---- the worker --------------------------------------------------------------------------------
class QueueFull(Exception):
    pass


class Job:
    def __init__(self, fn):
        self.fn = fn  # fn(job) runs in the worker thread
        self.cancel = threading.Event()
        self.state = "waiting"  # waiting -> running -> done, or waiting -> cancelled
        self.enqueued = time.perf_counter()
        self.started: float | None = None


class Scheduler:
    """One worker thread, a FIFO of at most ``max_queue`` waiting jobs (plus the running one)."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: Job | None = None
        self.completed = 0
        self.cancelled = 0
        self.rejected = 0
        self._thread: threading.Thread | None = None
        self._avg_s = 1.0  # running mean of job seconds, for Retry-After

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="eagle2-worker", daemon=True)
            self._thread.start()

    def submit(self, fn) -> Job:
        with self._lock:
            if self.waiting >= self.max_queue and not (self.running is None and self.waiting == 0):
                self.rejected += 1
                raise QueueFull
            job = Job(fn)
            self.waiting += 1
            self._ensure_thread()
        self._q.put(job)
        return job

    def cancel(self, job: Job) -> None:
        job.cancel.set()
        with self._lock:
            if job.state == "waiting":  # never started: free its place now
                job.state = "cancelled"
                self.waiting -= 1
                self.cancelled += 1

    def retry_after(self) -> int:
        return max(1, int(self._avg_s * (self.waiting + 1) + 0.999))

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                if job.state == "cancelled":
                    continue
                job.state = "running"
                self.waiting -= 1
                self.running = job
            job.started = time.perf_counter()
            try:
                job.fn(job)
            except BaseException:  # fn reports its own errors; never let the worker die
                log.exception("generation job failed")
            finally:
                with self._lock:
                    job.state = "done"
                    self.running = None
                    if job.cancel.is_set():
                        self.cancelled += 1
                    else:
                        self.completed += 1
                    self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - job.started)

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)

    def snapshot(self) -> dict:
        with self._lock:
            return {"running": int(self.running is not None), "waiting": self.waiting, "max_queue": self.max_queue,
                    "completed": self.completed, "cancelled": self.cancelled, "rejected": self.rejected}


# ---- helpers -----------------------------------------------------------------------------------
def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.type != "text" or p.text is None:
            raise APIError(400, f"unsupported content part type {p.type!r}: only text parts are supported",
                           param="messages")
        parts.append(p.text)
    return "".join(parts)


def _stats(stats, method: str, queue_s: float = 0.0) -> dict:
    return {"method": method, "mean_accept_len": round(stats.mean_accept_len, 3),
            "tokens_per_s": round(stats.tokens_per_s, 2), "rounds": stats.rounds, "new_tokens": stats.new_tokens,
            "seconds": round(stats.seconds, 4), "queue_seconds": round(queue_s, 4)}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


# ---- the app -----------------------------------------------------------------------------------
def create_app(generator, api_key: str | None = None, max_queue: int = 16, model_name: str | None = None) -> FastAPI:
    """The server for ``generator`` (an ``Eagle2Generator``). ``api_key``: require
    ``Authorization: Bearer <key>`` on /v1/*. ``max_queue``: requests that may wait while one runs."""
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0; got {max_queue!r}")
    gen = generator
    name = model_name or getattr(gen, "model_key", "") or "eagle2"
    sched = Scheduler(max_queue)
    tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle2-tokenize")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        sched.stop()
        tok_pool.shutdown(wait=False)

    app = FastAPI(title="eagle2", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible EAGLE-2 speculative decoding server")
    app.state.scheduler = sched
    app.state.generator = gen
    app.state.model_name = name

    # ---- errors as OpenAI bodies ----
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return _err(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        param = ".".join(loc) or None
        if e.get("type") == "missing" and not loc:
            return _err(400, "request body is missing (send a JSON object)")
        msg = f"{param}: {e.get('msg')}" if param else str(e.get("msg"))
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
        return _err(400, msg, param=param.split(".")[0] if param else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _err(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return _err(500, f"internal server error: {type(exc).__name__}", type="server_error")

    # ---- API key ----
    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            h = request.headers.get("authorization", "")
            scheme, _, token = h.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return _err(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # ---- plain endpoints ----
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "head": getattr(gen, "head_source", ""),
                "device": str(getattr(gen, "device", "")), "dtype": str(getattr(gen, "dtype", "")).replace("torch.", ""),
                "max_context": gen.max_context, "auth": bool(api_key), "queue": sched.snapshot()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "eagle2",
                                            "max_context": gen.max_context}]}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---- generation ----
    async def prepare(req: _Common, prompt, raw: bool, max_tokens: int | None,
                      default: int = DEFAULT_MAX_TOKENS) -> tuple[list[int], dict]:
        """Tokenize (off the event loop) and check everything; returns (prompt ids, decode kwargs)."""

        def encode():
            if raw:
                if isinstance(prompt, str):
                    if not prompt.strip():
                        raise ValueError("prompt is empty")
                    return list(gen.tokenizer(prompt)["input_ids"])
                return gen.encode_prompt(prompt)
            return gen.encode_prompt(prompt)

        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(tok_pool, encode)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt" if raw else "messages")
        except Exception as e:  # e.g. a chat template that rejects this conversation
            raise APIError(400, f"cannot build the prompt: {e}", param="prompt" if raw else "messages")
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt" if raw else "messages")
        ctx = gen.max_context
        room = ctx - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's maximum context length is {ctx} "
                                "tokens, leaving no room to generate", param="messages" if not raw else "prompt",
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens; the prompt has {len(ids)} "
                                f"and max_tokens asks for {max_tokens} more (at most {room})", param="max_tokens",
                           code="context_length_exceeded")
        stop = req.stop
        kwargs = dict(max_new_tokens=max_tokens if max_tokens is not None else min(default, room),
                      method=req.method, temperature=0.0 if req.temperature is None else float(req.temperature),
                      top_p=1.0 if req.top_p is None else float(req.top_p), top_k=req.top_k or 0, seed=req.seed,
                      stop=[stop] if isinstance(stop, str) else stop)
        return ids, kwargs

    def submit(fn) -> Job:
        try:
            return sched.submit(fn)
        except QueueFull:
            ra = sched.retry_after()
            raise APIError(503, f"the server is busy: {sched.max_queue} requests are already waiting; retry later",
                           type="server_error", code="queue_full", headers={"Retry-After": str(ra)})

    async def complete(request: Request, ids: list[int], kwargs: dict):
        """Run one generation to the end; returns (result, queue seconds). Cancels on disconnect."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def fn(job: Job):
            try:
                events, result = gen.stream_events(ids, **kwargs)
                try:
                    for _ in events:
                        if job.cancel.is_set():
                            break
                finally:
                    events.close()
                out = (result, job.started - job.enqueued)
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(out))
            except BaseException as e:  # noqa: BLE001 (handed to the request)
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(e))

        job = submit(fn)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.5)
                if done:
                    break
                if await request.is_disconnected():
                    sched.cancel(job)
                    raise APIError(499, "client disconnected")
        except BaseException:
            sched.cancel(job)
            raise
        try:
            return fut.result()
        except ValueError as e:
            raise APIError(400, str(e))

    def stream(request: Request, ids: list[int], kwargs: dict, make_chunk, final_extra):
        """Submit the job now (so a full queue is a 503) and return the SSE response."""
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue = asyncio.Queue()

        def put(item):
            loop.call_soon_threadsafe(aq.put_nowait, item)

        def fn(job: Job):
            put(("start", job.started - job.enqueued))
            try:
                events, result = gen.stream_events(ids, **kwargs)
                try:
                    for ev in events:
                        if job.cancel.is_set():
                            break
                        st = ev.stats
                        put(("round", ev.text, ev.draft_text, len(ev.token_ids), ev.drafted,
                             {"tokens_per_s": round(st.tokens_per_s, 2), "mean_accept_len": round(st.mean_accept_len, 3),
                              "rounds": st.rounds, "new_tokens": st.new_tokens}))
                finally:
                    events.close()
                put(("done", result))
            except BaseException as e:  # noqa: BLE001
                put(("error", e))

        job = submit(fn)

        async def body():
            queue_s, finished = 0.0, False
            try:
                yield make_chunk(None, None, first=True)
                while True:
                    try:
                        item = await asyncio.wait_for(aq.get(), timeout=KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield b": waiting\n\n"
                        continue
                    kind = item[0]
                    if kind == "start":
                        queue_s = item[1]
                    elif kind == "round":
                        _, text, draft_text, ntok, drafted, live = item
                        if text:
                            yield make_chunk(text, {"draft_text": draft_text, "tokens": ntok, "drafted": drafted,
                                                    "method": kwargs["method"], **live})
                    elif kind == "error":
                        e = item[1]
                        err = APIError(400, str(e)) if isinstance(e, ValueError) else \
                            APIError(500, f"generation failed: {type(e).__name__}", type="server_error")
                        finished = True
                        yield _sse(err.body())
                        yield b"data: [DONE]\n\n"
                        return
                    else:
                        result, finished = item[1], True
                        for chunk in final_extra(result, queue_s):
                            yield chunk
                        yield b"data: [DONE]\n\n"
                        return
            finally:
                if not finished:  # the client went away (or the server stops): stop decoding, free the slot
                    sched.cancel(job)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(result) -> dict:
        p, c = len(result.prompt_token_ids), len(result.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                for m in req.messages]
        ids, kwargs = await prepare(req, msgs, raw=False, max_tokens=max_tokens)
        rid, ts = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            result, queue_s = await complete(request, ids, kwargs)
            return {"id": rid, "object": "chat.completion", "created": ts, "model": name, "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "logprobs": None, "finish_reason": result.finish_reason}],
                    "usage": usage(result), "eagle2": _stats(result.stats, req.method, queue_s)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text, ext, first=False, finish=None, extra=None):
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            obj = {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": name,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if ext is not None:
                obj["eagle2"] = ext
            if extra:
                obj.update(extra)
            return _sse(obj)

        def final(result, queue_s):
            yield chunk(None, _stats(result.stats, req.method, queue_s), finish=result.finish_reason)
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": ts, "model": name,
                            "system_fingerprint": None, "choices": [], "usage": usage(result)})

        return stream(request, ids, kwargs, chunk, final)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        ids, kwargs = await prepare(req, prompt, raw=True, max_tokens=req.max_tokens, default=COMPLETIONS_MAX_TOKENS)
        rid, ts = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            result, queue_s = await complete(request, ids, kwargs)
            return {"id": rid, "object": "text_completion", "created": ts, "model": name, "system_fingerprint": None,
                    "choices": [{"index": 0, "text": result.text, "logprobs": None,
                                 "finish_reason": result.finish_reason}],
                    "usage": usage(result), "eagle2": _stats(result.stats, req.method, queue_s)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text, ext, first=False, finish=None):
            if first:
                return b""
            obj = {"id": rid, "object": "text_completion", "created": ts, "model": name, "system_fingerprint": None,
                   "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}
            if ext is not None:
                obj["eagle2"] = ext
            return _sse(obj)

        def final(result, queue_s):
            yield chunk(None, _stats(result.stats, req.method, queue_s), finish=result.finish_reason)
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": ts, "model": name,
                            "system_fingerprint": None, "choices": [], "usage": usage(result)})

        return stream(request, ids, kwargs, chunk, final)

    return app


# ---- running it --------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6); ``ValueError`` when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _server(app, sock, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, access_log=False)
    return uvicorn.Server(config)


def run(generator, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_queue: int = 16,
        log_level: str = "warning", on_ready=None) -> None:
    """Serve ``generator`` until interrupted. ``api_key`` None falls back to ``$EAGLE2_API_KEY``."""
    if api_key is None:
        api_key = os.environ.get("EAGLE2_API_KEY") or None
    app = create_app(generator, api_key=api_key, max_queue=max_queue)
    sock = bind_socket(host, port)
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    server = _server(app, sock, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run ``app`` with uvicorn in a background thread; yields the base URL (tests, load test)."""
    sock = bind_socket(host, port)
    server = _server(app, sock, log_level)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="eagle2-uvicorn", daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and t.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    h, p = sock.getsockname()[:2]
    try:
        yield f"http://{'[' + h + ']' if ':' in h else h}:{p}"
    finally:
        server.should_exit = True
        t.join(timeout=10)
        sock.close()
