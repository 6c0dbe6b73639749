"""The transformers engine: `model.generate` streamed through a `TextIteratorStreamer`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation.streamers import BaseStreamer

from supportlm.engines.base import AdapterRef, Engine, EventClock, GenerationRequest, StreamEvent
from supportlm.modeling import load_model
from supportlm.prompts import end_of_turn_token_ids
from supportlm.run_folder import adapter_ref, apply_prompt_style

if TYPE_CHECKING:
    from supportlm.engines.registry import EngineOptions

#: Seconds a streamer waits for the next token before giving up on a stuck generation thread.
STREAM_TIMEOUT_S = 120.0


class _EventStopper(StoppingCriteria):
    """Stops `generate` between two tokens once the request's stop event is set."""

    def __init__(self, stop_event: threading.Event) -> None:
        self.stop_event = stop_event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        return self.stop_event.is_set()


class _CountingStreamer(BaseStreamer):
    """Counts new tokens and times the first, then hands every call on to a text streamer.

    `generate` calls `put` once with the prompt, then once per new token (`BaseStreamer`'s
    contract), so the first call is skipped when counting.
    """

    def __init__(self, text_streamer: TextIteratorStreamer, clock: EventClock) -> None:
        self.text_streamer = text_streamer
        self.clock = clock
        self.num_tokens = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.clock.first_token()
            self.num_tokens += value.numel()
        self._prompt_seen = True
        self.text_streamer.put(value)

    def end(self) -> None:
        self.text_streamer.end()


class TransformersEngine(Engine):
    """Generation with `model.generate`, one request at a time.

    A lock serialises requests: PEFT's adapter switch is global to the model, and on a CPU two
    concurrent `generate` calls only share the same cores (`max_concurrency` = 1, so the serving
    layer queues the rest). The llama.cpp engine batches them instead.
    """

    name = "transformers"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        adapter: AdapterRef | None = None,
        description: str = "",
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.description = description or f"transformers ({model.config.model_type})"
        self.context_length = context_length or int(
            getattr(model.config, "max_position_embeddings", 2048)
        )
        is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        if adapter is None and is_peft:
            adapter = AdapterRef(name="adapter", version="unversioned")
        self.adapter = adapter
        self._eos_token_ids = end_of_turn_token_ids(tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def from_loaded(cls, loaded: Any, *, context_length: int | None = None) -> TransformersEngine:
        """Build from a `supportlm.modeling.LoadedModel`."""
        return cls(
            loaded.model,
            loaded.tokenizer,
            adapter=adapter_ref(loaded.adapter) if loaded.adapter else None,
            description=f"transformers · {loaded.description}",
            context_length=context_length,
        )

    def _generate_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        settings = request.settings
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

    def _run_generate(
        self,
        request: GenerationRequest,
        streamer: _CountingStreamer,
        stop_event: threading.Event,
        errors: list[BaseException],
    ) -> None:
        input_ids = torch.tensor([request.prompt_ids], device=self.model.device)
        try:
            with self._lock, torch.inference_mode():
                if request.settings.seed is not None:
                    torch.manual_seed(request.settings.seed)
                kwargs = dict(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_EventStopper(stop_event)]),
                    **self._generate_kwargs(request),
                )
                if self.has_adapter and request.adapter is None:
                    with self.model.disable_adapter():
                        self.model.generate(**kwargs)
                else:
                    self.model.generate(**kwargs)
        except BaseException as error:  # re-raised in the caller's thread by `_stream`
            errors.append(error)
            streamer.end()

    def _stream(
        self, request: GenerationRequest, stop_event: threading.Event
    ) -> Iterator[StreamEvent]:
        clock = EventClock(request.request_id, len(request.prompt_ids))
        text_streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        streamer = _CountingStreamer(text_streamer, clock)
        errors: list[BaseException] = []
        thread = threading.Thread(
            target=self._run_generate, args=(request, streamer, stop_event, errors), daemon=True
        )
        thread.start()
        text = ""
        for piece in text_streamer:  # the base class sets stop_event if we are closed early
            text += piece
            if piece:
                yield clock.event(text, streamer.num_tokens)
        thread.join()
        if errors:
            raise errors[0]
        yield clock.event(
            text, streamer.num_tokens, self._finish_reason(request, streamer, stop_event)
        )

    @staticmethod
    def _finish_reason(
        request: GenerationRequest, streamer: _CountingStreamer, stop_event: threading.Event
    ) -> str:
        if streamer.num_tokens >= request.settings.max_new_tokens:
            return "length"
        return "cancelled" if stop_event.is_set() else "stop"


def build(options: EngineOptions) -> TransformersEngine:
    """The registry's builder: on the model already loaded (evaluation), else loaded here."""
    if options.loaded is not None:
        return TransformersEngine.from_loaded(options.loaded)
    loaded = load_model(options.model, adapter=options.adapter)
    apply_prompt_style(loaded.tokenizer, options.adapter)
    return TransformersEngine.from_loaded(loaded, context_length=options.context_length)
