"""The app's settings, declared once: ``SUPPORTLM_*`` variables in groups, each with its default,
bounds and one-line description.

As llama-cpp-python's server composes ``Settings(ServerSettings, ModelSettings)``, `AppSettings`
is the union of one dataclass per concern (model, engine, answers, limits, access, feedback).
Every field declares its environment variable, description and bounds in its metadata;
`AppSettings.from_env` reads the variables from those declarations, `__post_init__` checks the
bounds, and `supportlm.reference` writes the settings table in ``docs/settings.md`` from them,
so a default or a bound is stated in exactly one place. What the settings mean on this machine
(model, adapter, backend, and why) is `supportlm.serve.plan`.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from supportlm.engines import registry
from supportlm.engines.llamacpp import WEIGHTS_CHOICES
from supportlm.errors import SupportLMError
from supportlm.serve.plan import ServingPlan, resolve_plan

BACKEND_CHOICES = registry.CHOICES


def default_feedback_path() -> Path:
    """``./.supportlm/feedback.sqlite3``."""
    return Path(".supportlm") / "feedback.sqlite3"


def _setting(
    env: str,
    default: Any = MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    choices: tuple[str, ...] | None = None,
    shown: str | None = None,
    **kwargs: Any,
) -> Any:
    """A field read from `env`: `help` says what it does, `ge` and `choices` bound it, `shown` is
    its default as the docs state it when the value alone does not say it (``0`` meaning auto)."""
    metadata = {"env": env, "help": help, "ge": ge, "choices": choices, "shown": shown}
    if default is MISSING:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelSettings:
    title: ClassVar[str] = "Model"

    model: str | None = _setting(
        "SUPPORTLM_MODEL", None,
        "Hub id, model folder, .gguf file or 'embedded' (SmolLM2-135M-Instruct from PyPI).",
        shown="the adapter's base, else embedded",
    )  # fmt: skip
    adapter: str | None = _setting(
        "SUPPORTLM_ADAPTER", None,
        "LoRA adapter folder or Hub id; 'none': the base model alone.",
        shown="outputs/latest, else models/supportlm-smollm2",
    )  # fmt: skip
    adapter_watch_s: float = _setting(
        "SUPPORTLM_ADAPTER_WATCH_S", 5.0,
        "seconds between checks for a newly promoted adapter (outputs/latest), served without a "
        "restart; 0: never. Not when SUPPORTLM_ADAPTER names one.", ge=0,
    )  # fmt: skip
    context_length: int = _setting(
        "SUPPORTLM_CONTEXT_LENGTH", 2048,
        "prompt + reply tokens; the oldest turns are trimmed to fit.", ge=1,
    )  # fmt: skip


@dataclass
class EngineSettings:
    title: ClassVar[str] = "Engine"

    backend: str = _setting(
        "SUPPORTLM_BACKEND", "auto",
        "auto (for a GGUF model on a CPU: llama.cpp when installed, else ctranslate2; else "
        "transformers), or one of them by name, or openai (a remote OpenAI-compatible server).",
        choices=BACKEND_CHOICES,
    )  # fmt: skip
    llamacpp_weights: str = _setting(
        "SUPPORTLM_LLAMACPP_WEIGHTS", "auto",
        "llama.cpp weights: auto (a Q8_0 copy with the adapter merged in for 4-bit bases), "
        "merged, q8_0 or original.", choices=WEIGHTS_CHOICES,
    )  # fmt: skip
    llamacpp_threads: int = _setting(
        "SUPPORTLM_LLAMACPP_THREADS", 0,
        "llama.cpp CPU threads in all; 0: every CPU this process may use.", ge=0,
    )  # fmt: skip
    llamacpp_lanes: int = _setting(
        "SUPPORTLM_LLAMACPP_LANES", 0,
        "llama.cpp contexts decoding side by side; 0: one per thread, at most "
        "SUPPORTLM_CONCURRENCY (with 4 users, two lanes gave 1.4x the total tok/s of one "
        "two-thread context: docs/benchmarks.md).", ge=0,
    )  # fmt: skip
    openai_base_url: str | None = _setting(
        "SUPPORTLM_OPENAI_BASE_URL", None, "the remote server's /v1 URL (SUPPORTLM_BACKEND=openai)."
    )
    openai_model: str | None = _setting(
        "SUPPORTLM_OPENAI_MODEL", "supportlm",
        "the remote server's fine-tuned model; 'none': it has none.",
    )  # fmt: skip
    openai_base_model: str | None = _setting(
        "SUPPORTLM_OPENAI_BASE_MODEL", "supportlm-base", "the remote server's base model."
    )
    openai_api_key: str | None = _setting(
        "SUPPORTLM_OPENAI_API_KEY", None, "the key the remote server wants, if any."
    )
    openai_timeout_s: float = _setting(
        "SUPPORTLM_OPENAI_TIMEOUT_S", 60.0, "seconds to wait for the remote server.", ge=0
    )


@dataclass
class AnswerSettings:
    title: ClassVar[str] = "Answers"

    shop: Path | None = _setting(  # noqa: RUF009 (returns a dataclasses.field)
        "SUPPORTLM_SHOP", None,
        "YAML file of the shop's details that fill {{placeholders}} in answers (phone, e-mail, "
        "website...); any other placeholder becomes a request for the detail.",
        shown="data/shop.yaml",
    )  # fmt: skip
    intent_data: Path | None = _setting(  # noqa: RUF009 (returns a dataclasses.field)
        "SUPPORTLM_INTENT_DATA", None,
        "JSONL of questions (or messages) with an 'intent' the intent classifier learns from.",
        shown="the adapter's intent_questions.jsonl, else the bundled data",
    )  # fmt: skip
    handover_intents: str = _setting(
        "SUPPORTLM_HANDOVER_INTENTS", "complaint,contact_human_agent,delete_account",
        "comma-separated intents a person must handle: the reply says so and the store flags "
        "it; empty: none.",
    )  # fmt: skip
    handover_min_confidence: float = _setting(
        "SUPPORTLM_HANDOVER_MIN_CONFIDENCE", 0.5,
        "the intent classifier's probability from which a hand-over intent is acted on (on "
        "Bitext: 99.6 % precise at 96 % of questions).", ge=0,
    )  # fmt: skip


@dataclass
class LimitSettings:
    title: ClassVar[str] = "Limits"

    max_input_chars: int = _setting(
        "SUPPORTLM_MAX_INPUT_CHARS", 4000, "longer inputs are cut, with a notice.", ge=1
    )
    max_input_tokens: int = _setting(
        "SUPPORTLM_MAX_INPUT_TOKENS", 1024,
        "longer inputs are cut, with a notice; below SUPPORTLM_CONTEXT_LENGTH.", ge=1,
    )  # fmt: skip
    max_history_messages: int = _setting(
        "SUPPORTLM_MAX_HISTORY_MESSAGES", 40,
        "older messages of a conversation are left out, with a notice.", ge=1,
    )  # fmt: skip
    max_system_prompt_chars: int = _setting(
        "SUPPORTLM_MAX_SYSTEM_PROMPT_CHARS", 2000, "longer system prompts are cut.", ge=1
    )
    max_correction_chars: int = _setting(
        "SUPPORTLM_MAX_CORRECTION_CHARS", 4000, "longer corrections are refused.", ge=1
    )
    max_model_calls: int = _setting(
        "SUPPORTLM_MAX_MODEL_CALLS", 48,
        "model calls per summary or translation; a text that needs more is refused.", ge=1,
    )  # fmt: skip
    max_upload_bytes: int = _setting(
        "SUPPORTLM_MAX_UPLOAD_BYTES", 1_000_000, "larger uploads are refused.", ge=1
    )
    upload_bytes_per_hour: int = _setting(
        "SUPPORTLM_UPLOAD_BYTES_PER_HOUR", 5_000_000,
        "upload volume per client (signed-in user or address) per hour; more is refused.", ge=1,
    )  # fmt: skip
    concurrency: int = _setting(
        "SUPPORTLM_CONCURRENCY", 4,
        "requests generating at once, all tabs and APIs together (at most 1 on transformers).",
        ge=1,
    )  # fmt: skip
    max_queue: int = _setting(
        "SUPPORTLM_MAX_QUEUE", 32,
        "requests waiting to generate before new ones are refused.", ge=1,
    )  # fmt: skip
    max_per_client: int = _setting(
        "SUPPORTLM_MAX_PER_CLIENT", 0,
        "requests one client (address, login or API key) may have generating or waiting at "
        "once; more are refused before they are read.", ge=0,
        shown="half of SUPPORTLM_CONCURRENCY + an eighth of SUPPORTLM_MAX_QUEUE (6)",
    )  # fmt: skip
    rate_limit: int = _setting(
        "SUPPORTLM_RATE_LIMIT", 0,
        "generation requests per client (signed-in user, else address) per minute; 0: no limit.",
        ge=0,
    )  # fmt: skip
    feedback_rate_limit: int = _setting(
        "SUPPORTLM_FEEDBACK_RATE_LIMIT", 30,
        "likes, corrections and votes per client per minute; 0: no limit.", ge=0,
    )  # fmt: skip


@dataclass
class AccessSettings:
    title: ClassVar[str] = "Access"

    auth: str | None = _setting(
        "SUPPORTLM_AUTH", None,
        "'user:password' pairs (comma-separated) required on every page and API route.",
    )  # fmt: skip
    agents: str | None = _setting(
        "SUPPORTLM_AGENTS", None,
        "comma-separated signed-in users whose feedback is trusted as training data and who see "
        "Insights; others' feedback waits for approval.", shown="every SUPPORTLM_AUTH user",
    )  # fmt: skip
    hf_oauth: int = _setting(
        "SUPPORTLM_HF_OAUTH", 0,
        "1: require a Hugging Face sign-in (a Space with hf_oauth: true).", ge=0,
    )  # fmt: skip
    admin_token: str | None = _setting(
        "SUPPORTLM_ADMIN_TOKEN", None,
        "enables /reload_adapter for callers that send it and, without a login, opens the "
        "Insights tab to whoever types it.",
    )  # fmt: skip
    secret: str | None = _setting(
        "SUPPORTLM_SECRET", None,
        "key of the conversation ids the server issues; replicas must share one.",
        shown="a random key per process",
    )  # fmt: skip
    api_key: str | None = _setting(
        "SUPPORTLM_API_KEY", None, "Bearer key that /v1 and MCP require (also when a login is set)."
    )
    cors_origins: str | None = _setting(
        "SUPPORTLM_CORS_ORIGINS", None, "comma-separated origins /v1 answers (CORS); default: none."
    )
    mcp: int = _setting(
        "SUPPORTLM_MCP", 0, "1: serve chat, summarize and translate as MCP tools.", ge=0
    )


@dataclass
class FeedbackSettings:
    title: ClassVar[str] = "Feedback"

    feedback_db: Path = _setting(  # noqa: RUF009 (returns a dataclasses.field)
        "SUPPORTLM_FEEDBACK_DB",
        help="SQLite file for replies, likes, corrections and votes.",
        default_factory=default_feedback_path,
        shown=".supportlm/feedback.sqlite3",
    )
    retention_days: int = _setting(
        "SUPPORTLM_RETENTION_DAYS", 0,
        "stored rows (and exports) older than this are deleted, at start-up then hourly; "
        "0: kept.", ge=0,
    )  # fmt: skip
    api_store: int = _setting(
        "SUPPORTLM_API_STORE", 0,
        "1: store /v1 replies for feedback (POST /v1/feedback by id).", ge=0,
    )  # fmt: skip


#: The groups, in the order the docs list them.
GROUPS = (
    ModelSettings, EngineSettings, AnswerSettings, LimitSettings, AccessSettings, FeedbackSettings,
)  # fmt: skip


@dataclass
class AppSettings(
    FeedbackSettings, AccessSettings, LimitSettings, AnswerSettings, EngineSettings, ModelSettings
):
    """Every ``SUPPORTLM_*`` setting (the groups' union); `resolve` says what they mean here."""

    title: ClassVar[str] = "All"

    def __post_init__(self) -> None:
        for spec in fields(self):
            check_bounds(spec, getattr(self, spec.name))
        if self.max_input_tokens >= self.context_length:
            raise SupportLMError(
                f"max_input_tokens ({self.max_input_tokens}) must be smaller than "
                f"context_length ({self.context_length}) to leave room for the reply."
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
        """The signed-in users trusted as agents (`supportlm.feedback.review`)."""
        if self.agents is not None:
            return {name.strip() for name in self.agents.split(",") if name.strip()}
        return {user for user, _ in self.auth_pairs() or []}

    def cors_origins_list(self) -> list[str]:
        return [origin.strip() for origin in (self.cors_origins or "").split(",") if origin.strip()]

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
        """Decide model, adapter and backend (`supportlm.serve.plan.resolve_plan`)."""
        return resolve_plan(self)


def check_bounds(spec: Field, value: Any) -> None:
    """Refuse `value` outside the declared bounds of `spec`, naming its variable."""
    env, minimum, choices = spec.metadata["env"], spec.metadata["ge"], spec.metadata["choices"]
    if minimum is not None and value < minimum:
        raise SupportLMError(f"{env} must be at least {minimum:g}, got {value}.")
    if choices is not None and value not in choices:
        raise SupportLMError(f"{env}={value!r} is not one of {', '.join(choices)}.")


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
