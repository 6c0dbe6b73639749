"""The llama.cpp engine: a GGUF base model plus a GGUF LoRA adapter, the fast CPU serving path.

* `gguf`: PEFT LoRA -> GGUF export, the merged Q8_0 base, their cache;
* `sampling`: repetition penalty and top-p sampling on llama.cpp's logits;
* `lanes`: one llama context with its scheduler thread (a lane), and the pool that dispatches
  requests to lanes;
* `engine`: `LlamaCppEngine`, the `supportlm.engines.base.Engine` on top of them.

Install the optional dependency with the README's command (``quickstart:fast-engine``): it
compiles llama.cpp with portable AVX2 flags, not ``GGML_NATIVE`` (a native build can crash on
AVX-512/AMX machines), in 4 to 12 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import logging

#: `LlamaCppEngine.from_gguf(weights=...)`: how the base GGUF's weights are served.
WEIGHTS_CHOICES = ("auto", "merged", "q8_0", "original")


def is_available() -> bool:
    """Whether the optional `llama-cpp-python` package is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def quiet_llama_cpp_logs() -> None:
    """Only errors from llama.cpp: it logs every tensor and setting it loads to stderr."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
