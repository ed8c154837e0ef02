"""The thread that runs a loaded generator's rounds for every thread but the main one.

Boundary: scheduling only. It runs callables one at a time, in the order they arrive, and hands back
their results or exceptions; it knows nothing of models. ``api.load`` gives each generator the
process's compute thread (``shared()``), and the generator decides which calls go there
(``Eagle2Generator._on_compute``).

Why: torch's OpenMP runtime (libgomp) keeps a pool of worker threads for every thread that starts
parallel work, for as long as that thread lives. Once the pools hold more threads than the machine
has CPUs, every pool sleeps between parallel regions instead of spinning, and a forward is a few
hundred regions: a model decoded from a second thread, or from a pool of request threads, ran at
about half speed on a 2-core CPU. Rounds from those threads, routed through one long-lived thread,
share one pool. A hop (two thread wake-ups) costs well under a millisecond, against a round of
about ten. The thread is process-wide because the pools are.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class _Job:
    """One call waiting for, or done on, the compute thread."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def execute(self) -> None:
        try:
            self.value = self.fn(*self.args, **self.kwargs)
        except BaseException as e:  # noqa: BLE001 (handed to the caller, which raises it)
            self.error = e
        finally:
            self.fn = self.args = self.kwargs = None  # drop references the caller may be done with
            self.done.set()


class ComputeThread:
    """A daemon thread that runs submitted calls one at a time, in the order they arrive."""

    def __init__(self, name: str = "eagle2-compute") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._running = 0  # calls under way or queued (busy())

    def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the compute thread: its result, or its exception raised here.
        Called from the compute thread itself (a load that builds a generator), it runs inline.

        A KeyboardInterrupt in the caller stops only the wait: the call runs on to its end (a round
        lasts milliseconds; a load cannot be stopped midway), and later calls queue behind it."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        job = _Job(fn, args, kwargs)
        with self._start_lock:
            self._start_if_needed()
            self._running += 1
        self._jobs.put(job)
        job.done.wait()  # interruptible: Ctrl-C raises here
        if job.error is not None:
            error, job.error = job.error, None  # no cycle through the job once raised
            raise error
        return job.value

    def busy(self) -> bool:
        """Whether a call is under way or queued (a process quitting on Ctrl-C then exits at once:
        a thread left inside torch can abort the interpreter's normal exit)."""
        return self._running > 0

    def _start_if_needed(self) -> None:  # under _start_lock
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.execute()
            finally:
                with self._start_lock:
                    self._running -= 1


_SHARED = ComputeThread()


def shared() -> ComputeThread:
    """The process's compute thread (started on first use)."""
    return _SHARED
