"""Build the engine a `ServingPlan` chose, once (`supportlm.engines.registry` builds it)."""

from __future__ import annotations

from supportlm.engines import registry
from supportlm.engines.base import Engine
from supportlm.modeling import resolve_model
from supportlm.serve.plan import ServingPlan


def build_engine(plan: ServingPlan) -> Engine:
    """Load the model (and adapter) once, on the backend the plan chose."""
    settings = plan.settings
    options = registry.EngineOptions(
        model=plan.model,
        source=resolve_model(plan.model),
        adapter=plan.adapter,
        context_length=settings.context_length,
        concurrency=settings.concurrency,
        settings=settings,
    )
    return registry.build(plan.backend, options)
