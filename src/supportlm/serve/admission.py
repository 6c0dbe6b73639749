"""Admission: how many requests generate at once, how many may wait, how often a client may ask.

One `Admission` sits inside the `Assistant`, so every path that generates (each Gradio event,
the API endpoints, later the OpenAI API and MCP) shares the same bound: Gradio's own concurrency
limit is per event listener, so it alone would let several times the limit generate at once.
The limit is the engine's real parallelism at most (one for transformers, which serialises
requests anyway), and a request that cannot get a slot waits in line, up to `max_queue` of them;
the next one is refused at once with a clear message instead of timing out later.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from supportlm.errors import SupportLMError


class Busy(SupportLMError):
    """Too many requests: the queue is full or the client's rate limit is used up."""


class QueueFull(Busy):
    """Every generation slot is taken and the waiting line is full (the server, not the client)."""


class RateLimit:
    """At most `limit` calls per client in any `window_s` seconds (0: no limit).

    A sliding window of call times per client; the map forgets idle clients, so it stays bounded
    however many addresses a visitor uses.
    """

    def __init__(
        self, limit: int, window_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 0:
            raise SupportLMError("A rate limit is at least 0.")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: dict[str, collections.deque[float]] = {}

    def check(self, client_id: str | None, what: str = "requests") -> None:
        """Count one call by `client_id`; raises `Busy` when its limit is used up."""
        if not self.limit or client_id is None:
            return
        now = self._clock()
        with self._lock:
            recent = self._recent.setdefault(client_id, collections.deque())
            while recent and now - recent[0] >= self.window_s:
                recent.popleft()
            if len(recent) >= self.limit:
                raise Busy(f"Too many {what}: at most {self.limit} a minute; please wait a moment.")
            recent.append(now)
            if len(self._recent) > 10_000:  # forget clients idle for a whole window
                idle = [k for k, v in self._recent.items() if now - v[-1] >= self.window_s]
                for key in idle:
                    del self._recent[key]


class Admission:
    """A concurrency limit, a bounded waiting line and optional per-client rate limits."""

    def __init__(
        self,
        concurrency: int,
        max_queue: int,
        *,
        rate_limit: int = 0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1 or max_queue < 0 or rate_limit < 0:
            raise SupportLMError("concurrency must be at least 1, max_queue and rate_limit >= 0.")
        self.concurrency = concurrency
        self.max_queue = max_queue
        self._slots = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self.rate = RateLimit(rate_limit, window_s, clock=clock)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextlib.contextmanager
    def admit(self, client_id: str | None = None) -> Iterator[None]:
        """Hold a generation slot for the body; raises `Busy` when the request cannot wait."""
        self.rate.check(client_id)
        with self._lock:
            admitted = self._slots.acquire(blocking=False)
            if not admitted and self._waiting >= self.max_queue:
                raise QueueFull(
                    f"The assistant is busy ({self.concurrency} answering, {self._waiting} "
                    "waiting); please try again in a moment."
                )
            if not admitted:
                self._waiting += 1
        if not admitted:
            try:
                self._slots.acquire()
            finally:
                with self._lock:
                    self._waiting -= 1
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
            self._slots.release()
