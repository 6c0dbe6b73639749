"""Build the engine a `ServingPlan` chose, once, with the adapter's saved prompt style applied."""

from __future__ import annotations

from supportlm.engines.base import Engine
from supportlm.errors import SupportLMError
from supportlm.modeling import ModelSource, load_model, load_tokenizer, resolve_model
from supportlm.run_folder import RunFolder
from supportlm.serve.settings import NO_ADAPTER, ServingPlan


def build_engine(plan: ServingPlan) -> Engine:
    """Load the model (and adapter) once, on the backend the plan chose."""
    source = resolve_model(plan.model)
    if plan.backend == "openai":
        return _build_remote_engine(plan, source)
    if plan.backend == "llama.cpp":
        return _build_llamacpp_engine(plan, source)
    from supportlm.engines.transformers import TransformersEngine

    loaded = load_model(plan.model, adapter=plan.adapter)
    apply_chat_template(loaded.tokenizer, plan.adapter)
    return TransformersEngine.from_loaded(loaded, context_length=plan.settings.context_length)


def apply_chat_template(tokenizer, adapter: str | None) -> None:
    """Serve with the chat template the adapter was trained with, when its folder saved one."""
    if adapter is not None and RunFolder(adapter).is_adapter():
        RunFolder(adapter).prompt_style().apply(tokenizer)


def _build_remote_engine(plan: ServingPlan, source: ModelSource) -> Engine:
    """The remote server's models; the local tokenizer (the same model's) caps and counts."""
    from supportlm.engines.openai_remote import OpenAIEngine

    settings = plan.settings
    if not settings.openai_base_url:
        raise SupportLMError("SUPPORTLM_BACKEND=openai needs SUPPORTLM_OPENAI_BASE_URL.")
    tokenizer = load_tokenizer(source)
    apply_chat_template(tokenizer, plan.adapter)
    # An empty variable reads as unset (the default), so 'none' is how a user says "no tuned model".
    tuned = settings.openai_model or ""
    tuned = None if tuned.strip().lower() in ("", NO_ADAPTER) else tuned
    return OpenAIEngine(
        settings.openai_base_url,
        tokenizer,
        tuned_model=tuned,
        base_model=settings.openai_base_model or tuned or "default",
        api_key=settings.openai_api_key,
        timeout_s=settings.openai_timeout_s,
        context_length=settings.context_length,
        max_concurrency=settings.concurrency,
    )


def _build_llamacpp_engine(plan: ServingPlan, source: ModelSource) -> Engine:
    from supportlm.engines.llamacpp.engine import LlamaCppEngine

    if source.gguf_path is None:
        raise SupportLMError(
            f"The llama.cpp backend needs a GGUF model; {plan.model!r} is not one. "
            "Use SUPPORTLM_BACKEND=transformers."
        )
    settings = plan.settings
    tokenizer = load_tokenizer(source)
    apply_chat_template(tokenizer, plan.adapter)
    return LlamaCppEngine.from_gguf(
        source.gguf_path,
        tokenizer,
        adapter_dir=plan.adapter,
        n_seq_max=settings.concurrency,
        n_ctx=settings.context_length,
        weights=settings.llamacpp_weights,
        n_threads=settings.llamacpp_threads or None,
        n_lanes=settings.llamacpp_lanes or None,
    )
