"""The tasks the assistant runs on a text: summarise (`summarize`) and translate (`translate`).

A task is one module here with a ``VERB`` and a ``run(call: TaskCall, text, **options)`` that
yields `StreamEvent`s; `Assistant.run_task(name, ...)` finds it by its module name, so adding a
task is adding its module. `common` holds what they share: cutting text by tokens at good
boundaries, token usage over many model calls, monotonic progress.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from supportlm.errors import SupportLMError

#: Every task module, by name: the modules of this package but `common`.
TASKS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common"))


def task_module(name: str) -> ModuleType:
    """The module of the task `name` (imported when first run)."""
    if name not in TASKS:
        raise SupportLMError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return importlib.import_module(f"{__name__}.{name}")
