"""The served engine, replaceable between requests (`EngineSlot`).

A request *leases* the engine that is current when it starts and keeps it to its last token; a
replacement only changes what later requests lease. The engine it replaced is closed when its last
lease ends, so in-flight requests finish on the old adapter, new ones start on the new one, and
nobody sees an error. While both are alive the app holds two engines: the peak memory of a switch
is about one more engine (`docs/benchmarks.md` has the measurement).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator

from supportlm.engines.base import Engine

logger = logging.getLogger(__name__)


class EngineSlot:
    """One current engine; leases keep replaced engines alive until their requests end."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._leases: Counter[int] = Counter()
        self._retired: dict[int, Engine] = {}

    @property
    def current(self) -> Engine:
        return self._engine

    @contextlib.contextmanager
    def lease(self) -> Iterator[Engine]:
        """The current engine, kept open until the ``with`` block (or generator) ends."""
        with self._lock:
            engine = self._engine
            self._leases[id(engine)] += 1
        try:
            yield engine
        finally:
            with self._lock:
                self._leases[id(engine)] -= 1
                done = self._leases[id(engine)] == 0 and id(engine) in self._retired
                if done:
                    del self._retired[id(engine)], self._leases[id(engine)]
            if done:
                self._close(engine)

    def replace(self, engine: Engine) -> Engine:
        """Make `engine` current; the old one closes when its last lease ends. Returns it."""
        with self._lock:
            old, self._engine = self._engine, engine
            idle = self._leases[id(old)] == 0
            if not idle:
                self._retired[id(old)] = old
        if idle:
            self._close(old)
        else:
            logger.info("%s closes when its %d requests finish.", old.description,
                        self._leases[id(old)])  # fmt: skip
        return old

    def in_flight(self, engine: Engine) -> int:
        return self._leases[id(engine)]

    @staticmethod
    def _close(engine: Engine) -> None:
        try:
            engine.close()
        except Exception:  # a failing close must not fail the request that ended last
            logger.exception("Closing %s failed.", engine.description)
