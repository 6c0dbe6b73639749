"""The contract every engine serves: settings, requests, streamed events and the `Engine` base.

Modelled on vLLM's `EngineClient` (``generate(prompt, SamplingParams, request_id,
lora_request)`` plus ``abort``): callers hand an engine *chat messages* (`Engine.request`), and
the engine encodes them itself through the one prompt module (`supportlm.prompts.encode_chat`),
so no caller builds token ids and the prompt format lives in one place. A `GenerationRequest`
carries the messages, their token ids, its settings, a request id and the adapter it wants
(`AdapterRef`, or None for the base model). Every failure to generate is an `EngineError`. An
engine subclass implements `Engine._stream` only; the base class owns what every engine must do the
same way: registering requests so `abort` can stop them, checking the adapter, cutting the reply
at stop strings, stopping the model when the consumer goes away, and `generate` on top of
`stream`.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.prompts import encode_chat


class EngineError(SupportLMError):
    """The engine failed to generate, not the request (an API caller gets a 502, not a 400)."""


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
    stop: tuple[str, ...] = field(
        default=(), metadata={"help": "Strings that end the reply; they are not part of it."}
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SupportLMError("max_new_tokens must be at least 1.")
        if self.temperature < 0:
            raise SupportLMError("temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise SupportLMError("top_p must be in (0, 1].")
        if self.repetition_penalty <= 0:
            raise SupportLMError("repetition_penalty must be positive.")
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SupportLMError("Every stop string must be a non-empty string.")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["stop"] = list(self.stop)
        return record


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter a request wants: its name and the content hash of its weights and config.

    Two adapters with the same name but other weights (a retrained run) are different refs, so a
    request can never be served by an adapter other than the one it names.
    """

    name: str
    version: str


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


@dataclass
class GenerationRequest:
    """One generation: the chat messages and their token ids, settings, the adapter (None: the
    base model), an id. Built by `Engine.request`, which encodes the messages; engines that send
    text to a server applying the chat template itself read `messages`
    (`supportlm.engines.openai_remote`), local ones `prompt_ids`.
    """

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    settings: GenerationSettings
    adapter: AdapterRef | None
    request_id: str = field(default_factory=new_request_id)


@dataclass
class StreamEvent:
    """The state of one generation: `text` is the whole reply so far, not a delta."""

    text: str
    num_tokens: int
    time_to_first_token: float | None
    elapsed: float
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    request_id: str = ""
    prompt_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token (the prompt's cost is in time_to_first_token)."""
        if self.time_to_first_token is None or self.num_tokens < 2:
            return 0.0
        decode_time = self.elapsed - self.time_to_first_token
        return (self.num_tokens - 1) / decode_time if decode_time > 0 else 0.0

    @property
    def usage(self) -> dict[str, int]:
        """Token usage in the OpenAI names."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.num_tokens,
            "total_tokens": self.prompt_tokens + self.num_tokens,
        }

    def caption(self) -> str:
        ttft = "-" if self.time_to_first_token is None else f"{self.time_to_first_token:.2f} s"
        return f"first token {ttft} · {self.tokens_per_second:.1f} tok/s · {self.num_tokens} tokens"


@dataclass
class EventClock:
    """Builds the `StreamEvent`s of one generation: times them from `start` on one clock."""

    request_id: str = ""
    prompt_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def first_token(self, at: float | None = None) -> None:
        """Note the first token's arrival (later calls keep the first time)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter() if at is None else at

    def event(self, text: str, num_tokens: int, finish_reason: str | None = None) -> StreamEvent:
        first = self.first_token_at
        return StreamEvent(
            text=text,
            num_tokens=num_tokens,
            time_to_first_token=None if first is None else first - self.start,
            elapsed=time.perf_counter() - self.start,
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            request_id=self.request_id,
            prompt_tokens=self.prompt_tokens,
        )


@dataclass
class ReplyText:
    """The text of a reply's token ids so far, for engines that receive tokens one by one.

    The ids are detokenised whole each time (a token's text can depend on its neighbours), and a
    trailing partial UTF-8 character is held back until its last byte arrives.
    """

    tokenizer: Any
    text: str = ""

    def update(self, token_ids: list[int], *, finished: bool = False) -> bool:
        """Take the ids so far; True when `text` changed."""
        decoded = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if decoded == self.text or (not finished and decoded.endswith("\ufffd")):
            return False
        self.text = decoded
        return True


def final_event(events: Iterable[StreamEvent]) -> StreamEvent:
    """The last event of a stream: the whole reply, its finish reason and usage."""
    final = None
    for final in events:  # noqa: B007 (the loop variable is the result)
        pass
    if final is None:
        raise SupportLMError("The engine produced no reply.")
    return final


class Engine(abc.ABC):
    """A text generator the app, the tasks, the evaluation and the benchmarks share.

    Subclasses set `name`, `description`, `tokenizer`, `context_length` and `adapter` (the one
    adapter they serve, or None) and implement `_stream`. `max_concurrency` is how many requests
    the engine really runs at once; the serving layer admits no more than that.
    """

    name: str = "engine"
    description: str = ""
    tokenizer: Any
    context_length: int
    adapter: AdapterRef | None = None
    max_concurrency: int = 1

    def __init__(self) -> None:
        self._in_flight: dict[str, threading.Event] = {}
        self._in_flight_lock = threading.Lock()

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    def request(
        self,
        messages: Sequence[Mapping[str, str]],
        settings: GenerationSettings,
        *,
        use_adapter: bool = True,
    ) -> GenerationRequest:
        """A request answering the chat `messages` with the served adapter (or the base model
        when `use_adapter` is false); the engine encodes them (`encode`)."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        adapter = self.adapter if use_adapter else None
        return GenerationRequest(messages, self.encode(messages), settings, adapter)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt token ids of `messages`, with the generation prompt: the one chat format."""
        return encode_chat(self.tokenizer, messages)

    @abc.abstractmethod
    def _stream(
        self, request: GenerationRequest, stop_event: threading.Event
    ) -> Iterator[StreamEvent]:
        """Generate until done or `stop_event` is set; the last event has `finished` set."""

    def stream(
        self, request: GenerationRequest, *, stop_event: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Stream `request`; closing the generator (or `abort`) stops the model, not just text."""
        self._check_adapter(request.adapter)
        stop_event = stop_event or threading.Event()
        self._register(request.request_id, stop_event)
        events = self._stream(request, stop_event)
        completed = False
        try:
            with contextlib.closing(events):
                yield from cut_at_stop_strings(events, request.settings.stop, stop_event)
            completed = True
        finally:
            if not completed:  # the consumer went away (client closed): stop the model too
                stop_event.set()
            with self._in_flight_lock:
                self._in_flight.pop(request.request_id, None)

    def generate(self, request: GenerationRequest) -> StreamEvent:
        """The whole reply at once: the last event of `stream`."""
        return final_event(self.stream(request))

    def abort(self, request_id: str) -> bool:
        """Stop the request `request_id`; False when it is not running (finished or unknown)."""
        with self._in_flight_lock:
            stop_event = self._in_flight.get(request_id)
        if stop_event is None:
            return False
        stop_event.set()
        return True

    def close(self) -> None:  # noqa: B027 (engines without resources need not override it)
        """Free the engine's resources; the base class holds none."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _register(self, request_id: str, stop_event: threading.Event) -> None:
        with self._in_flight_lock:
            if request_id in self._in_flight:
                raise SupportLMError(f"Request id {request_id!r} is already running.")
            self._in_flight[request_id] = stop_event

    def _check_adapter(self, adapter: AdapterRef | None) -> None:
        if adapter is not None and adapter != self.adapter:
            served = (
                "none" if self.adapter is None else f"{self.adapter.name} {self.adapter.version}"
            )
            raise SupportLMError(
                f"Adapter {adapter.name} (version {adapter.version}) is not loaded; this engine "
                f"serves {served}."
            )


def cut_at_stop_strings(
    events: Iterator[StreamEvent], stop: tuple[str, ...], stop_event: threading.Event
) -> Iterator[StreamEvent]:
    """End the reply before the first stop string, holding back text that may start one.

    Engines stop on end-of-turn tokens themselves; stop *strings* (the OpenAI ``stop``) can span
    token boundaries, so they are matched on the detokenised text, as vLLM and llama.cpp's server
    do, and never shown to the user, not even in part while streaming.
    """
    if not stop:
        yield from events
        return
    for event in events:
        cut = min((i for i in (event.text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            stop_event.set()  # the model stops at its next token
            event.text, event.finished, event.finish_reason = event.text[:cut], True, "stop"
            yield event
            return
        if not event.finished:
            event.text = event.text[: len(event.text) - _partial_stop_length(event.text, stop)]
        yield event


def _partial_stop_length(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    return max(
        (n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
        default=0,
    )
