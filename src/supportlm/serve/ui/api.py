"""The documented API endpoints (for `gradio_client`).

Plain functions registered with `gr.api`, so their contract stays simple whatever the UI shows:

* ``/chat`` streams the reply text; ``/reply`` streams ``{"reply_id", "text", "notices",
  "intent", "handover"}``, the reply id being what ``/feedback`` takes;
* ``/summarize`` and ``/translate`` stream strings;
* ``/info`` says what serves: engine, backend setting and why, model, adapter name and version;
* ``/feedback`` stores a like, dislike or correction of a reply the server issued (the one
  feedback write path: the Chat tab's buttons, this endpoint and the soak bench all end in
  `Assistant.record_feedback`, with its checks, caps and per-client rate limit).

Every endpoint takes the caller's identity from its request (rate limits, required sign-in), and
every field is capped by the same `Assistant` as the UI's.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

import gradio as gr

from supportlm.serve.answer import Answer
from supportlm.serve.assistant import Assistant
from supportlm.serve.info import serving_info
from supportlm.serve.switching import AdapterSwitcher
from supportlm.serve.ui.common import (
    DEFAULTS,
    client_id,
    generation_settings,
    gpu,
    notify,
    session_id,
    user_errors,
    user_facing,
)


def _texts(answers: Iterator[Answer]) -> Iterator[str]:
    """The texts of a streamed answer, each new one once (API streams); its notices are sent
    once, as warnings (`gradio_client` status updates)."""
    last = None
    for index, answer in enumerate(user_facing(answers)):
        if index == 0:
            notify(list(answer.notices))
        if answer.text != last:
            last = answer.text
            yield last
    if last is None:
        yield ""


class Endpoints:
    """The API endpoints of one `Assistant`; each method is one endpoint, named after it."""

    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant

    def _chat(self, message, history, system_prompt, values, request) -> Iterator[Answer]:
        settings = self.assistant.settings
        return self.assistant.answer(
            message, history, generation_settings(**values), system_prompt=system_prompt,
            client_id=client_id(request, settings), conversation_id=session_id(request, settings),
        )  # fmt: skip

    def chat(
        self,
        message: str,
        history: list[dict] | None = None,
        system_prompt: str | None = None,
        temperature: float = DEFAULTS.temperature,
        top_p: float = DEFAULTS.top_p,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[str]:
        """Answer a customer's message as the shop's support assistant (streams the reply).

        Also the MCP tool that answers customers: send their message, and the conversation so
        far if there is one. Order numbers, names and contact details are not needed.

        Args:
            message: the customer's newest message, e.g. "How do I cancel my order?".
            history: the conversation so far, as {"role": "user"|"assistant", "content"} dicts.
            system_prompt: instructions for the assistant; default: the fine-tuned adapter's own.
            temperature: 0 answers deterministically; higher values vary the wording.
            top_p: nucleus sampling mass when temperature is above 0.
            max_new_tokens: the longest reply, in tokens.
            repetition_penalty: above 1 discourages repeating words.
        """
        values = dict(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
        )
        yield from _texts(self._chat(message, history, system_prompt, values, request))

    def reply(
        self,
        message: str,
        history: list[dict] | None = None,
        system_prompt: str | None = None,
        temperature: float = DEFAULTS.temperature,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[dict]:
        """Like /chat, streaming {"reply_id", "text", "notices", "intent", "handover"}.

        `reply_id` is what /feedback takes; `intent` is the detected intent of `message` (null
        without a classifier) and `handover` whether a person takes the conversation over.
        """
        values = dict(temperature=temperature, max_new_tokens=max_new_tokens)
        answers = self._chat(message, history, system_prompt, values, request)
        for index, answer in enumerate(user_facing(answers)):
            if index == 0:
                notify(list(answer.notices))
            yield {
                "reply_id": answer.reply_id,
                "text": answer.text,
                "notices": "".join(f"⚠️ {notice}  \n" for notice in answer.notices),
                "intent": answer.intent,
                "handover": answer.handover,
            }

    def feedback(
        self,
        reply_id: str,
        kind: str = "like",
        corrected_answer: str | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict:
        """Rate a reply the server issued: kind is like, dislike or correction (with the answer)."""
        record = user_errors(self.assistant.record_feedback)
        row = record(
            kind,
            reply_id,
            corrected_answer=corrected_answer,
            client_id=client_id(request, self.assistant.settings),
        )
        return {"saved": True, "feedback_id": row}

    def info(self) -> dict:
        """What serves: {"engine", "backend", "why", "model", "adapter", "adapter_version",
        "adapter_shipped"}; names only, never server paths."""
        return serving_info(self.assistant)

    def summarize(
        self,
        text: str,
        style: str = "paragraph",
        max_new_tokens: int = 192,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[str]:
        """Summarise a support ticket, e-mail thread or chat transcript (streams the summary).

        Long texts are summarised in parts, then combined.

        Args:
            text: the text to summarise (capped like every input).
            style: "paragraph", "bullets" or "action_items" (what the agent must do next).
            max_new_tokens: the longest summary, in tokens.
        """
        settings = generation_settings(max_new_tokens=max_new_tokens, temperature=0.0)
        client = client_id(request, self.assistant.settings)
        yield from _texts(self.assistant.run_task("summarize", text, settings, style=style,
                                                  client_id=client))  # fmt: skip

    def translate(
        self,
        text: str,
        target_language: str = "French",
        source_language: str = "auto",
        max_new_tokens: int = 384,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[str]:
        """Translate a customer's message or a reply, keeping order numbers, links and layout.

        Args:
            text: the text to translate.
            target_language: the language to translate into, e.g. "French" or "German".
            source_language: the text's language, or "auto" to detect it.
            max_new_tokens: the longest translation of one part, in tokens.
        """
        settings = generation_settings(max_new_tokens=max_new_tokens, temperature=0.0)
        answers = self.assistant.run_task(
            "translate", text, settings, target_language=target_language,
            source_language=source_language, client_id=client_id(request, self.assistant.settings),
        )  # fmt: skip
        yield from _texts(answers)


def reload_endpoint(switcher: AdapterSwitcher):
    def reload_adapter(token: str) -> dict:
        """Admin: serve the promoted adapter (outputs/latest) now; needs SUPPORTLM_ADMIN_TOKEN."""
        expected = switcher.assistant.settings.admin_token
        if not expected:
            raise gr.Error("Reloading is disabled: SUPPORTLM_ADMIN_TOKEN is not set.")
        if not hmac.compare_digest(str(token or "").encode(), expected.encode()):
            raise gr.Error("Wrong admin token.")
        switched = user_errors(switcher.check)()
        return {"switched": switched is not None, "adapter_version": switcher.served_version(),
                **(switched or {})}  # fmt: skip

    return reload_adapter


#: The endpoints served as MCP tools (``SUPPORTLM_MCP=1``): Gradio makes a tool of every public
#: endpoint, so with MCP on the others are undocumented (still callable by `gradio_client`).
MCP_TOOLS = ("chat", "summarize", "translate")


def register_api(assistant: Assistant, switcher: AdapterSwitcher | None = None) -> None:
    endpoints = Endpoints(assistant)
    functions = {name: gpu(getattr(endpoints, name)) for name in ("chat", "reply", "summarize",
                                                                  "translate")}  # fmt: skip
    functions |= {"feedback": endpoints.feedback, "info": endpoints.info}
    if switcher is not None:
        functions["reload_adapter"] = reload_endpoint(switcher)
    for name, function in functions.items():
        public = name in MCP_TOOLS or not assistant.settings.mcp
        gr.api(function, api_name=name, api_visibility="public" if public else "undocumented")
