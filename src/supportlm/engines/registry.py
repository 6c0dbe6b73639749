"""The engines, in one table: when each can serve a model, how ``auto`` picks one, how to build it.

Serving (`supportlm.serve.plan` decides, `supportlm.serve.backends` builds) and evaluation
(`supportlm.train.judge.decoding`) both read this table, so they pick the same engine for the same
model on the same machine, for the same reason. Adding an engine is one module with a
``build(options: EngineOptions) -> Engine`` function plus one `EngineSpec` line here (and its
settings, if any, in `supportlm.serve.settings.EngineSettings`); `supportlm.engines.ct2` was
added so.

``auto`` takes the first engine, in table order, that may run on this device and can serve the
model. The order is measured, not guessed: llama.cpp decodes a GGUF model on a CPU 2-3x faster
than transformers ``generate`` (5.4x with the adapter on a 2-core EPYC), CTranslate2 (a binary
wheel, no compiler) 2.5x (``bench/generation.py``, docs/benchmarks.md); on a GPU
transformers is the engine this package serves with.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supportlm.embedded import EMBEDDED_MODEL
from supportlm.engines.base import Engine
from supportlm.engines.ct2 import is_available as ct2_installed
from supportlm.engines.llamacpp import is_available as llamacpp_installed
from supportlm.errors import SupportLMError
from supportlm.modeling import ModelSource, load_tokenizer
from supportlm.run_folder import apply_prompt_style


@dataclass(frozen=True)
class EngineOptions:
    """What a builder gets: the model, its adapter, the limits and the engine settings."""

    model: str  # the model spec as the user gave it (Hub id, folder, .gguf, 'embedded')
    source: ModelSource
    adapter: str | None = None
    context_length: int = 2048
    concurrency: int = 4
    settings: Any = None  # an object with the EngineSettings fields; None: their defaults
    loaded: Any = None  # a `LoadedModel` already in memory (evaluation), else loaded when needed

    def setting(self, name: str, default: Any) -> Any:
        return default if self.settings is None else getattr(self.settings, name)

    def tokenizer(self) -> Any:
        """The loaded model's tokenizer, else the model's, with the adapter's chat template."""
        if self.loaded is not None:
            return self.loaded.tokenizer
        tokenizer = load_tokenizer(self.source)
        apply_prompt_style(tokenizer, self.adapter)
        return tokenizer


def _always(model: str) -> str | None:
    return None


def _is_gguf(model: str) -> bool:
    return model == EMBEDDED_MODEL or model.endswith(".gguf")


def _llamacpp_cannot(model: str) -> str | None:
    if not llamacpp_installed():
        return "llama-cpp-python is not installed, the fastest CPU path (see the README)"
    if not _is_gguf(model):
        return f"{model} is not a GGUF model"
    return None


def _ct2_cannot(model: str) -> str | None:
    if not ct2_installed():
        return "ctranslate2 is not installed (requirements.txt)"
    if not _is_gguf(model):  # other models keep transformers, as before this engine
        return f"{model} is not a GGUF model"
    return None


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its module, what it cannot serve, where ``auto`` may pick it, and why."""

    builder: str  # the module whose ``build(options)`` makes the engine (imported when used)
    cannot: Callable[[str], str | None] = _always  # why it cannot serve a model here, or None
    auto_devices: tuple[str, ...] = ()  # the devices where ``auto`` considers it
    why: str = ""  # why ``auto`` picks it, one phrase
    local: bool = True  # it generates on this machine (evaluation decodes only on these)


ENGINES: dict[str, EngineSpec] = {
    "llama.cpp": EngineSpec(
        "supportlm.engines.llamacpp.engine", _llamacpp_cannot, ("cpu",),
        "a GGUF model on a CPU, where it is the fastest engine measured",
    ),
    "ctranslate2": EngineSpec(
        "supportlm.engines.ct2", _ct2_cannot, ("cpu",),
        "a GGUF model on a CPU without llama.cpp: a binary wheel, the fastest engine measured "
        "that needs no compiler",
    ),
    "transformers": EngineSpec(
        "supportlm.engines.transformers", _always, ("cpu", "cuda", "mps"),
        "the engine for every model and device",
    ),
    "openai": EngineSpec("supportlm.engines.openai_remote", local=False),
}  # fmt: skip
CHOICES = ("auto", *ENGINES)


def choose(choice: str, model: str, device: str, asked_by: str) -> tuple[str, str]:
    """The engine to use for `model` on `device`, and why, in one sentence; `asked_by` names
    the setting `choice` came from (``SUPPORTLM_BACKEND``, ``--engine``)."""
    if choice not in CHOICES:
        raise SupportLMError(f"{asked_by}={choice!r} is not one of {', '.join(CHOICES)}.")
    if choice != "auto":
        cannot = ENGINES[choice].cannot(model)
        if cannot:
            raise SupportLMError(f"{asked_by}={choice}: the {choice} engine cannot serve here: "
                                 f"{cannot}.")  # fmt: skip
        return choice, f"Backend {choice}: set by {asked_by}."
    passed = []
    for name, spec in ENGINES.items():
        cannot = spec.cannot(model) if device in spec.auto_devices else f"not used on {device}"
        if cannot is None:
            skipped = f" ({'; '.join(passed)})" if passed else ""
            return name, f"Backend {name}: {spec.why}{skipped}."
        if spec.auto_devices:
            passed.append(f"{name}: {cannot}")
    raise SupportLMError(f"No engine can serve {model} on {device}: {'; '.join(passed)}.")


def build(name: str, options: EngineOptions) -> Engine:
    """The engine `name` for `options`, built by its module's ``build``."""
    return importlib.import_module(ENGINES[name].builder).build(options)


def local_choices() -> tuple[str, ...]:
    """The choices of an engine on this machine (``finetune/evaluate.py --engine``)."""
    return ("auto", *(name for name, spec in ENGINES.items() if spec.local))
