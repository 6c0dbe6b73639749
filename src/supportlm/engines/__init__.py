"""Engines: the `Engine` contract (`base`), the backends serving it (transformers, llama.cpp,
CTranslate2, a remote server) and the table that picks one (`registry`)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
