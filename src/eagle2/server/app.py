"""Assembling and running the server: ``create_app``, ``run`` and ``serve_in_thread``.

The pieces live beside this module: ``schemas`` (request bodies), ``scheduler`` (the worker and
its queue), ``responses`` (OpenAI bodies and SSE chunks), ``routes`` (the endpoints), ``guard``
(Host, key and body-size checks at the ASGI layer), ``errors`` and ``config`` (``ServerConfig``).

Concurrency model: one worker thread runs every generation, up to ``parallel`` of them side by side,
their target forwards run together (``scheduler``); further requests wait in a bounded FIFO (503 +
Retry-After when it is full); tokenizing runs on its own thread, inside the same bound. The event loop never runs the model, and the native
forward releases the GIL while it computes, so the server stays responsive during a long prefill.
When the server is told to stop (Ctrl-C, SIGTERM), every job ends at once, before uvicorn's grace
period: a stream in progress with an SSE error event, a waiting request with a 503; ``run`` then
waits for the worker to leave the forward it is in (a round, or a chunk of a long prompt's prefill).
The worker hands each step to the generator, and a generator from ``eagle2.load`` runs it on the
process's compute thread (``eagle2.compute``): one OpenMP pool, whichever thread asks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from . import errors
from .config import ServerConfig
from .guard import Guard
from .routes import STATIC_DIR, AppState, router
from .scheduler import Scheduler

log = logging.getLogger("eagle2.server")


def create_app(generator, config: ServerConfig | None = None, **settings) -> FastAPI:
    """The server for ``generator`` (an ``Eagle2Generator``). ``config`` (or ``ServerConfig``'s fields
    as keywords, e.g. ``api_key=``, ``max_queue=``) says what it accepts."""
    config = replace(config or ServerConfig(), **settings)
    name = config.model_name or getattr(generator, "model_key", "") or "eagle2"
    sched = Scheduler(generator, config.max_queue, config.parallel)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle2-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        sched.close()
        pool.shutdown(wait=False)

    docs = config.docs
    app = FastAPI(title="eagle2", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible EAGLE-2 speculative decoding server",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.eagle2 = AppState(generator, config, sched, pool, name, int(time.time()))
    errors.install(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(Guard, config=config)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6); ``ValueError`` when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e}") from None
    family, kind, proto, _, addr = infos[0]
    # proto says TCP: asyncio turns Nagle's algorithm off only on such sockets, else each response's
    # body waits for the client's delayed ACK of its head (~40 ms per answer and per stream chunk)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _server(app, log_level: str):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # end every job before uvicorn waits out its grace period for the responses in progress
            # (and then cuts them): each stream ends with an error event, each waiting request a 503
            app.state.eagle2.scheduler.close()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, access_log=False)
    return Server(config)


def run(generator, config: ServerConfig | None = None, port: int = 8000, log_level: str = "warning",
        on_ready=None) -> None:
    """Serve ``generator`` on ``config.host``:``port`` until interrupted. A config without a key takes
    ``$EAGLE2_API_KEY`` when that is set."""
    config = config or ServerConfig()
    if config.api_key is None and os.environ.get("EAGLE2_API_KEY"):
        config = replace(config, api_key=os.environ["EAGLE2_API_KEY"])
    app = create_app(generator, config)
    sock = bind_socket(config.host, port)
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    try:
        _server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
        _await_worker(app.state.eagle2.scheduler)


def _await_worker(sched: Scheduler) -> None:
    """Let the worker leave its forward before the interpreter exits: a thread still inside torch's
    native code then aborts the process (std::terminate). Ctrl-C again quits at once, without
    finalizing the interpreter, for the same reason."""
    try:
        if sched.running:
            log.warning("waiting for the forward in progress to end (Ctrl-C again quits at once)")
        while not sched.stop(timeout=0.2):  # a timed wait, so that a second Ctrl-C is seen
            pass
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run ``app`` with uvicorn in a background thread; yields the base URL (tests, load test)."""
    sock = bind_socket(host, port)
    server = _server(app, log_level)
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
