"""The Chat tab: streaming answers, likes and dislikes, corrections of the last answer.

Each reply's server-issued id is kept per session (a `gr.State` mapping the reply's position in
the chat to its id), so a like or a correction names the reply the server stored, never a copy
of the conversation the browser sends back.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from supportlm.serve.assistant import Assistant
from supportlm.serve.handover import Routing
from supportlm.serve.ui.common import (
    GenerationControls,
    client_id,
    gpu,
    session_id,
    shown,
    user_errors,
)

EXAMPLE_QUESTIONS = [
    "I want to cancel my order, how do I do that?",
    "My package hasn't arrived yet. Can you check where it is?",
    "How can I get a refund for a damaged item?",
    "I forgot my password and can't log in to my account.",
]


PRIVACY_NOTICE = (
    "Conversations may be stored, with personal data redacted, to improve the assistant. Tick "
    "*Don't store this conversation* to opt out; to have a stored conversation erased, quote its "
    "id: `{conversation}`."
)


def intent_caption(assistant: Assistant, routing: Routing | None) -> str:
    """The caption's intent, with what detected it on hover (the classifier)."""
    if routing is None:
        return ""
    title = html.escape(assistant.router.description)
    return f' · <span title="{title}">{routing.caption}</span>'


def chat_tab(assistant: Assistant, max_reply: int) -> gr.Markdown:
    """The tab's widgets and events; returns the privacy notice, filled in per session on load."""
    with gr.Accordion("Generation settings", open=False):
        controls = GenerationControls(assistant.system_prompt, max_reply)
    reply_ids = gr.State({})
    opt_out = gr.Checkbox(
        False, label="Don't store this conversation", elem_id="opt-out", container=False
    )
    caption_md = gr.Markdown(elem_id="chat-caption", render=False)
    chatbot = gr.Chatbot(
        label="Assistant",
        height=440,
        placeholder="Ask a customer-service question, or pick an example.",
        editable="user",
        elem_id="chatbot",
    )

    @gpu
    def respond(
        message,
        history,
        prompt,
        temperature,
        top_p,
        max_new,
        penalty,
        ids,
        no_store,
        request: gr.Request,
    ):
        # Named parameters: Gradio injects `request` by its annotation, which *args would hide.
        prompt, settings = controls.read((prompt, temperature, top_p, max_new, penalty))
        index = len(history or []) + 1  # the reply follows the user's new message
        answers = assistant.answer(
            message, history, settings, system_prompt=prompt,
            client_id=client_id(request, assistant.settings),
            conversation_id=session_id(request, assistant.settings), store=not no_store,
        )  # fmt: skip
        intent = None
        for text, caption_text, answer in shown(answers):
            intent = intent if intent is not None else intent_caption(assistant, answer.routing)
            yield text, caption_text + intent, {**ids, index: answer.reply_id}

    gr.ChatInterface(
        respond,
        chatbot=chatbot,
        additional_inputs=[*controls.inputs, reply_ids, opt_out],
        additional_outputs=[caption_md, reply_ids],
        editable=True,
        examples=[[question] for question in EXAMPLE_QUESTIONS],
        api_name="chat_ui",
        api_visibility="undocumented",
        fill_height=False,
    )
    caption_md.render()
    with gr.Accordion("Correct the last answer", open=False):
        correction = gr.Textbox(
            label="What should the assistant have answered?",
            lines=3,
            max_length=assistant.settings.max_correction_chars,
        )
        send_correction = gr.Button("Save correction", size="sm")
    feedback_status = gr.Markdown(assistant.feedback_notice or "", elem_id="feedback-status")
    privacy = gr.Markdown(elem_id="privacy-notice")
    _feedback_events(assistant, chatbot, reply_ids, correction, send_correction, feedback_status)
    return privacy


def _feedback_events(assistant, chatbot, reply_ids, correction, send_correction, status) -> None:
    @user_errors
    def on_like(ids: dict[int, str], like: gr.LikeData, request: gr.Request):
        kind = {True: "like", "Like": "like", False: "dislike", "Dislike": "dislike"}.get(
            like.liked
        )
        if kind is None:
            return gr.skip()
        index = like.index if isinstance(like.index, int) else (like.index or [None])[0]
        assistant.record_feedback(
            kind, _reply_id(ids, index), client_id=client_id(request, assistant.settings)
        )
        return f"Thanks, your {kind} was saved."

    # Private: not in the API (the documented `/feedback` is); still checked like any input,
    # since a script can call an event by its index whatever its visibility.
    chatbot.like(on_like, reply_ids, status, api_visibility="private", api_name="like")

    @user_errors
    def on_correction(ids: dict[int, str], answer: str, request: gr.Request):
        # The last reply this session was served (server-side state), not the browser's copy.
        if not ids:
            raise gr.Error("There is no answer to correct yet.")
        reply_id = ids[max(ids)]
        assistant.record_feedback(
            "correction",
            reply_id,
            corrected_answer=answer,
            client_id=client_id(request, assistant.settings),
        )
        return "", "Thanks, your correction was saved."

    send_correction.click(
        on_correction,
        [reply_ids, correction],
        [correction, status],
        api_visibility="private",
        api_name="correct",
    )


def _reply_id(ids: dict[int, str], index: Any) -> str:
    if not isinstance(index, int) or index not in ids:
        raise gr.Error("Only the assistant's replies in this session can be rated or corrected.")
    return ids[index]
