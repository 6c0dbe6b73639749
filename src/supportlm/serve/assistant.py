"""The assistant: the shared service behind every tab and API, free of Gradio.

It turns conversations, texts and votes into engine calls and stored rows:

* every call that generates passes through one `Admission` (concurrency, waiting line, rate
  limits), whatever tab or API it comes from;
* every chat reply (and both compare answers) is stored with a server-issued reply id, the
  request id of the engine call that wrote it, and the adapter version;
* feedback and votes name reply ids, so they always refer to what the server really said.

Nothing per user is kept here; each call receives its conversation from the caller (Gradio keeps
it per browser session), so two users' conversations cannot mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from supportlm.engines.base import Engine, GenerationRequest, GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError
from supportlm.feedback.review import provenance
from supportlm.feedback.store import FEEDBACK_KINDS, FeedbackStore, ReplyRecord, open_store
from supportlm.placeholders import ShopDetails
from supportlm.run_folder import PromptStyle, RunFolder
from supportlm.serve.admission import Admission, RateLimit
from supportlm.serve.answer import Answer
from supportlm.serve.conversation import ChatRequest, build_chat_request
from supportlm.serve.engine_slot import EngineSlot
from supportlm.serve.handover import IntentRouter
from supportlm.serve.history import cap_text
from supportlm.serve.plan import ServingPlan
from supportlm.serve.tasks import task_module
from supportlm.serve.tasks.common import TaskCall, count_tokens
from supportlm.serve.throttle import LoginThrottle

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _check_reply_id(reply_id: Any) -> None:
    """Reply ids are short strings the server issued; anything else is refused before SQL."""
    if not isinstance(reply_id, str) or not 0 < len(reply_id) <= 64:
        raise SupportLMError("That reply is unknown: feedback is taken for this app's replies.")


class Assistant:
    """One engine, one feedback store, one admission layer, shared by every user."""

    def __init__(
        self,
        engine: Engine,
        plan: ServingPlan,
        *,
        system_prompt: str | None = None,
        feedback: FeedbackStore | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.slot = EngineSlot(engine)
        self.settings = plan.settings
        self._system_prompt = system_prompt
        self._serve_adapter_of(plan)
        self.shop = ShopDetails.load(self.settings.shop)
        self.feedback_notice: str | None = None
        if feedback is None:
            feedback, self.feedback_notice = open_store(self.settings.feedback_db)
        self.feedback = feedback
        self.feedback_rate = RateLimit(self.settings.feedback_rate_limit)
        self.logins = LoginThrottle()  # failed logins, for every door that checks a password
        self._purged_at = -math.inf
        self._purge_if_due()  # at start-up, then at most hourly as replies are stored
        self.admission = admission or Admission(
            min(self.settings.concurrency, engine.max_concurrency),
            self.settings.max_queue,
            rate_limit=self.settings.rate_limit,
            per_client=self.settings.max_per_client,
        )

    def _serve_adapter_of(self, plan: ServingPlan) -> None:
        """The adapter's run folder, system prompt and intent router, for `plan`."""
        self.plan = plan
        self.run = RunFolder(plan.adapter) if plan.adapter else None
        style = self.run.prompt_style() if self.run else PromptStyle.default()
        self.system_prompt = self._system_prompt or style.system_prompt
        self.router = IntentRouter.from_settings(self.settings, self.run)

    def adopt(self, engine: Engine, plan: ServingPlan) -> Engine:
        """Serve `engine` (built for `plan`) from the next request on; requests already running
        finish on the old engine, which is closed after them (`EngineSlot`). Returns the old."""
        old = self.slot.replace(engine)
        self._serve_adapter_of(plan)
        return old

    @property
    def engine(self) -> Engine:
        """The engine new requests are served by."""
        return self.slot.current

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

    # -- generating -----------------------------------------------------------------------------

    def _admitted(
        self,
        events: Iterator[StreamEvent],
        client_id: str | None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[StreamEvent]:
        """`events` inside a generation slot; closing this generator stops the model too."""
        try:
            with contextlib.closing(events), self.admission.admit(client_id):  # type: ignore[arg-type]
                yield from events
        finally:
            if stop_event is not None:
                stop_event.set()

    def chat_request(
        self,
        message: str,
        history: Sequence[Mapping[str, Any]] | None,
        system_prompt: str | None,
        settings: GenerationSettings,
    ) -> ChatRequest:
        """Capped, fitted to the context, its intent detected (`build_chat_request`)."""
        return build_chat_request(
            message,
            history,
            system_prompt or self.system_prompt,
            settings,
            tokenizer=self.tokenizer,
            limits=self.settings,
            context_length=self.context_length,
            router=self.router,
        )

    def chat(
        self,
        chat: ChatRequest,
        settings: GenerationSettings,
        *,
        use_adapter: bool = True,
        client_id: str | None = None,
        conversation_id: str | None = None,
        store: bool = True,
    ) -> Iterator[StreamEvent]:
        """Stream the reply to `chat`, stored under its reply id (`event.request_id`).

        The reply is stored with its first event, so it can be rated while it streams, and its
        whole text is stored when it finishes; ``store=False`` (the user opted out) or a store
        that is off stores nothing.
        """
        with self.slot.lease() as engine:  # to the last token, even across an adapter switch
            yield from self._chat_on(engine, chat, settings, use_adapter, client_id,
                                     conversation_id, store)  # fmt: skip

    def _chat_on(self, engine, chat, settings, use_adapter, client_id, conversation_id, store):
        request = engine.request(chat.messages, settings, use_adapter=use_adapter)
        stored = None if store and self.feedback is not None else False
        for raw in self._admitted(engine.stream(request), client_id):
            # What the customer sees (and what is stored): placeholders filled or asked for.
            event = dataclasses.replace(raw, text=self.shop.fill(raw.text, final=raw.finished))
            if stored is None:  # tried once, at the first event: a failing store costs one try
                stored = self._store_reply(chat, request, event, conversation_id, engine)
            elif event.finished and stored:
                finish = functools.partial(
                    self.feedback.finish_reply, request.request_id, event.text, event.finish_reason
                )
                self._safely(request, finish)
            yield event

    def answer(
        self,
        message: str,
        history: Sequence[Mapping[str, Any]] | None,
        settings: GenerationSettings,
        *,
        system_prompt: str | None = None,
        use_adapter: bool = True,
        client_id: str | None = None,
        conversation_id: str | None = None,
        store: bool = True,
    ) -> Iterator[Answer]:
        """The one chat pipeline, for every surface: cap and fit the conversation (notices),
        detect the intent (hand-over), admit, generate and store (`chat`)."""
        chat = self.chat_request(message, history, system_prompt, settings)
        events = self.chat(chat, settings, use_adapter=use_adapter, client_id=client_id,
                           conversation_id=conversation_id, store=store)  # fmt: skip
        for event in events:
            yield Answer(event, tuple(chat.notices), chat.routing)

    def compare(
        self,
        question: str,
        settings: GenerationSettings,
        *,
        client_id: str | None = None,
        conversation_id: str | None = None,
    ) -> Iterator[tuple[StreamEvent | None, StreamEvent | None]]:
        """The base model's answer, then the adapter's, to the same prompt: (base, tuned) events."""
        if not self.engine.has_adapter:
            raise SupportLMError("No fine-tuned adapter is loaded, so there is nothing to compare.")
        chat = self.chat_request(question, [], None, settings)
        base = None
        who = {"client_id": client_id, "conversation_id": conversation_id}
        for base in self.chat(chat, settings, use_adapter=False, **who):
            yield base, None
        for tuned in self.chat(chat, settings, use_adapter=True, **who):
            yield base, tuned

    def _task(
        self,
        start: Callable[[threading.Event, Engine], Iterator[StreamEvent]],
        client_id: str | None,
    ) -> Iterator[StreamEvent]:
        """A multi-call task (summary, translation) in one slot; its stop event ends every call."""
        stop_event = threading.Event()
        with self.slot.lease() as engine:
            yield from self._admitted(start(stop_event, engine), client_id, stop_event)

    def run_task(
        self,
        task: str,
        text: str,
        settings: GenerationSettings,
        *,
        client_id: str | None = None,
        progress: Callable[..., Any] | None = None,
        **options: Any,
    ) -> Iterator[Answer]:
        """The one pipeline of a task on a text (`supportlm.serve.tasks`, e.g. ``"summarize"``
        with ``style=``, ``"translate"`` with ``target_language=``): check and cap the text (a
        notice says so), then admit and run all of the task's model calls in one slot."""
        module = task_module(task)
        if not isinstance(text, str) or not text.strip():
            raise SupportLMError(f"Please paste or upload the text to {module.VERB}.")
        text, notice = self.cap(text)
        notices = (notice,) if notice else ()
        limit = self.settings.max_model_calls

        def start(stop_event: threading.Event, engine: Engine) -> Iterator[StreamEvent]:
            call = TaskCall(engine, settings, self.system_prompt, progress, stop_event, limit)
            return module.run(call, text, **options)

        for event in self._task(start, client_id):
            yield Answer(event, notices)

    def count_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    # -- replies and feedback -------------------------------------------------------------------

    def _store_reply(
        self,
        chat: ChatRequest,
        request: GenerationRequest,
        event: StreamEvent,
        conversation_id: str | None,
        engine: Engine,
    ) -> bool:
        self._purge_if_due()
        adapter = request.adapter
        record = ReplyRecord(
            reply_id=request.request_id,
            conversation=[m for m in chat.messages if m["role"] != "system"],
            reply=event.text,
            finish_reason=event.finish_reason,
            model_id=self.plan.model,
            adapter_id=None if adapter is None else adapter.name,
            adapter_version=None if adapter is None else adapter.version,
            backend=engine.name,
            settings={
                **request.settings.to_dict(),
                "system_prompt": next(
                    (m["content"] for m in chat.messages if m["role"] == "system"), None
                ),
            },
            conversation_id=conversation_id,
            intent=chat.routing.intent if chat.routing else None,
            handover=bool(chat.routing and chat.routing.handover),
        )
        return self._safely(request, lambda: self.feedback.add_reply(record))

    def _safely(self, request: GenerationRequest, store: Callable[[], Any]) -> bool:
        """Run `store` for `request`'s reply; a failing store is logged, the reply still served."""
        try:
            self._write(store, f"store reply {request.request_id}")
        except SupportLMError:
            return False
        return True

    def _purge_if_due(self) -> None:
        """Delete rows past `retention_days`, at most once an hour (an indexed DELETE)."""
        days = self.settings.retention_days
        if not days or time.monotonic() - self._purged_at < 3600:
            return
        self._purged_at = time.monotonic()
        from supportlm.feedback.retention import purge_older_than

        with contextlib.suppress(SupportLMError):  # logged by _write; replies keep flowing
            self._write(lambda: purge_older_than(self._store(), days), "purge old rows")

    def _store(self) -> FeedbackStore:
        if self.feedback is None:
            raise SupportLMError(self.feedback_notice or "Feedback is switched off.")
        return self.feedback

    @staticmethod
    def _write(write: Callable[[], T], what: str) -> T:
        """Run a store write; a failing disk or database is a clear message, the app serves on."""
        try:
            return write()
        except (sqlite3.Error, OSError) as error:
            logger.exception("Could not %s", what)
            full = "full" in str(error).lower() or getattr(error, "errno", None) == errno.ENOSPC
            reason = "the server's storage is full" if full else "the server's storage failed"
            raise SupportLMError(
                f"Sorry, that could not be saved ({reason}); the assistant keeps answering."
            ) from error

    def record_feedback(
        self,
        kind: str,
        reply_id: str,
        *,
        corrected_answer: str | None = None,
        client_id: str | None = None,
    ) -> int:
        """Store a like, dislike or correction of the reply `reply_id` the server issued.

        The one write path for feedback (the Chat tab, the ``/feedback`` API, the soak bench):
        the kind, the reply id and the correction's size are checked, and each client may write
        `feedback_rate_limit` rows a minute.
        """
        store = self._store()
        if kind not in FEEDBACK_KINDS:
            raise SupportLMError(f"Unknown feedback kind {kind!r}; use one of {FEEDBACK_KINDS}.")
        _check_reply_id(reply_id)
        limit = self.settings.max_correction_chars
        if corrected_answer is not None and (
            not isinstance(corrected_answer, str) or len(corrected_answer) > limit
        ):
            raise SupportLMError(
                f"The correction is too long (at most {limit} characters); please shorten it."
            )
        self.feedback_rate.check(client_id, "feedback messages")
        author, trusted = provenance(client_id, self.settings)
        who = {"author": author, "trusted": trusted}
        return self._write(
            lambda: store.add_feedback(kind, reply_id, corrected_answer=corrected_answer, **who),  # type: ignore[arg-type]
            "store feedback",
        )

    def record_vote(
        self, base_reply_id: str, tuned_reply_id: str, choice: str, *, client_id: str | None = None
    ) -> int:
        if not (base_reply_id and tuned_reply_id):
            raise SupportLMError("Compare the two answers first, then vote.")
        store = self._store()
        _check_reply_id(base_reply_id)
        _check_reply_id(tuned_reply_id)
        self.feedback_rate.check(client_id, "feedback messages")
        author, trusted = provenance(client_id, self.settings)
        who = {"author": author, "trusted": trusted}
        return self._write(
            lambda: store.add_vote(base_reply_id, tuned_reply_id, choice, **who),  # type: ignore[arg-type]
            "store a vote",
        )
