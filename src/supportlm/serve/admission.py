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
    """At most `limit` calls (or bytes, or failures: any amount) per client in any `window_s`
    seconds (0: no limit).

    A sliding window of (time, amount) per client; the map forgets idle clients, so it stays
    bounded however many addresses a visitor uses.
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
        self._recent: dict[str, collections.deque[tuple[float, int]]] = {}

    def check(self, client_id: str | None, what: str = "requests") -> None:
        """Count one call by `client_id`; raises `Busy` when its limit is used up."""
        if not self.limit or client_id is None:
            return
        with self._lock:
            if self._used(client_id) >= self.limit:
                raise Busy(f"Too many {what}: at most {self.limit} a minute; please wait a moment.")
            self._add(client_id, 1)

    def left(self, client_id: str) -> int:
        """How much `client_id` may still use in the window (counts nothing)."""
        with self._lock:
            return self.limit - self._used(client_id)

    def used_up(self, client_id: str) -> bool:
        """Whether `client_id` has nothing left in the window (counts nothing)."""
        return bool(self.limit) and self.left(client_id) <= 0

    def record(self, client_id: str, amount: int = 1) -> None:
        """Count `amount` for `client_id` without checking the limit."""
        if self.limit:
            with self._lock:
                self._add(client_id, amount)

    def _used(self, client_id: str) -> int:
        """`client_id`'s amount within the window (older entries dropped); under the lock."""
        now = self._clock()
        recent = self._recent.get(client_id, collections.deque())
        while recent and now - recent[0][0] >= self.window_s:
            recent.popleft()
        return sum(amount for _, amount in recent)

    def _add(self, client_id: str, amount: int) -> None:
        now = self._clock()
        self._recent.setdefault(client_id, collections.deque()).append((now, amount))
        if len(self._recent) > 10_000:  # forget clients idle for a whole window
            idle = [k for k, v in self._recent.items() if now - v[-1][0] >= self.window_s]
            for key in idle:
                del self._recent[key]


class Admission:
    """A concurrency limit, a bounded waiting line, fair shares and optional rate limits.

    Fair shares, so one greedy client cannot take every slot (40 parallel requests from one
    address once held 4 running and 32 waiting, and everyone else got 503s):

    * a client may have at most `per_client` requests running or waiting at once (default: half
      the slots plus an eighth of the line); more are refused at once as its own `Busy`;
    * a freed slot goes to the waiting request whose client runs the fewest; among those, to
      the client served longest ago (a client holding nothing else counts as never served),
      then the oldest request: so a client with many requests gets slots others do not want,
      not theirs, and does not win the ties it creates by always having one waiting;
    * `precheck` refuses a request that would be refused anyway before any work is spent on it
      (parsing, tokenising, routing): a greedy client's refusals once took enough CPU on
      2 cores to triple everyone's time to the first token.
    """

    def __init__(
        self,
        concurrency: int,
        max_queue: int,
        *,
        rate_limit: int = 0,
        per_client: int = 0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1 or max_queue < 0 or rate_limit < 0 or per_client < 0:
            raise SupportLMError(
                "concurrency must be at least 1; max_queue, rate_limit and per_client >= 0."
            )
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.per_client = per_client or max(1, concurrency // 2) + max(1, max_queue // 8)
        self._cond = threading.Condition()
        self._queue: list[list] = []  # [client, chosen] tickets, oldest first
        self._running = 0
        self._granted = 0  # tickets chosen whose threads have not started yet
        self._by_client: collections.Counter[str | None] = collections.Counter()
        self._held: collections.Counter[str | None] = collections.Counter()  # running + waiting
        self._grants = 0  # slots handed out so far: the clock of `_last_grant`
        self._last_grant: dict[str | None, int] = {}  # per client holding a request
        self.rate = RateLimit(rate_limit, window_s, clock=clock)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def precheck(self, client_id: str | None) -> None:
        """Raise the `Busy` that `admit` would raise for `client_id` now (counts nothing)."""
        with self._cond:
            self._check_share(client_id)
            if self._running + self._granted >= self.concurrency and (
                len(self._queue) >= self.max_queue
            ):
                raise self._queue_full()

    @contextlib.contextmanager
    def admit(self, client_id: str | None = None) -> Iterator[None]:
        """Hold a generation slot for the body; raises `Busy` when the request cannot wait."""
        self.rate.check(client_id)
        with self._cond:
            self._enter(client_id)
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._count(self._by_client, client_id, -1)
                self._release(client_id)
                self._hand_over()

    def _enter(self, client: str | None) -> None:
        """Take a slot, now or after waiting in line (under the condition's lock); the client
        holds its share from here until `admit` ends."""
        self._check_share(client)
        self._count(self._held, client, 1)
        try:
            self._wait_for_slot(client)
        except BaseException:
            self._release(client)
            raise
        self._running += 1
        self._count(self._by_client, client, 1)

    def _check_share(self, client: str | None) -> None:
        if client is not None and self._held[client] >= self.per_client:
            raise Busy(f"Too many requests at once from you (at most {self.per_client}); "
                       "wait for an answer first.")  # fmt: skip

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"The assistant is busy ({self.concurrency} answering, {len(self._queue)} "
            "waiting); please try again in a moment."
        )

    def _release(self, client: str | None) -> None:
        """`client` holds one request less; one that holds none is forgotten (bounded map)."""
        self._count(self._held, client, -1)
        if client not in self._held:
            self._last_grant.pop(client, None)

    def _wait_for_slot(self, client: str | None) -> None:
        if self._running + self._granted < self.concurrency and not self._queue:
            self._grant(client)
            return
        if len(self._queue) >= self.max_queue:
            raise self._queue_full()
        ticket = [client, False]
        self._queue.append(ticket)
        try:
            self._cond.wait_for(lambda: ticket[1])
        except BaseException:
            if ticket[1]:  # granted as it was interrupted: hand the slot on
                self._granted -= 1
                self._hand_over()
            else:
                self._queue.remove(ticket)
            raise
        self._granted -= 1

    @staticmethod
    def _count(counter: collections.Counter, client: str | None, step: int) -> None:
        counter[client] += step
        if counter[client] <= 0:
            del counter[client]  # bounded by the clients in flight, not every client seen

    def _grant(self, client: str | None) -> None:
        self._grants += 1
        self._last_grant[client] = self._grants

    def _hand_over(self) -> None:
        """Give free slots to the waiting tickets whose clients run the fewest, then were served
        longest ago, then are oldest (`min` keeps the first of equal keys)."""
        while self._queue and self._running + self._granted < self.concurrency:
            ticket = min(
                self._queue,
                key=lambda t: (self._by_client[t[0]], self._last_grant.get(t[0], 0)),
            )
            self._queue.remove(ticket)
            ticket[1] = True
            self._granted += 1
            self._grant(ticket[0])
            self._cond.notify_all()
