"""The one worker thread that runs every generation, and the bounded FIFO in front of it.

The worker decodes up to ``parallel`` jobs side by side: each step advances every one of them by one
target forward, the forwards run together in one pass over the weights (``generator.step_together``;
each job's tokens are those it gets alone), so a short request is not held behind a long one and the
jobs share the cost of reading the weights; the others wait in FIFO order. A request first *reserves*
a place (so the limit ``max_queue`` also bounds requests still being tokenized; a full queue is
refused before any work), then *starts* its job. For each job
the worker streams the generator's rounds to the job's event queue on the event loop, checks the
job's cancel flag before every target forward, and always ends with exactly one terminal event
(``Done`` or ``Failed``), whatever goes wrong, so no request waits forever. ``close`` (the server
stops) ends every job at once, waiting or running, with a 503, and refuses new ones. This module
knows nothing of HTTP.
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


def _round(ev) -> Round:
    st = ev.stats
    return Round(ev.text, ev.draft_text, len(ev.token_ids), ev.drafted,
                 {"tokens_per_s": round(st.tokens_per_s, 2), "mean_accept_len": round(st.mean_accept_len, 3),
                  "rounds": st.rounds, "new_tokens": st.new_tokens})


class Decoding:
    """One job the worker decodes: its engine decode (``generator.begin``), advanced one target forward per
    ``step_together``, and the worker seconds spent on it (its share of each step it took part in)."""

    def __init__(self, generator, job: Job):
        self.job, self.decode, self.result, self.work_s = job, None, None, 0.0
        job.emit(Started(time.perf_counter() - job.enqueued))
        t0 = time.perf_counter()
        try:
            self.decode, self.result = generator.begin(job.ids, job.settings)
        except Exception as e:  # noqa: BLE001 (answered to the request that caused it)
            job.emit(Failed(from_generation(e)))
        self.work_s += time.perf_counter() - t0

    def wanted(self) -> bool:
        """Whether it takes the next forward: it runs, and has neither ended nor lost its client."""
        return self.decode is not None and not self.job.resolved and not self.job.cancel.is_set()

    def take(self, step, seconds: float) -> bool:
        """Send what the job's step produced (its events if streamed, its end); whether the job has ended
        (its terminal event sent, or its client gone)."""
        job = self.job
        self.work_s += seconds
        if job.cancel.is_set():
            return True
        if job.stream:
            for ev in step.events:
                job.emit(_round(ev))
        if step.error is not None:
            job.emit(Failed(from_generation(step.error)))
        elif step.ended:
            job.emit(Done(self.result))
        return step.ended or step.error is not None

    def close(self, generator) -> None:
        """End the engine's decode (its cleanup keeps the cache for a next turn)."""
        if self.decode is not None:
            decode, self.decode = self.decode, None
            generator.end(decode)


class Scheduler:
    """One worker thread that decodes up to ``parallel`` jobs side by side, and a FIFO of at most
    ``max_queue`` reserved or waiting jobs behind them."""

    def __init__(self, generator, max_queue: int, parallel: int):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1; got {parallel}")
        self.generator = generator
        self.max_queue, self.parallel = max_queue, parallel
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: list[Job] = []  # the jobs being decoded
        self.completed = self.cancelled = self.rejected = 0
        self._thread: threading.Thread | None = None
        self._avg_s = 1.0  # running mean of a job's own worker seconds, for Retry-After
        self.closed = False  # the server stops: no new job, every job ended

    def reserve(self, loop: asyncio.AbstractEventLoop) -> Job:
        """A place in the queue, or ``QueueFull`` (``ShuttingDown``). Release it with ``start``, ``cancel``
        or ``release``. A job that will find a free decoding slot takes no place in the queue."""
        with self._lock:
            if self.closed:
                raise ShuttingDown
            if self.waiting >= self.max_queue + self.parallel - len(self.running):
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
        leave the queue) and the running ones (whose decoding stops before their next round)."""
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
            for job in self.running:
                if not job.resolved:
                    job.cancel.set()
                    job.emit(Failed(shutting_down()))
        self._q.put(None)  # the worker exits once its jobs have stopped

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
            self.running.append(job)
            return True

    def _finish(self, work: Decoding | None, job: Job) -> None:
        if not job.resolved and not job.cancel.is_set():  # never leave a request waiting (a cancelled one has left)
            job.emit(Failed(internal("generation failed")))
        with self._lock:
            job.state = "done"
            self.running.remove(job)
            if job.cancel.is_set():
                self.cancelled += 1
            else:
                self.completed += 1
            if work is not None:
                self._avg_s = 0.8 * self._avg_s + 0.2 * work.work_s

    def _admit(self, decoding: list[Decoding]) -> bool:
        """Start queued jobs while a slot is free (waiting for one when nothing is decoded); False once the
        server stops and nothing is left to decode."""
        while len(decoding) < self.parallel:
            try:
                job = self._q.get(block=not decoding)
            except queue.Empty:
                return True
            if job is None:
                self._q.put(None)  # seen again (and then final) once the jobs in hand have stopped
                return bool(decoding)
            if not self._take(job):
                continue
            try:
                decoding.append(Decoding(self.generator, job))
            except BaseException:  # never let the worker die, never leave a request waiting
                log.exception("generation job failed")
                self._finish(None, job)
        return True

    def _loop(self) -> None:
        decoding: list[Decoding] = []  # the jobs decoded side by side, each taking one forward per step
        while self._admit(decoding):
            live = []
            for work in decoding:
                if work.wanted():
                    live.append(work)
                else:
                    self._end(work)
            decoding = []
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                steps = self.generator.step_together([work.decode for work in live])
            except BaseException:  # never let the worker die, never leave a request waiting
                log.exception("generation step failed")
                steps = None
            share = (time.perf_counter() - t0) / len(live)
            for i, work in enumerate(live):
                try:
                    ended = steps is None or work.take(steps[i], share)
                except BaseException:
                    log.exception("generation job failed")
                    ended = True
                if ended:
                    self._end(work)
                else:
                    decoding.append(work)

    def _end(self, work: Decoding) -> None:
        try:
            work.close(self.generator)
        except BaseException:  # never let the worker die
            log.exception("closing a generation failed")
        self._finish(work, work.job)

    def stop(self, timeout: float | None = None) -> bool:
        """End every job (``close``) and wait (up to ``timeout`` s) for the worker; whether it has exited."""
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def snapshot(self) -> dict:
        with self._lock:
            return {"running": len(self.running), "parallel": self.parallel, "waiting": self.waiting,
                    "max_queue": self.max_queue,
                    "completed": self.completed, "cancelled": self.cancelled, "rejected": self.rejected}
