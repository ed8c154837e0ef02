"""The one worker thread that runs every generation, and the bounded FIFO in front of it.

The generator decodes one sequence at a time. A request first *reserves* a place (so the limit
``max_queue`` also bounds requests still being tokenized; a full queue is refused before any work),
then *starts* its job, which waits in FIFO order for the worker. The worker runs ``run_job``: it
streams the generator's rounds to the job's event queue on the event loop, checks the job's cancel
flag after every target forward, and always ends with exactly one terminal event (``Done`` or
``Failed``), whatever goes wrong, so no request waits forever. ``close`` (the server stops) ends
every job at once, waiting or running, with a 503, and refuses new ones. This module knows nothing
of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import APIError, from_generation, internal, shutting_down

log = logging.getLogger("eagle2.server")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class Started:
    queue_s: float  # seconds the job waited for the worker


@dataclass(frozen=True)
class Round:
    """One target forward's output, copied out of the engine's (mutable) stats in the worker."""

    text: str
    draft_text: str
    tokens: int
    drafted: int
    live: dict


@dataclass(frozen=True)
class Done:
    result: Any  # the GenerationResult


@dataclass(frozen=True)
class Failed:
    error: APIError


class Job:
    """One generation: its inputs, a cancel flag for the worker, events for the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.state = "reserved"  # reserved -> waiting -> running -> done; or reserved|waiting -> cancelled
        self.ids: list[int] = []
        self.settings = None  # the DecodeSettings the route validated
        self.stream = False  # whether the rounds are wanted (streaming) or only the end
        self.enqueued = time.perf_counter()
        self.resolved = False  # a terminal event was sent
        self._emitting = threading.Lock()

    def emit(self, event) -> None:
        """Hand an event to the event loop (from any thread); nothing after the terminal one (``close``
        may end a running job while its worker still sends rounds)."""
        with self._emitting:
            if self.resolved:
                return
            self.resolved = isinstance(event, (Done, Failed))
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is stopping, nobody is listening
            pass


def run_job(generator, job: Job) -> None:
    """The worker's whole job: decode, stream rounds if wanted, end with Done or Failed."""
    job.emit(Started(time.perf_counter() - job.enqueued))
    try:
        events, result = generator.stream_events(job.ids, job.settings)
        try:
            for ev in events:
                if job.cancel.is_set():
                    break
                if job.stream:
                    st = ev.stats
                    job.emit(Round(ev.text, ev.draft_text, len(ev.token_ids), ev.drafted,
                                   {"tokens_per_s": round(st.tokens_per_s, 2),
                                    "mean_accept_len": round(st.mean_accept_len, 3),
                                    "rounds": st.rounds, "new_tokens": st.new_tokens}))
        finally:
            events.close()
    except Exception as e:  # noqa: BLE001 (answered to the request that caused it)
        job.emit(Failed(from_generation(e)))
        return
    job.emit(Done(result))


class Scheduler:
    """One worker thread, a FIFO of at most ``max_queue`` reserved or waiting jobs (plus the running one)."""

    def __init__(self, generator, max_queue: int):
        self.generator = generator
        self.max_queue = max_queue
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: Job | None = None
        self.completed = self.cancelled = self.rejected = 0
        self._thread: threading.Thread | None = None
        self._avg_s = 1.0  # running mean of job seconds, for Retry-After
        self.closed = False  # the server stops: no new job, every job ended

    def reserve(self, loop: asyncio.AbstractEventLoop) -> Job:
        """A place in the queue, or ``QueueFull`` (``ShuttingDown``). Release it with ``start``, ``cancel``
        or ``release``."""
        with self._lock:
            if self.closed:
                raise ShuttingDown
            if self.waiting >= self.max_queue and not (self.running is None and self.waiting == 0):
                self.rejected += 1
                raise QueueFull
            self.waiting += 1
            return Job(loop)

    def start(self, job: Job) -> None:
        """Queue a reserved job for the worker (after its ids and settings are set)."""
        with self._lock:
            if job.state != "reserved":
                return
            if self.closed:  # it was being tokenized when the server began to stop
                self._drop(job)
                return
            job.state = "waiting"
            job.enqueued = time.perf_counter()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="eagle2-worker", daemon=True)
                self._thread.start()
        self._q.put(job)

    def release(self, job: Job) -> None:
        """Give back a reservation that will never start (the request failed before it)."""
        with self._lock:
            if job.state == "reserved":
                job.state = "cancelled"
                self.waiting -= 1

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it waits, stop it after this round if it runs."""
        job.cancel.set()
        with self._lock:
            if job.state in ("reserved", "waiting"):  # never started: free its place now
                job.state = "cancelled"
                self.waiting -= 1
                self.cancelled += 1

    def close(self) -> None:
        """The server stops: refuse new jobs and end every job now with a 503, the waiting ones (which
        leave the queue) and the running one (whose decoding stops after this round)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            while True:
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.state == "waiting":
                    self._drop(job)
            job = self.running
            if job is not None and not job.resolved:
                job.cancel.set()
                job.emit(Failed(shutting_down()))
        self._q.put(None)  # the worker exits after its job

    def _drop(self, job: Job) -> None:
        """End a job that never ran (the lock is held)."""
        job.state = "cancelled"
        self.waiting -= 1
        self.cancelled += 1
        job.emit(Failed(shutting_down()))

    def retry_after(self) -> int:
        return max(1, int(self._avg_s * (self.waiting + 1) + 0.999))

    def _take(self, job: Job) -> bool:
        with self._lock:
            if job.state == "cancelled":
                return False
            if self.closed:  # taken from the queue just as the server began to stop
                self._drop(job)
                return False
            job.state = "running"
            self.waiting -= 1
            self.running = job
            return True

    def _finish(self, job: Job, started: float) -> None:
        with self._lock:
            job.state = "done"
            self.running = None
            if job.cancel.is_set():
                self.cancelled += 1
            else:
                self.completed += 1
            self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - started)

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if not self._take(job):
                continue
            started = time.perf_counter()
            try:
                run_job(self.generator, job)
            except BaseException:  # never let the worker die, never leave a request waiting
                log.exception("generation job failed")
            finally:
                if not job.resolved:
                    job.emit(Failed(internal("generation failed")))
                self._finish(job, started)

    def stop(self, timeout: float | None = None) -> bool:
        """End every job (``close``) and wait (up to ``timeout`` s) for the worker; whether it has exited."""
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def snapshot(self) -> dict:
        with self._lock:
            return {"running": int(self.running is not None), "waiting": self.waiting, "max_queue": self.max_queue,
                    "completed": self.completed, "cancelled": self.cancelled, "rejected": self.rejected}
