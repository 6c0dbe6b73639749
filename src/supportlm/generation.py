"""Generation: settings, streamed events, the `Engine` protocol and the transformers engine.

Every backend (transformers here, llama.cpp in `supportlm.llamacpp`) takes prompt *token ids*
built by `supportlm.prompts.encode_chat`, so the prompt format lives in one place and the
backends cannot drift apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from supportlm.errors import SupportLMError
from supportlm.prompts import end_of_turn_token_ids

#: Seconds a streamer waits for the next token before giving up on a stuck generation thread.
STREAM_TIMEOUT_S = 120.0


@dataclass
class GenerationSettings:
    """Decoding settings shared by every backend (Hugging Face names)."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens to generate."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature; 0 decodes greedily."}
    )
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling probability mass."})
    repetition_penalty: float = field(
        default=1.1, metadata={"help": "Penalty > 1 discourages repeating earlier tokens."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed for sampling (None: random)."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SupportLMError("max_new_tokens must be at least 1.")
        if self.temperature < 0:
            raise SupportLMError("temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise SupportLMError("top_p must be in (0, 1].")
        if self.repetition_penalty <= 0:
            raise SupportLMError("repetition_penalty must be positive.")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    """The state of one generation: `text` is the whole reply so far, not a delta."""

    text: str
    num_tokens: int
    time_to_first_token: float | None
    elapsed: float
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token (the prompt's cost is in time_to_first_token)."""
        if self.time_to_first_token is None or self.num_tokens < 2:
            return 0.0
        decode_time = self.elapsed - self.time_to_first_token
        return (self.num_tokens - 1) / decode_time if decode_time > 0 else 0.0

    def caption(self) -> str:
        ttft = "-" if self.time_to_first_token is None else f"{self.time_to_first_token:.2f} s"
        return f"first token {ttft} · {self.tokens_per_second:.1f} tok/s · {self.num_tokens} tokens"


@runtime_checkable
class Engine(Protocol):
    """A text generator the app, the tasks and the benchmarks can share."""

    name: str
    description: str
    tokenizer: PreTrainedTokenizerBase
    context_length: int
    has_adapter: bool

    def stream(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        *,
        stop_event: threading.Event | None = None,
        use_adapter: bool = True,
    ) -> Iterator[StreamEvent]: ...

    def generate(
        self, prompt_ids: list[int], settings: GenerationSettings, *, use_adapter: bool = True
    ) -> StreamEvent: ...


class _EventStopper(StoppingCriteria):
    """Stops `generate` between two tokens once the request's stop event is set."""

    def __init__(self, stop_event: threading.Event) -> None:
        self.stop_event = stop_event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        return self.stop_event.is_set()


class _CountingStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that also counts tokens and times the first one."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.num_tokens = 0
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            self.num_tokens += value.numel()
        super().put(value)


class TransformersEngine:
    """Generation with `model.generate`, streamed through a `TextIteratorStreamer`.

    One request generates at a time (a lock): PEFT's adapter switch is global to the model, and
    on a CPU two concurrent `generate` calls only share the same cores. Several users queue in the
    app; the llama.cpp engine batches them instead.
    """

    name = "transformers"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        description: str = "",
        context_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.description = description or f"transformers ({model.config.model_type})"
        self.context_length = context_length or int(
            getattr(model.config, "max_position_embeddings", 2048)
        )
        self.has_adapter = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        self._eos_token_ids = end_of_turn_token_ids(tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def from_loaded(cls, loaded: Any, *, context_length: int | None = None) -> TransformersEngine:
        """Build from a `supportlm.modeling.LoadedModel`."""
        return cls(
            loaded.model,
            loaded.tokenizer,
            description=f"transformers · {loaded.description}",
            context_length=context_length,
        )

    def _generate_kwargs(self, settings: GenerationSettings) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "repetition_penalty": settings.repetition_penalty,
            "eos_token_id": self._eos_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        else:  # silence the model's sampling defaults (SmolLM2 ships temperature/top_p)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def stream(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        *,
        stop_event: threading.Event | None = None,
        use_adapter: bool = True,
    ) -> Iterator[StreamEvent]:
        stop_event = stop_event or threading.Event()
        streamer = _CountingStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    kwargs = dict(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_EventStopper(stop_event)]),
                        **self._generate_kwargs(settings),
                    )
                    if self.has_adapter and not use_adapter:
                        with self.model.disable_adapter():
                            self.model.generate(**kwargs)
                    else:
                        self.model.generate(**kwargs)
            except BaseException as error:  # re-raised in the caller's thread below
                errors.append(error)
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""

        def event(finished: bool = False, reason: str | None = None) -> StreamEvent:
            first = streamer.first_token_time
            return StreamEvent(
                text=text,
                num_tokens=streamer.num_tokens,
                time_to_first_token=None if first is None else first - start,
                elapsed=time.perf_counter() - start,
                finished=finished,
                finish_reason=reason,
            )

        completed = False
        try:
            for piece in streamer:
                text += piece
                if piece:
                    yield event()
            completed = True
        finally:
            if not completed:  # the consumer went away (client closed): stop generate too
                stop_event.set()
        thread.join()
        if errors:
            raise errors[0]
        if stop_event.is_set() and streamer.num_tokens < settings.max_new_tokens:
            reason = "cancelled"
        elif streamer.num_tokens >= settings.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        yield event(finished=True, reason=reason)

    def generate(
        self, prompt_ids: list[int], settings: GenerationSettings, *, use_adapter: bool = True
    ) -> StreamEvent:
        *_, final = self.stream(prompt_ids, settings, use_adapter=use_adapter)
        return final
