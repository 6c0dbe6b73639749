"""Serving a newly promoted adapter without a restart (`AdapterSwitcher`).

`finetune/promote.py` moves ``outputs/latest``; the app notices (a check every
``SUPPORTLM_ADAPTER_WATCH_S`` seconds, or at once through the ``/reload_adapter`` endpoint) and
switches between requests:

1. the new engine is built completely first (for llama.cpp: the adapter converted and merged,
   cached), while the old one keeps serving; a build that fails is logged and changes nothing;
2. `Assistant.adopt` makes it current: requests already running finish on the old adapter, new
   ones use the new one, and the old engine is closed after its last request (`EngineSlot`).

Replies are stored with the adapter version of the engine that generated them, so feedback given
after a switch still names the adapter that wrote the reply. An adapter pinned with
``SUPPORTLM_ADAPTER`` is never switched; neither is one on another base model (that needs a
restart, and says so).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from supportlm.engines.base import Engine
from supportlm.errors import SupportLMError
from supportlm.modeling import adapter_base_model, resolve_model, same_model
from supportlm.run_folder import RunFolder
from supportlm.serve.assistant import Assistant
from supportlm.serve.backends import build_engine
from supportlm.serve.plan import ServingPlan, default_adapter

logger = logging.getLogger(__name__)


class AdapterSwitcher:
    """Watches the default adapter and switches the assistant to a new one between requests."""

    def __init__(
        self, assistant: Assistant, build: Callable[[ServingPlan], Engine] = build_engine
    ) -> None:
        self.assistant = assistant
        self.build = build
        self._switching = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Any] | None = None

    @property
    def enabled(self) -> bool:
        """Only an adapter chosen by default follows ``outputs/latest``."""
        return self.assistant.settings.adapter is None and self.assistant.settings.model is None

    def served_version(self) -> str | None:
        adapter = self.assistant.engine.adapter
        return None if adapter is None else adapter.version

    def check(self) -> dict[str, Any] | None:
        """Switch when the default adapter is not the one served; returns what happened."""
        if not self.enabled:
            return None
        wanted = default_adapter()
        if wanted is None or RunFolder(wanted).adapter_version() == self.served_version():
            return None
        return self.switch(wanted)

    def switch(self, adapter: str) -> dict[str, Any]:
        """Build an engine for `adapter`, then serve it; the old keeps serving until then."""
        with self._switching:
            plan = self.assistant.plan
            if not same_model(adapter_base_model(adapter), resolve_model(plan.model)):
                raise SupportLMError(
                    f"{adapter} was trained on another base model than {plan.model}: restart the "
                    "app to serve it."
                )
            started = time.perf_counter()
            old_version = self.served_version()
            new_plan = dataclasses.replace(plan, adapter=adapter, notes=(
                *plan.notes, f"Switched to {adapter} without a restart."))  # fmt: skip
            engine = self.build(new_plan)
            old = self.assistant.adopt(engine, new_plan)
            self.last = {
                "adapter": adapter,
                "from_version": old_version,
                "to_version": self.served_version(),
                "build_s": round(time.perf_counter() - started, 2),
                "old_in_flight": self.assistant.slot.in_flight(old),
            }
            logger.info("Serving %s now (%s).", adapter, self.last)
            return self.last

    def check_safely(self) -> None:
        try:
            self.check()
        except Exception:  # the app keeps serving the old adapter; the next check tries again
            logger.exception("Switching to the promoted adapter failed; still serving the old.")

    def start(self, interval_s: float | None = None) -> None:
        """Check every `interval_s` seconds (``SUPPORTLM_ADAPTER_WATCH_S``) in a daemon thread."""
        interval_s = self.assistant.settings.adapter_watch_s if interval_s is None else interval_s
        if not self.enabled or interval_s <= 0 or self._thread is not None:
            return

        def watch() -> None:
            while not self._stop.wait(interval_s):
                self.check_safely()

        self._thread = threading.Thread(target=watch, name="adapter-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
