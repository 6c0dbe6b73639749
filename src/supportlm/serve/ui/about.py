"""The About tab: what serves (engine, model, adapter and its version), why, and its metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from supportlm.errors import SupportLMError
from supportlm.serve.assistant import Assistant
from supportlm.serve.info import public_name, public_text

logger = logging.getLogger(__name__)


def adapter_report(assistant: Assistant) -> tuple[dict[str, Any] | None, Path | None]:
    """The adapter's ``metrics.json`` and ``loss.png`` (when it is a local folder).

    A corrupt ``metrics.json`` is logged and left out: the report is not worth a dead app.
    """
    run = assistant.run
    if run is None or not run.is_adapter():
        return None, None
    try:
        metrics = run.metrics()
    except SupportLMError as error:
        logger.error("Leaving the adapter's metrics out of the About tab: %s", error)
        metrics = None
    return metrics, run.loss_plot()


def about_tab(assistant: Assistant) -> gr.Markdown:
    """The tab; returns its serving summary, which `build_demo` fills on every page load (after
    an adapter switch it says so) through a private event, not an API endpoint or MCP tool."""
    serving = gr.Markdown(elem_id="about-serving")
    metrics, loss_plot = adapter_report(assistant)
    if metrics:
        gr.Dataframe(
            [list(row) for row in flatten_metrics(metrics)],
            headers=["metric", "value"],
            label="Adapter metrics (metrics.json)",
            interactive=False,
        )
    if loss_plot is not None:
        gr.Image(str(loss_plot), label="Training loss", interactive=False)
    return serving


def about_markdown(assistant: Assistant) -> str:
    plan, settings, engine = assistant.plan, assistant.settings, assistant.engine
    adapter = engine.adapter
    lines = [
        "## What is serving",
        f"- **Engine:** {public_text(engine.description)}",
        f"- **Backend:** {engine.name}",
        f"- **Model:** `{public_name(plan.model)}`",
        f"- **Adapter:** `{adapter.name}` (version `{adapter.version}`)"
        if plan.adapter and adapter
        else "- **Adapter:** none",
        f"- **Context window:** {assistant.context_length} tokens; inputs are cut at "
        f"{settings.max_input_chars} characters / {settings.max_input_tokens} tokens",
        f"- **Concurrency:** {assistant.admission.concurrency} requests at once, "
        f"{settings.max_queue} waiting at most",
        f"- **Intents:** {assistant.router.description}; handed over to a person: "
        f"{', '.join(sorted(assistant.router.handover_intents)) or 'none'}",
    ]
    if plan.notes:
        lines += ["", "### How this was chosen", *(f"- {public_text(n)}" for n in plan.notes)]
    if plan.adapter and adapter_report(assistant) == (None, None):
        lines += ["", "The adapter folder has no `metrics.json` or `loss.png`."]
    return "\n".join(lines)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``metrics.json`` as (name, value) rows; nested keys are joined with dots."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(flatten_metrics(value, f"{name}."))
        elif isinstance(value, float):
            rows.append((name, f"{value:.4g}"))
        else:
            rows.append((name, json.dumps(value) if not isinstance(value, str) else value))
    return rows
