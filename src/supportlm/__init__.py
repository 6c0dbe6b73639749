"""supportlm: turn a small pretrained LLM into a customer-service assistant."""

from __future__ import annotations

import logging
import sys

__version__ = "0.1.0"


def setup_logging(level: int = logging.INFO) -> None:
    """Send the library's messages (what was chosen and why) to stdout; for entry points only."""
    logger = logging.getLogger("supportlm")
    if not any(getattr(h, "_supportlm", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[supportlm] %(message)s"))
        handler._supportlm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
